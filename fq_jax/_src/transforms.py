"""optax integration: focused quantization as an optimizer wrapper (and the re-exports).

The compression state (masks, per-layer `FocusState`s, INQ progress,
re-estimation counters, the learnable alphas) lives inside the optax state as
NamedTuples of arrays, so checkpointing (Orbax), sharding and `jax.jit` need
nothing special: it is just more optimizer state. A training step is

    grads = jax.grad(lambda p: loss(fq.quantized(p, opt_state)))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)

`fq.quantized` finds the compression state anywhere inside `opt_state` (under
`optax.chain`, `inject_hyperparams`, `MultiSteps`, `apply_if_finite`, ...).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax

from fq_jax._src import events as events_lib
from fq_jax._src import quantizers
from fq_jax._src import rules as rules_lib
from fq_jax._src.forward import (  # noqa: F401  (re-exported)
  _derive_masks,
  aligned_layers,
  infer_masks,
  quantized,
  quantized_fraction,
)
from fq_jax._src.fq_state import FQState, find_state, is_fq_state  # noqa: F401
from fq_jax._src.pruning import PruneState, dns_pruning  # noqa: F401  (re-exported)
from fq_jax._src.schedule import PAPER_INQ_FRACTIONS, QuantSchedule, inq_schedule  # noqa: F401
from fq_jax._src.state_layout import (  # noqa: F401
  _check_inner,
  _check_unmatched,
  _is_int,
  _is_none,
  _is_slot,
  _map_present,
  _to_state_layout,
  _under,
)

MaskTree = Any
_DEFAULT_SCHEDULE = QuantSchedule()  # frozen: safe as a shared default

# ----------------------------------------------------------------------------
# Focused quantization
# ----------------------------------------------------------------------------


def _unit_values(w, f: quantizers.FocusState):
  """Q[w] / alpha: the quantized value before the learnable scale."""
  return quantizers.focused_values(quantizers.focused_symbols(w, f), f, alpha=1.0)


@functools.partial(jax.jit, static_argnames=("bits", "w_sep", "recentralize", "num_iters"))
def _focus_group(ws, ms, keys, *, bits, w_sep, recentralize, num_iters):
  """`quantizers.focus` of a stack of layers of one shape and setting (vmapped, jitted once)."""
  focus_one = functools.partial(
    quantizers.focus, bits=bits, w_sep=w_sep, recentralize=recentralize, num_iters=num_iters
  )
  return jax.vmap(focus_one)(ws, ms, keys)


@functools.partial(jax.jit, static_argnames=("order",))
def _select_inq(w, f: quantizers.FocusState, current, fraction, *, order):
  """Adds kept weights to the quantized set until `fraction` of them are in.

  Weights already in stay in (INQ never releases a quantized weight).
  """
  w32 = w.astype(jnp.float32)
  if order == "magnitude":
    score = jnp.abs(w32)
  else:
    score = -jnp.abs(f.alpha * _unit_values(w, f) - w32)
  score = jnp.where(current, jnp.inf, jnp.where(f.mask, score, -jnp.inf))
  flat = jnp.ravel(score)
  target = jnp.ceil(fraction * jnp.sum(f.mask)).astype(jnp.int32)
  order_idx = jnp.argsort(-flat, stable=True)
  rank = jnp.zeros(flat.shape, jnp.int32).at[order_idx].set(jnp.arange(flat.size, dtype=jnp.int32))
  return jnp.reshape(rank < target, w.shape) & f.mask


# Long on purpose: an optax wrapper is one closure pair (init, update) over its validated
# arguments; most of the length is the docstring and the argument checks.
def focused_quantization(
  inner: optax.GradientTransformation,
  *,
  bits: int = 5,
  w_sep: float = 2.0,
  rules: Sequence[rules_lib.Rule] | rules_lib.Rule = rules_lib.DEFAULT_RULES,
  schedule: QuantSchedule = _DEFAULT_SCHEDULE,
  masks: MaskTree | Callable[[Any], MaskTree] | None = None,
  alpha_optimizer: optax.GradientTransformation | None = None,
  seed: int = 0,
  gmm_iters: int = 200,
  unmatched: Literal["raise", "warn", "ignore"] = "raise",
) -> optax.GradientTransformationExtraArgs:
  """Fine-tunes under Focused Quantization: wraps the optimizer `inner`.

  The state (`FQState`) holds the masks, each quantized layer's `FocusState`
  (mixture, kind, means, sigma, bias, assignments, alpha), the INQ progress
  and the re-estimation counters. Each update:

  1. zeroes the gradients of pruned weights and runs `inner` on the rest;
     the updates of pruned weights are zeroed again, so momentum and weight
     decay cannot revive them (they stay exactly 0);
  2. computes each alpha's true gradient, sum(g * Q[w] / alpha) over the
     quantized weights (with the straight-through estimator, the gradient
     reaching the float weights is dL/dQ), and updates the alphas with
     `alpha_optimizer`;
  3. on the re-estimation schedule, refits the mixtures on the updated
     weights and resamples the assignments (alphas are kept);
  4. when an INQ boundary is passed, adds weights to the quantized set.

  Args:
    inner: optimizer of the float weights (any optax transformation; it may
      be `inject_hyperparams`-wrapped).
    bits: default weight bit-width n in [2, 8] (rules may override per
      leaf). n = 2 is the ternary mode: plain shift quantization to
      {0, +-2^-b} (one sign bit, one zero/non-zero bit), never
      recentralized, because recentralization spends one bit on the
      component and needs n >= 3.
    w_sep: default Wasserstein separation threshold (Eq. 4), >= 0.
    rules: selection rules (one `fq.Rule` or a sequence; see `fq.Rule`).
    schedule: INQ and re-estimation schedule (default: everything quantized
      from the first step, never re-estimated). See `fq.inq_schedule`.
    masks: keep-masks (a tree, or a function of the params); by default the
      non-zero entries of prunable leaves (what `fq.apply_masks` leaves).
    alpha_optimizer: optimizer of the per-layer alphas; None freezes them at
      1. Default: `optax.adam(1e-4)`.
    seed: seed for sampling the component assignments.
    gmm_iters: EM iterations per fit.
    unmatched: what `init` does when the rules select no parameter: "raise"
      (default), "warn" or "ignore". Unless "ignore", `init` also warns about
      a rule that matches no leaf and about matched leaves left in float
      because they are not floating point.

  Returns:
    An optax `GradientTransformationExtraArgs` (needs `params` in update).
    Its `init` fits one mixture per quantized layer (EM, `gmm_iters`
    iterations) inside one compiled computation: call it once, not per step.

  Raises:
    ValueError, TypeError: for a bad argument, when the transform is built
      (one line naming the argument); `init` raises for a selection that
      matches nothing, naming the rules and the paths.

  Example:
    >>> import jax, jax.numpy as jnp, optax, fq_jax as fq
    >>> params = {"kernel": jax.random.normal(jax.random.key(0), (16, 16))}
    >>> params = fq.apply_masks(params, fq.magnitude_masks(params, 0.5))
    >>> tx = fq.focused_quantization(optax.sgd(0.1, momentum=0.9), bits=5)
    >>> state = tx.init(params)
    >>> loss = lambda p: jnp.sum(p["kernel"] ** 2)
    >>> grads = jax.grad(lambda p: loss(fq.quantized(p, state)))(params)
    >>> updates, state = tx.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)
    >>> int(jnp.sum(params["kernel"] == 0))  # pruned weights stay exactly 0
    128
  """
  where = "focused_quantization"
  _check_inner(inner, where)
  rules_lib.check_bits(bits, where)
  rules_lib.check_w_sep(w_sep, where)
  rules = rules_lib.as_rules(rules, where)
  if not isinstance(schedule, QuantSchedule):
    raise TypeError(
      f"{where}: schedule must be a QuantSchedule (see fq.inq_schedule), "
      f"got {type(schedule).__name__}"
    )
  if alpha_optimizer is not None:
    _check_inner(alpha_optimizer, where, "alpha_optimizer")
  if not _is_int(seed):
    raise TypeError(f"{where}: seed must be an integer, got {type(seed).__name__}")
  if not (_is_int(gmm_iters) and gmm_iters >= 1):
    raise ValueError(f"{where}: gmm_iters must be an integer >= 1, got {gmm_iters!r}")
  _check_unmatched(unmatched, where)
  if alpha_optimizer is None:
    alpha_optimizer = optax.adam(1e-4)
  return _build_focused(
    inner,
    bits=bits,
    w_sep=w_sep,
    rules=rules,
    schedule=schedule,
    masks=masks,
    alpha_optimizer=alpha_optimizer,
    seed=seed,
    gmm_iters=gmm_iters,
    unmatched=unmatched,
  )


def focused_quantization_with_events(
  inner: optax.GradientTransformation, **kwargs
) -> tuple[optax.GradientTransformationExtraArgs, events_lib.ScheduleEvents]:
  """`fq.focused_quantization` in its event form: a step with no control flow, and its events.

  Takes the arguments of `fq.focused_quantization`. The transform's `update`
  trains the weights and the alphas only; the schedule's events run when
  `events.due(count)` names them: "refit" (re-estimate the mixtures on the
  current weights and resample the assignments) and "inq" (grow the quantized
  set at an INQ boundary), in that order when both fall on one update.
  Running them as they fall due gives exactly the states of the in-step form.

  Returns:
    `(tx, events)` (see `fq.ScheduleEvents`).

  Example:
    >>> import jax, jax.numpy as jnp, optax, fq_jax as fq
    >>> params = {"kernel": jax.random.normal(jax.random.key(0), (16, 16))}
    >>> params = fq.apply_masks(params, fq.magnitude_masks(params, 0.5))
    >>> tx, events = fq.focused_quantization_with_events(
    ...     optax.sgd(0.1), schedule=fq.inq_schedule(2))
    >>> state = tx.init(params)
    >>> for count in (1, 2):
    ...   grads = jax.grad(lambda p: jnp.sum(fq.quantized(p, state)["kernel"] ** 2))(params)
    ...   updates, state = tx.update(grads, state, params)
    ...   params = optax.apply_updates(params, updates)
    ...   if due := events.due(count):
    ...     state = events.run(params, state, due)
    >>> due, fq.quantized_fraction(state)
    (('refit', 'inq'), 0.5)
  """
  focused_quantization(inner, **kwargs)  # validates the arguments exactly as the in-step form does
  args = events_lib.bound_arguments(focused_quantization, inner, **kwargs)
  args["rules"] = rules_lib.as_rules(args["rules"], "focused_quantization")
  if args["alpha_optimizer"] is None:
    args["alpha_optimizer"] = optax.adam(1e-4)
  return _build_focused(in_step=False, **args)


# Long on purpose: one closure family (init, update, the events) over the validated arguments.
def _build_focused(
  inner,
  *,
  bits,
  w_sep,
  rules,
  schedule: QuantSchedule,
  masks,
  alpha_optimizer,
  seed,
  gmm_iters,
  unmatched,
  in_step=True,
):
  """The in-step transform, or (transform, events) when `in_step` is False."""
  where = "focused_quantization"
  fractions = jnp.asarray(schedule.inq_fractions, jnp.float32)
  boundaries = jnp.asarray(schedule.inq_boundaries, jnp.int32)

  def stage_at(count):
    return jnp.sum(boundaries <= count).astype(jnp.int32)

  def focus_all(specs, params, masks, rng, alphas=None):
    leaves, treedef = jax.tree.flatten(specs, is_leaf=_is_none)
    ws = treedef.flatten_up_to(params)
    ms = treedef.flatten_up_to(masks)
    old = [None] * len(leaves) if alphas is None else treedef.flatten_up_to(alphas)
    out = [None] * len(leaves)
    # Layers of one setting and of similar size (one power-of-8 class) are focused
    # together: flattened, zero-padded (as pruned) to the group's largest, and
    # vmapped, so XLA compiles one EM loop and one quantizer per group instead of
    # per layer shape (a ResNet-20: 3 groups for its 7 kernel shapes; compile
    # time dominates init, padding costs little run time). Padding changes nothing:
    # padded entries are not kept, and the assignment noise is indexed by the
    # flattened position, so every real weight draws what it draws unpadded.
    groups = {}
    for i, s in enumerate(leaves):
      if s is not None and s.quantize:
        size_class = (max(ws[i].size, 1) - 1).bit_length() // 3
        key = (size_class, str(ws[i].dtype), s.bits, s.w_sep, s.recentralize)
        groups.setdefault(key, []).append(i)
    for (_, _, group_bits, group_w_sep, group_recentralize), idx in groups.items():
      n = max(ws[i].size for i in idx)
      flat = lambda a, n=n: jnp.pad(jnp.ravel(a), (0, n - a.size))
      stacked = _focus_group(
        jnp.stack([flat(ws[i]) for i in idx]),
        jnp.stack([flat(jnp.asarray(ms[i], bool)) for i in idx]),
        jnp.stack([jax.random.fold_in(rng, i) for i in idx]),
        bits=group_bits,
        w_sep=group_w_sep,
        recentralize=group_recentralize,
        num_iters=gmm_iters,
      )
      for j, i in enumerate(idx):
        f = jax.tree.map(lambda x, j=j: x[j], stacked)
        size, shape = ws[i].size, ws[i].shape
        f = f._replace(
          assignment=f.assignment[:size].reshape(shape), mask=f.mask[:size].reshape(shape)
        )
        out[i] = f if old[i] is None else f._replace(alpha=old[i])
    return treedef.unflatten(out)

  def inq_all(focus, params, current, stage):
    fraction = fractions[stage]
    return _map_present(
      lambda f, w, cur: _select_inq(w, f, cur, fraction, order=schedule.inq_order),
      focus,
      params,
      current,
    )

  def specs_of(params):
    return rules_lib.resolve(params, rules, bits=bits, w_sep=w_sep)

  def init(params):
    # Called eagerly, the expensive pieces (`_focus_group`, `_select_inq`) are
    # module-level jitted functions whose compiled code the refit and INQ events
    # of the event form reuse (same shapes, same settings); under an outer jit
    # they inline.
    params = rules_lib.unwrap_variables(params)
    rules_lib.check_selection(params, rules, where=where, unmatched=unmatched)
    specs = specs_of(params)
    m = _derive_masks(masks, specs, params)
    rng = jax.random.key(seed)
    focus = focus_all(specs, params, m, jax.random.fold_in(rng, 0))
    none_yet = _map_present(lambda f: jnp.zeros(f.mask.shape, bool), focus)
    stage = stage_at(jnp.int32(0))
    inq = inq_all(focus, params, none_yet, stage)
    alphas = _map_present(lambda f: f.alpha, focus)
    refit_every = schedule.refit_every
    return FQState(
      count=jnp.zeros([], jnp.int32),
      rng=jax.random.key_data(jax.random.fold_in(rng, 1)),
      masks=m,
      focus=focus,
      inq=inq,
      stage=stage,
      next_refit=jnp.int32(refit_every if refit_every > 0 else -1),
      refit_interval=jnp.float32(refit_every),
      alpha_state=alpha_optimizer.init(alphas),
      inner_state=inner.init(params),
    )

  def refit(focus, params, masks, count, rng_data, interval):
    """Re-estimates every mixture (alphas kept); returns (focus, next_refit, interval)."""
    alphas = _map_present(lambda f: f.alpha, focus)
    rng = jax.random.wrap_key_data(rng_data)
    focus = focus_all(specs_of(params), params, masks, jax.random.fold_in(rng, count), alphas)
    interval = interval * schedule.refit_growth
    return focus, count + jnp.ceil(interval).astype(jnp.int32), interval

  def update(updates, state: FQState, params=None, alpha_grads=None, **extra):
    if params is None:
      raise ValueError("focused_quantization needs params in update()")
    # Line the trees up with the state by path (NNX Variables, other containers).
    original_updates = updates
    updates, back = _to_state_layout(
      state.masks, rules_lib.unwrap_variables(updates), what="updates", where=where
    )
    params, _ = _to_state_layout(
      state.masks, rules_lib.unwrap_variables(params), what="params", where=where
    )
    zero_pruned = lambda m, g: g if m is None else jnp.where(m, g, jnp.zeros_like(g))
    grads = jax.tree.map(zero_pruned, state.masks, updates, is_leaf=_is_none)

    if alpha_grads is None:
      # The true alpha gradient: Q = alpha * unit, and dL/dQ is what reached w.
      alpha_grads = _map_present(
        lambda f, inq, g, w: jnp.sum(
          jnp.where(inq, g.astype(jnp.float32) * _unit_values(w, f), 0.0)
        ),
        state.focus,
        state.inq,
        grads,
        params,
      )
    alphas = _map_present(lambda f: f.alpha, state.focus)
    alpha_updates, alpha_state = alpha_optimizer.update(alpha_grads, state.alpha_state, alphas)
    alphas = optax.apply_updates(alphas, alpha_updates)
    focus = _map_present(lambda f, a: f._replace(alpha=a), state.focus, alphas)

    new_updates, inner_state = inner.update(grads, state.inner_state, params, **extra)
    new_updates = jax.tree.map(zero_pruned, state.masks, new_updates, is_leaf=_is_none)
    count = state.count + 1
    new_state = state._replace(
      count=count, focus=focus, alpha_state=alpha_state, inner_state=inner_state
    )
    if in_step:
      new_state = _events_in_step(new_state, optax.apply_updates(params, new_updates))
    if jax.tree.structure(new_updates) != jax.tree.structure(original_updates):
      new_updates = back(new_updates)
    return new_updates, new_state

  def _events_in_step(state: FQState, new_params) -> FQState:
    # Branches a schedule can never take are not even traced (compile time).
    count = state.count
    if schedule.refit_every > 0:
      refit_now = (state.next_refit >= 0) & (count >= state.next_refit)
      focus, next_refit, interval = jax.lax.cond(
        refit_now,
        lambda: refit(state.focus, new_params, state.masks, count, state.rng, state.refit_interval),
        lambda: (state.focus, state.next_refit, state.refit_interval),
      )
      state = state._replace(focus=focus, next_refit=next_refit, refit_interval=interval)
    stage = stage_at(count)
    if schedule.inq_boundaries:
      inq = jax.lax.cond(
        stage != state.stage,
        lambda: inq_all(state.focus, new_params, state.inq, stage),
        lambda: state.inq,
      )
      state = state._replace(inq=inq)
    return state._replace(stage=stage)

  tx = optax.GradientTransformationExtraArgs(init, update)
  if in_step:
    return tx

  boundaries_set = frozenset(schedule.inq_boundaries)

  def due(count: int) -> tuple[str, ...]:
    names = []
    if events_lib.is_refit_count(schedule.refit_every, schedule.refit_growth, count):
      names.append("refit")
    if count in boundaries_set:
      names.append("inq")
    return tuple(names)

  def run(params, opt_state, names):
    state = find_state(opt_state)
    if not isinstance(state, FQState):
      raise ValueError(f"{where} events: the state is not a focused_quantization state")
    params, _ = _to_state_layout(
      state.masks, rules_lib.unwrap_variables(params), what="params", where=where
    )
    if "refit" in names:
      focus, next_refit, interval = refit(
        state.focus, params, state.masks, state.count, state.rng, state.refit_interval
      )
      state = state._replace(focus=focus, next_refit=next_refit, refit_interval=interval)
    if "inq" in names:
      stage = stage_at(state.count)
      state = state._replace(stage=stage, inq=inq_all(state.focus, params, state.inq, stage))
    return events_lib.replace_state(opt_state, is_fq_state, state)

  return tx, events_lib.ScheduleEvents(due=due, run=run, names=("refit", "inq"))
