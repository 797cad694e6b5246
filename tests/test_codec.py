"""Unit tests of the .fqz building blocks: varints, Huffman, rANS models, positions."""

import itertools
import zlib

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest

import fq_jax as fq
from fq_jax.codec import ans, container, huffman, positions

# ----------------------------------------------------------------------------
# Container primitives
# ----------------------------------------------------------------------------


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(st.lists(st.integers(0, 2**64 - 1), max_size=200))
def test_varints_round_trip(values):
  data = container.varint_array(values)
  slow = bytearray()
  for v in values:
    container.write_varint(slow, v)
  assert data == bytes(slow)
  r = container.Reader(data, 0, len(data), "test")
  assert [r.varint("v", 2**64 - 1) for _ in values] == values
  r.expect_end("values")


def test_reader_errors_name_offsets():
  r = container.Reader(b"\x00\x80\x80", 0, 3, "section 7 'x'")
  assert r.varint("a") == 0
  with pytest.raises(fq.FormatError, match=r"section 7 'x'.*runs past the end.*offset 1"):
    r.varint("b")
  r = container.Reader(b"\xff" * 11, 0, 11, "s")
  with pytest.raises(fq.FormatError, match="longer than 10 bytes"):
    r.varint("c")
  r = container.Reader(b"\x05", 0, 1, "s")
  with pytest.raises(fq.FormatError, match="exceeds its limit 4"):
    r.varint("d", 4)


@hypothesis.settings(max_examples=200, deadline=None)
@hypothesis.given(st.floats(width=32, allow_nan=False, allow_infinity=False))
def test_float32_json_round_trip_is_exact(x):
  v = container.f32_to_json(np.float32(x))
  assert np.float32(float(repr(v))).tobytes() == np.float32(x).tobytes()


def test_preamble_layout_and_header_crc():
  data = fq.encode_model({"a": np.arange(3, dtype=np.int16)})
  assert data[:8] == b"\x89FQZ\r\n\x1a\n"
  assert int.from_bytes(data[8:10], "little") == 1
  stored = int.from_bytes(data[12:16], "little")
  crc = int.from_bytes(data[20:24], "little")
  assert crc == zlib.crc32(data[24 : 24 + stored], zlib.crc32(data[:20]))
  header, spans, end = container.unpack(data)
  assert end == 24 + stored and spans == [(end, end + 6)]
  assert data[end:] == np.arange(3, dtype="<i2").tobytes()
  assert header["arrays"][0]["crc"] == zlib.crc32(data[end:])


# ----------------------------------------------------------------------------
# Huffman
# ----------------------------------------------------------------------------


def _kraft(lengths):
  lengths = [l for l in lengths if l]
  return sum(2.0**-l for l in lengths)


@hypothesis.settings(max_examples=80, deadline=None)
@hypothesis.given(st.lists(st.integers(1, 10**6), min_size=2, max_size=40), st.integers(6, 16))
def test_length_limited_codes_are_complete_and_limited(weights, max_len):
  hypothesis.assume(len(weights) <= 2**max_len)
  lengths = huffman.code_lengths(np.array(weights), max_len)
  assert lengths.max() <= max_len
  assert _kraft(lengths) == 1.0
  plain = huffman._huffman_lengths(weights)
  cost = lambda ls: sum(w * l for w, l in zip(weights, ls))
  assert cost(lengths) >= cost(plain)
  if max(plain) <= max_len:
    assert cost(lengths) == cost(plain)


def test_package_merge_is_optimal_against_brute_force():
  rng = np.random.default_rng(0)
  for _ in range(30):
    n = int(rng.integers(2, 7))
    weights = rng.integers(1, 1000, n).tolist()
    limit = int(rng.integers(max(1, int(np.ceil(np.log2(n)))), 5))
    best = min(
      (
        sum(w * l for w, l in zip(weights, ls))
        for ls in itertools.product(range(1, limit + 1), repeat=n)
        if sum(2.0**-l for l in ls) <= 1
      ),
      default=None,
    )
    got = huffman._package_merge(weights, limit)
    assert max(got) <= limit and _kraft(got) <= 1
    assert sum(w * l for w, l in zip(weights, got)) == best


def test_fibonacci_weights_need_the_limit():
  fib = [1, 1]
  while len(fib) < 30:
    fib.append(fib[-1] + fib[-2])
  lengths = huffman.code_lengths(np.array(fib), 16)
  assert max(huffman._huffman_lengths(fib)) > 16 and lengths.max() == 16
  assert _kraft(lengths) == 1.0


def test_canonical_codes_are_deflate_style():
  lengths = np.array([2, 1, 3, 3, 0])
  codes = huffman.canonical_codes(lengths)
  # sorted by (length, symbol): 1 -> '0', 0 -> '10', 2 -> '110', 3 -> '111'
  assert [format(int(codes[s]), f"0{lengths[s]}b") for s in range(4)] == ["10", "0", "110", "111"]


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(
  st.integers(1, 5000),
  st.integers(2, 30),
  st.sampled_from([1, 3, 64, 1024]),
  st.integers(0, 2**32 - 1),
)
def test_huffman_streams_round_trip(n, alphabet, lane, seed):
  rng = np.random.default_rng(seed)
  p = rng.dirichlet(np.full(alphabet, 0.3))
  x = rng.choice(alphabet, size=n, p=p)
  counts = np.bincount(x, minlength=alphabet)
  lengths = huffman.code_lengths(counts)
  lane_bits, payload = huffman.encode(x, lengths, lane)
  if np.count_nonzero(lengths) < 2:
    assert payload == b"" and lane_bits.size == 0
    return
  assert int(lane_bits.sum()) == huffman.optimal_bits(counts, lengths)
  assert len(payload) == -(-int(lane_bits.sum()) // 8)
  # Two copies decoded together exercise the multi-stream lockstep decoder.
  s1 = huffman.Stream(lengths, n, lane_bits, payload, "a")
  s2 = huffman.Stream(lengths, n, lane_bits, payload, "b")
  y1, y2 = huffman.decode_streams([s1, s2], lane)
  np.testing.assert_array_equal(y1, x)
  np.testing.assert_array_equal(y2, x)


def test_huffman_corrupt_lane_is_a_format_error():
  rng = np.random.default_rng(0)
  x = rng.integers(0, 5, 1000)
  lengths = huffman.code_lengths(np.bincount(x))
  lane_bits, payload = huffman.encode(x, lengths, 100)
  bad = bytearray(payload)
  bad[10] ^= 0xFF
  with pytest.raises(fq.FormatError, match="lane ends at bit"):
    huffman.decode_streams([huffman.Stream(lengths, 1000, lane_bits, bytes(bad), "here")], 100)
  with pytest.raises(fq.FormatError, match="not a complete prefix code"):
    huffman.check_lengths(np.array([1, 2, 0]), "here")


# ----------------------------------------------------------------------------
# rANS
# ----------------------------------------------------------------------------


def _reference_rans_encode(index, freqs):
  """docs/format.md's rANS, written out: returns the 32-bit words."""
  cum = np.concatenate([[0], np.cumsum(freqs)])
  state, bulk = 0, []
  for s in reversed(index.tolist()):
    f, c = int(freqs[s]), int(cum[s])
    if (state >> 40) >= f:
      bulk.append(state & 0xFFFFFFFF)
      state >>= 32
    state = ((state // f) << 24) | (c + state % f)
  while state:
    bulk.append(state & 0xFFFFFFFF)
    state >>= 32
  return bulk


def _reference_rans_decode(words, freqs, count):
  cum = np.concatenate([[0], np.cumsum(freqs)])
  words = list(words)
  state = 0
  while words and state < 1 << 32:
    state = (state << 32) | words.pop()
  out = []
  for _ in range(count):
    q = state & ((1 << 24) - 1)
    s = int(np.searchsorted(cum, q, side="right") - 1)
    state = (state >> 24) * int(freqs[s]) + q - int(cum[s])
    if state < 1 << 32 and words:
      state = (state << 32) | words.pop()
    out.append(s)
  assert state == 0
  return out


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(st.lists(st.integers(0, 10**6), min_size=2, max_size=50))
def test_frequencies_are_exact_and_positive(counts):
  counts = np.array(counts)
  hypothesis.assume(np.count_nonzero(counts) >= 2)
  f = ans.frequencies(counts)
  assert f.sum() == 2**24 and f.min() >= 1 and f.size == np.count_nonzero(counts)


@hypothesis.settings(max_examples=30, deadline=None)
@hypothesis.given(st.integers(1, 3000), st.integers(2, 20), st.integers(0, 2**32 - 1))
def test_constriction_matches_the_documented_rans(n, alphabet, seed):
  rng = np.random.default_rng(seed)
  x = rng.choice(alphabet, size=n, p=rng.dirichlet(np.full(alphabet, 0.5)))
  counts = np.bincount(x, minlength=alphabet)
  present = np.flatnonzero(counts)
  hypothesis.assume(present.size >= 2)
  payload = ans.encode([(x, counts, present)])
  words = np.frombuffer(payload, "<u4").tolist()
  index = np.searchsorted(present, x)
  freqs = ans.frequencies(counts)
  assert words == _reference_rans_encode(index, freqs)
  assert _reference_rans_decode(words, freqs, n) == index.tolist()
  (y,) = ans.decode(payload, [(n, counts, present)], "here")
  np.testing.assert_array_equal(y, x)


def test_rans_garbage_is_a_format_error():
  counts = np.array([5, 3, 2])
  x = np.array([0, 1, 2, 0, 0, 1, 0, 2, 1, 0])
  payload = ans.encode([(x, counts, np.arange(3))])
  with pytest.raises(fq.FormatError, match="not whole 32-bit words"):
    ans.decode(payload[:-1], [(10, counts, np.arange(3))], "here")
  with pytest.raises(fq.FormatError, match="data left"):
    ans.decode(payload + b"\x07\x00\x00\x00", [(10, counts, np.arange(3))], "here")


# ----------------------------------------------------------------------------
# Positions
# ----------------------------------------------------------------------------


@hypothesis.settings(max_examples=80, deadline=None)
@hypothesis.given(st.integers(0, 3000), st.floats(0, 1), st.integers(0, 2**32 - 1))
def test_position_code_round_trip(size, keep, seed):
  rng = np.random.default_rng(seed)
  mask = rng.random(size) < keep
  _, idx, inverted = positions.coded_indices(mask)
  assert inverted == (2 * mask.sum() > size)
  run, hist = positions.choose_run(positions.gaps_of(idx))
  sym = positions.encode(idx, run)
  assert sym.size == 0 or sym.max() <= run
  if sym.size:
    np.testing.assert_array_equal(hist, np.bincount(sym, minlength=run + 1))
  back = positions.decode(sym, run, idx.size, size, "here")
  np.testing.assert_array_equal(back, idx)
  if sym.size and not (sym == run).any():
    np.testing.assert_array_equal(
      positions.decode(sym, run, idx.size, size, "here", escapes=False), idx
    )


def test_position_code_escapes_and_validation():
  idx = np.array([0, 100, 101, 5000])
  sym = positions.encode(idx, 16)
  assert (sym == 16).sum() == 99 // 16 + 4898 // 16
  np.testing.assert_array_equal(positions.decode(sym, 16, 4, 5001, "w"), idx)
  with pytest.raises(fq.FormatError, match="runs past"):
    positions.decode(sym, 16, 4, 5000, "w")
  with pytest.raises(fq.FormatError, match="ends in an escape"):
    positions.decode(np.append(sym, 16), 16, 4, 10**6, "w")
  with pytest.raises(fq.FormatError, match="gives 4 positions, not 5"):
    positions.decode(sym, 16, 5, 10**6, "w")
