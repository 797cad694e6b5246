"""Shift-add layers: a focused-quantized convolution or dense layer with no multiply.

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

`layer_fold` pairs a layer with the integer batch norm of `fq_jax.integer.batchnorm`.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from fq_jax._src import quantizers
from fq_jax.integer.batchnorm import FoldedBN, fold_requant


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
  rows, groups = _patch_rows(sym.shape, kind, groups, path)
  keep = _rows_of(mask, rows)
  kept = keep.sum(axis=0)
  idx, ee, ss, mm = _tap_lists(keep, rows, *(_rows_of(a, rows) for a in (s, e, m)))
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


def _patch_rows(shape, kind: str, groups: int, path: str):
  """(rows, groups): the im2col row each kernel element reads, as a (K_local, Cout) array.

  Rows are ordered (kh, kw, cin) as `im2col` builds them; a grouped convolution's output
  channel reads only its group's input channels. Dense layers read row i for input i.
  """
  if kind == "conv":
    if len(shape) != 4:
      raise ValueError(f"{path}: a convolution kernel must be HWIO, got shape {shape}")
    kh, kw, cin_g, cout = shape
    if cout % groups:
      raise ValueError(f"{path}: {cout} output channels do not split into {groups} groups")
    cin = cin_g * groups
    group = np.arange(cout) // (cout // groups)  # (Cout,)
    tap = np.arange(kh * kw)[:, None, None]
    ci = np.arange(cin_g)[None, :, None]
    rows = tap * cin + group[None, None, :] * cin_g + ci  # (taps, cin_g, Cout)
    return rows.reshape(kh * kw * cin_g, cout), groups
  if kind == "dense":
    if len(shape) != 2:
      raise ValueError(f"{path}: a dense kernel must be (in, out), got shape {shape}")
    return np.broadcast_to(np.arange(shape[0])[:, None], shape), 1
  raise ValueError(f"kind must be 'conv' or 'dense', got {kind!r}")


def _rows_of(a, rows):
  """A kernel-shaped array laid out like `rows` (K_local, Cout)."""
  return np.asarray(a).reshape(rows.shape)


def _tap_lists(keep, rows, s, e, m):
  """Per output channel, the kept taps' (row, shift, sign, component), padded to equal length.

  Padding taps have sign 0 and component -1 (they add nothing). All (Cout, T) int32.
  """
  cout = keep.shape[1]
  t = max(int(keep.sum(axis=0).max(initial=0)), 1)
  idx = np.zeros((cout, t), np.int32)
  ee = np.zeros((cout, t), np.int32)
  ss = np.zeros((cout, t), np.int32)
  mm = np.full((cout, t), -1, np.int32)
  for c in range(cout):
    where = np.nonzero(keep[:, c])[0]
    n = where.size
    idx[c, :n] = rows[where, c]
    ee[c, :n] = e[where, c]
    ss[c, :n] = s[where, c]
    mm[c, :n] = m[where, c]
  return idx, ee, ss, mm


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
