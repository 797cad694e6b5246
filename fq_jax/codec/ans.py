"""rANS entropy coding through `constriction` with exactly specified models.

The file stores each stream's symbol *counts*. Both sides derive integer
frequencies that sum to 2^24 from them with `frequencies` (pure integer
arithmetic, documented in docs/format.md), and hand them to constriction's
`Categorical(perfect=False)` as the floats `f_i - 1`: its fast quantizer
computes left cumulatives floor(F_i * scale) + i with scale exactly 1.0, which
reproduces the integer frequencies bit for bit. The coder is constriction's
`AnsCoder` (rANS, 64-bit state, 32-bit words, 24-bit precision), so a decoder
in another language needs only the few lines of rANS in docs/format.md.
"""

from __future__ import annotations

import constriction
import numpy as np

from fq_jax.codec.container import FormatError

PRECISION = 24
TOTAL = 1 << PRECISION
MAX_COUNT_TOTAL = 1 << 38  # keeps c_i * (2^24 - m) below 2^63


def frequencies(counts: np.ndarray) -> np.ndarray:
  """Integer frequencies (>= 1, summing to 2^24) of the present symbols.

  f_i = 1 + floor(c_i * (2^24 - m) / T) for the m present symbols (c_i > 0,
  in increasing symbol order, T = sum c_i); the remainder 2^24 - sum f_i
  (0 <= r < m) is added to the first symbol with the largest count.
  """
  c = np.asarray(counts, np.int64)
  c = c[c > 0]
  m = c.size
  total = int(c.sum())
  f = 1 + (c * (TOTAL - m)) // total
  f[int(np.argmax(c))] += TOTAL - int(f.sum())
  return f


def _model(counts: np.ndarray):
  f = frequencies(counts)
  return constriction.stream.model.Categorical((f - 1).astype(np.float64), perfect=False)


def encode(streams: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> bytes:
  """One rANS payload holding several streams, decodable in the given order.

  Args:
    streams: (symbols, counts, present) per stream, where `present` are the
      alphabet values with non-zero count (ascending) and `counts` the full
      histogram. Streams with fewer than two present symbols cost no bits and
      are skipped.

  Returns:
    The compressed words, little-endian uint32 bytes (empty if nothing is coded).
  """
  coder = constriction.stream.stack.AnsCoder()
  coded = False
  for symbols, counts, present in reversed(streams):
    if present.size < 2 or symbols.size == 0:
      continue
    if int(present[0]) == 0 and int(present[-1]) == present.size - 1:
      index = np.ascontiguousarray(symbols, np.int32)  # alphabet 0..m-1: symbols are indices
    else:
      lookup = np.zeros(int(present[-1]) + 1, np.int32)
      lookup[present] = np.arange(present.size, dtype=np.int32)
      index = lookup[symbols]
    coder.encode_reverse(index, _model(counts))
    coded = True
  if not coded:
    return b""
  return np.asarray(coder.get_compressed(), "<u4").tobytes()


def decode(
  payload: bytes, streams: list[tuple[int, np.ndarray, np.ndarray]], where: str
) -> list[np.ndarray]:
  """Inverse of `encode`: streams are (count, counts, present); returns int32 arrays.

  Raises FormatError (naming `where`) when the payload is malformed or does
  not end exactly after the last symbol (the coder must be empty).
  """
  if len(payload) % 4:
    raise FormatError(f"{where}: rANS payload of {len(payload)} bytes is not whole 32-bit words")
  words = np.frombuffer(payload, "<u4").astype(np.uint32)
  if words.size and words[-1] == 0:
    raise FormatError(f"{where}: rANS payload ends in a zero word")
  try:
    coder = constriction.stream.stack.AnsCoder(words)
  except Exception as e:  # constriction rejects some malformed inputs itself
    raise FormatError(f"{where}: invalid rANS payload ({e})") from None
  out = []
  for count, counts, present in streams:
    if count == 0:
      out.append(np.zeros(0, np.int32))
    elif present.size < 2:
      out.append(np.full(count, present[0], np.int32))
    else:
      try:
        idx = coder.decode(_model(counts), count)
      except Exception as e:
        raise FormatError(f"{where}: rANS decoding failed ({e})") from None
      contiguous = int(present[0]) == 0 and int(present[-1]) == present.size - 1
      out.append(idx if contiguous else present.astype(np.int32)[idx])
  if not coder.is_empty():
    raise FormatError(
      f"{where}: rANS payload has data left after the last symbol (corrupted or mismatched counts)"
    )
  return out
