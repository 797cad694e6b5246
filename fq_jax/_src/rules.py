"""Which parameters are compressed, and how: rules matched by regex on paths.

A parameter's path is its tree path joined with '/', for example
`params/stage1_block0/conv1/kernel` for a Flax `variables` dict or
`conv1/kernel` for `variables['params']`. A Flax NNX `Variable` (`nnx.Param`,
or the `OptArray` of an `nnx.Optimizer` state) adds no component: its payload
key (`.value`) is dropped, so `nnx.split(model, nnx.Param)` gives the same
paths as `nnx.to_pure_dict` of it and as the linen twin's `params`. This is
the one place paths are normalised; every fq-jax function that names or
matches leaves goes through `path_str`.

Rules are tried in order; the first whose `pattern` matches (`re.search`)
decides. A leaf no rule matches is left in float, as are non-floating leaves
whatever the rules say (`check_selection` reports both cases).

Example (first convolution at 8 bits and dense, everything else default):

    rules = (fq.Rule(pattern=r"conv_init/kernel$", bits=8, sparsity=0.0),
             *fq.DEFAULT_RULES)
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
import sys
import warnings
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
    where = f"Rule(pattern={self.pattern!r})"
    _check_sparsity(self.sparsity, f"{where}.sparsity")
    _check_sensitivity(self.sensitivity, f"{where}.sensitivity")
    if self.sparsity is not None and self.sensitivity is not None:
      raise ValueError(f"{where}: give sparsity or sensitivity, not both")
    _check_bits(self.bits, f"{where}.bits")
    if self.w_sep is not None:
      check_w_sep(self.w_sep, f"{where}.w_sep")


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


def _is_number(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_sparsity(sparsity, where):
  if sparsity is not None and not (_is_number(sparsity) and 0.0 <= sparsity < 1.0):
    raise ValueError(f"{where}: sparsity must be in [0, 1), got {sparsity!r}")


def _check_sensitivity(sensitivity, where):
  if sensitivity is not None and not (
    isinstance(sensitivity, numbers.Real)
    and not isinstance(sensitivity, bool)
    and math.isfinite(sensitivity)
  ):
    raise ValueError(f"{where}: sensitivity must be a finite number, got {sensitivity!r}")


def _check_bits(bits, where):
  if bits is not None and not (
    isinstance(bits, int)
    and not isinstance(bits, bool)
    and quantizers.MIN_BITS <= bits <= quantizers.MAX_BITS
  ):
    raise ValueError(
      f"{where}: bits must be an integer in [{quantizers.MIN_BITS}, "
      f"{quantizers.MAX_BITS}], got {bits!r}"
    )


def check_w_sep(w_sep, where: str) -> None:
  """Raises ValueError unless `w_sep` is a finite number >= 0 (Eq. 4's threshold)."""
  if not (_is_number(w_sep) and math.isfinite(w_sep) and w_sep >= 0):
    raise ValueError(f"{where}: w_sep must be a finite number >= 0, got {w_sep!r}")


def check_sparsity(sparsity, where: str) -> None:
  """Raises ValueError unless `sparsity` is None or in [0, 1)."""
  _check_sparsity(sparsity, where)


def check_bits(bits, where: str) -> None:
  """Raises ValueError unless `bits` is None or an integer in [MIN_BITS, MAX_BITS]."""
  _check_bits(bits, where)


def as_rules(rules, where: str) -> tuple[Rule, ...]:
  """Normalises `rules`: one `Rule` is a one-rule tuple; anything else must hold Rules.

  Args:
    rules: a `Rule` or a sequence of them.
    where: the caller's name, for the error message.

  Returns:
    A tuple of Rules.

  Raises:
    TypeError: naming the argument, for anything else.
  """
  if isinstance(rules, Rule):
    return (rules,)
  if isinstance(rules, (str, bytes)) or not isinstance(rules, Sequence):
    raise TypeError(
      f"{where}: rules must be a Rule or a sequence of Rules, got {type(rules).__name__}"
    )
  bad = [r for r in rules if not isinstance(r, Rule)]
  if bad:
    raise TypeError(
      f"{where}: rules must be a Rule or a sequence of Rules, got an item of type "
      f"{type(bad[0]).__name__}"
    )
  return tuple(rules)


# Convolution and dense kernels are compressed; biases, normalization scales
# and offsets and batch statistics match nothing and stay float.
DEFAULT_RULES: tuple[Rule, ...] = (Rule(pattern=r"(^|/)kernel$"),)


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _is_variable_payload(key) -> bool:
  # A Flax NNX Variable flattens to one child under GetAttrKey('value'); a dict
  # entry named 'value' is a DictKey and stays part of the path.
  return isinstance(key, jax.tree_util.GetAttrKey) and key.name == "value"


def path_str(path: Sequence[Any]) -> str:
  """'/'-joins a `jax.tree_util` key path: ('params', 'conv', 'kernel') -> 'params/conv/kernel'.

  The `.value` of a Flax NNX `Variable` is dropped: an `nnx.State` leaf at
  ('conv', 'kernel', GetAttrKey('value')) is 'conv/kernel'.
  """
  return "/".join(_key_name(k) for k in path if not _is_variable_payload(k))


def _nnx_variable_type():
  # Only a program that imported flax.nnx can hold Variables; importing it here
  # would cost every linen user its import time.
  module = sys.modules.get("flax.nnx")
  return None if module is None else getattr(module, "Variable", None)


def unwrap_variables(tree):
  """`tree` with every Flax NNX `Variable` replaced by its array (else unchanged).

  Args:
    tree: any pytree, e.g. an `nnx.State` of `nnx.Param`s or the state of an
      `nnx.Optimizer` (whose arrays are wrapped in `OptArray`s).

  Returns:
    The same containers with bare arrays; `tree` itself if it holds no Variable.
  """
  variable = _nnx_variable_type()
  if variable is None:
    return tree
  is_var = lambda x: isinstance(x, variable)
  if not any(is_var(x) for x in jax.tree.leaves(tree, is_leaf=is_var)):
    return tree
  return jax.tree.map(lambda x: x.get_value() if is_var(x) else x, tree, is_leaf=is_var)


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
  compiled = [(re.compile(r.pattern), r) for r in as_rules(rules, "fq.resolve")]

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


def _summary(paths: Sequence[str], limit: int = 8) -> str:
  shown = ", ".join(paths[:limit])
  more = len(paths) - limit
  return (shown + (f", ... ({more} more)" if more > 0 else "")) or "(none)"


def check_selection(
  params, rules: Sequence[Rule], *, where: str, unmatched: str = "raise", min_selected: int = 1
) -> None:
  """Says when the rules select less than the user probably meant.

  Three cases, each named with the rule and the paths that exist:
  no leaf selected at all (raised when `unmatched` is "raise", warned when
  "warn"); a rule whose pattern matches no leaf; leaves a rule matches that
  are left in float because they are not floating point (both warned unless
  `unmatched` is "ignore"). A leaf a rule matches whose rank is below
  `min_ndim` is left in float silently: that is what `min_ndim` is for.

  Args:
    params: the parameter tree (arrays or `jax.ShapeDtypeStruct`s).
    rules: the rules.
    where: the caller's name, for the message.
    unmatched: "raise", "warn" or "ignore".
    min_selected: how many selected leaves count as a selection.

  Raises:
    ValueError: when nothing is selected and `unmatched` is "raise".
  """
  if unmatched == "ignore":
    return
  leaves = [
    (path_str(p), x)
    for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
    if hasattr(x, "dtype") and hasattr(x, "shape")
  ]
  paths = [p for p, _ in leaves]
  compiled = [(re.compile(r.pattern), r) for r in rules]
  hits = [0] * len(compiled)
  selected = 0
  non_float = []
  for name, leaf in leaves:
    for i, (regex, rule) in enumerate(compiled):
      if regex.search(name):
        hits[i] += 1
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
          if rule.prune or rule.quantize:
            non_float.append(f"{name} ({jnp.dtype(leaf.dtype).name})")
        elif (rule.prune or rule.quantize) and len(leaf.shape) >= rule.min_ndim:
          selected += 1
        break
  silence = f"pass unmatched='ignore' to {where} to silence this"
  if selected < min_selected:
    patterns = [r.pattern for r in rules]
    msg = f"{where}: the rules {patterns} select no parameter to compress; paths: {_summary(paths)}"
    if unmatched == "raise":
      raise ValueError(msg + f" (pass unmatched='warn' or 'ignore' to {where} to allow it)")
    warnings.warn(msg, stacklevel=3)
    return
  for (_, rule), n in zip(compiled, hits):
    if n == 0:
      warnings.warn(
        f"{where}: Rule(pattern={rule.pattern!r}) matches no parameter that an earlier "
        "rule does not take; "
        f"paths: {_summary(paths)} ({silence})",
        stacklevel=3,
      )
  if non_float:
    warnings.warn(
      f"{where}: left uncompressed because they are not floating point: "
      f"{_summary(non_float)} ({silence})",
      stacklevel=3,
    )


def spec_leaves(specs) -> list:
  """The leaves of a spec tree, None for uncompressed leaves, in tree order."""
  return jax.tree.leaves(specs, is_leaf=lambda x: x is None)
