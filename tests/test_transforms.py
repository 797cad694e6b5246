"""The optax wrappers: masks, INQ, re-estimation, alphas, composition, checkpoints."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import fq_jax as fq


def make_params(dtype=jnp.float32, sparsity=0.7):
  k1, k2 = jax.random.split(jax.random.key(0))
  params = {
    "conv": {
      "kernel": (jax.random.normal(k1, (3, 3, 8, 16)) * 0.1).astype(dtype),
      "bias": jnp.zeros(16, dtype),
    },
    "dense": {"kernel": (jax.random.normal(k2, (64, 10)) * 0.1).astype(dtype)},
  }
  return fq.apply_masks(params, fq.magnitude_masks(params, sparsity))


def loss_fn(p):
  """A well-posed regression: move every kept weight 10% outwards."""
  return sum(
    jnp.sum((a.astype(jnp.float32) - t) ** 2)
    for a, t in zip(jax.tree.leaves(p), jax.tree.leaves(TARGET))
  )


def run(tx, params, steps):
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    grads = jax.grad(lambda p: loss_fn(fq.quantized(p, state)))(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for _ in range(steps):
    params, state = step(params, state)
  return params, state


TARGET = jax.tree.map(lambda x: 1.1 * x.astype(jnp.float32), make_params())


def pruned_positions(params):
  return {k: np.asarray(params[k]["kernel"]) == 0 for k in ("conv", "dense")}


def test_pruned_weights_stay_exactly_zero_under_momentum_and_weight_decay():
  params = make_params()
  before = pruned_positions(params)
  inner = optax.chain(optax.add_decayed_weights(1e-2), optax.sgd(0.05, momentum=0.9))
  tx = fq.focused_quantization(inner, bits=5, schedule=fq.inq_schedule(20))
  params, state = run(tx, params, 100)
  for k, pruned in before.items():
    assert np.all(np.asarray(params[k]["kernel"])[pruned] == 0), k
    np.testing.assert_array_equal(np.asarray(fq.find_state(state).masks[k]["kernel"]), ~pruned)
  # ... while every kept weight did train.
  for k, pruned in before.items():
    moved = np.asarray(params[k]["kernel"]) != np.asarray(make_params()[k]["kernel"])
    assert np.all(moved[~pruned]), k


def test_quantized_tree_is_focused_quantized_when_schedule_completes():
  params = make_params()
  tx = fq.focused_quantization(optax.sgd(0.01), bits=5, alpha_optimizer=optax.sgd(0.0))
  state = tx.init(params)
  q = fq.quantized(params, state)
  for k in ("conv", "dense"):
    f = state.focus[k]["kernel"]
    np.testing.assert_array_equal(q[k]["kernel"], fq.focused_quantize(params[k]["kernel"], f))
  np.testing.assert_array_equal(q["conv"]["bias"], params["conv"]["bias"])
  assert state.focus["conv"]["bias"] is None and state.masks["conv"]["bias"] is None


def test_inq_schedule_fractions_and_monotone_sets():
  params = make_params()
  tx = fq.focused_quantization(optax.sgd(0.01), bits=5, schedule=fq.inq_schedule(5))
  state = tx.init(params)
  seen = [fq.quantized_fraction(state)]
  prev = jax.tree.map(np.asarray, state.inq)

  @jax.jit
  def step(params, state):
    grads = jax.grad(lambda p: loss_fn(fq.quantized(p, state)))(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for i in range(25):
    params, state = step(params, state)
    cur = jax.tree.map(np.asarray, state.inq)
    for a, b in zip(jax.tree.leaves(prev), jax.tree.leaves(cur)):
      assert np.all(b[a])  # once quantized, always quantized
    prev = cur
    if (i + 1) % 5 == 0:
      seen.append(fq.quantized_fraction(state))
  np.testing.assert_allclose(seen[:5], [0.25, 0.5, 0.75, 0.875, 1.0], atol=0.01)
  # Magnitude order: the first quarter is the largest weights of each layer.
  first = fq.focused_quantization(optax.sgd(0.0), schedule=fq.inq_schedule(5)).init(make_params())
  w = np.abs(np.asarray(make_params()["dense"]["kernel"]))
  inq = np.asarray(first.inq["dense"]["kernel"])
  kept = w > 0
  assert w[inq].min() >= w[kept & ~inq].max()


def test_inq_error_order_takes_smallest_quantization_error_first():
  params = make_params()
  tx = fq.focused_quantization(optax.sgd(0.0), schedule=fq.inq_schedule(5, order="error"))
  state = tx.init(params)
  w = params["dense"]["kernel"]
  f = state.focus["dense"]["kernel"]
  err = np.abs(np.asarray(fq.focused_quantize(w, f)) - np.asarray(w))
  inq = np.asarray(state.inq["dense"]["kernel"])
  kept = np.asarray(f.mask)
  assert err[inq].max() <= err[kept & ~inq].min()


def test_refit_interval_grows_exponentially():
  params = make_params()
  tx = fq.focused_quantization(
    optax.sgd(0.01), schedule=fq.QuantSchedule(refit_every=2, refit_growth=2.0)
  )
  state = tx.init(params)
  refits = []

  @jax.jit
  def step(params, state):
    grads = jax.grad(lambda p: loss_fn(fq.quantized(p, state)))(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  last = int(state.next_refit)
  for _ in range(31):
    params, state = step(params, state)
    if int(state.next_refit) != last:
      refits.append(int(state.count))
      last = int(state.next_refit)
  assert refits == [2, 6, 14, 30]


def test_refit_resamples_assignments_and_keeps_alpha():
  # Two overlapping components: ambiguous posteriors, so resampling changes m.
  rng = np.random.default_rng(0)
  x = np.where(rng.random((64, 64)) < 0.5, -1.0, 1.0) + rng.normal(0, 0.7, (64, 64))
  params = {"kernel": jnp.asarray(x, jnp.float32)}
  tx = fq.focused_quantization(
    optax.sgd(0.01),
    schedule=fq.QuantSchedule(refit_every=1),
    alpha_optimizer=optax.sgd(1e-3),
    masks={"kernel": jnp.ones((64, 64), bool)},
  )
  s0 = tx.init(params)
  grads = jax.grad(lambda p: jnp.sum(fq.quantized(p, s0)["kernel"] ** 2))(params)
  _, s1 = tx.update(grads, s0, params)
  assert bool(s0.focus["kernel"].recentralized)
  a0 = np.asarray(s0.focus["kernel"].assignment)
  a1 = np.asarray(s1.focus["kernel"].assignment)
  assert np.any(a0 != a1)
  assert int(s1.next_refit) == 3  # next interval doubled
  assert float(s1.focus["kernel"].alpha) != 1.0


def test_alpha_learns_its_true_gradient():
  params = make_params()
  lr = 1e-3
  tx = fq.focused_quantization(optax.sgd(0.0), alpha_optimizer=optax.sgd(lr))
  state = tx.init(params)
  f = state.focus["dense"]["kernel"]
  expected = jax.grad(
    lambda a: loss_fn(
      {**params, "dense": {"kernel": fq.focused_quantize(params["dense"]["kernel"], f, alpha=a)}}
      | {"conv": fq.quantized(params, state)["conv"]}
    )
  )(1.0)
  grads = jax.grad(lambda p: loss_fn(fq.quantized(p, state)))(params)
  _, new = tx.update(grads, state, params)
  np.testing.assert_allclose(
    float(new.focus["dense"]["kernel"].alpha), 1.0 - lr * float(expected), rtol=1e-5
  )


@pytest.mark.parametrize("wrap", ["chain", "inject_hyperparams", "multi_steps", "apply_if_finite"])
def test_composes_with_optax(wrap):
  params = make_params()
  before = pruned_positions(params)
  if wrap == "chain":
    tx = optax.chain(
      optax.clip_by_global_norm(1.0),
      fq.focused_quantization(optax.sgd(0.05, momentum=0.9), schedule=fq.inq_schedule(3)),
    )
  elif wrap == "inject_hyperparams":
    inner = optax.inject_hyperparams(optax.sgd)(learning_rate=0.05, momentum=0.9)
    tx = fq.focused_quantization(inner, schedule=fq.inq_schedule(3))
  elif wrap == "multi_steps":
    tx = optax.MultiSteps(
      fq.focused_quantization(optax.sgd(0.05), schedule=fq.inq_schedule(3)), every_k_schedule=2
    )
  else:
    tx = optax.apply_if_finite(
      fq.focused_quantization(optax.sgd(0.05), schedule=fq.inq_schedule(3)),
      max_consecutive_errors=3,
    )
  params, state = run(tx, params, 24 if wrap == "multi_steps" else 12)
  inner = fq.find_state(state)
  assert isinstance(inner, fq.FQState)
  assert int(inner.count) == 12
  for k, pruned in before.items():
    assert np.all(np.asarray(params[k]["kernel"])[pruned] == 0)
  assert fq.quantized_fraction(state) == 1.0


def test_apply_if_finite_skips_nan_gradients_without_touching_state():
  params = make_params()
  tx = optax.apply_if_finite(fq.focused_quantization(optax.sgd(0.05)), max_consecutive_errors=5)
  state = tx.init(params)
  grads = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), params)
  updates, new = jax.jit(tx.update)(grads, state, params)
  assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates))
  assert int(fq.find_state(new).count) == 0


def test_orbax_round_trip_is_bit_exact(tmp_path):
  params = make_params()
  tx = fq.focused_quantization(optax.adam(1e-3), schedule=fq.inq_schedule(2, refit_every=1))
  params, state = run(tx, params, 3)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(tmp_path / "ckpt", {"params": params, "opt_state": state})
  ckptr.wait_until_finished()
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, {"params": params, "opt_state": state})
  restored = ckptr.restore(tmp_path / "ckpt", target)
  a_leaves, a_def = jax.tree.flatten({"params": params, "opt_state": state})
  b_leaves, b_def = jax.tree.flatten(restored)
  assert a_def == b_def
  for a, b in zip(a_leaves, b_leaves):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(
      np.atleast_1d(np.asarray(a)).view(np.uint8), np.atleast_1d(np.asarray(b)).view(np.uint8)
    )
  # The restored state keeps training identically.
  p1, s1 = jax.jit(lambda p, s: _one_step(tx, p, s))(params, state)
  p2, s2 = jax.jit(lambda p, s: _one_step(tx, p, s))(restored["params"], restored["opt_state"])
  for a, b in zip(jax.tree.leaves((p1, s1)), jax.tree.leaves((p2, s2))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _one_step(tx, params, state):
  grads = jax.grad(lambda p: loss_fn(fq.quantized(p, state)))(params)
  updates, state = tx.update(grads, state, params)
  return optax.apply_updates(params, updates), state


def test_bfloat16_params():
  params = make_params(jnp.bfloat16)
  tx = fq.focused_quantization(optax.sgd(0.05, momentum=0.9), schedule=fq.inq_schedule(2))
  new, state = run(tx, params, 10)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(new))
  q = fq.quantized(new, state)
  assert q["conv"]["kernel"].dtype == jnp.bfloat16
  assert np.all(
    np.asarray(new["conv"]["kernel"], np.float32)[pruned_positions(params)["conv"]] == 0
  )


def test_dns_pruning_prunes_to_target_and_splices():
  params = make_params(sparsity=0.0)
  tx = fq.dns_pruning(optax.sgd(0.05, momentum=0.9), sparsity=0.6, update_every=2)
  new, state = run(tx, params, 20)
  s = fq.sparsity_of(state.masks)
  assert 0.5 < s < 0.7
  # Forward reads pruned weights as 0, but every weight still receives gradient.
  q = fq.quantized(new, state)
  m = np.asarray(state.masks["conv"]["kernel"])
  assert np.all(np.asarray(q["conv"]["kernel"])[~m] == 0)
  g = jax.grad(lambda p: jnp.sum(fq.quantized(p, state)["conv"]["kernel"]))(new)
  np.testing.assert_array_equal(g["conv"]["kernel"], np.ones(m.shape))
  frozen = fq.apply_masks(new, state.masks)
  assert abs(fq.sparsity_of(fq.infer_masks(frozen)) - s) < 1e-6


def test_update_without_params_is_a_clear_error():
  params = make_params()
  tx = fq.focused_quantization(optax.sgd(0.1))
  state = tx.init(params)
  with pytest.raises(ValueError, match="params"):
    tx.update(params, state)


def test_schedule_validation():
  with pytest.raises(ValueError, match="inq_fractions"):
    fq.QuantSchedule(inq_fractions=(0.5,))
  with pytest.raises(ValueError, match="inq_boundaries"):
    fq.QuantSchedule(inq_fractions=(0.5, 1.0), inq_boundaries=())
  with pytest.raises(ValueError, match="inq_order"):
    fq.QuantSchedule(inq_order="random")
  assert fq.inq_schedule(0).inq_fractions == (1.0,)


def test_layer_report_rows():
  params = make_params()
  state = fq.focused_quantization(optax.sgd(0.1), bits=5).init(params)
  rows = fq.layer_report(params, state)
  assert [r["path"] for r in rows] == ["conv/kernel", "dense/kernel"]
  for r in rows:
    f = state.focus[r["path"].split("/")[0]]["kernel"]
    w = params[r["path"].split("/")[0]]["kernel"]
    assert r["kept"] == int(jnp.sum(f.mask))
    q = np.asarray(fq.focused_quantize(w, f))
    m = np.asarray(f.mask)
    np.testing.assert_allclose(r["mse"], np.mean((q[m] - np.asarray(w)[m]) ** 2), rtol=1e-5)
    sym = np.asarray(fq.focused_symbols(w, f))[m]
    p = np.bincount(sym) / sym.size
    p = p[p > 0]
    np.testing.assert_allclose(r["entropy_bits"], -(p * np.log2(p)).sum(), rtol=1e-9)
    assert r["entropy_bits"] <= 5
  assert "conv/kernel" in fq.format_report(rows)


def _masked_fq_run(make_tx, steps=2):
  """Runs `steps` FQ steps with the fq transformation applied to 'conv' only."""
  params = make_params()
  tx = make_tx()
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    grads = jax.grad(lambda p: loss_fn(fq.quantized(p, state)))(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for _ in range(steps):
    params, state = step(params, state)
  return params, state


def test_optax_masked_and_multi_transform_leave_masked_leaves_uncompressed():
  fq_tx = lambda: fq.focused_quantization(optax.sgd(0.05), bits=4, alpha_optimizer=None)
  labels = {"conv": {"kernel": "fq", "bias": "fq"}, "dense": {"kernel": "plain"}}
  only_conv = {"conv": {"kernel": True, "bias": True}, "dense": {"kernel": False}}
  masked_params, masked_state = _masked_fq_run(
    lambda: optax.chain(
      optax.masked(fq_tx(), only_conv),
      optax.masked(optax.sgd(0.05), {"conv": False, "dense": True}),
    )
  )
  multi_params, multi_state = _masked_fq_run(
    lambda: optax.multi_transform({"fq": fq_tx(), "plain": optax.sgd(0.05)}, labels)
  )
  # The oracle: the conv layer alone under FQ, the dense layer under plain SGD.
  conv_only = {"conv": make_params()["conv"]}
  tx = fq_tx()
  state = tx.init(conv_only)
  dense = make_params()["dense"]
  for _ in range(2):
    full_q = {**fq.quantized(conv_only, state), "dense": dense}
    grads = jax.grad(loss_fn)(full_q)
    updates, state = tx.update({"conv": grads["conv"]}, state, conv_only)
    conv_only = optax.apply_updates(conv_only, updates)
    dense = jax.tree.map(lambda w, g: w - 0.05 * g, dense, grads["dense"])

  for params, opt_state in ((masked_params, masked_state), (multi_params, multi_state)):
    fq_state = fq.find_state(opt_state)
    assert isinstance(fq_state.masks["dense"]["kernel"], optax.MaskedNode)
    q = fq.quantized(params, opt_state)
    np.testing.assert_array_equal(q["dense"]["kernel"], params["dense"]["kernel"])
    np.testing.assert_allclose(params["dense"]["kernel"], dense["kernel"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(params["conv"]["kernel"], conv_only["conv"]["kernel"], rtol=1e-5)
    np.testing.assert_array_equal(
      q["conv"]["kernel"], fq.quantized(conv_only, state)["conv"]["kernel"]
    )
    assert [r["path"] for r in fq.layer_report(params, opt_state)] == ["conv/kernel"]
    assert fq.quantized_fraction(opt_state) == 1.0
