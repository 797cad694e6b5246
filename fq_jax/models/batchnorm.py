"""Batch normalization with per-device statistics under a data-sharded `jax.jit`.

Under `jax.jit` with the batch sharded over devices, `flax.linen.BatchNorm` computes the
statistics of the whole global batch (XLA inserts the cross-device reduction). Data-parallel
training without synchronized batch norm (PyTorch DDP's default) normalizes each device's
shard with its own statistics instead; `GroupedBatchNorm` does that by reshaping the batch
to (groups, rows per group, ...) and reducing within each group.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class GroupedBatchNorm(nn.Module):
  """BatchNorm whose training statistics are those of each block of `groups` equal row blocks.

  With `groups` = the number of devices and the batch sharded over them along its leading
  axis (`fq_jax.pipeline.sharding.batch_sharding`), group g is device g's shard: every
  device normalizes its shard with that shard's own mean and variance ("per-device"
  statistics, as data-parallel PyTorch without SyncBatchNorm); since the groups align
  with the shards, only the running averages need a (per-channel) cross-device mean. The variables (`scale`,
  `bias`; `batch_stats` `mean`, `var`) are those of `nn.BatchNorm`, so checkpoints,
  imports and the integer path are unchanged; the running averages move towards the mean
  over groups of the group statistics (for `var`: the mean within-shard variance). The
  statistics are computed in float32 whatever `dtype` is (as `nn.BatchNorm` does), with
  the same fast variance E[x^2] - E[x]^2 clipped at 0.

  Attributes:
    groups: number of row blocks; the batch size must be a multiple of it.
    use_running_average: normalize with the running averages (evaluation).
    momentum: running-average decay (Flax convention: 0.9 = PyTorch's 0.1).
    epsilon: added to the variance.
    dtype: output dtype.
    scale_init: initializer of `scale`.
  """

  groups: int
  use_running_average: bool = False
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Any = jnp.float32
  scale_init: Callable[..., jax.Array] = nn.initializers.ones

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Normalizes NHWC (or (N, C)) `x` over all axes but the last, per group in training."""
    c = x.shape[-1]
    f32 = jnp.float32
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), f32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), f32))
    scale = self.param("scale", self.scale_init, (c,), f32)
    bias = self.param("bias", nn.initializers.zeros, (c,), f32)
    if self.use_running_average:
      mean, var, xg = ra_mean.value, ra_var.value, x
    else:
      if x.shape[0] % self.groups:
        raise ValueError(f"batch {x.shape[0]} is not a multiple of {self.groups} groups")
      xg = x.reshape(self.groups, x.shape[0] // self.groups, *x.shape[1:])
      axes = tuple(range(1, xg.ndim - 1))
      xf = xg.astype(f32)
      mean = jnp.mean(xf, axes, keepdims=True)
      var = jnp.maximum(0.0, jnp.mean(jnp.square(xf), axes, keepdims=True) - jnp.square(mean))
      if not self.is_initializing():
        m = self.momentum
        over = tuple(range(xg.ndim - 1))  # groups too: the mean of the group statistics
        ra_mean.value = m * ra_mean.value + (1 - m) * jnp.mean(mean, over)
        ra_var.value = m * ra_var.value + (1 - m) * jnp.mean(var, over)
    y = (xg - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias
    return jnp.asarray(y, self.dtype).reshape(x.shape)
