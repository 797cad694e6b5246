"""Model zoo: registry, parameter counts, forward passes, CIFAR ResNet structure, digits CNN."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fq_jax import models
from fq_jax.data import epoch_batches, load_digits
from fq_jax.models import MODEL_NAMES, CifarBasicBlock, CifarResNet, get_model

IMAGENET_PARAM_COUNTS = {
  "resnet18": 11_689_512,
  "resnet50": 25_557_032,
  "mobilenet_v1": 4_231_976,
  "mobilenet_v2": 3_504_872,
}


def _abstract_variables(model: nn.Module, shape: tuple[int, ...]):
  # eval_shape: shapes and dtypes only, no initialization compute.
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))


def _count(tree) -> int:
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def _paths(tree) -> set[str]:
  return {"/".join(str(k.key) for k in path) for path, _ in jax.tree.leaves_with_path(tree)}


def test_registry_names_and_errors() -> None:
  assert set(MODEL_NAMES) == {"digits_cnn", "cifar_resnet", *IMAGENET_PARAM_COUNTS}
  with pytest.raises(ValueError, match="valid names: digits_cnn, cifar_resnet, resnet18"):
    get_model("vgg16")
  with pytest.raises(ValueError, match="6n\\+2"):
    get_model("cifar_resnet", depth=21)
  assert get_model("cifar_resnet", depth=56).depth == 56


def test_build_is_the_registry_and_every_model_has_an_integer_graph() -> None:
  assert models.build is get_model
  assert models.build("mobilenet_v2", width=0.5).width == 0.5
  for name in MODEL_NAMES:
    assert callable(models.integer_graph(name)), name
  with pytest.raises(ValueError, match="valid names"):
    models.integer_graph("vgg16")


def test_block_tables_are_the_networks_structure() -> None:
  # The public tables the networks and their integer graphs share describe the networks:
  # one block per V1 row, one per V2 repeat, and the channels the parameters have.
  v1 = _paths(_abstract_variables(get_model("mobilenet_v1"), (1, 32, 32, 3))["params"])
  assert {p.split("/")[0] for p in v1 if p.startswith("block")} == {
    f"block{i}" for i in range(len(models.MOBILENET_V1_BLOCKS))
  }
  v2 = _abstract_variables(get_model("mobilenet_v2"), (1, 32, 32, 3))["params"]
  blocks = [k for k in v2 if k.startswith("block")]
  assert len(blocks) == sum(n for _, _, n, _ in models.MOBILENET_V2_SETTINGS)
  last = len(blocks) - 1
  assert (
    v2[f"block{last}"]["project_conv"]["kernel"].shape[-1] == (models.MOBILENET_V2_SETTINGS[-1][1])
  )
  r18 = _abstract_variables(get_model("resnet18"), (1, 32, 32, 3))["params"]
  widths = tuple(r18[f"stage{s}_block0"]["conv1"]["kernel"].shape[-1] for s in range(1, 5))
  assert widths == models.RESNET_STAGE_PLANES
  cifar = _abstract_variables(get_model("cifar_resnet", depth=8), (1, 8, 8, 3))["params"]
  widths = tuple(cifar[f"stage{s}_block0"]["conv1"]["kernel"].shape[-1] for s in range(1, 4))
  assert widths == models.CIFAR_RESNET_STAGE_PLANES


@pytest.mark.parametrize("name", sorted(IMAGENET_PARAM_COUNTS))
def test_imagenet_parameter_counts(name: str) -> None:
  variables = _abstract_variables(get_model(name), (1, 224, 224, 3))
  assert _count(variables["params"]) == IMAGENET_PARAM_COUNTS[name]


@pytest.mark.parametrize("name", sorted(IMAGENET_PARAM_COUNTS))
def test_imagenet_forward_is_finite(name: str) -> None:
  model = get_model(name)
  x = jax.random.normal(jax.random.key(0), (1, 32, 32, 3))
  # Random parameters from numpy instead of model.init: the real initializers would cost
  # a compilation per model and add nothing to a shape/finiteness check.
  rng = np.random.default_rng(0)
  abstract = _abstract_variables(model, x.shape)
  params = jax.tree.map(
    lambda s: (0.05 * rng.standard_normal(s.shape)).astype(np.float32), abstract["params"]
  )
  stats = jax.tree.map(
    lambda s: rng.uniform(0.5, 1.5, s.shape).astype(np.float32), abstract["batch_stats"]
  )
  logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(
    {"params": params, "batch_stats": stats}, x
  )
  assert logits.shape == (1, 1000)
  assert logits.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(logits)))


def test_bfloat16_compute_keeps_float32_params() -> None:
  # A narrow MobileNet keeps this cheap; the dtype plumbing is the same at width 1.
  model = get_model("mobilenet_v1", num_classes=7, dtype=jnp.bfloat16, width=0.25)
  x = jnp.ones((2, 32, 32, 3))
  abstract = _abstract_variables(model, x.shape)
  assert {leaf.dtype for leaf in jax.tree.leaves(abstract)} == {jnp.dtype(jnp.float32)}
  # Random float32 values instead of model.init: a bfloat16 init compiles slowly on CPU.
  rng = np.random.default_rng(0)
  variables = jax.tree.map(
    lambda s: (0.1 * rng.standard_normal(s.shape)).astype(np.float32), abstract
  )

  @jax.jit
  def forward(variables, x):
    return model.apply(variables, x, train=True, mutable=["batch_stats"])

  logits, updates = forward(variables, x)
  assert logits.shape == (2, 7) and logits.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(logits)))
  assert {leaf.dtype for leaf in jax.tree.leaves(updates)} == {jnp.dtype(jnp.float32)}


def test_imagenet_parameter_paths_are_readable() -> None:
  paths = _paths(_abstract_variables(get_model("resnet50"), (1, 64, 64, 3))["params"])
  assert {
    "conv_init/kernel",
    "bn_init/scale",
    "stage1_block0/conv3/kernel",
    "stage2_block0/downsample_conv/kernel",
    "stage4_block2/bn3/bias",
    "head/kernel",
  } <= paths
  paths = _paths(_abstract_variables(get_model("mobilenet_v2"), (1, 64, 64, 3))["params"])
  assert {
    "block0/dw_conv/kernel",
    "block1/expand_conv/kernel",
    "block16/project_conv/kernel",
    "conv_last/kernel",
    "head/bias",
  } <= paths
  assert "block0/expand_conv/kernel" not in paths
  depthwise = _abstract_variables(get_model("mobilenet_v1"), (1, 64, 64, 3))["params"]["block3"][
    "dw_conv"
  ]
  assert depthwise["kernel"].shape == (3, 3, 1, 128)  # feature_group_count = channels


@pytest.mark.parametrize(("depth", "count"), [(20, 269_722), (56, 853_018)])
def test_cifar_resnet_structure(depth: int, count: int) -> None:
  variables = _abstract_variables(CifarResNet(depth=depth), (1, 32, 32, 3))
  assert _count(variables["params"]) == count  # DATA.md: 0.27M and 0.85M
  n = (depth - 2) // 6
  paths = _paths(variables["params"])
  assert {
    "conv_init/kernel",
    "bn_init/scale",
    "bn_init/bias",
    "stage1_block0/conv1/kernel",
    f"stage3_block{n - 1}/bn2/scale",
    "head/kernel",
    "head/bias",
  } <= paths
  assert f"stage1_block{n}/conv1/kernel" not in paths
  assert _paths(variables["batch_stats"]) >= {"bn_init/mean", "bn_init/var"}


def test_cifar_option_a_shortcut_and_symmetric_padding() -> None:
  block = CifarBasicBlock(planes=32, stride=2)
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 16))
  variables = block.init(jax.random.key(1), x, train=False)
  # Zero BN scale/bias make the residual branch exactly 0, leaving relu(shortcut).
  zeroed = jax.tree.map(jnp.zeros_like, variables["params"])
  out = block.apply({"params": zeroed, "batch_stats": variables["batch_stats"]}, x, train=False)
  expected = jnp.pad(x[:, ::2, ::2, :], ((0, 0), (0, 0), (0, 0), (8, 8)))
  np.testing.assert_array_equal(out, jax.nn.relu(expected))

  # Stride-2 3x3 conv with symmetric padding 1, as PyTorch: output o reads input rows and
  # columns 2o-1 .. 2o+1, so with a centre-only kernel output o copies input 2o. Flax's
  # 'SAME' pads (0, 1) for this shape and would copy input 2o+1 instead.
  params = jax.tree.map(jnp.zeros_like, variables["params"])
  kernel = np.zeros((3, 3, 16, 32), np.float32)
  kernel[1, 1, 0, 0] = 1.0
  params["conv1"]["kernel"] = jnp.asarray(kernel)

  def conv1_output(position: int) -> np.ndarray:
    x = jnp.zeros((1, 8, 8, 16)).at[0, position, position, 0].set(1.0)
    _, state = block.apply(
      {"params": params, "batch_stats": variables["batch_stats"]},
      x,
      train=False,
      capture_intermediates=lambda mdl, _: mdl.name == "conv1",
      mutable=["intermediates"],
    )
    return np.asarray(state["intermediates"]["conv1"]["__call__"][0][0, :, :, 0])

  expected = np.zeros((4, 4), np.float32)
  expected[1, 1] = 1.0
  np.testing.assert_array_equal(conv1_output(2), expected)
  np.testing.assert_array_equal(conv1_output(1), np.zeros((4, 4), np.float32))


def test_digits_cnn_size() -> None:
  variables = _abstract_variables(get_model("digits_cnn"), (1, 8, 8, 1))
  assert 30_000 <= _count(variables["params"]) <= 100_000
  assert {"conv1/kernel", "conv2/kernel", "fc1/kernel", "head/kernel"} <= _paths(
    variables["params"]
  )


def test_digits_cnn_trains() -> None:
  data = load_digits()
  (x_train, y_train), (x_test, y_test) = data.train, data.test
  model = get_model("digits_cnn")
  variables = model.init(jax.random.key(0), x_train[:2], train=False)
  params, stats = variables["params"], variables["batch_stats"]
  tx = optax.adam(3e-3)
  opt_state = tx.init(params)

  @jax.jit
  def train_step(params, stats, opt_state, x, y):
    def loss_fn(p):
      logits, updates = model.apply(
        {"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
      )
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updates[
        "batch_stats"
      ]

    (_, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), stats, opt_state

  for epoch in range(5):
    for batch in epoch_batches(x_train, y_train, 64, epoch=epoch, seed=0):
      params, stats, opt_state = train_step(
        params, stats, opt_state, batch["image"], batch["label"]
      )
  logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(
    {"params": params, "batch_stats": stats}, x_test
  )
  accuracy = float(np.mean(np.asarray(logits).argmax(-1) == y_test))
  assert accuracy >= 0.95, accuracy
