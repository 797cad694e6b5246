"""docs/format.md is complete: a from-scratch reader written from it alone (plain Python,
no codec code) decodes files written by fq.encode_model to the same arrays."""

import json
import math
import struct
import zlib

import fuzz_fqz
import ml_dtypes
import numpy as np
import pytest

import fq_jax as fq

DTYPES = {
  "bool": "?",
  "int8": "<i1",
  "uint8": "<u1",
  "int16": "<i2",
  "uint16": "<u2",
  "int32": "<i4",
  "uint32": "<u4",
  "int64": "<i8",
  "uint64": "<u8",
  "float16": "<f2",
  "bfloat16": ml_dtypes.bfloat16,
  "float32": "<f4",
  "float64": "<f8",
}


class Cursor:
  def __init__(self, data, pos, end):
    self.data, self.pos, self.end = data, pos, end

  def varint(self):
    value = shift = 0
    while True:
      byte = self.data[self.pos]
      self.pos += 1
      value |= (byte & 0x7F) << shift
      shift += 7
      if not byte & 0x80:
        return value

  def table(self):
    lo, m = self.varint(), self.varint()
    return {lo + i: e for i in range(m) if (e := self.varint())}


def f32(x):
  return np.float32({"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}.get(x, x))


def rans_decode(words, streams):
  """Section 7, literally."""
  words = list(words)
  state = 0
  while words and state < 1 << 32:
    state = (state << 32) | words.pop()
  out = []
  for count, table in streams:
    present = sorted(table)
    if count == 0 or len(present) < 2:
      out.append([present[0]] * count if count else [])
      continue
    c = [table[s] for s in present]
    m, total, big = len(c), sum(c), 1 << 24
    f = [1 + ci * (big - m) // total for ci in c]
    f[c.index(max(c))] += big - sum(f)
    cum = [sum(f[:i]) for i in range(m)]
    syms = []
    for _ in range(count):
      q = state & (big - 1)
      i = max(j for j in range(m) if cum[j] <= q)
      state = (state >> 24) * f[i] + q - cum[i]
      if state < 1 << 32 and words:
        state = (state << 32) | words.pop()
      syms.append(present[i])
    out.append(syms)
  assert state == 0 and not words
  return out


def canonical(table):
  """Section 8: code string -> symbol."""
  order = sorted(table, key=lambda s: (table[s], s))
  codes, code, prev = {}, 0, table[order[0]]
  for i, s in enumerate(order):
    if i:
      code = (code + 1) << (table[s] - prev)
    prev = table[s]
    codes[format(code, f"0{table[s]}b")] = s
  return codes


def huffman_payload(cur, streams, lane):
  """Section 8: lane lengths for every coded stream, then their bytes."""
  coded = [(count, table) for count, table in streams if count and len(table) >= 2]
  lanes = [[cur.varint() for _ in range(-(-count // lane))] for count, _ in coded]
  bits_of = []
  for lane_bits in lanes:
    n = sum(lane_bits)
    raw = cur.data[cur.pos : cur.pos + (n + 7) // 8]
    cur.pos += (n + 7) // 8
    bits_of.append("".join(format(b, "08b") for b in raw))
  assert cur.pos == cur.end
  out, k = [], 0
  for count, table in streams:
    if not count or len(table) < 2:
      out.append([min(table)] * count if count else [])
      continue
    codes, bits, pos, syms = canonical(table), bits_of[k], 0, []
    for lb in lanes[k]:
      end, word = pos + lb, ""
      while pos < end:
        word += bits[pos]
        pos += 1
        if word in codes:
          syms.append(codes[word])
          word = ""
      assert word == ""
    assert len(syms) == count
    out.append(syms)
    k += 1
  return out


def positions(symbols, run, size, inverted):
  """Section 5."""
  p, marked = -1, []
  for s in symbols:
    if s == run:
      p += run
    else:
      p += s + 1
      marked.append(p)
  mask = np.zeros(size, bool)
  mask[marked] = True
  return ~mask if inverted else mask


def value(x, q):
  """Section 9, in numpy float32 arithmetic."""
  k = q["bits"] - (3 if q["recentralized"] else 2)
  s = 2 ** (k + 1) + 1
  mu, sd, t = np.float32(0), np.float32(1), x
  if q["recentralized"]:
    m = int(x >= s)
    t = x - s * m
    mu, sd = f32(q["means"][m]), f32(q["sigma"])
  b = q["bias"]
  v = 0.0 if t == 0 else (2.0 ** (t - 1 - b) if t <= 2**k else -(2.0 ** (t - 1 - 2**k - b)))
  return f32(q["alpha"]) * (np.float32(v) * sd + mu)


def read(data):
  magic, major, minor, h, u, crc = struct.unpack_from("<8sHHIII", data)
  assert magic == b"\x89FQZ\r\n\x1a\n" and major == 1
  assert crc == zlib.crc32(data[24 : 24 + h], zlib.crc32(data[:20]))
  header = json.loads(zlib.decompress(data[24 : 24 + h]))
  pos, arrays = 24 + h, {}
  for e in header["arrays"]:
    start, end = pos, pos + e["bytes"]
    pos = end
    assert zlib.crc32(data[start:end]) == e["crc"]
    shape, size = e["shape"], math.prod(e["shape"])
    dt = np.dtype(DTYPES[e["dtype"]])
    if e["kind"] == "raw":
      arrays[e["path"]] = (
        np.frombuffer(data[start:end], DTYPES[e["stored"]]).astype(dt).reshape(shape)
      )
      continue
    cur = Cursor(data, start, end)
    tables = [cur.table()]
    counts = [e["npos"]]
    if e["kind"] in ("focused", "codebook"):
      tables.append(cur.table())
      counts.append(e["kept"])
    length = cur.varint()
    payload = Cursor(data, cur.pos, cur.pos + length)
    if header["coder"] == "ans":
      words = struct.unpack(f"<{length // 4}I", data[cur.pos : cur.pos + length])
      streams = rans_decode(words, list(zip(counts, tables)))
    else:
      streams = huffman_payload(payload, list(zip(counts, tables)), header["lane"])
    mask = positions(streams[0], e["run"], size, e["inverted"])
    out = np.zeros(size, dt)
    if e["kind"] == "pruned":
      kept = np.frombuffer(data[cur.pos + length : end], DTYPES[e["stored"]])
      out[mask] = kept.astype(dt)
    elif e["kind"] == "codebook":  # section 4, format 1.1
      codebook = np.frombuffer(data[cur.pos + length : end], "<f4")
      assert codebook.size == e["codewords"]
      out[mask] = codebook[np.array(streams[1], np.int64)].astype(dt)
    else:
      vals = np.array([value(x, e["quant"]) for x in streams[1]], np.float32)
      out[mask] = vals.astype(dt)
    arrays[e["path"]] = out.reshape(shape)
  assert pos == len(data)
  return header, arrays


@pytest.mark.parametrize("which", [0, 1])
def test_spec_reader_agrees_with_decode_model(which):
  data = fuzz_fqz.sample_files()[which]
  header, arrays = read(data)
  decoded = fq.decode_model(data)
  assert header["metadata"] == decoded.metadata
  assert list(arrays) == list(decoded.arrays)
  for path, a in arrays.items():
    b = decoded.arrays[path]
    assert a.dtype == b.dtype and a.shape == b.shape, path
    assert np.array_equal(a.reshape(-1).view(np.uint8), b.reshape(-1).view(np.uint8)), path


def test_spec_reader_on_real_layers():
  rng = np.random.default_rng(5)
  w = (rng.normal(size=(32, 16, 3, 3)) * 0.05).astype(np.float32)
  state = fuzz_fqz._state(w.shape, rng, bits=7, recentralized=True, sparsity=0.9)
  for coder in ("ans", "huffman"):
    data = fq.encode_model(
      {"w": w, "b": w[0, 0]},
      focus={"w": state},
      masks={"b": np.abs(w[0, 0]) > 0.03},
      coder=coder,
      huffman_lane=50,
    )
    _, arrays = read(data)
    decoded = fq.decode_model(data)
    for path in arrays:
      assert np.array_equal(arrays[path].view(np.uint8), decoded.arrays[path].view(np.uint8))
