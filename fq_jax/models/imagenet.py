"""ImageNet classifiers in Flax linen (NHWC): ResNet-18/50 and MobileNet-V1/V2.

The architectures follow the standard reference definitions so that parameter counts match
(torchvision ResNet-18 11,689,512 and ResNet-50 25,557,032 (v1.5: stride on the 3x3 conv of
the bottleneck); MobileNet-V1 (Howard et al. 2017) 4,231,976; torchvision MobileNet-V2
3,504,872). All convolutions use explicit symmetric padding `k // 2` as in PyTorch, not
Flax's 'SAME', whose stride-2 padding is asymmetric.

Every model takes `dtype` for the computation (e.g. `jnp.bfloat16`: activations and
convolutions in bfloat16, the float32 kernels cast inside each layer); parameters
(`param_dtype` float32) and batch statistics stay float32, the statistics are reduced in
float32, and logits are returned as float32 so that losses are computed in full precision.
`bn_groups` > 1 computes each BatchNorm's training statistics per block of the batch
(`fq_jax.models.batchnorm.GroupedBatchNorm`: per-device statistics under data parallelism).

Dropout: the reference MobileNets apply dropout before the classifier (V1: 1e-3 in Keras,
V2: 0.2 in torchvision). It is exposed as `dropout_rate` with default 0.0 so that models can
be applied without a `'dropout'` RNG; pass `rngs={'dropout': key}` when setting it > 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fq_jax.models.batchnorm import GroupedBatchNorm
from fq_jax.models.graph import IntegerOps

BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9  # PyTorch momentum 0.1 on the new statistic

# The block tables below are read by both the Flax networks and their integer graphs.
RESNET_STEM = 64
# Width (planes) of the four ResNet stages; a block outputs planes * block_cls.expansion.
RESNET_STAGE_PLANES: tuple[int, ...] = (64, 128, 256, 512)
# Blocks per stage of each ImageNet ResNet (He et al. 2016, Table 1).
RESNET_STAGE_SIZES: dict[str, tuple[int, ...]] = {
  "resnet18": (2, 2, 2, 2),
  "resnet50": (3, 4, 6, 3),
}
MOBILENET_STEM = 32  # conv_init channels of both MobileNets at width 1
MOBILENET_V2_LAST = 1280  # conv_last channels of MobileNet-V2 at width <= 1

# torchvision initializes convolutions with kaiming_normal_(mode='fan_out', relu gain).
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _conv(
  features: int,
  kernel: int,
  stride: int,
  name: str,
  dtype: Any,
  groups: int = 1,
) -> nn.Conv:
  pad = kernel // 2
  return nn.Conv(
    features,
    (kernel, kernel),
    strides=(stride, stride),
    padding=((pad, pad), (pad, pad)),
    feature_group_count=groups,
    use_bias=False,
    kernel_init=_conv_init,
    dtype=dtype,
    param_dtype=jnp.float32,
    name=name,
  )


def _bn(train: bool, name: str, dtype: Any, groups: int, zero_init: bool = False) -> nn.Module:
  """BatchNorm: over the whole batch (`groups` 1), or per group of `groups` equal row blocks.

  In evaluation both normalize with the running averages, so `nn.BatchNorm` (the same
  variables) serves there: the integer path recognizes it.
  """
  scale_init = nn.initializers.zeros if zero_init else nn.initializers.ones
  if groups > 1 and train:
    return GroupedBatchNorm(
      groups=groups,
      use_running_average=not train,
      momentum=BN_MOMENTUM,
      epsilon=BN_EPSILON,
      dtype=dtype,
      scale_init=scale_init,
      name=name,
    )
  return nn.BatchNorm(
    use_running_average=not train,
    momentum=BN_MOMENTUM,
    epsilon=BN_EPSILON,
    dtype=dtype,
    param_dtype=jnp.float32,
    scale_init=scale_init,
    name=name,
  )


# --------------------------------------------------------------------------------------------
# ResNet
# --------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
  """ResNet basic block (two 3x3 convs), expansion 1.

  Attributes:
    planes: output channels.
    stride: stride of the first conv and of the projection shortcut.
    zero_init_residual: initialize the last BN scale to zero (Goyal et al. 2017).
    dtype: computation dtype.
    bn_groups: BatchNorm statistics per this many equal blocks of the batch (see
      `GroupedBatchNorm`; 1: over the whole batch).
  """

  planes: int
  stride: int = 1
  zero_init_residual: bool = False
  dtype: Any = jnp.float32
  bn_groups: int = 1

  expansion = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """Applies the block to NHWC `x`; returns NHWC with `planes` channels."""
    y = _conv(self.planes, 3, self.stride, "conv1", self.dtype)(x)
    y = nn.relu(_bn(train, "bn1", self.dtype, self.bn_groups)(y))
    y = _conv(self.planes, 3, 1, "conv2", self.dtype)(y)
    y = _bn(train, "bn2", self.dtype, self.bn_groups, self.zero_init_residual)(y)
    return nn.relu(y + _shortcut(x, self.planes, self.stride, train, self.dtype, self.bn_groups))


class Bottleneck(nn.Module):
  """ResNet v1.5 bottleneck (1x1, 3x3 with stride, 1x1), expansion 4.

  Attributes:
    planes: width of the 3x3 conv; the output has `4 * planes` channels.
    stride: stride of the 3x3 conv and of the projection shortcut.
    zero_init_residual: initialize the last BN scale to zero.
    dtype: computation dtype.
    bn_groups: BatchNorm statistics per this many equal blocks of the batch (see
      `GroupedBatchNorm`; 1: over the whole batch).
  """

  planes: int
  stride: int = 1
  zero_init_residual: bool = False
  dtype: Any = jnp.float32
  bn_groups: int = 1

  expansion = 4

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """Applies the block to NHWC `x`; returns NHWC with `4 * planes` channels."""
    out = self.planes * self.expansion
    y = _conv(self.planes, 1, 1, "conv1", self.dtype)(x)
    y = nn.relu(_bn(train, "bn1", self.dtype, self.bn_groups)(y))
    y = _conv(self.planes, 3, self.stride, "conv2", self.dtype)(y)
    y = nn.relu(_bn(train, "bn2", self.dtype, self.bn_groups)(y))
    y = _conv(out, 1, 1, "conv3", self.dtype)(y)
    y = _bn(train, "bn3", self.dtype, self.bn_groups, self.zero_init_residual)(y)
    return nn.relu(y + _shortcut(x, out, self.stride, train, self.dtype, self.bn_groups))


def _shortcut(
  x: jax.Array, features: int, stride: int, train: bool, dtype: Any, groups: int
) -> jax.Array:
  # Called from inside a compact __call__, so the submodules below are named within the
  # calling block ("downsample_conv", "downsample_bn"), as torchvision's downsample.0/.1.
  if stride == 1 and x.shape[-1] == features:
    return x
  x = _conv(features, 1, stride, "downsample_conv", dtype)(x)
  return _bn(train, "downsample_bn", dtype, groups)(x)


class ResNet(nn.Module):
  """ImageNet ResNet (torchvision layout).

  Parameter paths: `conv_init`, `bn_init`, `stage{1..4}_block{b}/{conv,bn}{1,2,3}`,
  `stage{s}_block0/downsample_{conv,bn}`, `head`.

  Attributes:
    stage_sizes: blocks per stage, e.g. `(2, 2, 2, 2)` for ResNet-18.
    block_cls: `BasicBlock` or `Bottleneck`.
    num_classes: classifier size.
    zero_init_residual: zero-initialize the last BN scale of every block.
    dtype: computation dtype.
    bn_groups: BatchNorm statistics per this many equal blocks of the batch (see
      `GroupedBatchNorm`; 1: over the whole batch).
  """

  stage_sizes: Sequence[int]
  block_cls: type[nn.Module]
  num_classes: int = 1000
  zero_init_residual: bool = False
  dtype: Any = jnp.float32
  bn_groups: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Computes logits.

    Args:
      x: NHWC images (ImageNet-normalized; 224x224 nominal, any size >= 32 works).
      train: batch statistics (True) or running averages (False) in BatchNorm.

    Returns:
      float32 logits `(batch, num_classes)`.
    """
    x = jnp.asarray(x, self.dtype)
    x = _conv(RESNET_STEM, 7, 2, "conv_init", self.dtype)(x)
    x = nn.relu(_bn(train, "bn_init", self.dtype, self.bn_groups)(x))
    # max_pool pads with -inf, matching PyTorch's MaxPool2d(3, 2, padding=1).
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for s, (num_blocks, planes) in enumerate(
      zip(self.stage_sizes, RESNET_STAGE_PLANES, strict=True), start=1
    ):
      for b in range(num_blocks):
        stride = 2 if (s > 1 and b == 0) else 1
        x = self.block_cls(
          planes,
          stride,
          zero_init_residual=self.zero_init_residual,
          dtype=self.dtype,
          bn_groups=self.bn_groups,
          name=f"stage{s}_block{b}",
        )(x, train)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)
    return jnp.asarray(x, jnp.float32)


def resnet18(num_classes: int = 1000, dtype: Any = jnp.float32, **kwargs: Any) -> ResNet:
  """ResNet-18 (11.69M parameters at 1000 classes).

  Args:
    num_classes: classifier size.
    dtype: computation dtype.
    **kwargs: other `ResNet` attributes (e.g. `zero_init_residual`).

  Returns:
    The (unbound) module.
  """
  return ResNet(
    RESNET_STAGE_SIZES["resnet18"], BasicBlock, num_classes=num_classes, dtype=dtype, **kwargs
  )


def resnet50(num_classes: int = 1000, dtype: Any = jnp.float32, **kwargs: Any) -> ResNet:
  """ResNet-50 v1.5 (25.56M parameters at 1000 classes).

  Args:
    num_classes: classifier size.
    dtype: computation dtype.
    **kwargs: other `ResNet` attributes.

  Returns:
    The (unbound) module.
  """
  return ResNet(
    RESNET_STAGE_SIZES["resnet50"], Bottleneck, num_classes=num_classes, dtype=dtype, **kwargs
  )


# --------------------------------------------------------------------------------------------
# MobileNets
# --------------------------------------------------------------------------------------------


def _make_divisible(v: float, divisor: int = 8) -> int:
  """Rounds channel counts as the MobileNet-V2 reference does (never below 90% of `v`)."""
  new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
  if new_v < 0.9 * v:
    new_v += divisor
  return new_v


# (output channels, stride) of the 13 depthwise-separable blocks of MobileNet-V1.
MOBILENET_V1_BLOCKS: tuple[tuple[int, int], ...] = (
  (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
  (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1),
)  # fmt: skip


class MobileNetV1(nn.Module):
  """MobileNet-V1 (Howard et al. 2017).

  Parameter paths: `conv_init`, `bn_init`, `block{i}/{dw_conv,dw_bn,pw_conv,pw_bn}`
  for i in 0..12, `head`.

  Attributes:
    num_classes: classifier size.
    width: width multiplier alpha (channels `int(c * alpha)`).
    dropout_rate: dropout before the classifier (reference: 1e-3); needs a 'dropout' RNG
      in training when > 0.
    dtype: computation dtype.
    bn_groups: BatchNorm statistics per this many equal blocks of the batch (see
      `GroupedBatchNorm`; 1: over the whole batch).
  """

  num_classes: int = 1000
  width: float = 1.0
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  bn_groups: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Computes logits.

    Args:
      x: NHWC images.
      train: batch statistics in BatchNorm and active dropout when True.

    Returns:
      float32 logits `(batch, num_classes)`.
    """
    x = jnp.asarray(x, self.dtype)
    x = _conv(int(MOBILENET_STEM * self.width), 3, 2, "conv_init", self.dtype)(x)
    x = nn.relu(_bn(train, "bn_init", self.dtype, self.bn_groups)(x))
    for i, (channels, stride) in enumerate(MOBILENET_V1_BLOCKS):
      x = _SeparableBlock(
        int(channels * self.width), stride, self.dtype, self.bn_groups, name=f"block{i}"
      )(x, train)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dropout(self.dropout_rate, deterministic=not train or self.dropout_rate == 0.0)(x)
    x = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)
    return jnp.asarray(x, jnp.float32)


class _SeparableBlock(nn.Module):
  """Depthwise 3x3 conv-BN-ReLU followed by pointwise 1x1 conv-BN-ReLU."""

  features: int
  stride: int
  dtype: Any = jnp.float32
  bn_groups: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    channels = x.shape[-1]
    x = _conv(channels, 3, self.stride, "dw_conv", self.dtype, groups=channels)(x)
    x = nn.relu(_bn(train, "dw_bn", self.dtype, self.bn_groups)(x))
    x = _conv(self.features, 1, 1, "pw_conv", self.dtype)(x)
    return nn.relu(_bn(train, "pw_bn", self.dtype, self.bn_groups)(x))


# (expansion t, output channels c, repeats n, first stride s) of MobileNet-V2.
MOBILENET_V2_SETTINGS: tuple[tuple[int, int, int, int], ...] = (
  (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
  (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1),
)  # fmt: skip


class _InvertedResidual(nn.Module):
  """MobileNet-V2 block: [1x1 expand-BN-ReLU6] -> 3x3 depthwise-BN-ReLU6 -> 1x1 project-BN."""

  features: int
  stride: int
  expand_ratio: int
  dtype: Any = jnp.float32
  bn_groups: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    inp = x.shape[-1]
    hidden = int(round(inp * self.expand_ratio))
    y = x
    if self.expand_ratio != 1:
      y = _conv(hidden, 1, 1, "expand_conv", self.dtype)(y)
      y = nn.relu6(_bn(train, "expand_bn", self.dtype, self.bn_groups)(y))
    y = _conv(hidden, 3, self.stride, "dw_conv", self.dtype, groups=hidden)(y)
    y = nn.relu6(_bn(train, "dw_bn", self.dtype, self.bn_groups)(y))
    y = _conv(self.features, 1, 1, "project_conv", self.dtype)(y)
    y = _bn(train, "project_bn", self.dtype, self.bn_groups)(y)  # linear bottleneck: no activation
    if self.stride == 1 and inp == self.features:
      y = y + x
    return y


class MobileNetV2(nn.Module):
  """MobileNet-V2 (Sandler et al. 2018), torchvision layout.

  Parameter paths: `conv_init`, `bn_init`,
  `block{i}/{expand_conv,expand_bn,dw_conv,dw_bn,project_conv,project_bn}` for i in
  0..16 (block0 has no expand layer), `conv_last`, `bn_last`, `head`.

  Attributes:
    num_classes: classifier size.
    width: width multiplier (channels rounded to multiples of 8).
    dropout_rate: dropout before the classifier (torchvision: 0.2); needs a 'dropout' RNG
      in training when > 0.
    dtype: computation dtype.
    bn_groups: BatchNorm statistics per this many equal blocks of the batch (see
      `GroupedBatchNorm`; 1: over the whole batch).
  """

  num_classes: int = 1000
  width: float = 1.0
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  bn_groups: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Computes logits.

    Args:
      x: NHWC images.
      train: batch statistics in BatchNorm and active dropout when True.

    Returns:
      float32 logits `(batch, num_classes)`.
    """
    x = jnp.asarray(x, self.dtype)
    x = _conv(_make_divisible(MOBILENET_STEM * self.width), 3, 2, "conv_init", self.dtype)(x)
    x = nn.relu6(_bn(train, "bn_init", self.dtype, self.bn_groups)(x))
    i = 0
    for t, c, n, s in MOBILENET_V2_SETTINGS:
      for r in range(n):
        x = _InvertedResidual(
          _make_divisible(c * self.width),
          s if r == 0 else 1,
          t,
          dtype=self.dtype,
          bn_groups=self.bn_groups,
          name=f"block{i}",
        )(x, train)
        i += 1
    last = _make_divisible(MOBILENET_V2_LAST * max(1.0, self.width))
    x = _conv(last, 1, 1, "conv_last", self.dtype)(x)
    x = nn.relu6(_bn(train, "bn_last", self.dtype, self.bn_groups)(x))
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dropout(self.dropout_rate, deterministic=not train or self.dropout_rate == 0.0)(x)
    x = nn.Dense(
      self.num_classes,
      kernel_init=nn.initializers.normal(0.01),  # torchvision's classifier init
      dtype=self.dtype,
      name="head",
    )(x)
    return jnp.asarray(x, jnp.float32)


def mobilenet_v1(num_classes: int = 1000, dtype: Any = jnp.float32, **kwargs: Any) -> MobileNetV1:
  """MobileNet-V1, width 1.0 by default (4.23M parameters at 1000 classes).

  Args:
    num_classes: classifier size.
    dtype: computation dtype.
    **kwargs: other `MobileNetV1` attributes (`width`, `dropout_rate`).

  Returns:
    The (unbound) module.
  """
  return MobileNetV1(num_classes=num_classes, dtype=dtype, **kwargs)


def mobilenet_v2(num_classes: int = 1000, dtype: Any = jnp.float32, **kwargs: Any) -> MobileNetV2:
  """MobileNet-V2, width 1.0 by default (3.50M parameters at 1000 classes).

  Args:
    num_classes: classifier size.
    dtype: computation dtype.
    **kwargs: other `MobileNetV2` attributes (`width`, `dropout_rate`).

  Returns:
    The (unbound) module.
  """
  return MobileNetV2(num_classes=num_classes, dtype=dtype, **kwargs)


# --------------------------------------------------------------------------------------------
# Integer graphs (see fq_jax.models.graph): the same networks written in `ops`
# --------------------------------------------------------------------------------------------


def resnet_integer_graph(ops: IntegerOps, x, model: ResNet):
  """`ResNet` (basic or bottleneck blocks) written in `ops`: the integer path's graph."""
  bottleneck = model.block_cls is Bottleneck
  x = ops.relu(ops.conv("conv_init", x, "bn_init", stride=2, pad=3))
  x = ops.max_pool(x, 3, 2, 1)
  channels = RESNET_STEM
  for s, (num_blocks, planes) in enumerate(
    zip(model.stage_sizes, RESNET_STAGE_PLANES, strict=True), start=1
  ):
    out = planes * model.block_cls.expansion
    for b in range(num_blocks):
      stride = 2 if (s > 1 and b == 0) else 1
      p = f"stage{s}_block{b}"
      if bottleneck:
        y = ops.relu(ops.conv(f"{p}/conv1", x, f"{p}/bn1"))
        y = ops.relu(ops.conv(f"{p}/conv2", y, f"{p}/bn2", stride=stride, pad=1))
        y = ops.conv(f"{p}/conv3", y, f"{p}/bn3")
      else:
        y = ops.relu(ops.conv(f"{p}/conv1", x, f"{p}/bn1", stride=stride, pad=1))
        y = ops.conv(f"{p}/conv2", y, f"{p}/bn2", pad=1)
      if stride != 1 or channels != out:  # as `_shortcut`
        x = ops.conv(f"{p}/downsample_conv", x, f"{p}/downsample_bn", stride=stride)
      x = ops.relu(ops.add(y, x))
      channels = out
  return ops.dense("head", ops.mean_hw(x))


def mobilenet_v1_integer_graph(ops: IntegerOps, x, model: MobileNetV1):
  """`MobileNetV1` written in `ops`: the integer path's graph."""
  channels = int(MOBILENET_STEM * model.width)
  x = ops.relu(ops.conv("conv_init", x, "bn_init", stride=2, pad=1))
  for i, (features, stride) in enumerate(MOBILENET_V1_BLOCKS):
    p = f"block{i}"
    x = ops.relu(ops.conv(f"{p}/dw_conv", x, f"{p}/dw_bn", stride=stride, pad=1, groups=channels))
    x = ops.relu(ops.conv(f"{p}/pw_conv", x, f"{p}/pw_bn"))
    channels = int(features * model.width)
  return ops.dense("head", ops.mean_hw(x))


def mobilenet_v2_integer_graph(ops: IntegerOps, x, model: MobileNetV2):
  """`MobileNetV2` written in `ops`: the integer path's graph."""
  channels = _make_divisible(MOBILENET_STEM * model.width)
  x = ops.relu6(ops.conv("conv_init", x, "bn_init", stride=2, pad=1))
  i = 0
  for t, c, n, s in MOBILENET_V2_SETTINGS:
    out = _make_divisible(c * model.width)
    for r in range(n):
      stride = s if r == 0 else 1
      hidden = int(round(channels * t))
      p = f"block{i}"
      y = x
      if t != 1:
        y = ops.relu6(ops.conv(f"{p}/expand_conv", y, f"{p}/expand_bn"))
      y = ops.relu6(ops.conv(f"{p}/dw_conv", y, f"{p}/dw_bn", stride=stride, pad=1, groups=hidden))
      y = ops.conv(f"{p}/project_conv", y, f"{p}/project_bn")
      x = ops.add(y, x) if (stride == 1 and channels == out) else y
      channels = out
      i += 1
  x = ops.relu6(ops.conv("conv_last", x, "bn_last"))
  return ops.dense("head", ops.mean_hw(x))
