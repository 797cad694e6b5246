"""Decoder limits and spec edges (issue 14): a crafted corpus and a capped mutation probe.

Every crafted file has valid CRCs, so the decoder's own rules are what rejects it; each case
names the exception class and a fragment of its message. The probe (tests/codec_limits_probe.py)
decodes a few hundred mutated files in a subprocess whose address space is capped at its
warmed-up size plus 2 GiB, with a per-case time limit.
"""

import copy
import json
import math
import os
import struct
import subprocess
import sys
import zlib

import fuzz_fqz
import ml_dtypes
import numpy as np
import pytest

import fq_jax as fq
from fq_jax.codec import DecodeLimits, ans, container, decode, encode, sections

HERE = os.path.dirname(__file__)


@pytest.fixture(scope="module")
def files():
  return fuzz_fqz.sample_files()  # [ans, huffman]; entry 0 focused, 2 pruned, 3 raw float32


def _edit(data: bytes, fn) -> bytes:
  header, secs = fuzz_fqz._split(data)
  header = copy.deepcopy(header)
  fn(header, secs)
  return fuzz_fqz._repack(header, secs, fix_section_crcs=True)


def _pack_text(header_text: str, secs: list[bytes]) -> bytes:
  """A file whose header JSON is exactly `header_text` (CRCs valid)."""
  raw = header_text.encode()
  stored = zlib.compress(raw, 9)
  head = struct.pack("<8sHHII", container.MAGIC, 1, 1, len(stored), len(raw))
  crc = zlib.crc32(stored, zlib.crc32(head))
  return head + struct.pack("<I", crc) + stored + b"".join(secs)


def _with_number(data: bytes, field: str, literal: str) -> bytes:
  """Entry 0's quant.`field` written as the JSON literal `literal` (e.g. 1e400)."""
  header, secs = fuzz_fqz._split(data)
  header = copy.deepcopy(header)
  for e, s in zip(header["arrays"], secs):
    e["crc"], e["bytes"] = zlib.crc32(s), len(s)
  q = header["arrays"][0]["quant"]
  if field == "means":
    q["means"][0] = "@@"
  else:
    q[field] = "@@"
  return _pack_text(json.dumps(header, separators=(",", ":")).replace('"@@"', literal), secs)


def _set_quant(key, value, index=0):
  def fn(h, s):
    if key == "means":
      h["arrays"][index]["quant"]["means"][0] = value
    else:
      h["arrays"][index]["quant"][key] = value

  return fn


def _raw_stored_wider(h, s):  # bn/mean float32 stored as float64 (8 bytes per value)
  e = h["arrays"][3]
  e["stored"] = "float64"
  s[3] = np.asarray(np.frombuffer(s[3], "<f4"), "<f8").tobytes()


def _raw_same_width(h, s):  # a float16 array stored as bfloat16 (same width, other format)
  e = h["arrays"][3]
  e["dtype"], e["stored"] = "float16", "bfloat16"
  s[3] = np.frombuffer(s[3], "<f4").astype(ml_dtypes.bfloat16).tobytes()


def _duplicate_key(data: bytes) -> bytes:
  header, secs = fuzz_fqz._split(data)
  for e, s in zip(header["arrays"], secs):
    e["crc"], e["bytes"] = zlib.crc32(s), len(s)
  text = json.dumps(header, separators=(",", ":"))
  return _pack_text(text.replace('{"coder":"ans"', '{"coder":"ans","coder":"ans"', 1), secs)


def _ans_table_lies() -> bytes:
  """A pruned [8] array whose rANS position counts (3, 1) differ from its symbols (2, 2).

  Positions 0, 2, 3, 5 with R = 2 give the symbols 0 1 0 1: the histogram is (2, 2). The
  payload is coded with the model of (3, 1) (same total, same non-escape count), so rANS
  decodes the true symbols and ends in state 0: only the histogram check can catch it.
  """
  symbols = np.array([0, 1, 0, 1])
  lie = np.array([3, 1, 0])
  payload = ans.encode([(symbols, lie, np.array([0, 1]))])
  assert np.array_equal(
    ans.decode(payload, [(4, lie, np.array([0, 1]))], "x")[0], symbols
  )  # the lie decodes
  table = encode._model_bytes(0, lie[:2])
  size = bytearray()
  container.write_varint(size, len(payload))
  section = table + bytes(size) + payload + np.arange(4, dtype="<f4").tobytes()
  entry = dict(
    path="w", shape=[8], dtype="float32", kind="pruned", stored="float32", kept=4,
    inverted=False, run=2, npos=4,
  )  # fmt: skip
  return container.pack({"coder": "ans", "metadata": {}, "arrays": [entry]}, [section])


def _huffman_padding_set(files) -> bytes:
  """The Huffman file with one padding bit of a pruned layer's position stream set."""
  data = files[1]
  header, spans, _ = container.unpack(data)
  lane = header["lane"]
  layer, _ = decode._check_entry(2, header["arrays"][2], set())
  start, end = spans[2]
  tables, p0, p1 = sections.parse_coded_section(layer, data, start, end, "huffman")
  r = container.Reader(data, p0, p1, "x")
  bits = r.varints(-(-header["arrays"][2]["npos"] // lane), "lane bits")
  total = int(bits.sum())
  assert total % 8, "the sample stream has no padding bits to set"
  assert p1 == r.pos + -(-total // 8)
  out = bytearray(data)
  out[p1 - 1] |= 1  # the last bit of the byte: padding
  header2, secs = fuzz_fqz._split(data)
  secs[2] = bytes(out[start:end])
  return fuzz_fqz._repack(copy.deepcopy(header2), secs, fix_section_crcs=True)


CASES = {
  # name: (file index or builder, edit, error class, message fragment)
  "bias -2^31": (0, _set_quant("bias", -(2**31)), fq.FormatError, "quant.bias = -2147483648"),
  "bias 2^15": (0, _set_quant("bias", 2**15), fq.FormatError, "is outside [-32768, 32767]"),
  "means 1e39": (0, _set_quant("means", 1e39), fq.FormatError, "outside the float32 range"),
  "alpha 1e308": (0, _set_quant("alpha", 1e308), fq.FormatError, "alpha = 1e+308 is outside"),
  "alpha 3.4028236e38": (0, _set_quant("alpha", 3.4028236e38), fq.FormatError, "float32 range"),
  "sigma huge int": (0, _set_quant("sigma", 10**400), fq.FormatError, "float32 range"),
  "stored wider": (0, _raw_stored_wider, fq.FormatError, "float64 cannot stand for float32"),
  "stored same width": (0, _raw_same_width, fq.FormatError, "bfloat16 cannot stand for float16"),
  "stored int for float": (
    1,
    lambda h, s: h["arrays"][3].update(stored="int32"),
    fq.FormatError,
    "int32 cannot stand for float32",
  ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_crafted_header_cases(files, name):
  which, fn, error, fragment = CASES[name]
  with pytest.raises(error, match=None) as info:
    fq.decode_model(_edit(files[which], fn))
  assert fragment in str(info.value), str(info.value)


@pytest.mark.parametrize(
  "literal, fragment",
  [("1e400", "quant.alpha = inf is outside the float32 range"), ("-1e39", "outside the float32")],
)
def test_out_of_range_literals_are_rejected(files, literal, fragment):
  with pytest.raises(fq.FormatError, match="float32 range") as info:
    fq.decode_model(_with_number(files[0], "alpha", literal))
  assert fragment in str(info.value) or literal in str(info.value)


@pytest.mark.parametrize(
  "literal",
  ["3.4028235e38", "3.40282356e38", "1e-46", '"Infinity"', '"-Infinity"', '"NaN"', "-0.0"],
)
def test_float32_edge_literals_decode_as_float32_rounding_says(files, literal):
  decoded = fq.decode_model(_with_number(files[0], "alpha", literal))
  want = np.float32(json.loads(literal) if literal[0] != '"' else float(json.loads(literal)))
  got = decoded.focus["conv/kernel"].alpha
  assert got.tobytes() == want.tobytes() or (np.isnan(got) and np.isnan(want))


def test_duplicate_json_keys_are_rejected(files):
  with pytest.raises(fq.FormatError, match="duplicate key 'coder'"):
    fq.decode_model(_duplicate_key(files[0]))


def test_rans_counts_must_be_the_decoded_histogram():
  with pytest.raises(fq.FormatError, match="pos table's counts differ from the decoded symbols"):
    fq.decode_model(_ans_table_lies())


def test_nonzero_huffman_padding_is_rejected(files):
  with pytest.raises(fq.FormatError, match="non-zero padding bits"):
    fq.decode_model(_huffman_padding_set(files))


@pytest.mark.parametrize("bias", [-(2**15), -200, 200, 2**15 - 1])
def test_bias_edges_decode_as_the_spec_says(files, bias):
  """Section 9 of docs/format.md in float64 NumPy, rounded to float32: the oracle."""
  data = _edit(files[0], _set_quant("bias", bias, index=1))  # dense/kernel: a shift layer
  decoded = fq.decode_model(data)
  q = decoded.layers[1]
  sym = decoded.symbols["dense/kernel"].astype(np.int64)
  k = q["bits"] - 2
  t = sym
  with np.errstate(over="ignore"):
    mag = np.where(
      t == 0, 0.0, np.float32(2.0) ** np.float64(np.where(t <= 2**k, t, t - 2**k) - 1 - bias)
    )
    mag = mag.astype(np.float32)
  v = np.where(t > 2**k, -mag, mag).astype(np.float32)
  with np.errstate(over="ignore", invalid="ignore"):
    want = (np.float32(q["alpha"]) * v).astype(ml_dtypes.bfloat16)
  want = np.where(decoded.masks["dense/kernel"], want, 0).astype(ml_dtypes.bfloat16)
  got = decoded.arrays["dense/kernel"]
  np.testing.assert_array_equal(got.astype(np.float32), want.astype(np.float32))


def test_encoder_rejects_bias_outside_the_format():
  state = fuzz_fqz._state((4, 4), np.random.default_rng(0), bits=4, recentralized=False, sparsity=0)
  state = state._replace(bias=np.int32(2**20))
  with pytest.raises(ValueError, match=r"bias must be in \[-32768, 32767\]"):
    fq.encode_model({"k": np.ones((4, 4), np.float32)}, focus={"k": state})


def test_limits_are_enforced_and_overridable(files):
  data = files[0]
  fq.decode_model(data, limits=DecodeLimits(max_arrays=8))
  with pytest.raises(
    fq.FormatError, match=r"more than the allowed 7 array entries \(DecodeLimits.max_arrays\)"
  ):
    fq.decode_model(data, limits=DecodeLimits(max_arrays=7))
  with pytest.raises(fq.FormatError, match="more than the allowed 20000 \\(max_output_bytes\\)"):
    fq.decode_model(data, limits=DecodeLimits(max_output_bytes=20_000, max_header_bytes=1 << 20))
  with pytest.raises(fq.FormatError, match="DecodeLimits.max_header_bytes"):
    fq.decode_model(data, limits=DecodeLimits(max_header_bytes=100))
  # max_output_bytes= is shorthand for the field and wins over it
  fq.decode_model(data, max_output_bytes=1 << 24, limits=DecodeLimits(max_output_bytes=10))
  with pytest.raises(ValueError, match="max_arrays"):
    DecodeLimits(max_arrays=-1)


def test_position_alphabet_is_not_allocated():
  """300 one-element arrays declaring R = 2^24: tables are stored sparsely (was 128 MiB each)."""
  sys.path.insert(0, os.path.join(HERE, "..", "benchmarks"))
  import tracemalloc

  import bench_codec_adversarial as adv

  data = adv.position_bomb(300)
  tracemalloc.start()
  decoded = fq.decode_model(data)
  peak = tracemalloc.get_traced_memory()[1]
  tracemalloc.stop()
  assert len(decoded.arrays) == 300 and all(a[0] == 1.0 for a in decoded.arrays.values())
  assert peak < 64 << 20, peak


def test_memory_and_programming_errors_are_not_format_errors(files, monkeypatch):
  def no_memory(*args, **kwargs):
    raise MemoryError

  monkeypatch.setattr(sections, "rebuild_raw", no_memory)
  with pytest.raises(MemoryError):
    fq.decode_model(files[0])
  monkeypatch.setattr(sections, "rebuild_raw", lambda *a: {}["bug"])
  with pytest.raises(KeyError):
    fq.decode_model(files[0])


def test_mutations_under_a_memory_cap_raise_only_format_errors(tmp_path):
  sys.path.insert(0, os.path.join(HERE, "..", "benchmarks"))
  import bench_codec_adversarial as adv

  bomb = tmp_path / "bomb.fqz"
  bomb.write_bytes(adv.position_bomb(40))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), HERE]))
  out = subprocess.run(
    [sys.executable, os.path.join(HERE, "codec_limits_probe.py"), "--cases", "300",
     "--cap-mib", "2048", "--time-limit", "5", "--extra", str(bomb)],
    capture_output=True, text=True, env=env, timeout=600,
  )  # fmt: skip
  assert out.returncode == 0, out.stderr[-2000:]
  report = json.loads(out.stdout.strip().splitlines()[-1])
  assert report["escaped"] == [], report
  assert not report["over_time"], report
  assert sum(report["counts"].values()) == 300
  assert report["counts"]["FormatError"] > 100 and report["counts"]["ok"] > 10, report
  assert math.isfinite(report["slowest_s"])
