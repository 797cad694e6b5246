"""`DecodeLimits`: what decoding one .fqz file may cost, checked before anything is allocated.

The decoder adds up, from the header alone, every buffer it will hold at once (the rebuilt
arrays, masks, index and symbol buffers, stream tables, Huffman windows and per-array
bookkeeping) and refuses the file with a `FormatError` when the total exceeds
`max_output_bytes`; its work is linear in that total, so the same bound caps decode time.
docs/format.md ("Limits") lists the defaults and the accounting.
"""

from __future__ import annotations

import dataclasses

# Accounting, in bytes (docs/format.md, "Limits"): what the reference decoder holds at once.
PER_SYMBOL_BYTES = 48  # per coded symbol: decoded int32 symbol, int64 cumsum/index temporaries
PER_ELEMENT_MASK_BYTES = 1  # per element of a coded array: its bool keep-mask
PER_STATE_ELEMENT_BYTES = 5  # per element of a focused/codebook array: int32 symbols + bool m_w
PER_ARRAY_BYTES = 4096  # per array entry: parsed JSON, bookkeeping, the `layers` row
PER_TABLE_ENTRY_BYTES = 16  # per stored table entry (bounded by the section's bytes)
PER_HUFFMAN_BYTE = 10  # per Huffman payload byte: padded copy and 64-bit windows
PER_HUFFMAN_LANE = 128  # per Huffman lane: start/end/count/base/shift/stream columns, sorted
PER_CODEWORD_BYTES = 8  # per codebook codeword


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecodeLimits:
  """Resource limits of `decode_model` / `load_fqz` (all checked before allocating).

  Attributes:
    max_output_bytes: the most the decoder may hold at once (see the module
      docstring for what is counted). None (default): `expansion` times the
      file size plus `allowance`.
    expansion: bytes of allowance per file byte when `max_output_bytes` is
      None (default 1024: a 97%-sparse model decodes to ~100x its file).
    allowance: bytes of allowance on top (default 16 MiB).
    max_arrays: most array entries a file may declare (default 65,536;
      ResNet-50 has 320).
    max_header_bytes: most bytes the header JSON may inflate to (default
      None: `max_output_bytes / 16`, at most the format's 64 MiB).
  """

  max_output_bytes: int | None = None
  expansion: int = 1024
  allowance: int = 16 << 20
  max_arrays: int = 1 << 16
  max_header_bytes: int | None = None

  def __post_init__(self):
    for name in ("max_output_bytes", "max_header_bytes"):
      value = getattr(self, name)
      if value is not None and (not isinstance(value, int) or value < 0):
        raise ValueError(f"DecodeLimits.{name} must be None or a non-negative int, got {value!r}")
    for name in ("expansion", "allowance", "max_arrays"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"DecodeLimits.{name} must be a non-negative int, got {value!r}")

  def output_bytes(self, file_bytes: int) -> int:
    """The memory allowance for a file of `file_bytes` bytes."""
    if self.max_output_bytes is not None:
      return self.max_output_bytes
    return self.expansion * file_bytes + self.allowance

  def header_bytes(self, file_bytes: int, max_format: int) -> int:
    """The inflated-header allowance for a file of `file_bytes` bytes."""
    if self.max_header_bytes is not None:
      return min(self.max_header_bytes, max_format)
    return min(self.output_bytes(file_bytes) // 16, max_format)
