"""bfloat16 compute in the ImageNet models and configs, and per-device BatchNorm statistics.

The ImageNet configs train with bfloat16 activations and convolutions and float32
parameters, optimizer and FQ state; the `.fqz` must depend on those float32 values only.
"""

from __future__ import annotations

import functools
import importlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from jax.extend import core as jax_core

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import fq_jax as fq  # noqa: E402
from configs import digits, imagenet_common  # noqa: E402
from fq_jax.models import imagenet  # noqa: E402
from fq_jax.models.batchnorm import GroupedBatchNorm  # noqa: E402
from fq_jax.pipeline import ConfigError  # noqa: E402
from fq_jax.pipeline import context as context_lib  # noqa: E402
from fq_jax.pipeline import steps as steps_lib  # noqa: E402

IMAGENET_CONFIGS = ("resnet18", "resnet50", "mobilenet_v1", "mobilenet_v2")
SIZE, CLASSES, BATCH = 32, 4, 8
# The few layers the FQ test quantizes (the rest stay float): keeps `init` cheap.
FQ_RULES = (fq.Rule(pattern=r"^(conv_init|head)/kernel$"),)


@functools.cache
def _model(dtype_name: str) -> imagenet.ResNet:
  """An ImageNet ResNet with one basic block per stage (ResNet-18's blocks; cheap to compile)."""
  dtype = jnp.dtype(dtype_name).type
  return imagenet.ResNet((1, 1, 1, 1), imagenet.BasicBlock, num_classes=CLASSES, dtype=dtype)


@functools.cache
def _data():
  rng = np.random.default_rng(0)
  images = rng.normal(size=(BATCH, SIZE, SIZE, 3)).astype(np.float32)
  labels = rng.integers(0, CLASSES, size=BATCH).astype(np.int32)
  return {"image": jnp.asarray(images), "label": jnp.asarray(labels)}


@functools.cache
def _variables():
  """Initial variables (host-drawn: no init compile); the same for every computation dtype.

  Kernels are He-normal (fan-in), BatchNorm scales 1 and biases 0, statistics (0, 1).
  """
  x = jnp.zeros((1, SIZE, SIZE, 3), jnp.float32)
  shapes = jax.eval_shape(lambda: _model("float32").init(jax.random.key(0), x, train=False))
  rng = np.random.default_rng(0)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if leaf.ndim > 1:
      fan_in = int(np.prod(leaf.shape[:-1]))
      return rng.normal(0.0, np.sqrt(2.0 / fan_in), leaf.shape).astype(np.float32)
    one = name.endswith("['scale']") or name.endswith("['var']")
    return np.full(leaf.shape, 1.0 if one else 0.0, np.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def _dtypes(tree) -> set[str]:
  return {str(np.asarray(x).dtype) for x in jax.tree.leaves(tree)}


# ----------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------


def test_imagenet_configs_bf16_with_linearly_scaled_learning_rates():
  for name in IMAGENET_CONFIGS:
    c = importlib.import_module(f"configs.imagenet_{name}").get_config()
    assert c.model.dtype == "bfloat16" and c.model.batch_norm_axis == "global", name
    assert c.batch_size == imagenet_common.BASE_BATCH == 256
    lrs = lambda c: (c.dense.learning_rate, c.prune.learning_rate, c.quant.learning_rate)  # noqa: E731
    assert lrs(c) == pytest.approx((0.1, 1e-3, 1e-3))
    c.batch_size = 1024  # what --config.batch_size=1024 does: every rate x 4
    assert lrs(c) == pytest.approx((0.4, 4e-3, 4e-3))
    c.quant.learning_rate = 0.01  # a rate given explicitly is taken as it is
    c.batch_size = 512
    assert lrs(c) == pytest.approx((0.2, 2e-3, 0.01))
  for module in (digits, importlib.import_module("configs.cifar10_resnet")):
    c = module.get_config()
    assert c.model.dtype == "float32" and c.per_device_batch_size is None


def test_per_device_batch_size_scales_batch_and_learning_rate(tmp_path):
  c = digits.get_config()
  c.dense.learning_rate = imagenet_common.scaled_lr(c, 0.1)
  c.per_device_batch_size = 16
  ctx = context_lib.make_context(c, str(tmp_path / "run"), log=lambda s: None)
  n = jax.device_count()
  assert ctx.config.batch_size == 16 * n
  assert ctx.config.dense.learning_rate == pytest.approx(0.1 * 16 * n / 256)


def test_batch_norm_axis_validation(tmp_path):
  c = digits.get_config()
  c.model.batch_norm_axis = "per_device"  # digits_cnn has no grouped BatchNorm
  with pytest.raises(ConfigError, match="model.batch_norm_axis"):
    context_lib.make_context(c, str(tmp_path / "a"), log=lambda s: None)
  c.model.batch_norm_axis = "device"
  with pytest.raises(ConfigError, match="unknown batch-norm axis"):
    context_lib.make_context(c, str(tmp_path / "b"), log=lambda s: None)
  c.model.batch_norm_axis = "global"
  c.per_device_batch_size = 0
  with pytest.raises(ConfigError, match="per_device_batch_size"):
    context_lib.make_context(c, str(tmp_path / "c"), log=lambda s: None)


# ----------------------------------------------------------------------------
# bf16 compute, float32 state, and the .fqz
# ----------------------------------------------------------------------------


def test_bf16_model_computes_in_bf16_and_keeps_float32_variables():
  model = _model("bfloat16")
  x0 = jnp.zeros((1, SIZE, SIZE, 3), jnp.float32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x0, train=False))
  assert {str(v.dtype) for v in jax.tree.leaves(shapes)} == {"float32"}  # params, statistics
  variables = _variables()
  x = _data()["image"]
  apply = lambda m: jax.jit(lambda v, x: m.apply(v, x, train=True, mutable=["batch_stats"]))  # noqa: E731
  jaxpr = jax.make_jaxpr(apply(model))(variables, x)
  convs = [
    e
    for outer in jaxpr.eqns
    for sub in jax_core.jaxprs_in_params(outer.params)
    for e in sub.eqns
    if e.primitive.name == "conv_general_dilated"
  ]
  assert len(convs) == 12  # stem, 2 per block, 3 projection shortcuts
  for e in convs:
    assert [v.aval.dtype for v in e.invars] == [jnp.bfloat16, jnp.bfloat16]
  logits, updates = apply(model)(variables, x)
  assert logits.dtype == jnp.float32 and _dtypes(updates) == {"float32"}
  # Close to the float32 model (bf16 keeps ~3 significant digits; measured: 2.5% of max).
  ref, ref_updates = apply(_model("float32"))(variables, x)
  assert float(jnp.max(jnp.abs(logits - ref))) <= 0.1 * float(jnp.max(jnp.abs(ref)))
  for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(ref_updates)):
    np.testing.assert_allclose(a, b, rtol=0.05, atol=0.02)  # float32 statistics of bf16 values


@functools.cache
def _bf16_fq_run():
  """A few FQ steps of the bf16 model (the pipeline's step and forward); (losses, state)."""
  model = _model("bfloat16")
  variables = _variables()
  tx = fq.focused_quantization(
    optax.sgd(0.05, momentum=0.9), bits=5, rules=FQ_RULES, gmm_iters=10, unmatched="ignore"
  )
  state = steps_lib.TrainState(
    variables["params"], variables["batch_stats"], tx.init(variables["params"])
  )
  step = jax.jit(steps_lib.make_train_step(model, tx, fq.quantized))
  losses = []
  for _ in range(4):
    state, metrics = step(state, _data())
    losses.append(float(metrics["loss"]))
  return losses, state


def test_bf16_fq_training_loss_is_finite_and_decreases():
  losses, state = _bf16_fq_run()
  assert np.all(np.isfinite(losses)), losses
  assert losses[-1] < losses[0], losses
  # Parameters, batch statistics and the whole optimizer/FQ state stay float32 (no bf16).
  floats = _dtypes(state) - {"int32", "bool", "uint32"}
  assert floats == {"float32"}, floats
  forward = jax.eval_shape(fq.quantized, state.params, state.opt_state)
  assert {str(x.dtype) for x in jax.tree.leaves(forward)} == {"float32"}


def _fqz_bytes(path: Path, params, batch_stats, fq_state) -> bytes:
  fq.save_fqz(path, {"params": params, "batch_stats": batch_stats}, fq_state)
  return path.read_bytes()


def test_bf16_training_encodes_the_float32_model(tmp_path):
  _, state = _bf16_fq_run()
  host = jax.tree.map(np.asarray, jax.device_get(state))
  fq_state = fq.find_state(host.opt_state)
  encoded = _fqz_bytes(tmp_path / "a.fqz", host.params, host.batch_stats, fq_state)
  # The same file as from the parameters and FQ state as float32 values ...
  as_f32 = lambda t: jax.tree.map(  # noqa: E731
    lambda x: x.astype(np.float32) if np.issubdtype(x.dtype, np.floating) else x, t
  )
  again = _fqz_bytes(tmp_path / "b.fqz", as_f32(host.params), as_f32(host.batch_stats), fq_state)
  assert encoded == again
  # ... and the file would change if bf16 values reached the encoder.
  via_bf16 = jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16).astype(np.float32), host.params)
  assert _fqz_bytes(tmp_path / "c.fqz", via_bf16, host.batch_stats, fq_state) != encoded
  # Decoded weights are exactly the float32 quantized values the forward pass used.
  decoded = fq.load_fqz(tmp_path / "a.fqz").tree()["params"]
  forward = jax.tree.map(np.asarray, jax.jit(fq.quantized)(host.params, host.opt_state))
  for (path, d), f in zip(jax.tree_util.tree_leaves_with_path(decoded), jax.tree.leaves(forward)):
    assert d.dtype == f.dtype == np.float32 and np.array_equal(d, f), fq.path_str(path)
  for kernel in (forward["conv_init"], forward["head"]):
    assert np.unique(kernel["kernel"]).size <= 2**5 + 1  # 5-bit focused-quantized values


# ----------------------------------------------------------------------------
# Per-device BatchNorm statistics
# ----------------------------------------------------------------------------


def test_grouped_batch_norm_with_one_group_is_flax_batch_norm():
  x = jnp.asarray(np.random.default_rng(1).normal(2.0, 3.0, (6, 3, 3, 5)), jnp.float32)
  ref = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5)
  ours = GroupedBatchNorm(groups=1)
  v = ref.init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, ours.init(jax.random.key(0), x)) == jax.tree.map(jnp.shape, v)
  y_ref, u_ref = ref.apply(v, x, mutable=["batch_stats"])
  y, u = ours.apply(v, x, mutable=["batch_stats"])
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(u_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-6)


@pytest.mark.parametrize(
  "model",
  [
    imagenet.ResNet((1, 1, 1, 1), imagenet.BasicBlock, CLASSES, bn_groups=4),
    imagenet.ResNet((1, 1, 1, 1), imagenet.Bottleneck, CLASSES, bn_groups=4),
    imagenet.MobileNetV1(CLASSES, width=0.25, bn_groups=4),
    imagenet.MobileNetV2(CLASSES, width=0.25, bn_groups=4),
  ],
  ids=["basic", "bottleneck", "mobilenet_v1", "mobilenet_v2"],
)
def test_bn_groups_reach_every_batch_norm_in_training(model):
  x = jnp.zeros((BATCH, SIZE, SIZE, 3), jnp.float32)
  seen = []

  def record(f, args, kwargs, context):
    if isinstance(context.module, (nn.BatchNorm, GroupedBatchNorm)):
      seen.append(type(context.module).__name__)
    return f(*args, **kwargs)

  with nn.intercept_methods(record):  # tracing only: nothing is compiled
    _, variables = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), x, train=True))
  assert set(seen) == {"GroupedBatchNorm"}
  assert len(seen) == len(jax.tree.leaves(variables["batch_stats"])) // 2  # mean, var each


_PER_DEVICE_SCRIPT = textwrap.dedent(
  """
  import os
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  import jax, jax.numpy as jnp, numpy as np, flax.linen as nn
  from fq_jax.models import build
  from fq_jax.models.batchnorm import GroupedBatchNorm
  from fq_jax.pipeline import sharding
  from configs import imagenet_resnet18
  from fq_jax.pipeline.context import build_model

  assert jax.device_count() == 8
  mesh = sharding.make_mesh()
  repl, rows = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  # 8 shards of 2 rows whose means and scales differ.
  rng = np.random.default_rng(0)
  g = np.arange(8, dtype=np.float32)[:, None, None, None, None]
  x = (rng.normal(size=(8, 2, 3, 3, 4)) * (1 + g) + 5 * g).astype(np.float32).reshape(16, 3, 3, 4)
  xs = jax.device_put(x, rows)

  def run(module):
    v = module.init(jax.random.key(0), x)
    f = jax.jit(lambda v, x: module.apply(v, x, mutable=["batch_stats"]),
                in_shardings=(repl, rows))
    y, upd = f(v, xs)
    return np.asarray(y), jax.tree.map(np.asarray, upd["batch_stats"]), f.lower(v, xs)

  y, stats, lowered = run(GroupedBatchNorm(groups=8))
  # The groups are the shards: no data moves between devices, only the running averages'
  # per-channel mean (one small all-reduce).
  hlo = lowered.compile().as_text()
  assert "all-gather" not in hlo and "all-to-all" not in hlo
  assert hlo.count(" all-reduce(") == 1
  y_global, _, _ = run(nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5))
  # numpy oracle: each device's shard normalized by its own statistics.
  xg = x.reshape(8, 2, 3, 3, 4).astype(np.float64)
  mean = xg.mean(axis=(1, 2, 3), keepdims=True)
  var = xg.var(axis=(1, 2, 3), keepdims=True)
  oracle = ((xg - mean) / np.sqrt(var + 1e-5)).reshape(x.shape)
  np.testing.assert_allclose(y, oracle, rtol=2e-4, atol=2e-4)
  assert np.max(np.abs(y - y_global)) > 1.0  # global statistics give another result
  np.testing.assert_allclose(stats["mean"], 0.1 * mean.mean(axis=(0, 1, 2, 3)), rtol=1e-5)
  np.testing.assert_allclose(
    stats["var"], 0.9 + 0.1 * var.mean(axis=(0, 1, 2, 3)), rtol=1e-5)

  # The pipeline builds its ImageNet models with one group per device.
  c = imagenet_resnet18.get_config()
  assert build_model(c, 10, mesh).bn_groups == 1
  c.model.batch_norm_axis = "per_device"
  model = build_model(c, 10, mesh)
  assert model.bn_groups == 8 and model.dtype == jnp.bfloat16
  print("OK")
  """
)


def test_per_device_batch_norm_on_eight_devices():
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
  env["JAX_PLATFORMS"] = "cpu"
  out = subprocess.run(
    [sys.executable, "-c", _PER_DEVICE_SCRIPT],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]
