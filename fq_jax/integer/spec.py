"""What a decoded `.fqz` file says about its model, resolved to a buildable model.

The metadata is read through `fq_jax.codec.metadata.ModelMetadata` (the one type the writer
and every reader share). A file whose metadata leaves the model, the class count, the
CIFAR ResNet depth or the MobileNet width unsaid (e.g. one written by `fq-jax compress` from
a bare `.npz`) is completed from its array paths and shapes by `_infer_from_arrays`, the one
place that guesses.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn

from fq_jax import models
from fq_jax.codec.metadata import ActivationScale, ModelMetadata


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """Architecture, dataset and quantization settings of a file.

  Attributes:
    name: model registry name (see `fq_jax.models.MODEL_NAMES`).
    kwargs: constructor arguments (num_classes, depth for cifar_resnet, width
      for MobileNets).
    dataset: dataset registry name (`fq_jax.data.DATASETS`) or None.
    activation_bits: activation code width (0: none recorded).
    activation_scales: {module path: ActivationScale}.
    bn_bits: integer batch-norm width recorded by training (0: float).
  """

  name: str
  kwargs: dict
  dataset: str | None
  activation_bits: int
  activation_scales: Mapping[str, ActivationScale]
  bn_bits: int


def _infer_from_arrays(arrays: Mapping[str, Any], meta: ModelMetadata) -> dict[str, Any]:
  """The model name and constructor arguments the metadata leaves out, from the arrays.

  The fallback for files without (complete) model metadata: the architecture is recognized
  by parameter paths unique to it, num_classes is the head's output size, a CIFAR ResNet's
  depth is 6 n + 2 with n its stage-1 blocks, and a MobileNet's width is its stem's channels
  over 32 (exact for the widths whose stem is not rounded, e.g. 0.25, 0.5, 0.75, 1).

  Returns:
    {"name": str | None, "num_classes": int | None, "depth": int | None,
    "width": float | None}, each taken from `meta` when it says.
  """
  paths = set(arrays)
  has = lambda s: any(s in p for p in paths)  # noqa: E731
  name = meta.model
  if name is None:
    if has("params/fc1/kernel") and has("params/conv2/kernel"):
      name = "digits_cnn"
    elif has("params/block0/dw_conv"):
      name = "mobilenet_v2" if has("params/conv_last") else "mobilenet_v1"
    elif has("params/stage4_block0"):
      name = "resnet50" if has("/conv3/kernel") else "resnet18"
    elif has("params/stage1_block0/conv1"):
      name = "cifar_resnet"
  head = arrays.get("params/head/kernel")
  num_classes = meta.num_classes or (None if head is None else int(head.shape[-1]))
  depth = meta.depth
  if name == "cifar_resnet" and depth is None:
    blocks = {int(m.group(1)) for p in paths if (m := re.match(r"params/stage1_block(\d+)/", p))}
    depth = 6 * (max(blocks) + 1) + 2 if blocks else None
  width = meta.width
  stem = arrays.get("params/conv_init/kernel")
  if name is not None and name.startswith("mobilenet") and width is None and stem is not None:
    width = int(stem.shape[-1]) / models.imagenet.MOBILENET_STEM
  return {"name": name, "num_classes": num_classes, "depth": depth, "width": width}


def model_spec(decoded) -> ModelSpec:
  """Reads the architecture and quantization settings of a decoded file.

  Args:
    decoded: a `DecodedModel` (its `metadata` and `arrays` are read).

  Returns:
    The `ModelSpec`.

  Raises:
    ValueError: (one line) when the metadata is malformed or the architecture cannot be
      determined.
  """
  meta = ModelMetadata.from_json(decoded.metadata)
  found = _infer_from_arrays(decoded.arrays, meta)
  name = found["name"]
  if name not in models.MODEL_NAMES:
    raise ValueError(
      f"the file's model {name!r} is not one of {', '.join(models.MODEL_NAMES)}"
      if name
      else "the file's metadata names no model and its arrays match none"
    )
  if "params/head/kernel" not in decoded.arrays:
    raise ValueError("the file has no params/head/kernel")
  kwargs: dict[str, Any] = {"num_classes": found["num_classes"]}
  if name == "cifar_resnet":
    kwargs["depth"] = found["depth"]
  if name.startswith("mobilenet") and found["width"] is not None:
    kwargs["width"] = found["width"]
  return ModelSpec(
    name=name,
    kwargs=kwargs,
    dataset=meta.dataset,
    activation_bits=meta.activation_bits,
    activation_scales=dict(meta.activation_scales),
    bn_bits=meta.bn_bits,
  )


def build_float_model(spec: ModelSpec, **overrides: Any) -> nn.Module:
  """The Flax module of `spec` (`overrides`, e.g. dtype=, replace its constructor arguments)."""
  return models.build(spec.name, **{**spec.kwargs, **overrides})
