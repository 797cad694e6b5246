""".fqz bytes -> model arrays: `decode_model`, one function per section kind.

Decoding is hardened against malformed input: all sizes are validated against the file and
against `max_output_bytes` before anything is allocated, and every failure is a
`FormatError` naming the section and the file offset. Three passes: (1) validate every
header entry and the total allocation, (2) parse each section and decode its streams,
(3) rebuild masks and values (passes 2 and 3, one function per kind, are in `sections.py`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import struct

import numpy as np

from fq_jax._src import gmm as gmm_lib
from fq_jax._src import quantizers
from fq_jax.codec import container, sections
from fq_jax.codec import huffman as huffman_lib
from fq_jax.codec import limits as limits_lib
from fq_jax.codec import positions as positions_lib
from fq_jax.codec.container import FormatError
from fq_jax.codec.decoded import DecodedModel, Lazy, codebook_state
from fq_jax.codec.layout import (
  CODERS,
  DTYPES,
  FLOATS,
  FOCUSED_DTYPES,
  KINDS,
  MAX_BIAS,
  MAX_CODEWORDS,
  MAX_NDIM,
  MIN_BIAS,
  SYMBOL_KINDS,
)
from fq_jax.codec.limits import DecodeLimits
from fq_jax.codec.sections import Layer

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
    """A float32 header value: a JSON number that rounds to a finite float32, or one of the
    strings "NaN", "Infinity", "-Infinity" (the only way to store non-finite values)."""
    if isinstance(value, str):
      table = {"NaN": np.nan, "Infinity": np.inf, "-Infinity": -np.inf}
      if value not in table:
        self.fail(field, f"has an invalid float {value[:40]!r}")
      return np.float32(table[value])
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      self.fail(field, f"must be a number, got {type(value).__name__}")
    try:
      x = float(value)  # an int too large for a double raises OverflowError
    except OverflowError:
      x = math.inf
    with np.errstate(over="ignore"):
      y = np.float32(x)  # IEEE round to nearest, ties to even (inf from 2^128 - 2^103 on)
    if not np.isfinite(y):  # 1e39, and 1e400 (which json reads as inf)
      self.fail(field, f'= {str(value)[:40]} is outside the float32 range (write "Infinity")')
    return y

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
  if not MIN_BIAS <= bias <= MAX_BIAS:
    v.fail(f"{field}.bias", f"= {bias} is outside [{MIN_BIAS}, {MAX_BIAS}]")
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
  narrower_float = (
    stored in FLOATS and dtype in FLOATS and DTYPES[stored].itemsize < DTYPES[dtype].itemsize
  )
  if stored != dtype and not narrower_float:
    v.fail("stored", f"{stored} cannot stand for {dtype} (only a narrower float may)")


def _check_codebook(v: Validator, entry: dict, layer: Layer, dtype: str) -> int:
  if dtype not in FOCUSED_DTYPES:
    v.fail("dtype", f"{dtype} cannot be codebook-quantized")
  layer.codewords = v.uint(entry, "codewords", MAX_CODEWORDS)
  if layer.codewords < 1:
    v.fail("codewords", "must be >= 1")
  return (
    limits_lib.PER_CODEWORD_BYTES * layer.codewords
    + limits_lib.PER_STATE_ELEMENT_BYTES * layer.size
  )


def _check_focused(v: Validator, entry: dict, layer: Layer, dtype: str) -> int:
  if dtype not in FOCUSED_DTYPES:
    v.fail("dtype", f"{dtype} cannot be focused")
  layer.params = _parse_quant(v, entry.get("quant"), "quant")
  return limits_lib.PER_STATE_ELEMENT_BYTES * layer.size  # symbols and assignment, built on access


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
  # Symbol buffers and index temporaries, and the keep-mask.
  return (
    limits_lib.PER_SYMBOL_BYTES * (npos + layer.kept) + limits_lib.PER_ELEMENT_MASK_BYTES * size
  )


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
  need = size * DTYPES[dtype].itemsize + limits_lib.PER_ARRAY_BYTES
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


def decode_model(
  data: bytes, *, max_output_bytes: int | None = None, limits: DecodeLimits | None = None
) -> DecodedModel:
  """Decodes .fqz bytes (see `encode_model`).

  Args:
    data: the file's bytes.
    max_output_bytes: shorthand for `DecodeLimits(max_output_bytes=...)`
      (overrides the field of `limits`).
    limits: the resource limits (`DecodeLimits`; default: at most
      1024 * len(data) + 16 MiB held at once, 65,536 arrays, a header of at
      most 1/16 of that). Every buffer the decoder allocates is counted from
      the header and checked before anything is allocated; decode time is
      linear in the same total.

  Returns:
    A `DecodedModel`.

  Raises:
    FormatError: for any malformed, truncated, corrupted or oversized input
      (beyond `limits`); the message names the section and byte offset at
      fault. Nothing else is caught: a `MemoryError` or a bug surfaces as
      itself.
  """
  if not isinstance(data, (bytes, bytearray, memoryview)):
    raise TypeError(f"decode_model needs bytes, got {type(data).__name__}")
  limits = DecodeLimits() if limits is None else limits
  if not isinstance(limits, DecodeLimits):
    raise TypeError(f"limits must be a DecodeLimits, got {type(limits).__name__}")
  if max_output_bytes is not None:
    limits = dataclasses.replace(limits, max_output_bytes=max_output_bytes)
  return _decode(bytes(data), limits)


def _check_budget(header: dict, data: bytes, limits: DecodeLimits) -> tuple[list[Layer], int, int]:
  """Pass 1: every entry checked and the bytes decoding needs summed; (layers, need, limit)."""
  limit = limits.output_bytes(len(data))
  layers, seen = [], set()
  budget = limits_lib.PER_TABLE_ENTRY_BYTES * len(data)  # stream tables: at most one per file byte
  for i, entry in enumerate(header["arrays"]):
    layer, need = _check_entry(i, entry, seen)
    layers.append(layer)
    budget += need
  if budget > limit:
    raise FormatError(
      f"header: the arrays would need {budget} bytes to decode, more than the "
      f"allowed {limit} (max_output_bytes) for a {len(data)}-byte file"
    )
  return layers, budget, limit


def _decode(data: bytes, limits: DecodeLimits) -> DecodedModel:
  header, spans, header_end = container.unpack(
    data, limits.header_bytes(len(data), container.MAX_HEADER_RAW), limits.max_arrays
  )
  major, minor = struct.unpack_from("<HH", data, 8)
  coder, lane, metadata = _check_header(header)
  layers, budget, max_output_bytes = _check_budget(header, data, limits)

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
