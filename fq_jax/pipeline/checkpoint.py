"""Orbax checkpoints of a run: arrays (params, batch stats, optimizer state,
masks) plus a JSON record of where the run stands.

The optimizer states of the compression stages are optax NamedTuples whose
trees contain None leaves (dense layers have no mask or focus state) and
empty nodes. Rather than relying on how a checkpoint library maps those, each
saved tree is flattened to a dict of its array leaves keyed by position
("00000", "00001", ...); a restore unflattens them into the tree structure of
a freshly built state of the same stage (`jax.eval_shape` of its `init`), which
the pipeline can always reconstruct from the config. Restored arrays are
exactly the saved ones, so a resumed run reproduces an uninterrupted one bit
for bit.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

META_ITEM = "meta"
STATE_ITEM = "state"


def _flat(tree: Any) -> dict[str, Any]:
  return {f"{i:05d}": leaf for i, leaf in enumerate(jax.tree.leaves(tree))}


def flatten_state(state: dict[str, Any]) -> dict[str, dict[str, Any]]:
  """{name: tree} -> {name: {index: array}}, names without arrays dropped."""
  out = {name: _flat(tree) for name, tree in state.items()}
  return {k: v for k, v in out.items() if v}


def unflatten_state(flat: dict[str, dict[str, Any]], abstract: dict[str, Any]) -> dict[str, Any]:
  """Inverse of `flatten_state` given trees with the saved structure."""
  out = {}
  for name, tree in abstract.items():
    leaves = flat.get(name, {})
    out[name] = jax.tree.structure(tree).unflatten([leaves[k] for k in sorted(leaves)])
  return out


class Checkpoints:
  """A `CheckpointManager` of (state arrays, meta JSON) pairs with increasing ids."""

  def __init__(self, directory: str, *, max_to_keep: int = 2, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep,
      create=True,
      enable_async_checkpointing=async_save,
      cleanup_tmp_directories=True,
    )
    self.manager = ocp.CheckpointManager(self.directory, options=options)
    self._next = (self.latest() or 0) + 1

  def latest(self) -> int | None:
    """The id of the newest complete checkpoint (None when there is none)."""
    return self.manager.latest_step()

  def meta(self, step: int) -> dict[str, Any]:
    """The JSON record of checkpoint `step`."""
    out = self.manager.restore(step, args=ocp.args.Composite(**{META_ITEM: ocp.args.JsonRestore()}))
    return dict(out[META_ITEM])

  def save(self, state: dict[str, Any], meta: dict[str, Any]) -> int:
    """Saves `state` ({name: pytree}) and `meta`; returns the new id."""
    step = self._next
    self._next += 1
    self.manager.save(
      step,
      args=ocp.args.Composite(
        **{
          STATE_ITEM: ocp.args.StandardSave(flatten_state(state)),
          META_ITEM: ocp.args.JsonSave(meta),
        }
      ),
    )
    return step

  def restore(self, step: int, abstract: dict[str, Any]) -> dict[str, Any]:
    """Restores checkpoint `step` into trees shaped like `abstract`.

    Args:
      step: checkpoint id.
      abstract: {name: tree of jax.ShapeDtypeStruct (with shardings)} with the
        structure the state had when saved.

    Returns:
      {name: tree of jax.Array}.
    """
    target = flatten_state(abstract)
    out = self.manager.restore(
      step, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(target)})
    )
    return unflatten_state(out[STATE_ITEM], abstract)

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are on disk."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def save_variables_npz(path: str, variables: dict[str, Any]) -> None:
  """Writes Flax variables as a flat `.npz` ("params/conv1/kernel", ...) for `init_from`."""
  import numpy as np

  from fq_jax import path_str

  flat = {path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(variables)}
  with open(path, "wb") as f:
    np.savez(f, **flat)
