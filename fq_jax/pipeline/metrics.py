"""Run-time output: the metrics CSV, TensorBoard events and per-epoch progress bars (edges only).

TensorBoard: the event files go next to metrics.csv (`tensorboard --logdir
WORKDIR`), written with tensorboardX on the first process only. Every
metrics.csv row becomes scalars tagged `<stage>/<split>/<column>` at the row's
`global_step`; the step-level log lines add `<stage>/train_step/<name>`. A
resumed run starts a new event file with `purge_step` at its position, so
TensorBoard hides what the interrupted run logged past its checkpoint.
"""

from __future__ import annotations

import csv
import io
import sys
from typing import Any

from tqdm import tqdm

from fq_jax.pipeline import files
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
  "global_step",
)

# Columns that are not measurements (no TensorBoard scalar).
_KEY_COLUMNS = ("stage", "epoch", "step", "split", "global_step")


def _position(stage: str, step: int) -> tuple[int, int]:
  return (STAGES.index(stage) if stage in STAGES else len(STAGES), step)


class MetricsWriter:
  """Writes DIR/metrics.csv (and TensorBoard events); a resumed run first drops rows past its position.

  Rows written after the checkpoint a run resumes from would otherwise appear
  twice (once from the killed run, once when they are recomputed). Every
  write replaces the whole file (atomically when local, `files.write`): the
  file is small (a row per epoch and stage) and never left half-written.

  Args:
    path: the CSV file (local or remote).
    resume_stage, resume_step: the position the run resumes from.
    enabled: False on every process but the first (writes nothing).
    tensorboard_dir: folder of the event files (None: no TensorBoard).
    purge_step: the global step a resumed run restarts from (None: a fresh run).
  """

  def __init__(
    self,
    path: str,
    *,
    resume_stage: str = "dense",
    resume_step: int = 0,
    enabled: bool = True,
    tensorboard_dir: str | None = None,
    purge_step: int | None = None,
  ):
    self.path = path
    self.enabled = enabled
    self.rows: list[dict[str, str]] = []
    self.tensorboard = None
    if not enabled:
      return
    if tensorboard_dir is not None:
      from tensorboardX import SummaryWriter  # imported on the writing process only

      self.tensorboard = SummaryWriter(tensorboard_dir, purge_step=purge_step, flush_secs=30)
    if files.exists(path):
      with io.StringIO(files.read_text(path), newline="") as f:
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
    files.write(self.path, buf.getvalue())

  def write(self, **row: Any) -> None:
    """Appends one row (missing columns stay empty); its values also go to TensorBoard."""
    if not self.enabled:
      return
    self.rows.append({k: _fmt(row.get(k)) for k in COLUMNS})
    self._flush()
    if row.get("global_step") is not None:
      values = {k: row.get(k) for k in COLUMNS if k not in _KEY_COLUMNS}
      self.scalars(row["global_step"], f"{row['stage']}/{row['split']}", values)
      if self.tensorboard is not None:
        self.tensorboard.flush()

  def scalars(self, global_step: int, prefix: str, values: dict[str, Any]) -> None:
    """TensorBoard scalars `prefix/name` at `global_step` (None values skipped)."""
    if self.tensorboard is None:
      return
    for name, value in values.items():
      if value is not None:
        self.tensorboard.add_scalar(f"{prefix}/{name}", float(value), int(global_step))

  def close(self) -> None:
    """Flushes and closes the TensorBoard writer."""
    if self.tensorboard is not None:
      self.tensorboard.close()
      self.tensorboard = None


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


def is_live(bar) -> bool:
  """Whether `bar` (from `progress`) draws on a terminal."""
  return not isinstance(bar, _NoBar)


def progress(total: int, desc: str, *, initial: int = 0, enabled: bool = True):
  """A tqdm bar on stderr for one epoch; a no-op when disabled or stderr is not a tty."""
  if not enabled or not sys.stderr.isatty():
    return _NoBar()
  return tqdm(
    total=total, initial=initial, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True
  )


def format_seconds(seconds: float) -> str:
  """h:mm:ss."""
  seconds = int(round(max(seconds, 0.0)))
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
