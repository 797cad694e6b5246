"""Shift (Eq. 1) and recentralized (Eq. 2) quantizers against brute-force oracles."""

import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given

import fq_jax as fq

# Jitted once per static configuration: eager JAX would compile op by op.
focus = jax.jit(fq.focus, static_argnames=("bits", "w_sep", "recentralize"))
shift_quantize = jax.jit(fq.shift_quantize, static_argnames=("bits",))
quantize = jax.jit(fq.focused_quantize)
quantize_grad = jax.jit(
  jax.grad(lambda w, state: jnp.sum(fq.focused_quantize(w, state).astype(jnp.float32)))
)


def brute_force_shift(x, bits, bias):
  """Nearest Eq. 1 value by enumeration (ties to the larger magnitude)."""
  k = bits - 2
  mags = np.array([0.0] + [2.0 ** (e - bias) for e in range(2**k)])
  levels = np.concatenate([-mags[:0:-1], mags])
  d = np.abs(levels[None, :] - x.astype(np.float64)[:, None])
  # Among equidistant levels prefer the larger magnitude.
  best = np.where(d == d.min(axis=1, keepdims=True), -np.abs(levels)[None, :], np.inf).argmin(
    axis=1
  )
  return levels[best]


@given(
  st.integers(2, 8),
  st.integers(-10, 20),
  hnp.arrays(np.float32, 64, elements=st.floats(-64, 64, width=32, allow_subnormal=False)),
)
def test_shift_quantize_is_nearest_representable_value(bits, bias, x):
  q = np.asarray(shift_quantize(jnp.asarray(x), bits=bits, bias=bias))
  np.testing.assert_array_equal(q, brute_force_shift(x, bits, bias).astype(np.float32))


def test_shift_quantize_docstring_values_and_midpoints():
  q = fq.shift_quantize(
    jnp.array([0.3, -0.7, 5.0, 0.01, 0.0625, 0.06249, 0.375, 0.37]), bits=4, bias=3
  )
  # 0.0625 is the zero/0.125 midpoint (ties up), 0.375 the 0.25/0.5 midpoint.
  np.testing.assert_array_equal(q, [0.25, -0.5, 1.0, 0.0, 0.125, 0.0, 0.5, 0.25])


@given(
  st.integers(2, 8),
  hnp.arrays(np.float32, st.integers(1, 300), elements=st.floats(-10, 10, width=32)),
  st.floats(0, 1),
)
def test_overflow_bias_bound_and_maximality(bits, x, keep):
  mask = np.arange(x.size) < max(1, int(keep * x.size))
  b = int(fq.overflow_bias(jnp.asarray(x), bits=bits, mask=jnp.asarray(mask)))
  a = np.abs(x[mask]).astype(np.float64)
  e_max = 2 ** (bits - 2) - 1
  if not np.any(a > 0):
    assert b == 0
    return
  over = lambda bias: np.mean(a > 2.0 ** (e_max - bias))
  assert over(b) <= 1 / (2**bits + 1)
  if np.sum(a > 0) > a.size // (2**bits + 1):
    assert over(b + 1) > 1 / (2**bits + 1)  # the finest bias that satisfies the rule
  else:  # the allowance covers all non-zeros: the largest value is kept exact
    assert over(b) == 0 and np.mean(a > 2.0 ** (e_max - b - 1)) > 0


def test_overflow_bias_bfloat16_and_jit():
  x = jnp.linspace(-1, 1, 101, dtype=jnp.bfloat16)
  assert int(jax.jit(lambda x: fq.overflow_bias(x, bits=5))(x)) == int(
    fq.overflow_bias(x.astype(jnp.float32), bits=5)
  )


def _layer(seed=0, shape=(32, 48), sparsity=0.6, scale=0.05, bimodal=True):
  rng = np.random.default_rng(seed)
  w = rng.normal(0, scale, shape)
  if bimodal:
    w += np.sign(w) * scale
  w = w.astype(np.float32)
  mask = np.asarray(fq.magnitude_mask(jnp.asarray(w), sparsity))
  return jnp.asarray(w), jnp.asarray(mask)


def check_representable(q, state):
  """Every output is z * alpha * (s * 2^(e-b) * sigma + mu_m) for valid s, e (numpy oracle)."""
  q = np.asarray(q, np.float32)
  mask = np.asarray(state.mask)
  alpha = np.float32(state.alpha)
  assert np.all(q[~mask] == 0)
  rec = bool(state.recentralized)
  k = int(state.bits) - (3 if rec else 2)
  b = int(state.bias)
  sigma = np.float32(state.sigma) if rec else np.float32(1)
  mus = np.asarray(state.means, np.float32) if rec else np.zeros(2, np.float32)
  candidates = [np.float32(0)] + [
    np.float32(s * 2.0 ** (e - b)) for e in range(2**k) for s in (1, -1)
  ]
  values = {np.float32(alpha * (np.float32(c * sigma) + mu)) for c in candidates for mu in mus}
  assert set(np.unique(q[mask]).tolist()) <= {float(v) for v in values}
  return values


@pytest.mark.parametrize("bits", [3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("bimodal", [True, False])
def test_focused_quantize_representable_idempotent_and_budgeted(bits, bimodal):
  # A dense Gaussian is unimodal (W < 2: shift); pruning the small weights of
  # any bell-shaped layer leaves two separated peaks (W >= 2: recentralized).
  w, mask = _layer(seed=bits, bimodal=bimodal, sparsity=0.6 if bimodal else 0.0)
  state = focus(w, mask, jax.random.key(bits), bits=bits)
  assert bool(state.recentralized) == bimodal
  q = fq.focused_quantize(w, state)
  values = check_representable(q, state)
  np.testing.assert_array_equal(fq.focused_quantize(q, state), q)
  # n-bit FQ: at most 2^n distinct values plus zero.
  assert len(values) <= 2**bits + 1
  assert np.unique(np.asarray(q)[np.asarray(mask)]).size <= 2**bits
  # The shift code's exponents fit the budget: k = n - 3 (recentralized) or n - 2.
  symbols = np.asarray(fq.focused_symbols(w, state))
  assert symbols.max() < int(fq.num_symbols(state)) <= 2**bits


def test_recentralized_state_parameters():
  w, mask = _layer(seed=11)
  state = focus(w, mask, jax.random.key(0), bits=5)
  means = np.asarray(state.means)
  assert means[0] < 0 < means[1]
  for m in means:  # powers of two
    f, _ = np.frexp(abs(m))
    assert f == 0.5
  g = state.gmm
  np.testing.assert_allclose(state.sigma, np.sqrt(np.sum(g.weights * g.stds**2)), rtol=1e-6)
  assert float(state.alpha) == 1.0
  assert not np.any(np.asarray(state.assignment) & ~np.asarray(mask))


def test_assignment_is_sampled_from_the_posterior():
  rng = np.random.default_rng(12)
  x = np.where(rng.random((200, 200)) < 0.5, -1.0, 1.0) + rng.normal(0, 0.7, (200, 200))
  w, mask = jnp.asarray(x, jnp.float32), jnp.ones((200, 200), bool)
  keys = jax.random.split(jax.random.key(0), 8)
  freq = np.mean([np.asarray(focus(w, mask, k, bits=5).assignment) for k in keys], axis=0)
  state = focus(w, mask, keys[0], bits=5)
  assert bool(state.recentralized)
  post = np.asarray(fq.gmm_posterior(state.gmm, w))
  # Weights with an ambiguous posterior get both components across keys.
  ambiguous = (post > 0.3) & (post < 0.7)
  assert ambiguous.sum() > 10
  assert 0.2 < freq[ambiguous].mean() < 0.8
  np.testing.assert_allclose(freq.mean(), post.mean(), atol=0.02)


def test_w_sep_threshold_and_forced_shift():
  w, mask = _layer(seed=13)
  state = focus(w, mask, jax.random.key(0), bits=5, w_sep=2.0)
  sep = float(state.separation)
  assert bool(state.recentralized) == (sep >= 2.0)
  above = focus(w, mask, jax.random.key(0), bits=5, w_sep=sep + 0.01)
  assert not bool(above.recentralized)
  forced = focus(w, mask, jax.random.key(0), bits=5, recentralize=False)
  assert not bool(forced.recentralized)
  # A shift layer is plain Eq. 1 with all n bits and the overflow-rule bias.
  q = fq.focused_quantize(w, forced)
  expected = fq.shift_quantize(w, bits=5, bias=fq.overflow_bias(w, bits=5, mask=mask)) * mask
  np.testing.assert_array_equal(q, expected)


def test_straight_through_gradient_wrt_w_is_masked_identity():
  w, mask = _layer(seed=14)
  state = focus(w, mask, jax.random.key(0), bits=5)
  cot = jax.random.normal(jax.random.key(1), w.shape)
  g = jax.grad(lambda w: jnp.sum(fq.focused_quantize(w, state) * cot))(w)
  np.testing.assert_array_equal(g, np.where(mask, cot, 0))


def test_alpha_gradient_matches_finite_differences():
  w, mask = _layer(seed=15)
  state = focus(w, mask, jax.random.key(0), bits=5)
  cot = jax.random.normal(jax.random.key(1), w.shape)
  f = lambda a: jnp.sum(fq.focused_quantize(w, state, alpha=a) * cot)
  grad = float(jax.grad(f)(jnp.float32(1.3)))
  eps = 1e-2
  fd = (float(f(jnp.float32(1.3 + eps))) - float(f(jnp.float32(1.3 - eps)))) / (2 * eps)
  np.testing.assert_allclose(grad, fd, rtol=1e-3)
  # ... and equals its definition, sum(g * Q[w] / alpha).
  unit = fq.focused_quantize(w, state, alpha=1.0)
  np.testing.assert_allclose(grad, float(jnp.sum(cot * unit)), rtol=1e-5)


def test_values_decode_symbols_exactly():
  w, mask = _layer(seed=16)
  state = focus(w, mask, jax.random.key(0), bits=6)._replace(alpha=jnp.float32(0.87))
  q = fq.focused_quantize(w, state)
  decoded = fq.focused_values(fq.focused_symbols(w, state), state)
  np.testing.assert_array_equal(np.asarray(q).view(np.uint32), np.asarray(decoded).view(np.uint32))


@given(
  st.sampled_from([(0,), (1,), (7,), (3, 5), (2, 3, 4, 5)]),
  st.sampled_from([jnp.float32, jnp.bfloat16]),
  st.sampled_from([0.0, 0.5, 0.9, 1.0]),
  st.sampled_from([2, 3, 5, 8]),
  st.integers(0, 2**16),
)
@hypothesis.settings(max_examples=20)
def test_property_shapes_dtypes_sparsities(shape, dtype, sparsity, bits, seed):
  rng = np.random.default_rng(seed)
  w = jnp.asarray(rng.normal(0, 0.1, shape), dtype)
  mask = jnp.asarray(rng.random(shape) >= sparsity)
  state = focus(w, mask, jax.random.key(seed), bits=bits)
  q = quantize(w, state)
  assert q.shape == w.shape and q.dtype == w.dtype
  assert np.all(np.isfinite(np.asarray(q, np.float32)))
  assert np.all(np.asarray(q, np.float32)[~np.asarray(mask)] == 0)
  for leaf in jax.tree.leaves(state):
    assert np.all(np.isfinite(np.asarray(leaf, np.float32)))
  if dtype == jnp.float32:
    check_representable(q, state)
    np.testing.assert_array_equal(quantize(q, state), q)
  g = quantize_grad(w, state)
  np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(mask, np.float32))


def test_bits_out_of_range_is_a_clear_error():
  with pytest.raises(ValueError, match="bits"):
    focus(jnp.ones(4), None, jax.random.key(0), bits=1)
  with pytest.raises(ValueError, match="bits"):
    focus(jnp.ones(4), None, jax.random.key(0), bits=9)


def test_round_to_power_of_two():
  np.testing.assert_array_equal(
    fq.round_to_power_of_two(jnp.array([0.3, -0.37, 0.375, 0.0, 3.0, -5.9])),
    [0.25, -0.25, 0.5, 0.0, 4.0, -4.0],
  )


def test_focus_under_jit_and_vmap():
  w, mask = _layer(seed=17)
  stacked_w = jnp.stack([w, -w, 2 * w])
  stacked_m = jnp.stack([mask] * 3)
  keys = jax.random.split(jax.random.key(0), 3)
  states = jax.jit(jax.vmap(lambda w, m, k: focus(w, m, k, bits=5)))(stacked_w, stacked_m, keys)
  single = focus(stacked_w[2], mask, keys[2], bits=5)
  np.testing.assert_array_equal(states.bias[2], single.bias)
  np.testing.assert_allclose(states.means[2], single.means)


def test_weights_on_rounding_boundaries_encode_to_the_evaluated_values(tmp_path):
  """The jitted forward pass and the codec agree on every weight sitting on a boundary.

  Each kept weight is placed where (w - mu) / sigma lands on, or a few ulps beside, the
  midpoint 0.75 * 2^j between two shift levels, in layer shapes that once made XLA
  compile the division differently in the forward pass (a product with the reciprocal)
  than in the codec's batched kernel: then a weight exactly on a midpoint decoded one
  symbol away from the value evaluated (a bf16 MobileNet-V2 run hit it once in 153,600).
  The oracle is the file: `fq.load_fqz` must give back `jit(fq.quantized)` bit for bit.
  """
  import optax

  shapes = {"dw": (3, 3, 1, 192), "head": (64, 10), "pw": (1, 1, 32, 192), "conv": (3, 3, 16, 16)}
  tx = fq.focused_quantization(optax.sgd(0.1), bits=5)
  quantized = jax.jit(fq.quantized)
  differ = {}
  for seed in range(4):  # several sigmas: whether a tie rounds apart depends on its value
    rng = np.random.default_rng(seed)
    params = {
      k: {"kernel": jnp.asarray(rng.standard_normal(s).astype(np.float32) * 0.05)}
      for k, s in shapes.items()
    }
    params = fq.apply_masks(params, fq.magnitude_masks(params, 0.5))
    state = tx.init(params)
    focus = fq.find_state(state).focus
    on_boundaries = {}
    for name, shape in shapes.items():
      f = focus[name]["kernel"]
      n = int(np.prod(shape))
      mu = np.where(np.asarray(f.assignment).ravel(), *np.asarray(f.means, np.float32)[::-1])
      mu = mu if bool(f.recentralized) else np.zeros(n, np.float32)
      sigma = np.float32(f.sigma) if bool(f.recentralized) else np.float32(1.0)
      j = rng.integers(-int(f.bias) - 1, 3, n).astype(np.float64)
      z = 0.75 * 2.0**j * rng.choice([-1.0, 1.0], n)
      w = (mu + z * sigma).astype(np.float32)
      for _ in range(int(rng.integers(0, 3))):  # 0-2 ulps to either side
        w = np.nextafter(w, rng.choice([-np.inf, np.inf], n).astype(np.float32))
      w = np.where(np.asarray(f.mask).ravel(), w, 0.0).astype(np.float32)
      on_boundaries[name] = {"kernel": jnp.asarray(w.reshape(shape))}
    evaluated = quantized(on_boundaries, state)
    fq.save_fqz(tmp_path / f"m{seed}.fqz", on_boundaries, state)
    decoded = fq.load_fqz(tmp_path / f"m{seed}.fqz").tree()
    for name in shapes:
      got, want = np.asarray(decoded[name]["kernel"]), np.asarray(evaluated[name]["kernel"])
      if not np.array_equal(got, want):
        differ[(seed, name)] = int(np.sum(got != want))
  assert not differ, differ
