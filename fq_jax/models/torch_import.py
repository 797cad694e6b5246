"""Conversion between PyTorch state dicts and the Flax models of :mod:`fq_jax.models`.

Two families are covered: the CIFAR ResNets (below) and torchvision's ImageNet ResNet-18,
ResNet-50 and MobileNet-V2 (:func:`torchvision_to_flax`, :func:`flax_to_torchvision`; key
tables in :func:`torchvision_key_map`). MobileNet-V1 has no torchvision weights, so it has no
importer: start it from a flat Flax ``.npz``.

CIFAR ResNets.

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

import functools
import os
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fq_jax.models import imagenet
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


def _convert(
  state: Mapping[str, Any],
  table: Mapping[str, _Entry],
  shapes: Mapping[str, Any],
  *,
  label: str,
  source: str,
) -> dict[str, Any]:
  """Moves every tensor of ``state`` to its Flax place, checking keys and shapes.

  Args:
    state: torch key -> array (``module.`` and ``num_batches_tracked`` already removed).
    table: the architecture's key map.
    shapes: ``jax.eval_shape`` of the Flax model's variables.
    label: architecture name for error messages.
    source: origin for error messages.

  Returns:
    ``{'params': ..., 'batch_stats': ...}`` with float32 numpy leaves.

  Raises:
    ValueError: naming the key and ``source`` for a missing key, an unexpected key or a
      shape mismatch.
  """
  missing = sorted(set(table) - set(state))
  if missing:
    raise ValueError(
      f"{source}: missing key {missing[0]!r} for {label}"
      + (f" (and {len(missing) - 1} more: {missing[1:6]})" if len(missing) > 1 else "")
    )
  unexpected = sorted(set(state) - set(table))
  if unexpected:
    raise ValueError(
      f"{source}: unexpected key {unexpected[0]!r} for {label}"
      + (f" (and {len(unexpected) - 1} more: {unexpected[1:6]})" if len(unexpected) > 1 else "")
    )
  variables: dict[str, Any] = {"params": {}, "batch_stats": {}}
  for key, (collection, path, to_flax, _) in table.items():
    value = to_flax(np.asarray(state[key], dtype=np.float32))
    expected = tuple(_get(shapes[collection], path).shape)
    if value.shape != expected:
      raise ValueError(
        f"{source}: shape mismatch for key {key!r}: got {tuple(np.shape(state[key]))} "
        f"(-> {value.shape} in Flax layout), expected Flax shape {expected} at "
        f"{collection}/{'/'.join(path)} for {label}"
      )
    _set(variables[collection], path, np.ascontiguousarray(value))
  return variables


def _strip(state: Mapping[str, Any]) -> dict[str, Any]:
  # DataParallel's "module." prefix and BN step counters carry nothing the Flax model uses.
  state = {k.removeprefix("module."): v for k, v in state.items()}
  return {k: v for k, v in state.items() if not k.endswith(_IGNORED_SUFFIX)}


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
  state = _strip(state)
  if depth is None:
    depth = infer_cifar_resnet_depth(list(state), source)
  table = _key_map(depth)

  num_classes = int(np.shape(state["linear.weight"])[0]) if "linear.weight" in state else 10
  shapes = _flax_shapes(depth, num_classes)
  variables = _convert(state, table, shapes, label=f"CIFAR ResNet-{depth}", source=source)
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


# --------------------------------------------------------------------------------------------
# torchvision ImageNet models
# --------------------------------------------------------------------------------------------

TORCHVISION_ARCHS: tuple[str, ...] = ("resnet18", "resnet50", "mobilenet_v2")

# Blocks per stage of the torchvision ResNets; ResNet-50 uses the v1.5 bottleneck (stride on
# the 3x3 conv), which is also what the Flax `Bottleneck` does.
# (blocks per stage, convolutions per block): the block tables of fq_jax.models.imagenet.
_RESNET_STAGES = {
  "resnet18": (imagenet.RESNET_STAGE_SIZES["resnet18"], 2),
  "resnet50": (imagenet.RESNET_STAGE_SIZES["resnet50"], 3),
}


class _Table:
  """Builds a key map: torch key -> (collection, flax path, to_flax, to_torch)."""

  def __init__(self) -> None:
    self.entries: dict[str, _Entry] = {}

  def conv(self, torch_prefix: str, flax_path: tuple[str, ...]) -> None:
    self.entries[f"{torch_prefix}.weight"] = (
      "params",
      (*flax_path, "kernel"),
      _conv_to_flax,
      _conv_to_torch,
    )

  def bn(self, torch_prefix: str, flax_path: tuple[str, ...]) -> None:
    for torch_name, collection, flax_name in _BN_FIELDS:
      self.entries[f"{torch_prefix}.{torch_name}"] = (
        collection,
        (*flax_path, flax_name),
        _identity,
        _identity,
      )

  def linear(self, torch_prefix: str, flax_path: tuple[str, ...]) -> None:
    # The classifier follows a global average pool, so its input order is the channel order
    # on both sides; only (out, in) -> (in, out) changes.
    self.entries[f"{torch_prefix}.weight"] = (
      "params",
      (*flax_path, "kernel"),
      np.transpose,
      np.transpose,
    )
    self.entries[f"{torch_prefix}.bias"] = ("params", (*flax_path, "bias"), _identity, _identity)


def _check_arch(arch: str) -> None:
  if arch not in TORCHVISION_ARCHS:
    hint = " (torchvision has no MobileNet-V1; start it from a flat Flax .npz)"
    raise ValueError(
      f"unknown torchvision architecture {arch!r}; valid: {', '.join(TORCHVISION_ARCHS)}"
      + (hint if arch == "mobilenet_v1" else "")
    )


def torchvision_key_map(arch: str) -> dict[str, _Entry]:
  """Every torch key of a torchvision model and where it lives in the Flax model.

  ResNets (``torchvision.models.resnet18/50``)::

      conv1, bn1                        -> conv_init, bn_init
      layer{s}.{b}.conv{k}, .bn{k}      -> stage{s}_block{b}/conv{k}, bn{k}
      layer{s}.0.downsample.{0,1}       -> stage{s}_block0/downsample_{conv,bn}
      fc                                -> head

  MobileNet-V2 (``torchvision.models.mobilenet_v2``)::

      features.0.{0,1}                  -> conv_init, bn_init
      features.{i+1}.conv.*             -> block{i}/{expand,dw,project}_{conv,bn}
      features.18.{0,1}                 -> conv_last, bn_last
      classifier.1                      -> head

  ``*.num_batches_tracked`` is not in the map (see :func:`flax_to_torchvision`).

  Args:
    arch: one of ``TORCHVISION_ARCHS``.

  Returns:
    torch key -> ``(collection, flax path, torch->flax, flax->torch)``.

  Raises:
    ValueError: for an unknown architecture.
  """
  _check_arch(arch)
  t = _Table()
  if arch in _RESNET_STAGES:
    stages, convs = _RESNET_STAGES[arch]
    t.conv("conv1", ("conv_init",))
    t.bn("bn1", ("bn_init",))
    for s, blocks in enumerate(stages, start=1):
      for b in range(blocks):
        block = f"stage{s}_block{b}"
        for k in range(1, convs + 1):
          t.conv(f"layer{s}.{b}.conv{k}", (block, f"conv{k}"))
          t.bn(f"layer{s}.{b}.bn{k}", (block, f"bn{k}"))
        # torchvision projects when the stride or the width changes: only in block 0
        # (stage 1 of ResNet-18 keeps 64 channels at stride 1 and has no projection).
        if b == 0 and (s > 1 or arch == "resnet50"):
          t.conv(f"layer{s}.0.downsample.0", (block, "downsample_conv"))
          t.bn(f"layer{s}.0.downsample.1", (block, "downsample_bn"))
    t.linear("fc", ("head",))
    return t.entries
  # MobileNet-V2: torchvision's features.{1..17} are the inverted residual blocks; the first
  # (expansion 1) has no expand conv, so its sequential indices are shifted by one.
  t.conv("features.0.0", ("conv_init",))
  t.bn("features.0.1", ("bn_init",))
  i = 0
  for expand, _, repeats, _ in imagenet.MOBILENET_V2_SETTINGS:
    for _ in range(repeats):
      torch_block, block = f"features.{i + 1}.conv", f"block{i}"
      layers = ["dw", "project"] if expand == 1 else ["expand", "dw", "project"]
      for j, layer in enumerate(layers):
        if layer == "project":  # a bare conv and BN, not a Conv2dNormActivation
          t.conv(f"{torch_block}.{j}", (block, "project_conv"))
          t.bn(f"{torch_block}.{j + 1}", (block, "project_bn"))
        else:
          t.conv(f"{torch_block}.{j}.0", (block, f"{layer}_conv"))
          t.bn(f"{torch_block}.{j}.1", (block, f"{layer}_bn"))
      i += 1
  t.conv(f"features.{i + 1}.0", ("conv_last",))
  t.bn(f"features.{i + 1}.1", ("bn_last",))
  t.linear("classifier.1", ("head",))
  return t.entries


def _torchvision_model(arch: str, num_classes: int, width: float) -> Any:
  if arch == "mobilenet_v2":
    return imagenet.mobilenet_v2(num_classes=num_classes, width=width)
  if width != 1.0:
    raise ValueError(f"{arch} has no width multiplier (got width={width})")
  return getattr(imagenet, arch)(num_classes=num_classes)


@functools.lru_cache(maxsize=16)  # tracing ResNet-50 takes seconds; shapes are immutable
def _torchvision_shapes(arch: str, num_classes: int, width: float) -> dict[str, Any]:
  model = _torchvision_model(arch, num_classes, width)
  x = jnp.zeros((1, 64, 64, 3), jnp.float32)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))


def torchvision_to_flax(
  state: Mapping[str, Any],
  arch: str,
  *,
  width: float = 1.0,
  source: str = "<state dict>",
) -> dict[str, Any]:
  """Converts a torchvision ImageNet state dict to variables of the Flax model.

  The Flax models use torchvision's BatchNorm (eps 1e-5; running-average momentum 0.1 in
  PyTorch's convention is 0.9 in Flax's), symmetric ``k // 2`` padding, ResNet v1.5 stride
  placement and a classifier after global average pooling, so the converted model computes
  the same function as torchvision's in eval mode.

  Args:
    state: torch key -> array (PyTorch layouts, e.g. ``model.state_dict()`` or the result of
      :func:`load_torch_state`). A ``module.`` prefix and ``num_batches_tracked`` entries are
      accepted and dropped.
    arch: "resnet18", "resnet50" or "mobilenet_v2".
    width: MobileNet-V2 width multiplier (torchvision's ``width_mult``).
    source: origin for error messages.

  Returns:
    ``{'params': ..., 'batch_stats': ...}`` (float32 numpy leaves) for
    ``get_model(arch, num_classes=C, width=...)``, ``C`` the classifier's rows.

  Raises:
    ValueError: for an unknown architecture, a missing or unexpected key or a shape mismatch
      (naming the key and ``source``).
  """
  table = torchvision_key_map(arch)
  state = _strip(state)
  head = next(k for k, v in table.items() if v[1] == ("head", "kernel"))
  num_classes = int(np.shape(state[head])[0]) if head in state else 1000
  shapes = _torchvision_shapes(arch, num_classes, width)
  return _convert(state, table, shapes, label=f"torchvision {arch}", source=source)


def flax_to_torchvision(
  variables: Mapping[str, Any], arch: str, *, num_batches_tracked: bool = True
) -> dict[str, np.ndarray]:
  """Converts Flax variables back to a torchvision state dict (numpy arrays).

  Args:
    variables: ``{'params': ..., 'batch_stats': ...}`` of ``get_model(arch, ...)``.
    arch: "resnet18", "resnet50" or "mobilenet_v2".
    num_batches_tracked: also write every BatchNorm's ``num_batches_tracked`` as int64 0
      (the Flax model has no such counter; it only matters to PyTorch's momentum=None
      BatchNorm), so that ``model.load_state_dict(..., strict=True)`` accepts the result.

  Returns:
    torch key -> numpy array in torchvision's key order (float32 OIHW convs, ``(out, in)``
    linear); ``torch.save({k: torch.from_numpy(v) ...})`` gives a loadable ``.pth``.

  Raises:
    ValueError: for an unknown architecture or variables lacking one of its tensors.
  """
  out: dict[str, np.ndarray] = {}
  for key, (collection, path, _, to_torch) in torchvision_key_map(arch).items():
    try:
      leaf = _get(variables[collection], path)
    except KeyError as e:
      raise ValueError(f"variables lack {collection}/{'/'.join(path)} (torch key {key!r})") from e
    out[key] = np.ascontiguousarray(to_torch(np.asarray(leaf, dtype=np.float32)))
    if num_batches_tracked and key.endswith(".running_var"):
      out[key.removesuffix("running_var") + "num_batches_tracked"] = np.zeros((), np.int64)
  return out


def load_torch_state(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
  """Reads a PyTorch state dict from a ``.pth``/``.pt`` file or an ``.npz`` of torch keys.

  A ``.pth`` is read with ``torch.load(..., weights_only=True)``, which refuses to unpickle
  anything but tensors and plain containers (no code from the file runs). torch is imported
  only here, so it is needed only to read ``.pth`` files. A checkpoint that wraps the state
  dict as ``{'state_dict': ...}`` or ``{'model': ...}`` is unwrapped.

  Args:
    path: the file.

  Returns:
    torch key -> numpy array.

  Raises:
    ValueError: if the file holds no mapping of names to tensors.
    ImportError: for a ``.pth`` when torch is not installed.
  """
  name = os.fspath(path)
  if name.endswith(".npz"):
    with np.load(name, allow_pickle=False) as data:
      return {k: data[k] for k in data.files}
  try:
    import torch
  except ImportError as e:
    raise ImportError(
      f"{name}: reading a .pth needs PyTorch (pip install 'fq_jax[torch]'), or convert it to "
      ".npz of torch keys where torch is installed"
    ) from e
  obj = torch.load(name, map_location="cpu", weights_only=True)
  for wrapper in ("state_dict", "model"):
    if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
      obj = obj[wrapper]
  if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
    raise ValueError(f"{name}: expected a state dict (names -> tensors), got {type(obj).__name__}")
  return {str(k): v.detach().cpu().numpy() for k, v in obj.items()}


def import_torchvision(
  source: str | os.PathLike[str] | Mapping[str, Any], arch: str, *, width: float = 1.0
) -> dict[str, Any]:
  """Loads torchvision weights (``.pth``, ``.npz`` of torch keys, or a state dict) into Flax.

  Args:
    source: a file path or an already loaded state dict.
    arch: "resnet18", "resnet50" or "mobilenet_v2".
    width: MobileNet-V2 width multiplier.

  Returns:
    ``{'params', 'batch_stats'}``; apply with ``get_model(arch).apply(v, x, train=False)`` on
    NHWC images normalized as torchvision's (``(x / 255 - mean) / std``).

  Raises:
    ValueError: as :func:`torchvision_to_flax` and :func:`load_torch_state`.
  """
  if isinstance(source, Mapping):
    return torchvision_to_flax(source, arch, width=width)
  state = load_torch_state(source)
  return torchvision_to_flax(state, arch, width=width, source=os.fspath(source))


def is_torch_state(keys: Iterable[str]) -> bool:
  """True for torch state-dict keys (``layer1.0.conv1.weight``), False for flat Flax paths.

  Args:
    keys: the names of the arrays of an ``.npz``.

  Returns:
    Whether none of the keys is a ``/``-joined Flax path.
  """
  keys = list(keys)
  return bool(keys) and not any("/" in k for k in keys)


def flat_variables(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Flattens variables to ``{'params/conv_init/kernel': array, ...}`` (``init_from``'s format).

  Args:
    variables: nested dicts of arrays.

  Returns:
    ``/``-joined path -> numpy array; ``np.savez(path, **result)`` writes the ``.npz``.
  """
  out: dict[str, np.ndarray] = {}

  def walk(node: Mapping[str, Any], prefix: str) -> None:
    for k, v in node.items():
      if isinstance(v, Mapping):
        walk(v, f"{prefix}{k}/")
      else:
        out[f"{prefix}{k}"] = np.asarray(v)

  walk(variables, "")
  return out
