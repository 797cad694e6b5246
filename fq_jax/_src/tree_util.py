"""Tree utilities shared by the core, the codec and the pipeline: one definition of each.

fq-jax's compression state mirrors the parameter tree with `None` where a leaf is left dense
(masks, focus states, codebook states, layer specs). These helpers walk such trees treating
`None` (and, where asked, whole NamedTuple states) as leaves, so callers never re-write the
`is_leaf=lambda x: x is None` incantation or the "map only where present" pattern.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax


def is_none(x: Any) -> bool:
  """Leaf test that keeps `None` as a leaf (JAX otherwise treats it as an empty subtree)."""
  return x is None


def none_or(*types: type) -> Callable[[Any], bool]:
  """A leaf test: `None` or an instance of one of `types` (e.g. a whole `FocusState`).

  Args:
    *types: classes whose instances are leaves, not subtrees.

  Returns:
    A predicate for `is_leaf=`.
  """
  return lambda x: x is None or isinstance(x, types)


def map_present(
  fn: Callable[..., Any],
  first: Any,
  *rest: Any,
  is_leaf: Callable[[Any], bool] = is_none,
) -> Any:
  """Maps `fn` over the leaves where `first` is not None; None stays None.

  Args:
    fn: called as fn(first_leaf, *rest_leaves) where first_leaf is not None.
    first: the tree whose None leaves mark "absent".
    *rest: trees with `first`'s structure (up to its leaves).
    is_leaf: leaf test for `first` (default: None is a leaf).

  Returns:
    A tree like `first`.
  """
  return jax.tree.map(
    lambda a, *xs: None if a is None else fn(a, *xs), first, *rest, is_leaf=is_leaf
  )


def structure(tree: Any, is_leaf: Callable[[Any], bool] = is_none) -> jax.tree_util.PyTreeDef:
  """The tree's structure with `None` (and whatever `is_leaf` accepts) counted as a leaf."""
  return jax.tree.structure(tree, is_leaf=is_leaf)


def present_leaves(tree: Any, is_leaf: Callable[[Any], bool] = is_none) -> list:
  """The leaves of `tree` that are not None (None leaves kept by `is_leaf`, then dropped)."""
  return [x for x in jax.tree.leaves(tree, is_leaf=is_leaf) if x is not None]
