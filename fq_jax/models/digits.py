"""A small CNN for scikit-learn's 8x8 digits (the embedded default dataset).

Big enough (~69k parameters in two conv layers, a hidden dense layer and the head) that pruning and
quantization have something to remove, small enough to train to ~98% test accuracy in a few
seconds on a CPU.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fq_jax.models.graph import IntegerOps


class DigitsCNN(nn.Module):
  """conv3x3(32)-BN-ReLU, conv3x3(64)-BN-ReLU, maxpool 2, dense(48)-BN-ReLU, dense(classes).

  Parameter paths: `conv1/kernel`, `bn1/scale`, `conv2/kernel`, `fc1/kernel`,
  `head/kernel` and so on.

  Attributes:
    num_classes: output size (10 digits).
    dtype: computation dtype; parameters stay float32 and logits are float32.
  """

  num_classes: int = 10
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Computes logits.

    Args:
      x: `(batch, 8, 8, 1)` images in [0, 1] (see `fq_jax.data.digits`).
      train: batch statistics (True) or running averages (False) in BatchNorm.

    Returns:
      float32 logits `(batch, num_classes)`.
    """
    bn = lambda name: nn.BatchNorm(  # noqa: E731 - local shorthand
      use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype, name=name
    )
    x = jnp.asarray(x, self.dtype)
    # Convolutions without bias: the following BatchNorm's shift makes a bias redundant.
    x = nn.Conv(32, (3, 3), padding="SAME", use_bias=False, dtype=self.dtype, name="conv1")(x)
    x = nn.relu(bn("bn1")(x))
    x = nn.Conv(64, (3, 3), padding="SAME", use_bias=False, dtype=self.dtype, name="conv2")(x)
    x = nn.relu(bn("bn2")(x))
    x = nn.max_pool(x, (2, 2), strides=(2, 2))  # 8x8 -> 4x4
    x = x.reshape(x.shape[0], -1)  # 4*4*64 = 1024 features
    x = nn.Dense(48, use_bias=False, dtype=self.dtype, name="fc1")(x)
    x = nn.relu(bn("bn3")(x))
    x = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)
    return jnp.asarray(x, jnp.float32)


def digits_integer_graph(ops: IntegerOps, x, model: DigitsCNN):
  """`DigitsCNN` written in `ops` (see `fq_jax.models.graph`): the integer path's graph."""
  del model  # one fixed architecture (num_classes only changes the head's kernel)
  x = ops.relu(ops.conv("conv1", x, "bn1", pad=1))
  x = ops.relu(ops.conv("conv2", x, "bn2", pad=1))
  x = ops.flatten(ops.max_pool(x, 2, 2))
  x = ops.relu(ops.dense("fc1", x, "bn3"))
  return ops.dense("head", x)
