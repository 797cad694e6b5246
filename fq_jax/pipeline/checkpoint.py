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

Checkpoint ids are global step numbers: the number of optimizer updates of
all stages before the saved position (the runner's `global_step`), so
`checkpoints/1500` holds the run after its 1500th update. Two positions with
the same global step (a stage of zero length between them) keep the first.

A checkpoint that cannot be read back (garbled bytes, a missing `meta/` or
`state/`, an empty stray folder) raises `DamagedCheckpoint`; the runner then
sets it aside (`set_aside`) and falls back to the next older one.

Multi-host: every process saves and restores together (Orbax writes each
array once, from the process that owns it, and the JSON record from process
0); only process 0 moves a damaged checkpoint, and every process waits for it.
The folder may be remote (`gs://...`): paths go through `etils.epath`.
"""

from __future__ import annotations

import shutil
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from fq_jax.pipeline import files, processes

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


DAMAGED_FOLDER = "damaged_checkpoints"


class DamagedCheckpoint(Exception):
  """Checkpoint `step` cannot be restored; `str(e)` is one line saying why."""

  def __init__(self, step: int, reason: str):
    self.step = step
    super().__init__(f"checkpoint {step} is damaged ({reason})")


def _reason(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


class Checkpoints:
  """A `CheckpointManager` of (state arrays, meta JSON) pairs keyed by increasing global steps."""

  def __init__(self, directory: str, *, max_to_keep: int = 2, async_save: bool = True):
    self.directory = files.absolute(directory)
    options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep,
      create=True,
      enable_async_checkpointing=async_save,
      cleanup_tmp_directories=True,
    )
    self.manager = ocp.CheckpointManager(epath.Path(self.directory), options=options)
    self._last = self.latest()

  def latest(self) -> int | None:
    """The id of the newest complete checkpoint (None when there is none)."""
    return self.manager.latest_step()

  def steps_newest_first(self) -> list[int]:
    """Ids of the checkpoints on disk, newest first."""
    return sorted(self.manager.all_steps(), reverse=True)

  def set_aside(self, step: int) -> str:
    """Moves checkpoint `step` to `../damaged_checkpoints/` (kept for inspection); returns where.

    Process 0 moves it; every process waits for the move and rereads the folder.
    """
    self.wait()
    target_dir = epath.Path(self.directory).parent / DAMAGED_FOLDER
    target = target_dir / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
    if jax.process_index() == 0:
      target_dir.mkdir(parents=True, exist_ok=True)
      source = epath.Path(self.directory) / str(step)
      if files.is_local(self.directory):
        shutil.move(source, target)
      else:
        source.rename(target)
    processes.sync_processes(f"fq_jax_set_aside_{step}")
    self.manager.reload()
    self._last = self.latest()
    return str(target)

  def meta(self, step: int) -> dict[str, Any]:
    """The JSON record of checkpoint `step`.

    Raises:
      DamagedCheckpoint: when it cannot be read or is not a JSON object.
    """
    if not files.is_dir(files.join(self.directory, str(step), META_ITEM)):
      raise DamagedCheckpoint(step, f"no {META_ITEM}/ folder")
    try:
      out = self.manager.restore(
        step, args=ocp.args.Composite(**{META_ITEM: ocp.args.JsonRestore()})
      )
      meta = out[META_ITEM]
    except Exception as e:  # noqa: BLE001 - Orbax raises many types for unreadable files
      raise DamagedCheckpoint(step, _reason(e)) from None
    if not isinstance(meta, dict):
      raise DamagedCheckpoint(step, f"{META_ITEM} is not a JSON object")
    return dict(meta)

  def save(self, step: int, state: dict[str, Any], meta: dict[str, Any]) -> bool:
    """Saves `state` ({name: pytree}) and `meta` as checkpoint `step` (a global step).

    Returns:
      Whether it saved: a step not above the newest checkpoint's is skipped
      (that one holds the same updates).
    """
    if self._last is not None and step <= self._last:
      return False
    self._last = step
    self.manager.save(
      step,
      args=ocp.args.Composite(
        **{
          STATE_ITEM: ocp.args.StandardSave(flatten_state(state)),
          META_ITEM: ocp.args.JsonSave(meta),
        }
      ),
      force=True,
    )
    return True

  def restore(self, step: int, abstract: dict[str, Any]) -> dict[str, Any]:
    """Restores checkpoint `step` into trees shaped like `abstract`.

    Args:
      step: checkpoint id.
      abstract: {name: tree of jax.ShapeDtypeStruct (with shardings)} with the
        structure the state had when saved.

    Returns:
      {name: tree of jax.Array}.

    Raises:
      DamagedCheckpoint: when the arrays cannot be read back.
    """
    target = flatten_state(abstract)
    if target and not files.is_dir(files.join(self.directory, str(step), STATE_ITEM)):
      raise DamagedCheckpoint(step, f"no {STATE_ITEM}/ folder")
    try:
      out = self.manager.restore(
        step, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(target)})
      )
      return unflatten_state(out[STATE_ITEM], abstract)
    except Exception as e:  # noqa: BLE001 - Orbax raises many types for unreadable files
      raise DamagedCheckpoint(step, _reason(e)) from None

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are on disk."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def save_variables_npz(path: str, variables: dict[str, Any]) -> None:
  """Writes Flax variables as a flat `.npz` ("params/conv1/kernel", ...) for `init_from`."""
  import numpy as np

  from fq_jax import path_str
  from fq_jax.codec import atomic

  flat = {path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(variables)}
  with atomic.atomic_open(path, "wb") as f:
    np.savez(f, **flat)
