"""optax integration: DNS pruning and focused quantization as optimizer wrappers.

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
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fq_jax._src import masks as masks_lib
from fq_jax._src import quantizers
from fq_jax._src import rules as rules_lib
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
# States
# ----------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------
# The forward-pass parameter tree
# ----------------------------------------------------------------------------


def _masked_straight_through(w, mask):
  """DNS forward: pruned entries read as 0, gradients reach every entry."""
  return w + jax.lax.stop_gradient(jnp.where(mask, w, jnp.zeros_like(w)) - w)


def quantized(params, state) -> Any:
  """The forward-pass parameter tree for a training or evaluation step.

  Under `focused_quantization`: weights in the current INQ fraction are
  focused-quantized (straight-through gradients), the other kept weights are
  used as they are, pruned weights are 0 with zero gradient; dense leaves pass
  through. Under `dns_pruning`: pruned weights read as 0 but, as DNS requires,
  gradients reach all weights so pruned ones can be spliced back.

  Args:
    params: the float parameters the optimizer updates: a Flax dict, an
      `nnx.State` (of `nnx.Param`s or of arrays) or a pure dict of it.
      Leaves are matched to the state by path, so the container may differ
      from the one `init` saw; leaves `optax.masked` kept out of the state
      pass through.
    state: an `FQState`, a `PruneState`, any optax state containing one, or
      an `nnx.Optimizer`.

  Returns:
    A tree like `params` (same containers, NNX Variables included) to feed
    to the model.

  Raises:
    ValueError: when `params` does not match the state, naming the path.

  Example:
    >>> import jax, jax.numpy as jnp, optax, fq_jax as fq
    >>> params = {"kernel": jax.random.normal(jax.random.key(0), (8, 8))}
    >>> params = fq.apply_masks(params, fq.magnitude_masks(params, 0.5))
    >>> tx = fq.focused_quantization(optax.sgd(0.1), bits=5)
    >>> state = tx.init(params)
    >>> q = fq.quantized(params, state)
    >>> int(jnp.sum(q["kernel"] != 0))
    32
  """
  state = find_state(state)
  laid_out, back = _to_state_layout(state.masks, params, what="params", where="fq.quantized")
  if isinstance(state, PruneState):
    return back(
      jax.tree.map(
        lambda m, w: w if m is None else _masked_straight_through(w, m),
        state.masks,
        laid_out,
        is_leaf=_is_none,
      )
    )

  def one(m, f, inq, w):
    if m is None:
      return w
    kept = jnp.where(m, w, jnp.zeros_like(w))
    if f is None:
      return kept
    return jnp.where(inq, quantizers.focused_quantize(w, f), kept)

  return back(jax.tree.map(one, state.masks, state.focus, state.inq, laid_out, is_leaf=_is_none))


# ----------------------------------------------------------------------------
# Focused quantization
# ----------------------------------------------------------------------------


def _unit_values(w, f: quantizers.FocusState):
  """Q[w] / alpha: the quantized value before the learnable scale."""
  return quantizers.focused_values(quantizers.focused_symbols(w, f), f, alpha=1.0)


def _select_inq(w, f: quantizers.FocusState, current, fraction, order):
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


def _derive_masks(masks, specs, params):
  if masks is None:
    # Pruned weights are exact zeros after `apply_masks`: recover the masks.
    return masks_lib.map_specs(
      lambda s, w: (w != 0) if s.prune else jnp.ones(w.shape, bool), specs, params
    )
  if callable(masks):
    masks = masks(params)
  return masks_lib.map_specs(lambda s, m: jnp.asarray(m, bool), specs, masks)


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
    # Layers of one shape and setting are focused together under vmap: XLA
    # compiles one EM loop and one quantizer per group instead of per layer
    # (a ResNet-20 has 7 groups for 20 kernels; a ResNet-50, 23 for 54).
    groups = {}
    for i, s in enumerate(leaves):
      if s is not None and s.quantize:
        key = (tuple(ws[i].shape), str(ws[i].dtype), s.bits, s.w_sep, s.recentralize)
        groups.setdefault(key, []).append(i)
    for (_, _, group_bits, group_w_sep, group_recentralize), idx in groups.items():
      focus_one = functools.partial(
        quantizers.focus,
        bits=group_bits,
        w_sep=group_w_sep,
        recentralize=group_recentralize,
        num_iters=gmm_iters,
      )
      stacked = jax.vmap(focus_one)(
        jnp.stack([ws[i] for i in idx]),
        jnp.stack([ms[i] for i in idx]),
        jnp.stack([jax.random.fold_in(rng, i) for i in idx]),
      )
      for j, i in enumerate(idx):
        f = jax.tree.map(lambda x: x[j], stacked)
        out[i] = f if old[i] is None else f._replace(alpha=old[i])
    return treedef.unflatten(out)

  def inq_all(focus, params, current, stage):
    fraction = fractions[stage]
    return _map_present(
      lambda f, w, cur: _select_inq(w, f, cur, fraction, schedule.inq_order), focus, params, current
    )

  def specs_of(params):
    return rules_lib.resolve(params, rules, bits=bits, w_sep=w_sep)

  def init(params):
    # One compiled computation instead of op-by-op dispatch when called eagerly
    # (the usual optax convention); under an outer jit this inlines.
    return jax.jit(_init)(params)

  def _init(params):
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

  def update(updates, state: FQState, params=None, **extra):
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
    specs = specs_of(params)
    zero_pruned = lambda m, g: g if m is None else jnp.where(m, g, jnp.zeros_like(g))
    grads = jax.tree.map(zero_pruned, state.masks, updates, is_leaf=_is_none)

    # The true alpha gradient: Q = alpha * unit, and dL/dQ is what reached w.
    alpha_grads = _map_present(
      lambda f, inq, g, w: jnp.sum(jnp.where(inq, g.astype(jnp.float32) * _unit_values(w, f), 0.0)),
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
    new_params = optax.apply_updates(params, new_updates)
    count = state.count + 1

    # Branches a schedule can never take are not even traced (compile time).
    interval, next_refit = state.refit_interval, state.next_refit
    if schedule.refit_every > 0:
      rng = jax.random.wrap_key_data(state.rng)
      refit_now = (state.next_refit >= 0) & (count >= state.next_refit)
      focus = jax.lax.cond(
        refit_now,
        lambda: focus_all(specs, new_params, state.masks, jax.random.fold_in(rng, count), alphas),
        lambda: focus,
      )
      interval = jnp.where(
        refit_now, state.refit_interval * schedule.refit_growth, state.refit_interval
      )
      next_refit = jnp.where(
        refit_now, count + jnp.ceil(interval).astype(jnp.int32), state.next_refit
      )

    stage = stage_at(count)
    inq = state.inq
    if schedule.inq_boundaries:
      inq = jax.lax.cond(
        stage != state.stage,
        lambda: inq_all(focus, new_params, state.inq, stage),
        lambda: state.inq,
      )
    if jax.tree.structure(new_updates) != jax.tree.structure(original_updates):
      new_updates = back(new_updates)
    return new_updates, FQState(
      count=count,
      rng=state.rng,
      masks=state.masks,
      focus=focus,
      inq=inq,
      stage=stage,
      next_refit=next_refit,
      refit_interval=interval,
      alpha_state=alpha_state,
      inner_state=inner_state,
    )

  return optax.GradientTransformationExtraArgs(init, update)


def quantized_fraction(state) -> float:
  """Fraction of kept quantized-layer weights currently quantized (host float)."""
  state = find_state(state)
  if not isinstance(state, FQState):
    return 0.0
  pairs = [
    (jnp.sum(q), jnp.sum(f.mask))
    for q, f in zip(
      jax.tree.leaves(state.inq),
      jax.tree.leaves(state.focus, is_leaf=lambda x: isinstance(x, quantizers.FocusState)),
    )
  ]
  kept = sum(int(k) for _, k in pairs)
  return 1.0 if kept == 0 else sum(int(q) for q, _ in pairs) / kept


def infer_masks(params, *, rules: Sequence[rules_lib.Rule] = rules_lib.DEFAULT_RULES):
  """Masks recovered from the exact zeros of prunable leaves (None for dense)."""
  params = rules_lib.unwrap_variables(params)
  return _derive_masks(None, rules_lib.resolve(params, rules), params)


def aligned_layers(params, state) -> list[tuple[str, Any, Any, Any]]:
  """(path, mask, focus, weight) per leaf the fq state compresses, in tree order.

  Args:
    params: the float parameters (any container, matched by path).
    state: an optax state holding an `FQState` or `PruneState`.

  Returns:
    One tuple per compressed leaf; focus is None for a prune-only leaf
    (and always under `dns_pruning`).

  Raises:
    ValueError: when `params` does not match the state, naming the path.
  """
  state = find_state(state)
  laid_out, _ = _to_state_layout(state.masks, params, what="params", where="fq.layer_report")
  laid_out = rules_lib.unwrap_variables(laid_out)
  flat, treedef = jax.tree_util.tree_flatten_with_path(state.masks, is_leaf=_is_slot)
  focus = treedef.flatten_up_to(state.focus) if isinstance(state, FQState) else [None] * len(flat)
  ws = treedef.flatten_up_to(laid_out)
  return [
    (rules_lib.path_str(p), m, f, w)
    for (p, m), f, w in zip(flat, focus, ws)
    if m is not None and not isinstance(m, optax.MaskedNode)
  ]
