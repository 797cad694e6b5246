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


def _initial_gmm(x, kept, split):
  """The paper's initialisation: moments of the negative and positive weights.

  `x` is standardised and `split` is where 0 of the original weights lies;
  when every kept weight has one sign the caller moves the split to the mean,
  so both components start populated. Mixing weights start at 1/2.
  """
  lower = kept & (x < split)
  upper = kept & ~lower

  def side(sel):
    n, m, v = _masked_moments(x, sel)
    # An empty side (all kept weights equal) starts on the overall mean.
    return jnp.where(n > 0, m, 0.0), jnp.sqrt(jnp.where(n > 0, v, 1.0) + _REL_VAR_FLOOR)

  m0, s0 = side(lower)
  m1, s1 = side(upper)
  return GMM(
    weights=jnp.array([0.5, 0.5], jnp.float32),
    means=jnp.stack([m0, m1]),
    stds=jnp.stack([s0, s1]),
  )


class _Stats(NamedTuple):
  """Sufficient statistics EM runs on: per point (or bin) count, sum, sum of squares.

  `point` is where responsibilities are evaluated (the value, or the bin's mean).
  """

  count: jax.Array
  total: jax.Array
  squares: jax.Array
  point: jax.Array


def _exact_stats(x, kept) -> _Stats:
  c = kept.astype(jnp.float32)
  return _Stats(c, c * x, c * x * x, x)


def _binned_stats(x, kept, num_bins) -> _Stats:
  """Histogram statistics: each bin keeps its exact count, sum and sum of squares.

  Only the responsibilities are approximated (evaluated at the bin's mean and
  shared by its members); with 2^16 bins across the kept range that changes
  the fit far below float32 EM noise, and makes EM cost one pass over the
  weights plus iterations over the bins.
  """
  lo = jnp.min(jnp.where(kept, x, jnp.inf))
  hi = jnp.max(jnp.where(kept, x, -jnp.inf))
  width = jnp.where(hi > lo, hi - lo, 1.0)
  idx = jnp.clip(((x - lo) / width * num_bins).astype(jnp.int32), 0, num_bins - 1)
  c = kept.astype(jnp.float32)
  # One scatter of (count, sum, sum of squares) rows: a single pass.
  sums = (
    jnp.zeros((num_bins, 3), jnp.float32).at[idx].add(jnp.stack([c, c * x, c * x * x], axis=-1))
  )
  count, total, squares = sums[:, 0], sums[:, 1], sums[:, 2]
  point = jnp.where(
    count > 0, total / jnp.maximum(count, 1.0), lo + (jnp.arange(num_bins) + 0.5) * width / num_bins
  )
  return _Stats(count, total, squares, point)


def _log_pdf_pair(gmm: GMM, x):
  """log(lambda_c N(x | mu_c, sigma_c)) for c = 0, 1, as two arrays shaped like x.

  Two explicit arrays instead of an (n, 2) array: XLA fuses the whole E-step
  into one pass this way.
  """

  def one(c):
    z = (x - gmm.means[c]) / gmm.stds[c]
    return (
      jnp.log(jnp.maximum(gmm.weights[c], _TINY))
      - 0.5 * z * z
      - jnp.log(gmm.stds[c])
      - _LOG_SQRT_2PI
    )

  return one(0), one(1)


def _log_sum_pair(a, b):
  hi = jnp.maximum(a, b)
  return hi + jnp.log1p(jnp.exp(-jnp.abs(a - b)))


def _mean_log_likelihood(gmm: GMM, x, kept):
  ll = _log_sum_pair(*_log_pdf_pair(gmm, x))
  n = jnp.maximum(jnp.sum(kept), 1)
  return jnp.sum(jnp.where(kept, ll, 0.0)) / n


def _em_step(gmm: GMM, stats: _Stats, floor):
  """One EM iteration on sufficient statistics; also scores `gmm` itself."""
  lp0, lp1 = _log_pdf_pair(gmm, stats.point)
  r1 = jax.nn.sigmoid(lp1 - lp0)
  r0 = 1.0 - r1
  n = jnp.maximum(jnp.sum(stats.count), 1.0)
  ll = jnp.sum(stats.count * _log_sum_pair(lp0, lp1)) / n

  def moments(r, mu_prev):
    nk = jnp.sum(r * stats.count)
    safe = jnp.maximum(nk, _TINY)
    mean = jnp.sum(r * stats.total) / safe
    # Second moment about the previous mean (not about 0): float32-safe since
    # the data are standardised and the means move little per step.
    d2 = stats.squares - 2 * mu_prev * stats.total + mu_prev**2 * stats.count
    var = jnp.maximum(jnp.sum(r * d2) / safe - (mean - mu_prev) ** 2, 0.0)
    return nk, mean, var

  n0, mu0, v0 = moments(r0, gmm.means[0])
  n1, mu1, v1 = moments(r1, gmm.means[1])
  nk = jnp.stack([n0, n1])
  # A collapsed component (no responsibility left) keeps its previous place.
  alive = nk > 1e-12
  new = GMM(
    weights=nk / jnp.maximum(jnp.sum(nk), _TINY),
    means=jnp.where(alive, jnp.stack([mu0, mu1]), gmm.means),
    stds=jnp.where(alive, jnp.sqrt(jnp.stack([v0, v1]) + floor), gmm.stds),
  )
  return new, ll


def fit_gmm(
  w: jax.Array,
  mask: jax.Array | None = None,
  *,
  num_iters: int = 200,
  tol: float = 1e-7,
  num_bins: int | None = 65536,
) -> GMM:
  """Fits a two-component 1-D Gaussian mixture by maximum likelihood (EM).

  Only the kept (unpruned) entries of `w` take part; the mixture is initialised
  as the paper prescribes (Sec. 3.3): mean and standard deviation of the
  negative weights for component 0, of the positive weights for component 1,
  mixing weights 1/2 each. The data are standardised before EM (the result is
  mapped back), which keeps float32 EM accurate for weights of any scale.
  Layers larger than `num_bins` run EM on a fine histogram of exact per-bin
  sums (see `_binned_stats`): one pass over the weights, then cheap iterations.

  Degenerate inputs (defined, never NaN):
    * non-finite entries of `w` are treated as pruned;
    * no kept entry: `GMM(weights=(.5, .5), means=(0, 0), stds=(1, 1))`;
    * all kept weights of one sign: the initial split is their mean instead
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
    num_bins: histogram size for large layers; None always runs exact EM.

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
    return _EMPTY_GMM()
  binned = bool(num_bins) and x.size > num_bins
  prepared = _prepare(x, kept, num_bins if binned else None)
  fitted = _run_em(prepared.init, prepared.stats, num_iters, tol)
  return _finish(fitted, prepared)


def fit_gmms(
  ws,
  masks=None,
  *,
  num_iters: int = 200,
  tol: float = 1e-7,
  num_bins: int = 65536,
) -> GMM:
  """Fits one mixture per layer, all layers in one batched EM.

  Every layer is reduced to a `num_bins` histogram of exact per-bin sums (one
  pass over its weights), the histograms are stacked, and EM runs vmapped over
  them: one compiled loop for a whole network instead of one per layer.

  Args:
    ws: a sequence of weight arrays (any shapes).
    masks: a sequence of keep-masks or Nones (default: all kept).
    num_iters: maximum EM iterations.
    tol: EM tolerance, as in `fit_gmm`.
    num_bins: histogram size.

  Returns:
    A `GMM` whose arrays have shape (len(ws), 2).

  Example:
    >>> import jax, jax.numpy as jnp, fq_jax as fq
    >>> ws = [jax.random.normal(jax.random.key(i), (100 * (i + 1),)) + i for i in range(3)]
    >>> fq.fit_gmms(ws).means.shape
    (3, 2)
  """
  masks = [None] * len(ws) if masks is None else list(masks)
  if not ws:
    raise ValueError("fit_gmms needs at least one layer")
  prepared = [_prepare(*_kept(w, m), num_bins) for w, m in zip(ws, masks)]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *prepared)
  fitted = jax.vmap(lambda init, stats: _run_em(init, stats, num_iters, tol))(
    stacked.init, stacked.stats
  )
  return jax.vmap(_finish)(fitted, stacked)


def _EMPTY_GMM() -> GMM:
  return GMM(
    weights=jnp.full((2,), 0.5, jnp.float32),
    means=jnp.zeros((2,), jnp.float32),
    stds=jnp.ones((2,), jnp.float32),
  )


class _Prepared(NamedTuple):
  init: GMM
  stats: _Stats
  n: jax.Array
  mean: jax.Array
  scale: jax.Array


def _prepare(x, kept, num_bins) -> _Prepared:
  """Standardises the kept weights and builds the initial mixture and EM statistics."""
  n, mean, var = _masked_moments(x, kept)
  scale = jnp.sqrt(var)
  safe_scale = jnp.where(scale > 0, scale, 1.0)
  xs = jnp.where(kept, (x - mean) / safe_scale, 0.0)
  two_signed = jnp.any(kept & (x < 0)) & jnp.any(kept & (x >= 0))
  split = jnp.where(two_signed, -mean / safe_scale, 0.0)
  stats = _binned_stats(xs, kept, num_bins) if num_bins else _exact_stats(xs, kept)
  return _Prepared(_initial_gmm(xs, kept, split), stats, n, mean, scale)


def _run_em(init: GMM, stats: _Stats, num_iters, tol) -> GMM:
  """EM until the gain of a step falls under `tol` (or `num_iters`).

  `_em_step` scores its input, so the loop stops one step after the gain
  falls under `tol`; EM never lowers the likelihood, so the last iterate is
  the best.
  """
  floor = jnp.float32(_REL_VAR_FLOOR)

  def cond(carry):
    i, _, ll, prev_ll = carry
    return (i < num_iters) & ((i < 2) | (ll - prev_ll > tol))

  def body(carry):
    i, gmm, ll, _ = carry
    new, gmm_ll = _em_step(gmm, stats, floor)
    return i + 1, new, gmm_ll, ll

  _, fitted, _, _ = jax.lax.while_loop(
    cond, body, (jnp.int32(0), init, -jnp.float32(jnp.inf), -jnp.float32(jnp.inf))
  )
  return fitted


def _finish(fitted: GMM, prepared: _Prepared) -> GMM:
  """Maps the standardised fit back to the weights' scale, negative component first."""
  scale, mean = prepared.scale, prepared.mean
  safe_scale = jnp.where(scale > 0, scale, 1.0)
  means = fitted.means * safe_scale + mean
  stds = fitted.stds * safe_scale
  stds = jnp.where(scale > 0, stds, jnp.sqrt(_REL_VAR_FLOOR) * jnp.maximum(jnp.abs(mean), 1e-12))
  order = jnp.argsort(means)
  result = GMM(weights=fitted.weights[order], means=means[order], stds=stds[order])
  return jax.tree.map(lambda a, b: jnp.where(prepared.n > 0, a, b), result, _EMPTY_GMM())


def gmm_log_likelihood(gmm: GMM, w: jax.Array, mask: jax.Array | None = None) -> jax.Array:
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
  lp0, lp1 = _log_pdf_pair(gmm, jnp.asarray(w, jnp.float32))
  return jax.nn.sigmoid(lp1 - lp0)


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
    3.96
  """
  if include_pruned:
    x, kept = _kept(w, None)
    if mask is not None:
      x = jnp.where(jnp.ravel(mask), x, 0.0)
  else:
    x, kept = _kept(w, mask)
  _, _, var = _masked_moments(x, kept)
  num = (gmm.means[..., 0] - gmm.means[..., 1]) ** 2 + (gmm.stds[..., 0] - gmm.stds[..., 1]) ** 2
  return jnp.where(var > 0, num / jnp.where(var > 0, var, 1.0), 0.0)
