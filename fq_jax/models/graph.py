"""The operations an integer graph is written in: the protocol between models and executors.

Every network in this package has, beside its Flax module, an *integer graph*: a plain
function `graph(ops, x, model)` that walks the same layers in the same order, built from the
same block tables, but calls `ops` for every operation instead of Flax. The integer executor
(`fq_jax.integer.executor`, a layer above) passes itself as `ops`, so the models never import
the integer path; any object with these methods works (e.g. one that counts or prints).

Tensors are opaque to the graph: it only hands what one op returns to the next. Layer names
are module paths ("stage1_block0/conv1"); the executor finds their kernels (and the batch
norm named by `bn`) in the file.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import flax.linen as nn

Tensor = Any


class IntegerOps(Protocol):
  """What a graph may call. Shapes are NHWC; every op returns a new tensor."""

  def conv(
    self,
    path: str,
    x: Tensor,
    bn: str | None = None,
    *,
    stride: int = 1,
    pad: int = 0,
    groups: int = 1,
  ) -> Tensor:
    """Convolution `path` (square kernel, symmetric padding `pad`), then batch norm `bn`."""
    ...

  def dense(self, path: str, x: Tensor, bn: str | None = None) -> Tensor:
    """Dense layer `path` (with its bias when it has one), then batch norm `bn`."""
    ...

  def relu(self, x: Tensor) -> Tensor: ...

  def relu6(self, x: Tensor) -> Tensor: ...

  def add(self, x: Tensor, y: Tensor) -> Tensor:
    """Element-wise sum (residual connections)."""
    ...

  def max_pool(self, x: Tensor, window: int, stride: int, pad: int = 0) -> Tensor:
    """Square max pooling (padding never wins the max)."""
    ...

  def mean_hw(self, x: Tensor) -> Tensor:
    """Global average pooling over H and W: (N, H, W, C) -> (N, C)."""
    ...

  def flatten(self, x: Tensor) -> Tensor:
    """(N, ...) -> (N, prod(...)) in row-major order."""
    ...

  def option_a(self, x: Tensor, stride: int, planes: int) -> Tensor:
    """The CIFAR ResNet "option A" shortcut: subsample by `stride`, pad planes // 4 channels."""
    ...


# graph(ops, x, model) -> logits tensor; `model` is the Flax module whose layers it mirrors.
IntegerGraph = Callable[[IntegerOps, Tensor, nn.Module], Tensor]
