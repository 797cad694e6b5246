"""Batch norm folded into an integer requantization (the paper's "16-bit integer batch norm").

Batch norm in inference mode is the per-channel affine map
`y = G * z + H`, `G = gamma / sqrt(var + eps)`, `H = beta - mean * G`
(`bn_affine`); a dense layer with a bias and no batch norm (the classifier)
has G = 1, H = bias. Substituting the shift-add dot product
(`fq_jax.integer.shift_add_layers`: sum_i w_i x_i = alpha 2^ex (sigma 2^-b A + 2^-q M)):

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

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fq_jax.integer import floatbits

MAX_BN_BITS = 24
DEFAULT_BN_BITS = 16
# Largest right shift the integer batch norm uses: keeps the offset C and the
# products KA * A within int64 whatever the batch-norm statistics are.
MAX_REQUANT_SHIFT = 48


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
  m_a = floatbits.ldexp(xp.asarray(k_a, f32), xp.asarray(exp_a, i32), xp)
  m_m = floatbits.ldexp(xp.asarray(k_m, f32), xp.asarray(exp_m, i32), xp)
  terms = [xp.asarray(t, f32) for t in (h if isinstance(h, (tuple, list)) else (h,))]
  h = terms[0] if len(terms) == 1 else xp.maximum(*(xp.abs(t) for t in terms[:2]))
  for t in terms[2:]:
    h = xp.maximum(h, xp.abs(t))
  one = xp.ones_like(h)
  big = xp.maximum(xp.abs(m_a), xp.abs(m_m))
  big = xp.where(big > 0, big, xp.abs(h))
  f, e = floatbits.frexp(xp.where(big > 0, big, one), xp)  # big = f 2^e, f in [0.5, 1)
  # big 2^r = f 2^(e + r) rounds to at most `limit` when f 2^(bits-1) < limit + 1/2.
  r = (bits - 1) - e - (f * f32(2.0 ** (bits - 1)) >= limit + 0.5).astype(i32)
  _, he = floatbits.frexp(xp.where(h != 0, xp.abs(h), one), xp)
  r = xp.minimum(r, xp.where(h != 0, 40 - he, MAX_REQUANT_SHIFT))
  r = xp.minimum(r, MAX_REQUANT_SHIFT).astype(i32)
  ka = xp.round(floatbits.ldexp(m_a, r, xp)).astype(f32)
  km = xp.round(floatbits.ldexp(m_m, r, xp)).astype(f32)
  c = xp.round(floatbits.ldexp(terms[0], r, xp)).astype(f32)
  for t in terms[1:]:
    c = c + xp.round(floatbits.ldexp(t, r, xp)).astype(f32)
  return FoldedBN(ka=ka, km=km, c=c, r=r)


def folded_values(fold: FoldedBN, exp_a, exp_m):
  """The float multipliers and offset the integer batch norm applies: (qa, qm, qc).

  y = qa * T_A + qm * T_M + qc where T_A = 2^exp_a A and T_M = 2^exp_m M are
  the two parts of the convolution in real units (exact in float32).
  """
  r = jnp.asarray(fold.r, jnp.int32)
  return (
    floatbits.ldexp(fold.ka, -r - jnp.asarray(exp_a, jnp.int32), jnp),
    floatbits.ldexp(fold.km, -r - jnp.asarray(exp_m, jnp.int32), jnp),
    floatbits.ldexp(fold.c, -r, jnp),
  )


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
