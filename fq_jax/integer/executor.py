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
The per-architecture graphs below mirror `fq_jax.models` operation by
operation (the tests compare the logits with the float simulation,
`fq.apply_quantized`, of the same file).

Layers the file keeps in float (an unquantized or prune-only kernel) run as
float convolutions on the dequantized integer input, followed by the same
folded batch norm; `count_integer_ops` reports their multiplies.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fq_jax.integer import layers as I

BN_EPSILON = 1e-5  # every batch norm of fq_jax.models
# Fraction bits of wide (int64) tensors below the finest activation step. With
# this many, rounding a batch-norm output to the wide grid and then to an
# activation code gives the directly rounded code except with probability
# ~2^-24 per activation, so the integer path reproduces an exact (float64)
# simulation; a hardware design would keep fewer.
WIDE_EXTRA_BITS = 24
MODEL_NAMES = ("digits_cnn", "cifar_resnet", "resnet18", "resnet50", "mobilenet_v1", "mobilenet_v2")


# ----------------------------------------------------------------------------
# What the file describes
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """Architecture, dataset and quantization settings read from a file.

  Attributes:
    name: model registry name (see `fq_jax.models.MODEL_NAMES`).
    kwargs: constructor arguments (num_classes, depth for cifar_resnet, width
      for MobileNets).
    dataset: dataset name ("digits", "cifar10", "imagenet2012") or None.
    activation_bits: activation code width (0: none recorded).
    activation_scales: {module path: ActivationScale}.
    bn_bits: integer batch-norm width recorded by training (0: float).
  """

  name: str
  kwargs: dict
  dataset: str | None
  activation_bits: int
  activation_scales: dict
  bn_bits: int


def _infer_model_name(paths) -> str | None:
  p = set(paths)
  has = lambda s: any(s in x for x in p)  # noqa: E731
  if has("params/fc1/kernel") and has("params/conv2/kernel"):
    return "digits_cnn"
  if has("params/block0/dw_conv"):
    return "mobilenet_v2" if has("params/conv_last") else "mobilenet_v1"
  if has("params/stage4_block0"):
    return "resnet50" if has("/conv3/kernel") else "resnet18"
  if has("params/stage1_block0/conv1"):
    return "cifar_resnet"
  return None


def model_spec(decoded) -> ModelSpec:
  """Reads the architecture and quantization settings of a decoded file.

  Metadata keys: "architecture" or "model" (registry name; train.py's
  "cifar_resnet-20" label is understood), "num_classes", "depth"
  (cifar_resnet), "width" (MobileNets), "dataset", "activation_bits",
  "activation_scales", "bn_bits". A missing model name, class count or depth
  is inferred from the array paths and shapes.

  Raises:
    ValueError: (one line) when the architecture cannot be determined.
  """
  meta = dict(decoded.metadata or {})
  paths = list(decoded.arrays)
  name = meta.get("architecture") or meta.get("model") or _infer_model_name(paths)
  if isinstance(name, str) and name not in MODEL_NAMES and name.startswith("cifar_resnet-"):
    # train.py labels CIFAR ResNets "cifar_resnet-<depth>".
    name, _, depth = name.partition("-")
    if depth.isdigit():
      meta.setdefault("depth", int(depth))
  if name not in MODEL_NAMES:
    raise ValueError(
      f"the file's model {name!r} is not one of {', '.join(MODEL_NAMES)}"
      if name
      else "the file's metadata names no model and its arrays match none"
    )
  head = decoded.arrays.get("params/head/kernel")
  if head is None:
    raise ValueError("the file has no params/head/kernel")
  kwargs: dict[str, Any] = {"num_classes": int(meta.get("num_classes") or head.shape[-1])}
  if name == "cifar_resnet":
    blocks = {int(m.group(1)) for x in paths if (m := re.match(r"params/stage1_block(\d+)/", x))}
    kwargs["depth"] = int(meta.get("depth") or 6 * (max(blocks) + 1) + 2)
  if name.startswith("mobilenet") and meta.get("width") is not None:
    kwargs["width"] = float(meta["width"])
  bits = int(meta.get("activation_bits") or 0)
  scales = I.parse_activation_scales(meta.get("activation_scales")) if bits else {}
  return ModelSpec(
    name=name,
    kwargs=kwargs,
    dataset=meta.get("dataset"),
    activation_bits=bits,
    activation_scales=scales,
    bn_bits=int(meta.get("bn_bits") or 0),
  )


def build_float_model(spec: ModelSpec):
  """The Flax module of `spec`."""
  from fq_jax import models

  return models.get_model(spec.name, **spec.kwargs)


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
    lo, hi = I.activation_range(self.m.activation_bits, act.signed)
    if isinstance(x, FloatIn):
      v = jnp.floor(jnp.ldexp(jnp.asarray(x.x, jnp.float32), -act.exponent) + 0.5)
      codes = jnp.clip(v, lo, hi).astype(jnp.int32)
      self.count.op("quantize input (float to int)", elements=x.x.size, compares=2 * x.x.size)
      return codes, act.exponent
    shift = act.exponent - x.exp
    v = I.rounding_shift(jnp.asarray(x.v), shift)
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
    return I.bn_affine(gamma, beta, mean, var, BN_EPSILON, xp=np)

  def layer(self, path, x, bn=None, *, kind="conv", stride=1, pad=0, groups=1):
    strides = (stride, stride)
    padding = ((pad, pad), (pad, pad))
    layer = self.m.layer(path, kind, strides, padding, groups)
    codes, ex = self.codes(x, path)
    cout = layer.kernel_shape[-1] if isinstance(layer, I.ShiftAddLayer) else layer.kernel.shape[-1]
    g, h = self._affine(bn, path, cout)
    bits = self.m.bn_bits_used
    if isinstance(layer, I.ShiftAddLayer):
      max_code = max(abs(v) for v in I.activation_range(self.m.activation_bits, True)) * 2
      wide = layer.accumulator_bound(max_code) >= 2**31
      a, m = I.shift_add(layer, codes, acc_dtype=jnp.int64 if wide else jnp.int32)
      fold = I.layer_fold(layer, g, h, input_exponent=ex, bits=bits)
      y = I.requant(a, m, fold, -self.m.wide_bits, recentralized=layer.recentralized)
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
        qa, qc = I.float_fold(g, h, bits)
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

  def _count_shift_add(self, layer: I.ShiftAddLayer, out_shape, bn):
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
# Graphs (mirroring fq_jax.models)
# ----------------------------------------------------------------------------


def _digits_graph(g: _Exec, x, spec: ModelSpec):
  x = g.relu(g.conv("conv1", x, "bn1", pad=1))
  x = g.relu(g.conv("conv2", x, "bn2", pad=1))
  x = g.flatten(g.max_pool(x, 2, 2))
  x = g.relu(g.dense("fc1", x, "bn3"))
  return g.dense("head", x)


def _cifar_resnet_graph(g: _Exec, x, spec: ModelSpec):
  from fq_jax.models.cifar_resnet import cifar_resnet_blocks_per_stage

  n = cifar_resnet_blocks_per_stage(spec.kwargs.get("depth", 20))
  x = g.relu(g.conv("conv_init", x, "bn_init", pad=1))
  channels = 16
  for stage, planes in enumerate((16, 32, 64), start=1):
    for block in range(n):
      stride = 2 if (stage > 1 and block == 0) else 1
      p = f"stage{stage}_block{block}"
      y = g.relu(g.conv(f"{p}/conv1", x, f"{p}/bn1", stride=stride, pad=1))
      y = g.conv(f"{p}/conv2", y, f"{p}/bn2", pad=1)
      shortcut = x if (stride == 1 and channels == planes) else g.option_a(x, stride, planes)
      x = g.relu(g.add(y, shortcut))
      channels = planes
  return g.dense("head", g.mean_hw(x))


def _resnet_graph(g: _Exec, x, spec: ModelSpec):
  bottleneck = spec.name == "resnet50"
  stages = (3, 4, 6, 3) if bottleneck else (2, 2, 2, 2)
  x = g.relu(g.conv("conv_init", x, "bn_init", stride=2, pad=3))
  x = g.max_pool(x, 3, 2, 1)
  for s, blocks in enumerate(stages, start=1):
    for b in range(blocks):
      stride = 2 if (s > 1 and b == 0) else 1
      p = f"stage{s}_block{b}"
      if bottleneck:
        y = g.relu(g.conv(f"{p}/conv1", x, f"{p}/bn1"))
        y = g.relu(g.conv(f"{p}/conv2", y, f"{p}/bn2", stride=stride, pad=1))
        y = g.conv(f"{p}/conv3", y, f"{p}/bn3")
      else:
        y = g.relu(g.conv(f"{p}/conv1", x, f"{p}/bn1", stride=stride, pad=1))
        y = g.conv(f"{p}/conv2", y, f"{p}/bn2", pad=1)
      if f"params/{p}/downsample_conv/kernel" in g.m.arrays:
        x = g.conv(f"{p}/downsample_conv", x, f"{p}/downsample_bn", stride=stride)
      x = g.relu(g.add(y, x))
  return g.dense("head", g.mean_hw(x))


def _mobilenet_v1_graph(g: _Exec, x, spec: ModelSpec):
  from fq_jax.models.imagenet import _MOBILENET_V1_BLOCKS

  x = g.relu(g.conv("conv_init", x, "bn_init", stride=2, pad=1))
  for i, (_, stride) in enumerate(_MOBILENET_V1_BLOCKS):
    c = g.m.arrays[f"params/block{i}/dw_conv/kernel"].shape[-1]
    x = g.relu(g.conv(f"block{i}/dw_conv", x, f"block{i}/dw_bn", stride=stride, pad=1, groups=c))
    x = g.relu(g.conv(f"block{i}/pw_conv", x, f"block{i}/pw_bn"))
  return g.dense("head", g.mean_hw(x))


def _mobilenet_v2_graph(g: _Exec, x, spec: ModelSpec):
  from fq_jax.models.imagenet import _MOBILENET_V2_SETTINGS

  x = g.relu6(g.conv("conv_init", x, "bn_init", stride=2, pad=1))
  channels = g.m.arrays["params/conv_init/kernel"].shape[-1]
  i = 0
  for _, _, n, s in _MOBILENET_V2_SETTINGS:
    for r in range(n):
      stride = s if r == 0 else 1
      p = f"block{i}"
      y = x
      if f"params/{p}/expand_conv/kernel" in g.m.arrays:
        y = g.relu6(g.conv(f"{p}/expand_conv", y, f"{p}/expand_bn"))
      hidden = g.m.arrays[f"params/{p}/dw_conv/kernel"].shape[-1]
      y = g.relu6(g.conv(f"{p}/dw_conv", y, f"{p}/dw_bn", stride=stride, pad=1, groups=hidden))
      y = g.conv(f"{p}/project_conv", y, f"{p}/project_bn")
      out = g.m.arrays[f"params/{p}/project_conv/kernel"].shape[-1]
      x = g.add(y, x) if (stride == 1 and channels == out) else y
      channels = out
      i += 1
  x = g.relu6(g.conv("conv_last", x, "bn_last"))
  return g.dense("head", g.mean_hw(x))


GRAPHS: dict[str, Callable] = {
  "digits_cnn": _digits_graph,
  "cifar_resnet": _cifar_resnet_graph,
  "resnet18": _resnet_graph,
  "resnet50": _resnet_graph,
  "mobilenet_v1": _mobilenet_v1_graph,
  "mobilenet_v2": _mobilenet_v2_graph,
}


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
      I.parse_activation_scales(activation_scales)
      if activation_scales is not None
      else self.spec.activation_scales
    )
    if not self.activation_bits or not scales:
      raise ValueError(
        "the file records no activation scales (train with quant.activation_bits=8, "
        "or pass activation_bits and activation_scales)"
      )
    self.scales = scales
    self.bn_bits_used = int(bn_bits or self.spec.bn_bits or I.DEFAULT_BN_BITS)
    self.arrays = decoded.arrays
    self.wide_bits = int(wide_extra_bits) - min(s.exponent for s in scales.values())
    self._layers: dict[tuple, Any] = {}
    self._graph = GRAPHS[self.spec.name]
    self.check_overflow = check_overflow
    self._overflow_flags: list = []
    self._fn = None

  def scale(self, path: str) -> I.ActivationScale:
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
        self._layers[key] = I.prepare_layer(
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
    out = self._graph(ex, FloatIn(images), self.spec)
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
        lambda x: self._graph(ex, FloatIn(x), self.spec).v, jax.ShapeDtypeStruct(shape, jnp.float32)
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
  from fq_jax.codec import load_fqz

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


# ----------------------------------------------------------------------------
# Evaluation from a file
# ----------------------------------------------------------------------------


def float_logits_fn(decoded, *, simulate: bool = True, dtype=None):
  """A jitted images -> logits of the file's float (fake-quantized) model.

  With `simulate`, the activation and batch-norm quantization recorded in the
  file are simulated (`fq.apply_quantized`); otherwise the plain model with
  the decoded (quantized) weights. `dtype=jnp.float64` (call it inside
  `jax.enable_x64(True)`) gives an exact reference of the integer path.
  """
  spec = model_spec(decoded)
  model = build_float_model(
    dataclasses.replace(spec, kwargs={**spec.kwargs, "dtype": dtype}) if dtype is not None else spec
  )
  tree = decoded.tree()
  variables = {k: tree[k] for k in ("params", "batch_stats") if k in tree}
  focus = None
  if simulate and spec.bn_bits:  # exact weight parts from the stored symbols
    focus = {
      k: I.weight_parts_from_symbols(decoded.symbols[k], st) for k, st in decoded.focus.items()
    }

  @jax.jit
  def fn(variables, x):
    if not simulate:
      return model.apply(variables, x, train=False)
    return I.apply_quantized(
      model,
      variables,
      x,
      train=False,
      activation_bits=spec.activation_bits,
      activation_scales=spec.activation_scales,
      bn_bits=spec.bn_bits,
      focus=focus,
    )

  return lambda x: np.asarray(fn(variables, jnp.asarray(x, dtype or jnp.float32)))


def test_batches(
  dataset: str, *, data_dir: str | None = None, limit: int | None = None, batch_size: int = 100
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """(images, labels) batches of a dataset's test split, at most `limit` examples."""
  from fq_jax import data as data_lib

  if dataset == "digits":
    x, y = data_lib.load_digits().test
  elif dataset == "cifar10":
    path = None
    if data_dir:
      path = os.path.join(data_dir, "cifar10-jpeg.tar.gz") if os.path.isdir(data_dir) else data_dir
    x, y = data_lib.load_cifar10(path).test
  elif dataset == "imagenet2012":
    pipe = data_lib.ImageNetPipeline(
      "validation",
      batch_size=batch_size,
      train=False,
      data_dir=data_dir or None,
      dataset_name=dataset,
    )
    seen = 0
    for batch in pipe.epoch(0):
      keep = batch["mask"] > 0 if "mask" in batch else slice(None)
      xi, yi = batch["image"][keep], batch["label"][keep]
      if limit is not None:
        xi, yi = xi[: max(limit - seen, 0)], yi[: max(limit - seen, 0)]
      if len(xi) == 0:
        return
      seen += len(xi)
      yield np.asarray(xi, np.float32), np.asarray(yi)
    return
  else:
    raise ValueError(f"unknown dataset {dataset!r} (digits, cifar10, imagenet2012)")
  if limit is not None:
    x, y = x[:limit], y[:limit]
  for i in range(0, len(x), batch_size):
    yield x[i : i + batch_size], y[i : i + batch_size]


def evaluate_fqz(
  path_or_decoded,
  *,
  integer: bool = True,
  data_dir: str | None = None,
  limit: int | None = None,
  batch_size: int | None = None,
  dataset: str | None = None,
  bn_bits: int | None = None,
  progress: Callable[[int], None] | None = None,
) -> dict:
  """Top-1 accuracy of an .fqz model on its dataset's test split.

  Args:
    path_or_decoded: the file (or its `DecodedModel`).
    integer: run the integer path (`IntegerModel`); False runs the float
      model with the file's activation / batch-norm quantization simulated.
    data_dir: dataset location (cifar10: folder of cifar10-jpeg.tar.gz or the
      archive itself; imagenet2012: tfds data_dir).
    limit: evaluate on the first `limit` test examples only.
    batch_size: default 100 (integer) or 500 (float).
    dataset: override the file's dataset name.
    bn_bits: integer path's batch-norm width (default: the file's, else 16).
    progress: called with the number of examples done after each batch.

  Returns:
    {"accuracy", "correct", "count", "path": "integer"|"float", "model",
    "dataset", "activation_bits", "bn_bits", "seconds"}.
  """
  import time

  from fq_jax.codec import load_fqz

  decoded = (
    load_fqz(path_or_decoded)
    if isinstance(path_or_decoded, (str, os.PathLike))
    else path_or_decoded
  )
  spec = model_spec(decoded)
  ds = dataset or spec.dataset
  if not ds:
    raise ValueError("the file's metadata names no dataset (pass one)")
  if integer:
    model = IntegerModel(decoded, bn_bits=bn_bits)
    fn = model
    bs = batch_size or 100
  else:
    fn = float_logits_fn(decoded)
    bs = batch_size or 500
  correct = count = 0
  t0 = time.perf_counter()
  for x, y in test_batches(ds, data_dir=data_dir, limit=limit, batch_size=bs):
    pred = np.argmax(fn(x), axis=-1)
    correct += int(np.sum(pred == np.asarray(y)))
    count += len(y)
    if progress is not None:
      progress(count)
  if count == 0:
    raise ValueError("no test examples")
  return {
    "accuracy": correct / count,
    "correct": correct,
    "count": count,
    "path": "integer" if integer else "float",
    "model": spec.name,
    "dataset": ds,
    "activation_bits": spec.activation_bits,
    "bn_bits": (model.bn_bits_used if integer else spec.bn_bits),
    "seconds": time.perf_counter() - t0,
  }
