"""The integer inference path of the model zoo, run from a .fqz file alone.

`IntegerModel(decoded)` rebuilds a network from a decoded .fqz file (its
metadata names the architecture; see `model_spec`) and evaluates it with
integer arithmetic only in the convolutions and dense layers:

  images (float) --quantize--> codes (int, `bits`-bit, scale 2^ex)
      --shift_add--> accumulators A, M (int32/int64)
      --requant (integer batch norm, sigma and alpha folded in)--> wide (int32, unit 2^-F)
      --relu / residual add / max-pool / global sum-pool (integer)-->
      --rounding shift + clip--> codes of the next layer ...
  logits = wide integers * 2^-F

All fixed-point units are powers of two, so moving between them is a shift.
The per-architecture graphs live beside the networks they mirror
(`fq_jax.models.integer_graph(name)`, written in the operations of
`fq_jax.models.graph.IntegerOps`); `_Exec` implements those operations with
integers and passes itself to the graph. The tests compare the logits with the
float simulation (`fq.apply_quantized`) of the same file.

Layers the file keeps in float (an unquantized or prune-only kernel) run as
float convolutions on the dequantized integer input, followed by the same
folded batch norm; `count_integer_ops` reports their multiplies.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fq_jax import models
from fq_jax.codec import load_fqz
from fq_jax.codec.metadata import ActivationScale, parse_activation_scales
from fq_jax.integer.activations import activation_range
from fq_jax.integer.batchnorm import DEFAULT_BN_BITS, bn_affine, float_fold, requant, rounding_shift
from fq_jax.integer.shift_add_layers import ShiftAddLayer, layer_fold, prepare_layer, shift_add
from fq_jax.integer.spec import ModelSpec, build_float_model, model_spec

BN_EPSILON = 1e-5  # every batch norm of fq_jax.models
# Fraction bits of wide (int64) tensors below the finest activation step. With
# this many, rounding a batch-norm output to the wide grid and then to an
# activation code gives the directly rounded code except with probability
# ~2^-24 per activation, so the integer path reproduces an exact (float64)
# simulation; a hardware design would keep fewer.
WIDE_EXTRA_BITS = 24

__all__ = [
  "BN_EPSILON",
  "WIDE_EXTRA_BITS",
  "IntegerModel",
  "ModelSpec",
  "build_float_model",
  "count_integer_ops",
  "load_integer_model",
  "model_spec",
]


# ----------------------------------------------------------------------------
# Fixed-point tensors and the graph executor
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class Fx:
  """An integer tensor with a power-of-two unit: value = v * 2^exp."""

  v: Any
  exp: int


@dataclasses.dataclass
class FloatIn:
  """The float model input (quantized by the first layer that reads it)."""

  x: Any


@dataclasses.dataclass
class FloatLayer:
  """A kernel the file keeps in float (computed with float multiplies)."""

  path: str
  kind: str
  kernel: np.ndarray
  strides: tuple
  padding: tuple
  groups: int

  @property
  def kept(self) -> np.ndarray:
    k = self.kernel.reshape(-1, self.kernel.shape[-1])
    return (k != 0).sum(axis=0).astype(np.int64)


def _check_input_channels(layer, shape) -> None:
  """Raises ValueError when a kernel cannot read an input of `shape` (a file/graph mismatch).

  Without this check a wrong channel count would not fail: the tap lists gather input rows
  by index, and an out-of-range gather clips silently.
  """
  kernel_shape = layer.kernel_shape if isinstance(layer, ShiftAddLayer) else layer.kernel.shape
  reads = kernel_shape[-2] * layer.groups if layer.kind == "conv" else kernel_shape[0]
  if shape[-1] != reads:
    raise ValueError(
      f"{layer.path}: its kernel {tuple(kernel_shape)} reads {reads} input channels, but the "
      f"{len(shape)}-d input has {shape[-1]} (the file does not match its model's structure)"
    )


class _Counter:
  """Per-layer and per-operation counts, accumulated while tracing."""

  def __init__(self):
    self.layers: list[dict] = []
    self.other: dict[str, dict] = {}

  def op(self, kind: str, **counts):
    row = self.other.setdefault(
      kind,
      {
        "elements": 0,
        "adds": 0,
        "shifts": 0,
        "compares": 0,
        "multiplies": 0,
        "float_multiplies": 0,
      },
    )
    for k, v in counts.items():
      row[k] = row.get(k, 0) + int(v)


class _Exec:
  """Runs a graph function with integer operations (and counts them)."""

  def __init__(self, model: "IntegerModel"):
    self.m = model
    self.count = _Counter()

  # -- conversions -----------------------------------------------------------

  def codes(self, x, path: str):
    """The `bits`-bit input codes of layer `path` (and its exponent)."""
    act = self.m.scale(path)
    lo, hi = activation_range(self.m.activation_bits, act.signed)
    if isinstance(x, FloatIn):
      v = jnp.floor(jnp.ldexp(jnp.asarray(x.x, jnp.float32), -act.exponent) + 0.5)
      codes = jnp.clip(v, lo, hi).astype(jnp.int32)
      self.count.op("quantize input (float to int)", elements=x.x.size, compares=2 * x.x.size)
      return codes, act.exponent
    shift = act.exponent - x.exp
    v = rounding_shift(jnp.asarray(x.v), shift)
    codes = jnp.clip(v, lo, hi).astype(jnp.int32)
    n = int(np.prod(x.v.shape))
    self.count.op(
      "requantize to codes (shift, clip)",
      elements=n,
      adds=n if shift > 0 else 0,
      shifts=n if shift else 0,
      compares=2 * n,
    )
    return codes, act.exponent

  def _wide(self, v):
    return Fx(v, -self.m.wide_bits)

  # -- layers ----------------------------------------------------------------

  def _affine(self, bn: str | None, path: str, cout: int):
    a = self.m.arrays
    if bn is None:
      bias = a.get(f"params/{path}/bias")
      h = np.zeros(cout, np.float32) if bias is None else np.asarray(bias, np.float32)
      return np.ones(cout, np.float32), h
    gamma = a[f"params/{bn}/scale"]
    beta = a[f"params/{bn}/bias"]
    mean = a[f"batch_stats/{bn}/mean"]
    var = a[f"batch_stats/{bn}/var"]
    return bn_affine(gamma, beta, mean, var, BN_EPSILON, xp=np)

  def layer(self, path, x, bn=None, *, kind="conv", stride=1, pad=0, groups=1):
    strides = (stride, stride)
    padding = ((pad, pad), (pad, pad))
    layer = self.m.layer(path, kind, strides, padding, groups)
    codes, ex = self.codes(x, path)
    _check_input_channels(layer, codes.shape)
    cout = layer.kernel_shape[-1] if isinstance(layer, ShiftAddLayer) else layer.kernel.shape[-1]
    g, h = self._affine(bn, path, cout)
    bits = self.m.bn_bits_used
    if isinstance(layer, ShiftAddLayer):
      max_code = max(abs(v) for v in activation_range(self.m.activation_bits, True)) * 2
      wide = layer.accumulator_bound(max_code) >= 2**31
      a, m = shift_add(layer, codes, acc_dtype=jnp.int64 if wide else jnp.int32)
      fold = layer_fold(layer, g, h, input_exponent=ex, bits=bits)
      y = requant(a, m, fold, -self.m.wide_bits, recentralized=layer.recentralized)
      self._count_shift_add(layer, a.shape, bn)
    else:
      # A layer the file keeps in float: float64 multiply-accumulates on the
      # dequantized codes, then the batch norm folded alone (as the simulation
      # does for a batch norm after an unquantized layer) or the float bias.
      xf = jnp.ldexp(codes.astype(jnp.float64), ex)
      w = jnp.asarray(layer.kernel, jnp.float64)
      if kind == "conv":
        z = jax.lax.conv_general_dilated(
          xf,
          w,
          strides,
          padding,
          dimension_numbers=("NHWC", "HWIO", "NHWC"),
          feature_group_count=groups,
        )
      else:
        z = xf @ w
      if bn is not None:
        qa, qc = float_fold(g, h, bits)
        z = qa.astype(np.float64) * z + qc.astype(np.float64)
      else:
        z = z + np.asarray(h, np.float64)
      y = jnp.floor(jnp.ldexp(z, self.m.wide_bits) + 0.5).astype(jnp.int64)
      self._count_float(layer, z.shape, bn)
    self.m.check_range(y, path)
    return self._wide(y.astype(jnp.int64))

  def conv(self, path, x, bn=None, *, stride=1, pad=0, groups=1):
    return self.layer(path, x, bn, kind="conv", stride=stride, pad=pad, groups=groups)

  def dense(self, path, x, bn=None):
    return self.layer(path, x, bn, kind="dense")

  # -- element-wise and pooling ----------------------------------------------

  def relu(self, x: Fx) -> Fx:
    self.count.op("relu (compare)", elements=x.v.size, compares=x.v.size)
    return Fx(jnp.maximum(x.v, 0), x.exp)

  def relu6(self, x: Fx) -> Fx:
    six = 6 * 2 ** (-x.exp) if x.exp <= 0 else None
    if six is None:
      raise ValueError("relu6 needs a fixed-point unit of at most 1")
    self.count.op("relu6 (compare)", elements=x.v.size, compares=2 * x.v.size)
    return Fx(jnp.clip(x.v, 0, six), x.exp)

  def add(self, x: Fx, y: Fx) -> Fx:
    e = min(x.exp, y.exp)
    xv = jnp.left_shift(x.v, x.exp - e) if x.exp > e else x.v
    yv = jnp.left_shift(y.v, y.exp - e) if y.exp > e else y.v
    n = x.v.size
    self.count.op("residual add", elements=n, adds=n, shifts=n if x.exp != y.exp else 0)
    return Fx(xv + yv, e)

  def max_pool(self, x: Fx, window: int, stride: int, pad: int = 0) -> Fx:
    init = jnp.array(jnp.iinfo(x.v.dtype).min, x.v.dtype)
    v = jax.lax.reduce_window(
      x.v,
      init,
      jax.lax.max,
      (1, window, window, 1),
      (1, stride, stride, 1),
      ((0, 0), (pad, pad), (pad, pad), (0, 0)),
    )
    self.count.op("max pool (compare)", elements=v.size, compares=v.size * (window * window - 1))
    return Fx(v, x.exp)

  def mean_hw(self, x: Fx) -> Fx:
    n, h, w, c = x.v.shape
    hw = h * w
    s = jnp.sum(x.v.astype(jnp.int64), axis=(1, 2))
    self.count.op("global pool (sum)", elements=s.size, adds=x.v.size)
    if hw & (hw - 1) == 0:  # a power of two: the division is a change of unit
      return Fx(s, x.exp - (hw.bit_length() - 1))
    recip = round(2.0**16 / hw)  # 1/HW as a 16-bit fixed-point constant
    self.count.op("global pool (1/HW multiply)", elements=s.size, multiplies=s.size)
    return Fx(s * recip, x.exp - 16)

  def flatten(self, x: Fx) -> Fx:
    return Fx(x.v.reshape(x.v.shape[0], -1), x.exp)

  def option_a(self, x: Fx, stride: int, planes: int) -> Fx:
    v = x.v[:, ::stride, ::stride, :]
    pad = planes // 4
    return Fx(jnp.pad(v, ((0, 0), (0, 0), (0, 0), (pad, pad))), x.exp)

  # -- counting --------------------------------------------------------------

  def _count_shift_add(self, layer: ShiftAddLayer, out_shape, bn):
    p = int(np.prod(out_shape[:-1]))
    cout = layer.out_features
    k_in = int(np.prod(layer.kernel_shape[:-1]))
    rec = layer.recentralized
    combine_shifts = (
      sum(1 for s, sh in zip(layer.mean_signs, layer.mean_shifts) if s and sh > 0) if rec else 0
    )
    combine_adds = sum(1 for s in layer.mean_signs if s) if rec else 0
    self.count.layers.append(
      {
        "layer": layer.path,
        "kind": f"shift-add {layer.kind}",
        "quantizer": "recentralized" if rec else "shift",
        "outputs": p * cout,
        "float_macs": p * cout * k_in,
        "kept_macs": p * int(layer.kept.sum()),
        "shifts": p * (int(layer.shifted.sum()) + cout * combine_shifts),
        "adds": p
        * (int(layer.nonzero.sum()) + (int(layer.kept.sum()) if rec else 0) + cout * combine_adds),
        "multiplies": 0,
        "arithmetic": "integer",
        "bn": bn or ("bias" if layer.kind == "dense" else None),
        "bn_multiplies": p * cout * (2 if rec else 1),
        "bn_adds": p * cout * (3 if rec else 2),
        "bn_shifts": p * cout,
      }
    )

  def _count_float(self, layer: FloatLayer, out_shape, bn):
    p = int(np.prod(out_shape[:-1]))
    cout = layer.kernel.shape[-1]
    k_in = int(np.prod(layer.kernel.shape[:-1]))
    kept = int(layer.kept.sum())
    self.count.layers.append(
      {
        "layer": layer.path,
        "kind": f"float {layer.kind}",
        "quantizer": "float",
        "outputs": p * cout,
        "float_macs": p * cout * k_in,
        "kept_macs": p * kept,
        "shifts": 0,
        "adds": p * kept,
        "multiplies": p * kept,
        "arithmetic": "float",
        "bn": bn or ("bias" if layer.kind == "dense" else None),
        "bn_multiplies": p * cout if bn else 0,
        "bn_adds": p * cout,
        "bn_shifts": 0,
      }
    )


# ----------------------------------------------------------------------------
# The integer model
# ----------------------------------------------------------------------------


class IntegerModel:
  """A compressed model evaluated on the integer path (see module docstring).

  Args:
    decoded: a `DecodedModel` (from `fq.load_fqz`) whose metadata names the
      architecture and records the activation scales (`activation_bits`,
      `activation_scales`; written by train.py with quant.activation_bits > 0).
    bn_bits: integer batch-norm multiplier width; default: the file's
      `bn_bits`, or 16 when the file used float batch norm.
    activation_bits, activation_scales: override the file's (e.g. after
      `fq.calibrate_activations` on a file without them).
    wide_extra_bits: fraction bits of the wide (int64) tensors below the
      finest activation step (see WIDE_EXTRA_BITS).
    check_overflow: verify at run time that every wide tensor stays below
      2^62 in magnitude (raises on overflow).

  Attributes:
    spec: the `ModelSpec`.
    module: the Flax module of the file's model (its structure; no weights).
    wide_bits: F, the fraction bits of wide tensors (unit 2^-F).
  """

  def __init__(
    self,
    decoded,
    *,
    bn_bits: int | None = None,
    activation_bits: int | None = None,
    activation_scales=None,
    wide_extra_bits: int = WIDE_EXTRA_BITS,
    check_overflow: bool = False,
  ):
    self.decoded = decoded
    self.spec = model_spec(decoded)
    self.activation_bits = int(
      activation_bits if activation_bits is not None else self.spec.activation_bits
    )
    scales = (
      parse_activation_scales(activation_scales)
      if activation_scales is not None
      else self.spec.activation_scales
    )
    if not self.activation_bits or not scales:
      raise ValueError(
        "the file records no activation scales (train with quant.activation_bits=8, "
        "or pass activation_bits and activation_scales)"
      )
    self.scales = scales
    self.bn_bits_used = int(bn_bits or self.spec.bn_bits or DEFAULT_BN_BITS)
    self.arrays = decoded.arrays
    self.wide_bits = int(wide_extra_bits) - min(s.exponent for s in scales.values())
    self._layers: dict[tuple, Any] = {}
    # The graph (beside the network in fq_jax.models) walks the structure of the module:
    # its block counts, widths and depth.
    self.module = build_float_model(self.spec)
    self._graph = models.integer_graph(self.spec.name)
    self.check_overflow = check_overflow
    self._overflow_flags: list = []
    self._fn = None

  def scale(self, path: str) -> ActivationScale:
    try:
      return self.scales[path]
    except KeyError:
      raise ValueError(f"no activation scale for layer {path!r} in the file") from None

  def layer(self, path, kind, strides, padding, groups):
    key = (path, kind, strides, padding, groups)
    if key not in self._layers:
      kpath = f"params/{path}/kernel"
      if kpath not in self.arrays:
        raise ValueError(f"the file has no {kpath}")
      focus = self.decoded.focus
      if kpath in focus:
        self._layers[key] = prepare_layer(
          self.decoded.symbols[kpath],
          focus[kpath],
          path=path,
          kind=kind,
          strides=strides,
          padding=padding,
          groups=groups,
        )
      else:
        self._layers[key] = FloatLayer(
          path, kind, np.asarray(self.arrays[kpath], np.float32), strides, padding, groups
        )
    return self._layers[key]

  def check_range(self, y, path):
    if self.check_overflow:
      lim = 2**62
      self._overflow_flags.append((path, jnp.any(jnp.abs(y) > lim)))

  def _run(self, images):
    ex = _Exec(self)
    self._overflow_flags = []
    out = self._graph(ex, FloatIn(images), self.module)
    flags = {p: f for p, f in self._overflow_flags}
    return out.v.astype(jnp.int64), out.exp, flags

  def integer_logits(self, images) -> tuple[np.ndarray, int]:
    """(int64 logits, exponent): logits = values * 2^exponent."""
    images = np.asarray(images, np.float32)
    with jax.enable_x64(True):
      if self._fn is None:
        exp_box = {}

        def fn(x):
          v, e, flags = self._run(x)
          exp_box["exp"] = e
          return v, flags

        self._fn = (jax.jit(fn), exp_box)
      fn, exp_box = self._fn
      v, flags = fn(images)
      v = np.asarray(v)
    bad = [p for p, f in flags.items() if bool(f)]
    if bad:
      raise OverflowError(f"integer overflow in the wide output of {bad[0]}")
    return v, exp_box["exp"]

  def __call__(self, images) -> np.ndarray:
    """float64 logits (the integer logits times their power-of-two unit)."""
    v, e = self.integer_logits(images)
    return np.ldexp(v.astype(np.float64), e)

  def count_ops(self, input_shape) -> dict:
    """See `count_integer_ops`."""
    shape = tuple(int(d) for d in input_shape)
    per_image = len(shape) == 3
    if per_image:
      shape = (1, *shape)
    with jax.enable_x64(True):
      ex = _Exec(self)
      jax.eval_shape(
        lambda x: self._graph(ex, FloatIn(x), self.module).v,
        jax.ShapeDtypeStruct(shape, jnp.float32),
      )
    return _summarize(ex.count, shape, self)


def _summarize(count: _Counter, shape, model: IntegerModel) -> dict:
  layers = count.layers
  keys = (
    "float_macs",
    "kept_macs",
    "shifts",
    "adds",
    "multiplies",
    "bn_multiplies",
    "bn_adds",
    "bn_shifts",
    "outputs",
  )
  total = {k: sum(r[k] for r in layers) for k in keys}
  other = {k: dict(v) for k, v in count.other.items()}
  total["other_adds"] = sum(v["adds"] for v in other.values())
  total["other_shifts"] = sum(v["shifts"] for v in other.values())
  total["other_compares"] = sum(v["compares"] for v in other.values())
  total["other_multiplies"] = sum(v["multiplies"] for v in other.values())
  total["float_multiplies"] = sum(
    r["multiplies"] + r["bn_multiplies"] for r in layers if r["arithmetic"] == "float"
  )
  total["float_layers"] = [r["layer"] for r in layers if r["quantizer"] == "float"]
  return {
    "model": model.spec.name,
    "input_shape": list(shape),
    "activation_bits": model.activation_bits,
    "bn_bits": model.bn_bits_used,
    "wide_bits": model.wide_bits,
    "layers": layers,
    "other": other,
    "total": total,
  }


def load_integer_model(path_or_decoded, **kwargs) -> IntegerModel:
  """`IntegerModel` of an .fqz file path or a `DecodedModel`."""
  decoded = (
    load_fqz(path_or_decoded)
    if isinstance(path_or_decoded, (str, os.PathLike))
    else path_or_decoded
  )
  return IntegerModel(decoded, **kwargs)


def count_integer_ops(decoded_model, input_shape, **kwargs) -> dict:
  """Operation count of the integer path against the float model's MACs.

  Args:
    decoded_model: a `DecodedModel` (or .fqz path) with activation scales.
    input_shape: (H, W, C) for per-image counts or (N, H, W, C).
    **kwargs: `IntegerModel` options (bn_bits, activation_bits, ...).

  Returns:
    {"layers": one row per convolution / dense layer: layer, kind
    ("shift-add conv", "shift-add dense", "float conv", ...), quantizer,
    outputs, float_macs (the dense float model's multiply-accumulates),
    kept_macs (those with a kept weight), shifts, adds, multiplies (in the
    dot products: 0 for every shift-add layer, the kept MACs of a float
    layer), arithmetic ("integer" or "float"), bn_multiplies / bn_adds /
    bn_shifts (the batch norm or bias: one multiply per output and
    accumulator); "other": per operation kind (input quantization,
    requantization shifts, relu, residual adds, pooling); "total": sums,
    float_multiplies (all multiplies of float layers), other_* and
    float_layers}.
  """
  model = (
    decoded_model
    if isinstance(decoded_model, IntegerModel)
    else load_integer_model(decoded_model, **kwargs)
  )
  return model.count_ops(input_shape)
