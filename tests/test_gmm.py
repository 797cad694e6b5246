"""fit_gmm against scikit-learn's GaussianMixture, and its degenerate cases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import shared_path
from sklearn.mixture import GaussianMixture

import fq_jax as fq


def sklearn_ll(x):
  """Best log-likelihood scikit-learn reaches (tight tolerance, several inits)."""
  gm = GaussianMixture(2, tol=1e-9, max_iter=1000, reg_covar=1e-12, random_state=0).fit(
    np.asarray(x, np.float64)[:, None]
  )
  return gm.score(np.asarray(x, np.float64)[:, None])


def ours_ll(x, mask=None):
  g = jax.jit(fq.fit_gmm)(jnp.asarray(x), mask)
  return float(fq.gmm_log_likelihood(g, jnp.asarray(x), mask)), g


@pytest.mark.parametrize("kind", ["bimodal", "unimodal", "skewed"])
def test_matches_sklearn_log_likelihood(kind):
  rng = np.random.default_rng(1)
  x = {
    "bimodal": np.concatenate([rng.normal(-0.05, 0.01, 3000), rng.normal(0.03, 0.02, 2000)]),
    "unimodal": rng.normal(0, 0.02, 5000),
    "skewed": rng.gamma(2.0, 0.01, 4000) - 0.01,
  }[kind].astype(np.float32)
  ours, g = ours_ll(x)
  assert ours >= sklearn_ll(x) - 1e-3
  assert g.means[0] <= g.means[1]
  np.testing.assert_allclose(float(jnp.sum(g.weights)), 1.0, rtol=1e-6)


def test_real_resnet20_weights_after_magnitude_pruning():
  weights = np.load(shared_path("models/resnet20-cifar10.npz"))
  layers = [k for k in weights.files if k.endswith("conv1.weight") or k.endswith("conv2.weight")]
  assert layers
  for name in layers[::4]:
    w = weights[name].astype(np.float32)
    mask = np.asarray(fq.magnitude_mask(jnp.asarray(w), 0.7))
    ours, _ = ours_ll(w, jnp.asarray(mask))
    assert ours >= sklearn_ll(w[mask]) - 1e-3, name


def test_mask_is_equivalent_to_selecting():
  rng = np.random.default_rng(2)
  w = rng.normal(0, 1, (40, 50)).astype(np.float32)
  mask = rng.random(w.shape) > 0.6
  g_masked = fq.fit_gmm(jnp.asarray(w), jnp.asarray(mask))
  g_selected = fq.fit_gmm(jnp.asarray(w[mask]))
  # Same optimum (EM on a unimodal sample is flat there, so compare likelihoods).
  np.testing.assert_allclose(
    fq.gmm_log_likelihood(g_masked, jnp.asarray(w[mask])),
    fq.gmm_log_likelihood(g_selected, jnp.asarray(w[mask])),
    atol=1e-5,
  )


def test_paper_initialisation_recovers_separated_components():
  rng = np.random.default_rng(3)
  x = np.concatenate([rng.normal(-1, 0.1, 700), rng.normal(2, 0.3, 300)]).astype(np.float32)
  g = fq.fit_gmm(jnp.asarray(x))
  np.testing.assert_allclose(g.means, [-1, 2], atol=0.03)
  np.testing.assert_allclose(g.stds, [0.1, 0.3], atol=0.02)
  np.testing.assert_allclose(g.weights, [0.7, 0.3], atol=0.01)


def test_vmap_over_stacked_layers_matches_one_by_one():
  rng = np.random.default_rng(4)
  w = rng.normal(0, 1, (3, 500)).astype(np.float32) + np.array([[0.0], [1.0], [-2.0]], np.float32)
  mask = rng.random(w.shape) > 0.3
  stacked = jax.vmap(fq.fit_gmm)(jnp.asarray(w), jnp.asarray(mask))
  for i in range(3):
    single = fq.fit_gmm(jnp.asarray(w[i]), jnp.asarray(mask[i]))
    for a, b in zip(stacked, single):
      np.testing.assert_allclose(a[i], b, rtol=1e-5, atol=1e-6)


def test_bfloat16_weights():
  rng = np.random.default_rng(5)
  w = rng.normal(0, 0.05, 2000).astype(np.float32)
  g32 = fq.fit_gmm(jnp.asarray(w))
  g16 = fq.fit_gmm(jnp.asarray(w, jnp.bfloat16))
  assert g16.means.dtype == jnp.float32
  np.testing.assert_allclose(g16.means, g32.means, atol=2e-3)


@pytest.mark.parametrize(
  "w, mask",
  [
    (np.zeros(0, np.float32), None),  # empty
    (np.zeros(10, np.float32), np.zeros(10, bool)),  # all pruned
    (np.array([0.3], np.float32), None),  # one kept weight
    (np.full(20, 0.5, np.float32), None),  # zero variance
    (np.zeros(20, np.float32), None),  # all zeros
    (np.abs(np.random.default_rng(6).normal(size=100)).astype(np.float32), None),  # one sign
    (np.array([1.0, np.nan, -1.0, np.inf, 0.5], np.float32), None),  # non-finite
  ],
)
def test_degenerate_inputs_are_finite_and_defined(w, mask):
  g = jax.jit(fq.fit_gmm)(jnp.asarray(w), None if mask is None else jnp.asarray(mask))
  for field in g:
    assert np.all(np.isfinite(field)), g
  assert np.all(np.asarray(g.stds) > 0)
  np.testing.assert_allclose(float(jnp.sum(g.weights)), 1.0, rtol=1e-5)
  ll = fq.gmm_log_likelihood(g, jnp.asarray(w), None if mask is None else jnp.asarray(mask))
  assert np.isfinite(float(ll))
  sep = fq.wasserstein_separation(g, jnp.asarray(w), None if mask is None else jnp.asarray(mask))
  assert np.isfinite(float(sep))


def test_empty_layer_result_is_documented_pair():
  g = fq.fit_gmm(jnp.zeros(5), jnp.zeros(5, bool))
  np.testing.assert_array_equal(g.means, [0, 0])
  np.testing.assert_array_equal(g.stds, [1, 1])
  np.testing.assert_array_equal(g.weights, [0.5, 0.5])


def test_non_finite_weights_are_ignored_like_pruned_ones():
  w = np.array([-1.0, -1.2, np.nan, 0.9, 1.1, np.inf], np.float32)
  a = fq.fit_gmm(jnp.asarray(w))
  b = fq.fit_gmm(jnp.asarray(w[np.isfinite(w)]))
  for x, y in zip(a, b):
    np.testing.assert_allclose(x, y, rtol=1e-6)


def test_wasserstein_separation_is_eq4():
  rng = np.random.default_rng(7)
  w = rng.normal(0, 1, 1000).astype(np.float32)
  mask = rng.random(1000) > 0.5
  g = fq.GMM(jnp.array([0.4, 0.6]), jnp.array([-0.7, 0.9]), jnp.array([0.3, 0.5]))
  expected = ((-0.7 - 0.9) ** 2 + (0.3 - 0.5) ** 2) / np.var(w[mask].astype(np.float64))
  np.testing.assert_allclose(
    fq.wasserstein_separation(g, jnp.asarray(w), jnp.asarray(mask)), expected, rtol=1e-5
  )
  with_zeros = np.where(mask, w, 0).astype(np.float64)
  np.testing.assert_allclose(
    fq.wasserstein_separation(g, jnp.asarray(w), jnp.asarray(mask), include_pruned=True),
    ((-0.7 - 0.9) ** 2 + (0.3 - 0.5) ** 2) / np.var(with_zeros),
    rtol=1e-5,
  )


def test_log_likelihood_matches_scipy_formula():
  from scipy.stats import norm

  g = fq.GMM(jnp.array([0.3, 0.7]), jnp.array([-1.0, 0.5]), jnp.array([0.4, 0.8]))
  x = np.linspace(-3, 3, 101).astype(np.float32)
  expected = np.mean(np.log(0.3 * norm.pdf(x, -1, 0.4) + 0.7 * norm.pdf(x, 0.5, 0.8)))
  np.testing.assert_allclose(fq.gmm_log_likelihood(g, jnp.asarray(x)), expected, rtol=1e-5)
