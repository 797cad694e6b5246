"""Length-limited canonical Huffman coding, vectorized with NumPy.

Codes: optimal Huffman code lengths (package-merge when the plain Huffman
code would exceed `max_len`), assigned canonically: present symbols sorted by
(length, symbol value) get consecutive code values, DEFLATE-style, so the
code is determined by the lengths alone. Bits are written MSB first.

Streams are cut into *lanes* of `lane` consecutive symbols; the lanes' bit
strings are concatenated and each lane's bit length is stored. Decoding runs
all lanes of all streams of a file in lockstep (one table lookup per lane and
step, as parallel hardware decoders would), so the Python-level loop has
`lane` iterations however large the model is.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import numpy as np

from fq_jax.codec.container import FormatError

FORMAT_MAX_LEN = 24  # longest code length a file may use
DEFAULT_MAX_LEN = 16  # what the encoder produces (64K-entry decode tables)
FORMAT_MAX_LANE = 1 << 16  # largest lane size a file may declare
DEFAULT_LANE = 1024


# ----------------------------------------------------------------------------
# Code construction
# ----------------------------------------------------------------------------


def _huffman_lengths(weights: Sequence[int]) -> list[int]:
  """Plain Huffman code lengths (>= 1) for >= 2 positive weights.

  Merges the two lightest nodes (ties: lower node id first, leaves before
  merged nodes) and returns each leaf's depth in the resulting tree.
  """
  n = len(weights)
  heap = [(w, i) for i, w in enumerate(weights)]
  heapq.heapify(heap)
  parent = [0] * (2 * n - 1)
  node = n
  while len(heap) > 1:
    w1, a = heapq.heappop(heap)
    w2, b = heapq.heappop(heap)
    parent[a] = parent[b] = node
    heapq.heappush(heap, (w1 + w2, node))
    node += 1
  depth = [0] * (2 * n - 1)
  for i in range(2 * n - 3, -1, -1):  # parents are created after their children
    depth[i] = depth[parent[i]] + 1
  return depth[:n]


def _package_merge(weights: Sequence[int], max_len: int) -> list[int]:
  """Optimal code lengths <= max_len (Larmore & Hirschberg's package-merge).

  Each level is the sorted merge of the leaves with the pairs ("packages") of
  the level below; the first 2n - 2 items of the top level are selected, and
  selecting the first k packages of a level selects the first 2k items of the
  level below. A symbol's code length is the number of levels where its leaf
  is selected.
  """
  n = len(weights)
  leaves = sorted((w, i) for i, w in enumerate(weights))
  levels = []
  prev: list[tuple[int, int]] = []
  for _ in range(max_len):
    packages = [(prev[2 * k][0] + prev[2 * k + 1][0], -1) for k in range(len(prev) // 2)]
    merged = sorted([(w, 0, i) for w, i in leaves] + [(w, 1, -1) for w, _ in packages])
    level = [(w, i) for w, _, i in merged]
    levels.append(level)
    prev = level
  lengths = [0] * n
  take = 2 * n - 2
  for level in reversed(levels):
    packages = 0
    for _, i in level[:take]:
      if i >= 0:
        lengths[i] += 1
      else:
        packages += 1
    take = 2 * packages
  return lengths


def code_lengths(counts: np.ndarray, max_len: int = DEFAULT_MAX_LEN) -> np.ndarray:
  """Length-limited Huffman code lengths for a histogram (0 = absent symbol).

  A single present symbol gets length 1 but is coded with zero bits (its
  stream carries no payload). Code lengths never exceed `max_len`.
  """
  counts = np.asarray(counts, np.int64)
  lengths = np.zeros(counts.shape, np.int64)
  present = np.flatnonzero(counts > 0)
  if present.size == 0:
    return lengths
  if present.size == 1:
    lengths[present] = 1
    return lengths
  if present.size > 1 << max_len:
    raise ValueError(f"{present.size} symbols cannot have codes of at most {max_len} bits")
  weights = counts[present].tolist()
  lens = _huffman_lengths(weights)
  if max(lens) > max_len:
    lens = _package_merge(weights, max_len)
  lengths[present] = lens
  return lengths


def canonical_order(lengths: np.ndarray) -> np.ndarray:
  """Present symbols sorted by (length, symbol): the order of their code values."""
  present = np.flatnonzero(lengths > 0)
  return present[np.lexsort((present, lengths[present]))]


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
  """Code values (uint64, read MSB first over `length` bits) for every symbol."""
  lengths = np.asarray(lengths, np.int64)
  codes = np.zeros(lengths.shape, np.uint64)
  code = 0
  prev = 0
  for s in canonical_order(lengths).tolist():
    l = int(lengths[s])
    code <<= l - prev
    prev = l
    codes[s] = code
    code += 1
  return codes


# ----------------------------------------------------------------------------
# Encoding
# ----------------------------------------------------------------------------


def pack_bits(aligned: np.ndarray, lengths: np.ndarray) -> tuple[bytes, np.ndarray]:
  """Concatenates codes (MSB first) into bytes; also returns each code's end bit.

  Args:
    aligned: each code left-aligned in a uint64 (code << (64 - length)).
    lengths: each code's length in bits (1..24).

  Vectorized: a code starting at bit r of 64-bit big-endian word q puts
  `aligned >> r` into word q and `aligned << (64 - r)` (0 for r = 0, NumPy
  defines over-wide shifts as 0) into word q + 1. Codes sharing a word are
  OR-reduced with `reduceat` (their bits do not overlap).
  """
  aligned = np.array(aligned, np.uint64)  # a copy: reused as scratch below
  lengths = np.asarray(lengths, np.uint8)
  if aligned.size == 0:
    return b"", np.zeros(0, np.uint64)
  ends = np.cumsum(lengths, dtype=np.uint64)
  total = int(ends[-1])
  starts = ends - lengths
  q = starts >> np.uint64(6)
  r = np.bitwise_and(starts, np.uint64(63), out=starts)
  hi = aligned >> r
  lo = np.left_shift(aligned, np.subtract(np.uint64(64), r, out=r), out=aligned)
  new_word = np.empty(q.size, bool)
  new_word[0] = True
  np.not_equal(q[1:], q[:-1], out=new_word[1:])
  first = np.flatnonzero(new_word)
  words = np.zeros(total // 64 + 2, np.uint64)
  qf = q[first]
  words[qf] = np.bitwise_or.reduceat(hi, first)
  words[qf + np.uint64(1)] |= np.bitwise_or.reduceat(lo, first)
  data = words.astype(">u8").tobytes()[: (total + 7) // 8]
  return data, ends


def encode(symbols: np.ndarray, lengths: np.ndarray, lane: int) -> tuple[np.ndarray, bytes]:
  """Encodes `symbols` (alphabet values) with the canonical code of `lengths`.

  Returns (bit length of each lane of `lane` symbols, payload bytes). A
  stream with fewer than two present symbols has no lanes and no payload.
  """
  symbols = np.asarray(symbols).ravel()
  if symbols.size == 0 or np.count_nonzero(lengths) < 2:
    return np.zeros(0, np.int64), b""
  lengths = np.asarray(lengths, np.uint64)
  aligned = canonical_codes(lengths) << (np.uint64(64) - lengths)  # absent: garbage, unused
  data, ends = pack_bits(aligned[symbols], lengths.astype(np.uint8)[symbols])
  n = symbols.size
  lane_last = np.minimum(np.arange(1, -(-n // lane) + 1, dtype=np.int64) * lane, n) - 1
  lane_ends = ends[lane_last].astype(np.int64)
  return np.diff(lane_ends, prepend=0), data


def optimal_bits(counts: np.ndarray, lengths: np.ndarray) -> int:
  """sum(count * length): the payload bits of this code (0 for < 2 symbols)."""
  if np.count_nonzero(lengths) < 2:
    return 0
  return int(np.dot(np.asarray(counts, np.int64), np.asarray(lengths, np.int64)))


# ----------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------


class Stream:
  """One Huffman stream to decode (validated lengths, lanes and payload).

  Attributes:
    lengths: code length per alphabet symbol (0 = absent), >= 2 present.
    count: number of symbols.
    lane_bits: bit length of each lane (ceil(count / lane) of them).
    payload: the stream's bytes (ceil(sum(lane_bits) / 8) of them).
    where: description for error messages (section, file offset).
  """

  def __init__(self, lengths, count, lane_bits, payload, where):
    self.lengths = lengths
    self.count = count
    self.lane_bits = lane_bits
    self.payload = payload
    self.where = where


def table_size(lengths: np.ndarray) -> int:
  return 1 << int(np.max(lengths))


def check_lengths(lengths: np.ndarray, where: str) -> None:
  """A decodable code: lengths in [0, 24], >= 2 present, Kraft sum exactly 1."""
  if lengths.size and int(lengths.max()) > FORMAT_MAX_LEN:
    raise FormatError(f"{where}: Huffman code length {int(lengths.max())} exceeds {FORMAT_MAX_LEN}")
  present = lengths[lengths > 0]
  top = int(present.max())
  kraft = int(np.sum(np.left_shift(np.int64(1), (top - present).astype(np.int64))))
  if kraft != 1 << top:
    raise FormatError(
      f"{where}: Huffman code lengths are not a complete prefix code (Kraft sum {kraft}/{1 << top})"
    )


def _table(lengths: np.ndarray) -> np.ndarray:
  """Lookup table over max-length bit windows: (symbol << 5) | length, uint32."""
  top = int(lengths.max())
  order = canonical_order(lengths)
  ls = lengths[order].astype(np.int64)
  packed = (order.astype(np.uint32) << np.uint32(5)) | ls.astype(np.uint32)
  return np.repeat(packed, np.left_shift(np.int64(1), top - ls))


def _windows(streams: Sequence[Stream], lane: int) -> tuple[np.ndarray, np.ndarray]:
  """(byte offset of each payload, big-endian 64-bit window at every byte of all payloads)."""
  # Global buffer of all payloads; a lane decoding garbage can run at most
  # lane * 24 bits past its start, so that much zero padding keeps every
  # window read in bounds.
  offsets = np.cumsum([0] + [len(s.payload) for s in streams])
  pad = (lane * FORMAT_MAX_LEN) // 8 + 16
  total = int(offsets[-1]) + pad
  total += (-total) % 8
  buf = np.zeros(total, np.uint8)
  for s, off in zip(streams, offsets[:-1]):
    buf[off : off + len(s.payload)] = np.frombuffer(s.payload, np.uint8)
  as_words = np.frombuffer(buf.tobytes(), dtype=">u8")
  windows = np.lib.stride_tricks.as_strided(as_words, shape=(total - 8,), strides=(1,))
  return offsets, windows.astype(np.uint64)


def _lanes(streams: Sequence[Stream], lane: int, offsets: np.ndarray) -> dict:
  """Every lane of every stream, sorted by symbol count (active lanes form a prefix)."""
  tables, bases, shifts = [], [], []
  base = 0
  for s in streams:
    t = _table(s.lengths)
    tables.append(t)
    bases.append(base)
    shifts.append(64 - int(s.lengths.max()))
    base += t.size
  cols = {k: [] for k in ("start", "end", "count", "base", "shift", "stream")}
  for k, s in enumerate(streams):
    nl = s.lane_bits.size
    counts = np.full(nl, lane, np.int64)
    counts[-1] = s.count - lane * (nl - 1)
    ends = np.cumsum(s.lane_bits) + 8 * int(offsets[k])
    cols["start"].append(ends - s.lane_bits)
    cols["end"].append(ends)
    cols["count"].append(counts)
    cols["base"].append(np.full(nl, bases[k], np.int64))
    cols["shift"].append(np.full(nl, shifts[k], np.int64))
    cols["stream"].append(np.full(nl, k, np.int64))
  cat = {k: np.concatenate(v) for k, v in cols.items()}
  order = np.argsort(-cat["count"], kind="stable")
  return dict(
    table=np.concatenate(tables),
    order=order,
    counts=cat["count"][order],
    pos=cat["start"][order].astype(np.uint64),
    end=cat["end"][order].astype(np.uint64),
    base=cat["base"][order].astype(np.uint64),
    shift=cat["shift"][order].astype(np.uint64),
    stream=cat["stream"][order],
  )


def _run_lanes(lanes: dict, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Decodes all lanes in lockstep; returns (packed table entries, step bases).

  Lanes with count > t are the first active[t]; step t's symbols go to
  out[base[t]:base[t] + active[t]], so lane slot j's t-th symbol is at base[t] + j.
  `lanes["pos"]` is advanced in place to each lane's end.
  """
  counts, pos, sh, tb, table = (lanes[k] for k in ("counts", "pos", "shift", "base", "table"))
  steps = int(counts[0])
  num_lanes = counts.size
  active = np.searchsorted(-counts, -np.arange(steps), side="left")
  step_base = np.concatenate([[0], np.cumsum(active)])
  out = np.empty(int(step_base[-1]), np.uint32)
  w = np.empty(num_lanes, np.uint64)
  tmp = np.empty(num_lanes, np.uint64)
  e = np.empty(num_lanes, np.uint32)
  seven = np.uint64(7)
  three = np.uint64(3)
  for t in range(steps):
    a = int(active[t])
    p = pos[:a]
    np.right_shift(p, three, out=tmp[:a])
    np.take(windows, tmp[:a], out=w[:a])
    np.bitwise_and(p, seven, out=tmp[:a])
    np.left_shift(w[:a], tmp[:a], out=w[:a])
    np.right_shift(w[:a], sh[:a], out=w[:a])
    np.add(w[:a], tb[:a], out=w[:a])
    b = int(step_base[t])
    np.take(table, w[:a], out=out[b : b + a])
    np.bitwise_and(out[b : b + a], np.uint32(31), out=e[:a])
    np.add(p, e[:a], out=p, casting="unsafe")
  return out, step_base


def decode_streams(streams: Sequence[Stream], lane: int) -> list[np.ndarray]:
  """Decodes all `streams` together, lanes in lockstep; returns int32 symbol arrays.

  Raises FormatError (naming the stream's `where`) when a lane does not end
  exactly at its declared bit length.
  """
  if not streams:
    return []
  offsets, windows = _windows(streams, lane)
  lanes = _lanes(streams, lane, offsets)
  out, step_base = _run_lanes(lanes, windows)
  pos, end = lanes["pos"], lanes["end"]
  bad = np.flatnonzero(pos != end)
  if bad.size:
    s = streams[int(lanes["stream"][bad[0]])]
    raise FormatError(
      f"{s.where}: a Huffman lane ends at bit {int(pos[bad[0]])}, "
      f"not at its declared end {int(end[bad[0]])}"
    )
  np.right_shift(out, np.uint32(5), out=out)
  # Reassemble each stream from its lanes (the stable sort kept each stream's
  # lanes in order).
  num_lanes = pos.size
  slot_of = np.empty(num_lanes, np.int64)
  slot_of[lanes["order"]] = np.arange(num_lanes)
  results = []
  lane_idx = 0
  for s in streams:
    nl = s.lane_bits.size
    slots = slot_of[lane_idx : lane_idx + nl]
    lane_idx += nl
    last = s.count - lane * (nl - 1)
    idx = np.concatenate(
      [np.add.outer(slots[:-1], step_base[:lane]).ravel(), slots[-1] + step_base[:last]]
    )
    results.append(out[idx].astype(np.int32))
  return results
