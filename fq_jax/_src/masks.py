"""Sparsity masks over parameter trees: magnitude pruning and DNS (Guo et al. 2016).

A mask tree has the structure of the parameters; a compressed leaf's mask is a
bool array (True = kept) and a leaf left dense has None, as in `optax.masked`.
All functions are pure and jittable (the rules are resolved statically).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp

from fq_jax._src import rules as rules_lib

# DNS hysteresis around the threshold t (Guo et al. 2016): prune below 0.9 t,
# splice back above 1.1 t, keep the current state in between.
PRUNE_FACTOR = 0.9
SPLICE_FACTOR = 1.1


def _is_spec_leaf(x) -> bool:
  return x is None or isinstance(x, rules_lib.LayerSpec)


def map_specs(fn, specs, *trees):
  """Maps fn(spec, *leaves) over the compressed leaves; None elsewhere."""
  return jax.tree.map(
    lambda s, *xs: None if s is None else fn(s, *xs), specs, *trees, is_leaf=_is_spec_leaf
  )


def _prune_smallest(w: jax.Array, num_pruned) -> jax.Array:
  """Keep-mask that prunes exactly `num_pruned` smallest-magnitude entries.

  Ties are broken by position (a stable sort), so the count is exact.
  """
  a = jnp.abs(jnp.ravel(w).astype(jnp.float32))
  a = jnp.where(jnp.isnan(a), jnp.inf, a)  # never prune a NaN silently away
  order = jnp.argsort(a, stable=True)
  rank = jnp.zeros_like(order).at[order].set(jnp.arange(a.size, dtype=order.dtype))
  return jnp.reshape(rank >= num_pruned, jnp.shape(w))


def magnitude_mask(w: jax.Array, sparsity: float) -> jax.Array:
  """Keeps the largest-magnitude entries: exactly round(sparsity * size) pruned."""
  return _prune_smallest(w, round(sparsity * w.size))


def magnitude_masks(
  params,
  sparsity: float,
  *,
  rules: Sequence[rules_lib.Rule] = rules_lib.DEFAULT_RULES,
  scope: Literal["layer", "global"] = "layer",
) -> Any:
  """Magnitude-pruning masks for every compressed leaf of `params`.

  Args:
    params: parameter tree.
    sparsity: target fraction of pruned weights in [0, 1); a rule's own
      `sparsity` overrides it for the leaves it matches.
    rules: selection rules (see `fq.Rule`); leaves with `prune=False` get an
      all-True mask if quantized, None if left dense.
    scope: "layer" prunes each leaf to its target; "global" ranks all leaves
      that follow the global target together (one magnitude threshold, so
      per-layer sparsities differ while the total matches), leaves with their
      own rule sparsity still pruned per layer.

  Returns:
    A tree of bool masks (None for dense leaves).

  Example:
    >>> import jax.numpy as jnp, fq_jax as fq
    >>> params = {"dense": {"kernel": jnp.arange(8.).reshape(2, 4), "bias": jnp.ones(4)}}
    >>> masks = fq.magnitude_masks(params, 0.5)
    >>> masks["dense"]["bias"] is None, int(masks["dense"]["kernel"].sum())
    (True, 4)
  """
  specs = rules_lib.resolve(params, rules, sparsity=sparsity)
  if scope == "layer":
    return map_specs(
      lambda s, w: magnitude_mask(w, s.sparsity) if s.prune else jnp.ones(w.shape, bool),
      specs,
      params,
    )
  if scope != "global":
    raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
  leaves, treedef = jax.tree.flatten(specs, is_leaf=_is_spec_leaf)
  values = treedef.flatten_up_to(params)
  pooled = [i for i, s in enumerate(leaves) if s is not None and s.prune and s.sparsity == sparsity]
  out = [None] * len(leaves)
  if pooled:
    flat = jnp.concatenate([jnp.ravel(values[i]) for i in pooled])
    joint = _prune_smallest(flat, round(sparsity * flat.size))
    start = 0
    for i in pooled:
      size = values[i].size
      out[i] = jnp.reshape(joint[start : start + size], values[i].shape)
      start += size
  for i, s in enumerate(leaves):
    if s is not None and out[i] is None:
      out[i] = magnitude_mask(values[i], s.sparsity) if s.prune else jnp.ones(values[i].shape, bool)
  return treedef.unflatten(out)


def dns_threshold(
  w: jax.Array, *, sensitivity: float | None = None, sparsity: float | None = None
) -> jax.Array:
  """The DNS threshold t of one layer.

  Either t = mean|W| + sensitivity * std|W| (Guo et al.'s rule, over all the
  layer's float weights, pruned ones included, since DNS keeps them), or, given
  a target `sparsity`, the magnitude below which that fraction of the weights
  lies (the sensitivity that reaches the target, solved exactly).
  """
  a = jnp.abs(jnp.ravel(w).astype(jnp.float32))
  if (sensitivity is None) == (sparsity is None):
    raise ValueError("give exactly one of sensitivity= and sparsity=")
  if sensitivity is not None:
    return jnp.mean(a) + sensitivity * jnp.std(a)
  if a.size == 0 or sparsity == 0:
    return jnp.float32(0.0)
  index = min(max(round(sparsity * a.size) - 1, 0), a.size - 1)
  return jnp.sort(a)[index]


def dns_mask(w: jax.Array, mask: jax.Array, threshold) -> jax.Array:
  """DNS hysteresis: prune if |w| < 0.9 t, splice back if |w| > 1.1 t, else keep."""
  a = jnp.abs(w.astype(jnp.float32))
  return jnp.where(
    a < PRUNE_FACTOR * threshold, False, jnp.where(a > SPLICE_FACTOR * threshold, True, mask)
  )


def dns_masks(
  params,
  masks,
  *,
  sensitivity: float | None = None,
  sparsity: float | None = None,
  rules: Sequence[rules_lib.Rule] = rules_lib.DEFAULT_RULES,
) -> Any:
  """One Dynamic Network Surgery mask update for every compressed leaf.

  Args:
    params: current float parameters (pruned entries keep their float values).
    masks: current mask tree (None for dense leaves), e.g. from
      `magnitude_masks` or all-True.
    sensitivity: DNS's `a` in t = mean|W| + a * std|W|, the same for all
      layers; or
    sparsity: a target sparsity; per leaf, t is set where that fraction of
      the weights lies below it (rule sparsities override), so the masks move
      towards the target while the hysteresis keeps them stable.
    rules: selection rules.

  Returns:
    The new mask tree.

  Example:
    >>> import jax.numpy as jnp, fq_jax as fq
    >>> params = {"kernel": jnp.array([[0.1, 0.5, 0.95, 1.05, 2.0]])}
    >>> old = {"kernel": jnp.array([[True, True, False, True, False]])}
    >>> fq.dns_masks(params, old, sensitivity=0.0)["kernel"]  # t = mean = 0.92
    Array([[False, False, False,  True,  True]], dtype=bool)
  """
  specs = rules_lib.resolve(params, rules, sparsity=sparsity or 0.0)

  def one(spec, w, m):
    if not spec.prune:
      return m
    if sensitivity is not None:
      t = dns_threshold(w, sensitivity=sensitivity)
    else:
      t = dns_threshold(w, sparsity=spec.sparsity)
    return dns_mask(w, m, t)

  return map_specs(one, specs, params, masks)


def apply_masks(params, masks):
  """Zeroes pruned entries: w * mask on masked leaves, identity elsewhere."""
  return jax.tree.map(
    lambda m, w: w if m is None else jnp.where(m, w, jnp.zeros_like(w)),
    masks,
    params,
    is_leaf=lambda x: x is None,
  )


def sparsity_of(masks) -> float:
  """Fraction of pruned entries over all masked leaves (host float)."""
  leaves = [m for m in jax.tree.leaves(masks) if m is not None]
  total = sum(m.size for m in leaves)
  kept = sum(int(jnp.sum(m)) for m in leaves)
  return 0.0 if total == 0 else 1.0 - kept / total
