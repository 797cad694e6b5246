"""What a `.fqz` file says about the model it holds: one type for the writer and every reader.

The container stores metadata as a JSON object (docs/format.md); `ModelMetadata` is the one
place that knows its keys. `train.py` writes it, `fq-jax evaluate` and the integer path read
it, and files written before this type existed (format 1.1, e.g. `tests/data/*.fqz`) parse
with the rules written in `ModelMetadata.from_json`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

# Keys this type owns; every other key is kept verbatim in `extra`.
_KNOWN_KEYS = (
  "model",
  "architecture",
  "dataset",
  "depth",
  "width",
  "num_classes",
  "bits",
  "seed",
  "activation_bits",
  "activation_scales",
  "bn_bits",
)


@dataclasses.dataclass(frozen=True)
class ActivationScale:
  """The quantizer of one layer's input: `2^exponent * {codes}` with `bits`-bit codes.

  Stored in .fqz metadata as {"exponent": int, "signed": bool} under the
  layer's module path (e.g. "stage1_block0/conv1").
  """

  exponent: int
  signed: bool

  @property
  def scale(self) -> float:
    return math.ldexp(1.0, self.exponent)

  def to_json(self) -> dict:
    return {"exponent": int(self.exponent), "signed": bool(self.signed)}

  @classmethod
  def from_json(cls, obj) -> ActivationScale:
    if isinstance(obj, ActivationScale):
      return obj
    try:
      exponent, signed = obj["exponent"], obj["signed"]
    except (TypeError, KeyError):
      raise ValueError(
        f"an activation scale must be {{'exponent': int, 'signed': bool}}, got {obj!r}"
      ) from None
    if not isinstance(exponent, int) or isinstance(exponent, bool) or not -64 <= exponent <= 64:
      raise ValueError(
        f"activation scale exponent must be an integer in [-64, 64], got {exponent!r}"
      )
    if not isinstance(signed, bool):
      raise ValueError(f"activation scale 'signed' must be a boolean, got {signed!r}")
    return cls(exponent, signed)


def parse_activation_scales(obj) -> dict[str, ActivationScale]:
  """{module path: ActivationScale} from JSON-like metadata (or ActivationScales)."""
  if obj is None:
    return {}
  if not isinstance(obj, Mapping):
    raise ValueError(f"activation scales must be a mapping, got {type(obj).__name__}")
  return {str(k): ActivationScale.from_json(v) for k, v in obj.items()}


def _optional_int(obj: Mapping, key: str) -> int | None:
  value = obj.get(key)
  if value is None:
    return None
  if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
    raise ValueError(f"metadata {key!r} must be an integer, got {value!r}")
  return int(value)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelMetadata:
  """The model a `.fqz` file holds, as far as its metadata says.

  Attributes:
    model: model registry name (`fq_jax.models.MODEL_NAMES`), or None when the
      file does not say (the integer path then infers it from the array paths).
    dataset: dataset registry name ("digits", "cifar10", "imagenet2012") or None.
    depth: CIFAR ResNet depth (6n+2), or None.
    width: MobileNet width multiplier, or None.
    num_classes: classifier outputs, or None.
    bits: the default quantizer bit-width the file was written with, or None.
    seed: the run's seed, or None.
    activation_bits: integer activation code width (0: float activations).
    activation_scales: {module path: ActivationScale} (empty without integer activations).
    bn_bits: integer batch-norm width (0: float batch norm).
    extra: every other metadata key, verbatim (e.g. `fq-jax compress`'s tool,
      source, sparsity, w_sep, rules).
  """

  model: str | None = None
  dataset: str | None = None
  depth: int | None = None
  width: float | None = None
  num_classes: int | None = None
  bits: int | None = None
  seed: int | None = None
  activation_bits: int = 0
  activation_scales: Mapping[str, ActivationScale] = dataclasses.field(default_factory=dict)
  bn_bits: int = 0
  extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def to_json(self) -> dict[str, Any]:
    """The JSON object stored in the file (keys with no value are left out)."""
    out: dict[str, Any] = dict(self.extra)
    if self.model is not None:
      # "architecture" is what format-1.1 readers look for first; "model" is the label.
      out["model"] = self.model
      out["architecture"] = self.model
    for key in ("dataset", "depth", "width", "num_classes", "bits", "seed"):
      value = getattr(self, key)
      if value is not None:
        out[key] = value
    if self.activation_bits:
      out["activation_bits"] = int(self.activation_bits)
      out["activation_scales"] = {p: s.to_json() for p, s in self.activation_scales.items()}
    if self.bn_bits:
      out["bn_bits"] = int(self.bn_bits)
    return out

  @classmethod
  def from_json(cls, obj: Mapping[str, Any] | None) -> ModelMetadata:
    """Parses stored metadata, including files written by format-1.1 code.

    Rules for older files: the model name is "architecture" if present, else
    "model"; a "cifar_resnet-<depth>" label (train.py before this type) gives
    model "cifar_resnet" and that depth unless "depth" is present.

    Raises:
      ValueError: (one line) naming the key whose value has the wrong type.
    """
    obj = dict(obj or {})
    name = obj.get("architecture") or obj.get("model")
    depth = _optional_int(obj, "depth")
    if name is not None and not isinstance(name, str):
      raise ValueError(f"metadata 'model' must be a string, got {name!r}")
    if isinstance(name, str) and name.startswith("cifar_resnet-"):
      label_depth = name.partition("-")[2]
      name = "cifar_resnet"
      if depth is None and label_depth.isdigit():
        depth = int(label_depth)
    dataset = obj.get("dataset")
    if dataset is not None and not isinstance(dataset, str):
      raise ValueError(f"metadata 'dataset' must be a string, got {dataset!r}")
    width = obj.get("width")
    if width is not None and (isinstance(width, bool) or not isinstance(width, (int, float))):
      raise ValueError(f"metadata 'width' must be a number, got {width!r}")
    activation_bits = _optional_int(obj, "activation_bits") or 0
    scales = parse_activation_scales(obj.get("activation_scales")) if activation_bits else {}
    return cls(
      model=name,
      dataset=dataset,
      depth=depth,
      width=None if width is None else float(width),
      num_classes=_optional_int(obj, "num_classes"),
      bits=_optional_int(obj, "bits"),
      seed=_optional_int(obj, "seed"),
      activation_bits=activation_bits,
      activation_scales=scales,
      bn_bits=_optional_int(obj, "bn_bits") or 0,
      extra={k: v for k, v in obj.items() if k not in _KNOWN_KEYS},
    )
