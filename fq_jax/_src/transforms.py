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

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fq_jax._src import masks as masks_lib
from fq_jax._src import quantizers
from fq_jax._src import rules as rules_lib
from fq_jax._src import sparsity_ramp as ramp_lib

MaskTree = Any


def _is_none(x) -> bool:
  """Leaf test for mask and focus trees: a None or a whole `FocusState`."""
  return x is None or isinstance(x, quantizers.FocusState)


def _map_present(fn, first, *rest):
  """Maps fn over leaves where `first` is not None; None stays None."""
  return jax.tree.map(
    lambda a, *xs: None if a is None else fn(a, *xs), first, *rest, is_leaf=_is_none
  )


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
      everything is quantized at once (post-training quantization).
    fractions: quantized fraction per stage.
    order: "magnitude" or "error" (see `QuantSchedule`).
    refit_every: first re-estimation interval; defaults to `steps_per_stage`.
    refit_growth: growth factor of the re-estimation interval.

  Returns:
    A `QuantSchedule`.
  """
  if steps_per_stage <= 0:
    return QuantSchedule(inq_order=order, refit_every=0)
  fractions = tuple(float(f) for f in fractions)
  return QuantSchedule(
    inq_fractions=fractions,
    inq_boundaries=tuple(steps_per_stage * (i + 1) for i in range(len(fractions) - 1)),
    inq_order=order,
    refit_every=steps_per_stage if refit_every is None else refit_every,
    refit_growth=refit_growth,
  )


# ----------------------------------------------------------------------------
# States
# ----------------------------------------------------------------------------


class PruneState(NamedTuple):
  """State of `dns_pruning`: the masks and the inner optimizer's state."""

  count: jax.Array
  masks: MaskTree
  inner_state: optax.OptState


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
  """Finds the single `FQState` or `PruneState` inside any optax state."""
  if isinstance(opt_state, (FQState, PruneState)):
    return opt_state
  found = [
    x
    for x in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, (FQState, PruneState)))
    if isinstance(x, (FQState, PruneState))
  ]
  if len(found) != 1:
    raise ValueError(
      f"expected exactly one fq state inside the optimizer state, found {len(found)}"
    )
  return found[0]


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
    params: the float parameters the optimizer updates.
    state: an `FQState`, a `PruneState`, or any optax state containing one.

  Returns:
    A tree like `params` to feed to the model.

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
  if isinstance(state, PruneState):
    return jax.tree.map(
      lambda m, w: w if m is None else _masked_straight_through(w, m),
      state.masks,
      params,
      is_leaf=_is_none,
    )

  def one(m, f, inq, w):
    if m is None:
      return w
    kept = jnp.where(m, w, jnp.zeros_like(w))
    if f is None:
      return kept
    return jnp.where(inq, quantizers.focused_quantize(w, f), kept)

  return jax.tree.map(one, state.masks, state.focus, state.inq, params, is_leaf=_is_none)


# ----------------------------------------------------------------------------
# DNS pruning
# ----------------------------------------------------------------------------


def dns_pruning(
  inner: optax.GradientTransformation,
  *,
  sparsity: float | None = None,
  sensitivity: float | None = None,
  rules: Sequence[rules_lib.Rule] = rules_lib.DEFAULT_RULES,
  update_every: int = 1,
  scope: Literal["layer", "global"] = "layer",
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
    rules: selection rules.
    update_every: updates between mask updates.
    scope: "layer" (each layer at its target) or "global" (one threshold over
      the layers that follow the global `sparsity`); see `fq.dns_masks`.
    sparsity_schedule: optional gradual ramp (needs `sparsity=`, scope
      "layer"): a pure jittable function of the update count (1 after the
      first update) returning a fraction in [0, 1] that multiplies every
      leaf's target, e.g. `fq_jax._src.sparsity_ramp.cubic(T)` (Zhu and Gupta
      2017). Each mask update prunes round(fraction * round(target * size))
      weights with the same hysteresis band; leaves in sensitivity mode are
      not ramped. None: the full target from the first update.

  Returns:
    An optax `GradientTransformationExtraArgs` (needs `params` in update).
  """
  if (sparsity is None) == (sensitivity is None):
    raise ValueError("dns_pruning: give exactly one of sparsity= and sensitivity=")
  if update_every < 1:
    raise ValueError(f"update_every must be >= 1, got {update_every}")
  if scope not in ("layer", "global") or (scope == "global" and sparsity is None):
    raise ValueError(
      f"dns_pruning: scope must be 'layer', or 'global' with sparsity=; got {scope!r}"
    )
  if sparsity_schedule is not None and (sparsity is None or scope != "layer"):
    raise ValueError("dns_pruning: sparsity_schedule needs sparsity= and scope='layer'")

  def init(params):
    specs = rules_lib.resolve(params, rules, sparsity=sparsity or 0.0)
    masks = masks_lib.map_specs(lambda s, w: jnp.ones(w.shape, bool), specs, params)
    return PruneState(jnp.zeros([], jnp.int32), masks, inner.init(params))

  def update(updates, state, params=None, **extra):
    if params is None:
      raise ValueError("dns_pruning needs params in update()")
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


def focused_quantization(
  inner: optax.GradientTransformation,
  *,
  bits: int = 5,
  w_sep: float = 2.0,
  rules: Sequence[rules_lib.Rule] = rules_lib.DEFAULT_RULES,
  schedule: QuantSchedule = QuantSchedule(),
  masks: MaskTree | Callable[[Any], MaskTree] | None = None,
  alpha_optimizer: optax.GradientTransformation | None = None,
  seed: int = 0,
  gmm_iters: int = 200,
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
    bits: default weight bit-width n (rules may override per leaf).
    w_sep: default Wasserstein separation threshold (Eq. 4).
    rules: selection rules (see `fq.Rule`).
    schedule: INQ and re-estimation schedule (default: everything quantized
      from the first step, never re-estimated). See `fq.inq_schedule`.
    masks: keep-masks (a tree, or a function of the params); by default the
      non-zero entries of prunable leaves (what `fq.apply_masks` leaves).
    alpha_optimizer: optimizer of the per-layer alphas; None freezes them at
      1. Default: `optax.adam(1e-4)`.
    seed: seed for sampling the component assignments.
    gmm_iters: EM iterations per fit.

  Returns:
    An optax `GradientTransformationExtraArgs` (needs `params` in update).

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
  return _derive_masks(None, rules_lib.resolve(params, rules), params)
