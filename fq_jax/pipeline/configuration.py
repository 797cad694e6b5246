"""Configuration checks and the pure pieces derived from a config.

Everything here turns an `ml_collections.ConfigDict` (see `configs/*.py` and
docs/pipeline.md) into plain values: validated settings, compression rules,
stage lengths. A bad setting raises `ConfigError`, whose message is one line
that starts with the offending key, so `train.py` can print it without a
traceback.

Compression rules live with the stage whose settings they change (the syntax
is `fq_jax._src.rule_syntax`'s `REGEX:key=value,...`):

* `prune.rules` may set `prune`, `sparsity`, `sensitivity` and `min_ndim`;
* `quant.rules` may set `quantize`, `bits`, `w_sep`, `recentralize` and `min_ndim`.

A rule with a key of the other stage is an error naming the right list. For
each leaf the first matching prune rule (then `fq.DEFAULT_RULES`) decides its
pruning and the first matching quant rule (then `fq.DEFAULT_RULES`) its
quantization; `compression_rules` merges both into one exact rule per leaf,
the form every `fq` transform takes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any

import jax

import fq_jax as fq
from fq_jax import data as data_lib
from fq_jax import models as models_lib
from fq_jax._src import rule_syntax
from fq_jax._src.quantizers import MAX_BITS, MIN_BITS

MODEL_NAMES = models_lib.MODEL_NAMES
DATASET_NAMES = tuple(data_lib.DATASETS)  # the one registry: fq_jax.data.DATASETS
PRUNE_METHODS = ("dns", "magnitude", "none")
LR_SCHEDULES = ("cosine", "step", "constant")
CODERS = ("ans", "huffman")

# Stage names, in order; a checkpoint position is (stage, step within stage).
TRAIN_STAGES = ("dense", "prune", "quantize")
STAGES = TRAIN_STAGES + ("evaluate",)

# Config section of each training stage.
SECTIONS = {"dense": "dense", "prune": "prune", "quantize": "quant"}

# Lengths given in epochs or in steps (one of the two): section -> (epochs key, steps key).
LENGTH_KEYS = {
  "dense": (("epochs", "steps"),),
  "prune": (("epochs", "steps"),),
  "quant": (
    ("epochs_per_step", "steps_per_step"),
    ("final_epochs", "final_steps"),
    ("refit_every_epochs", "refit_every_steps"),
  ),
}

# Keys that may differ between the run that wrote a checkpoint and the run
# that resumes it: they change logging or checkpoint cadence, not the numbers.
VOLATILE_KEYS = (
  "progress_bar",
  "log_every",
  "eval_every_epochs",
  "checkpoint_every_steps",
  "max_checkpoints",
  "async_checkpointing",
  "tensorboard",
  "jax_cache_dir",
  "dataset.num_workers",  # the batches do not depend on it
)

# Which Rule fields each stage's rule list may set.
PRUNE_RULE_KEYS = ("prune", "sparsity", "sensitivity", "min_ndim")
PRUNE_SCOPES = ("layer", "global")
QUANT_RULE_KEYS = ("quantize", "bits", "w_sep", "recentralize", "min_ndim")


class ConfigError(ValueError):
  """A bad configuration value; `str(e)` is one line naming the key."""

  def __init__(self, key: str, message: str):
    self.key = key
    super().__init__(f"{key}: {message}")


def parse_rule(text: str, key: str = "quant.rules") -> fq.Rule:
  """Parses one `REGEX:key=value,...` rule (`fq_jax._src.rule_syntax`), naming `key` in errors."""
  try:
    return rule_syntax.parse_rule(text)
  except rule_syntax.RuleSyntaxError as e:
    raise ConfigError(key, str(e)) from None


def _rule_settings(text: str) -> list[str]:
  body = text.rpartition(":")[2]
  return [
    item.partition("=")[0].strip().replace("-", "_") for item in body.split(",") if item.strip()
  ]


def stage_rules(config, section: str) -> tuple[fq.Rule, ...]:
  """The parsed rules of `prune.rules` or `quant.rules` (without the defaults).

  Raises:
    ConfigError: for a malformed rule or a key the other stage owns.
  """
  key = f"{section}.rules"
  raw = config[section].rules
  texts = raw.split(";") if isinstance(raw, str) else list(raw)
  allowed, other = (PRUNE_RULE_KEYS, "quant") if section == "prune" else (QUANT_RULE_KEYS, "prune")
  out = []
  for text in (t.strip() for t in texts if t and t.strip()):
    rule = parse_rule(text, key)
    for name in _rule_settings(text):
      if name not in allowed:
        raise ConfigError(
          key,
          f"rule {text!r} sets {name!r}, a setting of {other}.rules "
          f"({section}.rules sets {', '.join(allowed)})",
        )
    out.append(rule)
  return tuple(out)


def compression_rules(config, params) -> tuple[fq.Rule, ...]:
  """One exact rule per compressed leaf of `params`, merging `prune.rules` and `quant.rules`.

  Args:
    config: the run's config.
    params: the parameter tree (arrays or shapes).

  Returns:
    Rules `^path$`, one per leaf that is pruned or quantized, whose prune
    settings come from the first matching prune rule and whose quantization
    settings come from the first matching quant rule (each list followed by
    `fq.DEFAULT_RULES`), with the config's global sparsity, bits and w_sep
    filled in (a leaf pruned by DNS's threshold carries its `sensitivity`
    instead of a sparsity). A leaf that neither list compresses matches none.
  """
  c = config
  prune = fq.resolve(
    params,
    stage_rules(c, "prune") + tuple(fq.DEFAULT_RULES),
    sparsity=global_sparsity(c),
    sensitivity=c.prune.sensitivity,
  )
  quant = fq.resolve(
    params,
    stage_rules(c, "quant") + tuple(fq.DEFAULT_RULES),
    bits=c.quant.bits,
    w_sep=c.quant.w_sep,
  )
  out = []
  for p, q in zip(_spec_leaves(prune), _spec_leaves(quant)):
    prunes, quantizes = bool(p and p.prune), bool(q and q.quantize)
    if not (prunes or quantizes):
      continue
    out.append(
      fq.Rule(
        pattern=f"^{re.escape((p or q).path)}$",
        prune=prunes,
        sparsity=p.sparsity if prunes and p.sensitivity is None else None,
        sensitivity=p.sensitivity if prunes else None,
        quantize=quantizes,
        bits=q.bits if quantizes else None,
        w_sep=q.w_sep if quantizes else None,
        recentralize=q.recentralize if quantizes else True,
        min_ndim=0,
      )
    )
  return tuple(out)


def global_sparsity(config) -> float:
  """`prune.sparsity`, or 0.0 when the run prunes by `prune.sensitivity` instead."""
  s = config.prune.sparsity
  return 0.0 if s is None else float(s)


def _spec_leaves(specs) -> list:
  return jax.tree.leaves(specs, is_leaf=lambda x: x is None)


def _check(cond: bool, key: str, message: str) -> None:
  if not cond:
    raise ConfigError(key, message)


def _is_number(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_choice(value, key: str, valid, what: str) -> None:
  _check(value in valid, key, f"unknown {what} {value!r} (valid: {', '.join(valid)})")


def _check_positive_int(value, key: str) -> None:
  ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
  _check(ok, key, f"must be a positive integer, got {value}")


def _check_rate(value, key: str, *, allow_zero: bool = False) -> None:
  ok = _is_number(value) and math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
  _check(ok, key, f"must be a finite number {'>= 0' if allow_zero else '> 0'}, got {value}")


def _check_cap(value, key: str) -> None:
  ok = isinstance(value, int) and not isinstance(value, bool) and (value == -1 or value > 0)
  _check(ok, key, f"must be -1 (the whole split) or a positive integer, got {value}")


def _validate_model_and_data(c) -> None:
  _check_choice(c.model.name, "model.name", MODEL_NAMES, "model")
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
  _check_choice(c.model.dtype, "model.dtype", ("float32", "bfloat16", "float16"), "dtype")
  bn = c.model.get("batch_norm_axis", "global")
  _check_choice(bn, "model.batch_norm_axis", ("global", "per_device"), "batch-norm axis")
  ok = bn == "global" or c.model.name in models_lib.BN_GROUPED_MODELS
  _check(ok, "model.batch_norm_axis", f"per_device is not supported by {c.model.name!r}")
  per_device = c.get("per_device_batch_size")
  if per_device is not None:
    _check_positive_int(per_device, "per_device_batch_size")
  _check_choice(c.dataset.name, "dataset.name", DATASET_NAMES, "dataset")
  if c.init_from:
    _check(os.path.isfile(c.init_from), "init_from", f"file not found: {c.init_from}")
    _check(
      c.init_from.endswith((".npz", ".pth", ".pt")),
      "init_from",
      "expected a .npz (flat Flax variables, or PyTorch keys) or a torchvision .pth/.pt, "
      f"got {c.init_from}",
    )
  w = c.dataset.num_workers
  ok = isinstance(w, int) and not isinstance(w, bool) and w >= 0
  _check(ok, "dataset.num_workers", f"must be an integer >= 0 (0: in this process), got {w}")
  for key in ("batch_size", "eval_batch_size"):
    _check_positive_int(c[key], key)
  for key in ("steps_per_epoch", "eval_steps"):
    _check_cap(c[key], key)


def _validate_lengths(c) -> None:
  for section, pairs in LENGTH_KEYS.items():
    for epochs_key, steps_key in pairs:
      e, s = c[section][epochs_key], c[section][steps_key]
      ek, sk = f"{section}.{epochs_key}", f"{section}.{steps_key}"
      _check(
        e is None or s is None,
        f"{ek} and {sk}",
        "both set; give this length in epochs or in steps, not both",
      )
      if e is not None:
        ok = _is_number(e) and math.isfinite(e) and e >= 0
        _check(ok, ek, f"must be a finite number >= 0, got {e}")
      if s is not None:
        ok = isinstance(s, int) and not isinstance(s, bool) and s >= 0
        _check(ok, sk, f"must be an integer >= 0, got {s}")
  for section in ("dense", "prune"):
    _check(
      c[section].epochs is not None or c[section].steps is not None,
      f"{section}.epochs",
      f"the stage length is not set (give {section}.epochs or {section}.steps)",
    )
  q = c.quant
  _check(
    q.epochs_per_step is not None or q.steps_per_step is not None,
    "quant.epochs_per_step",
    "the INQ step length is not set (give quant.epochs_per_step or quant.steps_per_step)",
  )


def _validate_optimizers(c) -> None:
  _check_rate(c.optimizer.weight_decay, "optimizer.weight_decay", allow_zero=True)
  m = c.optimizer.momentum
  _check(_is_number(m) and 0 <= m < 1, "optimizer.momentum", f"must be in [0, 1), got {m}")
  for section in ("dense", "prune", "quant"):
    sub = c[section]
    _check_choice(sub.lr_schedule, f"{section}.lr_schedule", LR_SCHEDULES, "schedule")
    if section == "dense" or sub.learning_rate is not None:
      _check_rate(sub.learning_rate, f"{section}.learning_rate")
    _check_rate(sub.lr_decay_epochs, f"{section}.lr_decay_epochs", allow_zero=True)
    _check_rate(sub.lr_decay_factor, f"{section}.lr_decay_factor")
  _check_rate(c.quant.alpha_learning_rate, "quant.alpha_learning_rate", allow_zero=True)


def _validate_prune(c) -> None:
  p = c.prune
  _check_choice(p.method, "prune.method", PRUNE_METHODS, "method")
  s, a = p.sparsity, p.sensitivity
  _check(
    (s is None) != (a is None),
    "prune.sparsity and prune.sensitivity",
    "give exactly one (a target sparsity, or DNS's sensitivity a)"
    if s is None
    else "both set; give a target sparsity or DNS's sensitivity a, not both",
  )
  if s is not None:
    _check(_is_number(s) and 0.0 <= s < 1.0, "prune.sparsity", f"must be in [0, 1), got {s}")
  if a is not None:
    ok = _is_number(a) and math.isfinite(a)
    _check(ok, "prune.sensitivity", f"must be a finite number, got {a}")
  _check_choice(p.scope, "prune.scope", PRUNE_SCOPES, "scope")
  _check(
    p.scope == "layer" or s is not None,
    "prune.scope",
    "'global' needs prune.sparsity (a global target), not prune.sensitivity",
  )
  _check_positive_int(p.update_every, "prune.update_every")
  r = p.ramp_fraction
  _check(_is_number(r) and 0.0 <= r <= 1.0, "prune.ramp_fraction", f"must be in [0, 1], got {r}")
  _check(r == 0 or p.method == "dns", "prune.ramp_fraction", "the ramp needs prune.method=dns")
  _check(
    r == 0 or (p.get("sensitivity") is None and p.get("scope", "layer") == "layer"),
    "prune.ramp_fraction",
    "the ramp needs prune.sparsity (not prune.sensitivity) and prune.scope=layer",
  )
  stage_rules(c, "prune")  # raises ConfigError for a malformed rule


def _validate_quant(c) -> None:
  q = c.quant
  _check(
    isinstance(q.bits, int) and MIN_BITS <= q.bits <= MAX_BITS,
    "quant.bits",
    f"must be an integer in [{MIN_BITS}, {MAX_BITS}], got {q.bits}",
  )
  _check_rate(q.w_sep, "quant.w_sep", allow_zero=True)
  _check(
    q.inq_order in ("magnitude", "error"),
    "quant.inq_order",
    f"must be 'magnitude' or 'error', got {q.inq_order!r}",
  )
  fractions = tuple(q.inq_fractions)
  _check(
    bool(fractions)
    and fractions[-1] == 1.0
    and list(fractions) == sorted(fractions)
    and all(0 < f <= 1 for f in fractions),
    "quant.inq_fractions",
    f"must increase within (0, 1] and end at 1.0, got {fractions}",
  )
  g = q.refit_growth
  _check(
    _is_number(g) and math.isfinite(g) and g >= 1, "quant.refit_growth", f"must be >= 1, got {g}"
  )
  _check_positive_int(q.gmm_iters, "quant.gmm_iters")
  act, bn = q.activation_bits, q.bn_bits
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
  _check_positive_int(q.activation_calibration_batches, "quant.activation_calibration_batches")
  pct = q.activation_percentile
  _check(
    _is_number(pct) and 0 < pct <= 100,
    "quant.activation_percentile",
    f"must be in (0, 100], got {pct}",
  )
  stage_rules(c, "quant")  # raises ConfigError for a malformed rule


def validate(config) -> None:
  """Checks every setting a run depends on (training, evaluation and encoding), before any work.

  Raises:
    ConfigError: naming the first bad key.
  """
  c = config
  _validate_model_and_data(c)
  _validate_lengths(c)
  _validate_optimizers(c)
  _validate_prune(c)
  _validate_quant(c)
  w = c.distill.weight
  _check(_is_number(w) and 0.0 <= w <= 1.0, "distill.weight", f"must be in [0, 1], got {w}")
  _check_rate(c.distill.temperature, "distill.temperature")
  _check_choice(c.encode.coder, "encode.coder", CODERS, "coder")
  _check(
    isinstance(c.checkpoint_every_steps, int) and c.checkpoint_every_steps >= 0,
    "checkpoint_every_steps",
    f"must be an integer >= 0, got {c.checkpoint_every_steps}",
  )
  _check_positive_int(c.max_checkpoints, "max_checkpoints")
  _check(
    isinstance(c.log_every, int) and c.log_every >= 0,
    "log_every",
    f"must be an integer >= 0, got {c.log_every}",
  )
  _check(
    isinstance(c.eval_every_epochs, int) and c.eval_every_epochs >= 0,
    "eval_every_epochs",
    f"must be an integer >= 0, got {c.eval_every_epochs}",
  )


def check_workdir(workdir: str) -> None:
  """Creates `workdir` if needed and checks that files can be written there.

  Raises:
    ConfigError: (key "workdir") for a regular file, a folder that cannot be
      created, or one that is not writable.
  A remote workdir (`gs://...`, through `etils.epath`) gets the same checks:
  any failure to reach, create or write it is one line.
  """
  if "://" in workdir:
    _check_remote_workdir(workdir)
    return
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError("workdir", f"{workdir} is not a folder")
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write-test-{os.getpid()}")
    with open(probe, "wb"):
      pass
    os.unlink(probe)
  except OSError as e:
    raise ConfigError("workdir", f"cannot write to {workdir}: {e.strerror or e}") from None


def _check_remote_workdir(workdir: str) -> None:
  from etils import epath

  try:
    folder = epath.Path(workdir)
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / f".write-test-{jax.process_index()}-{os.getpid()}"
    probe.write_bytes(b"")
    probe.unlink()
  except Exception as e:  # noqa: BLE001 - each file system backend raises its own types
    first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
    reason = f"{type(e).__name__}: {first}" if first else type(e).__name__
    raise ConfigError("workdir", f"cannot write to {workdir}: {reason}") from None


# ----------------------------------------------------------------------------
# Stage lengths
# ----------------------------------------------------------------------------


def length_steps(section, epochs_key: str, steps_key: str, steps_per_epoch: int) -> int | None:
  """A length given as `section[steps_key]` steps or `section[epochs_key]` epochs, in steps.

  Returns None when neither is set. Fractional epochs round to the nearest step.
  """
  if section[steps_key] is not None:
    return int(section[steps_key])
  if section[epochs_key] is not None:
    return int(round(section[epochs_key] * steps_per_epoch))
  return None


def steps_for(epochs: float, steps_per_epoch: int) -> int:
  """Optimizer steps of a stretch lasting `epochs` (fractions allowed)."""
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
  """The quantization stage's step counts (docs/pipeline.md has the keys).

  A zero INQ step length (`quant.epochs_per_step` or `quant.steps_per_step`)
  is post-training quantization: no updates at all. Otherwise there is one INQ
  step per entry of `quant.inq_fractions`, each that long but the last, which
  lasts `quant.final_epochs` / `quant.final_steps` (neither set: the paper's
  ratio, 10/3 of the others: 3 and 10 epochs on ImageNet).
  `quant.inq_fractions=(1.0,)` quantizes everything at once and fine-tunes
  for the final length.
  """
  q = config.quant
  per = length_steps(q, "epochs_per_step", "steps_per_step", steps_per_epoch)
  if not per:
    return QuantSteps(per_inq_step=0, final=0, refit_every=0, num_inq_steps=1)
  final = length_steps(q, "final_epochs", "final_steps", steps_per_epoch)
  if final is None:  # the paper's 10/3, from the length as given (epochs or steps)
    if q.epochs_per_step is not None:
      final = steps_for(q.epochs_per_step * 10.0 / 3.0, steps_per_epoch)
    else:
      final = int(round(per * 10.0 / 3.0))
  refit = length_steps(q, "refit_every_epochs", "refit_every_steps", steps_per_epoch)
  if refit is None:
    refit = per  # re-estimate at the first INQ boundary, then ever more rarely
  return QuantSteps(
    per_inq_step=per, final=final, refit_every=refit, num_inq_steps=len(tuple(q.inq_fractions))
  )


def stage_steps(config, steps_per_epoch: int) -> dict[str, int]:
  """Updates of each training stage: {"dense": n, "prune": n, "quantize": n}."""
  return {
    "dense": length_steps(config.dense, "epochs", "steps", steps_per_epoch) or 0,
    "prune": length_steps(config.prune, "epochs", "steps", steps_per_epoch) or 0,
    "quantize": quant_steps(config, steps_per_epoch).total,
  }


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
