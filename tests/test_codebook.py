"""Codebook quantizers (k-means weight sharing, uniform integers): oracles, gradients,
the fine-tuning wrapper and the .fqz "codebook" kind (format 1.1)."""

import json
import struct
import zlib

import fuzz_fqz
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from sklearn.cluster import KMeans

import fq_jax as fq
from fq_jax.codec import container


def sparse_layer(shape, sparsity, seed, scale=0.05):
  rng = np.random.default_rng(seed)
  w = (rng.normal(size=shape) * scale).astype(np.float32)
  # A bimodal touch, as pruned layers are: push kept weights away from zero.
  w += np.sign(w) * scale * 0.5
  mask = np.abs(w) >= np.quantile(np.abs(w), sparsity)
  return w, mask


# ----------------------------------------------------------------------------
# k-means against scikit-learn
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("bits,seed", [(3, 1), (5, 2)])
def test_kmeans_matches_sklearn(bits, seed):
  w, mask = sparse_layer((40, 30), 0.6, seed)
  state = fq.kmeans_codebook(w, mask, bits=bits, iters=300)
  kept = w[mask].astype(np.float64)
  k = 2**bits
  init = np.linspace(kept.min(), kept.max(), k)
  ref = KMeans(
    n_clusters=k, init=init.reshape(-1, 1), n_init=1, max_iter=300, tol=0.0, algorithm="lloyd"
  ).fit(kept.reshape(-1, 1))
  book = np.asarray(state.codebook, np.float64)
  sym = np.asarray(state.symbols)[mask]
  inertia = float(np.sum((kept - book[sym]) ** 2))
  # Same init, same algorithm: the same local optimum, up to float32 arithmetic.
  assert inertia <= ref.inertia_ * (1 + 1e-4) + 1e-9
  used = np.unique(sym)
  np.testing.assert_allclose(
    np.sort(book[used]),
    np.sort(ref.cluster_centers_.ravel()[np.unique(ref.labels_)]),
    rtol=1e-4,
    atol=1e-6,
  )
  # Sorted codebook; symbols are nearest codewords; pruned symbols 0.
  assert np.all(np.diff(book) >= 0)
  assert np.all(np.asarray(state.symbols)[~mask] == 0)
  dist = np.abs(kept[:, None] - book[None, :])
  assert np.all(dist[np.arange(kept.size), sym] <= dist.min(1) + 1e-7)


def test_kmeans_edge_cases():
  w = jnp.array([[0.5, -0.25], [0.5, 0.0]])
  none = fq.kmeans_codebook(w, jnp.zeros(w.shape, bool), bits=3)
  assert np.all(np.asarray(none.codebook) == 0) and np.all(np.asarray(none.symbols) == 0)
  one = fq.kmeans_codebook(w, jnp.array([[True, False], [False, False]]), bits=3)
  assert float(fq.codebook_values(one.symbols, one.codebook, one.mask)[0, 0]) == 0.5
  nan = fq.kmeans_codebook(jnp.array([1.0, jnp.nan, 2.0]), None, bits=1)
  np.testing.assert_array_equal(np.asarray(nan.codebook), [1.0, 2.0])
  assert not bool(nan.mask[1])
  with pytest.raises(ValueError, match="bits"):
    fq.kmeans_codebook(w, None, bits=9)


# ----------------------------------------------------------------------------
# Uniform integers against a NumPy oracle
# ----------------------------------------------------------------------------


def uniform_oracle(w, mask, bits, fraction=1.0):
  top = 2 ** (bits - 1) - 1
  amax = np.abs(w[mask]).max()
  scale = np.float32(np.float32(amax) / np.float32(top)) * np.float32(fraction)
  ints = np.clip(
    np.round(w / scale), -(2 ** (bits - 1)), top if fraction == 1.0 else 2 ** (bits - 1) - 1
  )
  return np.where(mask, ints * scale, 0.0).astype(np.float32), scale


@pytest.mark.parametrize("bits", [2, 5, 8])
def test_uniform_max_matches_numpy(bits):
  w, mask = sparse_layer((50, 20), 0.5, bits)
  state = fq.uniform_codebook(w, mask, bits=bits)
  q = np.asarray(fq.codebook_quantize(w, state))
  ref, scale = uniform_oracle(w, mask, bits)
  np.testing.assert_allclose(
    np.asarray(state.codebook), scale * np.arange(-(2 ** (bits - 1)), 2 ** (bits - 1)), rtol=1e-6
  )
  # The same integers except (never, for this data) within rounding of a midpoint; the
  # scale may differ from NumPy's division in the last bit (XLA multiplies by 1/top).
  ints = np.asarray(state.symbols) - 2 ** (bits - 1)
  near_tie = np.abs(np.abs(w / scale - np.floor(w / scale)) - 0.5) < 1e-4
  assert np.all((np.where(mask, ints, 0) == np.round(ref / scale)) | near_tie)
  np.testing.assert_allclose(q, ref, rtol=1e-6, atol=0)
  assert np.max(np.abs(q - w)[mask]) <= scale / 2 * (1 + 1e-5)


def test_uniform_mse_clipping_is_the_grid_optimum():
  w, mask = sparse_layer((60, 30), 0.7, 3)
  w[0, 0], mask[0, 0] = 0.9, True  # one outlier: clipping it pays off
  bits = 4
  state = fq.uniform_codebook(w, mask, bits=bits, clip="mse", num_candidates=64)
  errors = []
  for i in range(1, 65):
    ref, _ = uniform_oracle(w, mask, bits, fraction=i / 64)
    errors.append(np.sum((ref - w)[mask] ** 2))
  q = np.asarray(fq.codebook_values(state.symbols, state.codebook, state.mask))
  got = np.sum((q - w)[mask] ** 2)
  assert got <= min(errors) * (1 + 1e-4)
  assert got < errors[-1] * 0.9  # clearly better than no clipping
  assert float(fq.codebook_mse(w, state)) == pytest.approx(got / mask.sum(), rel=1e-5)


# ----------------------------------------------------------------------------
# Straight-through gradients
# ----------------------------------------------------------------------------


def test_straight_through_gradients():
  w, mask = sparse_layer((16, 24), 0.5, 7)
  state = fq.kmeans_codebook(w, mask, bits=4)
  r = np.random.default_rng(0).normal(size=w.shape).astype(np.float32)
  loss = lambda w, c: jnp.sum(fq.codebook_quantize(w, state, c) * r)
  gw, gc = jax.grad(loss, argnums=(0, 1))(jnp.asarray(w), state.codebook)
  np.testing.assert_array_equal(np.asarray(gw), np.where(mask, r, 0.0))
  sym = np.asarray(state.symbols)
  expected = np.bincount(sym[mask], weights=r[mask], minlength=16)
  np.testing.assert_allclose(np.asarray(gc), expected, rtol=1e-5, atol=1e-6)
  # Forward: idempotent, pruned weights exactly 0, only codewords appear.
  q = np.asarray(fq.codebook_quantize(w, state))
  assert np.all(q[~mask] == 0) and np.all(np.isin(q[mask], np.asarray(state.codebook)))
  np.testing.assert_array_equal(np.asarray(fq.codebook_quantize(q, state)), q)
  # Fixed symbols (Deep Compression): the forward ignores where w moved.
  moved = w + 0.3 * mask
  fixed = np.asarray(fq.codebook_quantize(moved, state, reassign=False))
  np.testing.assert_array_equal(fixed, q)
  assert not np.array_equal(np.asarray(fq.codebook_quantize(moved, state)), q)
  # bfloat16 weights: value cast like the codec does.
  wb = w.astype(ml_dtypes.bfloat16)
  qb = fq.codebook_quantize(jnp.asarray(wb), state)
  assert qb.dtype == jnp.bfloat16
  q32 = np.asarray(fq.codebook_quantize(wb.astype(np.float32), state))
  assert np.array_equal(
    np.asarray(qb, np.float32), q32.astype(ml_dtypes.bfloat16).astype(np.float32)
  )


def test_codebook_symbols_unsorted_codebook():
  book = jnp.array([0.5, -1.0, 0.0, 2.0])
  x = jnp.array([-2.0, -0.6, -0.4, 0.2, 0.3, 1.2, 9.0])
  np.testing.assert_array_equal(np.asarray(fq.codebook_symbols(x, book)), [1, 1, 2, 2, 0, 0, 3])


# ----------------------------------------------------------------------------
# The fine-tuning wrapper
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["kmeans", "uniform"])
def test_wrapper_keeps_pruned_zero_and_learns_codebooks(method):
  rng = np.random.default_rng(0)
  params = {
    "conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 4, 8)), jnp.float32)},
    "head": {"kernel": jnp.asarray(rng.normal(size=(8, 5)), jnp.float32), "bias": jnp.zeros(5)},
  }
  params = fq.apply_masks(params, fq.magnitude_masks(params, 0.6))
  target = jax.tree.map(lambda p: 0.5 * p + 0.1, params)
  tx = fq.codebook_quantization(
    optax.sgd(0.05, momentum=0.9), bits=3, method=method, codebook_optimizer=optax.adam(1e-2)
  )
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    loss = lambda p: sum(
      jnp.sum((a - b) ** 2)
      for a, b in zip(jax.tree.leaves(fq.codebook_quantized(p, state)), jax.tree.leaves(target))
    )
    l, g = jax.value_and_grad(loss)(params)
    updates, state = tx.update(g, state, params)
    return optax.apply_updates(params, updates), state, l

  first = None
  for _ in range(15):
    params, state, l = step(params, state)
    first = l if first is None else first
  assert float(l) < float(first)
  st = fq.find_codebook_state(state)
  for path in ("conv", "head"):
    m = np.asarray(st.masks[path]["kernel"])
    assert np.all(np.asarray(params[path]["kernel"])[~m] == 0)  # exactly 0
    cs = st.codebooks[path]["kernel"]
    q = np.asarray(fq.codebook_quantized(params, state)[path]["kernel"])
    assert np.all(q[~m] == 0)
    # The stored symbols are the nearest codewords of the current weights.
    np.testing.assert_array_equal(
      np.asarray(cs.symbols),
      np.asarray(fq.codebook_symbols(params[path]["kernel"], cs.codebook, cs.mask)),
    )
    book = np.asarray(cs.codebook)
    if method == "uniform":  # a learned scale keeps the levels evenly spaced
      np.testing.assert_allclose(np.diff(book), np.diff(book)[0], rtol=1e-4)
      assert float(st.learned[path]["kernel"]) != 1.0
  assert st.codebooks["head"]["bias"] is None and st.masks["head"]["bias"] is None


# ----------------------------------------------------------------------------
# INQ staging and codebook rebuilds: the schedule `fq.focused_quantization` takes
# ----------------------------------------------------------------------------


def _adam_count(learned_state):
  return int(next(s.count for s in learned_state if isinstance(s, optax.ScaleByAdamState)))


@pytest.mark.parametrize("method,reassign", [("kmeans", False), ("uniform", True)])
def test_staged_run_follows_the_schedule(method, reassign):
  rng = np.random.default_rng(3)
  params = {
    "conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 4, 8)), jnp.float32)},
    "head": {"kernel": jnp.asarray(rng.normal(size=(8, 5)), jnp.float32), "bias": jnp.zeros(5)},
  }
  params = fq.apply_masks(params, fq.magnitude_masks(params, 0.6))
  target = jax.tree.map(lambda p: 0.5 * p + 0.1, params)
  sched = fq.inq_schedule(3)  # stages begin at 3, 6, 9, 12; rebuilds at 3, 3 + 6, 9 + 12
  fractions = np.asarray(sched.inq_fractions)
  rebuild_steps = {3, 9}
  bits = 3
  tx = fq.codebook_quantization(
    optax.sgd(0.05, momentum=0.9),
    bits=bits,
    method=method,
    schedule=sched,
    reassign=reassign,
    codebook_optimizer=optax.adam(1e-2),
  )
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    loss = lambda p: sum(
      jnp.sum((a - b) ** 2)
      for a, b in zip(jax.tree.leaves(fq.codebook_quantized(p, state)), jax.tree.leaves(target))
    )
    g = jax.grad(loss)(params)
    updates, state = tx.update(g, state, params)
    return optax.apply_updates(params, updates), state

  paths = ("conv", "head")
  prev = fq.find_codebook_state(state)
  last_rebuild = 0
  for t in range(1, 15):
    params, state = step(params, state)
    st = fq.find_codebook_state(state)
    assert int(st.count) == t
    stage = int(np.searchsorted(np.asarray(sched.inq_boundaries), t, side="right"))
    assert int(st.stage) == stage
    rebuilt = t in rebuild_steps
    last_rebuild = t if rebuilt else last_rebuild
    if method == "kmeans":  # a rebuild restarts the centroid optimizer: adam's count says when
      assert _adam_count(st.learned_state) == t - last_rebuild
    q_tree = fq.codebook_quantized(params, state)
    for path in paths:
      w = np.asarray(params[path]["kernel"])
      m = np.asarray(st.masks[path]["kernel"])
      inq = np.asarray(st.inq[path]["kernel"])
      old = np.asarray(prev.inq[path]["kernel"])
      cs, ocs = st.codebooks[path]["kernel"], prev.codebooks[path]["kernel"]
      # Exactly the scheduled fraction of the kept weights, never released.
      assert inq.sum() == int(np.ceil(fractions[stage] * m.sum()))
      assert np.all(inq <= m) and np.all(inq >= old)
      new = inq & ~old
      if new.any():  # largest magnitude first
        free = m & ~inq
        assert not free.any() or np.abs(w[new]).min() >= np.abs(w[free]).max()
      # The forward pass: codewords for the INQ set, float for the other kept, 0 pruned.
      q = np.asarray(q_tree[path]["kernel"])
      book = np.asarray(cs.codebook)
      sym = np.asarray(cs.symbols)
      np.testing.assert_array_equal(q[inq], book[sym[inq]])
      np.testing.assert_array_equal(q[m & ~inq], w[m & ~inq])
      assert np.all(q[~m] == 0) and np.all(w[~m] == 0)
      nearest = np.argmin(np.abs(w[..., None] - book), axis=-1)
      if rebuilt and method == "kmeans":
        # Lloyd's fixed point on the current kept weights: each used centroid is the
        # mean of its members (the centroid optimizer has not stepped since).
        members = nearest[m]
        for k in np.unique(members):
          assert book[k] == pytest.approx(w[m][members == k].mean(), rel=1e-4, abs=1e-6)
      if rebuilt and method == "uniform":
        # clip="max": base = max|w| / (2^(n-1) - 1) * levels, times the learned alpha.
        top = np.abs(w[m]).max() / (2 ** (bits - 1) - 1)
        levels = np.arange(-(2 ** (bits - 1)), 2 ** (bits - 1))
        np.testing.assert_allclose(np.asarray(st.base[path]["kernel"]), top * levels, rtol=1e-5)
      if reassign:
        np.testing.assert_array_equal(sym[m], nearest[m])
      elif not rebuilt:
        # Fixed symbols: a frozen weight keeps its codeword index between rebuilds;
        # a weight entering the INQ set gets its nearest one.
        np.testing.assert_array_equal(sym[old], np.asarray(ocs.symbols)[old])
        np.testing.assert_array_equal(sym[new], nearest[new])
    prev = st
  # The last stage quantizes every kept weight.
  assert int(st.stage) == len(fractions) - 1
  for path in paths:
    np.testing.assert_array_equal(np.asarray(st.inq[path]["kernel"]), st.masks[path]["kernel"])


def test_codebook_schedule_type_is_checked():
  with pytest.raises(TypeError, match="QuantSchedule"):
    fq.codebook_quantization(optax.sgd(0.1), schedule=(0.5, 1.0))


# ----------------------------------------------------------------------------
# The .fqz codebook kind
# ----------------------------------------------------------------------------


def same(a, b):
  return (
    a.dtype == b.dtype
    and a.shape == b.shape
    and np.array_equal(
      np.ascontiguousarray(a).reshape(-1).view(np.uint8),
      np.ascontiguousarray(b).reshape(-1).view(np.uint8),
    )
  )


LAYERS = [
  ((3, 3, 8, 16), 0.7, 5, "kmeans"),
  ((40, 10), 0.0, 7, "uniform"),
  ((7,), 1.0, 2, "kmeans"),
  ((0, 4), 0.5, 3, "uniform"),
  ((6, 6), 0.9, 1, "kmeans"),
]


@pytest.fixture(scope="module")
def layers():
  out = {}
  for i, (shape, sparsity, bits, kind) in enumerate(LAYERS):
    w, mask = (
      sparse_layer(shape, sparsity, i)
      if np.prod(shape)
      else (np.zeros(shape, np.float32), np.zeros(shape, bool))
    )
    if sparsity == 1.0:
      mask[:] = False
    s = (
      fq.kmeans_codebook(w, mask, bits=bits)
      if kind == "kmeans"
      else fq.uniform_codebook(w, mask, bits=bits, clip="mse")
    )
    out[f"layer{i}/kernel"] = (w, s, np.asarray(fq.codebook_quantize(w, s)))
  return out


@pytest.mark.parametrize("coder", ["ans", "huffman"])
def test_codebook_layers_round_trip_bit_exactly(layers, coder):
  for dtype in (np.float32, ml_dtypes.bfloat16, np.float16, np.float64):
    arrays = {p: w.astype(dtype) for p, (w, _, _) in layers.items()}
    books = {p: s for p, (_, s, _) in layers.items()}
    arrays["bn/mean"] = np.arange(5, dtype=np.float32)
    data = fq.encode_model(arrays, codebooks=books, coder=coder, huffman_lane=16)
    d = fq.decode_model(data)
    assert d.version == (1, 1)
    for path, (w, s, q) in layers.items():
      # The forward pass's float32 values, cast like fq.codebook_quantize casts them.
      assert same(d.arrays[path], q.astype(dtype)), (path, dtype)
      np.testing.assert_array_equal(d.masks[path], np.asarray(s.mask))
      back = d.codebooks[path]
      np.testing.assert_array_equal(
        back.codebook.view(np.uint32), np.asarray(s.codebook, np.float32).view(np.uint32)
      )
      np.testing.assert_array_equal(back.symbols, np.asarray(s.symbols))
    assert same(d.arrays["bn/mean"], arrays["bn/mean"])
    summary = fq.artifact_summary(d)
    rows = {r["path"]: r for r in summary["layers"]}
    assert rows["layer0/kernel"]["kind"] == "codebook"
    assert rows["layer0/kernel"]["codewords"] == 32
    assert summary["file_bytes"] == len(data)
    # Re-encoding the decoded states gives the same file.
    again = fq.encode_model(d.arrays, codebooks=dict(d.codebooks), coder=coder, huffman_lane=16)
    assert again == data
  # bfloat16 weights through the forward pass: the same cast of the same float32 value.
  w, s, _ = layers["layer0/kernel"]
  wb = jnp.asarray(w, jnp.bfloat16)
  d = fq.decode_model(fq.encode_model({"w": np.asarray(wb)}, codebooks={"w": s}, coder=coder))
  assert same(
    d.arrays["w"], np.asarray(fq.codebook_values(s.symbols, s.codebook, s.mask, dtype=jnp.bfloat16))
  )


def test_encode_rejects_bad_codebook_states():
  w, mask = sparse_layer((4, 4), 0.5, 0)
  s = fq.kmeans_codebook(w, mask, bits=2)
  with pytest.raises(ValueError, match="symbols outside"):
    fq.encode_model({"w": w}, codebooks={"w": s._replace(symbols=s.symbols + 4 * mask)})
  with pytest.raises(ValueError, match="float array"):
    fq.encode_model({"w": w.astype(np.int32)}, codebooks={"w": s})
  with pytest.raises(ValueError, match="both focus and codebooks"):
    fq.encode_model({"w": w}, codebooks={"w": s}, focus={"w": s})
  with pytest.raises(ValueError, match="differs"):
    fq.encode_model({"w": w}, codebooks={"w": s}, masks={"w": ~mask})
  with pytest.raises(ValueError, match="codewords"):
    fq.encode_model({"w": w}, codebooks={"w": s._replace(codebook=np.zeros(0, np.float32))})


def _file():
  w, mask = sparse_layer((8, 8), 0.5, 3)
  s = fq.uniform_codebook(w, mask, bits=4)
  return fq.encode_model({"x": np.ones(3, np.float32), "w": w}, codebooks={"w": s})


def _edit(data, fn, fix_crcs=True):
  header, sections = fuzz_fqz._split(data)
  fn(header, sections)
  return fuzz_fqz._repack(header, sections, fix_section_crcs=fix_crcs)


@pytest.mark.parametrize(
  "edit,message",
  [
    (
      lambda h, s: h["arrays"][1].update(codewords=0),
      r"arrays\[1\] \('w'\): codewords must be >= 1",
    ),
    (
      lambda h, s: h["arrays"][1].update(codewords=1 << 17),
      r"arrays\[1\] \('w'\): codewords = 131072",
    ),
    (lambda h, s: h["arrays"][1].pop("codewords"), r"arrays\[1\] \('w'\): codewords is missing"),
    (lambda h, s: h["arrays"][1].update(codewords=15), r"section 1 \('w'\)"),
    (lambda h, s: h["arrays"][1].update(codewords=17), r"section 1 \('w'\)"),
    (lambda h, s: s.__setitem__(1, s[1][:-4]), r"section 1 \('w'\).*codebook of 16 float32"),
    (
      lambda h, s: s.__setitem__(1, s[1] + b"\0\0\0\0"),
      r"section 1 \('w'\).*codebook of 16 float32",
    ),
    (lambda h, s: h["arrays"][1].update(dtype="int32"), r"arrays\[1\] \('w'\): dtype int32 cannot"),
    (lambda h, s: h["arrays"][1].update(kept=h["arrays"][1]["kept"] + 1), r"\('w'\)"),
  ],
)
def test_malformed_codebook_sections_name_the_section(edit, message):
  data = _file()
  with pytest.raises(fq.FormatError, match=message):
    fq.decode_model(_edit(data, edit))


def test_codebook_file_fuzz_raises_only_format_errors():
  files = [_file()] + fuzz_fqz.sample_files()
  counts = fuzz_fqz.run(600, 11, files)
  assert sum(counts.values()) == 600 and counts["FormatError"] > 300
  for n in range(0, len(files[0]), 7):
    with pytest.raises(fq.FormatError):
      fq.decode_model(files[0][:n])


def test_version_1_0_files_still_read():
  w, mask = sparse_layer((8, 8), 0.5, 4)
  state = fuzz_fqz._state(
    w.shape, np.random.default_rng(0), bits=5, recentralized=True, sparsity=0.5
  )
  data = fq.encode_model({"w": w, "m": w[0]}, focus={"w": state}, masks={"m": mask[0]})
  assert struct.unpack_from("<HH", data, 8) == (1, 1)
  old = bytearray(data)
  old[10:12] = struct.pack("<H", 0)
  h = struct.unpack_from("<I", data, 12)[0]
  old[20:24] = struct.pack("<I", zlib.crc32(bytes(old[24 : 24 + h]), zlib.crc32(bytes(old[:20]))))
  a, b = fq.decode_model(bytes(old)), fq.decode_model(data)
  assert a.version == (1, 0)
  for k in b.arrays:
    assert same(a.arrays[k], b.arrays[k])
  header = json.loads(zlib.decompress(data[24 : 24 + h]))
  assert {e["kind"] for e in header["arrays"]} == {"focused", "pruned"}
  assert container.MINOR_VERSION == 1
