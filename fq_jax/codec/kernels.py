"""Batched quantizer kernels: `fq.focused_symbols` / `fq.focused_values` of many layers at once.

One jit per padded size serves any number of layers: the layers' kept weights are
concatenated, padded to a bucketed length and each element gathers its layer's quantizer
scalars from a small table, so encoding or decoding a model compiles a handful of shapes
instead of one per layer.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from fq_jax._src import quantizers


def _next_pow2(n: int, minimum: int) -> int:
  return max(minimum, 1 << max(0, (int(n) - 1).bit_length()))


def _bucket(n: int) -> int:
  """Padded kernel length: >= 4096, at most 1/8 above n (a few shapes per octave)."""
  if n <= 4096:
    return 4096
  step = 1 << (int(n).bit_length() - 3)
  return -(-n // step) * step


def _batched_state(layer, table, assignment=None):
  """A FocusState whose scalar fields are gathered per element from `table`."""
  rec, bits, m0, m1, sigma, bias, alpha = table
  return quantizers.FocusState(
    recentralized=rec[layer],
    bits=bits[layer],
    means=jnp.stack([m0[layer], m1[layer]]),
    sigma=sigma[layer],
    bias=bias[layer],
    assignment=assignment,
    mask=True,
    alpha=alpha[layer],
    gmm=None,
    separation=None,
  )


@jax.jit
def _symbols_kernel(w, assignment, layer, table):
  return quantizers.focused_symbols(w, _batched_state(layer, table, assignment))


@functools.partial(jax.jit, static_argnames=("dtype",))
def _values_kernel(symbols, layer, table, dtype):
  return quantizers.focused_values(symbols, _batched_state(layer, table), dtype=dtype)


def _param_table(params: list[dict]):
  """Per-layer quantizer scalars as arrays padded to a power of two."""
  size = _next_pow2(len(params), 16)
  pad = lambda xs, dt: np.concatenate([np.asarray(xs, dt), np.zeros(size - len(xs), dt)])
  return (
    pad([p["recentralized"] for p in params], np.bool_),
    pad([p["bits"] for p in params], np.int32),
    pad([p["means"][0] for p in params], np.float32),
    pad([p["means"][1] for p in params], np.float32),
    pad([p["sigma"] for p in params], np.float32),
    pad([p["bias"] for p in params], np.int32),
    pad([p["alpha"] for p in params], np.float32),
  )


def _pad_to(x: np.ndarray, size: int) -> np.ndarray:
  if x.size == size:
    return x
  out = np.zeros(size, x.dtype)
  out[: x.size] = x
  return out


def batched_symbols(
  weights: list[np.ndarray], assignments: list[np.ndarray], params: list[dict]
) -> list[np.ndarray]:
  """`fq.focused_symbols` of many layers' kept weights (1-D, float32) in one call.

  Args:
    weights: per layer, its kept weights.
    assignments: per layer, the kept weights' mixture assignments.
    params: per layer, the quantizer scalars (`encode.focus_params`).

  Returns:
    Per layer, its int32 symbols.
  """
  sizes = [w.size for w in weights]
  total = sum(sizes)
  if total == 0:
    return [np.zeros(0, np.int32) for _ in weights]
  n = _bucket(total)
  w = _pad_to(np.concatenate(weights).astype(np.float32, copy=False), n)
  a = _pad_to(np.concatenate(assignments).astype(bool, copy=False), n)
  layer = _pad_to(np.repeat(np.arange(len(sizes), dtype=np.int32), sizes), n)
  out = np.asarray(_symbols_kernel(w, a, layer, _param_table(params)))[:total]
  return np.split(out, np.cumsum(sizes)[:-1])


def batched_values(symbols: list[np.ndarray], params: list[dict], dtype) -> list[np.ndarray]:
  """`fq.focused_values` of many layers' kept symbols (1-D) in one call.

  Args:
    symbols: per layer, its kept symbols.
    params: per layer, the quantizer scalars.
    dtype: the output dtype (float64 is computed in float32 and widened exactly).

  Returns:
    Per layer, its values.
  """
  sizes = [s.size for s in symbols]
  total = sum(sizes)
  if total == 0:
    return [np.zeros(0, dtype) for _ in symbols]
  n = _bucket(total)
  s = _pad_to(np.concatenate(symbols).astype(np.int32, copy=False), n)
  layer = _pad_to(np.repeat(np.arange(len(sizes), dtype=np.int32), sizes), n)
  wide = np.dtype(dtype) == np.float64
  out = np.asarray(
    _values_kernel(s, layer, _param_table(params), dtype=jnp.dtype(np.float32 if wide else dtype))
  )
  if wide:
    out = out.astype(np.float64)
  return np.split(out[:total], np.cumsum(sizes)[:-1])
