"""The codebook baselines as an optax wrapper, under the same INQ schedule as FQ.

`codebook_quantization` trains k-means or uniform codebooks (fq_jax/_src/codebook.py) the way
`focused_quantization` trains focused quantizers: the state lives in the optimizer state, the
quantized set grows stage by stage, and the codebooks are rebuilt on FQ's refit steps.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fq_jax._src import rules as rules_lib
from fq_jax._src import transforms, tree_util
from fq_jax._src.codebook import (
  _EVERYTHING_AT_ONCE,
  CodebookState,
  _check_bits,
  _kmeans,
  _uniform,
  codebook_quantize,
  codebook_symbols,
  codebook_values,
)

# ----------------------------------------------------------------------------
# Fine-tuning: an optax wrapper
# ----------------------------------------------------------------------------


def _is_leaf(x) -> bool:
  return x is None or isinstance(x, CodebookState)


class CodebookQState(NamedTuple):
  """State of `codebook_quantization` (arrays only).

  Attributes:
    count: updates so far.
    masks: keep-masks of compressed leaves (None for dense leaves).
    codebooks: `CodebookState` of quantized leaves (None elsewhere); their
      codebook and symbols are the ones in force.
    base: for `learn="scale"`, each layer's codebook as last built (None
      elsewhere or otherwise); the codebook in force is alpha * base.
    learned: what the codebook optimizer trains: the codebooks
      (`learn="centroids"`), the alphas (`learn="scale"`) or nothing.
    learned_state: the codebook optimizer's state.
    reassign: bool scalar, whether symbols follow the weights.
    inq: bool per quantized leaf, the kept weights quantized in this INQ
      stage (the others are used as float weights); never shrinks.
    stage: INQ stage in force (int32).
    next_refit: update count of the next codebook rebuild (int32, -1: never).
    refit_interval: current rebuild interval (float32).
    inner_state: the inner optimizer's state.
  """

  count: jax.Array
  masks: Any
  codebooks: Any
  base: Any
  learned: Any
  learned_state: optax.OptState
  reassign: jax.Array
  inq: Any
  stage: jax.Array
  next_refit: jax.Array
  refit_interval: jax.Array
  inner_state: optax.OptState


def find_codebook_state(opt_state) -> CodebookQState:
  """The single `CodebookQState` inside any optax state."""
  if isinstance(opt_state, CodebookQState):
    return opt_state
  found = [
    x
    for x in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, CodebookQState))
    if isinstance(x, CodebookQState)
  ]
  if len(found) != 1:
    raise ValueError(
      f"expected exactly one CodebookQState in the optimizer state, found {len(found)}"
    )
  return found[0]


def codebook_quantized(params, state) -> Any:
  """The forward-pass parameter tree under `codebook_quantization`.

  Kept weights in the current INQ set go through `codebook_quantize`
  (straight-through), the other kept weights are used as they are, pruned
  entries read as 0, dense leaves pass through (as `fq.quantized` does for
  `fq.focused_quantization`).
  """
  state = find_codebook_state(state)

  def one(m, cs, inq, w):
    if m is None:
      return w
    kept = jnp.where(m, w, jnp.zeros_like(w))
    if cs is None:
      return kept
    return jnp.where(inq, codebook_quantize(w, cs, reassign=state.reassign), kept)

  return jax.tree.map(one, state.masks, state.codebooks, state.inq, params, is_leaf=_is_leaf)


def codebook_quantized_fraction(state) -> float:
  """Fraction of the kept weights of quantized leaves now in the INQ set (host float)."""
  state = find_codebook_state(state)
  cbs = jax.tree.leaves(state.codebooks, is_leaf=lambda x: isinstance(x, CodebookState))
  kept = sum(int(jnp.sum(c.mask)) for c in cbs)
  done = sum(int(jnp.sum(q)) for q in jax.tree.leaves(state.inq))
  return 1.0 if kept == 0 else done / kept


def _map_present(fn, first, *rest):
  return tree_util.map_present(fn, first, *rest, is_leaf=_is_leaf)


def _grow_inq(score: jax.Array, mask: jax.Array, current: jax.Array, fraction) -> jax.Array:
  """Adds kept weights, highest `score` first, until ceil(fraction * kept) are in.

  Weights already in stay in (INQ never releases a quantized weight); ties go
  to the lower flat index (stable sort), as `fq.focused_quantization` does.
  """
  s = jnp.where(current, jnp.inf, jnp.where(mask, score.astype(jnp.float32), -jnp.inf))
  flat = jnp.ravel(s)
  target = jnp.ceil(fraction * jnp.sum(mask)).astype(jnp.int32)
  order = jnp.argsort(-flat, stable=True)
  rank = jnp.zeros(flat.shape, jnp.int32).at[order].set(jnp.arange(flat.size, dtype=jnp.int32))
  return (jnp.reshape(rank < target, mask.shape) & mask) | (current & mask)


# Long on purpose, like fq.focused_quantization: an optax wrapper is one closure family
# (init, update and their helpers) over its validated arguments; a third of the length
# is the docstring. Splitting the closures apart would pass a dozen settings around.
def codebook_quantization(
  inner: optax.GradientTransformation,
  *,
  bits: int = 5,
  method: Literal["kmeans", "uniform"] = "kmeans",
  rules: Sequence[rules_lib.Rule] = rules_lib.DEFAULT_RULES,
  schedule: transforms.QuantSchedule = _EVERYTHING_AT_ONCE,
  masks: Any | Callable[[Any], Any] | None = None,
  kmeans_iters: int = 100,
  clip: Literal["max", "mse"] = "max",
  learn: Literal["centroids", "scale", "none"] | None = None,
  codebook_optimizer: optax.GradientTransformation | None = None,
  reassign: bool = True,
) -> optax.GradientTransformationExtraArgs:
  """Fine-tunes under codebook quantization (k-means or uniform): wraps `inner`.

  The codebooks are built at `init` from the (already pruned) parameters:
  `kmeans_codebook` or `uniform_codebook` per quantized leaf (rules decide
  which leaves and their bits, as for `fq.focused_quantization`; `w_sep` and
  `recentralize` are ignored). A training step is

      grads = jax.grad(lambda p: loss(fq.codebook_quantized(p, opt_state)))(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)

  `schedule` is the same `fq.QuantSchedule` that `fq.focused_quantization`
  takes, with the same meaning, so the baselines can be trained exactly as FQ
  is: the INQ set of each layer (the kept weights quantized in the forward
  pass) starts at the first fraction and grows at each boundary, largest
  magnitude first (`inq_order="magnitude"`) or smallest quantization error
  first ("error"), and is never released; the other kept weights are used as
  float weights. On the rebuild schedule (`refit_every`, then intervals
  growing by `refit_growth`: where FQ refits its mixtures) every codebook is
  rebuilt from the current kept weights: k-means re-clusters (and its
  centroid optimizer state restarts), uniform re-chooses its clipping range
  (its learned scale alpha is kept, as FQ keeps its alphas).

  Each update (1) zeroes the gradients and the updates of pruned weights
  (they stay exactly 0 when they start at 0) and runs `inner` on the kept
  ones (straight-through: the gradient reaching a weight is dL/dQ);
  (2) gives each codeword the sum of its INQ members' gradients and updates
  the codebooks with `codebook_optimizer`: every codeword (`learn="centroids"`,
  the default for k-means: Han et al.'s centroid fine-tuning) or one scale
  alpha per layer multiplying the built codebook (`learn="scale"`, the
  default for uniform, which keeps the levels uniform; alpha's gradient is
  sum_k g_k c_k / alpha), or nothing; (3) rebuilds the codebooks when
  scheduled; (4) with `reassign`, re-assigns every kept weight to its nearest
  codeword of the codebook in force (so the kept float weights and the
  codebook are fine-tuned together); without it the symbols stay fixed as in
  Deep Compression (a weight gets its symbol when it enters the INQ set or at
  a rebuild) and only the codebook learns; (5) grows the INQ sets when a
  stage boundary is passed.

  Args:
    inner: optimizer of the float weights.
    bits: default bits per weight (codebooks of 2^bits entries).
    method: "kmeans" or "uniform".
    rules: selection rules (see `fq.Rule`).
    schedule: INQ and rebuild schedule (default: everything quantized from
      the first step, never rebuilt). See `fq.inq_schedule`.
    masks: keep-masks (tree or function of params); default: the non-zero
      entries of prunable leaves.
    kmeans_iters: Lloyd iterations.
    clip: clipping rule of the uniform codebook.
    learn: "centroids", "scale" or "none" (default by method, above).
    codebook_optimizer: default `optax.adam(1e-4)` (as FQ's alpha).
    reassign: whether symbols follow the weights (see above).

  Returns:
    An optax `GradientTransformationExtraArgs` (needs `params` in update).

  Example:
    >>> import jax, jax.numpy as jnp, optax, fq_jax as fq
    >>> params = {"kernel": jax.random.normal(jax.random.key(0), (16, 16))}
    >>> params = fq.apply_masks(params, fq.magnitude_masks(params, 0.5))
    >>> tx = fq.codebook_quantization(optax.sgd(0.1, momentum=0.9), bits=3)
    >>> state = tx.init(params)
    >>> loss = lambda p: jnp.sum(p["kernel"] ** 2)
    >>> grads = jax.grad(lambda p: loss(fq.codebook_quantized(p, state)))(params)
    >>> updates, state = tx.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)
    >>> int(jnp.sum(params["kernel"] == 0))  # pruned weights stay exactly 0
    128
  """
  _check_bits(bits)
  if method not in ("kmeans", "uniform"):
    raise ValueError(f"method must be 'kmeans' or 'uniform', got {method!r}")
  if learn is None:
    learn = "centroids" if method == "kmeans" else "scale"
  if learn not in ("centroids", "scale", "none"):
    raise ValueError(f"learn must be 'centroids', 'scale' or 'none', got {learn!r}")
  if not isinstance(schedule, transforms.QuantSchedule):
    raise TypeError(f"schedule must be a fq.QuantSchedule, got {type(schedule).__name__}")
  if codebook_optimizer is None:
    codebook_optimizer = optax.adam(1e-4)
  fractions = jnp.asarray(schedule.inq_fractions, jnp.float32)
  boundaries = jnp.asarray(schedule.inq_boundaries, jnp.int32)

  def stage_at(count):
    return jnp.sum(boundaries <= count).astype(jnp.int32)

  def specs_of(params):
    return rules_lib.resolve(params, rules, bits=bits)

  def build_all(specs, params, m):
    leaves, treedef = jax.tree.flatten(specs, is_leaf=lambda x: x is None)
    ws = treedef.flatten_up_to(params)
    ms = treedef.flatten_up_to(m)
    out = [None] * len(leaves)
    # Layers of one shape and bit-width are built together under vmap: one compiled
    # k-means (or clip search) per group instead of one per layer.
    groups = {}
    for i, s in enumerate(leaves):
      if s is not None and s.quantize:
        groups.setdefault((tuple(ws[i].shape), s.bits), []).append(i)
    for (_, group_bits), idx in groups.items():
      if method == "kmeans":
        one = functools.partial(_kmeans, bits=group_bits, iters=kmeans_iters)
      else:
        one = functools.partial(_uniform, bits=group_bits, clip=clip, num_candidates=64)
      stacked = jax.vmap(one)(
        jnp.stack([jnp.asarray(ws[i], jnp.float32) for i in idx]),
        jnp.stack([jnp.asarray(ms[i], bool) for i in idx]),
      )
      for j, i in enumerate(idx):
        out[i] = jax.tree.map(lambda x: x[j], stacked)
    return treedef.unflatten(out)

  def learned_of(cbs, old=None):
    if learn == "centroids":
      return _map_present(lambda c: c.codebook, cbs)
    if learn == "scale":
      if old is not None:
        return old
      return _map_present(lambda c: jnp.float32(1.0), cbs)
    return None

  def grow(codebooks, params, current, stage):
    fraction = fractions[stage]

    def one(cs, w, cur):
      w32 = jnp.asarray(w, jnp.float32)
      if schedule.inq_order == "magnitude":
        score = jnp.abs(w32)
      else:
        near = codebook_values(codebook_symbols(w32, cs.codebook, cs.mask), cs.codebook)
        score = -jnp.abs(near - w32)
      return _grow_inq(score, cs.mask, cur, fraction)

    return _map_present(one, codebooks, params, current)

  def init(params):
    return jax.jit(_init)(params)

  def _init(params):
    specs = specs_of(params)
    m = transforms._derive_masks(masks, specs, params)
    cbs = build_all(specs, params, m)
    base = _map_present(lambda c: c.codebook, cbs) if learn == "scale" else None
    learned = learned_of(cbs)
    none_yet = _map_present(lambda c: jnp.zeros(c.mask.shape, bool), cbs)
    stage = stage_at(jnp.int32(0))
    refit_every = schedule.refit_every
    return CodebookQState(
      count=jnp.zeros([], jnp.int32),
      masks=m,
      codebooks=cbs,
      base=base,
      learned=learned,
      learned_state=codebook_optimizer.init(learned),
      reassign=jnp.bool_(reassign),
      inq=grow(cbs, params, none_yet, stage),
      stage=stage,
      next_refit=jnp.int32(refit_every if refit_every > 0 else -1),
      refit_interval=jnp.float32(refit_every),
      inner_state=inner.init(params),
    )

  def update(updates, state: CodebookQState, params=None, **extra):
    if params is None:
      raise ValueError("codebook_quantization needs params in update()")
    zero_pruned = lambda m, g: g if m is None else jnp.where(m, g, jnp.zeros_like(g))
    grads = jax.tree.map(zero_pruned, state.masks, updates, is_leaf=lambda x: x is None)

    def symbols_in_force(cs, w):
      return jnp.where(state.reassign, codebook_symbols(w, cs.codebook, cs.mask), cs.symbols)

    # d L / d codeword = sum of the gradients of its INQ members (what reached w is dL/dQ).
    codeword_grads = _map_present(
      lambda cs, inq, g, w: jax.ops.segment_sum(
        jnp.where(cs.mask & inq, g.astype(jnp.float32), 0.0).reshape(-1),
        symbols_in_force(cs, w).reshape(-1),
        num_segments=cs.codebook.shape[0],
      ),
      state.codebooks,
      state.inq,
      grads,
      params,
    )
    codebooks = state.codebooks
    base = state.base
    learned, learned_state = state.learned, state.learned_state
    if learn != "none":
      if learn == "centroids":
        lgrads = codeword_grads
      else:
        lgrads = _map_present(lambda b, gc: jnp.sum(gc * b), base, codeword_grads)
      lupdates, learned_state = codebook_optimizer.update(lgrads, state.learned_state, learned)
      learned = optax.apply_updates(learned, lupdates)
      if learn == "centroids":
        codebooks = _map_present(lambda cs, c: cs._replace(codebook=c), codebooks, learned)
      else:
        codebooks = _map_present(
          lambda cs, b, a: cs._replace(codebook=a * b), codebooks, base, learned
        )

    new_updates, inner_state = inner.update(grads, state.inner_state, params, **extra)
    new_updates = jax.tree.map(zero_pruned, state.masks, new_updates, is_leaf=lambda x: x is None)
    new_params = optax.apply_updates(params, new_updates)
    count = state.count + 1

    # Rebuild the codebooks on FQ's re-estimation schedule (untraced if it never happens).
    interval, next_refit = state.refit_interval, state.next_refit
    if schedule.refit_every > 0:
      refit_now = (state.next_refit >= 0) & (count >= state.next_refit)

      def rebuild():
        cbs = build_all(specs_of(new_params), new_params, state.masks)
        if learn == "centroids":
          new_learned = learned_of(cbs)
          return cbs, None, new_learned, codebook_optimizer.init(new_learned)
        if learn == "scale":
          new_base = _map_present(lambda c: c.codebook, cbs)
          cbs = _map_present(lambda c, a: c._replace(codebook=a * c.codebook), cbs, learned)
          return cbs, new_base, learned, learned_state
        return cbs, base, learned, learned_state

      def keep():
        return codebooks, base, learned, learned_state

      codebooks, base, learned, learned_state = jax.lax.cond(refit_now, rebuild, keep)
      interval = jnp.where(
        refit_now, state.refit_interval * schedule.refit_growth, state.refit_interval
      )
      next_refit = jnp.where(
        refit_now, count + jnp.ceil(interval).astype(jnp.int32), state.next_refit
      )
    else:
      refit_now = jnp.bool_(False)

    stage = stage_at(count)
    inq = state.inq
    if schedule.inq_boundaries:
      inq = jax.lax.cond(
        stage != state.stage,
        lambda: grow(codebooks, new_params, state.inq, stage),
        lambda: state.inq,
      )
    # Symbols: nearest codewords with `reassign`; otherwise fixed, except that a weight
    # gets its nearest codeword when it enters the INQ set or the codebook is rebuilt.
    codebooks = _map_present(
      lambda cs, w, old_inq, new_inq: cs._replace(
        symbols=jnp.where(
          state.reassign | refit_now | (new_inq & ~old_inq),
          codebook_symbols(w, cs.codebook, cs.mask),
          cs.symbols,
        )
      ),
      codebooks,
      new_params,
      state.inq,
      inq,
    )
    return new_updates, CodebookQState(
      count=count,
      masks=state.masks,
      codebooks=codebooks,
      base=base,
      learned=learned,
      learned_state=learned_state,
      reassign=state.reassign,
      inq=inq,
      stage=stage,
      next_refit=next_refit,
      refit_interval=interval,
      inner_state=inner_state,
    )

  return optax.GradientTransformationExtraArgs(init, update)


def codebooks_of(opt_state) -> Any:
  """The tree of `CodebookState`s (None for other leaves) inside an optax state."""
  return find_codebook_state(opt_state).codebooks
