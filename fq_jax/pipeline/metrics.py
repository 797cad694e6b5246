"""Run-time output: the metrics CSV and per-epoch progress bars (edges only)."""

from __future__ import annotations

import csv
import io
import os
import sys
from typing import Any

from tqdm import tqdm

from fq_jax.codec import atomic
from fq_jax.pipeline.configuration import STAGES

COLUMNS = (
  "stage",
  "epoch",
  "step",
  "split",
  "loss",
  "accuracy",
  "top5",
  "learning_rate",
  "quantized_fraction",
  "sparsity",
  "seconds",
)


def _position(stage: str, step: int) -> tuple[int, int]:
  return (STAGES.index(stage) if stage in STAGES else len(STAGES), step)


class MetricsWriter:
  """Writes DIR/metrics.csv; a resumed run first drops rows past its position.

  Rows written after the checkpoint a run resumes from would otherwise appear
  twice (once from the killed run, once when they are recomputed). Every
  write replaces the whole file atomically (`fq_jax.codec.atomic`): the file
  is small (a row per epoch and stage) and never left half-written.
  """

  def __init__(
    self, path: str, *, resume_stage: str = "dense", resume_step: int = 0, enabled: bool = True
  ):
    self.path = path
    self.enabled = enabled
    self.rows: list[dict[str, str]] = []
    if not enabled:
      return
    if os.path.exists(path):
      with open(path, newline="") as f:
        for row in csv.DictReader(f):
          try:
            pos = _position(row["stage"], int(row["step"]))
          except (KeyError, TypeError, ValueError):
            continue
          if pos <= _position(resume_stage, resume_step):
            self.rows.append({k: row.get(k) or "" for k in COLUMNS})
    self._flush()

  def _flush(self) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, COLUMNS)
    writer.writeheader()
    writer.writerows(self.rows)
    atomic.atomic_write(self.path, buf.getvalue())

  def write(self, **row: Any) -> None:
    """Appends one row (missing columns stay empty)."""
    if not self.enabled:
      return
    self.rows.append({k: _fmt(row.get(k)) for k in COLUMNS})
    self._flush()


def _fmt(v: Any) -> str:
  if v is None:
    return ""
  if isinstance(v, float):
    return f"{v:.6g}"
  return str(v)


class _NoBar:
  def update(self, n: int = 1) -> None:
    pass

  def set_postfix(self, **kw: Any) -> None:
    pass

  def close(self) -> None:
    pass


def progress(total: int, desc: str, *, initial: int = 0, enabled: bool = True):
  """A tqdm bar on stderr for one epoch; a no-op when disabled or stderr is not a tty."""
  if not enabled or not sys.stderr.isatty():
    return _NoBar()
  return tqdm(
    total=total, initial=initial, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True
  )
