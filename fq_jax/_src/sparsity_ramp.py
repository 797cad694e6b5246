"""Gradual sparsity ramps for DNS pruning (pure, jittable).

Zhu and Gupta (2017) raise sparsity from s_i to the target s_f over T updates
as s_t = s_f + (s_i - s_f) (1 - t / T)^3: fast at first, while the network has
redundant weights, then slower. `fq.dns_pruning(sparsity_schedule=cubic(T))`
applies it (as a fraction of each layer's target) on top of DNS's hysteresis
thresholds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from fq_jax._src import masks as masks_lib
from fq_jax._src import rules as rules_lib


def cubic(ramp_steps: int) -> Callable[[jax.Array], jax.Array]:
  """Zhu and Gupta's (2017) gradual pruning schedule as a fraction of the target.

  s_t = s_f + (s_i - s_f) (1 - t / T)^3 with s_i = 0 is s_f times
  1 - (1 - t / T)^3: this returns that factor, 1 from t = T on.

  Args:
    ramp_steps: T, the updates over which sparsity rises to the target (0:
      the target at once).

  Returns:
    A pure jittable `fraction(count)`.
  """

  def fraction(count):
    if ramp_steps <= 0:
      return jnp.ones([], jnp.float32)
    t = jnp.clip(jnp.asarray(count, jnp.float32) / ramp_steps, 0.0, 1.0)
    return 1.0 - (1.0 - t) ** 3

  return fraction


def ramped_dns_masks(
  params, masks, sparsity: float, rules: Sequence[rules_lib.Rule], fraction: jax.Array
):
  """`dns_masks` (scope "layer") at `fraction` of each leaf's target sparsity.

  Args:
    params: current float parameters.
    masks: current mask tree.
    sparsity: the global target (rules may override per leaf).
    rules: selection rules.
    fraction: multiplier of every target, a traced scalar in [0, 1].

  Returns:
    The new mask tree: each ramped leaf has round(fraction * round(target *
    size)) weights pruned (so fraction 1 is exactly `dns_target_mask`), chosen
    with DNS's hysteresis band; leaves in sensitivity mode are updated as by
    `dns_masks`.
  """
  specs = rules_lib.resolve(params, rules, sparsity=sparsity)

  def leaf(spec, w, m):
    if not spec.prune or spec.sensitivity is not None:
      return masks_lib._dns_leaf(spec, w, m)
    # Same count as `dns_target_mask` at fraction 1: round(target * size).
    k = jnp.round(fraction * round(spec.sparsity * w.size)).astype(jnp.int32)
    return masks_lib._prune_smallest(masks_lib._switch_points(w, m), k)

  return masks_lib.map_specs(leaf, specs, params, masks)
