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
  * `codebook_quantization` (fq_jax/_src/codebook_transform.py): the optax wrapper (state `CodebookQState` in the
    optimizer state, pruned weights stay exactly 0), with
    `codebook_quantized(params, state)` for the forward pass.

Everything is pure and jittable. A layer's symbols (int32 indices into its
codebook) are what the .fqz codec stores (kind "codebook", docs/format.md);
the decoded value is `codebook[symbol]`, bit-identical to the forward pass.
"""

from __future__ import annotations

import functools
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

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


def codebook_mse(w: jax.Array, state: CodebookState) -> jax.Array:
  """Mean squared error of codebook[state.symbols] against `w` over kept weights."""
  q = codebook_values(state.symbols, state.codebook, state.mask)
  err = jnp.where(state.mask, (q - jnp.asarray(w, jnp.float32)) ** 2, 0.0)
  return jnp.sum(err) / jnp.maximum(jnp.sum(state.mask), 1)
