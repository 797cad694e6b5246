"""Shift (power-of-two) and recentralized quantization: paper Eqs. 1 and 2.

The quantizers are written as an integer *symbol* per weight plus a decoder,
so the forward pass, the entropy report and the file codec share one
definition of every quantized value:

  * `shift_symbols` / `shift_values`: Eq. 1 with k exponent bits. Symbol 0 is
    zero, 1 + e is +2^(e-b), 1 + 2^k + e is -2^(e-b), e in [0, 2^k - 1]:
    2^(k+1) + 1 symbols for a (k+2)-bit code.
  * `focused_symbols` / `focused_values`: Eq. 2. A recentralized weight's
    symbol is m * (2^(k+1) + 1) + shift symbol of (w - mu_m) / sigma, with
    k = bits - 3 (one bit goes to the component m); a shift layer uses
    k = bits - 2 and m = 0.

All arithmetic is float32 (bfloat16 inputs are upcast and results cast back),
and every value is built as `alpha * (s * 2^(e-b) * sigma + mu)`: the power of
two is exact (`ldexp`), so there is one rounding in the add and one in the
multiply, whatever XLA fuses.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fq_jax._src import gmm as gmm_lib

MIN_BITS = 2
MAX_BITS = 8  # 2^(8-2) = 64 exponent levels already span float32's range well


def _exponent_bits(bits, recentralized):
  """k of Eq. 1: n-bit FQ spends one bit on m, and the shift code needs 2 more."""
  return jnp.where(recentralized, bits - 3, bits - 2).astype(jnp.int32)


def num_shift_symbols(exponent_bits):
  """2^(k+1) + 1: zero, and 2^k magnitudes of either sign."""
  return 2 ** (exponent_bits + 1) + 1


def _nearest_power_exponent(a):
  """j such that 2^j is the nearest power of two to a > 0 on a linear scale.

  frexp gives a = f * 2^E exactly with f in [0.5, 1); the midpoint between
  2^(E-1) and 2^E is 0.75 * 2^E (ties go up). No log2 rounding is involved.
  """
  f, e = jnp.frexp(a)
  return e - 1 + (f >= 0.75).astype(e.dtype)


def _ceil_log2(a):
  """Smallest integer j with 2^j >= a, for a > 0 (exact, via frexp)."""
  f, e = jnp.frexp(a)
  return e - (f == 0.5).astype(e.dtype)


def shift_symbols(x: jax.Array, exponent_bits, bias) -> jax.Array:
  """Integer symbols of Eq. 1's nearest value (see module docstring), int32."""
  x = jnp.asarray(x, jnp.float32)
  k = jnp.asarray(exponent_bits, jnp.int32)
  b = jnp.asarray(bias, jnp.int32)
  e_max = 2**k - 1
  a = jnp.abs(x)
  # Between 0 and the smallest magnitude 2^-b the midpoint is 2^(-b-1).
  is_zero = ~(a >= jnp.ldexp(jnp.float32(1.0), -b - 1))
  e = jnp.clip(_nearest_power_exponent(a) + b, 0, e_max)
  code = 1 + e + jnp.where(x < 0, 2**k, 0)
  return jnp.where(is_zero, 0, code).astype(jnp.int32)


def shift_values(symbols: jax.Array, exponent_bits, bias) -> jax.Array:
  """Decodes `shift_symbols` to float32 s * 2^(e - b)."""
  k = jnp.asarray(exponent_bits, jnp.int32)
  b = jnp.asarray(bias, jnp.int32)
  half = 2**k
  nonzero = symbols > 0
  negative = symbols > half
  e = jnp.where(negative, symbols - 1 - half, symbols - 1)
  magnitude = jnp.ldexp(jnp.float32(1.0), jnp.where(nonzero, e - b, 0))
  return jnp.where(nonzero, jnp.where(negative, -magnitude, magnitude), 0.0)


def shift_quantize(x: jax.Array, *, bits: int, bias) -> jax.Array:
  """Eq. 1: the nearest (bits)-bit shift-quantized value, with clipping.

  Representable values are 0 and +-2^(e - bias) for integer e in
  [0, 2^(bits-2) - 1]. Rounding is to the nearest value on the linear scale
  (ties away from zero); magnitudes past the largest clip to it.

  Args:
    x: array of any float dtype.
    bits: total bits of the code (sign, zero and bits - 2 exponent bits).
    bias: per-layer integer bias b (scalar, may be traced).

  Returns:
    Array of `x`'s shape and dtype.

  Example:
    >>> import jax.numpy as jnp, fq_jax as fq
    >>> fq.shift_quantize(jnp.array([0.3, -0.7, 5.0, 0.01]), bits=4, bias=3)
    Array([ 0.25, -0.5 ,  1.  ,  0.  ], dtype=float32)
  """
  k = bits - 2
  return shift_values(shift_symbols(x, k, bias), k, bias).astype(jnp.asarray(x).dtype)


def overflow_bias(x: jax.Array, *, bits: int, mask: jax.Array | None = None) -> jax.Array:
  """The per-layer bias b of Eq. 1 by the overflow rule.

  The largest magnitude is 2^(2^k - 1 - b) with k = bits - 2. b is the
  largest integer (finest resolution) such that at most a fraction
  1 / (2^bits + 1) of the kept values exceed that magnitude. PAPER.md leaves
  open whether n in the bound is the outer or the inner bit-width; here it is
  `bits`, the width of the shift code being biased (the tighter choice: a
  5-bit code lets 1/33 of the values clip, not 1/5).

  Args:
    x: values to be shift-quantized (any shape).
    bits: width of the shift code.
    mask: optional boolean keep-mask; pruned entries do not count.

  Returns:
    int32 scalar. With no kept non-zero value the bias is 0. When the
    allowance would cover every non-zero value (very small layers), the
    bias makes the largest value representable instead.

  Example:
    >>> import jax.numpy as jnp, fq_jax as fq
    >>> int(fq.overflow_bias(jnp.array([0.1, -0.3, 0.2]), bits=4))
    4
  """
  a = jnp.abs(jnp.ravel(x).astype(jnp.float32))
  kept = jnp.isfinite(a)
  if mask is not None:
    kept &= jnp.ravel(mask).astype(bool)
  a = jnp.where(kept, a, 0.0)
  if a.size == 0:
    return jnp.int32(0)
  n = jnp.sum(kept)
  allowed = n // (2**bits + 1)
  # Ascending sort puts the pruned zeros first; the (allowed+1)-th largest kept
  # value is the smallest the top magnitude may be.
  sorted_a = jnp.sort(a)
  q = sorted_a[a.size - 1 - allowed]
  # When the allowance covers every non-zero value (tiny layers) the rule puts
  # no bound on b; cover the largest value instead of clipping everything.
  q = jnp.where(q > 0, q, sorted_a[-1])
  e_max = 2 ** (bits - 2) - 1
  bias = e_max - _ceil_log2(jnp.where(q > 0, q, 1.0))
  return jnp.where((n > 0) & (q > 0), bias, 0).astype(jnp.int32)


def round_to_power_of_two(x: jax.Array) -> jax.Array:
  """Nearest signed power of two on a linear scale (0 stays 0), float32."""
  x = jnp.asarray(x, jnp.float32)
  a = jnp.abs(x)
  p = jnp.ldexp(jnp.float32(1.0), _nearest_power_exponent(jnp.where(a > 0, a, 1.0)))
  return jnp.where(a > 0, jnp.sign(x) * p, 0.0)


class FocusState(NamedTuple):
  """Everything one layer's focused quantizer needs (a pytree of arrays).

  Attributes:
    recentralized: bool scalar; False means plain shift quantization.
    bits: int32 scalar, the layer's total bit-width n.
    means: float32 (2,), component means rounded to powers of two
      (component 0 the negative one).
    sigma: float32 scalar, the shared (pooled) component standard deviation.
    bias: int32 scalar, the bias b of the shift code.
    assignment: bool array of the weight's shape, m_w (True = component 1).
    mask: bool array of the weight's shape, True where the weight is kept.
    alpha: float32 scalar, the learnable per-layer scale (initially 1).
    gmm: the fitted mixture the state was derived from.
    separation: float32 scalar, the Wasserstein separation (Eq. 4).
  """

  recentralized: jax.Array
  bits: jax.Array
  means: jax.Array
  sigma: jax.Array
  bias: jax.Array
  assignment: jax.Array
  mask: jax.Array
  alpha: jax.Array
  gmm: gmm_lib.GMM
  separation: jax.Array


def _centering(state: FocusState):
  """Per-weight (mu, sigma) of Eq. 2; (0, 1) for a shift layer."""
  mu = jnp.where(state.assignment, state.means[1], state.means[0])
  mu = jnp.where(state.recentralized, mu, 0.0)
  sigma = jnp.where(state.recentralized, state.sigma, 1.0)
  return mu, sigma


def exponent_bits(state: FocusState) -> jax.Array:
  """k of Eq. 1 for this layer's shift code."""
  return _exponent_bits(state.bits, state.recentralized)


def num_symbols(state: FocusState) -> jax.Array:
  """Alphabet size of `focused_symbols` for this layer."""
  per_component = num_shift_symbols(exponent_bits(state))
  return jnp.where(state.recentralized, 2 * per_component, per_component)


def focused_symbols(w: jax.Array, state: FocusState) -> jax.Array:
  """Integer symbol of every weight under Eq. 2 (0 for pruned ones), int32."""
  mu, sigma = _centering(state)
  # A reciprocal, then a product: both correctly rounded wherever XLA compiles them.
  # Written as `/ sigma`, XLA turns the division by a broadcast scalar into a product
  # with its reciprocal in some fusions (the jitted forward pass of some layer shapes)
  # and not in others (the codec's batched kernel, where sigma varies per element), and
  # the two results differ by an ulp: enough to put a weight on the rounding boundary
  # on different sides, so the file would decode one symbol away from the value trained
  # and evaluated (tests/test_quantizers.py drives weights onto the boundaries).
  z = (jnp.asarray(w, jnp.float32) - mu) * (1.0 / sigma)
  k = exponent_bits(state)
  code = shift_symbols(z, k, state.bias)
  code = code + jnp.where(state.recentralized & state.assignment, num_shift_symbols(k), 0)
  return jnp.where(state.mask, code, 0).astype(jnp.int32)


def focused_values(
  symbols: jax.Array, state: FocusState, alpha: jax.Array | None = None, dtype=jnp.float32
) -> jax.Array:
  """Decodes `focused_symbols`: z * alpha * (Q_shift * sigma + mu), in `dtype`.

  This is the single definition of a quantized value; the forward pass and
  the file decoder both call it, which makes decoding bit-exact.
  """
  alpha = state.alpha if alpha is None else alpha
  k = exponent_bits(state)
  per_component = num_shift_symbols(k)
  second = state.recentralized & (symbols >= per_component)
  shift_code = jnp.where(second, symbols - per_component, symbols)
  mu = jnp.where(state.recentralized, jnp.where(second, state.means[1], state.means[0]), 0.0)
  sigma = jnp.where(state.recentralized, state.sigma, 1.0)
  unscaled = shift_values(shift_code, k, state.bias) * sigma + mu
  return jnp.where(state.mask, jnp.asarray(alpha, jnp.float32) * unscaled, 0.0).astype(dtype)


def _mix32(x):
  """The murmur3 32-bit finaliser: a bijection on uint32 with full avalanche."""
  x = (x ^ (x >> 16)) * jnp.uint32(0x85EBCA6B)
  x = (x ^ (x >> 13)) * jnp.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


def hashed_uniform(key: jax.Array, shape) -> jax.Array:
  """Uniform float32 in [0, 1) per position, from a counter-based hash of (key, index).

  Used to sample the component assignments instead of `jax.random.bernoulli`:
  threefry's bit generator is a large computation for XLA to compile (on CPU
  it took half of `focus`'s compile time, once per layer group, in `init` and
  again in the train step), while this is three integer multiply-xorshift
  rounds. Statistically it only needs to be uniform and independent across
  positions and keys, which the murmur3 finaliser gives for this use.

  Args:
    key: a `jax.random.key` (typed) or raw uint32 key data.
    shape: the output shape.

  Returns:
    float32 array of `shape`, multiples of 2^-24.
  """
  data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
  words = jnp.ravel(jnp.asarray(data, jnp.uint32))
  seed = _mix32(words[0] ^ _mix32(words[-1] + jnp.uint32(0x9E3779B9)))
  size = 1
  for d in shape:
    size *= d
  index = jnp.arange(size, dtype=jnp.uint32).reshape(shape)
  x = _mix32(index * jnp.uint32(0x9E3779B1) + seed)
  x = _mix32(x ^ seed)
  return (x >> 8).astype(jnp.float32) * jnp.float32(2.0**-24)


# Long on purpose: 50 of its lines are the docstring (paper Sec. 3, step by step); the code is 35.
def focus(
  w: jax.Array,
  mask: jax.Array | None,
  key: jax.Array,
  *,
  bits: int = 5,
  w_sep: float = 2.0,
  recentralize: bool = True,
  num_iters: int = 200,
  tol: float = 1e-7,
  include_pruned_in_separation: bool = False,
  gmm: gmm_lib.GMM | None = None,
) -> FocusState:
  """Derives one layer's focused quantizer from its weights (paper Sec. 3).

  Fits the two-component mixture to the kept weights, measures the
  Wasserstein separation (Eq. 4) and picks the quantizer: recentralized
  (Eq. 2) when the separation is at least `w_sep`, plain `bits`-bit shift
  quantization otherwise (or when `recentralize` is False, or bits < 3 leaves
  no room for the component bit). As in all the paper's experiments the
  component means are rounded to the nearest powers of two and the two
  components share one sigma, pooled as sqrt(sum_c lambda_c sigma_c^2) (the
  within-component standard deviation; PAPER.md leaves the pooling open). The
  component m_w of each kept weight is sampled from the mixture's posterior
  with `key` (through `hashed_uniform`, cheap to compile). The bias follows `overflow_bias` on the values the shift code
  sees ((w - mu_m) / sigma for a recentralized layer).

  Args:
    w: the layer's float weights.
    mask: boolean keep-mask of `w`'s shape, or None (all kept).
    key: a `jax.random.key` for sampling the assignments.
    bits: total bits per weight n (2..8).
    w_sep: Wasserstein separation threshold (Eq. 4).
    recentralize: False forces plain shift quantization (INQ-style).
    num_iters: EM iterations (at most).
    tol: EM tolerance, see `fit_gmm`.
    include_pruned_in_separation: count pruned zeros in Eq. 4's sigma^2.
    gmm: an already fitted mixture (e.g. one row of `fq.fit_gmms`); fitted
      here when None.

  Returns:
    The layer's `FocusState`, alpha initialised to 1.

  Example:
    >>> import jax, jax.numpy as jnp, fq_jax as fq
    >>> w = jax.random.normal(jax.random.key(0), (64, 64)) * 0.05
    >>> state = fq.focus(w, jnp.abs(w) > 0.05, jax.random.key(1), bits=5)
    >>> bool(state.recentralized)
    True
  """
  if not MIN_BITS <= bits <= MAX_BITS:
    raise ValueError(f"bits must be in [{MIN_BITS}, {MAX_BITS}], got {bits}")
  kept = (jnp.ones(jnp.shape(w), bool) if mask is None else jnp.asarray(mask, bool)) & jnp.isfinite(
    w
  )
  if gmm is None:
    gmm = gmm_lib.fit_gmm(w, kept, num_iters=num_iters, tol=tol)
  separation = gmm_lib.wasserstein_separation(
    gmm, w, kept, include_pruned=include_pruned_in_separation
  )
  recentralized = jnp.asarray((separation >= w_sep) & recentralize & (bits >= 3), bool)

  means = round_to_power_of_two(gmm.means)
  sigma = jnp.sqrt(jnp.sum(gmm.weights * gmm.stds**2))
  p_plus = gmm_lib.gmm_posterior(gmm, w)
  assignment = (hashed_uniform(key, jnp.shape(w)) < p_plus) & kept & recentralized

  x = jnp.asarray(w, jnp.float32)
  centred = (x - jnp.where(assignment, means[1], means[0])) * (1.0 / sigma)  # as focused_symbols
  # Both candidate biases from one batched sort (one sort to compile, not two).
  both = jax.vmap(lambda v, b: overflow_bias(v, bits=b, mask=kept))(
    jnp.stack([centred, x]), jnp.asarray([max(bits - 1, MIN_BITS), bits], jnp.int32)
  )
  bias = jnp.where(recentralized, both[0], both[1])
  return FocusState(
    recentralized=recentralized,
    bits=jnp.int32(bits),
    means=means,
    sigma=sigma,
    bias=bias,
    assignment=assignment,
    mask=kept,
    alpha=jnp.float32(1.0),
    gmm=gmm,
    separation=separation,
  )


def focused_quantize(w: jax.Array, state: FocusState, alpha: jax.Array | None = None) -> jax.Array:
  """Eq. 2 (or plain shift quantization), with straight-through gradients.

  Forward: z_w * alpha * (Q_shift[(w - mu_m) / sigma] * sigma + mu_m) for a
  recentralized layer, z_w * alpha * Q_shift[w] for a shift layer, where z is
  the keep-mask and m the sampled component (both in `state`).
  Backward: the gradient with respect to `w` is the identity on kept weights
  and zero on pruned ones (straight-through); the gradient with respect to
  `alpha` is the true one, sum(g * Q[w] / alpha).

  Args:
    w: the layer's float weights (float32 or bfloat16).
    state: the layer's `FocusState` from `focus`.
    alpha: optional scale overriding `state.alpha` (differentiate through it
      to learn alpha).

  Returns:
    The quantized weights, shaped and typed like `w`.

  Example:
    >>> import jax, jax.numpy as jnp, fq_jax as fq
    >>> w = jax.random.normal(jax.random.key(0), (256,)) * 0.1
    >>> state = fq.focus(w, jnp.abs(w) > 0.05, jax.random.key(1), bits=5)
    >>> q = fq.focused_quantize(w, state)
    >>> bool(jnp.all(fq.focused_quantize(q, state) == q))  # idempotent
    True
    >>> g = jax.grad(lambda w: jnp.sum(fq.focused_quantize(w, state)))(w)
    >>> bool(jnp.all(g == state.mask))  # straight-through on kept weights
    True
  """
  alpha = state.alpha if alpha is None else alpha
  symbols = focused_symbols(jax.lax.stop_gradient(w), state)
  unit = jax.lax.stop_gradient(focused_values(symbols, state, alpha=1.0))
  value = jnp.where(state.mask, jnp.asarray(alpha, jnp.float32), 0.0) * unit
  # (w - stop_gradient(w)) is exactly +0 in the forward pass and carries the
  # identity gradient; the mask zeroes it on pruned weights.
  w32 = jnp.asarray(w, jnp.float32)
  through = (w32 - jax.lax.stop_gradient(w32)) * state.mask
  return (value + through).astype(jnp.asarray(w).dtype)
