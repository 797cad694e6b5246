"""DNS reaches the sparsity it is asked for, keeps its hysteresis band, and the sensitivity form.

Oracles: the requested sparsity itself (fixed points from all kept and from all pruned), the
hysteresis rule restated in NumPy (prune |w| < 0.9 t, splice |w| > 1.1 t, keep in between),
Guo et al.'s t = mean|W| + a * std|W| computed in NumPy, and band-free magnitude pruning as
the flicker baseline.
"""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fq_jax as fq

try:
  from _shared_data import RESNET20_NPZ, require_shared
except ImportError:  # tests/ imported as a package
  from tests._shared_data import RESNET20_NPZ, require_shared

SPARSITIES = (0.5, 0.7, 0.827)
TOL = 0.005  # the 0.5 percentage points


def fixed_point(w, start: bool, sparsity: float, max_iters: int = 10):
  """Iterates the mask update with the weights fixed; returns (mask, iterations)."""
  params, m = {"kernel": w}, {"kernel": jnp.full(w.shape, start)}
  for i in range(max_iters):
    new = fq.dns_masks(params, m, sparsity=sparsity)
    if bool(jnp.array_equal(new["kernel"], m["kernel"])):
      return np.asarray(m["kernel"]), i
    m = new
  raise AssertionError(f"no fixed point within {max_iters} updates")


def check_reaches_target(w):
  for s in SPARSITIES:
    for start in (True, False):
      m, iters = fixed_point(w, start, s)
      reached = 1.0 - m.mean()
      assert abs(reached - s) <= TOL, (s, start, reached)
      assert iters <= 2  # settles at once: no flicker under fixed weights
      # Iterating twice more changes nothing.
      again = {"kernel": jnp.asarray(m)}
      for _ in range(2):
        again = fq.dns_masks({"kernel": w}, again, sparsity=s)
      np.testing.assert_array_equal(np.asarray(again["kernel"]), m)


@pytest.mark.parametrize("dist", ["gaussian", "laplace"])
def test_fixed_point_reaches_target_synthetic(dist):
  rng = np.random.default_rng(0)
  draw = rng.normal if dist == "gaussian" else rng.laplace
  check_reaches_target(jnp.asarray(draw(size=(3, 3, 32, 32)) * 0.05, jnp.float32))


def test_fixed_point_reaches_target_resnet20_layers():
  weights = np.load(require_shared(RESNET20_NPZ))
  # The smallest, a middle and the largest convolution.
  for key in ("conv1.weight", "layer2.0.conv2.weight", "layer3.2.conv2.weight"):
    check_reaches_target(jnp.asarray(weights[key]))


def test_weight_inside_band_keeps_its_state_hand_built():
  # 10 weights, 30% target: 3 pruned. 3.0 is kept and 3.5 pruned; both sit inside the
  # band around the t that prunes 3 (t = 3.5 / 1.1: 0.9 t = 2.86, 1.1 t = 3.5), so each
  # keeps its state, where band-free magnitude pruning would swap them.
  w = jnp.array([1.0, 2.0, 3.0, 3.5, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0])
  old = jnp.array([True, True, True, False, True, True, True, True, True, True])
  new = np.asarray(fq.dns_target_mask(w, old, 0.3))
  np.testing.assert_array_equal(new, [False, False, True, False] + [True] * 6)
  np.testing.assert_array_equal(np.asarray(fq.magnitude_mask(w, 0.3))[2:4], [False, True])
  np.testing.assert_allclose(float(fq.dns_threshold(w, sparsity=0.3, mask=old)), 3.5 / 1.1)
  # Splice back: the same pruned weight grown past 1.1 t returns (and another goes).
  grown = np.asarray(fq.dns_target_mask(w.at[3].set(4.0), old, 0.3))
  np.testing.assert_array_equal(grown, [False, False, False, True] + [True] * 6)


@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_update_is_the_hysteresis_rule_at_its_threshold(sparsity):
  rng = np.random.default_rng(1)
  w = jnp.asarray(rng.normal(size=(48, 48)), jnp.float32)
  old = rng.random((48, 48)) < 0.5  # a random current mask: many weights in the band
  new = np.asarray(fq.dns_target_mask(w, jnp.asarray(old), sparsity))
  assert (~new).sum() == round(sparsity * w.size)  # exactly the target
  t = float(fq.dns_threshold(w, sparsity=sparsity, mask=jnp.asarray(old)))
  a = np.abs(np.asarray(w, np.float64))
  # The NumPy rule at t, away from the single weight whose switch point is t itself.
  at_t = np.isclose(np.where(old, a / 0.9, a / 1.1), t, rtol=1e-6)
  assert at_t.sum() <= 1
  expected = np.where(a < 0.9 * t, False, np.where(a > 1.1 * t, True, old))
  np.testing.assert_array_equal(new[~at_t], expected[~at_t])
  inside = (a > 0.9 * t) & (a < 1.1 * t) & ~at_t
  assert inside.sum() > 50 and (~old[inside]).any() and old[inside].any()
  np.testing.assert_array_equal(new[inside], old[inside])


def test_band_damps_flicker_under_noisy_training():
  # Weights drift by small noise each step; count mask flips per update. The band keeps
  # the flips far below band-free magnitude pruning at the same exact sparsity.
  rng = np.random.default_rng(2)
  w = rng.normal(size=4096).astype(np.float32)
  dns = fq.magnitude_mask(jnp.asarray(w), 0.7)
  mag = dns
  flips_dns = flips_mag = 0
  for _ in range(20):
    w = w + 0.02 * rng.normal(size=w.size).astype(np.float32)
    new_dns = fq.dns_target_mask(jnp.asarray(w), dns, 0.7)
    new_mag = fq.magnitude_mask(jnp.asarray(w), 0.7)
    flips_dns += int(jnp.sum(new_dns != dns))
    flips_mag += int(jnp.sum(new_mag != mag))
    dns, mag = new_dns, new_mag
    assert int(jnp.sum(~dns)) == round(0.7 * w.size)
  assert flips_mag > 100
  assert flips_dns * 4 < flips_mag, (flips_dns, flips_mag)


def params_tree():
  rng = np.random.default_rng(3)
  return {
    "small": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 3, 8)), jnp.float32)},
    "big": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 32, 32)) * 0.2, jnp.float32)},
    "head": {"kernel": jnp.asarray(rng.laplace(size=(32, 10)) * 0.3, jnp.float32)},
  }


def test_sensitivity_per_rule_uses_mean_plus_a_std():
  params = params_tree()
  rules = (fq.Rule(pattern="head", sensitivity=0.5), *fq.DEFAULT_RULES)
  specs = fq.resolve(params, rules, sparsity=0.6)
  assert specs["head"]["kernel"].sensitivity == 0.5
  assert specs["big"]["kernel"].sensitivity is None
  ones = fq.magnitude_masks(params, 0.0)
  old = {**ones, "head": {"kernel": jnp.asarray(np.random.default_rng(4).random((32, 10)) < 0.5)}}
  new = fq.dns_masks(params, old, sparsity=0.6, rules=rules)
  a = np.abs(np.asarray(params["head"]["kernel"], np.float64))
  t = a.mean() + 0.5 * a.std()
  expected = np.where(
    a < 0.9 * t, False, np.where(a > 1.1 * t, True, np.asarray(old["head"]["kernel"]))
  )
  np.testing.assert_array_equal(np.asarray(new["head"]["kernel"]), expected)
  for name in ("small", "big"):
    m = np.asarray(new[name]["kernel"])
    assert (~m).sum() == round(0.6 * m.size)
  # A global sensitivity applies to every leaf without its own rule setting.
  rules = (fq.Rule(pattern="small", sparsity=0.25), *fq.DEFAULT_RULES)
  new = fq.dns_masks(params, ones, sensitivity=1.0, rules=rules)
  assert (~np.asarray(new["small"]["kernel"])).sum() == round(0.25 * 216)
  a = np.abs(np.asarray(params["big"]["kernel"], np.float64))
  np.testing.assert_array_equal(np.asarray(new["big"]["kernel"]), a >= 0.9 * (a.mean() + a.std()))


def test_sensitivity_validation():
  with pytest.raises(ValueError, match="not both"):
    fq.Rule(pattern="x", sparsity=0.5, sensitivity=0.5)
  with pytest.raises(ValueError, match="sensitivity"):
    fq.Rule(pattern="x", sensitivity=float("nan"))
  with pytest.raises(ValueError, match="at most one"):
    fq.dns_masks(
      params_tree(), fq.magnitude_masks(params_tree(), 0.0), sparsity=0.5, sensitivity=0.1
    )
  with pytest.raises(ValueError, match="global"):
    fq.dns_pruning(optax.sgd(0.1), sensitivity=0.5, scope="global")


def test_global_scope_one_threshold_spares_small_layers():
  params = params_tree()
  ones = fq.magnitude_masks(params, 0.0)
  for start in (ones, fq.magnitude_masks(params, 0.999)):
    m = fq.dns_masks(params, start, sparsity=0.7, scope="global")
    m = fq.dns_masks(params, m, sparsity=0.7, scope="global")
    # The fixed point is global magnitude pruning: one threshold, exact total.
    expected = fq.magnitude_masks(params, 0.7, scope="global")
    for name in params:
      np.testing.assert_array_equal(
        np.asarray(m[name]["kernel"]), np.asarray(expected[name]["kernel"])
      )
  rep = fq.sparsity_report(params, m, sparsity=0.7, scope="global")
  reached = {r["path"]: r["reached"] for r in rep["layers"]}
  assert abs(rep["total"]["reached"] - 0.7) < 1e-3 and rep["total"]["requested"] == 0.7
  # The small layer with large weights is pruned less than the big one.
  assert reached["small/kernel"] < 0.3 < 0.7 < reached["big/kernel"]
  assert {r["mode"] for r in rep["layers"]} == {"global"}


def test_sparsity_report_rows():
  params = params_tree()
  rules = (
    fq.Rule(pattern="small", prune=False),
    fq.Rule(pattern="head", sensitivity=0.0),
    *fq.DEFAULT_RULES,
  )
  masks = fq.dns_masks(
    params, fq.magnitude_masks(params, 0.0, rules=rules), sparsity=0.6, rules=rules
  )
  rep = fq.sparsity_report(params, masks, sparsity=0.6, rules=rules)
  rows = {r["path"]: r for r in rep["layers"]}
  assert rows["small/kernel"]["mode"] == "unpruned" and rows["small/kernel"]["reached"] == 0.0
  assert rows["big/kernel"]["mode"] == "layer" and rows["big/kernel"]["requested"] == 0.6
  assert rows["head/kernel"]["mode"] == "sensitivity" and rows["head/kernel"]["requested"] is None
  for path, r in rows.items():
    m = np.asarray(masks[path.split("/")[0]]["kernel"])
    assert r["size"] == m.size and r["pruned"] == (~m).sum()
    assert r["reached"] == pytest.approx((~m).mean())
  assert rep["total"]["requested"] is None
  assert rep["total"]["pruned"] == sum(r["pruned"] for r in rows.values())


def test_dns_pruning_holds_target_every_update():
  params = params_tree()
  tx = fq.dns_pruning(optax.sgd(0.05), sparsity=0.6, scope="global")
  state = tx.init(params)
  grads = {k: {"kernel": jnp.ones_like(v["kernel"])} for k, v in params.items()}
  for _ in range(3):
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    assert abs(fq.sparsity_of(state.masks) - 0.6) < 1e-3
