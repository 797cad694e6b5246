"""The INQ schedule shared by every quantizing optax wrapper (`QuantSchedule`, `inq_schedule`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

from fq_jax._src.state_layout import _is_int

# ----------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantSchedule:
  """When weights enter quantization (INQ) and when the mixtures are refitted.

  Attributes:
    inq_fractions: fraction of each layer's kept weights quantized in each
      stage; the last must be 1.0. The paper: (0.25, 0.5, 0.75, 0.875, 1.0).
    inq_boundaries: update counts at which stage i + 1 begins
      (len(inq_fractions) - 1 increasing integers).
    inq_order: which weights enter first: "magnitude" (INQ: largest first)
      or "error" (the authors' framework: smallest quantization error first).
    refit_every: updates before the first re-estimation of the mixtures and
      resampling of the assignments; 0 never re-estimates.
    refit_growth: each interval between re-estimations is this factor times
      the previous one (the paper: "k grows exponentially"; start and factor
      are OPEN there).
  """

  inq_fractions: tuple[float, ...] = (1.0,)
  inq_boundaries: tuple[int, ...] = ()
  inq_order: Literal["magnitude", "error"] = "magnitude"
  refit_every: int = 0
  refit_growth: float = 2.0

  def __post_init__(self):
    f, b = self.inq_fractions, self.inq_boundaries
    if not f or f[-1] != 1.0 or any(not 0 < x <= 1 for x in f) or list(f) != sorted(f):
      raise ValueError(f"inq_fractions must increase within (0, 1] and end at 1.0, got {f}")
    if len(b) != len(f) - 1 or list(b) != sorted(b) or any(x < 0 for x in b):
      raise ValueError(f"inq_boundaries must be {len(f) - 1} increasing step counts, got {b}")
    if self.inq_order not in ("magnitude", "error"):
      raise ValueError(f"inq_order must be 'magnitude' or 'error', got {self.inq_order!r}")
    if self.refit_every < 0 or self.refit_growth < 1:
      raise ValueError("refit_every must be >= 0 and refit_growth >= 1")


PAPER_INQ_FRACTIONS = (0.25, 0.5, 0.75, 0.875, 1.0)


def inq_schedule(
  steps_per_stage: int,
  *,
  fractions: Sequence[float] = PAPER_INQ_FRACTIONS,
  order: Literal["magnitude", "error"] = "magnitude",
  refit_every: int | None = None,
  refit_growth: float = 2.0,
) -> QuantSchedule:
  """The paper's INQ schedule: each stage but the last lasts `steps_per_stage`.

  Args:
    steps_per_stage: updates per INQ stage (the paper: 3 epochs); 0 means
      everything is quantized at once (post-training quantization). It
      counts calls of this transformation's `update`: under
      `optax.MultiSteps(tx, k)` those are the applied updates, one per k
      micro-steps, so pass epochs * steps_per_epoch // k.
    fractions: quantized fraction per stage.
    order: "magnitude" or "error" (see `QuantSchedule`).
    refit_every: first re-estimation interval; defaults to `steps_per_stage`.
    refit_growth: growth factor of the re-estimation interval.

  Returns:
    A `QuantSchedule`.

  Raises:
    ValueError: for a bad argument, naming it.
  """
  if not (_is_int(steps_per_stage) and steps_per_stage >= 0):
    raise ValueError(
      f"inq_schedule: steps_per_stage must be an integer >= 0, got {steps_per_stage!r}"
    )
  if refit_every is not None and not (_is_int(refit_every) and refit_every >= 0):
    raise ValueError(f"inq_schedule: refit_every must be an integer >= 0, got {refit_every!r}")
  if steps_per_stage == 0:
    return QuantSchedule(inq_order=order, refit_every=0)
  fractions = tuple(float(f) for f in fractions)
  return QuantSchedule(
    inq_fractions=fractions,
    inq_boundaries=tuple(steps_per_stage * (i + 1) for i in range(len(fractions) - 1)),
    inq_order=order,
    refit_every=steps_per_stage if refit_every is None else refit_every,
    refit_growth=refit_growth,
  )
