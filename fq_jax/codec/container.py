"""The .fqz container: preamble, zlib-compressed JSON header, CRC-checked sections.

Layout (all integers little-endian; docs/format.md is the full specification):

    offset  size  field
    0       8     magic b"\\x89FQZ\\r\\n\\x1a\\n"
    8       2     major version (1)
    10      2     minor version (1; readers accept any 1.x)
    12      4     H: stored (deflated) header length in bytes
    16      4     U: header length after inflating (UTF-8 JSON)
    20      4     CRC-32 (zlib.crc32) of bytes 0..19 followed by the H header bytes
    24      H     header: a zlib stream of a UTF-8 JSON object
    24+H    ...   sections, back to back, in the header's "arrays" order

Every byte of the file is covered by a CRC (the header CRC or the section's
CRC listed in the header), and the sections must tile the rest of the file
exactly. This module knows nothing about arrays: it packs/unpacks that frame
and provides bounded readers whose every failure is a `FormatError` naming the
section and the absolute file offset.
"""

from __future__ import annotations

import json
import struct
import zlib

import numpy as np

MAGIC = b"\x89FQZ\r\n\x1a\n"
MAJOR_VERSION = 1
MINOR_VERSION = 1  # 1.1 added the "codebook" kind; 1.0 files read as before
PREAMBLE = struct.Struct("<8sHHIII")
PREAMBLE_SIZE = PREAMBLE.size  # 24
# Inflated header cap: deflate cannot expand more than ~1032x, and no sane
# header needs more than 64 MiB.
MAX_HEADER_RAW = 64 << 20
MAX_INFLATE_RATIO = 1100


class FormatError(ValueError):
  """A malformed .fqz file; the message names the section and byte offset at fault."""


# ----------------------------------------------------------------------------
# Varints (unsigned LEB128)
# ----------------------------------------------------------------------------


def write_varint(out: bytearray, value: int) -> None:
  """Appends `value` (a non-negative int < 2^64) as unsigned LEB128."""
  value = int(value)
  if value < 0 or value >= 1 << 64:
    raise ValueError(f"varint out of range: {value}")
  while value >= 0x80:
    out.append((value & 0x7F) | 0x80)
    value >>= 7
  out.append(value)


def varint_array(values) -> bytes:
  """LEB128 of a sequence of non-negative ints (vectorized for long arrays)."""
  v = np.asarray(values, dtype=np.uint64).ravel()
  if v.size == 0:
    return b""
  if v.size < 64:
    out = bytearray()
    for x in v.tolist():
      write_varint(out, x)
    return bytes(out)
  # Number of 7-bit groups of each value (>= 1), then the groups themselves.
  nbytes = np.ones(v.size, np.int64)
  t = v >> np.uint64(7)
  while t.any():
    nbytes += t > 0
    t >>= np.uint64(7)
  ends = np.cumsum(nbytes)
  total = int(ends[-1])
  out = np.empty(total, np.uint8)
  starts = ends - nbytes
  rest = v.copy()
  for j in range(int(nbytes.max())):
    live = nbytes > j
    idx = starts[live] + j
    group = (rest[live] & np.uint64(0x7F)).astype(np.uint8)
    more = (nbytes[live] > j + 1).astype(np.uint8) << 7
    out[idx] = group | more
    rest >>= np.uint64(7)
  return out.tobytes()


class Reader:
  """Bounded cursor over data[start:end]; failures raise FormatError with offsets.

  Attributes:
    name: what the bytes are, used in messages ("header", "section 3 'conv/kernel'").
    pos: the absolute file offset of the next byte.
  """

  def __init__(self, data, start: int, end: int, name: str):
    self.data = data
    self.pos = start
    self.start = start
    self.end = end
    self.name = name

  def fail(self, message: str, at: int | None = None):
    at = self.pos if at is None else at
    raise FormatError(
      f"{self.name} (file bytes {self.start}..{self.end}): {message} at file offset {at}"
    )

  def remaining(self) -> int:
    return self.end - self.pos

  def varint(self, what: str, limit: int = (1 << 63) - 1) -> int:
    """Reads an unsigned LEB128 of at most 10 bytes, checked against `limit`."""
    start = self.pos
    value = 0
    shift = 0
    while True:
      if self.pos >= self.end:
        self.fail(f"varint {what} runs past the end", start)
      byte = self.data[self.pos]
      self.pos += 1
      value |= (byte & 0x7F) << shift
      if not byte & 0x80:
        break
      shift += 7
      if shift > 63:
        self.fail(f"varint {what} is longer than 10 bytes", start)
    if value > limit:
      self.fail(f"{what} = {value} exceeds its limit {limit}", start)
    return value

  def varints(self, n: int, what: str, limit: int = (1 << 63) - 1) -> np.ndarray:
    """Reads `n` varints (as `varint` would, same errors) into an int64 array, vectorized."""
    if n <= 0:
      return np.zeros(0, np.int64)
    window = np.frombuffer(self.data, np.uint8, min(self.end - self.pos, 10 * n), self.pos)
    ends = np.flatnonzero(window < 0x80)[:n]
    if ends.size == n:
      starts = np.concatenate([[0], ends[:-1] + 1])
      if int((ends - starts).max()) < 9:  # 10-byte varints take the exact scalar path
        used = window[: int(ends[-1]) + 1]
        group = np.repeat(np.arange(n), ends - starts + 1)
        shift = ((np.arange(used.size) - starts[group]) * 7).astype(np.uint64)
        values = np.add.reduceat((used & 0x7F).astype(np.uint64) << shift, starts)
        if not (values > np.uint64(limit)).any():
          self.pos += int(ends[-1]) + 1
          return values.astype(np.int64)
    return np.array([self.varint(what, limit) for _ in range(n)], np.int64)  # the exact error

  def take(self, n: int, what: str) -> bytes:
    if n < 0 or n > self.end - self.pos:
      self.fail(f"{what} needs {n} bytes but only {self.end - self.pos} remain")
    out = bytes(self.data[self.pos : self.pos + n])
    self.pos += n
    return out

  def expect_end(self, what: str):
    if self.pos != self.end:
      self.fail(f"{self.end - self.pos} unexpected trailing bytes after {what}")


# ----------------------------------------------------------------------------
# JSON number helpers: float32 values round-trip exactly through JSON doubles
# ----------------------------------------------------------------------------


def f32_to_json(x) -> float:
  """A Python float whose shortest repr, read back as a double and rounded to
  float32, gives exactly float32 `x` (which must be finite)."""
  v = np.float32(x)
  if not np.isfinite(v):
    raise ValueError(f"non-finite quantizer parameter {v}")
  short = float(str(v))  # numpy prints the shortest repr that identifies the float32
  if np.float32(short).tobytes() == v.tobytes():
    return short
  return float(v)  # the exact double of the float32 value (always round-trips)


def dumps_header(obj: dict) -> bytes:
  return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def pack(header: dict, sections: list[bytes]) -> bytes:
  """Assembles a file; fills the per-section lengths and CRCs into header["arrays"]."""
  arrays = header["arrays"]
  if len(arrays) != len(sections):
    raise ValueError("one section per array entry")
  for entry, sec in zip(arrays, sections):
    entry["bytes"] = len(sec)
    entry["crc"] = zlib.crc32(sec)
  raw = dumps_header(header)
  if len(raw) > MAX_HEADER_RAW:
    raise ValueError(f"header too large ({len(raw)} bytes)")
  stored = zlib.compress(raw, 9)
  head = struct.pack("<8sHHII", MAGIC, MAJOR_VERSION, MINOR_VERSION, len(stored), len(raw))
  crc = zlib.crc32(stored, zlib.crc32(head))
  return b"".join([head, struct.pack("<I", crc), stored, *sections])


def unpack(
  data, max_header_bytes: int = MAX_HEADER_RAW, max_arrays: int | None = None
) -> tuple[dict, list[tuple[int, int]], int]:
  """Validates the frame; returns (header dict, [(section start, end)], header end).

  Checks the magic, version, header CRC, inflated size, JSON syntax and that
  the declared sections tile the file exactly with matching CRCs. The header's
  content (shapes, kinds, ...) is validated by the caller. `max_header_bytes`
  caps the inflated JSON (parsed JSON takes ~10x its size in memory); `max_arrays` the number
  of array entries (checked before any per-entry work).
  """
  size = len(data)
  if size < PREAMBLE_SIZE:
    raise FormatError(
      f"file is {size} bytes, shorter than the {PREAMBLE_SIZE}-byte preamble "
      f"(truncated or not an .fqz file) at offset 0"
    )
  magic, major, minor, stored_len, raw_len, crc = PREAMBLE.unpack_from(data, 0)
  if magic != MAGIC:
    raise FormatError(f"bad magic bytes {magic!r} at offset 0 (not an .fqz file)")
  if major != MAJOR_VERSION:
    raise FormatError(
      f"unsupported format version {major}.{minor} at offset 8 "
      f"(this reader handles {MAJOR_VERSION}.x)"
    )
  header_end = PREAMBLE_SIZE + stored_len
  if header_end > size:
    raise FormatError(
      f"header length {stored_len} at offset 12 runs past the end of the "
      f"{size}-byte file (truncated?)"
    )
  header_bytes = bytes(data[PREAMBLE_SIZE:header_end])
  actual = zlib.crc32(header_bytes, zlib.crc32(bytes(data[0:20])))
  if actual != crc:
    raise FormatError(
      f"header CRC mismatch (stored {crc:#010x}, computed {actual:#010x}) over "
      f"file bytes 0..{header_end}: corrupted preamble or header"
    )
  if raw_len > MAX_HEADER_RAW or raw_len > MAX_INFLATE_RATIO * max(stored_len, 1):
    raise FormatError(f"implausible inflated header size {raw_len} at offset 16")
  if raw_len > max_header_bytes:
    raise FormatError(
      f"inflated header size {raw_len} at offset 16 exceeds the allowed "
      f"{max_header_bytes} bytes (DecodeLimits.max_header_bytes)"
    )
  header = _inflate_json(header_bytes, raw_len, header_end, max_arrays)
  arrays = header.get("arrays")
  if not isinstance(arrays, list):
    raise FormatError("header: 'arrays' must be a list")
  if max_arrays is not None and len(arrays) > max_arrays:
    raise FormatError(
      f"header: {len(arrays)} array entries, more than the allowed {max_arrays} "
      "(DecodeLimits.max_arrays)"
    )
  spans = []
  pos = header_end
  for i, entry in enumerate(arrays):
    if not isinstance(entry, dict):
      raise FormatError(f"header: arrays[{i}] must be an object")
    length, sec_crc = entry.get("bytes"), entry.get("crc")
    if not _is_uint(length) or not _is_uint(sec_crc) or sec_crc >= 1 << 32:
      raise FormatError(f"header: arrays[{i}] needs integer 'bytes' and 32-bit 'crc'")
    if length > size - pos:
      raise FormatError(
        f"section {i} ({_path_of(entry)}) claims {length} bytes at file offset "
        f"{pos}, past the end of the {size}-byte file (truncated?)"
      )
    spans.append((pos, pos + length))
    pos += length
  if pos != size:
    raise FormatError(f"{size - pos} trailing bytes after the last section at file offset {pos}")
  for i, ((start, end), entry) in enumerate(zip(spans, arrays)):
    actual = zlib.crc32(data[start:end])
    if actual != entry["crc"]:
      raise FormatError(
        f"section {i} ({_path_of(entry)}, file bytes {start}..{end}): CRC "
        f"mismatch (stored {entry['crc']:#010x}, computed {actual:#010x})"
      )
  return header, spans, header_end


class _TooManyEntries(Exception):
  pass


def _object_hook(max_arrays: int | None):
  """`_unique_keys`, and stops parsing once more than `max_arrays` objects have a "path" key.

  Every array entry is such an object, so a header declaring too many arrays is refused
  while it is being parsed, at the cost of `max_arrays` entries, not of the whole header.
  """
  seen = [0]

  def hook(pairs: list) -> dict:
    out = _unique_keys(pairs)
    if max_arrays is not None and "path" in out:
      seen[0] += 1
      if seen[0] > max_arrays:
        raise _TooManyEntries
    return out

  return hook


def _inflate_json(header_bytes: bytes, raw_len: int, header_end: int, max_arrays=None) -> dict:
  """The header's JSON object from its zlib bytes (exactly `raw_len` bytes once inflated)."""
  try:
    d = zlib.decompressobj()
    raw = d.decompress(header_bytes, raw_len + 1)
    ok = len(raw) == raw_len and d.eof and not d.unused_data and not d.unconsumed_tail
  except zlib.error as e:
    raise FormatError(
      f"header (file bytes {PREAMBLE_SIZE}..{header_end}) does not inflate: {e}"
    ) from None
  if not ok:
    raise FormatError(
      f"header (file bytes {PREAMBLE_SIZE}..{header_end}) inflates to "
      f"{len(raw)} bytes, not the {raw_len} declared at offset 16"
    )
  try:
    header = json.loads(
      raw.decode("utf-8"),
      parse_constant=_reject_constant,
      object_pairs_hook=_object_hook(max_arrays),
    )
  except _TooManyEntries:
    raise FormatError(
      f"header: more than the allowed {max_arrays} array entries (DecodeLimits.max_arrays)"
    ) from None
  except (UnicodeDecodeError, ValueError, RecursionError) as e:  # ValueError: JSONDecodeError
    raise FormatError(
      f"header (file bytes {PREAMBLE_SIZE}..{header_end}) is not valid "
      f"UTF-8 JSON: {type(e).__name__}: {e}"[:400]
    ) from None
  if not isinstance(header, dict):
    raise FormatError(f"header (file bytes {PREAMBLE_SIZE}..{header_end}) is not a JSON object")
  return header


def _unique_keys(pairs: list) -> dict:
  """JSON objects with a key twice are malformed (RFC 8259 leaves them undefined)."""
  out = dict(pairs)
  if len(out) != len(pairs):
    seen = set()
    dup = next(k for k, _ in pairs if k in seen or seen.add(k))
    raise ValueError(f"duplicate key {dup[:80]!r} in a JSON object")
  return out


def _reject_constant(name):
  raise ValueError(f"non-standard JSON constant {name}")


def _is_uint(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _path_of(entry: dict) -> str:
  p = entry.get("path")
  return repr(p[:200]) if isinstance(p, str) else "?"


def entropy_bits(counts) -> float:
  """Zeroth-order entropy, in bits, of a sequence with these symbol counts (total bits)."""
  c = np.asarray(counts, dtype=np.float64)
  c = c[c > 0]
  total = c.sum()
  if total <= 0:
    return 0.0
  return float(-(c * np.log2(c / total)).sum())


def ceil_div(a: int, b: int) -> int:
  return -(-a // b)


__all__ = [
  "FormatError",
  "Reader",
  "pack",
  "unpack",
  "write_varint",
  "varint_array",
  "f32_to_json",
  "entropy_bits",
  "ceil_div",
]
