"""`DecodedModel`: what `decode_model` rebuilds from a file, with lazily built states."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from fq_jax._src import codebook as codebook_lib
from fq_jax._src import quantizers
from fq_jax.codec.metadata import ModelMetadata


class Lazy(Mapping):
  """A read-only mapping whose values are built on first access (and cached)."""

  def __init__(self, builders: dict):
    self._builders = builders
    self._values: dict = {}

  def __getitem__(self, key):
    if key not in self._values:
      self._values[key] = self._builders[key]()
    return self._values[key]

  def __iter__(self):
    return iter(self._builders)

  def __len__(self):
    return len(self._builders)

  def __repr__(self):
    return f"{{{', '.join(map(repr, self._builders))}}} (built on access)"


def full_symbols(size, shape, kept_idx, sym):
  """A layer's int32 symbols at every position (0 where pruned)."""
  full = np.zeros(size, np.int32)
  full[kept_idx] = sym
  return full.reshape(shape)


def codebook_state(book, size, shape, kept_idx, sym, mask):
  """The CodebookState of a decoded codebook layer (NumPy fields)."""
  return codebook_lib.CodebookState(
    codebook=book, symbols=full_symbols(size, shape, kept_idx, sym), mask=mask
  )


def focus_state(p, size, shape, kept_idx, sym, mask):
  """The FocusState of a decoded layer; m_w = (symbol >= 2^(k+1) + 1) for kept weights."""
  assignment = np.zeros(size, bool)
  if p["recentralized"]:
    assignment[kept_idx] = sym >= 2 ** (p["bits"] - 2) + 1
  return quantizers.FocusState(
    recentralized=np.bool_(p["recentralized"]),
    bits=np.int32(p["bits"]),
    means=np.array(p["means"], np.float32),
    sigma=np.float32(p["sigma"]),
    bias=np.int32(p["bias"]),
    assignment=assignment.reshape(shape),
    mask=mask,
    alpha=np.float32(p["alpha"]),
    gmm=p["gmm"],
    separation=p["separation"],
  )


@dataclasses.dataclass
class DecodedModel:
  """What `decode_model` rebuilds from a file.

  Attributes:
    arrays: path -> array (original dtype and shape; focused layers hold
      their quantized values, pruned entries are 0).
    focus: path -> `fq.FocusState` of focused layers (NumPy fields; the
      assignment is derived from the symbols, the mask from the positions).
      Built on first access.
    masks: path -> bool keep-mask of focused and pruned layers.
    symbols: path -> int32 symbols of focused layers (0 where pruned), as
      `fq.focused_symbols` gives them. Built on first access.
    metadata: the header's metadata dict (`model_metadata` parses it).
    coder: "ans" or "huffman".
    version: (major, minor) format version.
    file_bytes: size of the file.
    header_bytes: bytes of the preamble and header.
    layers: one dict per array, in file order: path, shape, dtype, stored,
      kind, size, kept, section_bytes, coded_bytes (section minus raw kept
      values and codebooks), position/symbol entropies and the entropy bound
      in bytes, the quantizer parameters of focused layers and the number of
      codewords of codebook layers.
    codebooks: path -> `fq.CodebookState` of codebook layers (NumPy
      fields: the float32 codebook, the int32 symbols, 0 where pruned, and
      the mask). Built on first access.
  """

  arrays: dict[str, np.ndarray]
  focus: Mapping[str, quantizers.FocusState]
  masks: dict[str, np.ndarray]
  symbols: Mapping[str, np.ndarray]
  metadata: dict
  coder: str
  version: tuple[int, int]
  file_bytes: int
  header_bytes: int
  layers: list[dict]
  codebooks: Mapping[str, codebook_lib.CodebookState] = dataclasses.field(default_factory=dict)

  @property
  def model_metadata(self) -> ModelMetadata:
    """The metadata as the one `ModelMetadata` type (ValueError when it does not parse)."""
    return ModelMetadata.from_json(self.metadata)

  def tree(self) -> dict:
    """The arrays as a nested dict, splitting paths on '/'.

    Raises:
      ValueError: when one path is a prefix of another ('a' and 'a/b').
    """
    root: dict = {}
    for path, value in self.arrays.items():
      parts = path.split("/")
      node = root
      for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
          raise ValueError(f"path {path!r} runs through the array {part!r}")
        node = child
      if parts[-1] in node:
        raise ValueError(f"path {path!r} is both an array and a subtree")
      node[parts[-1]] = value
    return root

  def summary(self) -> dict:
    """`fq.artifact_summary(self)`."""
    from fq_jax.codec import summary  # summary imports this module

    return summary.artifact_summary(self)
