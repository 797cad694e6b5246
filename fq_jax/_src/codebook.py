"""Codebook quantizers: the baselines Focused Quantization is compared with.

Two ways to build a per-layer codebook of 2^bits float32 values for the kept
(non-pruned) weights of a sparse layer, one quantizer that maps every kept
weight to its nearest codeword with straight-through gradients, and an optax
wrapper that fine-tunes the kept weights and the codebooks together:

  * `kmeans_codebook`: Deep Compression's weight sharing (Han et al. 2016):
    1-D k-means (Lloyd's algorithm) on the kept weights, centroids initialised
    linearly between the smallest and the largest kept weight.
  * `uniform_codebook`: symmetric uniform n-bit integers times a per-layer
    scale; the scale is max|w| / (2^(n-1) - 1) (`clip="max"`) or the
    MSE-optimal clipping of that range (`clip="mse"`).
  * `codebook_quantize`: the forward value codebook[symbol] with the identity
    gradient on kept weights (straight-through, as `fq.focused_quantize`) and
    the true gradient with respect to the codebook (each codeword receives
    the sum of its members' gradients, Han et al.'s centroid fine-tuning).
  * `codebook_quantization`: the optax wrapper (state `CodebookQState` in the
    optimizer state, pruned weights stay exactly 0), with
    `codebook_quantized(params, state)` for the forward pass.

Everything is pure and jittable. A layer's symbols (int32 indices into its
codebook) are what the .fqz codec stores (kind "codebook", docs/format.md);
the decoded value is `codebook[symbol]`, bit-identical to the forward pass.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fq_jax._src import rules as rules_lib
from fq_jax._src import transforms

# Bit-widths of the codebook baselines (K = 2^bits codewords). One bit is a legitimate
# codebook (two codewords: binary weights), unlike the focused quantizer, whose code needs a
# sign and an exponent (`fq_jax._src.quantizers.MIN_BITS` = 2).
MIN_CODEBOOK_BITS = 1
MAX_CODEBOOK_BITS = 8

# The default schedule, as `fq.focused_quantization`'s: everything quantized from the first
# step, never rebuilt.
_EVERYTHING_AT_ONCE = transforms.QuantSchedule()


class CodebookState(NamedTuple):
  """One layer's codebook quantizer (a pytree of arrays).

  Attributes:
    codebook: float32 (K,), the codewords (K = 2^bits for the builders here;
      any K >= 1 works).
    symbols: int32 array of the weight's shape: the codeword index of every
      kept weight (0 where pruned). This is the index tensor the file stores.
    mask: bool array of the weight's shape, True where the weight is kept.
  """

  codebook: jax.Array
  symbols: jax.Array
  mask: jax.Array


def _check_bits(bits):
  if not isinstance(bits, int) or not MIN_CODEBOOK_BITS <= bits <= MAX_CODEBOOK_BITS:
    raise ValueError(
      f"bits must be an integer in [{MIN_CODEBOOK_BITS}, {MAX_CODEBOOK_BITS}], got {bits!r}"
    )


def _kept(w, mask):
  kept = jnp.isfinite(jnp.asarray(w, jnp.float32))
  if mask is not None:
    kept &= jnp.broadcast_to(jnp.asarray(mask, bool), jnp.shape(w))
  return kept


@jax.jit
def codebook_symbols(w: jax.Array, codebook: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """The index of the nearest codeword of every weight (0 where not kept), int32.

  The codebook need not be sorted. Nearest is decided against the float32
  midpoints (c_i + c_{i+1}) / 2 of the sorted codewords; a weight exactly on
  a midpoint goes to the smaller codeword; among equal codewords the one
  sorting first (stable sort) wins. O(size * log K).
  """
  x = jnp.asarray(w, jnp.float32)
  c = jnp.asarray(codebook, jnp.float32).reshape(-1)
  order = jnp.argsort(c, stable=True)
  cs = c[order]
  midpoints = (cs[:-1] + cs[1:]) * 0.5
  idx = jnp.searchsorted(midpoints, jnp.where(jnp.isnan(x), 0.0, x), side="left")
  sym = order[idx].astype(jnp.int32)
  return jnp.where(_kept(x, mask), sym, 0).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("dtype",))
def codebook_values(
  symbols: jax.Array, codebook: jax.Array, mask: jax.Array | None = None, dtype=jnp.float32
) -> jax.Array:
  """Decodes symbols: codebook[symbol] at kept positions, +0 elsewhere, cast to `dtype`.

  The single definition of a codebook-quantized value (forward pass and file
  decoder alike).
  """
  c = jnp.asarray(codebook, jnp.float32).reshape(-1)
  v = jnp.take(c, jnp.asarray(symbols, jnp.int32), mode="clip")
  if mask is not None:
    v = jnp.where(mask, v, 0.0)
  return v.astype(dtype)


def kmeans_codebook(
  w: jax.Array, mask: jax.Array | None = None, *, bits: int = 5, iters: int = 100
) -> CodebookState:
  """Deep Compression weight sharing: 1-D k-means on the kept weights.

  Lloyd's algorithm with K = 2^bits centroids initialised linearly between
  the smallest and the largest kept weight (Han et al.'s "linear"
  initialisation, which keeps the rare large weights represented). Each
  iteration assigns every kept weight to its nearest centroid
  (`codebook_symbols`) and moves every centroid to the mean of its members.
  A centroid left without members (linear init puts some in the gap that
  pruning leaves around zero) is re-seeded, as scikit-learn's k-means does,
  at one of the kept weights farthest from their centroids (the e-th empty
  centroid at the e-th farthest weight, which leaves its old cluster).
  Stops after `iters` iterations or when no centroid moves. Pruned and
  non-finite weights take no part. The returned codebook is sorted.

  Args:
    w: the layer's float weights (any shape).
    mask: boolean keep-mask of `w`'s shape, or None (all kept).
    bits: log2 of the number of centroids (1..8).
    iters: most Lloyd iterations.

  Returns:
    A `CodebookState` (codebook sorted ascending, float32).

  Example:
    >>> import jax, jax.numpy as jnp, fq_jax as fq
    >>> w = jnp.array([-1.0, -0.9, 0.0, 0.1, 1.0, 1.1])
    >>> s = fq.kmeans_codebook(w, bits=2, iters=20)
    >>> [round(float(c), 3) for c in s.codebook], s.symbols.tolist()
    ([-0.95, 0.0, 0.1, 1.05], [0, 0, 1, 2, 3, 3])
  """
  _check_bits(bits)
  return _kmeans(w, mask, bits=bits, iters=iters)


@functools.partial(jax.jit, static_argnames=("bits", "iters"))
def _kmeans(w, mask, *, bits, iters):
  k = 2**bits
  x = jnp.asarray(w, jnp.float32).reshape(-1)
  kept = _kept(x, None if mask is None else jnp.asarray(mask, bool).reshape(-1))
  n = jnp.sum(kept)
  lo = jnp.min(jnp.where(kept, x, jnp.inf), initial=jnp.inf)
  hi = jnp.max(jnp.where(kept, x, -jnp.inf), initial=-jnp.inf)
  lo = jnp.where(n > 0, lo, 0.0)
  hi = jnp.where(n > 0, hi, 0.0)
  init = lo + (hi - lo) * (jnp.arange(k, dtype=jnp.float32) / max(k - 1, 1))
  xk = jnp.where(kept, x, 0.0)
  weight = kept.astype(jnp.float32)
  n_top = min(k, x.size)

  def lloyd(c):
    sym = codebook_symbols(x, c, kept)
    sums = jax.ops.segment_sum(xk, sym, num_segments=k)
    counts = jax.ops.segment_sum(weight, sym, num_segments=k)
    if n_top > 0:
      # Re-seed empty centroids at the kept weights farthest from their centroids.
      dist = jnp.where(kept, (x - c[sym]) ** 2, -1.0)
      top_d, top_i = jax.lax.top_k(dist, n_top)
      empty = counts == 0
      rank = jnp.cumsum(empty) - 1
      r = jnp.clip(rank, 0, n_top - 1)
      ok = empty & (rank < n_top) & (top_d[r] > 0)
      point = top_i[r]
      take = jnp.where(ok, 1.0, 0.0)
      sums = sums.at[sym[point]].add(-take * x[point])
      counts = counts.at[sym[point]].add(-take)
      sums = jnp.where(ok, x[point], sums)
      counts = jnp.where(ok, 1.0, counts)
    return jnp.where(counts > 0, sums / jnp.maximum(counts, 1.0), c)

  def cond(carry):
    i, _, moved = carry
    return (i < iters) & moved

  def body(carry):
    i, c, _ = carry
    new = lloyd(c)
    return i + 1, new, jnp.any(new != c)

  _, codebook, _ = jax.lax.while_loop(cond, body, (jnp.int32(0), init, jnp.bool_(True)))
  codebook = jnp.sort(codebook)
  symbols = codebook_symbols(x, codebook, kept).reshape(jnp.shape(w))
  return CodebookState(codebook=codebook, symbols=symbols, mask=kept.reshape(jnp.shape(w)))


def uniform_levels(bits: int) -> jax.Array:
  """The integers -2^(bits-1) .. 2^(bits-1) - 1 of a symmetric n-bit code, float32."""
  half = 2 ** (bits - 1)
  return jnp.arange(-half, half, dtype=jnp.float32)


def uniform_codebook(
  w: jax.Array,
  mask: jax.Array | None = None,
  *,
  bits: int = 5,
  clip: Literal["max", "mse"] = "max",
  num_candidates: int = 64,
) -> CodebookState:
  """Symmetric uniform n-bit integers per layer: codebook = scale * (-2^(n-1) .. 2^(n-1) - 1).

  With `clip="max"` the scale is max|w| / (2^(n-1) - 1) over the kept weights,
  so the levels are 0 and +-scale, ..., +-(2^(n-1) - 1) scale, no weight is
  clipped, and the extra level -2^(n-1) scale of the two's complement range
  is never used. With `clip="mse"` the clipping range is max|w| times the
  fraction among `num_candidates` evenly spaced in (0, 1] that minimises the
  mean squared quantization error of the kept weights (weights beyond the
  range saturate at the extreme levels, the negative side including
  -2^(n-1) scale).

  Args:
    w: the layer's float weights.
    mask: boolean keep-mask, or None.
    bits: bits per weight n (1..8; with n = 1 the levels are -scale and 0).
    clip: "max" or "mse".
    num_candidates: candidate clipping fractions for "mse".

  Returns:
    A `CodebookState` with a sorted codebook of 2^bits entries.

  Example:
    >>> import jax.numpy as jnp, fq_jax as fq
    >>> s = fq.uniform_codebook(jnp.array([-0.7, 0.1, 0.3]), bits=3)
    >>> [round(float(c) * 30, 3) for c in s.codebook], s.symbols.tolist()
    ([-28.0, -21.0, -14.0, -7.0, 0.0, 7.0, 14.0, 21.0], [1, 4, 5])
  """
  _check_bits(bits)
  if clip not in ("max", "mse"):
    raise ValueError(f"clip must be 'max' or 'mse', got {clip!r}")
  return _uniform(w, mask, bits=bits, clip=clip, num_candidates=num_candidates)


@functools.partial(jax.jit, static_argnames=("bits", "clip", "num_candidates"))
def _uniform(w, mask, *, bits, clip, num_candidates):
  x = jnp.asarray(w, jnp.float32)
  kept = _kept(x, mask)
  levels = uniform_levels(bits)
  top = max(2 ** (bits - 1) - 1, 1)
  amax = jnp.max(jnp.where(kept, jnp.abs(x), 0.0), initial=0.0)
  amax = jnp.where(amax > 0, amax, 1.0)
  scale = amax / top
  if clip == "mse":
    xk = jnp.where(kept, x, 0.0)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1

    def mse(s):
      q = jnp.clip(jnp.round(xk / s), lo, hi) * s
      return jnp.sum(jnp.where(kept, (q - xk) ** 2, 0.0))

    fractions = jnp.arange(1, num_candidates + 1, dtype=jnp.float32) / num_candidates
    errors = jax.lax.map(mse, scale * fractions)
    scale = scale * fractions[jnp.argmin(errors)]
  codebook = scale * levels
  return CodebookState(codebook=codebook, symbols=codebook_symbols(x, codebook, kept), mask=kept)


def codebook_quantize(
  w: jax.Array,
  state: CodebookState,
  codebook: jax.Array | None = None,
  *,
  reassign: bool | jax.Array = True,
) -> jax.Array:
  """codebook[symbol] with straight-through gradients; pruned weights are 0.

  Forward: each kept weight becomes its nearest codeword (`reassign`, the
  default: symbols recomputed from `w` as `codebook_symbols`) or the codeword
  of its stored symbol (`reassign=False`: Deep Compression's fixed index
  tensor, `state.symbols`). Backward: the gradient with respect to `w` is the
  identity on kept weights and zero on pruned ones; with respect to
  `codebook` it is the true one, the sum of the gradients of each codeword's
  members.

  Args:
    w: the layer's float weights.
    state: its `CodebookState`.
    codebook: optional codewords overriding `state.codebook` (differentiate
      through it to fine-tune them).
    reassign: nearest-codeword symbols of `w` (True) or `state.symbols`
      (False); may be a traced bool.

  Returns:
    The quantized weights, shaped and typed like `w`.

  Example:
    >>> import jax, jax.numpy as jnp, fq_jax as fq
    >>> w = jax.random.normal(jax.random.key(0), (256,)) * 0.1
    >>> s = fq.kmeans_codebook(w, jnp.abs(w) > 0.05, bits=3)
    >>> q = fq.codebook_quantize(w, s)
    >>> bool(jnp.all(fq.codebook_quantize(q, s) == q)), int(jnp.unique(q).size)
    (True, 9)
    >>> g = jax.grad(lambda c: jnp.sum(fq.codebook_quantize(w, s, c)))(s.codebook)
    >>> g.tolist() == jnp.bincount(s.symbols[s.mask], length=8).tolist()
    True
  """
  c = state.codebook if codebook is None else codebook
  return _codebook_quantize(w, state, jnp.asarray(c, jnp.float32), jnp.asarray(reassign, bool))


@jax.jit
def _codebook_quantize(w, state, c, reassign):
  wsg = jax.lax.stop_gradient(w)
  symbols = jnp.where(
    reassign, codebook_symbols(wsg, jax.lax.stop_gradient(c), state.mask), state.symbols
  )
  value = codebook_values(symbols, c, state.mask)
  w32 = jnp.asarray(w, jnp.float32)
  through = (w32 - jax.lax.stop_gradient(w32)) * state.mask
  return (value + through).astype(jnp.asarray(w).dtype)


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
  return jax.tree.map(
    lambda a, *xs: None if a is None else fn(a, *xs), first, *rest, is_leaf=_is_leaf
  )


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


def codebook_mse(w: jax.Array, state: CodebookState) -> jax.Array:
  """Mean squared error of codebook[state.symbols] against `w` over kept weights."""
  q = codebook_values(state.symbols, state.codebook, state.mask)
  err = jnp.where(state.mask, (q - jnp.asarray(w, jnp.float32)) ** 2, 0.0)
  return jnp.sum(err) / jnp.maximum(jnp.sum(state.mask), 1)


def codebooks_of(opt_state) -> Any:
  """The tree of `CodebookState`s (None for other leaves) inside an optax state."""
  return find_codebook_state(opt_state).codebooks
