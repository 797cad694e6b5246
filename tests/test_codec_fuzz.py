"""Hardening of the .fqz decoder: mutated, truncated, lying and oversized files."""

import json
import struct
import tracemalloc
import zlib

import fuzz_fqz
import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest

import fq_jax as fq
from fq_jax.codec import container


@pytest.fixture(scope="module")
def files():
  return fuzz_fqz.sample_files()


@pytest.mark.parametrize("seed", [0, 1])
def test_ten_thousand_mutations_raise_only_format_errors(files, seed):
  counts = fuzz_fqz.run(5000, seed, files)  # two seeds: 10,000 mutated files in all
  assert sum(counts.values()) == 5000
  assert counts["FormatError"] > 3000


@hypothesis.settings(max_examples=150, deadline=None)
@hypothesis.given(
  which=st.integers(0, 1),
  edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=4),
  cut=st.none() | st.integers(0, 10**6),
)
def test_hypothesis_byte_edits(which, edits, cut):
  data = bytearray(_cached_files()[which])
  for pos, value in edits:
    data[pos % len(data)] = value
  if cut is not None:
    data = data[: cut % (len(data) + 1)]
  fuzz_fqz.check_one(bytes(data))


_FILES = []


def _cached_files():
  if not _FILES:
    _FILES.extend(fuzz_fqz.sample_files())
  return _FILES


def test_every_truncation_is_rejected(files):
  for data in files:
    for n in range(len(data)):
      with pytest.raises(fq.FormatError):
        fq.decode_model(data[:n])


def test_valid_files_decode(files):
  for data in files:
    assert fuzz_fqz.check_one(data) == "ok"


def _edit(data, fn, fix_crcs=True):
  header, sections = fuzz_fqz._split(data)
  fn(header, sections)
  return fuzz_fqz._repack(header, sections, fix_section_crcs=fix_crcs)


def test_messages_name_the_fault(files):
  data = files[0]
  with pytest.raises(fq.FormatError, match="bad magic.*offset 0"):
    fq.decode_model(b"PK\x03\x04" + data[4:])
  wrong = bytearray(data)
  wrong[8:10] = struct.pack("<H", 2)
  with pytest.raises(fq.FormatError, match=r"unsupported format version 2\.[01] at offset 8"):
    fq.decode_model(bytes(wrong))
  with pytest.raises(fq.FormatError, match="header CRC mismatch"):
    fq.decode_model(data[:30] + bytes([data[30] ^ 1]) + data[31:])
  with pytest.raises(fq.FormatError, match="trailing bytes.*offset"):
    fq.decode_model(data + b"\x00")
  flipped = bytearray(data)
  flipped[-3] ^= 0x10
  with pytest.raises(fq.FormatError, match=r"section \d+ .*CRC mismatch"):
    fq.decode_model(bytes(flipped))
  with pytest.raises(fq.FormatError, match="shorter than the 24-byte preamble"):
    fq.decode_model(data[:10])

  def lie_bytes(h, s):
    h["arrays"][3]["bytes"] += 4

  with pytest.raises(fq.FormatError, match="past the end"):
    fq.decode_model(_edit(data, lie_bytes, fix_crcs=False))

  def lie_shape(h, s):
    h["arrays"][3]["shape"] = [9]

  with pytest.raises(fq.FormatError, match=r"section 3 \('bn/mean'\) at file offset \d+: holds 32"):
    fq.decode_model(_edit(data, lie_shape))

  def lie_kept(h, s):
    h["arrays"][0]["kept"] -= 1

  with pytest.raises(fq.FormatError, match=r"section 0 \('conv/kernel'\)"):
    fq.decode_model(_edit(data, lie_kept))

  def lie_dtype(h, s):
    h["arrays"][4]["dtype"] = "object"

  with pytest.raises(fq.FormatError, match=r"arrays\[4\] \('count'\): dtype 'object'"):
    fq.decode_model(_edit(data, lie_dtype))


@pytest.mark.parametrize("claim", [10**6, 10**9, 10**12, 2**47])
def test_huge_claims_are_rejected_before_allocation(files, claim):
  data = files[1]

  def huge(h, s):
    h["arrays"][5]["shape"] = [claim, claim]  # the empty raw array claims claim^2 values

  bad = _edit(data, huge)
  tracemalloc.start()
  try:
    with pytest.raises(fq.FormatError, match="would need .* bytes to decode"):
      fq.decode_model(bad)
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  assert peak < 64 * len(bad) + (1 << 20)

  def huge_kept(h, s):  # a focused layer claiming 10^12 kept weights in a tiny section
    h["arrays"][0]["shape"] = [claim]
    h["arrays"][0]["kept"] = claim

  with pytest.raises(fq.FormatError):
    fq.decode_model(_edit(data, huge_kept))


def test_allocation_stays_a_small_multiple_of_the_file(files):
  """Across mutations, numpy allocations stay within the decode allowance."""
  rng = np.random.default_rng(7)
  for i in range(300):
    data = fuzz_fqz.mutate(files[i % 2], rng)
    allowance = 64 * len(data)
    tracemalloc.start()
    try:
      try:
        fq.decode_model(data, max_output_bytes=allowance)
      except fq.FormatError:
        pass
      _, peak = tracemalloc.get_traced_memory()
    finally:
      tracemalloc.stop()
    assert peak < 4 * allowance + (1 << 20), (i, peak, len(data))


def test_header_json_is_strict(files):
  data = files[0]
  header, sections = fuzz_fqz._split(data)
  text = json.dumps(header, separators=(",", ":"))
  assert '"bits":5' in text
  raw = text.replace('"bits":5', '"bits":NaN', 1).encode()
  stored = zlib.compress(raw)
  head = struct.pack("<8sHHII", container.MAGIC, 1, 0, len(stored), len(raw))
  bad = head + struct.pack("<I", zlib.crc32(stored, zlib.crc32(head))) + stored + b"".join(sections)
  with pytest.raises(fq.FormatError, match="not valid UTF-8 JSON"):
    fq.decode_model(bad)
