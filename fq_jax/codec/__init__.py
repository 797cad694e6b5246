"""The .fqz compressed-model artifact: container, entropy coders, model <-> file."""

from fq_jax.codec.container import FormatError
from fq_jax.codec.model import (
  DecodedModel,
  artifact_summary,
  decode_model,
  encode_model,
  load_fqz,
  save_fqz,
)

__all__ = [
  "FormatError",
  "DecodedModel",
  "artifact_summary",
  "decode_model",
  "encode_model",
  "load_fqz",
  "save_fqz",
]
