"""fq_jax.plotting.plot_run draws what metrics.csv holds (matplotlib, Agg)."""

import matplotlib
import numpy as np

matplotlib.use("Agg")

from fq_jax import plotting  # noqa: E402


def _row(stage, split, step, **values):
  return {"stage": stage, "split": split, "global_step": str(step), **values}


def test_plot_run_draws_the_test_curve_fractions_and_stage_ends():
  rows = [
    _row("dense", "test", 0, accuracy="0.81"),
    _row("prune", "train", 3, accuracy="0.7"),
    _row("prune", "test", 3, accuracy="0.75", sparsity="0.7"),
    _row("prune", "test", 6, accuracy="0.78", sparsity="0.7"),
    _row("quantize", "train", 9, accuracy="0.7", quantized_fraction="0.5"),
    _row("quantize", "test", 9, accuracy="0.77", quantized_fraction="0.5"),
    _row("evaluate", "test", 12, accuracy="0.79"),
  ]
  reference = [
    _row("dense", "test", 0, accuracy="0.81"),
    _row("evaluate", "test", 12, accuracy="0.86"),
  ]
  ax = plotting.plot_run(rows, reference=reference, title="run")
  lines = {line.get_label(): line for line in ax.get_lines()}
  compressed = lines["compressed (test accuracy)"]
  np.testing.assert_array_equal(compressed.get_xdata(), [0, 3, 6, 9, 12])
  np.testing.assert_allclose(compressed.get_ydata(), [0.81, 0.75, 0.78, 0.77, 0.79])
  np.testing.assert_allclose(lines["reference (test accuracy)"].get_ydata(), [0.81, 0.86])
  # The prune stage ends at its last row's step (a dotted vertical line).
  assert [line.get_xdata()[0] for line in ax.get_lines() if line.get_linestyle() == ":"] == [6.0]
  twin = [a for a in ax.figure.axes if a is not ax][0]
  labels = {line.get_label() for line in twin.get_lines()}
  assert labels == {"sparsity", "quantized fraction"}
