"""Exact power-of-two arithmetic on float32 values, for numpy and traced jax alike.

`jnp.ldexp` / `jnp.frexp` are general but expand to many operations, which makes a
network-sized simulation slow to compile; these versions build 2^n from its bits. The numpy
branches (`xp=np`) are what the integer path uses on the host; both give the same bits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def pow2(n):
  """2^n as float32 for integer n in [-126, 127], built from its bits (exact, cheap to compile)."""
  n = jnp.asarray(n, jnp.int32)
  return jax.lax.bitcast_convert_type(jnp.left_shift(n + 127, 23), jnp.float32)


def ldexp(x, n, xp):
  """x 2^n (exact for normal results); numpy's ldexp, or two power-of-two multiplies in jax.

  jnp.ldexp / jnp.frexp are general but expand to many operations, which
  makes a network-sized simulation slow to compile.
  """
  if xp is np:
    return np.ldexp(x, n)
  n = jnp.clip(jnp.asarray(n, jnp.int32), -252, 254)
  half = n // 2
  return x * pow2(half) * pow2(n - half)


def frexp(x, xp):
  """(f, e) with x = f 2^e, f in [0.5, 1), for normal positive float32 x."""
  if xp is np:
    f, e = np.frexp(x)
    return f, e.astype(np.int32)
  bits = jax.lax.bitcast_convert_type(jnp.asarray(x, jnp.float32), jnp.int32)
  e = jnp.right_shift(bits, 23) & 0xFF
  # x > 0, so the sign bit is clear: keep the mantissa, set the exponent to that of 0.5.
  f = jax.lax.bitcast_convert_type((bits & 0x007FFFFF) | (126 << 23), jnp.float32)
  return f, e - 126
