"""The ImageNet path end to end on `tfds.testing.mock_data`: FQ training of ResNet-18 and
MobileNet-V2 at 32x32 through the grain loader (uint8 batches normalized in the step)."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import fq_jax as fq  # noqa: E402
from configs import imagenet_mobilenet_v2, imagenet_resnet18  # noqa: E402
from fq_jax.models import get_model, torch_import  # noqa: E402
from fq_jax.pipeline import ConfigError, train_lib  # noqa: E402
from fq_jax.pipeline import configuration as cfg  # noqa: E402

tfds = pytest.importorskip("tensorflow_datasets")


@contextlib.contextmanager
def _mock_imagenet(num_examples: int = 16):
  """`tfds.testing.mock_data` for ImageNet, read through `tfds.data_source`.

  The mock cannot skip image decoding without TensorFlow, so the grain loader gets
  decoded uint8 images (which it accepts as well as JPEG bytes) instead of JPEG bytes.
  """
  real = tfds.data_source

  def data_source(*args, decoders=None, **kwargs):
    return real(*args, **kwargs)

  with tfds.testing.mock_data(num_examples=num_examples, policy=tfds.testing.MockPolicy.USE_CODE):
    tfds.data_source = data_source
    try:
      yield
    finally:
      tfds.data_source = real


def _tiny(config):
  """A few DNS and INQ steps at 32x32 on 16 mock images, every convolution compressed."""
  config.dataset.image_size = 32
  config.dataset.resize_size = 36
  config.dataset.num_workers = 0
  config.batch_size = 4
  config.eval_batch_size = 4
  config.steps_per_epoch = 2
  config.eval_steps = 1
  config.dense.epochs = None
  config.dense.steps = 0  # random init: DNS and INQ train on the mock data
  config.prune.epochs = None
  config.prune.steps = 2
  config.prune.update_every = 1
  # Every convolution (depthwise ones too) and the classifier pruned and quantized.
  config.prune.rules = ()
  config.quant.rules = ()
  config.quant.inq_fractions = (0.5, 1.0)  # two INQ steps of one update each
  config.quant.epochs_per_step = None
  config.quant.steps_per_step = 1
  config.quant.final_epochs = None
  config.quant.final_steps = 1
  config.quant.gmm_iters = 20
  config.checkpoint_every_steps = 0
  config.async_checkpointing = False
  config.progress_bar = False
  # float32 compute: bf16 convolutions are slow on a CPU; bf16 training and its encode
  # are covered by tests/test_bf16.py. (A bf16 run here once found a weight on a rounding
  # boundary that decoded one symbol away from the evaluated value: fixed in
  # fq.focused_symbols, pinned by test_quantizers' boundary test.)
  config.model.dtype = "float32"
  return config


def _fq_training_run(config, tmp_path, monkeypatch):
  """Runs the pipeline on mock ImageNet; returns (report.json, evaluated variables, decoded)."""
  from fq_jax.pipeline import artifact

  seen = {}
  encode = artifact.encode

  def recording_encode(ctx, carry, results, variables, result):
    seen["variables"] = jax.tree.map(np.asarray, jax.device_get(variables))
    return encode(ctx, carry, results, variables, result)

  monkeypatch.setattr(artifact, "encode", recording_encode)
  with _mock_imagenet():
    train_lib.run(config, str(tmp_path), log=lambda s: None)
  report = json.loads((tmp_path / "report.json").read_text())
  decoded = fq.load_fqz(tmp_path / "model.fqz").tree()
  return report, seen["variables"], decoded


# MobileNet-V2 with a shortened block table (torchvision's `inverted_residual_setting`
# idea): the stem, a t=1 block (no expansion conv), an expanding stride-2 block, an
# expanding block with its residual add, the last 1x1 conv and the classifier: every
# kind of layer and block of the full network in 14 layers instead of 54. The full
# table compiled for ~500 CPU-s here (most of it XLA compiling the same kinds of layers
# again); the full network's shapes, parameter count and torchvision conversion are
# tested in tests/test_models.py and tests/test_torch_imagenet.py.
SHORT_MOBILENET_V2 = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 1, 2))


@pytest.mark.parametrize(
  "module",
  [
    pytest.param(imagenet_resnet18, id="resnet18", marks=pytest.mark.slow(250)),
    pytest.param(imagenet_mobilenet_v2, id="mobilenet_v2", marks=pytest.mark.slow(150)),
  ],
)
def test_fq_training_on_mock_imagenet(module, tmp_path, monkeypatch):
  """DNS and INQ steps on uint8 mock ImageNet; model.fqz decodes to the evaluated model."""
  from fq_jax.models import imagenet

  monkeypatch.setattr(imagenet, "MOBILENET_V2_SETTINGS", SHORT_MOBILENET_V2)
  config = _tiny(module.get_config())
  report, evaluated, decoded = _fq_training_run(config, tmp_path, monkeypatch)
  name = config.model.name
  assert report["model"] == name and report["dataset"] == "imagenet2012"
  assert "top5" in report["compressed"]  # 1000 classes: top-5 too
  # The file decodes bit-exactly to the variables that were evaluated.
  assert jax.tree.structure(decoded) == jax.tree.structure(evaluated)
  for a, b in zip(jax.tree.leaves(decoded), jax.tree.leaves(evaluated)):
    assert a.dtype == b.dtype and np.array_equal(a, b)
  assert report["compressed"]["roundtrip_exact"]
  # Every convolution and the classifier: pruned and focused-quantized.
  kernels = [
    fq.path_str(p)
    for p, x in jax.tree_util.tree_leaves_with_path(evaluated["params"])
    if np.ndim(x) >= 2
  ]
  rows = {r["path"]: r for r in report["layers"]}
  assert sorted(rows) == sorted(kernels)
  assert all(r["kind"] in ("recentralized", "shift") for r in rows.values())
  # DNS reached its target in every layer, and the decoded kernels hold those zeros.
  target = config.prune.sparsity
  pruned = {r["path"]: r for r in report["pruned"]["layers"]}
  assert sorted(pruned) == sorted(kernels)
  for path, r in pruned.items():
    assert r["mode"] == "layer" and r["requested"] == target
    kernel = decoded["params"]
    for part in path.split("/"):
      kernel = kernel[part]
    assert np.mean(kernel == 0) >= r["reached"]  # pruned weights decode as 0
    assert abs(r["reached"] - target) <= max(0.005, 1.5 / r["size"]), path
  # Two INQ steps of one update, after two DNS updates; batches of 4 at 32x32.
  metrics = (tmp_path / "metrics.csv").read_text().splitlines()
  assert sum(r.startswith("prune,") and ",train," in r for r in metrics) == 1
  assert report["stages"]["quantize"]["steps"] == 2
  if name == "mobilenet_v2":  # the short table: blocks 0 (t=1), 1-2 (t=6, residual), 3
    blocks = sorted(k for k in decoded["params"] if k.startswith("block"))
    assert blocks == ["block0", "block1", "block2", "block3"]
    assert "expand_conv" not in decoded["params"]["block0"]
    assert "expand_conv" in decoded["params"]["block2"]


def test_mobilenet_rules_leave_depthwise_unpruned():
  config = imagenet_mobilenet_v2.get_config()
  model = get_model("mobilenet_v2")
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))[
    "params"
  ]
  rules = cfg.compression_rules(config, shapes)
  specs = {
    s.path: s
    for s in jax.tree.leaves(
      fq.resolve(shapes, rules, sparsity=config.prune.sparsity, bits=config.quant.bits)
    )
  }
  dw = [s for p, s in specs.items() if "dw_conv" in p]
  pw = [s for p, s in specs.items() if "project_conv" in p]
  assert dw and all(not s.prune and s.quantize and s.bits == 7 for s in dw)
  assert pw and all(s.prune and s.sparsity == pytest.approx(0.3174) for s in pw)


@pytest.mark.slow(8)
def test_init_from_torchvision_keys(tmp_path):
  """A torchvision-keyed .npz (and .pth) loads to the variables it was exported from."""
  model = get_model("resnet18", num_classes=1000)
  # Random values of the variables' shapes (eval_shape: no initializer to compile); every
  # value differs, so a key mapped to the wrong tensor cannot go unnoticed.
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(1), jnp.zeros((1, 32, 32, 3))))
  rng = np.random.default_rng(1)
  variables = jax.tree.map(
    lambda s: rng.standard_normal(s.shape).astype(np.float32), dict(abstract)
  )
  state = torch_import.flax_to_torchvision(variables, "resnet18")
  np.savez(tmp_path / "r18.npz", **state)
  paths = [tmp_path / "r18.npz"]
  try:
    import torch

    torch.save({k: torch.from_numpy(v.copy()) for k, v in state.items()}, tmp_path / "r18.pth")
    paths.append(tmp_path / "r18.pth")
  except ImportError:  # torch is optional: the .npz of torch keys needs none
    pass
  config = _tiny(imagenet_resnet18.get_config())
  with _mock_imagenet():
    for path in paths:
      config.init_from = str(path)
      ctx = train_lib.make_context(config, str(tmp_path / "work"))
      loaded = train_lib.initial_variables(ctx)
      assert jax.tree.structure(loaded) == jax.tree.structure(variables)
      assert jax.tree.all(jax.tree.map(np.array_equal, loaded, variables)), path
    config = _tiny(imagenet_mobilenet_v2.get_config())
    config.init_from = str(tmp_path / "r18.npz")  # ResNet-18 weights for a MobileNet
    with pytest.raises(ConfigError, match="^init_from: ") as info:
      train_lib.make_context(config, str(tmp_path / "work"))
    assert "\n" not in str(info.value) and "r18.npz" in str(info.value)
