"""Conversion between PyTorch CIFAR ResNet state dicts and :class:`CifarResNet` variables.

The PyTorch side is the layout of akamaster/pytorch_resnet_cifar10 (the checkpoints in
``../shared/models/resnet{20,56}-cifar10.npz``, one array per ``state_dict`` key)::

    conv1.weight                       -> params/conv_init/kernel        (OIHW -> HWIO)
    bn1.{weight,bias}                  -> params/bn_init/{scale,bias}
    bn1.{running_mean,running_var}     -> batch_stats/bn_init/{mean,var}
    layer{s}.{b}.conv{k}.weight        -> params/stage{s}_block{b}/conv{k}/kernel
    layer{s}.{b}.bn{k}.*               -> .../stage{s}_block{b}/bn{k}/*
    linear.weight                      -> params/head/kernel             ((out, in) -> (in, out))
    linear.bias                        -> params/head/bias

``*.num_batches_tracked`` buffers carry no information the Flax model uses; they are accepted
and ignored on import and not written on export (the shared checkpoints do not contain them).
A leading ``module.`` (from ``nn.DataParallel``) is stripped.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fq_jax.models.cifar_resnet import CifarResNet, cifar_resnet_blocks_per_stage

_IGNORED_SUFFIX = ".num_batches_tracked"
_BN_FIELDS = (
  ("weight", "params", "scale"),
  ("bias", "params", "bias"),
  ("running_mean", "batch_stats", "mean"),
  ("running_var", "batch_stats", "var"),
)


def _conv_to_flax(w: np.ndarray) -> np.ndarray:
  return np.transpose(w, (2, 3, 1, 0))  # OIHW -> HWIO


def _conv_to_torch(w: np.ndarray) -> np.ndarray:
  return np.transpose(w, (3, 2, 0, 1))  # HWIO -> OIHW


def _identity(w: np.ndarray) -> np.ndarray:
  return w


# One entry per tensor: torch key -> (collection, flax path, torch->flax, flax->torch).
_Entry = tuple[
  str, tuple[str, ...], Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]
]


def _key_map(depth: int) -> dict[str, _Entry]:
  """All torch keys of a CIFAR ResNet of ``depth`` and where they live in Flax."""
  n = cifar_resnet_blocks_per_stage(depth)
  table: dict[str, _Entry] = {}

  def conv(torch_prefix: str, flax_path: tuple[str, ...]) -> None:
    table[f"{torch_prefix}.weight"] = (
      "params",
      (*flax_path, "kernel"),
      _conv_to_flax,
      _conv_to_torch,
    )

  def bn(torch_prefix: str, flax_path: tuple[str, ...]) -> None:
    for torch_name, collection, flax_name in _BN_FIELDS:
      table[f"{torch_prefix}.{torch_name}"] = (
        collection,
        (*flax_path, flax_name),
        _identity,
        _identity,
      )

  conv("conv1", ("conv_init",))
  bn("bn1", ("bn_init",))
  for s in (1, 2, 3):
    for b in range(n):
      for k in (1, 2):
        conv(f"layer{s}.{b}.conv{k}", (f"stage{s}_block{b}", f"conv{k}"))
        bn(f"layer{s}.{b}.bn{k}", (f"stage{s}_block{b}", f"bn{k}"))
  table["linear.weight"] = ("params", ("head", "kernel"), np.transpose, np.transpose)
  table["linear.bias"] = ("params", ("head", "bias"), _identity, _identity)
  return table


def _flax_shapes(depth: int, num_classes: int) -> dict[str, Any]:
  # eval_shape: shapes only, no initialization compute.
  model = CifarResNet(depth=depth, num_classes=num_classes)
  return jax.eval_shape(
    lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3), jnp.float32), train=False)
  )


def _get(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
  for p in path:
    tree = tree[p]
  return tree


def _set(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def infer_cifar_resnet_depth(keys: Iterable[str], source: str = "<state dict>") -> int:
  """Infers ``depth = 6 n + 2`` from the block indices present in a torch state dict.

  Args:
    keys: state-dict keys (``module.`` prefix already stripped).
    source: name of the origin, for error messages.

  Returns:
    The depth.

  Raises:
    ValueError: if no ``layer{s}.{b}.`` keys are found or the stages disagree on ``n``.
  """
  blocks: dict[int, set[int]] = {1: set(), 2: set(), 3: set()}
  for key in keys:
    m = re.match(r"layer([1-3])\.(\d+)\.", key)
    if m:
      blocks[int(m.group(1))].add(int(m.group(2)))
  counts = {s: (max(b) + 1 if b else 0) for s, b in blocks.items()}
  if len(set(counts.values())) != 1 or counts[1] == 0:
    raise ValueError(
      f"{source}: cannot infer CIFAR ResNet depth; blocks per stage found {counts} "
      "(expected the same n >= 1 for layer1, layer2 and layer3)"
    )
  return 6 * counts[1] + 2


def torch_state_to_flax(
  state: Mapping[str, np.ndarray],
  depth: int | None = None,
  *,
  source: str = "<state dict>",
) -> tuple[int, dict[str, Any]]:
  """Converts a PyTorch CIFAR ResNet state dict to Flax variables.

  Args:
    state: mapping from torch key to array (PyTorch layouts).
    depth: network depth; inferred from the keys when None.
    source: name of the origin (e.g. the file path), used in error messages.

  Returns:
    ``(depth, variables)`` with ``variables = {'params': ..., 'batch_stats': ...}`` (float32
    numpy leaves) for ``CifarResNet(depth=depth, num_classes=...)``; ``num_classes`` is the
    number of rows of ``linear.weight``.

  Raises:
    ValueError: naming the key and ``source`` for a missing key, an unexpected key or a
      shape mismatch.
  """
  state = {k.removeprefix("module."): v for k, v in state.items()}
  state = {k: v for k, v in state.items() if not k.endswith(_IGNORED_SUFFIX)}
  if depth is None:
    depth = infer_cifar_resnet_depth(list(state), source)
  table = _key_map(depth)

  missing = sorted(set(table) - set(state))
  if missing:
    raise ValueError(
      f"{source}: missing key {missing[0]!r} for CIFAR ResNet-{depth}"
      + (f" (and {len(missing) - 1} more: {missing[1:6]})" if len(missing) > 1 else "")
    )
  unexpected = sorted(set(state) - set(table))
  if unexpected:
    raise ValueError(
      f"{source}: unexpected key {unexpected[0]!r} for CIFAR ResNet-{depth}"
      + (f" (and {len(unexpected) - 1} more: {unexpected[1:6]})" if len(unexpected) > 1 else "")
    )

  num_classes = int(np.shape(state["linear.weight"])[0])
  shapes = _flax_shapes(depth, num_classes)
  variables: dict[str, Any] = {"params": {}, "batch_stats": {}}
  for key, (collection, path, to_flax, _) in table.items():
    value = to_flax(np.asarray(state[key], dtype=np.float32))
    expected = tuple(_get(shapes[collection], path).shape)
    if value.shape != expected:
      raise ValueError(
        f"{source}: shape mismatch for key {key!r}: got {tuple(np.shape(state[key]))} "
        f"(-> {value.shape} in Flax layout), expected Flax shape {expected} at "
        f"{collection}/{'/'.join(path)} for CIFAR ResNet-{depth}"
      )
    _set(variables[collection], path, np.ascontiguousarray(value))
  return depth, variables


def import_torch_cifar_resnet(
  npz_path: str | os.PathLike[str], depth: int | None = None
) -> tuple[int, dict[str, Any]]:
  """Loads a PyTorch CIFAR ResNet checkpoint stored as ``.npz`` into Flax variables.

  Args:
    npz_path: ``.npz`` file with one array per PyTorch ``state_dict`` key.
    depth: network depth (``6 n + 2``); inferred from the keys when None.

  Returns:
    ``(depth, variables)``; apply with
    ``CifarResNet(depth).apply(variables, x, train=False)``.

  Raises:
    ValueError: for missing/unexpected keys or shape mismatches (naming key and file).
  """
  with np.load(npz_path) as data:
    state = {k: data[k] for k in data.files}
  return torch_state_to_flax(state, depth, source=os.fspath(npz_path))


def export_torch_cifar_resnet(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Converts Flax :class:`CifarResNet` variables back to a PyTorch-layout state dict.

  Args:
    variables: ``{'params': ..., 'batch_stats': ...}`` of a ``CifarResNet``.

  Returns:
    Mapping from torch key to float32 numpy array (OIHW convs, (out, in) linear), without
    ``num_batches_tracked`` entries; ``np.savez(path, **result)`` gives a file that
    :func:`import_torch_cifar_resnet` reads.

  Raises:
    ValueError: if the variables do not have the structure of a CIFAR ResNet.
  """
  stages = [k for k in variables["params"] if re.fullmatch(r"stage1_block\d+", k)]
  depth = 6 * len(stages) + 2
  table = _key_map(depth)
  out: dict[str, np.ndarray] = {}
  for key, (collection, path, _, to_torch) in table.items():
    try:
      leaf = _get(variables[collection], path)
    except KeyError as e:
      raise ValueError(f"variables lack {collection}/{'/'.join(path)} (torch key {key!r})") from e
    out[key] = np.ascontiguousarray(to_torch(np.asarray(leaf, dtype=np.float32)))
  return out
