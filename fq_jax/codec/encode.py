"""Model arrays -> .fqz bytes: `encode_model`, one function per section kind.

Every array of a model goes into the file under its '/'-joined path, as one of four kinds
(docs/format.md has the byte-level specification):

  * "focused": a focused-quantized layer. The positions of its kept weights and their
    integer symbols (`fq.focused_symbols`) are entropy coded; the quantizer parameters sit
    in the header. The decoder rebuilds the values with `fq.focused_values`, the single
    definition of a quantized value, so the rebuilt array is bit-identical to what the
    forward pass uses.
  * "codebook": a codebook-quantized layer (`fq.kmeans_codebook`, `fq.uniform_codebook`):
    coded positions and codeword indices, as for "focused", plus the float32 codebook; a
    value is codebook[symbol] (`fq.codebook_values`). Format 1.1.
  * "pruned": a pruned but unquantized array: coded positions + the kept values' raw bytes.
  * "raw": everything else (biases, batch statistics, counters), raw bytes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fq_jax._src import codebook as codebook_lib
from fq_jax._src import quantizers
from fq_jax.codec import ans as ans_lib
from fq_jax.codec import container, kernels
from fq_jax.codec import huffman as huffman_lib
from fq_jax.codec import positions as positions_lib
from fq_jax.codec.layout import (
  CODERS,
  DTYPES,
  FLOATS,
  FOCUSED_DTYPES,
  MAX_BIAS,
  MAX_CODEWORDS,
  MIN_BIAS,
  dtype_name,
  float_json,
  little_endian,
  num_symbols,
)

# ----------------------------------------------------------------------------
# Entropy-coded streams (shared by the pruned, focused and codebook kinds)
# ----------------------------------------------------------------------------


def _model_bytes(lo: int, entries: np.ndarray) -> bytes:
  out = bytearray()
  container.write_varint(out, lo)
  container.write_varint(out, entries.size)
  return bytes(out) + container.varint_array(entries)


def _stream_model(symbols: np.ndarray, alphabet: int, coder: str, hist=None):
  """(model bytes, histogram, present symbols, huffman lengths or None)."""
  if hist is None:
    hist = (
      np.bincount(symbols, minlength=alphabet) if symbols.size else np.zeros(alphabet, np.int64)
    )
  present = np.flatnonzero(hist)
  if present.size == 0:
    return _model_bytes(0, np.zeros(0, np.int64)), hist, present, None
  lo, hi = int(present[0]), int(present[-1]) + 1
  if coder == "ans":
    return _model_bytes(lo, hist[lo:hi]), hist, present, None
  lengths = huffman_lib.code_lengths(hist)
  return _model_bytes(lo, lengths[lo:hi]), hist, present, lengths


def _coded_section(pos_symbols, run, sym_symbols, alphabet, coder, lane, pos_hist=None) -> bytes:
  """Models + payload for the position stream and (focused) the symbol stream."""
  streams = [(pos_symbols, run + 1, pos_hist)]
  if sym_symbols is not None:
    streams.append((sym_symbols, alphabet, None))
  models = [_stream_model(s, a, coder, h) for s, a, h in streams]
  head = b"".join(m[0] for m in models)
  if coder == "ans":
    payload = ans_lib.encode([(s, m[1], m[2]) for (s, _, _), m in zip(streams, models)])
  else:
    lanes, datas = [], []
    for (s, _, _), m in zip(streams, models):
      lane_bits, data = huffman_lib.encode(s, m[3], lane)
      lanes.append(container.varint_array(lane_bits))
      datas.append(data)
    payload = b"".join(lanes + datas)
  size = bytearray()
  container.write_varint(size, len(payload))
  return head + bytes(size) + payload


def _positions(entry: dict, indices: np.ndarray, inverted: bool, coder: str):
  """Codes a keep-mask's positions; fills the entry's position fields (after `kept`)."""
  run, pos_hist = positions_lib.choose_run(positions_lib.gaps_of(indices), coder)
  pos = positions_lib.encode(indices, run)
  entry.update(inverted=inverted, run=run, npos=int(pos.size))
  return pos, run, pos_hist


def _checked_mask(path: str, state_mask, masks: Mapping, shape, what: str) -> np.ndarray:
  mask = np.broadcast_to(np.asarray(state_mask, bool), shape)
  if path in masks and not np.array_equal(np.asarray(masks[path], bool), mask):
    raise ValueError(f"{path}: masks[path] differs from the {what}'s mask")
  return mask


# ----------------------------------------------------------------------------
# One function per section kind
# ----------------------------------------------------------------------------


def _encode_raw(entry: dict, arr: np.ndarray, stored: str) -> bytes:
  entry["kind"] = "raw"
  return np.ascontiguousarray(arr).astype(little_endian(stored), copy=False).tobytes()


def _encode_pruned(entry: dict, arr: np.ndarray, stored: str, mask, coder, lane) -> bytes:
  mask = np.asarray(mask, bool)
  if mask.shape != arr.shape:
    raise ValueError(f"{entry['path']}: mask shape {mask.shape} != array shape {arr.shape}")
  entry["kind"] = "pruned"
  kept_idx, indices, inverted = positions_lib.coded_indices(mask)
  kept = arr.reshape(-1).take(kept_idx)
  entry["kept"] = int(kept.size)
  pos, run, pos_hist = _positions(entry, indices, inverted, coder)
  return (
    _coded_section(pos, run, None, 0, coder, lane, pos_hist)
    + kept.astype(little_endian(stored)).tobytes()
  )


def _encode_codebook(entry: dict, arr: np.ndarray, cstate, masks: Mapping, coder, lane) -> bytes:
  path, name = entry["path"], entry["dtype"]
  if name not in FOCUSED_DTYPES:
    raise ValueError(f"{path}: a codebook layer must be a float array, not {name}")
  mask = _checked_mask(path, cstate.mask, masks, arr.shape, "CodebookState")
  book = np.asarray(cstate.codebook, np.float32).reshape(-1)
  if not 1 <= book.size <= MAX_CODEWORDS:
    raise ValueError(f"{path}: a codebook needs 1..{MAX_CODEWORDS} codewords, not {book.size}")
  sym_all = np.broadcast_to(np.asarray(cstate.symbols), arr.shape)
  if not np.issubdtype(sym_all.dtype, np.integer):
    raise ValueError(f"{path}: CodebookState.symbols must be integers")
  kept_idx, indices, inverted = positions_lib.coded_indices(mask)
  sym = sym_all.reshape(-1).take(kept_idx).astype(np.int64)
  if sym.size and (int(sym.min()) < 0 or int(sym.max()) >= book.size):
    raise ValueError(f"{path}: symbols outside [0, {book.size})")
  entry.update(kind="codebook", codewords=int(book.size), kept=int(sym.size))
  pos, run, pos_hist = _positions(entry, indices, inverted, coder)
  return (
    _coded_section(pos, run, sym.astype(np.int32), book.size, coder, lane, pos_hist)
    + book.astype("<f4").tobytes()
  )


def focus_params(state) -> dict:
  """The quantizer scalars of a FocusState as Python values (validated)."""
  bits = int(np.asarray(state.bits))
  rec = bool(np.asarray(state.recentralized))
  if not quantizers.MIN_BITS <= bits <= quantizers.MAX_BITS:
    raise ValueError(f"bits must be in [{quantizers.MIN_BITS}, {quantizers.MAX_BITS}], got {bits}")
  if rec and bits < 3:
    raise ValueError("a recentralized layer needs bits >= 3")
  bias = int(np.asarray(state.bias))
  if not MIN_BIAS <= bias <= MAX_BIAS:
    raise ValueError(f"bias must be in [{MIN_BIAS}, {MAX_BIAS}], got {bias}")
  means = np.asarray(state.means, np.float32).reshape(-1)
  if means.size != 2:
    raise ValueError("FocusState.means must have 2 entries")
  return dict(
    recentralized=rec,
    bits=bits,
    means=[np.float32(m) for m in means],
    sigma=np.float32(np.asarray(state.sigma)),
    bias=bias,
    alpha=np.float32(np.asarray(state.alpha)),
  )


def _quant_json(state, params: dict) -> dict:
  out = dict(
    recentralized=params["recentralized"],
    bits=params["bits"],
    means=[float_json(m) for m in params["means"]],
    sigma=float_json(params["sigma"]),
    bias=params["bias"],
    alpha=float_json(params["alpha"]),
  )
  g = getattr(state, "gmm", None)
  if g is not None:
    out["gmm"] = {
      k: [float_json(v) for v in np.asarray(getattr(g, k), np.float32).reshape(-1)[:2]]
      for k in ("weights", "means", "stds")
    }
  sep = getattr(state, "separation", None)
  if sep is not None:
    out["separation"] = float_json(np.asarray(sep))
  return out


def _focused_entry(entry: dict, arr: np.ndarray, state, masks: Mapping) -> tuple:
  """Header fields of a focused layer; returns what `_encode_focused` needs later."""
  path, name = entry["path"], entry["dtype"]
  if name not in FOCUSED_DTYPES:
    raise ValueError(f"{path}: a focused layer must be a float array, not {name}")
  mask = _checked_mask(path, state.mask, masks, arr.shape, "FocusState")
  assignment = np.broadcast_to(np.asarray(state.assignment, bool), arr.shape)
  params = focus_params(state)
  entry["kind"] = "focused"
  entry["quant"] = _quant_json(state, params)
  return arr, mask, assignment, params


def _encode_focused(entries: list[dict], pending: list[tuple], coder, lane) -> list[bytes]:
  """The sections of all focused layers, with one batched `fq.focused_symbols` call."""
  coded = [positions_lib.coded_indices(mask) for _, mask, _, _ in pending]
  weights = [
    arr.reshape(-1).take(c[0]).astype(np.float32, copy=False)
    for (arr, _, _, _), c in zip(pending, coded)
  ]
  assigns = [a.reshape(-1).take(c[0]) for (_, _, a, _), c in zip(pending, coded)]
  symbols = kernels.batched_symbols(weights, assigns, [p[3] for p in pending])
  del weights, assigns
  sections = []
  for entry, (_, _, _, params), sym, (_, indices, inverted) in zip(
    entries, pending, symbols, coded
  ):
    alphabet = num_symbols(params)
    if sym.size and (int(sym.min()) < 0 or int(sym.max()) >= alphabet):
      raise ValueError(f"{entry['path']}: symbols outside [0, {alphabet})")
    entry["kept"] = int(sym.size)
    pos, run, pos_hist = _positions(entry, indices, inverted, coder)
    sections.append(_coded_section(pos, run, sym, alphabet, coder, lane, pos_hist))
  return sections


# ----------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------


def _check_arguments(arrays, focus, masks, codebooks, coder, float_dtype, lane, metadata):
  if coder not in CODERS:
    raise ValueError(f"coder must be one of {CODERS}, got {coder!r}")
  if float_dtype is not None and float_dtype not in ("float16", "bfloat16", "float32"):
    raise ValueError(
      f"float_dtype must be None, 'float16', 'bfloat16' or 'float32', got {float_dtype!r}"
    )
  if not 1 <= lane <= huffman_lib.FORMAT_MAX_LANE:
    raise ValueError(f"huffman_lane must be in [1, {huffman_lib.FORMAT_MAX_LANE}]")
  both = [p for p in codebooks if p in focus]
  if both:
    raise ValueError(f"paths in both focus and codebooks: {both[:5]}")
  for name, d in (("focus", focus), ("masks", masks), ("codebooks", codebooks)):
    unknown = [p for p in d if p not in arrays]
    if unknown:
      raise ValueError(f"{name} has paths that are not in arrays: {unknown[:5]}")
  for path, state in focus.items():
    # A NaN or infinite weight has no symbol: it would decode as some finite level.
    w = np.asarray(arrays[path])
    if np.issubdtype(w.dtype, np.floating) or w.dtype.name == "bfloat16":
      kept = np.broadcast_to(np.asarray(state.mask, bool), w.shape)
      bad = int(np.count_nonzero(kept & ~np.isfinite(w.astype(np.float32))))
      if bad:
        raise ValueError(
          f"focus {path!r}: {bad:,} kept weights are NaN or infinite; they cannot be quantized"
        )
  if not isinstance(metadata, dict):
    raise ValueError("metadata must be a dict")
  try:
    container.dumps_header({"m": metadata})
  except (TypeError, ValueError) as e:
    raise ValueError(f"metadata is not JSON-serializable: {e}") from None


def _stored_dtype(name: str, float_dtype: str | None) -> str:
  """The dtype a raw or pruned array's values are stored in."""
  if (
    float_dtype is not None
    and name in FLOATS
    and (DTYPES[name].itemsize > DTYPES[float_dtype].itemsize)
  ):
    return float_dtype
  return name


def encode_model(
  arrays: Mapping[str, Any],
  *,
  focus: Mapping[str, quantizers.FocusState] | None = None,
  masks: Mapping[str, Any] | None = None,
  coder: str = "ans",
  metadata: dict | None = None,
  float_dtype: str | None = None,
  huffman_lane: int = huffman_lib.DEFAULT_LANE,
  codebooks: Mapping[str, codebook_lib.CodebookState] | None = None,
) -> bytes:
  """Encodes a model's arrays into .fqz bytes.

  Args:
    arrays: '/'-joined path -> array, for every array the model needs
      (parameters and batch statistics; any supported dtype: bool, (u)int8..64,
      float16, bfloat16, float32, float64). Order is kept.
    focus: path -> `fq.FocusState` for focused-quantized layers. Their kept
      weights are stored as symbols; the decoded values are
      `fq.focused_values(fq.focused_symbols(w, state), state)` at every kept
      position (whatever the INQ progress) and 0 elsewhere. The layer must
      be float32, bfloat16 or float16 (float64 is quantized in float32 and
      widened exactly).
    masks: path -> bool keep-mask for arrays pruned but not quantized
      (positions + kept values are stored; pruned entries decode as 0). A
      mask given for a focused path must equal the FocusState's mask.
    coder: "ans" (rANS via constriction, default) or "huffman" (canonical,
      length-limited to 16 bits, lane-parallel decoding).
    metadata: JSON-serializable dict stored in the header.
    float_dtype: None stores every raw or kept value losslessly. "float16" or
      "bfloat16" (or "float32") stores floating arrays wider than that in it;
      they are decoded back to their original dtype (lossy).
    huffman_lane: symbols per Huffman lane (decode parallelism vs. a small
      per-lane size overhead).
    codebooks: path -> `fq.CodebookState` for codebook-quantized layers
      (float arrays). The state's symbols at its kept positions and its
      codebook (1..65536 float32 codewords) are stored; the decoded values
      are `fq.codebook_values(state.symbols, state.codebook, state.mask)`
      cast to the array's dtype (the array's own values are not used). A
      mask given for such a path must equal the state's mask.

  Returns:
    The file's bytes.

  Raises:
    ValueError: unsupported dtypes, inconsistent shapes/masks, bad arguments.
  """
  focus, masks, codebooks = dict(focus or {}), dict(masks or {}), dict(codebooks or {})
  metadata = {} if metadata is None else metadata
  _check_arguments(arrays, focus, masks, codebooks, coder, float_dtype, huffman_lane, metadata)
  entries, sections = [], []
  pending, pending_at = [], []  # focused layers, encoded after one batched symbols call
  for path, value in arrays.items():
    if not isinstance(path, str):
      raise ValueError(f"array paths must be strings, got {path!r}")
    arr = np.asarray(value)
    name = dtype_name(arr.dtype)
    entry = {"path": path, "shape": [int(d) for d in arr.shape], "dtype": name}
    entries.append(entry)
    if path in codebooks:
      sections.append(_encode_codebook(entry, arr, codebooks[path], masks, coder, huffman_lane))
    elif path in focus:
      pending.append(_focused_entry(entry, arr, focus[path], masks))
      pending_at.append(len(sections))
      sections.append(None)
    else:
      stored = entry["stored"] = _stored_dtype(name, float_dtype)
      if path in masks:
        sections.append(_encode_pruned(entry, arr, stored, masks[path], coder, huffman_lane))
      else:
        sections.append(_encode_raw(entry, arr, stored))
  if pending:
    focused = _encode_focused([entries[i] for i in pending_at], pending, coder, huffman_lane)
    for i, section in zip(pending_at, focused):
      sections[i] = section
  header = {"coder": coder, "metadata": metadata, "arrays": entries}
  if coder == "huffman":
    header["lane"] = huffman_lane
  return container.pack(header, sections)
