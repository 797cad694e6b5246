"""Dynamic Network Surgery as an optax wrapper: the masks live in the optimizer state."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fq_jax._src import masks as masks_lib
from fq_jax._src import rules as rules_lib
from fq_jax._src import sparsity_ramp as ramp_lib
from fq_jax._src.state_layout import _check_inner, _check_unmatched

MaskTree = Any


class PruneState(NamedTuple):
  """State of `dns_pruning`: the masks and the inner optimizer's state."""

  count: jax.Array
  masks: MaskTree
  inner_state: optax.OptState


# ----------------------------------------------------------------------------
# DNS pruning
# ----------------------------------------------------------------------------


# Long on purpose: an optax wrapper is one closure pair (init, update) over its validated
# arguments; most of the length is the docstring and the argument checks.
def dns_pruning(
  inner: optax.GradientTransformation,
  *,
  sparsity: float | None = None,
  sensitivity: float | None = None,
  rules: Sequence[rules_lib.Rule] | rules_lib.Rule = rules_lib.DEFAULT_RULES,
  update_every: int = 1,
  scope: Literal["layer", "global"] = "layer",
  unmatched: Literal["raise", "warn", "ignore"] = "raise",
  sparsity_schedule: Callable[[jax.Array], jax.Array] | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Dynamic Network Surgery: prune and splice while `inner` trains.

  The masks live in the state (`PruneState`). Use `fq.quantized(params,
  state)` in the forward pass: pruned weights read as 0 but keep their float
  values and receive gradients, and every `update_every` updates the masks
  move by DNS hysteresis (`fq.dns_masks`) on the updated weights. Call
  `fq.apply_masks(params, state.masks)` to freeze the result.

  Args:
    inner: the optimizer of the float weights.
    sparsity: target sparsity, met exactly by every mask update (per layer,
      or in total with scope "global"; rule sparsities override), or
    sensitivity: DNS's `a` in t = mean|W| + a * std|W| (exactly one of the
      two; a rule's own `sensitivity` overrides either for its leaves).
    rules: selection rules (one `fq.Rule` or a sequence).
    update_every: updates between mask updates.
    scope: "layer" (each layer at its target) or "global" (one threshold over
      the layers that follow the global `sparsity`); see `fq.dns_masks`.
    unmatched: what `init` does when the rules select nothing ("raise"),
      and whether it warns about a rule that matches no leaf or a matched
      non-float leaf ("raise" and "warn" warn, "ignore" is silent).
    sparsity_schedule: optional gradual ramp (needs `sparsity=`, scope
      "layer"): a pure jittable function of the update count (1 after the
      first update) returning a fraction in [0, 1] that multiplies every
      leaf's target, e.g. `fq_jax._src.sparsity_ramp.cubic(T)` (Zhu and Gupta
      2017). Each mask update prunes round(fraction * round(target * size))
      weights with the same hysteresis band; leaves in sensitivity mode are
      not ramped. None: the full target from the first update.

  Returns:
    An optax `GradientTransformationExtraArgs` (needs `params` in update).

  Raises:
    ValueError: for a bad argument, when the transform is built.
  """
  where = "dns_pruning"
  _check_inner(inner, where)
  if (sparsity is None) == (sensitivity is None):
    raise ValueError("dns_pruning: give exactly one of sparsity= and sensitivity=")
  rules_lib.check_sparsity(sparsity, where)
  if sensitivity is not None and not (
    isinstance(sensitivity, (int, float))
    and not isinstance(sensitivity, bool)
    and math.isfinite(sensitivity)
  ):
    raise ValueError(f"dns_pruning: sensitivity must be a finite number, got {sensitivity!r}")
  if not (isinstance(update_every, int) and update_every >= 1):
    raise ValueError(f"dns_pruning: update_every must be an integer >= 1, got {update_every!r}")
  if scope not in ("layer", "global") or (scope == "global" and sparsity is None):
    raise ValueError(
      f"dns_pruning: scope must be 'layer', or 'global' with sparsity=; got {scope!r}"
    )
  if sparsity_schedule is not None and (sparsity is None or scope != "layer"):
    raise ValueError("dns_pruning: sparsity_schedule needs sparsity= and scope='layer'")
  rules = rules_lib.as_rules(rules, where)
  _check_unmatched(unmatched, where)

  def init(params):
    params = rules_lib.unwrap_variables(params)
    rules_lib.check_selection(params, rules, where=where, unmatched=unmatched)
    specs = rules_lib.resolve(params, rules, sparsity=sparsity or 0.0)
    masks = masks_lib.map_specs(lambda s, w: jnp.ones(w.shape, bool), specs, params)
    return PruneState(jnp.zeros([], jnp.int32), masks, inner.init(params))

  def update(updates, state, params=None, **extra):
    if params is None:
      raise ValueError("dns_pruning needs params in update()")
    updates, params = rules_lib.unwrap_variables((updates, params))
    new_updates, inner_state = inner.update(updates, state.inner_state, params, **extra)
    count = state.count + 1
    new_params = optax.apply_updates(params, new_updates)
    if sparsity_schedule is None:
      new_masks = lambda: masks_lib.dns_masks(
        new_params,
        state.masks,
        sparsity=sparsity,
        sensitivity=sensitivity,
        rules=rules,
        scope=scope,
      )
    else:
      new_masks = lambda: ramp_lib.ramped_dns_masks(
        new_params, state.masks, sparsity, rules, sparsity_schedule(count)
      )
    masks = jax.lax.cond(count % update_every == 0, new_masks, lambda: state.masks)
    return new_updates, PruneState(count, masks, inner_state)

  return optax.GradientTransformationExtraArgs(init, update)
