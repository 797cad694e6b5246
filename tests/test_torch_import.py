"""PyTorch CIFAR ResNet import: exact accuracy of the shared checkpoints, round trip, errors."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fq_jax.models import (
  CifarResNet,
  export_torch_cifar_resnet,
  import_torch_cifar_resnet,
  infer_cifar_resnet_depth,
  torch_state_to_flax,
)

try:
  from _shared_data import (
    RESNET20_NPZ,
    RESNET56_NPZ,
    cifar10_test_normalized,
    count_correct,
    require_shared,
  )
except ImportError:  # tests/ imported as a package
  from tests._shared_data import (
    RESNET20_NPZ,
    RESNET56_NPZ,
    cifar10_test_normalized,
    count_correct,
    require_shared,
  )


def _accuracy_of(npz_relative: str, expected_depth: int) -> int:
  path = require_shared(npz_relative)
  depth, variables = import_torch_cifar_resnet(path)
  assert depth == expected_depth
  images, labels = cifar10_test_normalized()
  assert len(images) == 10_000
  return count_correct(CifarResNet(depth=depth), variables, images, labels, batch_size=500)


@pytest.mark.slow(30)
def test_resnet20_import_exact_accuracy() -> None:
  # DATA.md: 81.03% on the JPEG test split. Exactness checks padding, option-A shortcut,
  # BN eps, normalization and channel order all at once.
  assert _accuracy_of(RESNET20_NPZ, 20) == 8103


@pytest.mark.slow(90)
def test_resnet56_import_exact_accuracy() -> None:
  assert _accuracy_of(RESNET56_NPZ, 56) == 8320


def test_shared_checkpoint_structure() -> None:
  path = require_shared(RESNET20_NPZ)
  depth, variables = import_torch_cifar_resnet(path, depth=20)
  assert depth == 20
  assert variables["params"]["conv_init"]["kernel"].shape == (3, 3, 3, 16)
  assert variables["params"]["stage3_block2"]["conv2"]["kernel"].shape == (3, 3, 64, 64)
  assert variables["params"]["head"]["kernel"].shape == (64, 10)
  assert variables["batch_stats"]["stage2_block0"]["bn1"]["var"].shape == (32,)
  with np.load(path) as data:
    np.testing.assert_array_equal(variables["params"]["head"]["kernel"], data["linear.weight"].T)
    np.testing.assert_array_equal(
      variables["params"]["stage2_block0"]["conv1"]["kernel"][1, 2, 5, 7],
      data["layer2.0.conv1.weight"][7, 5, 1, 2],
    )


@pytest.fixture(scope="module")
def depth32_variables() -> dict:
  # Random values of the right shapes (eval_shape, no initializer compute); batch statistics
  # are non-trivial so that a swapped mean/var or scale/bias would be caught.
  model = CifarResNet(depth=32)
  abstract = jax.eval_shape(
    lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
  )
  rng = np.random.default_rng(1)
  params = jax.tree.map(
    lambda s: (0.1 * rng.standard_normal(s.shape)).astype(np.float32), abstract["params"]
  )
  stats = jax.tree.map(
    lambda s: rng.uniform(0.5, 2.0, s.shape).astype(np.float32), abstract["batch_stats"]
  )
  return {"params": params, "batch_stats": stats}


def _as_numpy(tree):
  return jax.tree.map(np.asarray, tree)


def test_round_trip_depth32(tmp_path, depth32_variables) -> None:
  state = export_torch_cifar_resnet(depth32_variables)
  # 1 + 2 * 5 * 3 conv, 1 + 2 * 5 * 3 BN (4 tensors each), linear weight and bias.
  assert len(state) == 31 + 31 * 4 + 2
  assert state["conv1.weight"].shape == (16, 3, 3, 3)
  assert state["layer3.4.conv2.weight"].shape == (64, 64, 3, 3)
  assert state["linear.weight"].shape == (10, 64)
  # Extra buffers that PyTorch writes are accepted and ignored.
  state_with_buffers = dict(state, **{"bn1.num_batches_tracked": np.array(7)})
  path = tmp_path / "resnet32.npz"
  np.savez(path, **state_with_buffers)

  depth, variables = import_torch_cifar_resnet(path)
  assert depth == 32
  expected = _as_numpy(depth32_variables)
  got = _as_numpy(variables)
  assert jax.tree.structure(got) == jax.tree.structure(expected)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
    np.testing.assert_array_equal(a, b)

  x = jax.random.normal(jax.random.key(3), (2, 32, 32, 3))
  model = CifarResNet(depth=32)
  np.testing.assert_array_equal(
    model.apply(variables, x, train=False), model.apply(depth32_variables, x, train=False)
  )


def test_module_prefix_is_stripped(depth32_variables) -> None:
  state = {f"module.{k}": v for k, v in export_torch_cifar_resnet(depth32_variables).items()}
  depth, _ = torch_state_to_flax(state)
  assert depth == 32


def test_missing_key_names_key_and_file(tmp_path, depth32_variables) -> None:
  state = export_torch_cifar_resnet(depth32_variables)
  del state["layer2.1.bn1.running_var"]
  path = tmp_path / "missing.npz"
  np.savez(path, **state)
  with pytest.raises(ValueError, match=r"missing key 'layer2\.1\.bn1\.running_var'") as info:
    import_torch_cifar_resnet(path)
  assert str(path) in str(info.value)


def test_unexpected_key_names_key_and_file(tmp_path, depth32_variables) -> None:
  state = export_torch_cifar_resnet(depth32_variables)
  state["fc.weight"] = np.zeros((10, 64), np.float32)
  path = tmp_path / "unexpected.npz"
  np.savez(path, **state)
  with pytest.raises(ValueError, match=r"unexpected key 'fc\.weight'") as info:
    import_torch_cifar_resnet(path)
  assert "unexpected.npz" in str(info.value)


def test_shape_mismatch_names_key_and_file(tmp_path, depth32_variables) -> None:
  state = export_torch_cifar_resnet(depth32_variables)
  state["layer3.0.conv1.weight"] = np.zeros((64, 32, 5, 5), np.float32)
  path = tmp_path / "shape.npz"
  np.savez(path, **state)
  with pytest.raises(
    ValueError, match=r"shape mismatch for key 'layer3\.0\.conv1\.weight'"
  ) as info:
    import_torch_cifar_resnet(path)
  assert "shape.npz" in str(info.value)


def test_explicit_wrong_depth_is_rejected(depth32_variables) -> None:
  state = export_torch_cifar_resnet(depth32_variables)
  # A depth-32 state read as depth 20 has blocks 3 and 4 left over.
  with pytest.raises(ValueError, match=re.escape("unexpected key 'layer1.3.")):
    torch_state_to_flax(state, depth=20, source="x.npz")


def test_depth_inference() -> None:
  keys = [f"layer{s}.{b}.conv1.weight" for s in (1, 2, 3) for b in range(18)]
  assert infer_cifar_resnet_depth(keys) == 110
  with pytest.raises(ValueError, match="cannot infer"):
    infer_cifar_resnet_depth(["layer1.0.conv1.weight", "layer2.0.conv1.weight"], "bad.npz")
