"""Model zoo: the Flax linen networks used by the experiments, and a name registry.

Every model is called as ``model.apply(variables, images_nhwc, train=...)`` and returns
float32 logits; BatchNorm statistics live in the ``'batch_stats'`` collection.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn

from fq_jax.models.cifar_resnet import CifarBasicBlock, CifarResNet, cifar_resnet_blocks_per_stage
from fq_jax.models.digits import DigitsCNN
from fq_jax.models.imagenet import (
  BasicBlock,
  Bottleneck,
  MobileNetV1,
  MobileNetV2,
  ResNet,
  mobilenet_v1,
  mobilenet_v2,
  resnet18,
  resnet50,
)
from fq_jax.models.torch_import import (
  export_torch_cifar_resnet,
  import_torch_cifar_resnet,
  infer_cifar_resnet_depth,
  torch_state_to_flax,
)

_REGISTRY: dict[str, Callable[..., nn.Module]] = {
  "digits_cnn": DigitsCNN,
  "cifar_resnet": CifarResNet,  # kwarg depth = 6n+2 (default 20)
  "resnet18": resnet18,
  "resnet50": resnet50,
  "mobilenet_v1": mobilenet_v1,
  "mobilenet_v2": mobilenet_v2,
}

MODEL_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def get_model(name: str, **kwargs: Any) -> nn.Module:
  """Builds a model by registry name.

  Args:
    name: one of ``MODEL_NAMES``: "digits_cnn", "cifar_resnet", "resnet18", "resnet50",
      "mobilenet_v1", "mobilenet_v2".
    **kwargs: module attributes, e.g. ``depth=56`` for "cifar_resnet", ``num_classes``,
      ``dtype=jnp.bfloat16``.

  Returns:
    The unbound Flax module.

  Raises:
    ValueError: for an unknown name (the message lists the valid names) or, for
      "cifar_resnet", a depth that is not ``6 n + 2``.
  """
  try:
    factory = _REGISTRY[name]
  except KeyError:
    raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}") from None
  if name == "cifar_resnet":
    # Validate eagerly so that a bad depth fails here rather than at the first apply.
    cifar_resnet_blocks_per_stage(kwargs.get("depth", CifarResNet.depth))
  return factory(**kwargs)


__all__ = [
  "MODEL_NAMES",
  "BasicBlock",
  "Bottleneck",
  "CifarBasicBlock",
  "CifarResNet",
  "DigitsCNN",
  "MobileNetV1",
  "MobileNetV2",
  "ResNet",
  "cifar_resnet_blocks_per_stage",
  "export_torch_cifar_resnet",
  "get_model",
  "import_torch_cifar_resnet",
  "infer_cifar_resnet_depth",
  "mobilenet_v1",
  "mobilenet_v2",
  "resnet18",
  "resnet50",
  "torch_state_to_flax",
]
