"""What a .fqz array entry may say: kinds, coders, dtypes and symbol alphabets.

Shared by the encoder (`encode.py`) and the decoder (`decode.py`) so the two agree by
construction; docs/format.md is the byte-level specification.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from fq_jax.codec import container

CODERS = ("ans", "huffman")
KINDS = ("raw", "pruned", "focused", "codebook")
# Kinds whose kept weights are stored as entropy-coded symbols.
SYMBOL_KINDS = ("focused", "codebook")
MAX_CODEWORDS = 1 << 16
DTYPES: dict[str, np.dtype] = {
  name: np.dtype(t)
  for name, t in [
    ("bool", np.bool_),
    ("int8", np.int8),
    ("uint8", np.uint8),
    ("int16", np.int16),
    ("uint16", np.uint16),
    ("int32", np.int32),
    ("uint32", np.uint32),
    ("int64", np.int64),
    ("uint64", np.uint64),
    ("float16", np.float16),
    ("bfloat16", ml_dtypes.bfloat16),
    ("float32", np.float32),
    ("float64", np.float64),
  ]
}
FLOATS = ("float16", "bfloat16", "float32", "float64")
# float64 layers are quantized in float32 (as JAX without x64 would) and widened exactly.
FOCUSED_DTYPES = ("float16", "bfloat16", "float32", "float64")
MAX_NDIM = 32
# The legal range of a focused layer's `quant.bias` (docs/format.md): beyond it every shift
# value is already 0 or +-inf in float32, and t - 1 - b stays far from int32 overflow.
MIN_BIAS, MAX_BIAS = -(1 << 15), (1 << 15) - 1


def dtype_name(dtype) -> str:
  """The file's name of a NumPy dtype; ValueError for unsupported ones."""
  dt = np.dtype(dtype)
  name = dt.name
  if name not in DTYPES or dt.fields is not None or dt.subdtype is not None:
    raise ValueError(f"unsupported dtype {dt} (supported: {', '.join(DTYPES)})")
  return name


def little_endian(name: str) -> np.dtype:
  """The file's byte layout of a dtype name: little-endian."""
  return DTYPES[name].newbyteorder("<") if DTYPES[name].itemsize > 1 else DTYPES[name]


def float_json(x) -> float | str:
  """A float32 scalar as the header writes it (non-finite values as strings)."""
  v = np.float32(x)
  if np.isnan(v):
    return "NaN"
  if np.isinf(v):
    return "Infinity" if v > 0 else "-Infinity"
  return container.f32_to_json(v)


def num_symbols(params: dict) -> int:
  """Alphabet size of a focused layer's symbols (docs/format.md, "focused")."""
  k = params["bits"] - (3 if params["recentralized"] else 2)
  per = 2 ** (k + 1) + 1
  return 2 * per if params["recentralized"] else per


def entropy_bits(symbols: np.ndarray, hist: np.ndarray | None = None) -> float:
  """Total zeroth-order entropy of a symbol stream (from its histogram if known)."""
  if symbols.size == 0:
    return 0.0
  if hist is None:
    # A histogram over the alphabet could be 2^24 entries for a handful of symbols.
    small = int(symbols.max()) < 4 * symbols.size + 1024
    hist = np.bincount(symbols) if small else np.unique(symbols, return_counts=True)[1]
  return container.entropy_bits(hist)
