"""Which parameters are compressed, and how: rules matched by regex on paths.

A parameter's path is its tree path joined with '/', for example
`params/stage1_block0/conv1/kernel` for a Flax `variables` dict or
`conv1/kernel` for `variables['params']`. Rules are tried in order; the first
whose `pattern` matches (`re.search`) decides. A leaf no rule matches is left
in float, as are non-floating leaves whatever the rules say.

Example (first convolution at 8 bits and dense, everything else default):

    rules = (fq.Rule(pattern=r"conv_init/kernel$", bits=8, sparsity=0.0),
             *fq.DEFAULT_RULES)
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from fq_jax._src import quantizers


@dataclasses.dataclass(frozen=True, kw_only=True)
class Rule:
  """How the leaves whose '/'-joined path matches `pattern` are compressed.

  Attributes:
    pattern: regular expression searched in the path.
    prune: whether the leaf gets a sparsity mask.
    quantize: whether the leaf is focused-quantized.
    sparsity: target fraction of pruned weights; None takes the global one.
    sensitivity: DNS's per-layer `a` in t = mean|W| + a * std|W| (Guo et al.
      2016): these leaves are pruned by that threshold instead of towards a
      target sparsity (DNS and magnitude pruning); None takes the global
      setting. Exclusive with `sparsity`.
    bits: weight bit-width n; None takes the global one.
    w_sep: Wasserstein separation threshold; None takes the global one.
    recentralize: False forces plain shift quantization for these leaves.
    min_ndim: leaves with fewer dimensions are left in float (a "kernel" of
      rank 1 is not a convolution or dense kernel).
  """

  pattern: str
  prune: bool = True
  quantize: bool = True
  sparsity: float | None = None
  sensitivity: float | None = None
  bits: int | None = None
  w_sep: float | None = None
  recentralize: bool = True
  min_ndim: int = 2

  def __post_init__(self):
    try:
      re.compile(self.pattern)
    except re.error as e:
      raise ValueError(f"Rule pattern {self.pattern!r} is not a regex: {e}") from None
    _check_sparsity(self.sparsity, f"Rule(pattern={self.pattern!r}).sparsity")
    _check_sensitivity(self.sensitivity, f"Rule(pattern={self.pattern!r}).sensitivity")
    if self.sparsity is not None and self.sensitivity is not None:
      raise ValueError(f"Rule(pattern={self.pattern!r}): give sparsity or sensitivity, not both")
    _check_bits(self.bits, f"Rule(pattern={self.pattern!r}).bits")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LayerSpec:
  """The resolved compression settings of one leaf (static, hashable)."""

  path: str
  prune: bool
  quantize: bool
  sparsity: float
  bits: int
  w_sep: float
  recentralize: bool
  # Set when the leaf is pruned by the DNS threshold t = mean|W| + a * std|W|
  # instead of towards `sparsity`.
  sensitivity: float | None = None


def _check_sparsity(sparsity, where):
  if sparsity is not None and not 0.0 <= sparsity < 1.0:
    raise ValueError(f"{where}: sparsity must be in [0, 1), got {sparsity}")


def _check_sensitivity(sensitivity, where):
  if sensitivity is not None and not (
    isinstance(sensitivity, numbers.Real)
    and not isinstance(sensitivity, bool)
    and math.isfinite(sensitivity)
  ):
    raise ValueError(f"{where}: sensitivity must be a finite number, got {sensitivity!r}")


def _check_bits(bits, where):
  if bits is not None and not (
    isinstance(bits, int) and quantizers.MIN_BITS <= bits <= quantizers.MAX_BITS
  ):
    raise ValueError(
      f"{where}: bits must be an integer in [{quantizers.MIN_BITS}, "
      f"{quantizers.MAX_BITS}], got {bits!r}"
    )


# Convolution and dense kernels are compressed; biases, normalization scales
# and offsets and batch statistics match nothing and stay float.
DEFAULT_RULES: tuple[Rule, ...] = (Rule(pattern=r"(^|/)kernel$"),)


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_str(path: Sequence[Any]) -> str:
  """'/'-joins a `jax.tree_util` key path: ('params', 'conv', 'kernel') -> 'params/conv/kernel'."""
  return "/".join(_key_name(k) for k in path)


def leaf_paths(tree) -> Any:
  """A tree of the same structure whose leaves are their '/'-joined paths."""
  return jax.tree_util.tree_map_with_path(lambda p, _: path_str(p), tree)


def _leaf_sensitivity(rule: Rule, sensitivity: float | None) -> float | None:
  """A rule's own setting wins: its sensitivity, or None if it sets a sparsity."""
  if rule.sensitivity is not None:
    return float(rule.sensitivity)
  if rule.sparsity is not None or sensitivity is None:
    return None
  return float(sensitivity)


def resolve(
  params,
  rules: Sequence[Rule] = DEFAULT_RULES,
  *,
  sparsity: float = 0.0,
  bits: int = 5,
  w_sep: float = 2.0,
  sensitivity: float | None = None,
) -> Any:
  """Resolves the rules for every leaf of `params`.

  Args:
    params: a parameter tree (arrays or `jax.ShapeDtypeStruct`s).
    rules: rules tried in order; the first match decides.
    sparsity: global default sparsity for rules that do not set one.
    bits: global default bit-width.
    w_sep: global default Wasserstein separation threshold.
    sensitivity: global DNS sensitivity `a` for pruned leaves whose rule sets
      neither `sparsity` nor `sensitivity`; None prunes them towards
      `sparsity`.

  Returns:
    A tree like `params` whose leaves are a `LayerSpec`, or None for leaves
    left in float (use `is_leaf=lambda x: x is None` or `jax.tree.map` with
    `params` first to walk it).

  Raises:
    ValueError: for a bad global setting, naming it.
  """
  _check_sparsity(sparsity, "sparsity")
  _check_bits(bits, "bits")
  _check_sensitivity(sensitivity, "sensitivity")
  compiled = [(re.compile(r.pattern), r) for r in rules]

  def one(path, leaf):
    name = path_str(path)
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
      return None
    for regex, rule in compiled:
      if regex.search(name):
        if (not (rule.prune or rule.quantize)) or len(leaf.shape) < rule.min_ndim:
          return None
        return LayerSpec(
          path=name,
          prune=rule.prune,
          quantize=rule.quantize,
          sparsity=(sparsity if rule.sparsity is None else rule.sparsity) if rule.prune else 0.0,
          bits=bits if rule.bits is None else rule.bits,
          w_sep=w_sep if rule.w_sep is None else rule.w_sep,
          recentralize=rule.recentralize,
          sensitivity=_leaf_sensitivity(rule, sensitivity) if rule.prune else None,
        )
    return None

  return jax.tree_util.tree_map_with_path(one, params)


def spec_leaves(specs) -> list:
  """The leaves of a spec tree, None for uncompressed leaves, in tree order."""
  return jax.tree.leaves(specs, is_leaf=lambda x: x is None)
