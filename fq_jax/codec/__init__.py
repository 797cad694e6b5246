"""The .fqz compressed-model artifact: container, entropy coders, model <-> file.

Modules: `container` (frame, header, CRCs), `ans` / `huffman` / `positions` (coders),
`layout` (kinds, dtypes, alphabets), `encode` / `decode` (one function per section kind),
`decoded` (`DecodedModel`), `limits` (`DecodeLimits`), `sections` (decoder passes 2-3),
`summary` (`artifact_summary`, the paper-style ratio), `files` (`save_fqz` / `load_fqz`),
`metadata` (`ModelMetadata`), `atomic` (atomic writes), `npz` (named-array .npz files),
`posttrain` (post-training compression of named arrays, behind `fq-jax compress`).
"""

from fq_jax.codec.container import FormatError
from fq_jax.codec.decode import decode_model
from fq_jax.codec.decoded import DecodedModel
from fq_jax.codec.encode import encode_model
from fq_jax.codec.files import load_fqz, save_fqz
from fq_jax.codec.limits import DecodeLimits
from fq_jax.codec.metadata import ModelMetadata
from fq_jax.codec.summary import artifact_summary

__all__ = [
  "FormatError",
  "DecodedModel",
  "DecodeLimits",
  "ModelMetadata",
  "artifact_summary",
  "decode_model",
  "encode_model",
  "load_fqz",
  "save_fqz",
]
