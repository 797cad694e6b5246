"""The ImageNet path end to end on `tfds.testing.mock_data`: ResNet-18 at 32x32, two steps a stage."""

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
  config.dataset.image_size = 32
  config.dataset.resize_size = 36
  config.dataset.num_threads = 0
  config.batch_size = 4
  config.eval_batch_size = 4
  config.steps_per_epoch = 2  # 2 updates per "epoch"
  config.eval_steps = 2
  config.dense.epochs = 0.0  # random init; the prune stage trains (DNS) on the mock data
  config.prune.epochs = 1.0
  # Post-training quantization: an FQ training step of ResNet-18 costs
  # minutes to compile and run on a CPU; the digits tests train under FQ.
  config.quant.epochs_per_step = 0.0
  config.quant.final_epochs = 0.0
  # Focused quantization of the stem and the classifier; the 19 convolutions
  # of the stages are pruned but stay float (an FQ compile per layer costs
  # seconds on a CPU). The mix also exercises prune-only layers end to end.
  config.quant.rules = ("stage[1-4]_block:quantize=false",)
  config.checkpoint_every_steps = 0
  config.progress_bar = False
  return config


@pytest.mark.slow
def test_resnet18_on_mock_imagenet(tmp_path):
  config = _tiny(imagenet_resnet18.get_config())
  assert config.quant.inq_fractions == (0.25, 0.5, 0.75, 0.875, 1.0)
  with tfds.testing.mock_data(num_examples=16, policy=tfds.testing.MockPolicy.USE_CODE):
    report = train_lib.run(config, str(tmp_path), log=lambda s: None)
  on_disk = json.loads((tmp_path / "report.json").read_text())
  assert on_disk["model"] == "resnet18" and on_disk["dataset"] == "imagenet2012"
  assert on_disk["dense"]["num_values"] > 11_689_512  # params plus batch statistics
  for section in ("dense", "compressed"):
    assert "top5" in on_disk[section]  # 1000 classes: top-5 too
  # DNS hysteresis (prune below 0.9 t) leaves the result a little under the target.
  assert 0.65 < on_disk["pruned"]["sparsity"] <= 0.7486
  assert report["compressed"]["compression_ratio"] > 2
  kinds = {r["path"]: r["kind"] for r in on_disk["layers"]}
  assert len(kinds) == 21  # 20 convolutions and the classifier
  assert kinds["stage1_block0/conv1/kernel"] == "pruned"
  assert kinds["conv_init/kernel"] in ("recentralized", "shift") and kinds["head/kernel"] in (
    "recentralized",
    "shift",
  )
  rows = (tmp_path / "metrics.csv").read_text().splitlines()
  assert sum(r.startswith("prune,") and ",train," in r for r in rows) == 1


def test_mobilenet_rules_leave_depthwise_unpruned():
  import jax
  import jax.numpy as jnp

  import fq_jax as fq
  from fq_jax.models import get_model

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


def test_init_from_torchvision_keys(tmp_path):
  """A torchvision-keyed .npz (and .pth) loads to the variables it was exported from."""
  model = get_model("resnet18", num_classes=1000)
  variables = jax.jit(lambda: model.init(jax.random.key(1), jnp.zeros((1, 32, 32, 3))))()
  variables = jax.tree.map(np.asarray, dict(variables))
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
