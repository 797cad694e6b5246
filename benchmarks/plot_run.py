"""Plot a pipeline run: test accuracy, sparsity and quantized fraction against the step.

    python benchmarks/plot_run.py WORKDIR [--reference REF_WORKDIR] --out curve.png

Reads WORKDIR/metrics.csv (and the reference run's), draws `fq_jax.plotting.plot_run`.
Set `--config.eval_every_epochs=N` on the run for test points inside the stages.
"""

from __future__ import annotations

import argparse
import csv
import pathlib

import matplotlib

matplotlib.use("Agg")

from fq_jax import plotting  # noqa: E402


def _rows(workdir: str) -> list[dict]:
  with open(pathlib.Path(workdir) / "metrics.csv", newline="") as f:
    return list(csv.DictReader(f))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("workdir")
  parser.add_argument("--reference", help="workdir of the reference_only run")
  parser.add_argument("--out", required=True, help="PNG to write")
  parser.add_argument("--title", default="")
  args = parser.parse_args()
  ax = plotting.plot_run(
    _rows(args.workdir),
    reference=_rows(args.reference) if args.reference else None,
    title=args.title,
  )
  ax.figure.tight_layout()
  ax.figure.savefig(args.out, dpi=130)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
