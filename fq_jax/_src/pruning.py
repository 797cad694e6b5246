"""Dynamic Network Surgery as an optax wrapper: the masks live in the optimizer state."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fq_jax._src import events as events_lib
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
  return _build_dns(
    inner,
    sparsity=sparsity,
    sensitivity=sensitivity,
    rules=rules,
    update_every=update_every,
    scope=scope,
    unmatched=unmatched,
    sparsity_schedule=sparsity_schedule,
  )


def dns_pruning_with_events(
  inner: optax.GradientTransformation, **kwargs
) -> tuple[optax.GradientTransformationExtraArgs, events_lib.ScheduleEvents]:
  """`fq.dns_pruning` in its event form: a step with no control flow, and its events.

  Takes the arguments of `fq.dns_pruning`. With `update_every=1` the mask
  update runs in every step (no conditional needed) and there are no events;
  otherwise `update` never touches the masks and the event "masks" (due after
  every `update_every`-th update) refreshes them. Running the events as they
  fall due gives exactly the states of the in-step form (see `fq.ScheduleEvents`).

  Returns:
    `(tx, events)`.

  Example:
    >>> import jax, jax.numpy as jnp, optax, fq_jax as fq
    >>> params = {"kernel": jax.random.normal(jax.random.key(0), (8, 8))}
    >>> tx, events = fq.dns_pruning_with_events(optax.sgd(0.1), sparsity=0.5, update_every=2)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
    >>> params = optax.apply_updates(params, updates)
    >>> events.due(1), events.due(2)
    ((), ('masks',))
    >>> state = events.run(params, state, ("masks",))
    >>> int(jnp.sum(state.masks["kernel"]))
    32
  """
  dns_pruning(inner, **kwargs)  # validates the arguments exactly as the in-step form does
  args = events_lib.bound_arguments(dns_pruning, inner, **kwargs)
  args["rules"] = rules_lib.as_rules(args["rules"], "dns_pruning")
  return _build_dns(in_step=False, **args)


def _build_dns(
  inner,
  *,
  sparsity,
  sensitivity,
  rules,
  update_every,
  scope,
  unmatched,
  sparsity_schedule,
  in_step=True,
):
  """The in-step transform, or (transform, events) when `in_step` is False."""
  where = "dns_pruning"

  def new_masks(params, masks, count):
    if sparsity_schedule is None:
      return masks_lib.dns_masks(
        params, masks, sparsity=sparsity, sensitivity=sensitivity, rules=rules, scope=scope
      )
    return ramp_lib.ramped_dns_masks(params, masks, sparsity, rules, sparsity_schedule(count))

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
    masks = state.masks
    if update_every == 1:  # every update: no condition to test
      masks = new_masks(new_params, state.masks, count)
    elif in_step:
      masks = jax.lax.cond(
        count % update_every == 0,
        lambda: new_masks(new_params, state.masks, count),
        lambda: state.masks,
      )
    return new_updates, PruneState(count, masks, inner_state)

  tx = optax.GradientTransformationExtraArgs(init, update)
  if in_step:
    return tx
  if update_every == 1:
    return tx, events_lib.no_events()

  def due(count: int) -> tuple[str, ...]:
    return ("masks",) if count > 0 and count % update_every == 0 else ()

  # Jitted once per transform: called eagerly, `run` costs one compiled call.
  new_masks_jit = jax.jit(new_masks)

  def run(params, opt_state, names):
    state = find_prune_state(opt_state)
    if "masks" not in names:
      return opt_state
    params = rules_lib.unwrap_variables(params)
    masks = new_masks_jit(params, state.masks, state.count)
    return events_lib.replace_state(opt_state, _is_prune_state, state._replace(masks=masks))

  return tx, events_lib.ScheduleEvents(due=due, run=run, names=("masks",))


def _is_prune_state(x) -> bool:
  return isinstance(x, PruneState)


def find_prune_state(opt_state) -> PruneState:
  """The single `PruneState` inside an optax state (ValueError when not exactly one)."""
  if _is_prune_state(opt_state):
    return rules_lib.unwrap_variables(opt_state)
  found = [x for x in jax.tree.leaves(opt_state, is_leaf=_is_prune_state) if _is_prune_state(x)]
  if len(found) != 1:
    raise ValueError(f"expected exactly one dns_pruning state, found {len(found)}")
  return rules_lib.unwrap_variables(found[0])
