"""Pass 2 and 3 of `decode_model`: parse each section and rebuild it, one function per kind.

Pass 2 reads a coded section's stream tables and payload bounds and decodes (rANS) or queues
(Huffman, decoded in one batch) its streams; pass 3 turns positions into masks and symbols or
raw bytes into values. docs/format.md is the byte-level specification.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from fq_jax.codec import ans as ans_lib
from fq_jax.codec import container, kernels, limits
from fq_jax.codec import huffman as huffman_lib
from fq_jax.codec import positions as positions_lib
from fq_jax.codec.container import FormatError, Reader
from fq_jax.codec.decoded import focus_state, full_symbols
from fq_jax.codec.layout import DTYPES, SYMBOL_KINDS, entropy_bits, little_endian, num_symbols


@dataclasses.dataclass
class Layer:
  """One header entry as the decoder tracks it through the three passes."""

  index: int
  entry: dict
  shape: tuple
  size: int
  kind: str
  kept: int = 0
  coded: int = 0
  pos: np.ndarray | None = None
  sym: np.ndarray | None = None
  values: bytes | None = None
  params: dict | None = None
  coded_bytes: int = 0
  pos_hist: np.ndarray | None = None
  sym_hist: np.ndarray | None = None
  pos_escapes: bool = True  # False when the position table says the escape symbol is absent
  codewords: int = 0
  codebook: np.ndarray | None = None

  @property
  def name(self) -> str:
    return f"section {self.index} ({self.entry['path'][:80]!r})"


# ----------------------------------------------------------------------------
# Pass 2: sections
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Table:
  """A stream's table as stored: `entries[i]` belongs to symbol `lo + i`, all others are 0.

  Kept in this sparse form so that its memory is bounded by the section's bytes, whatever
  the alphabet (a position alphabet may have 2^24 + 1 symbols).
  """

  lo: int
  entries: np.ndarray

  def present(self) -> np.ndarray:
    """The symbols with a non-zero entry, ascending."""
    return self.lo + np.flatnonzero(self.entries)

  def at(self, symbol: int) -> int:
    i = symbol - self.lo
    return int(self.entries[i]) if 0 <= i < self.entries.size else 0

  def total(self) -> int:
    return sum(self.entries.tolist())  # exact (entries may reach 2^62)

  def below(self, symbol: int) -> int:
    """Sum of the entries of the symbols < `symbol`."""
    return sum(self.entries[: max(0, symbol - self.lo)].tolist())


def _read_table(r: Reader, alphabet: int, coder: str, what: str) -> Table:
  """A stream's table: counts (ANS) or code lengths (Huffman) of symbols lo..lo+m-1."""
  lo = r.varint(f"{what} table start", alphabet)
  m = r.varint(f"{what} table size", alphabet - lo)
  limit = (1 << 62) if coder == "ans" else huffman_lib.FORMAT_MAX_LEN
  if m > r.remaining():
    r.fail(f"{what} table of {m} entries does not fit in the section")
  return Table(lo, r.varints(m, f"{what} table entry", limit))


def check_raw_section(layer: Layer, start: int, end: int) -> None:
  stored = layer.entry["stored"]
  need = layer.size * DTYPES[stored].itemsize
  if end - start != need:
    raise FormatError(
      f"{layer.name} at file offset {start}: holds {end - start} bytes, "
      f"not the {need} of a {stored} array of shape {list(layer.shape)}"
    )


def _check_tables(r: Reader, layer: Layer, tables: list, coder: str) -> None:
  """The stream tables agree with the header's symbol counts."""
  for table, count, what in tables:
    present = table.present()
    if bool(count) != bool(present.size):
      r.fail(f"{what} table has {present.size} symbols for {count} coded symbols")
    if coder == "ans" and present.size and table.total() != count:
      r.fail(f"{what} counts sum to {table.total()}, not {count}")
    if coder == "ans" and count > ans_lib.MAX_COUNT_TOTAL:
      r.fail(f"{what} stream of {count} symbols exceeds the rANS limit {ans_lib.MAX_COUNT_TOTAL}")
    if coder == "huffman" and present.size == 1 and table.at(int(present[0])) != 1:
      r.fail(f"single {what} symbol must have length 1")
  if coder == "ans" and layer.entry["npos"]:
    non_escape = tables[0][0].below(layer.entry["run"])
    if non_escape != layer.coded:
      r.fail(f"position counts give {non_escape} positions, not {layer.coded}")


def _pruned_tail(r: Reader, layer: Layer, data, payload_end: int, end: int) -> None:
  """A pruned section ends with the kept values' raw bytes."""
  itemsize = DTYPES[layer.entry["stored"]].itemsize
  if end - payload_end != layer.kept * itemsize:
    r.fail(
      f"kept values need {layer.kept * itemsize} bytes after the payload, "
      f"{end - payload_end} remain",
      payload_end,
    )
  layer.values = data[payload_end:end]


def _codebook_tail(r: Reader, layer: Layer, data, payload_end: int, end: int) -> None:
  """A codebook section ends with its float32 codewords."""
  if end - payload_end != 4 * layer.codewords:
    r.fail(
      f"the codebook of {layer.codewords} float32 codewords needs "
      f"{4 * layer.codewords} bytes after the payload, {end - payload_end} remain",
      payload_end,
    )
  layer.codebook = np.frombuffer(data, "<f4", layer.codewords, payload_end).astype(np.float32)


def _focused_tail(r: Reader, layer: Layer, data, payload_end: int, end: int) -> None:
  """A focused section ends with its payload."""
  if payload_end != end:
    r.fail(f"{end - payload_end} unexpected bytes after the payload", payload_end)


_TAILS = {"pruned": _pruned_tail, "codebook": _codebook_tail, "focused": _focused_tail}


def parse_coded_section(layer: Layer, data, start: int, end: int, coder: str):
  """Tables, payload bounds and the kind's tail; returns (tables, payload start, end)."""
  r = Reader(data, start, end, layer.name)
  tables = [(_read_table(r, layer.entry["run"] + 1, coder, "position"), layer.entry["npos"], "pos")]
  if layer.kind == "focused":
    tables.append((_read_table(r, num_symbols(layer.params), coder, "symbol"), layer.kept, "sym"))
  elif layer.kind == "codebook":
    tables.append((_read_table(r, layer.codewords, coder, "symbol"), layer.kept, "sym"))
  payload_len = r.varint("payload length", r.remaining())
  payload_start = r.pos
  payload_end = payload_start + payload_len
  _check_tables(r, layer, tables, coder)
  _TAILS[layer.kind](r, layer, data, payload_end, end)
  layer.coded_bytes = payload_end - start
  return tables, payload_start, payload_end


def decode_ans(layer: Layer, data, tables: list, payload_start: int, payload_end: int) -> None:
  """Decodes a section's rANS streams; their tables must be the exact symbol histograms."""
  where = f"{layer.name} payload at file offset {payload_start}"
  streams = [(count, table.entries, table.present()) for table, count, _ in tables]
  decoded = ans_lib.decode(data[payload_start:payload_end], streams, where)
  for (table, _, what), d in zip(tables, decoded):
    hist = np.bincount(d - table.lo, minlength=table.entries.size) if d.size else table.entries
    if hist.size != table.entries.size or not np.array_equal(hist, table.entries):
      raise FormatError(f"{where}: the {what} table's counts differ from the decoded symbols")
    setattr(layer, what, d)
  layer.pos_hist = tables[0][0].entries  # rANS tables are the exact histograms
  layer.pos_escapes = tables[0][0].at(layer.entry["run"]) > 0
  layer.sym_hist = tables[1][0].entries if len(tables) > 1 else None


def _check_padding(stream: bytes, total_bits: int, pr: Reader, what: str, at: int) -> None:
  """The bits after a Huffman stream's last lane, up to the byte boundary, must be 0."""
  spare = -total_bits % 8
  if spare and stream[-1] & ((1 << spare) - 1):
    pr.fail(f"{what} bit stream has non-zero padding bits", at + len(stream) - 1)


def queue_huffman(layer: Layer, data, tables: list, payload_start, payload_end, lane, queue):
  """Reads lane lengths and slices the bit streams; returns the bytes decoding them needs."""
  pr = Reader(data, payload_start, payload_end, f"{layer.name} payload")
  lane_info, need = [], 0
  for table, count, what in tables:
    present = table.present()
    if count == 0 or present.size < 2:
      lane_info.append(None)
      continue
    huffman_lib.check_lengths(table.entries, f"{layer.name} {what} code")
    num_lanes = container.ceil_div(count, lane)
    if num_lanes > pr.remaining():
      pr.fail(f"{num_lanes} {what} lanes do not fit")
    max_bits = lane * int(table.entries.max())
    lane_info.append(pr.varints(num_lanes, f"{what} lane bits", max_bits))
    # Decode table (built, then concatenated: twice) and the per-lane columns.
    need += 8 * huffman_lib.table_size(table.entries) + limits.PER_HUFFMAN_LANE * num_lanes
  for (table, count, what), bits in zip(tables, lane_info):
    if bits is None:
      present = table.present()
      setattr(layer, what, np.full(count, present[0] if present.size else 0, np.int32))
      continue
    total_bits = int(bits.sum())
    stream_start = pr.pos
    payload = pr.take(container.ceil_div(total_bits, 8), f"{what} bit stream")
    _check_padding(payload, total_bits, pr, what, stream_start)
    where = f"{layer.name} {what} stream at file offset {stream_start}"
    stream = huffman_lib.Stream(table.entries, count, bits, payload, where)
    queue.append((stream, layer, what, table.lo))
    need += limits.PER_HUFFMAN_BYTE * len(payload)
  pr.expect_end("the Huffman streams")
  return need


def decode_huffman(queue: list, lane: int, need: int, budget: int, limit: int) -> None:
  """Decodes every queued Huffman stream of the file at once (lanes in lockstep)."""
  need += limits.PER_HUFFMAN_BYTE * (3 * lane + 32)  # the shared buffer's zero padding
  if budget + need > limit:
    raise FormatError(
      f"Huffman decoding tables and buffers need {need} more bytes, beyond "
      f"the allowed {limit} (max_output_bytes)"
    )
  decoded = huffman_lib.decode_streams([s for s, _, _, _ in queue], lane)
  for (_, layer, what, lo), d in zip(queue, decoded):
    if lo:
      d += np.int32(lo)
    setattr(layer, what, d)


# ----------------------------------------------------------------------------
# Pass 3: masks and values, one function per kind
# ----------------------------------------------------------------------------


def layer_info(layer: Layer, start: int, end: int) -> dict:
  entry = layer.entry
  return dict(
    path=entry["path"],
    shape=list(layer.shape),
    dtype=entry["dtype"],
    stored=entry.get("stored", entry["dtype"]),
    kind=layer.kind,
    size=layer.size,
    kept=layer.size,
    section_bytes=end - start,
    coded_bytes=0,
    position_entropy_bits=0.0,
    symbol_entropy_bits=0.0,
    entropy_bound_bytes=0.0,
    npos=0,
  )


def rebuild_raw(layer: Layer, data, start: int) -> np.ndarray:
  stored = layer.entry["stored"]
  raw = np.frombuffer(data, little_endian(stored), layer.size, start)
  if stored == "bool" and raw.size and raw.view(np.uint8).max() > 1:
    raise FormatError(f"{layer.name} at file offset {start}: bool bytes must be 0 or 1")
  return raw.astype(DTYPES[layer.entry["dtype"]]).reshape(layer.shape)


def rebuild_mask(layer: Layer) -> tuple[np.ndarray, np.ndarray]:
  """(keep-mask, flat indices of kept entries) from the decoded position stream."""
  run = layer.entry["run"]
  escapes = layer.pos_escapes
  indices = positions_lib.decode(
    layer.pos, run, layer.coded, layer.size, f"{layer.name} position code", escapes=escapes
  )
  if layer.entry["inverted"]:
    mask = np.ones(layer.size, bool)
    mask[indices] = False
    return mask, np.flatnonzero(mask)
  mask = np.zeros(layer.size, bool)
  mask[indices] = True
  return mask, indices


def rebuild_pruned(layer: Layer, kept_idx: np.ndarray) -> np.ndarray:
  entry = layer.entry
  out = np.zeros(layer.size, DTYPES[entry["dtype"]])
  kept = np.frombuffer(layer.values, little_endian(entry["stored"]))
  if entry["stored"] == "bool" and kept.size and kept.view(np.uint8).max() > 1:
    raise FormatError(f"{layer.name}: bool bytes must be 0 or 1")
  out[kept_idx] = kept.astype(DTYPES[entry["dtype"]], copy=False)
  return out.reshape(layer.shape)


def rebuild_codebook(layer: Layer, kept_idx: np.ndarray) -> np.ndarray:
  # fq.codebook_values: codebook[symbol] in float32, then cast (round to nearest even).
  out = np.zeros(layer.size, DTYPES[layer.entry["dtype"]])
  with np.errstate(over="ignore"):  # a float32 codeword beyond float16 becomes inf
    out[kept_idx] = layer.codebook[layer.sym].astype(out.dtype)
  return out.reshape(layer.shape)


def rebuild_focused(groups: dict, arrays: dict, symbols: dict, focus: dict, masks: dict) -> None:
  """Values of all focused layers, one batched `fq.focused_values` call per dtype."""
  for dtype, group in groups.items():
    values = kernels.batched_values(
      [layer.sym for layer, _ in group], [layer.params for layer, _ in group], DTYPES[dtype]
    )
    for (layer, kept_idx), val in zip(group, values):
      path = layer.entry["path"]
      out = np.zeros(layer.size, DTYPES[dtype])
      out[kept_idx] = val
      arrays[path] = out.reshape(layer.shape)
      args = (layer.size, layer.shape, kept_idx, layer.sym)
      symbols[path] = functools.partial(full_symbols, *args)
      focus[path] = functools.partial(focus_state, layer.params, *args, masks[path])


def coded_info(info: dict, layer: Layer) -> None:
  """Entropy accounting of a coded layer's streams (see `DecodedModel.layers`)."""
  info.update(
    kept=layer.kept,
    coded_bytes=layer.coded_bytes,
    npos=int(layer.pos.size),
    position_entropy_bits=entropy_bits(layer.pos, layer.pos_hist),
  )
  if layer.kind in SYMBOL_KINDS:
    info["symbol_entropy_bits"] = entropy_bits(layer.sym, layer.sym_hist)
  if layer.kind == "codebook":
    info["codewords"] = layer.codewords
    info["codebook_bytes"] = 4 * layer.codewords
  info["entropy_bound_bytes"] = (info["position_entropy_bits"] + info["symbol_entropy_bits"]) / 8
  if layer.params is not None:
    p = layer.params
    info.update(
      recentralized=p["recentralized"],
      bits=p["bits"],
      mu=[float(m) for m in p["means"]],
      sigma=float(p["sigma"]),
      bias=p["bias"],
      alpha=float(p["alpha"]),
    )
