"""CIFAR-10 ResNet (He et al. 2016, Sec. 4.2) in Flax linen, NHWC.

The layout mirrors the widely used PyTorch implementation (akamaster/pytorch_resnet_cifar10)
so that its pretrained checkpoints import exactly (see `fq_jax.models.torch_import`):

* `conv_init` (3x3, 16, no bias) + `bn_init` + ReLU;
* three stages of `n` basic blocks with 16/32/64 channels, `depth = 6 n + 2`; the first
  block of stages 2 and 3 has stride 2;
* "option A" shortcuts: spatial subsampling `x[:, ::2, ::2, :]` plus zero-padding of
  `planes // 4` channels on each side (parameter-free);
* global average pooling and `head` (Dense 64 -> num_classes).

Parameter paths read like `stage1_block0/conv1/kernel`, `bn_init/scale`, `head/kernel`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fq_jax.models.graph import IntegerOps

# PyTorch BatchNorm2d defaults: eps=1e-5 and momentum=0.1 on the *new* statistic, i.e. a
# flax momentum (weight on the *old* statistic) of 0.9.
BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9

# PyTorch's kaiming_normal_ (fan_in, gain sqrt(2), untruncated normal), as used by the
# reference implementation for both convolutions and the linear head.
kaiming_normal = nn.initializers.variance_scaling(2.0, "fan_in", "normal")

# Channels of the stem and of the three stages (the network and its integer graph read these).
CIFAR_RESNET_STEM = 16
CIFAR_RESNET_STAGE_PLANES: tuple[int, ...] = (16, 32, 64)


def cifar_resnet_blocks_per_stage(depth: int) -> int:
  """Number of basic blocks per stage for a CIFAR ResNet of the given depth.

  Args:
    depth: total number of weighted layers, `6 n + 2` (20, 32, 44, 56, 110, ...).

  Returns:
    `n`, the number of basic blocks in each of the three stages.

  Raises:
    ValueError: if `depth` is not of the form `6 n + 2` with `n >= 1`.
  """
  if depth < 8 or (depth - 2) % 6 != 0:
    raise ValueError(
      f"CIFAR ResNet depth must be 6n+2 with n >= 1 (20, 32, 44, 56, 110, ...); got {depth}"
    )
  return (depth - 2) // 6


def _conv3x3(features: int, stride: int, name: str, dtype: Any) -> nn.Conv:
  # Explicit symmetric padding: PyTorch's padding=1 pads one pixel on every side. Flax's
  # 'SAME' would pad (0, 1) for stride 2 and shift the sampling grid by one pixel.
  return nn.Conv(
    features,
    (3, 3),
    strides=(stride, stride),
    padding=((1, 1), (1, 1)),
    use_bias=False,
    kernel_init=kaiming_normal,
    dtype=dtype,
    name=name,
  )


def _batch_norm(train: bool, name: str, dtype: Any) -> nn.BatchNorm:
  return nn.BatchNorm(
    use_running_average=not train,
    momentum=BN_MOMENTUM,
    epsilon=BN_EPSILON,
    dtype=dtype,
    name=name,
  )


class CifarBasicBlock(nn.Module):
  """Two 3x3 conv + BN layers with an "option A" (parameter-free) shortcut.

  Attributes:
    planes: output channels.
    stride: stride of the first convolution (1 or 2).
    dtype: computation dtype (parameters stay float32).
  """

  planes: int
  stride: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """Applies the block.

    Args:
      x: NHWC input.
      train: use batch statistics (and update running ones) when True.

    Returns:
      NHWC output with `planes` channels, spatially subsampled by `stride`.
    """
    y = _conv3x3(self.planes, self.stride, "conv1", self.dtype)(x)
    y = nn.relu(_batch_norm(train, "bn1", self.dtype)(y))
    y = _conv3x3(self.planes, 1, "conv2", self.dtype)(y)
    y = _batch_norm(train, "bn2", self.dtype)(y)

    shortcut = x
    if self.stride != 1 or x.shape[-1] != self.planes:
      # Option A as in the reference code: take every second pixel starting at 0 and pad
      # planes // 4 zero channels on each side (16 -> 32 and 32 -> 64 both work out).
      shortcut = x[:, :: self.stride, :: self.stride, :]
      pad = self.planes // 4
      shortcut = jnp.pad(shortcut, ((0, 0), (0, 0), (0, 0), (pad, pad)))
      if shortcut.shape[-1] != self.planes:
        raise ValueError(f"option-A shortcut cannot map {x.shape[-1]} to {self.planes} channels")
    return nn.relu(y + shortcut.astype(y.dtype))


class CifarResNet(nn.Module):
  """CIFAR ResNet-(6n+2) with option-A shortcuts.

  Attributes:
    depth: 20, 32, 44, 56, 110, ... (`6 n + 2`).
    num_classes: size of the output layer.
    dtype: computation dtype (e.g. `jnp.bfloat16`); parameters stay float32 and logits
      are returned as float32.
  """

  depth: int = 20
  num_classes: int = 10
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Computes logits.

    Args:
      x: NHWC images, normalized as described in `fq_jax.data.cifar10`.
      train: batch statistics (True) or running averages (False) in BatchNorm.

    Returns:
      float32 logits of shape `(batch, num_classes)`.
    """
    n = cifar_resnet_blocks_per_stage(self.depth)
    x = jnp.asarray(x, self.dtype)
    x = _conv3x3(CIFAR_RESNET_STEM, 1, "conv_init", self.dtype)(x)
    x = nn.relu(_batch_norm(train, "bn_init", self.dtype)(x))
    for stage, planes in enumerate(CIFAR_RESNET_STAGE_PLANES, start=1):
      for block in range(n):
        stride = 2 if (stage > 1 and block == 0) else 1
        x = CifarBasicBlock(planes, stride, dtype=self.dtype, name=f"stage{stage}_block{block}")(
          x, train
        )
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, kernel_init=kaiming_normal, dtype=self.dtype, name="head")(x)
    return jnp.asarray(x, jnp.float32)


def cifar_resnet_integer_graph(ops: IntegerOps, x, model: CifarResNet):
  """`CifarResNet` written in `ops` (see `fq_jax.models.graph`): the integer path's graph."""
  n = cifar_resnet_blocks_per_stage(model.depth)
  x = ops.relu(ops.conv("conv_init", x, "bn_init", pad=1))
  channels = CIFAR_RESNET_STEM
  for stage, planes in enumerate(CIFAR_RESNET_STAGE_PLANES, start=1):
    for block in range(n):
      stride = 2 if (stage > 1 and block == 0) else 1
      p = f"stage{stage}_block{block}"
      y = ops.relu(ops.conv(f"{p}/conv1", x, f"{p}/bn1", stride=stride, pad=1))
      y = ops.conv(f"{p}/conv2", y, f"{p}/bn2", pad=1)
      shortcut = x if (stride == 1 and channels == planes) else ops.option_a(x, stride, planes)
      x = ops.relu(ops.add(y, shortcut))
      channels = planes
  return ops.dense("head", ops.mean_hw(x))
