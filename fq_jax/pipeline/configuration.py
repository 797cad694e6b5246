"""Configuration checks and the pure pieces derived from a config.

Everything here turns an `ml_collections.ConfigDict` (see `configs/*.py`) into
plain values: validated settings, compression rules, stage step counts. A bad
setting raises `ConfigError`, whose message is one line that starts with the
offending key, so `train.py` can print it without a traceback.

Rule override syntax (`quant.rules`): a tuple of strings (or one string with
';' between rules), each `REGEX:key=value[,key=value...]`, for example

    "conv_init/kernel$:bits=8,sparsity=0"
    "dw_conv/kernel$:prune=false"
    "head/kernel$:sparsity=0.5,w_sep=3"

The part before the last ':' is a regular expression searched in the
'/'-joined parameter path (`conv1/kernel`, `stage1_block0/conv2/kernel`, ...);
keys are the fields of `fq.Rule`: prune, quantize, recentralize (true/false),
sparsity, w_sep (float), bits, min_ndim (int). The rules are tried in order
before `fq.DEFAULT_RULES` (every conv and dense kernel), and they drive both
pruning and quantization.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any

import fq_jax as fq
from fq_jax._src import rule_syntax
from fq_jax._src.quantizers import MAX_BITS, MIN_BITS

MODEL_NAMES = ("digits_cnn", "cifar_resnet", "resnet18", "resnet50", "mobilenet_v1", "mobilenet_v2")
DATASET_NAMES = ("digits", "cifar10", "imagenet2012")
PRUNE_METHODS = ("dns", "magnitude", "none")
LR_SCHEDULES = ("cosine", "step", "constant")

# Stage names, in order; a checkpoint position is (stage, step within stage).
TRAIN_STAGES = ("dense", "prune", "quantize")
STAGES = TRAIN_STAGES + ("evaluate",)

# Keys that may differ between the run that wrote a checkpoint and the run
# that resumes it: they change logging or checkpoint cadence, not the numbers.
VOLATILE_KEYS = (
  "progress_bar",
  "log_every",
  "checkpoint_every_steps",
  "max_checkpoints",
  "async_checkpointing",
  "jax_cache_dir",
  "dataset.num_threads",
)


class ConfigError(ValueError):
  """A bad configuration value; `str(e)` is one line naming the key."""

  def __init__(self, key: str, message: str):
    self.key = key
    super().__init__(f"{key}: {message}")


_BOOL_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
_RULE_FIELDS = {
  "prune": "bool",
  "quantize": "bool",
  "recentralize": "bool",
  "sparsity": "float",
  "w_sep": "float",
  "bits": "int",
  "min_ndim": "int",
}


def parse_rule(text: str, key: str = "quant.rules") -> fq.Rule:
  """Parses one `REGEX:key=value,...` override (`fq_jax._src.rule_syntax`), naming `key` in errors."""
  try:
    return rule_syntax.parse_rule(text)
  except rule_syntax.RuleSyntaxError as e:
    raise ConfigError(key, str(e)) from None


def compression_rules(config) -> tuple[fq.Rule, ...]:
  """The config's rule overrides followed by `fq.DEFAULT_RULES`."""
  raw = config.quant.rules
  if isinstance(raw, str):
    raw = [r for r in raw.split(";")]
  texts = [r.strip() for r in raw if r and r.strip()]
  return tuple(parse_rule(t) for t in texts) + tuple(fq.DEFAULT_RULES)


def _check(cond: bool, key: str, message: str) -> None:
  if not cond:
    raise ConfigError(key, message)


def validate(config) -> None:
  """Checks every setting a run depends on.

  Raises:
    ConfigError: naming the first bad key.
  """
  c = config
  _check(
    c.model.name in MODEL_NAMES,
    "model.name",
    f"unknown model {c.model.name!r} (valid: {', '.join(MODEL_NAMES)})",
  )
  if c.model.depth is not None:
    _check(
      c.model.name == "cifar_resnet",
      "model.depth",
      f"only cifar_resnet has a depth, not {c.model.name!r}",
    )
    _check(
      c.model.depth >= 8 and (c.model.depth - 2) % 6 == 0,
      "model.depth",
      f"must be 6n+2 (20, 32, 44, 56, 110, ...), got {c.model.depth}",
    )
  _check(
    c.dataset.name in DATASET_NAMES,
    "dataset.name",
    f"unknown dataset {c.dataset.name!r} (valid: {', '.join(DATASET_NAMES)})",
  )
  if c.init_from:
    _check(os.path.isfile(c.init_from), "init_from", f"file not found: {c.init_from}")
    _check(
      c.init_from.endswith(".npz"),
      "init_from",
      f"expected a .npz file (PyTorch CIFAR ResNet or flat Flax variables), got {c.init_from}",
    )
  for key in ("batch_size", "eval_batch_size"):
    _check(isinstance(c[key], int) and c[key] > 0, key, f"must be a positive integer, got {c[key]}")
  for key in ("dense_epochs", "prune_epochs", "quant_epochs_per_step"):
    _check(c[key] >= 0 and math.isfinite(c[key]), key, f"must be >= 0, got {c[key]}")
  _check(c.learning_rate > 0, "learning_rate", f"must be > 0, got {c.learning_rate}")
  _check(c.weight_decay >= 0, "weight_decay", f"must be >= 0, got {c.weight_decay}")
  _check(0 <= c.momentum < 1, "momentum", f"must be in [0, 1), got {c.momentum}")
  for prefix, sub in (("", c), ("prune.", c.prune), ("quant.", c.quant)):
    _check(
      sub.lr_schedule in LR_SCHEDULES,
      prefix + "lr_schedule",
      f"unknown schedule {sub.lr_schedule!r} (valid: {', '.join(LR_SCHEDULES)})",
    )
    if sub.get("learning_rate") is not None:
      _check(
        sub.learning_rate > 0, prefix + "learning_rate", f"must be > 0, got {sub.learning_rate}"
      )
  _check(
    c.prune.method in PRUNE_METHODS,
    "prune.method",
    f"unknown method {c.prune.method!r} (valid: {', '.join(PRUNE_METHODS)})",
  )
  _check(
    0.0 <= c.prune.sparsity < 1.0, "prune.sparsity", f"must be in [0, 1), got {c.prune.sparsity}"
  )
  _check(
    c.prune.update_every >= 1, "prune.update_every", f"must be >= 1, got {c.prune.update_every}"
  )
  _check(
    isinstance(c.quant.bits, int) and MIN_BITS <= c.quant.bits <= MAX_BITS,
    "quant.bits",
    f"must be an integer in [{MIN_BITS}, {MAX_BITS}], got {c.quant.bits}",
  )
  _check(c.quant.w_sep >= 0, "quant.w_sep", f"must be >= 0, got {c.quant.w_sep}")
  _check(
    c.quant.inq_order in ("magnitude", "error"),
    "quant.inq_order",
    f"must be 'magnitude' or 'error', got {c.quant.inq_order!r}",
  )
  fractions = tuple(c.quant.inq_fractions)
  _check(
    bool(fractions)
    and fractions[-1] == 1.0
    and list(fractions) == sorted(fractions)
    and all(0 < f <= 1 for f in fractions),
    "quant.inq_fractions",
    f"must increase within (0, 1] and end at 1.0, got {fractions}",
  )
  _check(
    c.quant.refit_growth >= 1, "quant.refit_growth", f"must be >= 1, got {c.quant.refit_growth}"
  )
  act, bn = c.quant.activation_bits, c.quant.bn_bits
  _check(
    isinstance(act, int) and (act == 0 or 2 <= act <= 16),
    "quant.activation_bits",
    f"must be 0 (float) or an integer in [2, 16], got {act}",
  )
  _check(
    isinstance(bn, int) and (bn == 0 or 2 <= bn <= 24),
    "quant.bn_bits",
    f"must be 0 (float) or an integer in [2, 24], got {bn}",
  )
  _check(
    c.quant.activation_calibration_batches >= 1,
    "quant.activation_calibration_batches",
    f"must be >= 1, got {c.quant.activation_calibration_batches}",
  )
  _check(
    0 < c.quant.activation_percentile <= 100,
    "quant.activation_percentile",
    f"must be in (0, 100], got {c.quant.activation_percentile}",
  )
  compression_rules(c)  # raises ConfigError for a malformed rule
  _check(
    c.checkpoint_every_steps >= 0,
    "checkpoint_every_steps",
    f"must be >= 0, got {c.checkpoint_every_steps}",
  )


def steps_for(epochs: float, steps_per_epoch: int) -> int:
  """Optimizer steps of a stage lasting `epochs` (fractions allowed)."""
  return int(round(epochs * steps_per_epoch))


@dataclasses.dataclass(frozen=True)
class QuantSteps:
  """Step counts of the quantization stage.

  Attributes:
    per_inq_step: updates per INQ step but the last (0: post-training
      quantization, no updates).
    final: updates of the last step (fraction 1.0).
    refit_every: updates before the first mixture re-estimation (0: never).
    num_inq_steps: number of INQ steps (1: everything quantized at once).
  """

  per_inq_step: int
  final: int
  refit_every: int
  num_inq_steps: int = 5

  @property
  def total(self) -> int:
    """All updates of the stage."""
    return self.per_inq_step * (self.num_inq_steps - 1) + self.final

  def boundaries(self) -> tuple[int, ...]:
    """Update counts at which INQ step i + 1 begins."""
    return tuple(self.per_inq_step * (i + 1) for i in range(self.num_inq_steps - 1))


def quant_steps(config, steps_per_epoch: int) -> QuantSteps:
  """The quantization stage's step counts (see `configs/default.py` for the keys).

  `quant_epochs_per_step == 0` is post-training quantization: no updates at
  all. Otherwise there is one INQ step per entry of `quant.inq_fractions`,
  each `quant_epochs_per_step` long but the last, which lasts
  `quant.final_epochs` (< 0: the paper's ratio, 10/3 of the others: 3 and 10
  epochs on ImageNet). `quant.inq_fractions=(1.0,)` quantizes everything at
  once and fine-tunes for `quant.final_epochs`.
  """
  q = config.quant
  per = steps_for(config.quant_epochs_per_step, steps_per_epoch)
  if per == 0:
    return QuantSteps(per_inq_step=0, final=0, refit_every=0, num_inq_steps=1)
  final_epochs = (
    q.final_epochs if q.final_epochs >= 0 else config.quant_epochs_per_step * 10.0 / 3.0
  )
  final = steps_for(final_epochs, steps_per_epoch)
  if q.refit_every_epochs is None:
    refit = per  # re-estimate at the first INQ boundary, then ever more rarely
  else:
    refit = steps_for(q.refit_every_epochs, steps_per_epoch)
  return QuantSteps(
    per_inq_step=per, final=final, refit_every=refit, num_inq_steps=len(tuple(q.inq_fractions))
  )


def config_json(config) -> dict[str, Any]:
  """The config as plain JSON values (for checkpoints and the report)."""
  return json.loads(config.to_json_best_effort())


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
  """Keys whose values differ between two `config_json` dicts (volatile ones ignored)."""
  a, b = _flatten(saved), _flatten(current)
  keys = sorted(set(a) | set(b))
  return [k for k in keys if k not in VOLATILE_KEYS and a.get(k) != b.get(k)]


def parse_override_error(argv: list[str], exc: BaseException) -> str:
  """A one-line message for an exception raised while parsing `--config...` flags."""
  text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
  m = re.search(r"'([A-Za-z0-9_]+)'", text)
  if isinstance(exc, (KeyError, AttributeError)) and m:
    bad = m.group(1)
    for arg in argv:
      if arg.startswith("--config.") and re.search(
        rf"\.{re.escape(bad)}(=|\.|$)", arg.split("=")[0] + "="
      ):
        return f"unknown config key {arg.split('=')[0][len('--config.') :]!r} (in {arg})"
    return f"unknown config key {bad!r}"
  return text
