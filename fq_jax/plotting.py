"""Plots people would rather look at than read (needs the `plot` extra: matplotlib).

* `plot_layer`: a layer's kept-weight histogram with the fitted Gaussians and the
  quantization levels (the paper's Figures 1 and 2).
* `plot_separation`: the Wasserstein separation (Eq. 4) per layer against w_sep.
* `plot_accuracy_vs_ratio`: accuracy against compression ratio, one line per method.
* `plot_run`: a pipeline run's test accuracy, sparsity and quantized fraction against
  the training step, with its stage boundaries (the rows of `metrics.csv`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from fq_jax._src import quantizers


def _pyplot():
  try:
    import matplotlib.pyplot as plt  # the caller's backend (inline, Agg, ...) is kept
  except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("fq_jax.plotting needs matplotlib: pip install 'fq_jax[plot]'") from e
  return plt


def quantization_levels(state: quantizers.FocusState) -> np.ndarray:
  """Every value a layer's focused quantizer can output for a kept weight, sorted."""
  n = int(quantizers.num_symbols(state))
  one = state._replace(mask=jnp.ones((n,), bool), assignment=jnp.zeros((n,), bool))
  return np.unique(np.asarray(quantizers.focused_values(jnp.arange(n, dtype=jnp.int32), one)))


def plot_layer(w, state: quantizers.FocusState, *, title: str = "", ax=None, bins: int = 120):
  """Histogram of the kept weights, the fitted mixture and the quantization levels.

  Args:
    w: the layer's weights.
    state: its `FocusState` (from `fq.focus` or an `FQState`).
    title: axis title (e.g. the parameter path).
    ax: a matplotlib axis; a new figure when None.
    bins: histogram bins.

  Returns:
    The matplotlib axis.
  """
  plt = _pyplot()
  if ax is None:
    _, ax = plt.subplots(figsize=(6, 3))
  kept = np.asarray(w, np.float32)[np.asarray(state.mask)]
  ax.hist(kept, bins=bins, density=True, color="0.75", label="kept weights")
  lo, hi = (kept.min(), kept.max()) if kept.size else (-1.0, 1.0)
  xs = np.linspace(lo, hi, 400)
  g = state.gmm
  total = np.zeros_like(xs)
  for c, color in zip(range(2), ("tab:blue", "tab:red")):
    lam, mu, sd = float(g.weights[c]), float(g.means[c]), float(g.stds[c])
    pdf = lam * np.exp(-0.5 * ((xs - mu) / sd) ** 2) / (sd * np.sqrt(2 * np.pi))
    total += pdf
    ax.plot(xs, pdf, color=color, lw=1.2, label=f"N({mu:.3g}, {sd:.2g}) x {lam:.2f}")
  ax.plot(xs, total, color="k", lw=0.8, ls="--", label="mixture")
  for level in quantization_levels(state):
    if lo <= level <= hi:
      ax.axvline(level, color="tab:green", lw=0.6, alpha=0.7)
  kind = "recentralized" if bool(state.recentralized) else "shift"
  ax.set_title(
    f"{title} [{kind}, W={float(state.separation):.2f}, {int(state.bits)} bits]", fontsize=9
  )
  ax.legend(fontsize=6, loc="upper right")
  return ax


def plot_separation(rows: Sequence[Mapping[str, Any]], *, w_sep: float = 2.0, ax=None):
  """Bar chart of each layer's Wasserstein separation with the w_sep threshold.

  Args:
    rows: `fq.layer_report` rows (those with a "separation" entry are drawn).
    w_sep: the threshold drawn as a horizontal line.
    ax: a matplotlib axis; a new figure when None.

  Returns:
    The matplotlib axis.
  """
  plt = _pyplot()
  rows = [r for r in rows if "separation" in r]
  if ax is None:
    _, ax = plt.subplots(figsize=(max(6, 0.3 * len(rows)), 3))
  sep = [r["separation"] for r in rows]
  colors = ["tab:red" if r["kind"] == "recentralized" else "tab:blue" for r in rows]
  ax.bar(range(len(rows)), sep, color=colors)
  ax.axhline(w_sep, color="k", ls="--", lw=1, label=f"w_sep = {w_sep}")
  ax.set_xticks(range(len(rows)))
  ax.set_xticklabels([r["path"].replace("/kernel", "") for r in rows], rotation=90, fontsize=6)
  ax.set_ylabel("Wasserstein separation (Eq. 4)")
  ax.legend(fontsize=7)
  return ax


def plot_accuracy_vs_ratio(
  results: Mapping[str, Sequence[tuple[float, float]]], *, ax=None, title: str = ""
):
  """Accuracy against compression ratio, one line per method.

  Args:
    results: method name -> [(compression_ratio, accuracy), ...].
    ax: a matplotlib axis; a new figure when None.
    title: axis title.

  Returns:
    The matplotlib axis.
  """
  plt = _pyplot()
  if ax is None:
    _, ax = plt.subplots(figsize=(5, 3.5))
  for name, points in results.items():
    pts = sorted(points)
    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
  ax.set_xlabel("compression ratio (file on disk)")
  ax.set_ylabel("top-1 accuracy")
  ax.set_title(title, fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  return ax


def _number(row: Mapping[str, Any], key: str) -> float | None:
  value = row.get(key)
  return None if value in (None, "") else float(value)


def plot_run(
  rows: Sequence[Mapping[str, Any]],
  *,
  reference: Sequence[Mapping[str, Any]] | None = None,
  ax=None,
  title: str = "",
):
  """Test accuracy against the global training step, with sparsity and INQ progress.

  Args:
    rows: a run's `metrics.csv` rows (`csv.DictReader` dicts): the `test` rows give the
      accuracy curve (`eval_every_epochs` adds rows inside the stages), the `train` rows
      the stage boundaries and the quantized fraction.
    reference: the rows of the fair reference run (`reference_only=true`), drawn dashed.
    ax: a matplotlib axis; a new figure when None.
    title: axis title.

  Returns:
    The accuracy axis (the fractions share its x axis on a twin axis).
  """
  plt = _pyplot()
  if ax is None:
    _, ax = plt.subplots(figsize=(7, 4))

  def curve(table):
    points = [
      (float(r["global_step"]), float(r["accuracy"]))
      for r in table
      if r.get("split") == "test" and r.get("global_step") not in (None, "")
    ]
    return sorted(points)

  for table, label, style in ((rows, "compressed", "-o"), (reference or (), "reference", "--s")):
    points = curve(table)
    if points:
      ax.plot(*zip(*points), style, markersize=3, label=f"{label} (test accuracy)")
  ax.set_xlabel("training step (all stages)")
  ax.set_ylabel("top-1 test accuracy")
  ax.grid(alpha=0.3)
  fractions = ax.twinx()
  for key, label, color in (
    ("sparsity", "sparsity", "tab:red"),
    ("quantized_fraction", "quantized fraction", "tab:green"),
  ):
    points = sorted(
      (float(r["global_step"]), v)
      for r in rows
      if (v := _number(r, key)) is not None and r.get("global_step") not in (None, "")
    )
    if points:
      fractions.step(*zip(*points), where="post", color=color, alpha=0.6, label=label)
  fractions.set_ylim(0, 1.05)
  fractions.set_ylabel("fraction of kernel weights")
  ends: dict[str, float] = {}
  for r in rows:
    if r.get("global_step") not in (None, "") and r.get("stage") in ("dense", "prune"):
      ends[r["stage"]] = max(ends.get(r["stage"], 0.0), float(r["global_step"]))
  for stage, step in ends.items():
    if step > 0:
      ax.axvline(step, color="grey", linestyle=":", linewidth=1)
      ax.annotate(f"end of {stage}", (step, 0), xycoords=("data", "axes fraction"), fontsize=7,
                  rotation=90, va="bottom", ha="right")  # fmt: skip
  lines = ax.get_legend_handles_labels()
  more = fractions.get_legend_handles_labels()
  ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=7, loc="lower right")
  ax.set_title(title, fontsize=9)
  return ax
