"""Compatibility alias for the module `encode`/`decode`/`summary`/`files` replaced (issue 9).

`fq_jax/cli` still calls `fq.codec.model.dtype_name`; once it imports
`fq_jax.codec.layout.dtype_name` this module can go.
"""

from fq_jax.codec.decode import decode_model
from fq_jax.codec.decoded import DecodedModel
from fq_jax.codec.encode import encode_model
from fq_jax.codec.files import load_fqz, save_fqz
from fq_jax.codec.layout import dtype_name
from fq_jax.codec.summary import artifact_summary

__all__ = [
  "DecodedModel",
  "artifact_summary",
  "decode_model",
  "dtype_name",
  "encode_model",
  "load_fqz",
  "save_fqz",
]
