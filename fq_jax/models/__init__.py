"""Model zoo: the Flax linen networks used by the experiments, and the one name registry.

Every model is called as `model.apply(variables, images_nhwc, train=...)` and returns
float32 logits; BatchNorm statistics live in the `'batch_stats'` collection. Beside each
network sits its *integer graph* (the same layers written in the operations of
`fq_jax.models.graph.IntegerOps`), which the integer inference path runs.

To add a model: write the module and its integer graph beside it, and add one
`ModelEntry` to `_REGISTRY`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn

from fq_jax.models.batchnorm import GroupedBatchNorm
from fq_jax.models.cifar_resnet import (
  CIFAR_RESNET_STAGE_PLANES,
  CifarBasicBlock,
  CifarResNet,
  cifar_resnet_blocks_per_stage,
  cifar_resnet_integer_graph,
)
from fq_jax.models.digits import DigitsCNN, digits_integer_graph
from fq_jax.models.graph import IntegerGraph, IntegerOps
from fq_jax.models.imagenet import (
  MOBILENET_V1_BLOCKS,
  MOBILENET_V2_SETTINGS,
  RESNET_STAGE_PLANES,
  BasicBlock,
  Bottleneck,
  MobileNetV1,
  MobileNetV2,
  ResNet,
  mobilenet_v1,
  mobilenet_v1_integer_graph,
  mobilenet_v2,
  mobilenet_v2_integer_graph,
  resnet18,
  resnet50,
  resnet_integer_graph,
)
from fq_jax.models.torch_import import (
  export_torch_cifar_resnet,
  import_torch_cifar_resnet,
  infer_cifar_resnet_depth,
  torch_state_to_flax,
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelEntry:
  """One registered model.

  Attributes:
    factory: builds the Flax module from keyword arguments.
    integer_graph: the same network written in `IntegerOps` (`fq_jax.models.graph`).
  """

  factory: Callable[..., nn.Module]
  integer_graph: IntegerGraph


_REGISTRY: dict[str, ModelEntry] = {
  "digits_cnn": ModelEntry(factory=DigitsCNN, integer_graph=digits_integer_graph),
  # kwarg depth = 6n+2 (default 20)
  "cifar_resnet": ModelEntry(factory=CifarResNet, integer_graph=cifar_resnet_integer_graph),
  "resnet18": ModelEntry(factory=resnet18, integer_graph=resnet_integer_graph),
  "resnet50": ModelEntry(factory=resnet50, integer_graph=resnet_integer_graph),
  "mobilenet_v1": ModelEntry(factory=mobilenet_v1, integer_graph=mobilenet_v1_integer_graph),
  "mobilenet_v2": ModelEntry(factory=mobilenet_v2, integer_graph=mobilenet_v2_integer_graph),
}

MODEL_NAMES: tuple[str, ...] = tuple(_REGISTRY)
# Models whose BatchNorm takes `bn_groups` (statistics per block of the batch).
BN_GROUPED_MODELS: tuple[str, ...] = ("resnet18", "resnet50", "mobilenet_v1", "mobilenet_v2")


def _entry(name: str) -> ModelEntry:
  try:
    return _REGISTRY[name]
  except KeyError:
    raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}") from None


def build(name: str, **kwargs: Any) -> nn.Module:
  """Builds a model by registry name.

  Args:
    name: one of `MODEL_NAMES`: "digits_cnn", "cifar_resnet", "resnet18", "resnet50",
      "mobilenet_v1", "mobilenet_v2".
    **kwargs: module attributes, e.g. `depth=56` for "cifar_resnet", `num_classes`,
      `dtype=jnp.bfloat16` (the computation dtype: parameters and batch statistics stay
      float32, logits are float32), `bn_groups=jax.device_count()` for the ImageNet models
      (`BN_GROUPED_MODELS`: per-device BatchNorm statistics, see `GroupedBatchNorm`).

  Returns:
    The unbound Flax module.

  Raises:
    ValueError: for an unknown name (the message lists the valid names) or, for
      "cifar_resnet", a depth that is not `6 n + 2`.
  """
  entry = _entry(name)
  if name == "cifar_resnet":
    # Validate eagerly so that a bad depth fails here rather than at the first apply.
    cifar_resnet_blocks_per_stage(kwargs.get("depth", CifarResNet.depth))
  return entry.factory(**kwargs)


get_model = build  # the name used before the registry had an integer graph per model


def integer_graph(name: str) -> IntegerGraph:
  """The integer graph of model `name`: `graph(ops, x, build(name, ...))` (see `graph`).

  Raises:
    ValueError: for an unknown name.
  """
  return _entry(name).integer_graph


__all__ = [
  "BN_GROUPED_MODELS",
  "CIFAR_RESNET_STAGE_PLANES",
  "MOBILENET_V1_BLOCKS",
  "MOBILENET_V2_SETTINGS",
  "MODEL_NAMES",
  "RESNET_STAGE_PLANES",
  "IntegerGraph",
  "IntegerOps",
  "ModelEntry",
  "BasicBlock",
  "Bottleneck",
  "CifarBasicBlock",
  "CifarResNet",
  "DigitsCNN",
  "GroupedBatchNorm",
  "MobileNetV1",
  "MobileNetV2",
  "ResNet",
  "build",
  "cifar_resnet_blocks_per_stage",
  "export_torch_cifar_resnet",
  "get_model",
  "import_torch_cifar_resnet",
  "infer_cifar_resnet_depth",
  "integer_graph",
  "mobilenet_v1",
  "mobilenet_v2",
  "resnet18",
  "resnet50",
  "torch_state_to_flax",
]
