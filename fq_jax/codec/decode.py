""".fqz bytes -> model arrays: `decode_model`, one function per section kind.

Decoding is hardened against malformed input: all sizes are validated against the file and
against `max_output_bytes` before anything is allocated, and every failure is a
`FormatError` naming the section and the file offset. Three passes: (1) validate every
header entry and the total allocation, (2) parse each section and decode its streams,
(3) rebuild masks and values (passes 2 and 3, one function per kind, are in `sections.py`).
"""

from __future__ import annotations

import functools
import math
import os
import struct

import numpy as np

from fq_jax._src import gmm as gmm_lib
from fq_jax._src import quantizers
from fq_jax.codec import container, sections
from fq_jax.codec import huffman as huffman_lib
from fq_jax.codec import positions as positions_lib
from fq_jax.codec.container import FormatError
from fq_jax.codec.decoded import DecodedModel, Lazy, codebook_state
from fq_jax.codec.layout import (
  CODERS,
  DTYPES,
  FLOATS,
  FOCUSED_DTYPES,
  KINDS,
  MAX_CODEWORDS,
  MAX_NDIM,
  SYMBOL_KINDS,
)
from fq_jax.codec.sections import Layer

# Default decoding allowance: what the decoder may allocate, in bytes.
DEFAULT_EXPANSION = 1024
DEFAULT_ALLOWANCE = 16 << 20
# Bytes of temporaries per coded symbol and per array element while decoding.
_PER_SYMBOL = 48


# ----------------------------------------------------------------------------
# The shared header validator
# ----------------------------------------------------------------------------


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


class Validator:
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


def _parse_quant(v: Validator, q, field: str) -> dict:
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


# ----------------------------------------------------------------------------
# Pass 1: header entries, one check per kind
# ----------------------------------------------------------------------------


def _check_stored(v: Validator, entry: dict, dtype: str) -> None:
  """Raw and pruned entries: `stored` names the dtype of the bytes."""
  stored = v.get(entry, "stored", str)
  if stored not in DTYPES:
    v.fail("stored", f"{stored[:40]!r} is not supported")
  if stored != dtype and not (stored in FLOATS and dtype in FLOATS):
    v.fail("stored", f"{stored} cannot stand for {dtype}")


def _check_codebook(v: Validator, entry: dict, layer: Layer, dtype: str) -> int:
  if dtype not in FOCUSED_DTYPES:
    v.fail("dtype", f"{dtype} cannot be codebook-quantized")
  layer.codewords = v.uint(entry, "codewords", MAX_CODEWORDS)
  if layer.codewords < 1:
    v.fail("codewords", "must be >= 1")
  return 8 * layer.codewords


def _check_focused(v: Validator, entry: dict, layer: Layer, dtype: str) -> int:
  if dtype not in FOCUSED_DTYPES:
    v.fail("dtype", f"{dtype} cannot be focused")
  layer.params = _parse_quant(v, entry.get("quant"), "quant")
  return 0


def _check_positions(v: Validator, entry: dict, layer: Layer) -> int:
  """Coded kinds: kept, inverted, run and npos; returns the bytes decoding them needs."""
  size = layer.size
  layer.kept = v.uint(entry, "kept", size)
  inverted = v.get(entry, "inverted", bool)
  layer.coded = size - layer.kept if inverted else layer.kept
  run = v.uint(entry, "run", positions_lib.FORMAT_MAX_RUN)
  if run < 1:
    v.fail("run", "must be >= 1")
  npos = v.uint(entry, "npos", size + layer.coded)
  if not layer.coded <= npos <= layer.coded + size // run + 1:
    v.fail("npos", f"= {npos} is inconsistent with {layer.coded} coded positions")
  return _PER_SYMBOL * (npos + layer.kept) + size  # symbols, indices, mask


def _check_entry(i: int, entry: dict, seen: set) -> tuple[Layer, int]:
  """Validates one header entry; returns its layer and the bytes decoding it needs."""
  v = Validator(f"header arrays[{i}]")
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
  layer = Layer(i, entry, tuple(shape), size, kind)
  need = size * DTYPES[dtype].itemsize
  if kind not in SYMBOL_KINDS:
    _check_stored(v, entry, dtype)
  elif kind == "codebook":
    need += _check_codebook(v, entry, layer, dtype)
  else:
    need += _check_focused(v, entry, layer, dtype)
  if kind != "raw":
    need += _check_positions(v, entry, layer)
  return layer, need


def _check_header(header: dict) -> tuple[str, int, dict]:
  """(coder, Huffman lane or 0, metadata) of a header."""
  v = Validator("header")
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
  return coder, lane, metadata


# ----------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------


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
  coder, lane, metadata = _check_header(header)

  layers, budget, seen = [], 0, set()
  for i, entry in enumerate(header["arrays"]):
    layer, need = _check_entry(i, entry, seen)
    layers.append(layer)
    budget += need
  if budget > max_output_bytes:
    raise FormatError(
      f"header: the arrays would need {budget} bytes to decode, more than the "
      f"allowed {max_output_bytes} (max_output_bytes) for a {len(data)}-byte file"
    )

  queue, table_bytes = [], 0
  for layer, (start, end) in zip(layers, spans):
    if layer.kind == "raw":
      sections.check_raw_section(layer, start, end)
      continue
    tables, p0, p1 = sections.parse_coded_section(layer, data, start, end, coder)
    if coder == "ans":
      sections.decode_ans(layer, data, tables, p0, p1)
    else:
      table_bytes += sections.queue_huffman(layer, data, tables, p0, p1, lane, queue)
  if queue:
    sections.decode_huffman(queue, lane, table_bytes, budget, max_output_bytes)

  arrays, focus, masks, symbols, codebooks, infos, groups = {}, {}, {}, {}, {}, [], {}
  for layer, (start, end) in zip(layers, spans):
    path = layer.entry["path"]
    infos.append(sections.layer_info(layer, start, end))
    if layer.kind == "raw":
      arrays[path] = sections.rebuild_raw(layer, data, start)
      continue
    mask, kept_idx = sections.rebuild_mask(layer)
    masks[path] = mask.reshape(layer.shape)
    sections.coded_info(infos[-1], layer)
    if layer.kind == "pruned":
      arrays[path] = sections.rebuild_pruned(layer, kept_idx)
    elif layer.kind == "codebook":
      arrays[path] = sections.rebuild_codebook(layer, kept_idx)
      args = (layer.codebook, layer.size, layer.shape, kept_idx, layer.sym, masks[path])
      codebooks[path] = functools.partial(codebook_state, *args)
    else:
      groups.setdefault(layer.entry["dtype"], []).append((layer, kept_idx))
  sections.rebuild_focused(groups, arrays, symbols, focus, masks)
  return DecodedModel(
    arrays={layer.entry["path"]: arrays[layer.entry["path"]] for layer in layers},
    focus=Lazy(focus),
    masks=masks,
    symbols=Lazy(symbols),
    metadata=metadata,
    coder=coder,
    version=(major, minor),
    file_bytes=len(data),
    header_bytes=header_end,
    layers=infos,
    codebooks=Lazy(codebooks),
  )
