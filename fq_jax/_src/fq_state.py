"""`FQState`, the state of `fq.focused_quantization`, and `find_state` (any optax state)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import optax

from fq_jax._src import rules as rules_lib
from fq_jax._src.pruning import PruneState

MaskTree = Any


class FQState(NamedTuple):
  """State of `focused_quantization` (arrays only; checkpoint it as is).

  Attributes:
    count: number of updates so far (int32).
    rng: raw key data (uint32) for resampling assignments.
    masks: keep-masks of compressed leaves (None for dense leaves).
    focus: `FocusState` of quantized leaves (None elsewhere); their `alpha`
      is the learned scale.
    inq: bool per quantized leaf, the kept weights quantized in this stage.
    stage: INQ stage in force (int32).
    next_refit: update count of the next re-estimation (int32).
    refit_interval: current re-estimation interval (float32).
    alpha_state: the alpha optimizer's state.
    inner_state: the inner optimizer's state.
  """

  count: jax.Array
  rng: jax.Array
  masks: MaskTree
  focus: Any
  inq: Any
  stage: jax.Array
  next_refit: jax.Array
  refit_interval: jax.Array
  alpha_state: optax.OptState
  inner_state: optax.OptState


def find_state(opt_state) -> FQState | PruneState:
  """Finds the single `FQState` or `PruneState` inside any optax state.

  Args:
    opt_state: an optax state (under `optax.chain`, `inject_hyperparams`,
      `MultiSteps`, `apply_if_finite`, `optax.masked`, `multi_transform`,
      ...), an `nnx.Optimizer` or its `opt_state`.

  Returns:
    The state, with any Flax NNX Variable wrappers (an `nnx.Optimizer`
    wraps each array in an `OptArray`) replaced by their arrays.

  Raises:
    ValueError: when there is none, or more than one.
  """
  inner = getattr(opt_state, "opt_state", None)
  if inner is not None and not isinstance(opt_state, (FQState, PruneState, tuple, dict)):
    opt_state = inner  # an nnx.Optimizer
  is_fq = lambda x: isinstance(x, (FQState, PruneState))
  if is_fq(opt_state):
    return rules_lib.unwrap_variables(opt_state)
  found = [x for x in jax.tree.leaves(opt_state, is_leaf=is_fq) if is_fq(x)]
  if len(found) != 1:
    raise ValueError(
      "expected exactly one fq state (from fq.focused_quantization or fq.dns_pruning) "
      f"inside the optimizer state, found {len(found)}"
    )
  return rules_lib.unwrap_variables(found[0])


def is_fq_state(x) -> bool:
  return isinstance(x, FQState)
