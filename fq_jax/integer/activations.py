"""Integer activations: power-of-two activation quantizers and their calibration from data.

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
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fq_jax.codec.metadata import ActivationScale
from fq_jax.integer import floatbits

MAX_ACTIVATION_BITS = 16


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


def module_path(module: nn.Module) -> str:
  return "/".join(str(p) for p in module.path)


def is_layer(module) -> bool:
  return isinstance(module, (nn.Conv, nn.Dense))


_HIST_PER_OCTAVE = 16
_HIST_OCTAVES = 128  # |x| from 2^-64 to 2^64


def _log_histogram(a):
  """Counts of |a| > 0 in 1/16-octave bins of log2|a| over [-64, 64) (int32)."""
  a = jnp.abs(jnp.asarray(a, jnp.float32)).reshape(-1)
  f, e = floatbits.frexp(jnp.where(a > 0, a, 1.0), jnp)  # a = f 2^e, f in [0.5, 1)
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
      if context.method_name == "__call__" and is_layer(context.module):
        a = args[0]
        summary = _log_histogram(a) if method == "percentile" else jnp.zeros((), jnp.int32)
        out[module_path(context.module)] = (summary, jnp.max(jnp.abs(a)), jnp.min(a))
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
