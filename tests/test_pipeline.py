"""The training pipeline: config checks, rules, schedules, errors of train.py, small runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fq_jax as fq
from fq_jax.codec.metadata import ModelMetadata
from fq_jax.pipeline import ConfigError, train_lib
from fq_jax.pipeline import configuration as cfg
from fq_jax.pipeline import context as context_lib
from fq_jax.pipeline import steps as steps_lib

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the configs/ package, as train.py sees it

from configs import (  # noqa: E402  # noqa: E402
  cifar10_resnet,
  default,
  digits,
  imagenet_mobilenet_v1,
  imagenet_mobilenet_v2,
  imagenet_resnet18,
  imagenet_resnet50,
)

ALL_CONFIGS = (
  default,
  digits,
  cifar10_resnet,
  imagenet_resnet18,
  imagenet_resnet50,
  imagenet_mobilenet_v1,
  imagenet_mobilenet_v2,
)


def _flat_keys(d, prefix=""):
  out = set()
  for k, v in d.items():
    out |= _flat_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k}
  return out


@pytest.mark.parametrize("module", ALL_CONFIGS, ids=lambda m: m.__name__.split(".")[-1])
def test_configs_validate_and_share_keys(module):
  config = module.get_config()
  if config.dataset.name == "cifar10":
    config.init_from = ""
  cfg.validate(config)
  # Every config has every key, so any --config.x override works with any file.
  assert _flat_keys(config.to_dict()) == _flat_keys(default.get_config().to_dict())


CONTRACT_KEYS = (
  "init_from",
  "model.depth",
  "dense.epochs",
  "prune.method",
  "prune.sparsity",
  "prune.epochs",
  "prune.rules",
  "quant.bits",
  "quant.w_sep",
  "quant.epochs_per_step",
  "batch_size",
  "dense.learning_rate",
  "seed",
  "model.name",
  "dataset.name",
  "quant.inq_order",
  "quant.refit_every_epochs",
  "quant.rules",
  "checkpoint_every_steps",
  "eval_batch_size",
  "optimizer.weight_decay",
  "optimizer.momentum",
  "log_every",
)


def test_contract_keys_exist():
  assert set(CONTRACT_KEYS) <= _flat_keys(default.get_config().to_dict())


@pytest.mark.parametrize(
  "key, value, match",
  [
    ("prune.sparsity", 1.0, "prune.sparsity"),
    ("prune.sparsity", -0.1, "prune.sparsity"),
    ("prune.sparsity", None, "prune.sparsity and prune.sensitivity"),  # neither
    ("prune.sensitivity", 1.0, "prune.sparsity and prune.sensitivity"),  # both
    ("prune.scope", "network", "prune.scope"),
    ("prune.rules", ("conv1:sensitivity=1.0,sparsity=0.5",), "prune.rules"),
    ("quant.rules", ("conv1:sensitivity=1.0",), "quant.rules"),
    ("quant.bits", 1, "quant.bits"),
    ("quant.bits", 9, "quant.bits"),
    ("prune.method", "random", "prune.method"),
    ("model.name", "vgg16", "model.name"),
    ("dataset.name", "mnist", "dataset.name"),
    ("init_from", "/nonexistent/model.npz", "init_from"),
    ("batch_size", 0, "batch_size"),
    ("quant.inq_order", "random", "quant.inq_order"),
    ("dense.lr_schedule", "linear", "dense.lr_schedule"),
    ("quant.rules", ("conv1:bits=9",), "quant.rules"),
    ("quant.rules", ("conv1:colour=red",), "quant.rules"),
    ("quant.rules", ("no colon",), "quant.rules"),
    ("model.depth", 20, "model.depth"),
    ("prune.rules", ("conv1:bits=6",), "prune.rules"),
    ("quant.rules", ("conv1:sparsity=0.5",), "quant.rules"),
    ("encode.coder", "zstd", "encode.coder"),
    ("dense.learning_rate", float("inf"), "dense.learning_rate"),
    ("quant.learning_rate", 0.0, "quant.learning_rate"),
    ("prune.learning_rate", float("nan"), "prune.learning_rate"),
    ("steps_per_epoch", 0, "steps_per_epoch"),
    ("eval_steps", 0, "eval_steps"),
  ],
)
def test_validate_names_the_bad_key(key, value, match):
  config = digits.get_config()
  node = config
  *parents, leaf = key.split(".")
  for p in parents:
    node = node[p]
  with node.ignore_type():
    node[leaf] = value
  with pytest.raises(ConfigError, match=f"^{match}: ") as info:
    cfg.validate(config)
  assert "\n" not in str(info.value)


def test_parse_rule():
  rule = cfg.parse_rule("conv_init/kernel$:bits=8,sparsity=0")
  assert rule == fq.Rule(pattern="conv_init/kernel$", bits=8, sparsity=0.0)
  rule = cfg.parse_rule("dw_conv/kernel$:prune=false, w_sep=3")
  assert rule == fq.Rule(pattern="dw_conv/kernel$", prune=False, w_sep=3.0)
  config = digits.get_config()
  with config.ignore_type():
    config.quant.rules = "a/kernel$:bits=6; b/kernel$:quantize=no"  # one string works too
  assert [r.pattern for r in cfg.stage_rules(config, "quant")] == ["a/kernel$", "b/kernel$"]


def test_prune_and_quant_rules_each_set_their_own_stage():
  """Each leaf takes its pruning from prune.rules and its quantization from quant.rules."""
  params = {
    "a": {"kernel": jnp.zeros((3, 3)), "bias": jnp.zeros(3)},
    "b": {"kernel": jnp.zeros((3, 3))},
    "c": {"kernel": jnp.zeros((3, 3))},
  }
  config = digits.get_config()
  config.prune.sparsity = 0.8
  config.quant.bits = 5
  config.prune.rules = ("a/kernel$:sparsity=0.3", "c/kernel$:prune=false")
  config.quant.rules = ("a/kernel$:bits=7", "b/kernel$:quantize=false")
  rules = cfg.compression_rules(config, params)
  specs = fq.resolve(params, rules, sparsity=0.8, bits=5)
  a, b, c = specs["a"]["kernel"], specs["b"]["kernel"], specs["c"]["kernel"]
  assert specs["a"]["bias"] is None  # neither list compresses biases
  assert (a.prune, a.sparsity, a.quantize, a.bits) == (True, 0.3, True, 7)
  assert (b.prune, b.sparsity, b.quantize) == (True, 0.8, False)
  assert (c.prune, c.sparsity, c.quantize, c.bits) == (False, 0.0, True, 5)


def test_prune_sensitivity_and_scope_are_checked():
  config = digits.get_config()
  config.prune.sparsity = None
  config.prune.sensitivity = float("nan")
  with pytest.raises(ConfigError, match="^prune.sensitivity: must be a finite number"):
    cfg.validate(config)
  config.prune.sensitivity = 0.5
  config.prune.rules = ("conv1/kernel$:sensitivity=1.5", "conv2/kernel$:sparsity=0.3")
  cfg.validate(config)  # prune.rules may set sensitivity
  config.prune.scope = "global"  # one threshold needs a global target
  with pytest.raises(ConfigError, match="^prune.scope: 'global' needs prune.sparsity"):
    cfg.validate(config)


def test_compression_rules_carry_the_sensitivity():
  """A rule's sensitivity, or the global one, reaches the exact per-leaf rules."""
  params = {k: {"kernel": jnp.zeros((3, 3))} for k in "abc"}
  config = digits.get_config()
  config.prune.sparsity, config.prune.sensitivity = None, 0.5
  config.prune.rules = ("a/kernel$:sensitivity=1.5", "b/kernel$:sparsity=0.3")
  rules = cfg.compression_rules(config, params)
  specs = fq.resolve(params, rules)
  a, b, c = (specs[k]["kernel"] for k in "abc")
  assert (a.sensitivity, b.sensitivity, b.sparsity, c.sensitivity) == (1.5, None, 0.3, 0.5)


def _digits_context(tmp_path, **prune):
  config = digits.get_config()
  config.prune.rules = ()
  for key, value in prune.items():
    config.prune[key] = value
  ctx = train_lib.make_context(config, str(tmp_path))
  return ctx, train_lib.initial_variables(ctx)["params"]


def test_initial_dns_masks_follow_the_sensitivity(tmp_path):
  """From all kept, DNS prunes |w| < 0.9 t with t = mean|w| + a std|w| (Guo et al.)."""
  from fq_jax.pipeline import plans

  ctx, params = _digits_context(tmp_path, sparsity=None, sensitivity=0.8)
  masks = plans.initial_masks(ctx, params)
  for name in ("conv1", "conv2", "fc1", "head"):
    w = np.abs(np.asarray(params[name]["kernel"], np.float64))
    t = w.mean() + 0.8 * w.std()
    np.testing.assert_array_equal(np.asarray(masks[name]["kernel"]), w >= 0.9 * t)
  report = context_lib.sparsity_report(ctx, params, masks)
  assert {r["mode"] for r in report["layers"]} == {"sensitivity"}
  assert report["total"]["requested"] is None


def test_global_scope_prunes_one_threshold(tmp_path):
  """Magnitude pruning with scope global: one magnitude threshold over all layers."""
  from fq_jax.pipeline import plans

  ctx, params = _digits_context(tmp_path, method="magnitude", sparsity=0.7, scope="global")
  masks = plans.initial_masks(ctx, params)
  names = ("conv1", "conv2", "fc1", "head")
  pooled = np.concatenate([np.abs(np.asarray(params[n]["kernel"])).ravel() for n in names])
  t = np.sort(pooled)[round(0.7 * pooled.size)]  # the smallest kept magnitude
  for n in names:
    np.testing.assert_array_equal(
      np.asarray(masks[n]["kernel"]), np.abs(np.asarray(params[n]["kernel"])) >= t
    )
  report = context_lib.sparsity_report(ctx, params, masks)
  assert report["total"]["reached"] == pytest.approx(0.7, abs=1e-4)
  assert report["total"]["requested"] == pytest.approx(0.7)
  assert {r["mode"] for r in report["layers"]} == {"global"}
  assert len({round(r["reached"], 3) for r in report["layers"]}) > 1  # per-layer differ


def test_sources_come_from_the_dataset_registry(tmp_path):
  from fq_jax import data as data_lib
  from fq_jax.pipeline import input_pipeline

  assert cfg.DATASET_NAMES == tuple(data_lib.DATASETS)
  config = digits.get_config()
  source = input_pipeline.make_source(config)
  info = data_lib.get_dataset("digits")
  assert (source.image_shape, source.num_classes) == (info.input_shape, info.num_classes)
  batch = next(source.train_epoch(0))
  assert batch["image"].dtype == np.float32 and batch["image"].shape[1:] == info.input_shape
  config.dataset.name = "cifar10"
  config.dataset.data_dir = str(tmp_path / "missing")
  with pytest.raises(ConfigError, match="^dataset.data_dir: CIFAR-10 archive not found"):
    input_pipeline.make_source(config)


def test_uint8_batches_are_normalized_inside_the_step():
  """uint8 images are normalized in the jitted step as the host pipeline did; floats pass."""
  from fq_jax.data import imagenet as imagenet_data
  from fq_jax.pipeline import input_pipeline

  images = np.random.default_rng(0).integers(0, 256, (2, 5, 5, 3), dtype=np.uint8)
  step = jax.jit(input_pipeline.normalizing(lambda x, batch: batch["image"] * x))
  got = step(1.0, {"image": images, "label": np.zeros(2, np.int32)})
  want = np.stack([imagenet_data._normalize(im) for im in images])
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
  floats = np.random.default_rng(1).normal(size=(2, 5, 5, 3)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(step(1.0, {"image": floats})), floats)


def test_quant_steps_follow_the_paper_ratio():
  config = digits.get_config()
  config.quant.epochs_per_step = 3.0
  config.quant.final_epochs = None
  q = cfg.quant_steps(config, steps_per_epoch=10)
  assert (q.per_inq_step, q.final, q.total, q.boundaries()) == (30, 100, 220, (30, 60, 90, 120))
  config.quant.final_epochs = 2.0
  q = cfg.quant_steps(config, steps_per_epoch=10)
  assert (q.total, q.refit_every) == (140, 30)
  config.quant.inq_fractions = (1.0,)
  q = cfg.quant_steps(config, steps_per_epoch=10)
  assert (q.total, q.boundaries()) == (20, ())  # everything quantized at once, then fine-tuned
  config.quant.epochs_per_step = 0.0
  q = cfg.quant_steps(config, steps_per_epoch=10)
  assert (q.total, q.boundaries()) == (0, ())  # post-training quantization, whatever final_epochs


def test_stage_schedule_restarts_and_steps():
  s = steps_lib.stage_schedule(
    "step", 1e-3, 200, decay_steps=30, decay_factor=0.5, restarts=(30, 60)
  )
  got = [float(s(i)) for i in (0, 29, 30, 59, 60, 89, 90, 120)]
  np.testing.assert_allclose(got, [1e-3, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3, 5e-4, 2.5e-4], rtol=1e-6)
  c = steps_lib.stage_schedule("cosine", 0.1, 100)
  np.testing.assert_allclose(
    [float(c(0)), float(c(50)), float(c(100))], [0.1, 0.05, 0.0], atol=1e-7
  )


def test_keep_pruned_never_revives_weights():
  params = {"kernel": jnp.array([[1.0, 0.0], [0.0, 2.0]]), "bias": jnp.ones(2)}
  masks = {"kernel": params["kernel"] != 0, "bias": None}
  tx = steps_lib.keep_pruned(steps_lib.sgd(lambda _: 0.1, momentum=0.9, weight_decay=1e-2), masks)
  state = tx.init(params)
  for _ in range(3):
    grads = jax.tree.map(jnp.ones_like, params)
    updates, state = tx.update(grads, state, params)
    params = jax.tree.map(jnp.add, params, updates)
  assert float(params["kernel"][0, 1]) == 0.0 and float(params["kernel"][1, 0]) == 0.0
  assert float(params["kernel"][0, 0]) != 1.0


def test_config_differences_ignore_volatile_keys():
  a = cfg.config_json(digits.get_config())
  config = digits.get_config()
  config.log_every = 3
  config.progress_bar = False
  assert cfg.config_differences(a, cfg.config_json(config)) == []
  config.prune.sparsity = 0.5
  assert cfg.config_differences(a, cfg.config_json(config)) == ["prune.sparsity"]


# ----------------------------------------------------------------------------
# train.py: one-line errors
# ----------------------------------------------------------------------------


def _train_py(*args, cwd=REPO, timeout=120):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run(
    [sys.executable, "train.py", *args],
    cwd=cwd,
    capture_output=True,
    text=True,
    timeout=timeout,
    env=env,
  )


@pytest.mark.parametrize(
  "args, expected",
  [
    (["--config.bogus=1"], "error: unknown config key 'bogus'"),
    (
      ["--config=configs/cifar10_resnet.py", "--config.prune.bogus=1"],
      "error: unknown config key 'prune.bogus'",
    ),
    (["--config.prune.sparsity=1.5"], "error: prune.sparsity: must be in [0, 1)"),
    (
      ["--config.init_from=/nonexistent/r20.npz"],
      "error: init_from: file not found: /nonexistent/r20.npz",
    ),
    (["--config.quant.bits=five"], "error: flag --config.quant.bits=five"),
    (["--config=configs/missing.py"], "error: config: cannot load configs/missing.py"),
  ],
)
def test_train_py_bad_config_is_one_line(args, expected, tmp_path):
  result = _train_py(f"--workdir={tmp_path / 'w'}", *args)
  assert result.returncode != 0
  lines = [l for l in result.stderr.splitlines() if l.strip() and "Warning" not in l]
  assert len(lines) == 1, result.stderr
  assert lines[0].startswith(expected), lines[0]
  assert "Traceback" not in result.stderr


# ----------------------------------------------------------------------------
# Small in-process runs
# ----------------------------------------------------------------------------


def _tiny_digits(**overrides):
  c = digits.get_config()
  c.dense.epochs = 2.0
  c.prune.epochs = 1.0
  c.quant.epochs_per_step = 0.0
  c.quant.final_epochs = 0.0
  c.progress_bar = False
  c.checkpoint_every_steps = 0
  c.prune.rules = ()
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


@pytest.mark.slow(40)
def test_magnitude_pruning_and_post_training_quantization(tmp_path):
  config = _tiny_digits(**{"prune.method": "magnitude", "prune.sparsity": 0.8})
  lines = []
  report = train_lib.run(config, str(tmp_path), log=lines.append)
  on_disk = json.loads((tmp_path / "report.json").read_text())
  assert on_disk["compressed"] == json.loads(json.dumps(report["compressed"]))
  assert on_disk["model"] == "digits_cnn" and on_disk["dataset"] == "digits"
  d, p, c = on_disk["dense"], on_disk["pruned"], on_disk["compressed"]
  assert d["num_values"] == 68_938 and d["float32_bytes"] == 4 * 68_938
  assert 0.5 < d["accuracy"] <= 1.0 and "top5" not in d  # 10 classes: top-1 only
  assert p["sparsity"] == pytest.approx(0.8, abs=0.01)
  assert c["bits"] == 5 and 0.0 <= c["accuracy"] <= 1.0
  # The real file: its size is what the ratio counts, and the codec gives the paper-style ratio.
  assert c["estimate"] is False and c["roundtrip_exact"]
  assert c["artifact_bytes"] == os.path.getsize(tmp_path / "model.fqz")
  written = fq.load_fqz(tmp_path / "model.fqz")
  summary = fq.artifact_summary(written)
  assert c["paper_style_compression_ratio"] == summary["paper_style_compression_ratio"]
  meta = ModelMetadata.from_json(written.metadata)
  assert (meta.model, meta.dataset, meta.num_classes, meta.bits) == ("digits_cnn", "digits", 10, 5)
  assert c["compression_ratio"] == pytest.approx(d["float32_bytes"] / c["artifact_bytes"])
  assert c["compression_ratio"] > 10 and c["paper_style_compression_ratio"] > c["compression_ratio"]
  assert [r["path"] for r in on_disk["layers"]] == [
    "conv1/kernel",
    "conv2/kernel",
    "fc1/kernel",
    "head/kernel",
  ]
  assert all(r["kept"] < r["size"] for r in on_disk["layers"])
  for r in on_disk["layers"]:  # requested (the rules) and reached (the masks) per layer
    assert r["requested_sparsity"] == 0.8
    assert r["sparsity"] == pytest.approx(1 - r["kept"] / r["size"])
    assert r["sparsity"] == pytest.approx(0.8, abs=0.01)
  # fq.sparsity_report under "pruned": requested against reached, per layer and in total.
  reached = {r["path"]: r["reached"] for r in p["layers"]}
  assert reached == {r["path"]: pytest.approx(r["sparsity"]) for r in on_disk["layers"]}
  assert {r["requested"] for r in p["layers"]} == {0.8} and p["total"]["requested"] == 0.8
  assert p["total"]["reached"] == pytest.approx(p["sparsity"])
  assert set(on_disk["seconds"]) >= {"dense", "prune", "quantize", "evaluate", "encode"}
  stages, spe = on_disk["stages"], on_disk["stages"]["steps_per_epoch"]
  assert stages["dense"] == {"steps": 2 * spe, "epochs": 2.0}  # given in epochs, shown in both
  assert stages["prune"] == {"steps": spe, "epochs": 1.0}
  text = "\n".join(lines)
  assert "compression ratio" in text and "fc1/kernel" in text  # summary and per-layer table
  rows = (tmp_path / "metrics.csv").read_text().splitlines()
  assert rows[0].startswith("stage,epoch,step,split,loss,accuracy")
  assert sum(r.startswith("dense,") and ",train," in r for r in rows) == 2


def test_reference_only_trains_float_for_the_same_steps(tmp_path):
  config = _tiny_digits(**{"reference_only": True, "dense.epochs": 0.0})
  config.prune.epochs, config.prune.steps = None, 5  # a stage length in steps
  lines = []
  report = train_lib.run(config, str(tmp_path), log=lines.append)
  spe = report["stages"]["steps_per_epoch"]
  assert report["stages"]["prune"] == {"steps": 5, "epochs": 5 / spe}
  assert f"prune 5 steps ({5 / spe:.3g} epochs)" in "\n".join(lines)
  c = report["compressed"]
  assert report["reference_only"] and report["layers"] == []
  assert c["compression_ratio"] == pytest.approx(1.0, rel=0.01) and c["bits"] == 32
  assert report["pruned"]["sparsity"] == 0.0
  rows = (tmp_path / "metrics.csv").read_text().splitlines()
  assert sum(r.startswith("prune,") and ",train," in r for r in rows) == 1  # float fine-tuning ran
  assert [r for r in rows if r.startswith("prune,") and ",train," in r][0].split(",")[2] == "5"


def test_prune_only_without_quantization(tmp_path):
  config = _tiny_digits(
    **{
      "dense.epochs": 0.0,
      "prune.epochs": 0.0,
      "prune.method": "magnitude",
      "prune.sparsity": 0.9,
      "quant.enabled": False,
    }
  )
  report = train_lib.run(config, str(tmp_path), log=lambda s: None)
  c = report["compressed"]
  assert c["bits"] == 32 and c["accuracy"] == report["pruned"]["accuracy"]
  assert {r["kind"] for r in report["layers"]} == {"pruned"}
  assert 3 < c["compression_ratio"] < 10  # float32 values of 10% of the weights plus positions


def test_init_from_flat_npz(tmp_path):
  from fq_jax.models import get_model
  from fq_jax.pipeline import checkpoint

  model = get_model("digits_cnn")
  variables = model.init(jax.random.key(3), jnp.zeros((1, 8, 8, 1)), train=False)
  path = str(tmp_path / "init.npz")
  checkpoint.save_variables_npz(path, variables)
  config = digits.get_config()
  config.init_from = path
  ctx = train_lib.make_context(config, str(tmp_path))
  loaded = train_lib.initial_variables(ctx)
  assert jax.tree.all(
    jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), loaded, dict(variables))
  )
  other = jax.tree.map(lambda x: np.zeros((2, *x.shape), x.dtype), dict(variables))  # wrong shapes
  checkpoint.save_variables_npz(path, other)
  with pytest.raises(ConfigError, match="^init_from: .* does not match"):
    train_lib.make_context(config, str(tmp_path))


def test_init_from_pytorch_weights_needs_an_importer(tmp_path):
  config = digits.get_config()
  for name in ("weights.pth", "weights.npz"):
    path = tmp_path / name
    if name.endswith(".npz"):
      np.savez(path, **{"conv1.weight": np.zeros((2, 1, 3, 3), np.float32)})
    else:
      path.write_bytes(b"")
    config.init_from = str(path)
    with pytest.raises(ConfigError, match="^init_from: .* digits_cnn imports none") as info:
      train_lib.make_context(config, str(tmp_path))
    assert "\n" not in str(info.value)
  config.init_from = str(tmp_path / "weights.pkl")
  (tmp_path / "weights.pkl").write_bytes(b"")
  with pytest.raises(ConfigError, match="^init_from: expected a .npz .* or a torchvision .pth"):
    cfg.validate(config)


# ----------------------------------------------------------------------------
# Stage lengths in steps or epochs
# ----------------------------------------------------------------------------


def test_stage_lengths_in_steps_or_epochs():
  config = digits.get_config()
  config.dense.epochs = 2.5
  config.prune.epochs, config.prune.steps = None, 7
  config.quant.epochs_per_step, config.quant.steps_per_step = None, 3
  config.quant.final_epochs, config.quant.final_steps = None, 5
  cfg.validate(config)
  assert cfg.stage_steps(config, steps_per_epoch=10) == {
    "dense": 25,
    "prune": 7,
    "quantize": 4 * 3 + 5,
  }
  q = cfg.quant_steps(config, steps_per_epoch=10)
  assert (q.per_inq_step, q.final, q.refit_every, q.boundaries()) == (3, 5, 3, (3, 6, 9, 12))
  config.quant.final_steps = None  # the paper's 10/3 of the INQ step, in steps
  assert cfg.quant_steps(config, steps_per_epoch=10).final == 10
  config.prune.epochs = 1.0
  with pytest.raises(ConfigError) as info:
    cfg.validate(config)
  assert str(info.value) == (
    "prune.epochs and prune.steps: both set; give this length in epochs or in steps, not both"
  )
  config.prune.epochs, config.prune.steps = None, None
  with pytest.raises(ConfigError, match=r"^prune.epochs: the stage length is not set"):
    cfg.validate(config)


# ----------------------------------------------------------------------------
# train.py checks the whole config before the first step
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
  "args, expected",
  [
    (
      ["--config.encode.coder=zstd"],
      "error: encode.coder: unknown coder 'zstd' (valid: ans, huffman)",
    ),
    (
      ["--config.dense.learning_rate=inf"],
      "error: dense.learning_rate: must be a finite number > 0, got inf",
    ),
    (
      ["--config.quant.learning_rate=-0.1"],
      "error: quant.learning_rate: must be a finite number > 0, got -0.1",
    ),
    (
      ["--config.steps_per_epoch=0"],
      "error: steps_per_epoch: must be -1 (the whole split) or a positive integer, got 0",
    ),
    (
      ["--config.eval_steps=0"],
      "error: eval_steps: must be -1 (the whole split) or a positive integer, got 0",
    ),
    (
      ["--config.prune.steps=5", "--config.prune.epochs=1"],
      "error: prune.epochs and prune.steps: both set; "
      "give this length in epochs or in steps, not both",
    ),
    # A length in steps replaces the file's length in epochs: the check goes on to the coder.
    (
      ["--config.prune.steps=5", "--config.encode.coder=zstd"],
      "error: encode.coder: unknown coder 'zstd' (valid: ans, huffman)",
    ),
    (
      ["--config.quant.rules=('conv1:sparsity=0.5',)"],
      "error: quant.rules: rule 'conv1:sparsity=0.5' sets 'sparsity', a setting of prune.rules "
      "(quant.rules sets quantize, bits, w_sep, recentralize, min_ndim)",
    ),
    (["WORKDIR_IS_FILE"], "error: workdir: {file} is not a folder"),
    (["WORKDIR_UNDER_FILE"], "error: workdir: cannot write to {file}/w: Not a directory"),
  ],
)
def test_train_py_checks_everything_before_training(args, expected, tmp_path):
  file = tmp_path / "file"
  file.write_text("not a folder")
  workdir = {"WORKDIR_IS_FILE": file, "WORKDIR_UNDER_FILE": file / "w"}.get(args[0])
  if workdir is not None:
    args = []
  workdir = workdir or tmp_path / "w"
  result = _train_py(f"--workdir={workdir}", *args)
  assert result.returncode != 0
  lines = [l for l in result.stderr.splitlines() if l.strip() and "Warning" not in l]
  assert lines == [expected.format(file=file)], result.stderr
  assert not (tmp_path / "w" / "metrics.csv").exists()  # nothing ran


def test_read_only_workdir_is_one_line(tmp_path, monkeypatch):
  def refuse(path, *a, **k):
    raise PermissionError(13, "Permission denied", path)

  # Root ignores file modes, so the refusal is simulated where the check writes its probe.
  monkeypatch.setattr(cfg, "open", refuse, raising=False)
  with pytest.raises(ConfigError) as info:
    cfg.check_workdir(str(tmp_path))
  assert str(info.value) == f"workdir: cannot write to {tmp_path}: Permission denied"
