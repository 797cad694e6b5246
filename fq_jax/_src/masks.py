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


def _pooled_prune(values: Sequence[jax.Array], sparsity: float) -> list[jax.Array]:
  """Keep-masks that prune the round(sparsity * total) smallest entries of all arrays together."""
  flat = jnp.concatenate([jnp.ravel(v) for v in values])
  joint = _prune_smallest(flat, round(sparsity * flat.size))
  out, start = [], 0
  for v in values:
    out.append(jnp.reshape(joint[start : start + v.size], v.shape))
    start += v.size
  return out


def _pooled_indices(leaves, sparsity: float) -> list[int]:
  """Leaves that follow the global target: pruned, no own sensitivity, the global sparsity."""
  return [
    i
    for i, s in enumerate(leaves)
    if s is not None and s.prune and s.sensitivity is None and s.sparsity == sparsity
  ]


def _check_scope(scope):
  if scope not in ("layer", "global"):
    raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")


def magnitude_mask(w: jax.Array, sparsity: float) -> jax.Array:
  """Keeps the largest-magnitude entries: exactly round(sparsity * size) pruned."""
  return _prune_smallest(w, round(sparsity * w.size))


def _magnitude_leaf(spec: rules_lib.LayerSpec, w: jax.Array) -> jax.Array:
  if not spec.prune:
    return jnp.ones(w.shape, bool)
  if spec.sensitivity is not None:
    return jnp.abs(w.astype(jnp.float32)) >= dns_threshold(w, sensitivity=spec.sensitivity)
  return magnitude_mask(w, spec.sparsity)


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
      `sparsity` overrides it for the leaves it matches, and a rule's
      `sensitivity` a prunes its leaves below t = mean|W| + a * std|W| instead.
    rules: selection rules (see `fq.Rule`); leaves with `prune=False` get an
      all-True mask if quantized, None if left dense.
    scope: "layer" prunes each leaf to its target; "global" ranks all leaves
      that follow the global target together (one magnitude threshold, so
      per-layer sparsities differ while the total matches), leaves with their
      own rule sparsity or sensitivity still pruned per layer.

  Returns:
    A tree of bool masks (None for dense leaves).

  Example:
    >>> import jax.numpy as jnp, fq_jax as fq
    >>> params = {"dense": {"kernel": jnp.arange(8.).reshape(2, 4), "bias": jnp.ones(4)}}
    >>> masks = fq.magnitude_masks(params, 0.5)
    >>> masks["dense"]["bias"] is None, int(masks["dense"]["kernel"].sum())
    (True, 4)
  """
  _check_scope(scope)
  specs = rules_lib.resolve(params, rules, sparsity=sparsity)
  if scope == "layer":
    return map_specs(_magnitude_leaf, specs, params)
  leaves, treedef = jax.tree.flatten(specs, is_leaf=_is_spec_leaf)
  values = treedef.flatten_up_to(params)
  out = [None] * len(leaves)
  pooled = _pooled_indices(leaves, sparsity)
  if pooled:
    for i, m in zip(pooled, _pooled_prune([values[i] for i in pooled], sparsity)):
      out[i] = m
  for i, s in enumerate(leaves):
    if s is not None and out[i] is None:
      out[i] = _magnitude_leaf(s, values[i])
  return treedef.unflatten(out)


def _switch_points(w: jax.Array, mask: jax.Array) -> jax.Array:
  """Per weight, the DNS threshold t from which the hysteresis update prunes it.

  A kept weight is pruned once |w| < 0.9 t, i.e. for t > |w| / 0.9; a pruned
  one stays pruned while |w| <= 1.1 t, i.e. for t >= |w| / 1.1. So the update
  at threshold t prunes exactly the weights whose switch point is below t, and
  pruning the k smallest switch points is the hysteresis update at the t that
  prunes k weights: the target is met exactly, and the band still applies.
  """
  a = jnp.abs(w.astype(jnp.float32))
  return jnp.where(mask, a / PRUNE_FACTOR, a / SPLICE_FACTOR)


def dns_threshold(
  w: jax.Array,
  *,
  sensitivity: float | None = None,
  sparsity: float | None = None,
  mask: jax.Array | None = None,
) -> jax.Array:
  """The DNS threshold t of one layer.

  Args:
    w: the layer's float weights (pruned ones included, since DNS keeps them).
    sensitivity: Guo et al.'s rule, t = mean|W| + sensitivity * std|W|; or
    sparsity: a target. Without `mask`, t is the magnitude below which that
      fraction of the weights lies (no band). With the current `mask`, t is the
      threshold at which the hysteresis update (prune |w| < 0.9 t, splice
      |w| > 1.1 t, keep in between) leaves exactly round(sparsity * size)
      weights pruned; `dns_target_mask` is that update.
    mask: the current keep-mask (only with `sparsity`).

  Returns:
    t as a float32 scalar (0 when nothing is to be pruned).
  """
  a = jnp.abs(jnp.ravel(w).astype(jnp.float32))
  if (sensitivity is None) == (sparsity is None):
    raise ValueError("give exactly one of sensitivity= and sparsity=")
  if sensitivity is not None:
    if mask is not None:
      raise ValueError("mask= goes with sparsity=, not sensitivity=")
    return jnp.mean(a) + sensitivity * jnp.std(a)
  k = round(sparsity * a.size)
  if a.size == 0 or k == 0:
    return jnp.float32(0.0)
  if mask is not None:
    a = jnp.ravel(_switch_points(w, mask))
  return jnp.sort(a)[min(k, a.size) - 1]


def dns_mask(w: jax.Array, mask: jax.Array, threshold) -> jax.Array:
  """DNS hysteresis: prune if |w| < 0.9 t, splice back if |w| > 1.1 t, else keep."""
  a = jnp.abs(w.astype(jnp.float32))
  return jnp.where(
    a < PRUNE_FACTOR * threshold, False, jnp.where(a > SPLICE_FACTOR * threshold, True, mask)
  )


def dns_target_mask(w: jax.Array, mask: jax.Array, sparsity: float) -> jax.Array:
  """DNS hysteresis update that lands exactly on a target sparsity.

  Equivalent to `dns_mask(w, mask, t)` with t = `dns_threshold(w,
  sparsity=sparsity, mask=mask)`: weights below 0.9 t are pruned, above 1.1 t
  kept, inside the band keep their state, and t is chosen so that exactly
  round(sparsity * size) weights end up pruned (ties at t broken by position,
  so the count is exact). With the weights held fixed, the result is a fixed
  point: a second update changes nothing, from any starting mask.

  Args:
    w: the layer's float weights.
    mask: its current keep-mask.
    sparsity: target fraction of pruned weights.

  Returns:
    The new keep-mask.
  """
  return _prune_smallest(_switch_points(w, mask), round(sparsity * w.size))


def _dns_leaf(spec: rules_lib.LayerSpec, w: jax.Array, m: jax.Array) -> jax.Array:
  if not spec.prune:
    return m
  if spec.sensitivity is not None:
    return dns_mask(w, m, dns_threshold(w, sensitivity=spec.sensitivity))
  return dns_target_mask(w, m, spec.sparsity)


def dns_masks(
  params,
  masks,
  *,
  sensitivity: float | None = None,
  sparsity: float | None = None,
  rules: Sequence[rules_lib.Rule] = rules_lib.DEFAULT_RULES,
  scope: Literal["layer", "global"] = "layer",
) -> Any:
  """One Dynamic Network Surgery mask update for every compressed leaf.

  Three modes, chosen per leaf (a rule's own `sensitivity` or `sparsity` wins
  over the global arguments):

  * target (`sparsity`, scope "layer"): the hysteresis update at the per-layer
    threshold that leaves exactly that fraction pruned (`dns_target_mask`);
  * global target (`sparsity`, scope "global"): one threshold for all leaves
    that follow the global target, ranked together with the same band, so the
    total is exact while each layer's sparsity follows its magnitudes;
  * sensitivity: Guo et al.'s t = mean|W| + a * std|W| with the band; the
    sparsity reached is whatever the weights give.

  Args:
    params: current float parameters (pruned entries keep their float values).
    masks: current mask tree (None for dense leaves), e.g. from
      `magnitude_masks` or all-True.
    sensitivity: DNS's `a`, the same for every leaf without its own rule
      setting; or
    sparsity: the target fraction of pruned weights (give at most one).
    rules: selection rules.
    scope: "layer" or "global" (see above; needs `sparsity`).

  Returns:
    The new mask tree.

  Example:
    >>> import jax.numpy as jnp, fq_jax as fq
    >>> params = {"kernel": jnp.array([[0.1, 0.5, 0.95, 1.05, 2.0]])}
    >>> old = {"kernel": jnp.array([[True, True, False, True, False]])}
    >>> fq.dns_masks(params, old, sensitivity=0.0)["kernel"]  # t = mean = 0.92
    Array([[False, False, False,  True,  True]], dtype=bool)
    >>> fq.dns_masks(params, old, sparsity=0.4)["kernel"]  # exactly 2 of 5 pruned
    Array([[False, False,  True,  True,  True]], dtype=bool)
  """
  if sensitivity is not None and sparsity is not None:
    raise ValueError("dns_masks: give at most one of sensitivity= and sparsity=")
  _check_scope(scope)
  if scope == "global" and sparsity is None:
    raise ValueError("dns_masks: scope='global' needs sparsity=")
  specs = rules_lib.resolve(params, rules, sparsity=sparsity or 0.0, sensitivity=sensitivity)
  if scope == "layer":
    return map_specs(_dns_leaf, specs, params, masks)
  leaves, treedef = jax.tree.flatten(specs, is_leaf=_is_spec_leaf)
  values = treedef.flatten_up_to(params)
  old = treedef.flatten_up_to(masks)
  out = [None] * len(leaves)
  pooled = _pooled_indices(leaves, sparsity)
  if pooled:
    points = [_switch_points(values[i], old[i]) for i in pooled]
    for i, m in zip(pooled, _pooled_prune(points, sparsity)):
      out[i] = m
  for i, s in enumerate(leaves):
    if s is not None and out[i] is None:
      out[i] = _dns_leaf(s, values[i], old[i])
  return treedef.unflatten(out)


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


def sparsity_report(
  params,
  masks,
  *,
  sparsity: float | None = None,
  sensitivity: float | None = None,
  rules: Sequence[rules_lib.Rule] = rules_lib.DEFAULT_RULES,
  scope: Literal["layer", "global"] = "layer",
) -> dict[str, Any]:
  """Requested against reached sparsity, per masked leaf and in total (host numbers).

  Takes the same settings as the `dns_masks` or `magnitude_masks` call that
  made `masks`, so the request each leaf was under is resolved the same way.

  Args:
    params: the parameter tree (arrays or `jax.ShapeDtypeStruct`s).
    masks: the mask tree (None for dense leaves).
    sparsity: the global target, if any.
    sensitivity: the global DNS sensitivity, if any.
    rules: the selection rules.
    scope: "layer" or "global".

  Returns:
    {"layers": [...], "total": {...}}. Each layer row has path, size, pruned,
    reached (fraction pruned), mode ("layer": its own target; "global": part of
    the global target; "sensitivity": pruned by t = mean + a * std; "unpruned":
    quantized only), requested (the target; for "global" rows the global
    target, which only the total must meet; None for "sensitivity" rows) and
    sensitivity (`a`, or None). The total has size, pruned, reached and
    requested (the size-weighted target over all rows, None if any row is in
    sensitivity mode).
  """
  specs = rules_lib.resolve(params, rules, sparsity=sparsity or 0.0, sensitivity=sensitivity)
  leaves, treedef = jax.tree.flatten(specs, is_leaf=_is_spec_leaf)
  ms = treedef.flatten_up_to(masks)
  pooled = set(_pooled_indices(leaves, sparsity or 0.0)) if scope == "global" else set()
  rows = []
  for i, (spec, m) in enumerate(zip(leaves, ms)):
    if spec is None or m is None:
      continue
    size = int(m.size)
    pruned = size - int(jnp.sum(m))
    if not spec.prune:
      mode, requested = "unpruned", 0.0
    elif spec.sensitivity is not None:
      mode, requested = "sensitivity", None
    else:
      mode, requested = ("global" if i in pooled else "layer"), float(spec.sparsity)
    rows.append(
      dict(
        path=spec.path,
        size=size,
        pruned=pruned,
        reached=pruned / max(size, 1),
        mode=mode,
        requested=requested,
        sensitivity=spec.sensitivity,
      )
    )
  size = sum(r["size"] for r in rows)
  pruned = sum(r["pruned"] for r in rows)
  requested = (
    None
    if any(r["requested"] is None for r in rows)
    else sum(r["requested"] * r["size"] for r in rows) / max(size, 1)
  )
  total = dict(size=size, pruned=pruned, reached=pruned / max(size, 1), requested=requested)
  return dict(layers=rows, total=total)
