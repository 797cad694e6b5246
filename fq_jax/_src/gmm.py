"""Two-component 1-D Gaussian mixtures fitted by EM (paper Eq. 3) and Eq. 4.

Everything here is a pure, jittable and vmappable function of arrays: the EM
loop is a `jax.lax.while_loop`, masks are arrays, and no value ever goes back to
the host. Parameters are computed and returned in float32 whatever the weights'
dtype (bfloat16 weights are upcast first).

Degenerate inputs get defined results instead of NaNs (documented in
`fit_gmm`): non-finite weights are treated as pruned, an empty layer gets the
standard-normal pair, a single-signed layer is split at its median, and every
standard deviation is floored.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)
# Relative variance floor, in units of the layer's variance: the same role as
# scikit-learn's `reg_covar`, but scale-free so tiny weight scales keep working.
_REL_VAR_FLOOR = 1e-6
_TINY = 1e-30


class GMM(NamedTuple):
  """A two-component 1-D Gaussian mixture; a pytree of float32 arrays.

  Attributes:
    weights: mixing weights lambda_c, shape (..., 2), summing to 1.
    means: component means mu_c, shape (..., 2); component 0 is the negative
      one (means[..., 0] <= means[..., 1]).
    stds: component standard deviations sigma_c > 0, shape (..., 2).
  """

  weights: jax.Array
  means: jax.Array
  stds: jax.Array


def _kept(w: jax.Array, mask: jax.Array | None) -> tuple[jax.Array, jax.Array]:
  """Flattens `w` to float32 and returns it with the mask of usable entries."""
  x = jnp.ravel(w).astype(jnp.float32)
  kept = jnp.ones(x.shape, bool) if mask is None else jnp.ravel(mask).astype(bool)
  kept = kept & jnp.isfinite(x)
  return jnp.where(kept, x, 0.0), kept


def _masked_moments(x, kept):
  n = jnp.sum(kept)
  safe_n = jnp.maximum(n, 1)
  mean = jnp.sum(jnp.where(kept, x, 0.0)) / safe_n
  var = jnp.sum(jnp.where(kept, (x - mean) ** 2, 0.0)) / safe_n
  return n, mean, var


def _component_log_pdf(x, means, stds):
  """log N(x | mu_c, sigma_c) for each component, shape (n, 2)."""
  z = (x[:, None] - means) / stds
  return -0.5 * z * z - jnp.log(stds) - _LOG_SQRT_2PI


def _log_joint(gmm: GMM, x):
  return jnp.log(jnp.maximum(gmm.weights, _TINY)) + _component_log_pdf(
      x, gmm.means, gmm.stds)


def _initial_gmm(x, kept, mean, var):
  """The paper's initialisation: moments of the negative and positive weights.

  When one side is empty (all kept weights of one sign) the split point moves
  from 0 to the median of the kept weights, so both components start populated.
  """
  n_neg = jnp.sum(kept & (x < 0))
  n_pos = jnp.sum(kept & (x >= 0))
  sorted_x = jnp.sort(jnp.where(kept, x, jnp.inf))
  n = jnp.sum(kept)
  median = sorted_x[jnp.maximum(n - 1, 0) // 2]
  two_signed = (n_neg > 0) & (n_pos > 0)
  # "<= median" keeps the lower half non-empty for a single-signed layer.
  lower = kept & jnp.where(two_signed, x < 0, x <= median)
  upper = kept & ~lower
  floor = _REL_VAR_FLOOR * var + _TINY

  def side(sel):
    _, m, v = _masked_moments(x, sel)
    has = jnp.sum(sel) > 0
    # An empty side (all kept weights equal) starts on the overall mean.
    return jnp.where(has, m, mean), jnp.sqrt(jnp.where(has, v, var) + floor)

  m0, s0 = side(lower)
  m1, s1 = side(upper)
  return GMM(
      weights=jnp.array([0.5, 0.5], jnp.float32),
      means=jnp.stack([m0, m1]),
      stds=jnp.stack([s0, s1]),
  )


def _log_pdf_pair(gmm: GMM, x):
  """log(lambda_c N(x | mu_c, sigma_c)) for c = 0, 1, as two arrays shaped like x.

  Two explicit arrays instead of an (n, 2) array: XLA fuses the whole E-step
  into one pass over the weights this way, which is what makes EM fast on
  multi-million-weight layers.
  """
  def one(c):
    z = (x - gmm.means[c]) / gmm.stds[c]
    return (jnp.log(jnp.maximum(gmm.weights[c], _TINY)) - 0.5 * z * z
            - jnp.log(gmm.stds[c]) - _LOG_SQRT_2PI)
  return one(0), one(1)


def _log_sum_pair(a, b):
  hi = jnp.maximum(a, b)
  return hi + jnp.log1p(jnp.exp(-jnp.abs(a - b)))


def _mean_log_likelihood(gmm: GMM, x, kept):
  ll = _log_sum_pair(*_log_pdf_pair(gmm, x))
  n = jnp.maximum(jnp.sum(kept), 1)
  return jnp.sum(jnp.where(kept, ll, 0.0)) / n


def _em_step(gmm: GMM, x, kept, floor):
  """One EM iteration; also returns the mean log-likelihood of `gmm` itself."""
  lp0, lp1 = _log_pdf_pair(gmm, x)
  r1 = jnp.where(kept, jax.nn.sigmoid(lp1 - lp0), 0.0)
  r0 = jnp.where(kept, 1.0 - r1, 0.0)
  n = jnp.maximum(jnp.sum(kept), 1)
  ll = jnp.sum(jnp.where(kept, _log_sum_pair(lp0, lp1), 0.0)) / n
  nk = jnp.stack([jnp.sum(r0), jnp.sum(r1)])
  safe_nk = jnp.maximum(nk, _TINY)
  means = jnp.stack([jnp.sum(r0 * x), jnp.sum(r1 * x)]) / safe_nk
  # Second moments about the previous means (not about 0): numerically safe
  # in float32 because the data are standardised and the means move little.
  d0, d1 = x - gmm.means[0], x - gmm.means[1]
  second = jnp.stack([jnp.sum(r0 * d0 * d0), jnp.sum(r1 * d1 * d1)]) / safe_nk
  var = jnp.maximum(second - (means - gmm.means) ** 2, 0.0)
  # A collapsed component (no responsibility left) keeps its previous place.
  alive = nk > 1e-12
  new = GMM(
      weights=nk / jnp.maximum(jnp.sum(nk), _TINY),
      means=jnp.where(alive, means, gmm.means),
      stds=jnp.where(alive, jnp.sqrt(var + floor), gmm.stds),
  )
  return new, ll


def fit_gmm(
    w: jax.Array,
    mask: jax.Array | None = None,
    *,
    num_iters: int = 200,
    tol: float = 1e-7,
) -> GMM:
  """Fits a two-component 1-D Gaussian mixture by maximum likelihood (EM).

  Only the kept (unpruned) entries of `w` take part; the mixture is initialised
  as the paper prescribes (Sec. 3.3): mean and standard deviation of the
  negative weights for component 0, of the positive weights for component 1,
  mixing weights 1/2 each. The data are standardised before EM (the result is
  mapped back), which keeps float32 EM accurate for weights of any scale.

  Degenerate inputs (defined, never NaN):
    * non-finite entries of `w` are treated as pruned;
    * no kept entry: `GMM(weights=(.5, .5), means=(0, 0), stds=(1, 1))`;
    * all kept weights of one sign: the initial split is the median instead
      of 0, so both components start populated;
    * one kept weight, or zero variance: both components sit on the value,
      with the standard deviation floor;
    * standard deviations are floored at sqrt(1e-6) times the layer's
      standard deviation (scikit-learn's `reg_covar`, made scale-free).

  Args:
    w: weights of any shape and float dtype.
    mask: optional boolean array of `w`'s shape, True where the weight is kept.
    num_iters: maximum number of EM iterations.
    tol: stop when the mean log-likelihood (of the standardised data) improves
      by less than this.

  Returns:
    A `GMM` of float32 arrays of shape (2,), component 0 the negative one.

  Example:
    >>> import jax, jax.numpy as jnp, fq_jax as fq
    >>> k1, k2 = jax.random.split(jax.random.key(0))
    >>> w = jnp.concatenate([jax.random.normal(k1, (500,)) * 0.1 - 1,
    ...                      jax.random.normal(k2, (500,)) * 0.1 + 1])
    >>> g = fq.fit_gmm(w)
    >>> [round(float(m), 1) for m in g.means]
    [-1.0, 1.0]
  """
  x, kept = _kept(w, mask)
  if x.size == 0:
    return GMM(weights=jnp.full((2,), 0.5, jnp.float32),
               means=jnp.zeros((2,), jnp.float32),
               stds=jnp.ones((2,), jnp.float32))
  n, mean, var = _masked_moments(x, kept)
  scale = jnp.sqrt(var)
  safe_scale = jnp.where(scale > 0, scale, 1.0)
  xs = jnp.where(kept, (x - mean) / safe_scale, 0.0)
  floor = jnp.float32(_REL_VAR_FLOOR)

  init = _initial_gmm(xs, kept, 0.0, jnp.float32(1.0))

  # carry: (iteration, params, params before, ll(before), ll(before before)).
  # `_em_step` scores its input, so the loop stops one step after the gain of
  # a step falls under `tol` and returns the better of the last two fits.
  def cond(carry):
    i, _, _, ll, prev_ll = carry
    return (i < num_iters) & ((i < 2) | (ll - prev_ll > tol))

  def body(carry):
    i, gmm, _, ll, _ = carry
    new, gmm_ll = _em_step(gmm, xs, kept, floor)
    return i + 1, new, gmm, gmm_ll, ll

  _, last, before, ll, prev_ll = jax.lax.while_loop(
      cond, body, (jnp.int32(0), init, init, -jnp.inf, -jnp.inf))
  del ll, prev_ll
  # EM never decreases the likelihood, so the last iterate is at least as good.
  fitted = last
  del before

  # Map back to the weights' scale, and order components (negative first).
  means = fitted.means * safe_scale + mean
  stds = fitted.stds * safe_scale
  stds = jnp.where(scale > 0, stds, jnp.sqrt(_REL_VAR_FLOOR) * jnp.maximum(jnp.abs(mean), 1e-12))
  order = jnp.argsort(means)
  result = GMM(weights=fitted.weights[order], means=means[order], stds=stds[order])
  empty = GMM(
      weights=jnp.full((2,), 0.5, jnp.float32),
      means=jnp.zeros((2,), jnp.float32),
      stds=jnp.ones((2,), jnp.float32),
  )
  return jax.tree.map(lambda a, b: jnp.where(n > 0, a, b), result, empty)


def gmm_log_likelihood(
    gmm: GMM, w: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Mean log-likelihood per kept weight of `w` under `gmm` (float32 scalar).

  Non-finite weights count as pruned; with no kept weight the result is 0.

  Example:
    >>> import jax.numpy as jnp, fq_jax as fq
    >>> g = fq.GMM(jnp.array([.5, .5]), jnp.array([-1., 1.]), jnp.array([1., 1.]))
    >>> round(float(fq.gmm_log_likelihood(g, jnp.zeros(3))), 4)
    -1.4189
  """
  x, kept = _kept(w, mask)
  return _mean_log_likelihood(gmm, x, kept)


def gmm_posterior(gmm: GMM, w: jax.Array) -> jax.Array:
  """p(m_w = + | w): posterior probability of the positive component, shaped like `w`."""
  x = jnp.ravel(w).astype(jnp.float32)
  log_joint = _log_joint(gmm, x)
  post = jax.nn.softmax(log_joint, axis=-1)[:, 1]
  return jnp.reshape(post, jnp.shape(w))


def wasserstein_separation(
    gmm: GMM,
    w: jax.Array,
    mask: jax.Array | None = None,
    *,
    include_pruned: bool = False,
) -> jax.Array:
  """Eq. 4: ((mu_1 - mu_2)^2 + (sigma_1 - sigma_2)^2) / sigma^2.

  sigma^2 is the variance of the layer's weights. PAPER.md leaves open whether
  the pruned zeros belong to that distribution; by default they do not
  (`include_pruned=False`), so the measure describes the weights being
  quantized and does not drift with the sparsity. A layer with zero variance
  has separation 0 (it is then shift-quantized).

  Args:
    gmm: the layer's fitted mixture.
    w: the layer's weights.
    mask: optional boolean keep-mask of `w`'s shape.
    include_pruned: also count the pruned entries (as zeros) in sigma^2.

  Returns:
    float32 scalar.

  Example:
    >>> import jax.numpy as jnp, fq_jax as fq
    >>> g = fq.GMM(jnp.array([.5, .5]), jnp.array([-1., 1.]), jnp.array([.1, .1]))
    >>> w = jnp.array([-1.1, -0.9, 0.9, 1.1])
    >>> round(float(fq.wasserstein_separation(g, w)), 3)
    3.941
  """
  if include_pruned:
    x, kept = _kept(w, None)
    if mask is not None:
      x = jnp.where(jnp.ravel(mask), x, 0.0)
  else:
    x, kept = _kept(w, mask)
  _, _, var = _masked_moments(x, kept)
  num = (gmm.means[..., 0] - gmm.means[..., 1]) ** 2 + (
      gmm.stds[..., 0] - gmm.stds[..., 1]) ** 2
  return jnp.where(var > 0, num / jnp.where(var > 0, var, 1.0), 0.0)
