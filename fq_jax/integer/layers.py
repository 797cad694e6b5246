"""Multiplication-free inference: integer activations, integer batch norm, shift-add layers.

This module holds the pieces of the paper's Sec. 4.2 / Table 3 experiment
("5-bit FQ + 8-bit activations + 16-bit integer batch norm") that do not
depend on a particular network; `fq_jax.integer.executor` strings them
together for the model zoo and runs a compressed model from its .fqz file.
docs/integer_inference.md is the long-form description.

Activations
-----------
`quantize_activations(x, bits=, scale=, signed=)` rounds to the integer grid
`scale * {lo..hi}` (round half up, then clip; `lo, hi = activation_range`)
with a straight-through gradient inside the range. The integer path uses
POWER-OF-TWO scales (`scale = 2^exponent`, one per layer input, chosen by
`calibrate_activations`), so every change of fixed-point unit between
tensors is a shift; the cost is up to one bit of resolution against an
arbitrary float scale (OPEN in the paper; documented choice). Activations are
quantized where they enter a convolution or dense layer, so every operand of
every dot product is a `bits`-bit integer code; outputs of the batch norm,
residual sums and pooled values are wider fixed-point integers (unit
2^-F, int32), as in common integer inference designs.

Weights and the shift-add dot product
-------------------------------------
A focused-quantized weight is `w = alpha * (sigma * s * 2^(e - b) + mu_m)`
(recentralized) or `w = alpha * s * 2^(e - b)` (shift), s in {-1, 0, +1},
e in [0, 2^k - 1], mu_m = sgn_m * 2^(p_m) a signed power of two. With integer
input codes X (x = 2^ex * X) a dot product is

    sum_i w_i x_i = alpha * 2^ex * ( sigma * 2^-b * A + 2^-q * M )
    A = sum_i s_i * (X_i << e_i)                       (shifts and adds)
    M = sgn_+ * (S_+ << (p_+ + q)) + sgn_- * (S_- << (p_- + q)),
    S_c = sum_{i kept, m_i = c} X_i                    (adds only)

with q = -min(p_+, p_-) so that every shift amount is a non-negative
integer. `ShiftAddLayer` holds, per output channel, the list of kept taps
with their shift e, sign s and component m; `shift_add` evaluates A and M by
gathering input rows (im2col), shifting and adding: no multiply of any kind.
(A per-exponent "sign-plane" decomposition computed with adds only would
cost (number of exponents x 2) passes over the dense taps; the tap lists cost
one pass over the kept taps, i.e. the sparse MAC count.)

Folding sigma, alpha and batch norm (the requantization)
--------------------------------------------------------
Batch norm in inference mode is the per-channel affine map
`y = G * z + H`, `G = gamma / sqrt(var + eps)`, `H = beta - mean * G`
(`bn_affine`); a dense layer with a bias and no batch norm (the classifier)
has G = 1, H = bias. Substituting the dot product above:

    y_c = [G_c alpha sigma 2^(ex - b)] * A_c + [G_c alpha 2^(ex - q)] * M_c + H_c

so the shared sigma and alpha are folded into the batch norm's two per-channel
multipliers. `fold_requant` turns these into the integer batch norm

    y_c = 2^-r_c * (KA_c * A_c + KM_c * M_c + C_c)

with KA_c, KM_c signed `bn_bits`-bit integers (r_c per channel, as large as
the bigger multiplier allows), and C_c an integer on the same 2^-r_c grid
(the accumulator's resolution). This costs one integer multiply per output
element and per accumulator (one for a shift layer, two for a recentralized
layer), never one per MAC. The float simulation (`apply_quantized` with
`bn_bits > 0`) applies exactly these quantized multipliers to the two parts
of the convolution, so it and the integer path agree up to float rounding.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fq_jax._src import quantizers
from fq_jax.codec.metadata import ActivationScale, parse_activation_scales

MAX_ACTIVATION_BITS = 16
MAX_BN_BITS = 24
DEFAULT_BN_BITS = 16
# Largest right shift the integer batch norm uses: keeps the offset C and the
# products KA * A within int64 whatever the batch-norm statistics are.
MAX_REQUANT_SHIFT = 48


# ----------------------------------------------------------------------------
# Activation quantization
# ----------------------------------------------------------------------------


def activation_range(bits: int, signed: bool) -> tuple[int, int]:
  """Integer code range of a `bits`-bit activation: [-2^(bits-1), 2^(bits-1) - 1] or [0, 2^bits - 1]."""
  if not 1 <= int(bits) <= MAX_ACTIVATION_BITS:
    raise ValueError(f"activation bits must be in [1, {MAX_ACTIVATION_BITS}], got {bits}")
  bits = int(bits)
  if signed:
    if bits < 2:
      raise ValueError("a signed activation code needs at least 2 bits")
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
  return 0, 2**bits - 1


def quantize_activations(x: jax.Array, *, bits: int, scale, signed: bool = True) -> jax.Array:
  """Fake-quantizes activations to `bits`-bit integers times `scale` (straight-through).

  Forward: `scale * clip(floor(x / scale + 1/2), lo, hi)` with
  `lo, hi = activation_range(bits, signed)` (round half up, as the integer
  path's rounding right shift does). Backward: the identity for inputs inside
  `[lo, hi] * scale`, zero outside (the clipped straight-through estimator);
  no gradient reaches `scale`.

  Args:
    x: activations (any float dtype).
    bits: code width; 0 returns `x` unchanged.
    scale: positive scalar (or broadcastable array) step of the grid; the
      integer path uses powers of two.
    signed: signed codes (two's complement range) or unsigned ones (for
      non-negative inputs such as ReLU outputs).

  Returns:
    An array like `x`.

  Example:
    >>> import jax.numpy as jnp, fq_jax as fq
    >>> fq.quantize_activations(jnp.array([0.3, -0.2, 9.0]), bits=4, scale=0.25)
    Array([ 0.25, -0.25,  1.75], dtype=float32)
  """
  if not bits:
    return x
  lo, hi = activation_range(bits, signed)
  # float64 inputs (an exact reference simulation) stay float64; others compute in float32.
  dt = jnp.float64 if jnp.asarray(x).dtype == jnp.float64 else jnp.float32
  x32 = jnp.asarray(x, dt)
  scale = jnp.asarray(scale, dt)
  v = x32 / scale
  q = jnp.clip(jnp.floor(v + 0.5), lo, hi) * scale
  inside = (v >= lo) & (v <= hi)
  through = (x32 - jax.lax.stop_gradient(x32)) * inside
  return (jax.lax.stop_gradient(q) + through).astype(jnp.asarray(x).dtype)


def scale_exponent(clip: float, *, bits: int, signed: bool, rounding: str = "ceil") -> int:
  """Exponent of the power-of-two scale that maps `clip` to the top code.

  Args:
    clip: the largest magnitude to represent (e.g. a percentile of |x|).
    bits: code width.
    signed: code signedness (the top code is 2^(bits-1) - 1 or 2^bits - 1).
    rounding: "ceil" (no value below `clip` clips; up to 2x coarser steps)
      or "nearest" (nearest power of two on a log scale).

  Returns:
    The integer exponent; 0 for a non-positive or non-finite `clip`.
  """
  _, hi = activation_range(bits, signed)
  clip = float(clip)
  if not (clip > 0 and math.isfinite(clip)):
    return 0
  ratio = clip / hi
  if rounding == "ceil":
    f, e = math.frexp(ratio)  # ratio = f 2^e, f in [0.5, 1)
    return e - 1 if f == 0.5 else e
  if rounding == "nearest":
    return int(round(math.log2(ratio)))
  raise ValueError(f"rounding must be 'ceil' or 'nearest', got {rounding!r}")


def _module_path(module: nn.Module) -> str:
  return "/".join(str(p) for p in module.path)


def _is_layer(module) -> bool:
  return isinstance(module, (nn.Conv, nn.Dense))


_HIST_PER_OCTAVE = 16
_HIST_OCTAVES = 128  # |x| from 2^-64 to 2^64


def _log_histogram(a):
  """Counts of |a| > 0 in 1/16-octave bins of log2|a| over [-64, 64) (int32)."""
  a = jnp.abs(jnp.asarray(a, jnp.float32)).reshape(-1)
  f, e = _frexp(jnp.where(a > 0, a, 1.0), jnp)  # a = f 2^e, f in [0.5, 1)
  sub = jnp.clip(
    jnp.floor(jnp.log2(2 * f) * _HIST_PER_OCTAVE).astype(jnp.int32), 0, _HIST_PER_OCTAVE - 1
  )
  n = _HIST_PER_OCTAVE * _HIST_OCTAVES
  b = jnp.clip((e - 1 + _HIST_OCTAVES // 2) * _HIST_PER_OCTAVE + sub, 0, n - 1)
  return jnp.zeros(n, jnp.int32).at[b].add((a > 0).astype(jnp.int32))


def _histogram_percentile(hist: np.ndarray, percentile: float) -> float:
  """Upper edge of the bin holding the `percentile` of the histogrammed |x|."""
  total = int(hist.sum())
  if total == 0:
    return 0.0
  rank = math.ceil(total * percentile / 100.0)
  b = int(np.searchsorted(np.cumsum(hist), max(rank, 1)))
  return math.ldexp(
    2.0 ** ((b % _HIST_PER_OCTAVE + 1) / _HIST_PER_OCTAVE),
    b // _HIST_PER_OCTAVE - _HIST_OCTAVES // 2,
  )


def calibrate_activations(
  model: nn.Module,
  variables,
  batches: Iterable,
  *,
  bits: int,
  method: str = "percentile",
  percentile: float = 99.99,
  rounding: str = "ceil",
  apply_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, ActivationScale]:
  """Power-of-two input scales of every convolution and dense layer, from data.

  Runs the model in inference mode on `batches` and records, per layer input,
  the largest magnitude (method "max") or a histogram of log2|x| in
  1/16-octave bins over all batches (method "percentile": the clip value is
  the upper edge of the bin holding the `percentile` of |x|), and whether any
  input was negative (then the codes are signed, else unsigned). The scale
  is 2^`scale_exponent(clip)`. The paper does not say how its activation
  scales were chosen (OPEN): the 99.99th percentile with "ceil" rounding is
  this project's default.

  Args:
    model: a Flax model whose layers are `nn.Conv` / `nn.Dense`.
    variables: its variables (typically with quantized weights).
    batches: iterable of input arrays or of dicts with an "image" entry.
    bits: activation code width.
    method: "max" or "percentile".
    percentile: in (0, 100], for method "percentile".
    rounding: see `scale_exponent`.
    apply_kwargs: extra `model.apply` arguments (default {"train": False}).

  Returns:
    {module path: ActivationScale}, e.g. {"conv1": ActivationScale(-7, False)}.
  """
  if method not in ("max", "percentile"):
    raise ValueError(f"method must be 'max' or 'percentile', got {method!r}")
  if not 0 < percentile <= 100:
    raise ValueError(f"percentile must be in (0, 100], got {percentile}")
  kwargs = dict(apply_kwargs or {"train": False})

  def stats(variables, x):
    out = {}

    def record(next_fun, args, kw, context):
      if context.method_name == "__call__" and _is_layer(context.module):
        a = args[0]
        summary = _log_histogram(a) if method == "percentile" else jnp.zeros((), jnp.int32)
        out[_module_path(context.module)] = (summary, jnp.max(jnp.abs(a)), jnp.min(a))
      return next_fun(*args, **kw)

    with nn.intercept_methods(record):
      model.apply(variables, x, **kwargs)
    return out

  stats = jax.jit(stats)
  hists: dict[str, Any] = {}
  maxs: dict[str, float] = {}
  mins: dict[str, float] = {}
  for batch in batches:
    x = batch["image"] if isinstance(batch, Mapping) else batch
    for path, (hist, hi, lo) in jax.device_get(stats(variables, x)).items():
      hists[path] = np.asarray(hist, np.int64) + hists.get(path, 0)
      maxs[path] = max(maxs.get(path, 0.0), float(hi))
      mins[path] = min(mins.get(path, math.inf), float(lo))
  if not maxs:
    raise ValueError("calibrate_activations: no batches")
  out = {}
  for path, hi in maxs.items():
    clip = hi if method == "max" else min(hi, _histogram_percentile(hists[path], percentile))
    signed = mins[path] < 0
    out[path] = ActivationScale(
      scale_exponent(clip, bits=bits, signed=signed, rounding=rounding), signed
    )
  return out


# ----------------------------------------------------------------------------
# Batch-norm folding and the integer requantization
# ----------------------------------------------------------------------------


def bn_affine(gamma, beta, mean, var, eps, *, xp=jnp):
  """Inference batch norm as y = G * x + H, in float32.

  Returns (G, (beta, -mean * G)): G = gamma / sqrt(var + eps), and H as the
  two terms beta and -mean G, which `fold_requant` rounds separately to the
  integer grid and adds (so no multiply-add is involved, whose rounding
  would depend on whether the compiler fuses it: the numpy and XLA
  evaluations agree bit for bit).
  """
  gamma, beta, mean, var = (xp.asarray(a, xp.float32) for a in (gamma, beta, mean, var))
  root = xp.sqrt(var + xp.asarray(eps, xp.float32))
  if xp is jnp:
    # Keeps XLA from rewriting x / sqrt(y) as x * rsqrt(y) (not correctly rounded).
    root = jax.lax.optimization_barrier(root)
  g = gamma / root
  return g, (beta, -(mean * g))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FoldedBN:
  """The integer batch norm of one layer: y_c = 2^-r_c (ka_c A_c + km_c M_c + c_c).

  All fields are per output channel; ka, km, c hold integers (as float32 in
  the simulation, int64 in the integer path) and r is int32.
  """

  ka: Any
  km: Any
  c: Any
  r: Any


def _pow2(n):
  """2^n as float32 for integer n in [-126, 127], built from its bits (exact, cheap to compile)."""
  n = jnp.asarray(n, jnp.int32)
  return jax.lax.bitcast_convert_type(jnp.left_shift(n + 127, 23), jnp.float32)


def _ldexp(x, n, xp):
  """x 2^n (exact for normal results); numpy's ldexp, or two power-of-two multiplies in jax.

  jnp.ldexp / jnp.frexp are general but expand to many operations, which
  makes a network-sized simulation slow to compile.
  """
  if xp is np:
    return np.ldexp(x, n)
  n = jnp.clip(jnp.asarray(n, jnp.int32), -252, 254)
  half = n // 2
  return x * _pow2(half) * _pow2(n - half)


def _frexp(x, xp):
  """(f, e) with x = f 2^e, f in [0.5, 1), for normal positive float32 x."""
  if xp is np:
    f, e = np.frexp(x)
    return f, e.astype(np.int32)
  bits = jax.lax.bitcast_convert_type(jnp.asarray(x, jnp.float32), jnp.int32)
  e = jnp.right_shift(bits, 23) & 0xFF
  # x > 0, so the sign bit is clear: keep the mantissa, set the exponent to that of 0.5.
  f = jax.lax.bitcast_convert_type((bits & 0x007FFFFF) | (126 << 23), jnp.float32)
  return f, e - 126


def fold_requant(k_a, k_m, h, exp_a, exp_m, bits: int, *, xp=jnp) -> FoldedBN:
  """Quantizes a folded batch norm to `bits`-bit integer multipliers (float32).

  The layer computes y_c = k_a[c] 2^exp_a A_c + k_m[c] 2^exp_m M_c + h[c]
  with integer accumulators A and M (see the module docstring: k_a = G alpha
  sigma, k_m = G alpha, exp_a = ex - b, exp_m = ex - q). Per channel r_c is
  the largest shift such that both |round(k_a 2^(exp_a + r))| and
  |round(k_m 2^(exp_m + r))| fit in a signed `bits`-bit integer (capped at
  MAX_REQUANT_SHIFT, and so that |c| < 2^41); the offset is c = round(h 2^r),
  or the float32 sum of the rounded terms when h is a tuple of terms (as
  `bn_affine` returns it).
  Every step is exact or correctly rounded float32 arithmetic, so the
  numpy (`xp=np`, the integer path) and the jax (`xp=jnp`, traceable, the
  simulation) evaluations agree bit for bit on the same inputs.

  Args:
    k_a, k_m: float32 (C,) arrays.
    h: float32 (C,) array, or a tuple of such terms adding up to h.
    exp_a, exp_m: integer exponents of the accumulators' units.
    bits: multiplier width (2..24).
    xp: jax.numpy or numpy.

  Returns:
    `FoldedBN` of float32 integer-valued ka, km, c and int32 r.
  """
  if not 2 <= int(bits) <= MAX_BN_BITS:
    raise ValueError(f"bn_bits must be in [2, {MAX_BN_BITS}], got {bits}")
  f32, i32 = xp.float32, xp.int32
  limit = 2.0 ** (bits - 1) - 1
  m_a = _ldexp(xp.asarray(k_a, f32), xp.asarray(exp_a, i32), xp)
  m_m = _ldexp(xp.asarray(k_m, f32), xp.asarray(exp_m, i32), xp)
  terms = [xp.asarray(t, f32) for t in (h if isinstance(h, (tuple, list)) else (h,))]
  h = terms[0] if len(terms) == 1 else xp.maximum(*(xp.abs(t) for t in terms[:2]))
  for t in terms[2:]:
    h = xp.maximum(h, xp.abs(t))
  one = xp.ones_like(h)
  big = xp.maximum(xp.abs(m_a), xp.abs(m_m))
  big = xp.where(big > 0, big, xp.abs(h))
  f, e = _frexp(xp.where(big > 0, big, one), xp)  # big = f 2^e, f in [0.5, 1)
  # big 2^r = f 2^(e + r) rounds to at most `limit` when f 2^(bits-1) < limit + 1/2.
  r = (bits - 1) - e - (f * f32(2.0 ** (bits - 1)) >= limit + 0.5).astype(i32)
  _, he = _frexp(xp.where(h != 0, xp.abs(h), one), xp)
  r = xp.minimum(r, xp.where(h != 0, 40 - he, MAX_REQUANT_SHIFT))
  r = xp.minimum(r, MAX_REQUANT_SHIFT).astype(i32)
  ka = xp.round(_ldexp(m_a, r, xp)).astype(f32)
  km = xp.round(_ldexp(m_m, r, xp)).astype(f32)
  c = xp.round(_ldexp(terms[0], r, xp)).astype(f32)
  for t in terms[1:]:
    c = c + xp.round(_ldexp(t, r, xp)).astype(f32)
  return FoldedBN(ka=ka, km=km, c=c, r=r)


def folded_values(fold: FoldedBN, exp_a, exp_m):
  """The float multipliers and offset the integer batch norm applies: (qa, qm, qc).

  y = qa * T_A + qm * T_M + qc where T_A = 2^exp_a A and T_M = 2^exp_m M are
  the two parts of the convolution in real units (exact in float32).
  """
  r = jnp.asarray(fold.r, jnp.int32)
  return (
    _ldexp(fold.ka, -r - jnp.asarray(exp_a, jnp.int32), jnp),
    _ldexp(fold.km, -r - jnp.asarray(exp_m, jnp.int32), jnp),
    _ldexp(fold.c, -r, jnp),
  )


# ----------------------------------------------------------------------------
# Weight planes and the float simulation (fake quantization)
# ----------------------------------------------------------------------------


def _power_exponent(mu: float) -> int | None:
  """p with |mu| = 2^p (mu a power of two), None for 0."""
  mu = float(mu)
  if mu == 0.0:
    return None
  f, e = math.frexp(abs(mu))
  if f != 0.5:
    raise ValueError(f"component mean {mu!r} is not a power of two")
  return e - 1


def means_offset(means) -> int:
  """q = -min(p_-, p_+) over the non-zero means (0 when both are 0)."""
  ps = [
    p
    for p in (_power_exponent(m) for m in np.asarray(means, np.float32).reshape(-1))
    if p is not None
  ]
  return -min(ps) if ps else 0


def _means_offset_traced(means):
  """`means_offset` for traced means."""
  means = jnp.abs(jnp.asarray(means, jnp.float32))
  _, e = jnp.frexp(jnp.where(means > 0, means, 1.0))
  p = jnp.where(means > 0, e - 1, jnp.iinfo(jnp.int32).max)
  lowest = jnp.min(p)
  return jnp.where(lowest == jnp.iinfo(jnp.int32).max, 0, -lowest).astype(jnp.int32)


def mean_plane(state: quantizers.FocusState):
  """mu_m per weight (0 for pruned weights and shift layers), float32."""
  rec = jnp.asarray(state.recentralized, bool)
  means = jnp.asarray(state.means, jnp.float32)
  mu = jnp.where(jnp.asarray(state.assignment, bool), means[1], means[0])
  return jnp.where(jnp.asarray(state.mask, bool) & rec, mu, 0.0)


def weight_parts(kernel, state: quantizers.FocusState):
  """(alpha, sigma, S, MU) with kernel = alpha * (sigma * S + MU).

  S is the shift-code value s 2^(e - b) of quantized weights (exactly, when
  the kernel is fully quantized) and MU the per-weight mean (0 for a shift
  layer, whose sigma is 1).
  """
  alpha = jnp.asarray(state.alpha, jnp.float32)
  rec = jnp.asarray(state.recentralized, bool)
  sigma = jnp.where(rec, jnp.asarray(state.sigma, jnp.float32), 1.0)
  mu = mean_plane(state)
  w = jnp.asarray(kernel, jnp.float32)
  approx = (w / alpha - mu) / sigma
  # A quantized weight's S is exactly its shift value s 2^(e - b): take it from
  # the nearest symbol when that symbol decodes to the very same weight (the
  # others, e.g. not yet quantized INQ weights, keep the approximate S).
  sym = quantizers.focused_symbols(w / alpha, state)
  k = quantizers.exponent_bits(state)
  per = quantizers.num_shift_symbols(k)
  code = jnp.where(rec & (sym >= per), sym - per, sym)
  exact = quantizers.shift_values(code, k, state.bias)
  same = quantizers.focused_values(sym, state) == w
  s = jnp.where(same, exact, approx)
  s = jnp.where(jnp.asarray(state.mask, bool), s, 0.0)
  return alpha, sigma, s, mu


class WeightParts(NamedTuple):
  """A focused kernel split as kernel = alpha * (sigma * s_plane + mu), with its code parameters.

  `apply_quantized` accepts these in place of FocusStates (precomputed on the
  host: a lighter graph to compile). Build them with `weight_parts_from_symbols`.
  """

  alpha: Any
  sigma: Any
  s_plane: Any
  mu: Any
  recentralized: bool
  bias: int
  q: int


def weight_parts_from_symbols(symbols, state: quantizers.FocusState) -> WeightParts:
  """Exact `WeightParts` (numpy) of a focused kernel from its symbols."""
  s, e, m = decode_symbols(symbols, state)
  mask = np.asarray(state.mask, bool)
  rec = bool(np.asarray(state.recentralized))
  b = int(np.asarray(state.bias))
  s_plane = np.where(mask, np.ldexp(s.astype(np.float32), (e - b).astype(np.int32)), 0.0)
  means = np.asarray(state.means, np.float32).reshape(-1)
  mu = np.where(mask & rec, np.where(m, means[1], means[0]), 0.0).astype(np.float32)
  return WeightParts(
    alpha=np.float32(np.asarray(state.alpha)),
    sigma=np.float32(np.asarray(state.sigma)) if rec else np.float32(1.0),
    s_plane=s_plane.astype(np.float32),
    mu=mu,
    recentralized=rec,
    bias=b,
    q=means_offset(means) if rec else 0,
  )


def focus_by_module(focus) -> dict[str, quantizers.FocusState]:
  """{module path: FocusState} from a DecodedModel.focus mapping or an FQState.focus tree.

  Accepts keys like 'params/conv1/kernel', 'conv1/kernel' or a nested tree
  mirroring the parameters; keeps the states of '.../kernel' leaves.
  """
  if focus is None:
    return {}
  out = {}
  if isinstance(focus, Mapping) and all(isinstance(k, str) and "/" in k for k in focus) and focus:
    items = list(focus.items())
  else:
    leaves = jax.tree_util.tree_leaves_with_path(
      focus, is_leaf=lambda x: x is None or isinstance(x, (quantizers.FocusState, WeightParts))
    )
    from fq_jax._src import rules as rules_lib

    items = [(rules_lib.path_str(p), v) for p, v in leaves]
  for key, state in items:
    if not isinstance(state, (quantizers.FocusState, WeightParts)):
      continue
    parts = key.split("/")
    if parts[-1] != "kernel":
      continue
    parts = parts[:-1]
    if parts and parts[0] == "params":
      parts = parts[1:]
    out["/".join(parts)] = state
  return out


class _SimState(threading.local):
  def __init__(self):
    self.bypass = False


_SIM = _SimState()


@contextlib.contextmanager
def _bypass():
  old = _SIM.bypass
  _SIM.bypass = True
  try:
    yield
  finally:
    _SIM.bypass = old


def _apply_layer(module, x, kernel):
  """`module`'s convolution / matmul of `x` with another kernel and no bias."""
  clone = module.clone(parent=None, use_bias=False)
  with _bypass():
    return clone.apply({"params": {"kernel": kernel}}, x)


def apply_quantized(
  model: nn.Module,
  variables,
  x,
  *,
  activation_bits: int = 0,
  activation_scales: Mapping[str, Any] | None = None,
  bn_bits: int = 0,
  focus=None,
  **apply_kwargs,
):
  """`model.apply` with integer-activation and integer-batch-norm simulation.

  The float ("fake-quantized") counterpart of the integer path:

  * every `nn.Conv` / `nn.Dense` whose module path has an entry in
    `activation_scales` gets its input through `quantize_activations`
    (straight-through in training);
  * with `bn_bits > 0`, in inference mode (`train=False`), each focused layer
    (one with a `FocusState` in `focus`) is split into its two parts
    T_A = conv(x, S) and T_M = conv(x, MU) (`weight_parts`) and the batch
    norm that reads it (or, for a dense layer with a bias, the bias) is
    replaced by the integer batch norm of `fold_requant`, applied as
    qa * T_A + qm * T_M + qc (`folded_values`). A batch norm after a layer
    without a FocusState is folded alone (k_a = G, exp 0).

  Args:
    model: the Flax model.
    variables: its variables (weights already quantized, e.g. by
      `fq.quantized` or decoded from a file).
    x: the input batch.
    activation_bits: activation code width (0: no activation quantization).
    activation_scales: {module path: ActivationScale or its JSON}.
    bn_bits: integer batch-norm multiplier width (0: float batch norm).
    focus: FocusStates of the quantized kernels (DecodedModel.focus or an
      FQState.focus tree), or `WeightParts`; needed for the exact batch-norm
      simulation.
    **apply_kwargs: passed to `model.apply` (train=, mutable=, rngs=).

  Returns:
    What `model.apply` returns.
  """
  scales = parse_activation_scales(activation_scales) if activation_bits else {}
  states = focus_by_module(focus) if bn_bits else {}
  train = bool(apply_kwargs.get("train", False))
  fold_bn = bool(bn_bits) and not train
  stash: dict[int, tuple] = {}  # id(conv output) -> (output, its two parts and units)

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if _SIM.bypass or context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    if _is_layer(module):
      path = _module_path(module)
      x = args[0]
      act = scales.get(path)
      ex = 0
      if act is not None:
        x = quantize_activations(x, bits=activation_bits, scale=act.scale, signed=act.signed)
        ex = act.exponent
      state = states.get(path)
      if not fold_bn or state is None:
        return next_fun(x, *args[1:], **kwargs)
      if isinstance(state, WeightParts):
        alpha, sigma, s_plane, mu = (jnp.asarray(a) for a in state[:4])
        rec, b, q = state.recentralized, state.bias, state.q
      else:
        kernel = module.variables["params"]["kernel"]
        alpha, sigma, s_plane, mu = weight_parts(kernel, state)
        rec = jnp.asarray(state.recentralized, bool)
        b = jnp.asarray(state.bias, jnp.int32)
        q = jnp.where(rec, _means_offset_traced(state.means), 0)
      t_a = _apply_layer(module, x, s_plane)
      if rec is False:
        t_m = jnp.zeros_like(t_a)
      else:
        t_m = _apply_layer(module, x, mu)  # zeros for a shift layer (mu = 0)
      z = alpha * (sigma * t_a + t_m)
      info = (t_a, t_m, alpha * sigma, jnp.where(rec, alpha, 0.0), ex - b, ex - q)
      if module.use_bias:
        bias = module.variables["params"]["bias"]
        one = jnp.ones_like(bias, jnp.float32)
        return _requant_sim(info, one, bias, bn_bits).astype(z.dtype)
      stash[id(z)] = (z, info)  # the reference keeps the id from being reused
      return z
    if isinstance(module, nn.BatchNorm) and fold_bn:
      use_ra = kwargs.get("use_running_average", module.use_running_average)
      if not use_ra:
        return next_fun(*args, **kwargs)
      y_in = args[0]
      p = module.variables["params"]
      st = module.variables["batch_stats"]
      c = y_in.shape[-1]
      gamma = p["scale"] if module.use_scale else jnp.ones((c,), jnp.float32)
      beta = p["bias"] if module.use_bias else jnp.zeros((c,), jnp.float32)
      g, h = bn_affine(gamma, beta, st["mean"], st["var"], module.epsilon)
      paired = stash.get(id(y_in))
      info = paired[1] if paired is not None and paired[0] is y_in else None
      if info is None:
        info = (y_in, jnp.zeros((), y_in.dtype), jnp.float32(1.0), jnp.float32(0.0), 0, 0)
      return _requant_sim(info, g, h, bn_bits).astype(y_in.dtype)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    return model.apply(variables, x, **apply_kwargs)


def _requant_sim(info, g, h, bits):
  t_a, t_m, k_a, k_m, exp_a, exp_m = info
  fold = fold_requant(g * k_a, g * k_m, h, exp_a, exp_m, bits)
  qa, qm, qc = folded_values(fold, exp_a, exp_m)
  return qa * t_a + qm * t_m + qc


class QuantizedActivationsModel:
  """A model whose `apply` / `init` run through `apply_quantized` (duck-types `nn.Module.apply`).

  For training loops that call `model.apply(variables, x, train=..., mutable=...)`:
  the activation quantization (straight-through) and, in inference mode, the
  batch-norm simulation follow the settings given here. `focus` may be set
  later (`with_focus`) since it changes during training.
  """

  def __init__(
    self, model: nn.Module, *, activation_bits: int, activation_scales, bn_bits: int = 0, focus=None
  ):
    self.model = model
    self.activation_bits = int(activation_bits)
    self.activation_scales = parse_activation_scales(activation_scales)
    self.bn_bits = int(bn_bits)
    self.focus = focus

  def with_focus(self, focus) -> "QuantizedActivationsModel":
    return QuantizedActivationsModel(
      self.model,
      activation_bits=self.activation_bits,
      activation_scales=self.activation_scales,
      bn_bits=self.bn_bits,
      focus=focus,
    )

  def apply(self, variables, *args, **kwargs):
    return apply_quantized(
      self.model,
      variables,
      *args,
      activation_bits=self.activation_bits,
      activation_scales=self.activation_scales,
      bn_bits=self.bn_bits,
      focus=self.focus,
      **kwargs,
    )

  def init(self, *args, **kwargs):
    return self.model.init(*args, **kwargs)

  def __getattr__(self, name):
    if name == "model":  # not yet set (e.g. while unpickling)
      raise AttributeError(name)
    return getattr(self.model, name)


# ----------------------------------------------------------------------------
# Shift-add layers
# ----------------------------------------------------------------------------


def decode_symbols(symbols, state: quantizers.FocusState):
  """(s, e, m) per weight from `fq.focused_symbols` codes (numpy int arrays).

  s in {-1, 0, +1} is the shift code's sign (0 also for pruned weights), e
  its exponent in [0, 2^k - 1] and m the component (1 = means[1]; 0 for a
  shift layer).
  """
  sym = np.asarray(symbols, np.int64)
  rec = bool(np.asarray(state.recentralized))
  bits = int(np.asarray(state.bits))
  k = bits - 3 if rec else bits - 2
  per = 2 ** (k + 1) + 1
  m = (sym >= per) if rec else np.zeros(sym.shape, bool)
  code = np.where(m, sym - per, sym)
  half = 2**k
  nonzero = code > 0
  negative = code > half
  e = np.where(negative, code - 1 - half, code - 1)
  s = np.where(nonzero, np.where(negative, -1, 1), 0)
  return s.astype(np.int32), np.where(nonzero, e, 0).astype(np.int32), m


@dataclasses.dataclass(frozen=True)
class ShiftAddLayer:
  """A focused-quantized convolution or dense layer as per-output-channel tap lists.

  Attributes:
    path: module path (e.g. "stage1_block0/conv1").
    kind: "conv" or "dense".
    kernel_shape: (Kh, Kw, Cin/groups, Cout) or (Din, Dout).
    strides, padding, groups: convolution geometry (NHWC, explicit padding).
    idx: (Cout, T) int32 row of the im2col patch matrix read by each tap
      (patch rows are ordered (kh, kw, cin)).
    e: (Cout, T) int32 shift amounts of the A accumulator.
    s: (Cout, T) int32 signs in {-1, 0, +1} (0: the tap only feeds M, or padding).
    m: (Cout, T) int32 component of a kept tap (0 or 1), -1 for padding.
    recentralized: whether M is used.
    bias: the shift code's bias b (A's unit is 2^-b).
    mean_signs, mean_shifts: sgn_c and p_c + q per component.
    q: the offset q (M's unit is 2^-q).
    alpha, sigma: float32 scalars (sigma is 1 for a shift layer).
    kept: (Cout,) kept weights per output channel; nonzero: (Cout,) with s != 0;
      shifted: (Cout,) with s != 0 and e > 0.
  """

  path: str
  kind: str
  kernel_shape: tuple
  strides: tuple
  padding: tuple
  groups: int
  idx: np.ndarray
  e: np.ndarray
  s: np.ndarray
  m: np.ndarray
  recentralized: bool
  bias: int
  mean_signs: tuple
  mean_shifts: tuple
  q: int
  alpha: np.float32
  sigma: np.float32
  kept: np.ndarray
  nonzero: np.ndarray
  shifted: np.ndarray

  @property
  def out_features(self) -> int:
    return int(self.kernel_shape[-1])

  @property
  def max_shift(self) -> int:
    return int(self.e.max(initial=0))

  def accumulator_bound(self, max_code: int) -> int:
    """An upper bound of |A| and |M| for inputs with |X| <= max_code."""
    wa = np.where(self.s != 0, np.left_shift(np.int64(1), self.e.astype(np.int64)), 0).sum(axis=1)
    bound = int(wa.max(initial=0)) * max_code
    if self.recentralized:
      bound = max(
        bound,
        int(self.kept.max(initial=0)) * max_code * (1 << max(self.mean_shifts, default=0)) * 2,
      )
    return bound


def prepare_layer(
  symbols,
  state: quantizers.FocusState,
  *,
  path: str = "",
  kind: str = "conv",
  strides=(1, 1),
  padding=((0, 0), (0, 0)),
  groups: int = 1,
) -> ShiftAddLayer:
  """Builds the tap lists of a focused layer from its symbols and FocusState.

  Args:
    symbols: int symbols of the kernel (`DecodedModel.symbols[path]` or
      `fq.focused_symbols(w, state)`), 0 where pruned.
    state: the layer's FocusState (mask, assignment, means, sigma, bias, alpha).
    path: a name for messages and op counts.
    kind: "conv" (HWIO kernel) or "dense" ((in, out) kernel).
    strides, padding, groups: convolution geometry (ignored for dense).

  Returns:
    The `ShiftAddLayer`.
  """
  sym = np.asarray(symbols)
  mask = np.asarray(state.mask, bool)
  if sym.shape != mask.shape:
    raise ValueError(f"{path}: symbols {sym.shape} and mask {mask.shape} differ in shape")
  s, e, m = decode_symbols(sym, state)
  s = np.where(mask, s, 0)
  rec = bool(np.asarray(state.recentralized))
  if kind == "conv":
    if sym.ndim != 4:
      raise ValueError(f"{path}: a convolution kernel must be HWIO, got shape {sym.shape}")
    kh, kw, cin_g, cout = sym.shape
    if cout % groups:
      raise ValueError(f"{path}: {cout} output channels do not split into {groups} groups")
    cin = cin_g * groups
    group = np.arange(cout) // (cout // groups)  # (Cout,)
    tap = np.arange(kh * kw)[:, None, None]
    ci = np.arange(cin_g)[None, :, None]
    rows = tap * cin + group[None, None, :] * cin_g + ci  # (taps, cin_g, Cout)
    rows = rows.reshape(kh * kw * cin_g, cout)
    flat = lambda a: a.reshape(kh * kw * cin_g, cout)
  elif kind == "dense":
    if sym.ndim != 2:
      raise ValueError(f"{path}: a dense kernel must be (in, out), got shape {sym.shape}")
    rows = np.broadcast_to(np.arange(sym.shape[0])[:, None], sym.shape)
    flat = lambda a: a
    groups = 1
  else:
    raise ValueError(f"kind must be 'conv' or 'dense', got {kind!r}")
  keep = flat(mask)  # (K_local, Cout)
  kept = keep.sum(axis=0)
  t = max(int(kept.max(initial=0)), 1)
  cout = keep.shape[1]
  idx = np.zeros((cout, t), np.int32)
  ee = np.zeros((cout, t), np.int32)
  ss = np.zeros((cout, t), np.int32)
  mm = np.full((cout, t), -1, np.int32)
  fs, fe, fm, frows = flat(s), flat(e), flat(m), np.asarray(rows)
  for c in range(cout):
    where = np.nonzero(keep[:, c])[0]
    n = where.size
    idx[c, :n] = frows[where, c]
    ee[c, :n] = fe[where, c]
    ss[c, :n] = fs[where, c]
    mm[c, :n] = fm[where, c] if rec else 0
  means = np.asarray(state.means, np.float32).reshape(-1)
  q = means_offset(means) if rec else 0
  signs, shifts = [], []
  for mu in means:
    p = _power_exponent(mu) if rec else None
    signs.append(0 if p is None else (1 if mu > 0 else -1))
    shifts.append(0 if p is None else p + q)
  return ShiftAddLayer(
    path=path,
    kind=kind,
    kernel_shape=tuple(sym.shape),
    strides=tuple(strides),
    padding=tuple(tuple(p) for p in padding),
    groups=int(groups),
    idx=idx,
    e=ee,
    s=ss,
    m=mm,
    recentralized=rec,
    bias=int(np.asarray(state.bias)),
    mean_signs=tuple(signs),
    mean_shifts=tuple(shifts),
    q=q,
    alpha=np.float32(np.asarray(state.alpha)),
    sigma=np.float32(np.asarray(state.sigma)) if rec else np.float32(1.0),
    kept=kept.astype(np.int64),
    nonzero=(ss != 0).sum(axis=1).astype(np.int64),
    shifted=((ss != 0) & (ee > 0)).sum(axis=1).astype(np.int64),
  )


def im2col(x, kernel_hw, strides, padding):
  """Patch matrix (Kh*Kw*C, N*Ho*Wo) of integer NHWC `x` (rows ordered (kh, kw, c)).

  Only data movement (pad, strided slices, transpose). Returns (patches,
  (N, Ho, Wo)).
  """
  n, h, w, c = x.shape
  kh, kw = kernel_hw
  sh, sw = strides
  (pt, pb), (pl, pr) = padding
  xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  ho = (h + pt + pb - kh) // sh + 1
  wo = (w + pl + pr - kw) // sw + 1
  taps = [
    xp[:, i : i + sh * (ho - 1) + 1 : sh, j : j + sw * (wo - 1) + 1 : sw, :]
    for i in range(kh)
    for j in range(kw)
  ]
  t = jnp.stack(taps, axis=0)  # (taps, N, Ho, Wo, C)
  t = jnp.transpose(t, (0, 4, 1, 2, 3))  # (taps, C, N, Ho, Wo)
  return t.reshape(kh * kw * c, n * ho * wo), (n, ho, wo)


def shift_add(layer: ShiftAddLayer, codes, *, acc_dtype=jnp.int32):
  """The accumulators (A, M) of a shift-add layer: integer shifts and adds only.

  Args:
    layer: the prepared layer.
    codes: integer input codes, NHWC for a convolution, (N, Din) for dense.
    acc_dtype: int32, or int64 (inside `jax.enable_x64`) when
      `layer.accumulator_bound` may exceed 2^31.

  Returns:
    (A, M), each (N, Ho, Wo, Cout) or (N, Cout) of `acc_dtype`; M is zeros
    for a shift layer. A = sum_i s_i (X_i << e_i) and
    M = sum_c sgn_c (S_c << (p_c + q)) as in the module docstring.
  """
  codes = jnp.asarray(codes, acc_dtype)
  if layer.kind == "conv":
    kh, kw = layer.kernel_shape[:2]
    patches, (n, ho, wo) = im2col(codes, (kh, kw), layer.strides, layer.padding)
    out_shape = (n, ho, wo)
  else:
    patches = codes.T
    out_shape = (codes.shape[0],)
  cout, p = layer.out_features, patches.shape[1]
  idx, e, s, m = (jnp.asarray(a) for a in (layer.idx, layer.e, layer.s, layer.m))
  e = e.astype(acc_dtype)
  zero = jnp.zeros((cout, p), acc_dtype)

  def step(carry, cols):
    a, s0, s1 = carry
    i, ei, si, mi = cols
    g = patches[i]  # (Cout, P): one input row per output channel (a gather)
    shifted = jnp.left_shift(g, ei[:, None])
    a = a + jnp.where(si[:, None] > 0, shifted, zero) - jnp.where(si[:, None] < 0, shifted, zero)
    if layer.recentralized:
      s0 = s0 + jnp.where(mi[:, None] == 0, g, zero)
      s1 = s1 + jnp.where(mi[:, None] == 1, g, zero)
    return (a, s0, s1), None

  (a, s0, s1), _ = jax.lax.scan(step, (zero, zero, zero), (idx.T, e.T, s.T, m.T))
  mm = zero
  if layer.recentralized:
    for sc, sign, shift in (
      (s0, layer.mean_signs[0], layer.mean_shifts[0]),
      (s1, layer.mean_signs[1], layer.mean_shifts[1]),
    ):
      term = jnp.left_shift(sc, jnp.asarray(shift, acc_dtype))
      mm = mm + term if sign > 0 else (mm - term if sign < 0 else mm)

  def back(v):
    return jnp.moveaxis(v.reshape(cout, *out_shape), 0, -1)

  return back(a), back(mm)


def integer_weights(layer: ShiftAddLayer):
  """Dense integer kernels (WA, WM) with A = conv(X, WA), M = conv(X, WM) (numpy int64).

  WA = s 2^e, WM = sgn_m 2^(p_m + q) on kept weights: the reference the
  shift-add evaluation is tested against (with an ordinary convolution).
  """
  shape = layer.kernel_shape
  cout = shape[-1]
  wa = np.zeros(shape, np.int64).reshape(-1, cout)
  wm = np.zeros_like(wa)
  if layer.kind == "conv":
    kh, kw, cin_g, _ = shape
    cin = cin_g * layer.groups
    group = np.arange(cout) // (cout // layer.groups)
  for c in range(cout):
    valid = layer.m[c] >= 0
    rows = layer.idx[c][valid]
    if layer.kind == "conv":
      tap, rest = np.divmod(rows, cin)
      local = tap * cin_g + (rest - group[c] * cin_g)
    else:
      local = rows
    wa[local, c] = layer.s[c][valid] * (np.int64(1) << layer.e[c][valid].astype(np.int64))
    if layer.recentralized:
      comp = layer.m[c][valid]
      sgn = np.asarray(layer.mean_signs, np.int64)[comp]
      sh = np.asarray(layer.mean_shifts, np.int64)[comp]
      wm[local, c] = sgn * (np.int64(1) << sh)
  return wa.reshape(shape), wm.reshape(shape)


def layer_fold(layer: ShiftAddLayer, g, h, *, input_exponent: int, bits: int) -> FoldedBN:
  """`fold_requant` (numpy) for a shift-add layer followed by the affine map y = g z + h.

  Forms the same float32 products as `apply_quantized`: k_a = g * (alpha *
  sigma), k_m = g * alpha (0 for a shift layer).
  """
  g = np.asarray(g, np.float32)
  alpha = np.float32(layer.alpha)
  k_a = g * (alpha * np.float32(layer.sigma))
  k_m = g * alpha if layer.recentralized else np.zeros_like(g)
  exp_a = input_exponent - layer.bias
  exp_m = input_exponent - layer.q if layer.recentralized else exp_a
  return fold_requant(k_a, k_m, h, exp_a, exp_m, bits, xp=np)


def requant(a, m, fold: FoldedBN, out_exponent: int, *, recentralized: bool = True):
  """Integer batch norm: round(2^-r (ka A + km M + c) / 2^out_exponent), int64 (needs x64).

  Rounds half up with a rounding right shift (or shifts left when the output
  grid is finer than 2^-r). ka, km, c, r: per-channel integer arrays.
  """
  ka = jnp.asarray(np.asarray(fold.ka), jnp.int64)
  km = jnp.asarray(np.asarray(fold.km), jnp.int64)
  c = jnp.asarray(np.asarray(fold.c), jnp.int64)
  r = jnp.asarray(np.asarray(fold.r), jnp.int64)
  v = ka * jnp.asarray(a, jnp.int64) + c
  if recentralized:
    v = v + km * jnp.asarray(m, jnp.int64)
  return rounding_shift(v, r + out_exponent)


def rounding_shift(v, shift):
  """round(v / 2^shift) (half up) for shift > 0, v << -shift otherwise (integer)."""
  shift = jnp.asarray(shift, v.dtype)
  right = jnp.maximum(shift, 0)
  one = jnp.ones((), v.dtype)
  half = jnp.where(right > 0, jnp.left_shift(one, jnp.maximum(right - 1, 0)), 0)
  down = jnp.right_shift(v + half, right)
  return jnp.where(shift > 0, down, jnp.left_shift(v, jnp.maximum(-shift, 0)))


def float_fold(g, h, bits: int):
  """(qa, qc) of the integer batch norm applied to a float input (numpy)."""
  g = np.asarray(g, np.float32)
  fold = fold_requant(g, np.zeros_like(g), h, 0, 0, bits, xp=np)
  r = fold.r.astype(np.int32)
  return np.ldexp(fold.ka, -r), np.ldexp(fold.c, -r)
