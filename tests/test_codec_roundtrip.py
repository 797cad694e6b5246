"""Round trips through the .fqz format: bit-exact arrays, the quantizer contract, trees."""

import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

import fq_jax as fq

CODERS = st.sampled_from(["ans", "huffman"])
SHAPES = [(), (0,), (1,), (1, 1), (7,), (3, 5), (0, 4), (2, 3, 3, 2), (33, 17), (16, 8, 3, 3)]
FOCUS_DTYPES = [np.float32, ml_dtypes.bfloat16, np.float16]
RAW_DTYPES = [
  np.bool_,
  np.int8,
  np.uint8,
  np.int16,
  np.uint16,
  np.int32,
  np.uint32,
  np.int64,
  np.uint64,
  np.float16,
  ml_dtypes.bfloat16,
  np.float32,
  np.float64,
]
SPARSITIES = [0.0, 0.5, 0.999, 1.0]
PAD = 4096  # reference kernels run on padded flat vectors: one compile per dtype


def same(a, b) -> bool:
  """Equal values, dtype, shape and raw bytes."""
  a, b = np.asarray(a), np.asarray(b)
  return (
    a.dtype == b.dtype
    and a.shape == b.shape
    and np.array_equal(a, b, equal_nan=True)
    and np.array_equal(
      np.ascontiguousarray(a).reshape(-1).view(np.uint8),
      np.ascontiguousarray(b).reshape(-1).view(np.uint8),
    )
  )


def exact_mask(shape, sparsity, rng):
  """A keep-mask pruning exactly round(sparsity * size) random entries."""
  size = int(np.prod(shape))
  mask = np.ones(size, bool)
  mask[rng.permutation(size)[: round(sparsity * size)]] = False
  return mask.reshape(shape)


def synthetic_state(shape, rng, *, bits, recentralized, sparsity, scale=0.05):
  """A FocusState as fq.focus would shape it (powers-of-two means, shared sigma)."""
  recentralized = recentralized and bits >= 3
  mask = exact_mask(shape, sparsity, rng)
  means = np.array(
    [-(2.0 ** -int(rng.integers(2, 6))), 2.0 ** -int(rng.integers(2, 6))], np.float32
  )
  return fq.FocusState(
    recentralized=np.bool_(recentralized),
    bits=np.int32(bits),
    means=means,
    sigma=np.float32(scale * rng.uniform(0.3, 1.0)),
    bias=np.int32(rng.integers(-2, 9)),
    assignment=(rng.random(shape) < 0.5) & mask & recentralized,
    mask=mask,
    alpha=np.float32(rng.uniform(0.5, 2.0)),
    gmm=fq.GMM(np.array([0.5, 0.5], np.float32), means, np.array([0.02, 0.03], np.float32)),
    separation=np.float32(rng.uniform(0, 5)),
  )


@functools.partial(jax.jit, static_argnames="dtype")
def _reference(w, assignment, mask, rec, bits, means, sigma, bias, alpha, dtype):
  """fq.focused_symbols / fq.focused_values with scalar parameters, as the forward pass."""
  state = fq.FocusState(rec, bits, means, sigma, bias, assignment, mask, alpha, None, None)
  symbols = fq.focused_symbols(w, state)
  return symbols, fq.focused_values(symbols, state, dtype=dtype)


def reference(w, state):
  """(symbols, values) of `w` under `state`, computed independently of the codec."""
  size = w.size
  assert size <= PAD
  pad = lambda x, dt: np.concatenate([np.asarray(x, dt).reshape(-1), np.zeros(PAD - size, dt)])
  sym, val = _reference(
    pad(w, w.dtype),
    pad(state.assignment, bool),
    pad(state.mask, bool),
    state.recentralized,
    state.bits,
    state.means,
    state.sigma,
    state.bias,
    state.alpha,
    dtype=jnp.dtype(w.dtype),
  )
  return (np.asarray(sym)[:size].reshape(w.shape), np.asarray(val)[:size].reshape(w.shape))


@functools.partial(jax.jit, static_argnames="dtype")
def _values(symbols, mask, rec, bits, means, sigma, bias, alpha, dtype):
  state = fq.FocusState(rec, bits, means, sigma, bias, None, mask, alpha, None, None)
  return fq.focused_values(symbols, state, dtype=dtype)


def values_of(symbols, state, dtype):
  """fq.focused_values(symbols, state) (padded flat, one compile per dtype)."""
  size = symbols.size
  pad = lambda x, dt: np.concatenate([np.asarray(x, dt).reshape(-1), np.zeros(PAD - size, dt)])
  out = _values(
    pad(symbols, np.int32),
    pad(state.mask, bool),
    state.recentralized,
    state.bits,
    state.means,
    state.sigma,
    state.bias,
    state.alpha,
    dtype=jnp.dtype(dtype),
  )
  return np.asarray(out)[:size].reshape(symbols.shape)


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(
  shape=st.sampled_from(SHAPES),
  dtype=st.sampled_from(FOCUS_DTYPES),
  sparsity=st.sampled_from(SPARSITIES),
  bits=st.integers(2, 8),
  recentralized=st.booleans(),
  coder=CODERS,
  seed=st.integers(0, 2**32 - 1),
)
def test_focused_layers_round_trip_bit_exactly(
  shape, dtype, sparsity, bits, recentralized, coder, seed
):
  rng = np.random.default_rng(seed)
  w = (rng.normal(size=shape) * 0.05).astype(dtype)
  state = synthetic_state(shape, rng, bits=bits, recentralized=recentralized, sparsity=sparsity)
  stats = rng.normal(size=(3,)).astype(np.float32)
  arrays = {"block/conv/kernel": w, "block/bn/mean": stats, "steps": np.int64(2**40 + 3)}
  data = fq.encode_model(
    arrays,
    focus={"block/conv/kernel": state},
    coder=coder,
    metadata={"dataset": "test", "bits": bits},
  )
  d = fq.decode_model(data)
  ref_sym, ref_val = reference(w, state)
  assert same(d.arrays["block/conv/kernel"], ref_val)
  assert same(d.symbols["block/conv/kernel"], ref_sym.astype(np.int32))
  assert same(d.arrays["block/bn/mean"], stats)
  assert same(d.arrays["steps"], np.int64(2**40 + 3))
  assert list(d.arrays) == list(arrays)
  assert d.metadata == {"dataset": "test", "bits": bits} and d.coder == coder
  f = d.focus["block/conv/kernel"]
  assert same(f.mask, state.mask) and same(d.masks["block/conv/kernel"], state.mask)
  assert same(f.assignment, np.asarray(state.assignment) & state.mask & state.recentralized)
  for field in ("recentralized", "bits", "means", "sigma", "bias", "alpha", "separation"):
    assert same(getattr(f, field), getattr(state, field)), field
  for field in ("weights", "means", "stds"):
    assert same(getattr(f.gmm, field), getattr(state.gmm, field))
  # fq.focused_values of the decoded symbols under the decoded state gives the arrays.
  assert same(values_of(d.symbols["block/conv/kernel"], f, w.dtype), ref_val)
  s = fq.artifact_summary(d)
  assert s["compression_ratio"] == 4 * (w.size + 3 + 1) / len(data)
  (row,) = [r for r in s["layers"] if r["path"] == "block/conv/kernel"]
  assert row["kept"] == int(state.mask.sum())
  assert row["kind"] == ("recentralized" if state.recentralized else "shift")


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(
  shape=st.sampled_from(SHAPES),
  dtype=st.sampled_from(RAW_DTYPES),
  coder=CODERS,
  seed=st.integers(0, 2**32 - 1),
  special=st.booleans(),
)
def test_raw_arrays_round_trip_bit_exactly(shape, dtype, coder, seed, special):
  rng = np.random.default_rng(seed)
  dt = np.dtype(dtype)
  if dt.kind == "b":
    x = rng.random(shape) < 0.5
  elif dt.kind in "iu":
    info = np.iinfo(dt)
    x = rng.integers(info.min, info.max, size=shape, dtype=dt, endpoint=True)
  else:
    x = (rng.normal(size=shape) * 100).astype(dt)
    if special and x.size:
      flat = x.reshape(-1)
      flat[rng.integers(x.size)] = np.array(-0.0, dt)
      flat[rng.integers(x.size)] = np.array(np.inf, dt)
      flat[rng.integers(x.size)] = np.array(np.nan, dt)
  x = np.asarray(x, dt)
  d = fq.decode_model(fq.encode_model({"x": x, "y/z": x[..., None]}, coder=coder))
  assert same(d.arrays["x"], x) and same(d.arrays["y/z"], x[..., None])


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(
  shape=st.sampled_from(SHAPES),
  dtype=st.sampled_from(RAW_DTYPES),
  sparsity=st.sampled_from(SPARSITIES),
  coder=CODERS,
  seed=st.integers(0, 2**32 - 1),
)
def test_pruned_arrays_round_trip(shape, dtype, sparsity, coder, seed):
  rng = np.random.default_rng(seed)
  x = (rng.normal(size=shape) * 10).astype(dtype)
  mask = exact_mask(shape, sparsity, rng)
  data = fq.encode_model({"w": x}, masks={"w": mask}, coder=coder)
  d = fq.decode_model(data)
  assert same(d.arrays["w"], np.where(mask, x, np.zeros((), x.dtype)).astype(x.dtype))
  assert same(d.masks["w"], mask)
  assert d.layers[0]["kind"] == "pruned" and d.layers[0]["kept"] == int(mask.sum())


def test_float_dtype_downcasts_only_when_asked():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(5, 7)).astype(np.float32)
  y = rng.normal(size=(9,)).astype(np.float64)
  h = rng.normal(size=(4,)).astype(np.float16)
  for target in ("bfloat16", "float16"):
    t = np.dtype(ml_dtypes.bfloat16) if target == "bfloat16" else np.dtype(np.float16)
    data = fq.encode_model({"x": x, "y": y, "h": h, "i": np.arange(3)}, float_dtype=target)
    d = fq.decode_model(data)
    assert same(d.arrays["x"], x.astype(t).astype(np.float32))
    assert same(d.arrays["y"], y.astype(t).astype(np.float64))
    assert same(d.arrays["h"], h) and same(d.arrays["i"], np.arange(3))
    assert len(data) < len(fq.encode_model({"x": x, "y": y, "h": h, "i": np.arange(3)}))


def test_empty_model_and_all_pruned_layers():
  d = fq.decode_model(fq.encode_model({}))
  assert d.arrays == {} and d.tree() == {}
  rng = np.random.default_rng(0)
  w = rng.normal(size=(64, 64)).astype(np.float32)
  state = synthetic_state(w.shape, rng, bits=5, recentralized=True, sparsity=1.0)
  for coder in ("ans", "huffman"):
    data = fq.encode_model({"w": w}, focus={"w": state}, coder=coder)
    d = fq.decode_model(data)
    assert same(d.arrays["w"], np.zeros_like(w))
    assert d.layers[0]["section_bytes"] <= 8  # two empty tables and an empty payload


def test_forward_pass_values_equal_decoded_values(tmp_path):
  """fq.quantized(params, FQState) with every kept weight quantized == the decoded arrays."""
  rng = np.random.default_rng(1)
  params = {
    "conv": {
      "kernel": (rng.normal(size=(3, 3, 8, 16)) * 0.1).astype(np.float32),
      "bias": rng.normal(size=(16,)).astype(np.float32),
    },
    "dense": {"kernel": (rng.normal(size=(32, 10)) * 0.1).astype(ml_dtypes.bfloat16)},
    "shift": {"kernel": (rng.normal(size=(10, 6)) * 0.1).astype(np.float32)},
  }
  states = {
    "conv": synthetic_state((3, 3, 8, 16), rng, bits=5, recentralized=True, sparsity=0.7),
    "dense": synthetic_state((32, 10), rng, bits=7, recentralized=True, sparsity=0.5),
    "shift": synthetic_state((10, 6), rng, bits=4, recentralized=False, sparsity=0.0),
  }
  masks = {
    k: {"kernel": s.mask, **({"bias": None} if k == "conv" else {})} for k, s in states.items()
  }
  focus = {k: {"kernel": s, **({"bias": None} if k == "conv" else {})} for k, s in states.items()}
  fq_state = fq.FQState(
    count=jnp.int32(0),
    rng=jnp.zeros(2, jnp.uint32),
    masks=masks,
    focus=focus,
    inq=masks,
    stage=jnp.int32(0),
    next_refit=jnp.int32(0),
    refit_interval=jnp.float32(0),
    alpha_state=(),
    inner_state=optax.EmptyState(),
  )
  forward = jax.jit(fq.quantized)(params, fq_state)
  batch_stats = {"bn": {"mean": rng.normal(size=(16,)).astype(np.float32)}}
  variables = {"params": params, "batch_stats": batch_stats}
  opt_state = (optax.EmptyState(), fq_state)  # found anywhere inside the optax state
  for coder in ("ans", "huffman"):
    path = tmp_path / f"model-{coder}.fqz"
    written = fq.save_fqz(path, variables, opt_state, coder=coder, metadata={"model": "t"})
    assert written == path.stat().st_size
    d = fq.load_fqz(path)
    assert set(d.focus) == {"params/conv/kernel", "params/dense/kernel", "params/shift/kernel"}
    for k in states:
      assert same(d.arrays[f"params/{k}/kernel"], forward[k]["kernel"]), k
    assert same(d.arrays["params/conv/bias"], params["conv"]["bias"])
    tree = d.tree()
    assert same(tree["batch_stats"]["bn"]["mean"], batch_stats["bn"]["mean"])
    assert jax.tree.structure(tree) == jax.tree.structure(variables)
  # The same through params + extra, and explicit params_key.
  n1 = fq.save_fqz(tmp_path / "a.fqz", params, fq_state, extra={"batch_stats": batch_stats})
  d1 = fq.load_fqz(tmp_path / "a.fqz")
  assert "conv/kernel" in d1.focus and "batch_stats/bn/mean" in d1.arrays and n1 > 0
  fq.save_fqz(tmp_path / "b.fqz", variables, fq_state, params_key="params")
  assert set(fq.load_fqz(tmp_path / "b.fqz").focus) == set(d.focus)
  with pytest.raises(ValueError, match="mirror"):
    fq.save_fqz(tmp_path / "c.fqz", variables, fq_state, params_key=None)
  # No compression state: a lossless container.
  fq.save_fqz(tmp_path / "d.fqz", variables, None)
  d4 = fq.load_fqz(tmp_path / "d.fqz")
  assert d4.focus == {} and same(d4.arrays["params/dense/kernel"], params["dense"]["kernel"])


def test_batched_kernels_match_eager_focused_values_on_a_real_fit():
  """One real fq.focus layer: the codec's values == eager fq.focused_values on the full shape."""
  rng = np.random.default_rng(3)
  w = jnp.asarray((rng.normal(size=(16, 8, 3, 3)) * 0.05).astype(np.float32))
  mask = fq.magnitude_mask(w, 0.6)
  state = jax.jit(fq.focus, static_argnames=("bits",))(w, mask, jax.random.key(0), bits=5)
  symbols = fq.focused_symbols(w, state)
  values = fq.focused_values(symbols, state)
  for coder in ("ans", "huffman"):
    d = fq.decode_model(fq.encode_model({"w": np.asarray(w)}, focus={"w": state}, coder=coder))
    assert same(d.symbols["w"], np.asarray(symbols))
    assert same(d.arrays["w"], np.asarray(values))


def test_encode_rejects_bad_input():
  rng = np.random.default_rng(0)
  w = rng.normal(size=(4, 4)).astype(np.float32)
  state = synthetic_state(w.shape, rng, bits=5, recentralized=True, sparsity=0.5)
  with pytest.raises(ValueError, match="unsupported dtype"):
    fq.encode_model({"s": np.array(["a", "b"])})
  with pytest.raises(ValueError, match="unsupported dtype"):
    fq.encode_model({"o": np.array([None, 1], dtype=object)})
  with pytest.raises(ValueError, match="not in arrays"):
    fq.encode_model({"w": w}, focus={"v": state})
  with pytest.raises(ValueError, match="must be a float array"):
    fq.encode_model({"w": np.arange(16).reshape(4, 4)}, focus={"w": state})
  wide = fq.decode_model(fq.encode_model({"w": w.astype(np.float64)}, focus={"w": state}))
  narrow = fq.decode_model(fq.encode_model({"w": w}, focus={"w": state}))
  assert same(wide.arrays["w"], narrow.arrays["w"].astype(np.float64))
  with pytest.raises(ValueError, match="differs"):
    fq.encode_model({"w": w}, focus={"w": state}, masks={"w": ~state.mask})
  with pytest.raises(ValueError, match="coder"):
    fq.encode_model({"w": w}, coder="zip")
  with pytest.raises(ValueError, match="JSON"):
    fq.encode_model({"w": w}, metadata={"x": object()})
  with pytest.raises(ValueError, match="float_dtype"):
    fq.encode_model({"w": w}, float_dtype="int8")


def test_tree_rebuild_and_conflicts():
  d = fq.decode_model(fq.encode_model({"a/b": np.ones(2), "a/c/d": np.zeros(1), "e": np.int32(1)}))
  t = d.tree()
  assert set(t) == {"a", "e"} and set(t["a"]) == {"b", "c"} and t["a"]["c"]["d"].shape == (1,)
  d = fq.decode_model(fq.encode_model({"a": np.ones(2), "a/b": np.zeros(1)}))
  with pytest.raises(ValueError, match="runs through"):
    d.tree()
