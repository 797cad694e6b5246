"""Models <-> .fqz bytes: `encode_model`, `decode_model`, `save_fqz`, `load_fqz`.

Every array of a model goes into the file under its '/'-joined path, as one of
four kinds (docs/format.md has the byte-level specification):

  * "focused": a focused-quantized layer. The positions of its kept weights
    and their integer symbols (`fq.focused_symbols`) are entropy coded; the
    quantizer parameters sit in the header. The decoder rebuilds the values
    with `fq.focused_values`, the single definition of a quantized value, so
    the rebuilt array is bit-identical to what the forward pass uses.
  * "codebook": a codebook-quantized layer (`fq.kmeans_codebook`,
    `fq.uniform_codebook`): coded positions and codeword indices, as for
    "focused", plus the float32 codebook; a value is codebook[symbol]
    (`fq.codebook_values`). Format 1.1.
  * "pruned": a pruned but unquantized array: coded positions + the kept
    values' raw bytes.
  * "raw": everything else (biases, batch statistics, counters), raw bytes.

Decoding is hardened against malformed input: all sizes are validated
against the file and against `max_output_bytes` before anything is
allocated, and every failure is a `FormatError` naming the section and the
file offset.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import struct
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from fq_jax._src import codebook as codebook_lib
from fq_jax._src import gmm as gmm_lib
from fq_jax._src import quantizers, transforms
from fq_jax._src import rules as rules_lib
from fq_jax.codec import ans as ans_lib
from fq_jax.codec import container
from fq_jax.codec import huffman as huffman_lib
from fq_jax.codec import positions as positions_lib
from fq_jax.codec.container import FormatError, Reader

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
# Default decoding allowance: what the decoder may allocate, in bytes.
DEFAULT_EXPANSION = 1024
DEFAULT_ALLOWANCE = 16 << 20
# Bytes of temporaries per coded symbol and per array element while decoding.
_PER_SYMBOL = 48


# ----------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------


def dtype_name(dtype) -> str:
  """The file's name of a NumPy dtype; ValueError for unsupported ones."""
  dt = np.dtype(dtype)
  name = dt.name
  if name not in DTYPES or dt.fields is not None or dt.subdtype is not None:
    raise ValueError(f"unsupported dtype {dt} (supported: {', '.join(DTYPES)})")
  return name


def _le(name: str) -> np.dtype:
  return DTYPES[name].newbyteorder("<") if DTYPES[name].itemsize > 1 else DTYPES[name]


def _float_json(x):
  v = np.float32(x)
  if np.isnan(v):
    return "NaN"
  if np.isinf(v):
    return "Infinity" if v > 0 else "-Infinity"
  return container.f32_to_json(v)


def _next_pow2(n: int, minimum: int) -> int:
  return max(minimum, 1 << max(0, (int(n) - 1).bit_length()))


def _bucket(n: int) -> int:
  """Padded kernel length: >= 4096, at most 1/8 above n (a few shapes per octave)."""
  if n <= 4096:
    return 4096
  step = 1 << (int(n).bit_length() - 3)
  return -(-n // step) * step


def _entropy_bits(symbols: np.ndarray, hist: np.ndarray | None = None) -> float:
  """Total zeroth-order entropy of a symbol stream (from its histogram if known)."""
  if symbols.size == 0:
    return 0.0
  return container.entropy_bits(np.bincount(symbols) if hist is None else hist)


# ----------------------------------------------------------------------------
# Batched quantizer kernels (one jit per padded size, any number of layers)
# ----------------------------------------------------------------------------


def _batched_state(layer, table, assignment=None):
  """A FocusState whose scalar fields are gathered per element from `table`."""
  rec, bits, m0, m1, sigma, bias, alpha = table
  return quantizers.FocusState(
    recentralized=rec[layer],
    bits=bits[layer],
    means=jnp.stack([m0[layer], m1[layer]]),
    sigma=sigma[layer],
    bias=bias[layer],
    assignment=assignment,
    mask=True,
    alpha=alpha[layer],
    gmm=None,
    separation=None,
  )


@jax.jit
def _symbols_kernel(w, assignment, layer, table):
  return quantizers.focused_symbols(w, _batched_state(layer, table, assignment))


@functools.partial(jax.jit, static_argnames=("dtype",))
def _values_kernel(symbols, layer, table, dtype):
  return quantizers.focused_values(symbols, _batched_state(layer, table), dtype=dtype)


def _param_table(params: list[dict]):
  """Per-layer quantizer scalars as arrays padded to a power of two."""
  size = _next_pow2(len(params), 16)
  pad = lambda xs, dt: np.concatenate([np.asarray(xs, dt), np.zeros(size - len(xs), dt)])
  return (
    pad([p["recentralized"] for p in params], np.bool_),
    pad([p["bits"] for p in params], np.int32),
    pad([p["means"][0] for p in params], np.float32),
    pad([p["means"][1] for p in params], np.float32),
    pad([p["sigma"] for p in params], np.float32),
    pad([p["bias"] for p in params], np.int32),
    pad([p["alpha"] for p in params], np.float32),
  )


def _pad_to(x: np.ndarray, size: int) -> np.ndarray:
  if x.size == size:
    return x
  out = np.zeros(size, x.dtype)
  out[: x.size] = x
  return out


def batched_symbols(
  weights: list[np.ndarray], assignments: list[np.ndarray], params: list[dict]
) -> list[np.ndarray]:
  """`fq.focused_symbols` of many layers' kept weights (1-D, float32) in one call."""
  sizes = [w.size for w in weights]
  total = sum(sizes)
  if total == 0:
    return [np.zeros(0, np.int32) for _ in weights]
  n = _bucket(total)
  w = _pad_to(np.concatenate(weights).astype(np.float32, copy=False), n)
  a = _pad_to(np.concatenate(assignments).astype(bool, copy=False), n)
  layer = _pad_to(np.repeat(np.arange(len(sizes), dtype=np.int32), sizes), n)
  out = np.asarray(_symbols_kernel(w, a, layer, _param_table(params)))[:total]
  return np.split(out, np.cumsum(sizes)[:-1])


def batched_values(symbols: list[np.ndarray], params: list[dict], dtype) -> list[np.ndarray]:
  """`fq.focused_values` of many layers' kept symbols (1-D) in one call."""
  sizes = [s.size for s in symbols]
  total = sum(sizes)
  if total == 0:
    return [np.zeros(0, dtype) for _ in symbols]
  n = _bucket(total)
  s = _pad_to(np.concatenate(symbols).astype(np.int32, copy=False), n)
  layer = _pad_to(np.repeat(np.arange(len(sizes), dtype=np.int32), sizes), n)
  wide = np.dtype(dtype) == np.float64
  out = np.asarray(
    _values_kernel(s, layer, _param_table(params), dtype=jnp.dtype(np.float32 if wide else dtype))
  )
  if wide:
    out = out.astype(np.float64)
  return np.split(out[:total], np.cumsum(sizes)[:-1])


def _num_symbols(params: dict) -> int:
  k = params["bits"] - (3 if params["recentralized"] else 2)
  per = 2 ** (k + 1) + 1
  return 2 * per if params["recentralized"] else per


# ----------------------------------------------------------------------------
# Encoding
# ----------------------------------------------------------------------------


def _focus_params(state) -> dict:
  """The quantizer scalars of a FocusState as Python values (validated)."""
  bits = int(np.asarray(state.bits))
  rec = bool(np.asarray(state.recentralized))
  if not quantizers.MIN_BITS <= bits <= quantizers.MAX_BITS:
    raise ValueError(f"bits must be in [{quantizers.MIN_BITS}, {quantizers.MAX_BITS}], got {bits}")
  if rec and bits < 3:
    raise ValueError("a recentralized layer needs bits >= 3")
  means = np.asarray(state.means, np.float32).reshape(-1)
  if means.size != 2:
    raise ValueError("FocusState.means must have 2 entries")
  return dict(
    recentralized=rec,
    bits=bits,
    means=[np.float32(m) for m in means],
    sigma=np.float32(np.asarray(state.sigma)),
    bias=int(np.asarray(state.bias)),
    alpha=np.float32(np.asarray(state.alpha)),
  )


def _quant_json(state, params: dict) -> dict:
  out = dict(
    recentralized=params["recentralized"],
    bits=params["bits"],
    means=[_float_json(m) for m in params["means"]],
    sigma=_float_json(params["sigma"]),
    bias=params["bias"],
    alpha=_float_json(params["alpha"]),
  )
  g = getattr(state, "gmm", None)
  if g is not None:
    out["gmm"] = {
      k: [_float_json(v) for v in np.asarray(getattr(g, k), np.float32).reshape(-1)[:2]]
      for k in ("weights", "means", "stds")
    }
  sep = getattr(state, "separation", None)
  if sep is not None:
    out["separation"] = _float_json(np.asarray(sep))
  return out


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
  focus = dict(focus or {})
  masks = dict(masks or {})
  codebooks = dict(codebooks or {})
  if coder not in CODERS:
    raise ValueError(f"coder must be one of {CODERS}, got {coder!r}")
  if float_dtype is not None and float_dtype not in ("float16", "bfloat16", "float32"):
    raise ValueError(
      f"float_dtype must be None, 'float16', 'bfloat16' or 'float32', got {float_dtype!r}"
    )
  if not 1 <= huffman_lane <= huffman_lib.FORMAT_MAX_LANE:
    raise ValueError(f"huffman_lane must be in [1, {huffman_lib.FORMAT_MAX_LANE}]")
  both = [p for p in codebooks if p in focus]
  if both:
    raise ValueError(f"paths in both focus and codebooks: {both[:5]}")
  for name, d in (("focus", focus), ("masks", masks), ("codebooks", codebooks)):
    unknown = [p for p in d if p not in arrays]
    if unknown:
      raise ValueError(f"{name} has paths that are not in arrays: {unknown[:5]}")
  if metadata is None:
    metadata = {}
  if not isinstance(metadata, dict):
    raise ValueError("metadata must be a dict")
  try:
    container.dumps_header({"m": metadata})
  except (TypeError, ValueError) as e:
    raise ValueError(f"metadata is not JSON-serializable: {e}") from None

  entries, sections = [], []
  pending = []  # focused layers, encoded after one batched symbols call
  for path, value in arrays.items():
    if not isinstance(path, str):
      raise ValueError(f"array paths must be strings, got {path!r}")
    arr = np.asarray(value)
    name = dtype_name(arr.dtype)
    entry = {"path": path, "shape": [int(d) for d in arr.shape], "dtype": name}
    entries.append(entry)
    sections.append(None)
    if path in codebooks:
      if name not in FOCUSED_DTYPES:
        raise ValueError(f"{path}: a codebook layer must be a float array, not {name}")
      cstate = codebooks[path]
      mask = np.broadcast_to(np.asarray(cstate.mask, bool), arr.shape)
      if path in masks and not np.array_equal(np.asarray(masks[path], bool), mask):
        raise ValueError(f"{path}: masks[path] differs from the CodebookState's mask")
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
      sym = sym.astype(np.int32)
      run, pos_hist = positions_lib.choose_run(positions_lib.gaps_of(indices), coder)
      pos = positions_lib.encode(indices, run)
      entry.update(
        kind="codebook",
        codewords=int(book.size),
        kept=int(sym.size),
        inverted=inverted,
        run=run,
        npos=int(pos.size),
      )
      sections[-1] = (
        _coded_section(pos, run, sym, book.size, coder, huffman_lane, pos_hist)
        + book.astype("<f4").tobytes()
      )
      continue
    if path in focus:
      if name not in FOCUSED_DTYPES:
        raise ValueError(f"{path}: a focused layer must be a float array, not {name}")
      state = focus[path]
      mask = np.broadcast_to(np.asarray(state.mask, bool), arr.shape)
      if path in masks and not np.array_equal(np.asarray(masks[path], bool), mask):
        raise ValueError(f"{path}: masks[path] differs from the FocusState's mask")
      assignment = np.broadcast_to(np.asarray(state.assignment, bool), arr.shape)
      params = _focus_params(state)
      entry["kind"] = "focused"
      entry["quant"] = _quant_json(state, params)
      pending.append((len(entries) - 1, arr, mask, assignment, params))
      continue
    stored = name
    if (
      float_dtype is not None
      and name in FLOATS
      and (DTYPES[name].itemsize > DTYPES[float_dtype].itemsize)
    ):
      stored = float_dtype
    entry["stored"] = stored
    if path in masks:
      mask = np.asarray(masks[path], bool)
      if mask.shape != arr.shape:
        raise ValueError(f"{path}: mask shape {mask.shape} != array shape {arr.shape}")
      entry["kind"] = "pruned"
      kept_idx, indices, inverted = positions_lib.coded_indices(mask)
      run, pos_hist = positions_lib.choose_run(positions_lib.gaps_of(indices), coder)
      pos = positions_lib.encode(indices, run)
      kept = arr.reshape(-1).take(kept_idx)
      entry.update(kept=int(kept.size), inverted=inverted, run=run, npos=int(pos.size))
      sections[-1] = (
        _coded_section(pos, run, None, 0, coder, huffman_lane, pos_hist)
        + kept.astype(_le(stored)).tobytes()
      )
    else:
      entry["kind"] = "raw"
      sections[-1] = np.ascontiguousarray(arr).astype(_le(stored), copy=False).tobytes()

  if pending:
    coded = [positions_lib.coded_indices(mask) for _, _, mask, _, _ in pending]
    weights = [
      arr.reshape(-1).take(c[0]).astype(np.float32, copy=False)
      for (_, arr, _, _, _), c in zip(pending, coded)
    ]
    assigns = [a.reshape(-1).take(c[0]) for (_, _, _, a, _), c in zip(pending, coded)]
    symbols = batched_symbols(weights, assigns, [p[4] for p in pending])
    del weights, assigns
    for (i, arr, mask, _, params), sym, (_, indices, inverted) in zip(pending, symbols, coded):
      alphabet = _num_symbols(params)
      if sym.size and (int(sym.min()) < 0 or int(sym.max()) >= alphabet):
        raise ValueError(f"{entries[i]['path']}: symbols outside [0, {alphabet})")
      run, pos_hist = positions_lib.choose_run(positions_lib.gaps_of(indices), coder)
      pos = positions_lib.encode(indices, run)
      entries[i].update(kept=int(sym.size), inverted=inverted, run=run, npos=int(pos.size))
      sections[i] = _coded_section(pos, run, sym, alphabet, coder, huffman_lane, pos_hist)

  header = {"coder": coder, "metadata": metadata, "arrays": entries}
  if coder == "huffman":
    header["lane"] = huffman_lane
  return container.pack(header, sections)


# ----------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------


class _Lazy(Mapping):
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


def _full_symbols(size, shape, kept_idx, sym):
  full = np.zeros(size, np.int32)
  full[kept_idx] = sym
  return full.reshape(shape)


def _codebook_state(book, size, shape, kept_idx, sym, mask):
  """The CodebookState of a decoded codebook layer (NumPy fields)."""
  return codebook_lib.CodebookState(
    codebook=book, symbols=_full_symbols(size, shape, kept_idx, sym), mask=mask
  )


def _focus_state(p, size, shape, kept_idx, sym, mask):
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
    metadata: the header's metadata dict.
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
    return artifact_summary(self)


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


class _Validator:
  """Header field checks with messages naming the field."""

  def __init__(self, where: str):
    self.where = where

  def fail(self, field: str, message: str):
    raise FormatError(f"{self.where}: {field} {message}")

  def get(self, obj: dict, key: str, kind, field: str | None = None):
    field = field or key
    if key not in obj:
      self.fail(field, "is missing")
    value = obj[key]
    ok = (
      _is_int(value)
      if kind is int
      else (isinstance(value, bool) if kind is bool else isinstance(value, kind))
    )
    if not ok:
      self.fail(field, f"must be {getattr(kind, '__name__', kind)}, got {type(value).__name__}")
    return value

  def uint(self, obj, key, limit, field=None):
    v = self.get(obj, key, int, field)
    if not 0 <= v <= limit:
      self.fail(field or key, f"= {v} is outside [0, {limit}]")
    return v

  def f32(self, value, field):
    if isinstance(value, str):
      table = {"NaN": np.nan, "Infinity": np.inf, "-Infinity": -np.inf}
      if value not in table:
        self.fail(field, f"has an invalid float {value[:40]!r}")
      return np.float32(table[value])
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      self.fail(field, f"must be a number, got {type(value).__name__}")
    try:
      x = float(value)
      struct.pack("<f", x)  # OverflowError past the float32 range
    except OverflowError:
      self.fail(field, f"= {str(value)[:40]} overflows float32")
    return np.float32(x)

  def f32_pair(self, obj, key, field):
    v = self.get(obj, key, list, field)
    if len(v) != 2:
      self.fail(field, "must have 2 entries")
    return np.array([self.f32(x, f"{field}[{i}]") for i, x in enumerate(v)], np.float32)


def _parse_quant(v: _Validator, q, field: str) -> dict:
  if not isinstance(q, dict):
    v.fail(field, "must be an object")
  bits = v.get(q, "bits", int, f"{field}.bits")
  if not quantizers.MIN_BITS <= bits <= quantizers.MAX_BITS:
    v.fail(f"{field}.bits", f"= {bits} is outside [{quantizers.MIN_BITS}, {quantizers.MAX_BITS}]")
  rec = v.get(q, "recentralized", bool, f"{field}.recentralized")
  if rec and bits < 3:
    v.fail(f"{field}.recentralized", "needs bits >= 3")
  bias = v.get(q, "bias", int, f"{field}.bias")
  if not -(1 << 31) <= bias < 1 << 31:
    v.fail(f"{field}.bias", "is outside int32")
  for key in ("sigma", "alpha"):
    if key not in q:
      v.fail(f"{field}.{key}", "is missing")
  out = dict(
    recentralized=rec,
    bits=bits,
    bias=bias,
    means=list(v.f32_pair(q, "means", f"{field}.means")),
    sigma=v.f32(q["sigma"], f"{field}.sigma"),
    alpha=v.f32(q["alpha"], f"{field}.alpha"),
  )
  g = q.get("gmm")
  if g is not None:
    if not isinstance(g, dict):
      v.fail(f"{field}.gmm", "must be an object")
    out["gmm"] = gmm_lib.GMM(
      *(v.f32_pair(g, k, f"{field}.gmm.{k}") for k in ("weights", "means", "stds"))
    )
  else:
    out["gmm"] = None
  out["separation"] = v.f32(q["separation"], f"{field}.separation") if "separation" in q else None
  return out


def _read_model(r: Reader, alphabet: int, coder: str, what: str) -> np.ndarray:
  """A stream's table: counts (ANS) or code lengths (Huffman) over the alphabet."""
  lo = r.varint(f"{what} table start", alphabet)
  m = r.varint(f"{what} table size", alphabet - lo)
  limit = (1 << 62) if coder == "ans" else huffman_lib.FORMAT_MAX_LEN
  if m > r.remaining():
    r.fail(f"{what} table of {m} entries does not fit in the section")
  table = np.zeros(alphabet, np.int64)
  vals = [r.varint(f"{what} table entry", limit) for _ in range(m)]
  table[lo : lo + m] = vals
  return table


@dataclasses.dataclass
class _Layer:
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
  codewords: int = 0
  codebook: np.ndarray | None = None


def decode_model(data: bytes, *, max_output_bytes: int | None = None) -> DecodedModel:
  """Decodes .fqz bytes (see `encode_model`).

  Args:
    data: the file's bytes.
    max_output_bytes: the most the decoder may allocate for the rebuilt arrays
      and its temporaries, checked before allocating. Default:
      1024 * len(data) + 16 MiB (raise it for extremely sparse models).

  Returns:
    A `DecodedModel`.

  Raises:
    FormatError: for any malformed, truncated, corrupted or oversized input;
      the message names the section and byte offset at fault.
  """
  if not isinstance(data, (bytes, bytearray, memoryview)):
    raise TypeError(f"decode_model needs bytes, got {type(data).__name__}")
  try:
    return _decode(data, max_output_bytes)
  except FormatError:
    raise
  except Exception as e:  # a safety net: nothing but FormatError may escape
    if os.environ.get("FQ_JAX_CODEC_STRICT"):
      raise
    raise FormatError(f"malformed file: {type(e).__name__}: {e}"[:500]) from e


def _decode(data, max_output_bytes) -> DecodedModel:
  data = bytes(data)
  if max_output_bytes is None:
    max_output_bytes = DEFAULT_EXPANSION * len(data) + DEFAULT_ALLOWANCE
  header, spans, header_end = container.unpack(data, max_output_bytes // 16)
  major, minor = struct.unpack_from("<HH", data, 8)
  v = _Validator("header")
  coder = v.get(header, "coder", str)
  if coder not in CODERS:
    v.fail("coder", f"= {coder[:40]!r} is not one of {CODERS}")
  lane = 0
  if coder == "huffman":
    lane = v.get(header, "lane", int)
    if not 1 <= lane <= huffman_lib.FORMAT_MAX_LANE:
      v.fail("lane", f"= {lane} is outside [1, {huffman_lib.FORMAT_MAX_LANE}]")
  metadata = header.get("metadata", {})
  if not isinstance(metadata, dict):
    v.fail("metadata", "must be an object")

  # Pass 1: validate every entry and the total allocation before touching sections.
  layers: list[_Layer] = []
  budget = 0
  seen = set()
  for i, entry in enumerate(header["arrays"]):
    v = _Validator(f"header arrays[{i}]")
    path = v.get(entry, "path", str)
    if path in seen:
      v.fail("path", f"{path[:80]!r} appears twice")
    seen.add(path)
    v.where = f"header arrays[{i}] ({path[:80]!r})"
    shape = v.get(entry, "shape", list)
    if len(shape) > MAX_NDIM or not all(_is_int(d) and 0 <= d < 1 << 48 for d in shape):
      v.fail("shape", f"must be at most {MAX_NDIM} non-negative integers")
    size = math.prod(shape)
    dtype = v.get(entry, "dtype", str)
    if dtype not in DTYPES:
      v.fail("dtype", f"{dtype[:40]!r} is not supported")
    kind = v.get(entry, "kind", str)
    if kind not in KINDS:
      v.fail("kind", f"{kind[:40]!r} is not one of {KINDS}")
    layer = _Layer(i, entry, tuple(shape), size, kind)
    budget += size * DTYPES[dtype].itemsize
    if kind not in SYMBOL_KINDS:
      stored = v.get(entry, "stored", str)
      if stored not in DTYPES:
        v.fail("stored", f"{stored[:40]!r} is not supported")
      if stored != dtype and not (stored in FLOATS and dtype in FLOATS):
        v.fail("stored", f"{stored} cannot stand for {dtype}")
    elif kind == "codebook":
      if dtype not in FOCUSED_DTYPES:
        v.fail("dtype", f"{dtype} cannot be codebook-quantized")
      layer.codewords = v.uint(entry, "codewords", MAX_CODEWORDS)
      if layer.codewords < 1:
        v.fail("codewords", "must be >= 1")
      budget += 8 * layer.codewords
    else:
      if dtype not in FOCUSED_DTYPES:
        v.fail("dtype", f"{dtype} cannot be focused")
      layer.params = _parse_quant(v, entry.get("quant"), "quant")
    if kind != "raw":
      layer.kept = v.uint(entry, "kept", size)
      inverted = v.get(entry, "inverted", bool)
      layer.coded = size - layer.kept if inverted else layer.kept
      run = v.uint(entry, "run", positions_lib.FORMAT_MAX_RUN)
      if run < 1:
        v.fail("run", "must be >= 1")
      npos = v.uint(entry, "npos", size + layer.coded)
      if not layer.coded <= npos <= layer.coded + size // run + 1:
        v.fail("npos", f"= {npos} is inconsistent with {layer.coded} coded positions")
      budget += _PER_SYMBOL * (npos + layer.kept) + size  # symbols, indices, mask
    layers.append(layer)
  if budget > max_output_bytes:
    raise FormatError(
      f"header: the arrays would need {budget} bytes to decode, more than the "
      f"allowed {max_output_bytes} (max_output_bytes) for a {len(data)}-byte file"
    )

  # Pass 2: parse sections; decode rANS streams, queue Huffman streams.
  hstreams: list[huffman_lib.Stream] = []
  hslots: list[tuple[_Layer, str]] = []
  table_bytes = 0
  for layer, (start, end) in zip(layers, spans):
    entry = layer.entry
    name = f"section {layer.index} ({entry['path'][:80]!r})"
    stored = entry.get("stored")
    if layer.kind == "raw":
      need = layer.size * DTYPES[stored].itemsize
      if end - start != need:
        raise FormatError(
          f"{name} at file offset {start}: holds {end - start} bytes, "
          f"not the {need} of a {stored} array of shape {list(layer.shape)}"
        )
      continue
    r = Reader(data, start, end, name)
    run = entry["run"]
    pos_table = _read_model(r, run + 1, coder, "position")
    sym_table = None
    if layer.kind == "focused":
      sym_table = _read_model(r, _num_symbols(layer.params), coder, "symbol")
    elif layer.kind == "codebook":
      sym_table = _read_model(r, layer.codewords, coder, "symbol")
    payload_len = r.varint("payload length", r.remaining())
    payload_start = r.pos
    payload_end = payload_start + payload_len
    tables = [(pos_table, entry["npos"], "pos")]
    if sym_table is not None:
      tables.append((sym_table, layer.kept, "sym"))
    for table, count, what in tables:
      present = np.flatnonzero(table)
      if bool(count) != bool(present.size):
        r.fail(f"{what} table has {present.size} symbols for {count} coded symbols")
      if coder == "ans" and present.size and int(table.sum()) != count:
        r.fail(f"{what} counts sum to {int(table.sum())}, not {count}")
      if coder == "huffman" and present.size == 1 and table[present[0]] != 1:
        r.fail(f"single {what} symbol must have length 1")
    if coder == "ans" and entry["npos"]:
      non_escape = int(pos_table[:run].sum())
      if non_escape != layer.coded:
        r.fail(f"position counts give {non_escape} positions, not {layer.coded}")
    if layer.kind == "pruned":
      itemsize = DTYPES[stored].itemsize
      if end - payload_end != layer.kept * itemsize:
        r.fail(
          f"kept values need {layer.kept * itemsize} bytes after the payload, "
          f"{end - payload_end} remain",
          payload_end,
        )
      layer.values = data[payload_end:end]
    elif layer.kind == "codebook":
      if end - payload_end != 4 * layer.codewords:
        r.fail(
          f"the codebook of {layer.codewords} float32 codewords needs "
          f"{4 * layer.codewords} bytes after the payload, {end - payload_end} remain",
          payload_end,
        )
      layer.codebook = np.frombuffer(data, "<f4", layer.codewords, payload_end).astype(np.float32)
    elif payload_end != end:
      r.fail(f"{end - payload_end} unexpected bytes after the payload", payload_end)
    layer.coded_bytes = payload_end - start

    if coder == "ans":
      streams = [(count, table, np.flatnonzero(table)) for table, count, _ in tables]
      decoded = ans_lib.decode(
        data[payload_start:payload_end], streams, f"{name} payload at file offset {payload_start}"
      )
      for (table, count, what), d in zip(tables, decoded):
        setattr(layer, what, d)
      layer.pos_hist = pos_table  # rANS tables are the exact histograms
      layer.sym_hist = sym_table
      continue
    # Huffman: lane lengths, then the streams' bytes.
    pr = Reader(data, payload_start, payload_end, f"{name} payload")
    lane_info = []
    for table, count, what in tables:
      present = np.flatnonzero(table)
      if count == 0 or present.size < 2:
        lane_info.append(None)
        continue
      huffman_lib.check_lengths(table, f"{name} {what} code")
      num_lanes = container.ceil_div(count, lane)
      if num_lanes > pr.remaining():
        pr.fail(f"{num_lanes} {what} lanes do not fit")
      max_bits = lane * int(table.max())
      bits = np.array(
        [pr.varint(f"{what} lane bits", max_bits) for _ in range(num_lanes)], np.int64
      )
      lane_info.append(bits)
      table_bytes += 4 * huffman_lib.table_size(table)
    for (table, count, what), bits in zip(tables, lane_info):
      if bits is None:
        present = np.flatnonzero(table)
        setattr(layer, what, np.full(count, present[0] if present.size else 0, np.int32))
        continue
      nbytes = container.ceil_div(int(bits.sum()), 8)
      stream_start = pr.pos
      payload = pr.take(nbytes, f"{what} bit stream")
      hstreams.append(
        huffman_lib.Stream(
          table, count, bits, payload, f"{name} {what} stream at file offset {stream_start}"
        )
      )
      hslots.append((layer, what))
    pr.expect_end("the Huffman streams")
  if hstreams:
    total_payload = sum(len(s.payload) for s in hstreams)
    need = table_bytes + 10 * (total_payload + 3 * lane + 32)
    if budget + need > max_output_bytes:
      raise FormatError(
        f"Huffman decoding tables and buffers need {need} more bytes, beyond "
        f"the allowed {max_output_bytes} (max_output_bytes)"
      )
    for (layer, what), d in zip(hslots, huffman_lib.decode_streams(hstreams, lane)):
      setattr(layer, what, d)

  # Pass 3: positions -> masks, symbols -> values.
  arrays: dict[str, np.ndarray] = {}
  focus: dict[str, quantizers.FocusState] = {}
  masks: dict[str, np.ndarray] = {}
  symbols_out: dict[str, np.ndarray] = {}
  codebooks: dict[str, codebook_lib.CodebookState] = {}
  infos = []
  focused_groups: dict[str, list] = {}
  for layer, (start, end) in zip(layers, spans):
    entry = layer.entry
    path, dtype = entry["path"], entry["dtype"]
    name = f"section {layer.index} ({path[:80]!r})"
    info = dict(
      path=path,
      shape=list(layer.shape),
      dtype=dtype,
      stored=entry.get("stored", dtype),
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
    infos.append(info)
    if layer.kind == "raw":
      raw = np.frombuffer(data, _le(entry["stored"]), layer.size, start)
      if entry["stored"] == "bool" and raw.size and raw.view(np.uint8).max() > 1:
        raise FormatError(f"{name} at file offset {start}: bool bytes must be 0 or 1")
      arrays[path] = raw.astype(DTYPES[dtype]).reshape(layer.shape)
      continue
    run = entry["run"]
    escapes = layer.pos_hist is None or run >= layer.pos_hist.size or layer.pos_hist[run] > 0
    indices = positions_lib.decode(
      layer.pos, run, layer.coded, layer.size, f"{name} position code", escapes=escapes
    )
    if entry["inverted"]:
      mask = np.ones(layer.size, bool)
      mask[indices] = False
      kept_idx = np.flatnonzero(mask)
    else:
      mask = np.zeros(layer.size, bool)
      mask[indices] = True
      kept_idx = indices
    masks[path] = mask.reshape(layer.shape)
    info.update(
      kept=layer.kept,
      coded_bytes=layer.coded_bytes,
      npos=int(layer.pos.size),
      position_entropy_bits=_entropy_bits(layer.pos, layer.pos_hist),
    )
    if layer.kind == "pruned":
      out = np.zeros(layer.size, DTYPES[dtype])
      kept = np.frombuffer(layer.values, _le(entry["stored"]))
      if entry["stored"] == "bool" and kept.size and kept.view(np.uint8).max() > 1:
        raise FormatError(f"{name}: bool bytes must be 0 or 1")
      out[kept_idx] = kept.astype(DTYPES[dtype], copy=False)
      arrays[path] = out.reshape(layer.shape)
    elif layer.kind == "codebook":
      info["symbol_entropy_bits"] = _entropy_bits(layer.sym, layer.sym_hist)
      info["codewords"] = layer.codewords
      info["codebook_bytes"] = 4 * layer.codewords
      # fq.codebook_values: codebook[symbol] in float32, then cast (round to nearest even).
      out = np.zeros(layer.size, DTYPES[dtype])
      with np.errstate(over="ignore"):  # a float32 codeword beyond float16 becomes inf
        out[kept_idx] = layer.codebook[layer.sym].astype(DTYPES[dtype])
      arrays[path] = out.reshape(layer.shape)
      codebooks[path] = functools.partial(
        _codebook_state, layer.codebook, layer.size, layer.shape, kept_idx, layer.sym, masks[path]
      )
    else:
      info["symbol_entropy_bits"] = _entropy_bits(layer.sym, layer.sym_hist)
      focused_groups.setdefault(dtype, []).append((layer, kept_idx, layer.sym))
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
  for dtype, group in focused_groups.items():
    values = batched_values([g[2] for g in group], [g[0].params for g in group], DTYPES[dtype])
    for (layer, kept_idx, sym), val in zip(group, values):
      path = layer.entry["path"]
      p = layer.params
      out = np.zeros(layer.size, DTYPES[dtype])
      out[kept_idx] = val
      arrays[path] = out.reshape(layer.shape)
      symbols_out[path] = functools.partial(_full_symbols, layer.size, layer.shape, kept_idx, sym)
      focus[path] = functools.partial(
        _focus_state, p, layer.size, layer.shape, kept_idx, sym, masks[path]
      )
  arrays = {layer.entry["path"]: arrays[layer.entry["path"]] for layer in layers}
  return DecodedModel(
    arrays=arrays,
    focus=_Lazy(focus),
    masks=masks,
    symbols=_Lazy(symbols_out),
    metadata=metadata,
    coder=coder,
    version=(major, minor),
    file_bytes=len(data),
    header_bytes=header_end,
    layers=infos,
    codebooks=_Lazy(codebooks),
  )


# ----------------------------------------------------------------------------
# Summary
# ----------------------------------------------------------------------------


def artifact_summary(decoded_or_bytes) -> dict:
  """Honest size accounting of an .fqz artifact.

  Args:
    decoded_or_bytes: a `DecodedModel`, or the file's bytes (decoded here).

  Returns:
    A dict with
      file_bytes, header_bytes, num_values (every value the file rebuilds),
      compression_ratio = 4 * num_values / file_bytes (float32 model size over
        the file, everything counted);
      kernel_values, kernel_section_bytes and paper_style_compression_ratio =
        4 * kernel_values / kernel_section_bytes over the focused, codebook and
        pruned arrays only (the paper's way: no header, biases or batch statistics);
      entropy_bound_bytes: zeroth-order entropy of the coded position and
        symbol streams (sum over layers of n_pos H(pos) + n_sym H(sym), /8);
      coded_bytes: the bytes actually spent on those streams, tables included;
      coder_overhead = coded_bytes / entropy_bound_bytes - 1;
      file_entropy_bound_bytes: the bound plus everything stored raw and the
        header (what a perfect zeroth-order coder would leave);
      coder, version, metadata, and `layers`: one row per array (see
      `DecodedModel.layers`) with bits_per_kept = 8 * section_bytes / kept.
  """
  d = decoded_or_bytes
  if not isinstance(d, DecodedModel):
    d = decode_model(d)
  num_values = sum(int(a.size) for a in d.arrays.values())
  rows = []
  kernel_values = kernel_bytes = 0
  bound = coded = 0.0
  raw_bytes = 0
  for info in d.layers:
    row = dict(info)
    kept = row["kept"]
    row["sparsity"] = 1.0 - kept / row["size"] if row["size"] else 0.0
    row["bits_per_kept"] = 8.0 * row["section_bytes"] / kept if kept else 0.0
    if row["kind"] == "focused":
      row["kind"] = "recentralized" if row["recentralized"] else "shift"
    if info["kind"] == "raw":
      raw_bytes += row["section_bytes"]
    else:
      kernel_values += row["size"]
      kernel_bytes += row["section_bytes"]
      bound += row["entropy_bound_bytes"]
      coded += row["coded_bytes"]
      raw_bytes += row["section_bytes"] - row["coded_bytes"]
    rows.append(row)
  return dict(
    file_bytes=d.file_bytes,
    header_bytes=d.header_bytes,
    num_values=num_values,
    float32_bytes=4 * num_values,
    compression_ratio=4 * num_values / d.file_bytes,
    kernel_values=kernel_values,
    kernel_section_bytes=kernel_bytes,
    paper_style_compression_ratio=(4 * kernel_values / kernel_bytes) if kernel_bytes else None,
    entropy_bound_bytes=bound,
    coded_bytes=coded,
    coder_overhead=(coded / bound - 1.0) if bound > 0 else None,
    file_entropy_bound_bytes=bound + raw_bytes + d.header_bytes,
    coder=d.coder,
    version=list(d.version),
    metadata=d.metadata,
    layers=rows,
  )


# ----------------------------------------------------------------------------
# Trees and files
# ----------------------------------------------------------------------------


def _is_state_leaf(x) -> bool:
  return x is None or isinstance(x, quantizers.FocusState)


def _structure(tree):
  return jax.tree.structure(tree, is_leaf=lambda x: x is None)


def save_fqz(
  path,
  params_or_variables,
  opt_state_or_fq_state=None,
  *,
  extra=None,
  coder: str = "ans",
  metadata: dict | None = None,
  params_key: str | None = "auto",
  float_dtype: str | None = None,
) -> int:
  """Writes a model and its compression state to an .fqz file.

  Args:
    path: output file.
    params_or_variables: the parameter tree, or a full Flax variables dict
      ({'params': ..., 'batch_stats': ...}). Every leaf is stored under its
      '/'-joined path (`fq.leaf_paths`), e.g. 'params/conv/kernel'.
    opt_state_or_fq_state: an `fq.FQState` / `fq.PruneState` or any optax
      state containing one (found with `fq.find_state`), or None to store
      everything raw. Its mask and focus trees mirror the *parameters*.
    extra: an optional further tree stored losslessly under its own paths
      (e.g. {'batch_stats': ...} when the first argument is just the params).
    coder: "ans" or "huffman".
    metadata: JSON-serializable dict for the header.
    params_key: where the parameters sit in `params_or_variables`: "auto"
      (default) uses the 'params' entry of a dict when the state's trees
      mirror it and the whole tree otherwise; None means the whole tree; a
      string names the top-level key explicitly. The stored paths always
      start from the root of `params_or_variables`.
    float_dtype: see `encode_model`.

  Returns:
    The number of bytes written.
  """
  tree = params_or_variables
  state = None if opt_state_or_fq_state is None else transforms.find_state(opt_state_or_fq_state)
  if params_key == "auto":
    params_key = None
    if (
      state is not None
      and isinstance(tree, Mapping)
      and "params" in tree
      and _structure(state.masks) != _structure(tree)
    ):
      params_key = "params"
  if params_key is not None:
    if not isinstance(tree, Mapping) or params_key not in tree:
      raise ValueError(f"params_key {params_key!r} is not a key of the tree")
    params = tree[params_key]
    prefix = f"{params_key}/"
  else:
    params = tree
    prefix = ""
  paths_tree = rules_lib.leaf_paths(tree)
  flat_paths = jax.tree.leaves(paths_tree)
  flat_values = jax.tree.leaves(tree)
  arrays = dict(zip(flat_paths, (np.asarray(x) for x in flat_values)))
  if len(arrays) != len(flat_paths):
    raise ValueError("two leaves of the tree have the same '/'-joined path")
  focus, masks = {}, {}
  if state is not None:
    treedef = jax.tree.structure(state.masks, is_leaf=_is_state_leaf)
    try:
      mask_leaves = treedef.flatten_up_to(state.masks)
      param_paths = treedef.flatten_up_to(rules_lib.leaf_paths(params))
      focus_leaves = (
        treedef.flatten_up_to(state.focus) if hasattr(state, "focus") else [None] * len(mask_leaves)
      )
    except (ValueError, TypeError) as e:
      raise ValueError(
        "the compression state's trees do not mirror the parameters "
        f"(params_key={params_key!r}): {e}"
      ) from None
    for m, f, p in zip(mask_leaves, focus_leaves, param_paths):
      if m is None:
        continue
      full = prefix + p
      if f is not None:
        focus[full] = f
      else:
        masks[full] = np.asarray(m, bool)
  if extra is not None:
    for p, x in zip(jax.tree.leaves(rules_lib.leaf_paths(extra)), jax.tree.leaves(extra)):
      if p in arrays:
        raise ValueError(f"extra path {p!r} clashes with a model path")
      arrays[p] = np.asarray(x)
  data = encode_model(
    arrays, focus=focus, masks=masks, coder=coder, metadata=metadata, float_dtype=float_dtype
  )
  with open(path, "wb") as fh:
    fh.write(data)
  return len(data)


def load_fqz(path, *, max_output_bytes: int | None = None) -> DecodedModel:
  """Reads and decodes an .fqz file (see `decode_model`)."""
  with open(path, "rb") as fh:
    data = fh.read()
  return decode_model(data, max_output_bytes=max_output_bytes)
