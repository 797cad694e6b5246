"""How the optax wrappers line user trees up with their state, and their argument checks.

The compression state is built from one parameter tree; later calls may pass the same leaves in
other containers (an `nnx.State`, a pure dict, the full tree while the state sits under
`optax.masked`). These helpers match leaves by path and check the wrappers' arguments, so every
transform reports a mismatch or a bad argument in one fq-jax line.
"""

from __future__ import annotations

import functools
import operator

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fq_jax._src import quantizers, tree_util
from fq_jax._src import rules as rules_lib

# Leaf test for mask and focus trees: a None or a whole `FocusState`.
_is_none = tree_util.none_or(quantizers.FocusState)
# Maps fn over leaves where `first` is not None; None stays None.
_map_present = functools.partial(tree_util.map_present, is_leaf=_is_none)


def _is_slot(x) -> bool:
  """A position of the state's mask tree: a mask, None (dense), or optax.masked's gap."""
  return x is None or isinstance(x, optax.MaskedNode)


def _under(path: str, prefixes) -> bool:
  return any(path == p or path.startswith(p + "/") or p == "" for p in prefixes)


def _to_state_layout(state_masks, tree, *, what: str, where: str):
  """Lines `tree` up with the state's mask tree, path by path.

  The state was built from one parameter tree; `tree` (params, gradients) may
  come in another container (an `nnx.State` of `nnx.Param`s, a pure dict, the
  full tree while the state sits under `optax.masked`). Leaves are matched by
  their normalised paths (`fq.path_str`), so containers and NNX Variables do
  not matter; a leaf optax.masked left out of the state passes through.

  Args:
    state_masks: `FQState.masks` or `PruneState.masks` (Variables unwrapped).
    tree: the tree to line up.
    what: its name in error messages ("params", "updates").
    where: the caller's name.

  Returns:
    (laid_out, back): `tree`'s leaves in a tree of the state's structure
    (`optax.MaskedNode` where the state has one), and a function taking a
    tree of that structure back to `tree`'s containers (left-out leaves keep
    `tree`'s values).

  Raises:
    ValueError: one line naming the first path that differs.
  """
  s_flat, s_def = jax.tree_util.tree_flatten_with_path(state_masks, is_leaf=_is_slot)
  t_flat, t_def = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_slot)
  s_paths = [rules_lib.path_str(p) for p, _ in s_flat]
  t_paths = [rules_lib.path_str(p) for p, _ in t_flat]
  t_leaves = [x for _, x in t_flat]
  if s_paths == t_paths:
    index = list(range(len(t_leaves)))
  else:
    masked = [p for p, (_, m) in zip(s_paths, s_flat) if isinstance(m, optax.MaskedNode)]
    position = {p: i for i, p in enumerate(t_paths)}
    missing = [p for p in s_paths if p not in position and p not in masked]
    if missing:
      raise ValueError(
        f"{where}: the fq state has a leaf at '{missing[0]}' that {what} lacks "
        f"({what} paths: {rules_lib._summary(t_paths)})"
      )
    extra = [p for p in t_paths if p not in set(s_paths) and not _under(p, masked)]
    if extra:
      raise ValueError(
        f"{where}: {what} has a leaf at '{extra[0]}' that the fq state lacks "
        f"(state paths: {rules_lib._summary(s_paths)}); was the state built from other params?"
      )
    index = [position.get(p) for p in s_paths]
  for i, p, (_, m) in zip(index, s_paths, s_flat):
    if m is not None and not isinstance(m, optax.MaskedNode) and i is not None:
      shape = jnp.shape(t_leaves[i]) if t_leaves[i] is not None else None
      if shape is not None and tuple(shape) != tuple(jnp.shape(m)):
        raise ValueError(
          f"{where}: {what} leaf '{p}' has shape {tuple(shape)}, the fq state's mask "
          f"{tuple(jnp.shape(m))}"
        )
  laid_out = s_def.unflatten(
    [
      optax.MaskedNode() if isinstance(m, optax.MaskedNode) else t_leaves[i]
      for i, (_, m) in zip(index, s_flat)
    ]
  )

  def back(new_tree):
    new_leaves = s_def.flatten_up_to(new_tree)
    out = list(t_leaves)
    for i, (_, m), x in zip(index, s_flat, new_leaves):
      if i is not None and not isinstance(m, optax.MaskedNode):
        out[i] = x
    return t_def.unflatten(out)

  return laid_out, back


def _check_inner(inner, where: str, name: str = "inner") -> None:
  if not (hasattr(inner, "init") and hasattr(inner, "update")):
    raise TypeError(
      f"{where}: {name} must be an optax GradientTransformation, got {type(inner).__name__}"
    )


def _check_unmatched(unmatched, where: str) -> None:
  if unmatched not in ("raise", "warn", "ignore"):
    raise ValueError(f"{where}: unmatched must be 'raise', 'warn' or 'ignore', got {unmatched!r}")


def _is_int(x) -> bool:
  """An integer (Python or NumPy), not a bool."""
  if isinstance(x, (bool, np.bool_)):
    return False
  try:
    operator.index(x)
  except TypeError:
    return False
  return True
