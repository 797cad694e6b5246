"""The focused-compression pipeline: dense -> prune -> quantize -> evaluate -> encode -> report.

`run(config, workdir)` executes every stage the config asks for and returns
the report (also written to `workdir/report.json`). Stages:

* dense: train from scratch for `dense_epochs`, or load `init_from` (a
  PyTorch CIFAR ResNet `.npz` through the importer, or a flat `.npz` of Flax
  variables keyed like "params/conv1/kernel"), then more dense epochs if any.
* prune: `prune.method` "dns" fine-tunes `prune_epochs` under `fq.dns_pruning`
  (masks move towards `prune.sparsity` with DNS hysteresis) and freezes the
  result with `fq.apply_masks`; "magnitude" prunes once with
  `fq.magnitude_masks` and fine-tunes with the pruned weights held at 0;
  "none" skips the stage.
* quantize: `fq.focused_quantization` with the INQ schedule (fractions
  `quant.inq_fractions`, `quant_epochs_per_step` epochs per step, the last
  step `quant.final_epochs`); zero epochs is post-training quantization.
* evaluate: top-1 (and top-5 beyond 10 classes) test accuracy of the
  quantized model, batch norm with the statistics updated during fine-tuning.
* encode: `workdir/model.fqz` with the codec when `fq.save_fqz` exists, else a
  size estimate from the entropy report (marked "estimate").
* report: `workdir/report.json`, a summary and the per-layer table.

Resumption: the run checkpoints (Orbax) its arrays and its position at every
stage end and every `checkpoint_every_steps` updates. Starting the same
command again restores the newest checkpoint and continues; because data
order, augmentation, initialisation and the FQ sampling are functions of the
seed and the position only, the final report is identical to that of an
uninterrupted run.

With `reference_only=True` the prune and quantize stages fine-tune the float
model for the same number of steps with the same learning-rate schedules
(no masks, no quantization): the fair reference for the compressed accuracy.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fq_jax as fq
from fq_jax import models as models_lib
from fq_jax.pipeline import artifact as artifact_lib
from fq_jax.pipeline import checkpoint as checkpoint_lib
from fq_jax.pipeline import configuration as cfg
from fq_jax.pipeline import input_pipeline
from fq_jax.pipeline import integer as integer_lib
from fq_jax.pipeline import metrics as metrics_lib
from fq_jax.pipeline import sharding as sharding_lib
from fq_jax.pipeline import steps as steps_lib
from fq_jax.pipeline.configuration import ConfigError

# Epoch indices handed to the data pipeline are offset per stage so that each
# stage sees its own sequence of shuffles (the order is a function of (seed, epoch)).
EPOCH_OFFSET = {"dense": 0, "prune": 100_000, "quantize": 200_000}

Log = Callable[[str], None]


# ----------------------------------------------------------------------------
# Context
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class Context:
  """What every stage needs; built once per run by `make_context`."""

  config: Any
  workdir: str
  model: Any
  model_name: str
  source: input_pipeline.DataSource
  mesh: jax.sharding.Mesh
  rules: tuple[fq.Rule, ...]
  init_variables: dict[str, Any] | None
  log: Log
  is_main: bool
  _eval_step: Any = None
  _quantized: Any = None

  @property
  def top5(self) -> bool:
    return self.source.num_classes > 10

  @property
  def compress(self) -> bool:
    """False in reference mode: the later stages train the float model."""
    return not self.config.reference_only

  @property
  def prunes(self) -> bool:
    return self.compress and self.config.prune.method != "none"

  @property
  def quantizes(self) -> bool:
    return self.compress and self.config.quant.enabled


def _dtype(name: str):
  try:
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]
  except KeyError:
    raise ConfigError(
      "model.dtype", f"unknown dtype {name!r} (float32, bfloat16, float16)"
    ) from None


def _load_init(config, model_name: str) -> tuple[int | None, dict[str, Any] | None]:
  """Reads `init_from`: (cifar depth or None, variables as numpy trees)."""
  path = config.init_from
  if not path:
    return config.model.depth, None
  try:
    with np.load(path) as data:
      arrays = {k: data[k] for k in data.files}
  except (OSError, ValueError) as e:
    raise ConfigError("init_from", f"cannot read {path}: {e}") from None
  if any("/" in k for k in arrays):
    variables: dict[str, Any] = {}
    for key, value in arrays.items():
      node = variables
      *parents, leaf = key.split("/")
      for p in parents:
        node = node.setdefault(p, {})
      node[leaf] = value
    return config.model.depth, variables
  if model_name != "cifar_resnet":
    raise ConfigError(
      "init_from", f"{path} is a PyTorch state dict; only cifar_resnet imports those"
    )
  try:
    depth, variables = models_lib.import_torch_cifar_resnet(path)
  except ValueError as e:
    raise ConfigError("init_from", str(e).splitlines()[0]) from None
  if config.model.depth is not None and config.model.depth != depth:
    raise ConfigError("model.depth", f"{config.model.depth}, but {path} holds a ResNet-{depth}")
  return depth, variables


def _check_structure(variables, abstract, path: str) -> None:
  want = jax.tree.map(lambda x: tuple(x.shape), abstract)
  got = jax.tree.map(lambda x: tuple(np.shape(x)), {k: variables.get(k, {}) for k in abstract})
  if want != got:
    raise ConfigError("init_from", f"{path} does not match the model's variables")


def make_context(config, workdir: str, *, mesh=None, log: Log = print) -> Context:
  """Validates the config and builds the model, data source and mesh."""
  cfg.validate(config)
  mesh = sharding_lib.make_mesh() if mesh is None else mesh
  for key in ("batch_size", "eval_batch_size"):
    try:
      sharding_lib.check_batch_size(config[key], mesh, key)
    except ValueError as e:
      raise ConfigError(key, str(e).split(": ", 1)[1]) from None
  rules = cfg.compression_rules(config)
  source = input_pipeline.make_source(config)
  name = config.model.name
  depth, init_vars = _load_init(config, name)
  kwargs: dict[str, Any] = dict(num_classes=source.num_classes, dtype=_dtype(config.model.dtype))
  if name == "cifar_resnet":
    kwargs["depth"] = depth or 20
  model = models_lib.get_model(name, **kwargs)
  label = f"{name}-{kwargs['depth']}" if name == "cifar_resnet" else name
  ctx = Context(
    config=config,
    workdir=workdir,
    model=model,
    model_name=label,
    source=source,
    mesh=mesh,
    rules=rules,
    init_variables=None,
    log=log,
    is_main=jax.process_index() == 0,
  )
  if init_vars is not None:
    _check_structure(init_vars, abstract_variables(ctx), config.init_from)
    ctx.init_variables = {k: init_vars[k] for k in ("params", "batch_stats") if k in init_vars}
  return ctx


def abstract_variables(ctx: Context) -> dict[str, Any]:
  """Shapes of {'params', 'batch_stats'} (no compute)."""
  x = jnp.zeros((1, *ctx.source.image_shape), jnp.float32)
  out = jax.eval_shape(lambda: ctx.model.init(jax.random.key(0), x, train=False))
  return {"params": out["params"], "batch_stats": out.get("batch_stats", {})}


def initial_variables(ctx: Context) -> dict[str, Any]:
  """`init_from`'s variables, or a fresh initialisation from the seed."""
  if ctx.init_variables is not None:
    v = ctx.init_variables
    return {"params": v["params"], "batch_stats": v.get("batch_stats", {})}
  x = jnp.zeros((1, *ctx.source.image_shape), jnp.float32)
  out = jax.jit(lambda: ctx.model.init(jax.random.key(ctx.config.seed), x, train=False))()
  return {"params": out["params"], "batch_stats": out.get("batch_stats", {})}


# ----------------------------------------------------------------------------
# Stage plans (pure: optimizers and forward functions)
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class StagePlan:
  """One training stage: how many updates, with what optimizer and forward."""

  name: str
  num_steps: int
  tx: optax.GradientTransformation
  forward: steps_lib.Forward
  schedule: optax.Schedule


def _schedule(ctx: Context, section, num_steps: int, restarts=()) -> optax.Schedule:
  c = ctx.config
  spe = ctx.source.steps_per_epoch
  lr = section.get("learning_rate")
  lr = c.learning_rate if lr is None else lr
  return steps_lib.stage_schedule(
    section.lr_schedule,
    lr,
    num_steps,
    decay_steps=cfg.steps_for(section.lr_decay_epochs, spe),
    decay_factor=section.lr_decay_factor,
    restarts=restarts,
  )


def _inner(ctx: Context, schedule) -> optax.GradientTransformation:
  c = ctx.config
  return steps_lib.sgd(
    schedule, momentum=c.momentum, nesterov=c.nesterov, weight_decay=c.weight_decay
  )


def dense_plan(ctx: Context) -> StagePlan:
  n = cfg.steps_for(ctx.config.dense_epochs, ctx.source.steps_per_epoch)
  sched = _schedule(ctx, ctx.config, n)
  return StagePlan("dense", n, _inner(ctx, sched), steps_lib.identity_forward, sched)


def prune_plan(ctx: Context, masks=None) -> StagePlan:
  """The prune stage; `masks` (magnitude pruning only) are the frozen masks."""
  c = ctx.config
  n = cfg.steps_for(c.prune_epochs, ctx.source.steps_per_epoch)
  sched = _schedule(ctx, c.prune, n)
  inner = _inner(ctx, sched)
  if not ctx.prunes:
    return StagePlan("prune", n, inner, steps_lib.identity_forward, sched)
  if c.prune.method == "dns":
    tx = fq.dns_pruning(
      inner, sparsity=c.prune.sparsity, rules=ctx.rules, update_every=c.prune.update_every
    )
    return StagePlan("prune", n, tx, fq.quantized, sched)
  # Magnitude: pruned weights are exact zeros and keep_pruned holds them there.
  return StagePlan(
    "prune", n, steps_lib.keep_pruned(inner, masks), steps_lib.identity_forward, sched
  )


def quant_plan(ctx: Context, masks=None) -> StagePlan:
  """The quantize stage (INQ schedule of `quant_epochs_per_step`, `quant.final_epochs`)."""
  c = ctx.config
  q = cfg.quant_steps(c, ctx.source.steps_per_epoch)
  restarts = q.boundaries() if c.quant.lr_restart else ()
  sched = _schedule(ctx, c.quant, q.total, restarts)
  inner = _inner(ctx, sched)
  if not ctx.quantizes:
    if ctx.prunes and masks is not None:
      return StagePlan(
        "quantize", q.total, steps_lib.keep_pruned(inner, masks), steps_lib.identity_forward, sched
      )
    return StagePlan("quantize", q.total, inner, steps_lib.identity_forward, sched)
  schedule = fq.QuantSchedule(
    inq_fractions=tuple(float(f) for f in c.quant.inq_fractions) if q.total else (1.0,),
    inq_boundaries=q.boundaries(),
    inq_order=c.quant.inq_order,
    refit_every=q.refit_every,
    refit_growth=c.quant.refit_growth,
  )
  alpha_tx = (
    optax.adam(c.quant.alpha_learning_rate)
    if c.quant.alpha_learning_rate > 0
    else optax.set_to_zero()
  )
  tx = fq.focused_quantization(
    inner,
    bits=c.quant.bits,
    w_sep=c.quant.w_sep,
    rules=ctx.rules,
    schedule=schedule,
    masks=masks,
    alpha_optimizer=alpha_tx,
    seed=c.seed,
    gmm_iters=c.quant.gmm_iters,
  )
  return StagePlan("quantize", q.total, tx, fq.quantized, sched)


def plan_for(ctx: Context, stage: str, masks=None) -> StagePlan:
  return {
    "dense": lambda: dense_plan(ctx),
    "prune": lambda: prune_plan(ctx, masks),
    "quantize": lambda: quant_plan(ctx, masks),
  }[stage]()


def initial_masks(ctx: Context, params):
  """Masks at the start of the prune stage: magnitude pruning, or one DNS update from all kept."""
  c = ctx.config
  if c.prune.method == "magnitude":
    fn = lambda p: fq.magnitude_masks(p, c.prune.sparsity, rules=ctx.rules)
  else:

    def fn(p):
      specs = fq.resolve(p, ctx.rules, sparsity=c.prune.sparsity)
      ones = jax.tree.map(
        lambda s, w: None if s is None else jnp.ones(w.shape, bool),
        specs,
        p,
        is_leaf=lambda x: x is None or isinstance(x, fq.LayerSpec),
      )
      return fq.dns_masks(p, ones, sparsity=c.prune.sparsity, rules=ctx.rules)

  return jax.jit(fn)(params)


def final_masks(opt_state):
  """The masks inside a prune-stage optimizer state."""
  return opt_state.masks


# ----------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------


def forward_variables(ctx: Context, carry: dict[str, Any]) -> dict[str, Any]:
  """The variables inference uses: quantized parameters when there is an FQ state."""
  params = carry["params"]
  if carry.get("opt_state") is not None and ctx.quantizes:
    if ctx._quantized is None:
      ctx._quantized = jax.jit(fq.quantized)
    params = ctx._quantized(params, carry["opt_state"])
  out = {"params": params}
  if carry.get("batch_stats"):
    out["batch_stats"] = carry["batch_stats"]
  return out


def evaluate(ctx: Context, variables: dict[str, Any], model=None) -> dict[str, float]:
  """Test-split loss, top-1 (and top-5) accuracy of `variables` (with `model`, default ctx.model)."""
  if ctx._eval_step is None:
    ctx._eval_step = steps_lib.jit_eval_step(
      steps_lib.make_eval_step(ctx.model, ctx.top5), ctx.mesh
    )
  eval_step = (
    ctx._eval_step
    if model is None
    else steps_lib.jit_eval_step(steps_lib.make_eval_step(model, ctx.top5), ctx.mesh)
  )
  variables = sharding_lib.put_replicated(variables, ctx.mesh)
  bs = sharding_lib.batch_sharding(ctx.mesh)
  sums = None
  for batch in ctx.source.eval_batches():
    out = eval_step(variables, sharding_lib.put_batch(batch, bs))
    sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
  sums = {k: float(steps_lib.host_value(v)) for k, v in sums.items()}
  n = max(sums["count"], 1.0)
  result = {"accuracy": sums["correct"] / n, "loss": sums["loss"] / n}
  if ctx.top5:
    result["top5"] = sums["correct5"] / n
  return result


# ----------------------------------------------------------------------------
# Checkpoint positions
# ----------------------------------------------------------------------------


def _replicated_abstract(tree, mesh):
  sharding = sharding_lib.replicated(mesh)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def _has_masks(ctx: Context, stage: str) -> bool:
  return ctx.prunes and cfg.STAGES.index(stage) > cfg.STAGES.index("prune")


def _has_opt_state(ctx: Context, stage: str, step: int) -> bool:
  if stage == "evaluate":
    return ctx.quantizes
  return step > 0


def abstract_carry(ctx: Context, stage: str, step: int) -> dict[str, Any]:
  """The structure of the arrays a checkpoint at (stage, step) holds."""
  variables = abstract_variables(ctx)
  out: dict[str, Any] = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
  masks = None
  if _has_masks(ctx, stage):
    masks = jax.eval_shape(
      lambda p: fq.magnitude_masks(p, 0.5, rules=ctx.rules), variables["params"]
    )
    out["masks"] = masks
  if _has_opt_state(ctx, stage, step):
    plan_stage = "quantize" if stage == "evaluate" else stage
    if plan_stage == "prune" and ctx.config.prune.method == "magnitude" and ctx.prunes:
      masks = jax.eval_shape(
        lambda p: fq.magnitude_masks(p, 0.5, rules=ctx.rules), variables["params"]
      )
    out["opt_state"] = jax.eval_shape(
      lambda p, m: plan_for(ctx, plan_stage, m).tx.init(p), variables["params"], masks
    )
  return _replicated_abstract(out, ctx.mesh)


# ----------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class RunRecord:
  """The JSON side of a checkpoint: where the run is and what it measured."""

  stage: str = "dense"
  step: int = 0
  results: dict[str, Any] = dataclasses.field(default_factory=dict)
  seconds: dict[str, float] = dataclasses.field(default_factory=dict)

  def to_json(self, config_dict) -> dict[str, Any]:
    return {
      "position": {"stage": self.stage, "step": self.step},
      "results": self.results,
      "seconds": self.seconds,
      "config": config_dict,
    }


class Runner:
  """Drives the stages; owns the I/O edges (checkpoints, CSV, progress, logs)."""

  def __init__(self, ctx: Context):
    self.ctx = ctx
    c = ctx.config
    os.makedirs(ctx.workdir, exist_ok=True)
    self.config_dict = cfg.config_json(c)
    self.ckpt = checkpoint_lib.Checkpoints(
      os.path.join(ctx.workdir, "checkpoints"),
      max_to_keep=c.max_checkpoints,
      async_save=c.async_checkpointing,
    )
    self.record = RunRecord()
    self.carry: dict[str, Any] = {}
    self._clock = time.perf_counter()

  # -- positions -------------------------------------------------------------

  def restore_or_start(self) -> None:
    ctx = self.ctx
    latest = self.ckpt.latest()
    if latest is None:
      self.carry = dict(initial_variables(ctx))
      self.record = RunRecord()
    else:
      meta = self.ckpt.meta(latest)
      diff = cfg.config_differences(meta.get("config", {}), self.config_dict)
      if diff:
        raise ConfigError(
          "workdir",
          f"{ctx.workdir} holds a run with a different config "
          f"({', '.join(diff[:5])}); resume with the same settings or use a new --workdir",
        )
      pos = meta["position"]
      self.record = RunRecord(
        stage=pos["stage"],
        step=int(pos["step"]),
        results=meta.get("results", {}),
        seconds=meta.get("seconds", {}),
      )
      self.carry = self.ckpt.restore(
        latest, abstract_carry(ctx, self.record.stage, self.record.step)
      )
      ctx.log(
        f"resumed from checkpoint {latest}: stage {self.record.stage}, step {self.record.step}"
      )
    self.writer = metrics_lib.MetricsWriter(
      os.path.join(ctx.workdir, "metrics.csv"),
      resume_stage=self.record.stage,
      resume_step=self.record.step,
      enabled=ctx.is_main,
    )

  def save(self, stage: str, step: int) -> None:
    """Checkpoints the carry as position (stage, step)."""
    self._tick(self.record.stage)
    self.record.stage, self.record.step = stage, step
    keys = ["params", "batch_stats"]
    if _has_masks(self.ctx, stage):
      keys.append("masks")
    if _has_opt_state(self.ctx, stage, step):
      keys.append("opt_state")
    state = {k: self.carry[k] for k in keys}
    if self.ctx.config.async_checkpointing:
      # The next train step donates these buffers; save private copies.
      state = jax.tree.map(lambda x: x.copy() if isinstance(x, jax.Array) else x, state)
    self.ckpt.save(state, self.record.to_json(self.config_dict))

  def _tick(self, stage: str) -> None:
    now = time.perf_counter()
    self.record.seconds[stage] = self.record.seconds.get(stage, 0.0) + (now - self._clock)
    self._clock = now

  # -- training --------------------------------------------------------------

  def train(self, plan: StagePlan, start_step: int) -> None:
    """Runs `plan` from `start_step` to its end on the carry."""
    ctx, c = self.ctx, self.ctx.config
    if plan.num_steps <= start_step:
      return
    mesh = ctx.mesh
    model = ctx.model
    scales = self.record.results.get("activation_scales")
    if plan.name == "quantize" and scales:  # integer activations, straight-through
      model = integer_lib.model_for(ctx, scales)
    step_fn = steps_lib.jit_train_step(
      steps_lib.make_train_step(model, plan.tx, plan.forward), mesh
    )
    state = steps_lib.TrainState(
      self.carry["params"], self.carry["batch_stats"], self.carry["opt_state"]
    )
    state = sharding_lib.put_replicated(state, mesh, copy=True)  # the steps donate it
    bs = sharding_lib.batch_sharding(mesh)
    spe = ctx.source.steps_per_epoch
    num_epochs = math.ceil(plan.num_steps / spe)
    step = start_step
    stage_start = time.perf_counter()
    while step < plan.num_steps:
      epoch, offset = divmod(step, spe)
      todo = min(spe, plan.num_steps - epoch * spe)
      bar = metrics_lib.progress(
        todo,
        f"{plan.name} {epoch + 1}/{num_epochs}",
        initial=offset,
        enabled=c.progress_bar and ctx.is_main,
      )
      sums, n = None, 0
      for batch in ctx.source.train_epoch(EPOCH_OFFSET[plan.name] + epoch, start_step=offset):
        if offset >= todo:
          break
        state, m = step_fn(state, sharding_lib.put_batch(batch, bs))
        sums = m if sums is None else jax.tree.map(jnp.add, sums, m)
        step, offset, n = step + 1, offset + 1, n + 1
        bar.update()
        if c.log_every and n % c.log_every == 0:
          bar.set_postfix(
            loss=f"{float(steps_lib.host_value(sums['loss'])) / n:.4f}",
            acc=f"{float(steps_lib.host_value(sums['accuracy'])) / n:.4f}",
          )
        if (
          c.checkpoint_every_steps
          and step % c.checkpoint_every_steps == 0
          and step < plan.num_steps
        ):
          self.carry.update(
            params=state.params, batch_stats=state.batch_stats, opt_state=state.opt_state
          )
          self.save(plan.name, step)
      bar.close()
      if n:
        loss = float(steps_lib.host_value(sums["loss"])) / n
        acc = float(steps_lib.host_value(sums["accuracy"])) / n
        row = dict(
          stage=plan.name,
          epoch=epoch,
          step=step,
          split="train",
          loss=loss,
          accuracy=acc,
          learning_rate=float(plan.schedule(step - 1)),
          seconds=round(time.perf_counter() - stage_start, 3),
        )
        if plan.name == "quantize" and ctx.quantizes:
          row["quantized_fraction"] = fq.quantized_fraction(state.opt_state)
        self.writer.write(**row)
        ctx.log(
          f"{plan.name} epoch {epoch + 1}/{num_epochs}: loss {loss:.4f}, train accuracy {acc:.4f}"
        )
    self.carry.update(params=state.params, batch_stats=state.batch_stats, opt_state=state.opt_state)

  def _eval_row(self, stage: str, step: int, result: dict[str, float], **extra) -> None:
    self.writer.write(
      stage=stage,
      step=step,
      split="test",
      loss=result["loss"],
      accuracy=result["accuracy"],
      top5=result.get("top5"),
      **extra,
    )

  # -- stages ----------------------------------------------------------------

  def stage_dense(self, start_step: int) -> None:
    ctx = self.ctx
    plan = dense_plan(ctx)
    if start_step == 0:
      self.carry["opt_state"] = plan.tx.init(self.carry["params"])
    self.train(plan, start_step)
    result = evaluate(ctx, forward_variables(ctx, {**self.carry, "opt_state": None}))
    variables = {"params": self.carry["params"], "batch_stats": self.carry["batch_stats"]}
    self.record.results["dense"] = {
      **_accuracy_fields(result),
      "num_values": artifact_lib.num_values(variables),
      "float32_bytes": artifact_lib.float32_bytes(variables),
    }
    self._eval_row("dense", plan.num_steps, result)
    ctx.log(f"dense: test accuracy {result['accuracy']:.4f}")
    self.carry.pop("opt_state", None)
    self.save("prune", 0)

  def stage_prune(self, start_step: int) -> None:
    ctx, c = self.ctx, self.ctx.config
    if not ctx.prunes and not ctx.config.reference_only:
      self.record.results["pruned"] = {
        **{k: v for k, v in self.record.results["dense"].items() if k in ("accuracy", "top5")},
        "sparsity": 0.0,
      }
      self.save("quantize", 0)
      return
    plan = prune_plan(ctx)
    if start_step == 0:
      params = self.carry["params"]
      if ctx.prunes and c.prune.method == "magnitude":
        masks = initial_masks(ctx, params)
        self.carry["params"] = fq.apply_masks(params, masks)
        plan = prune_plan(ctx, masks)
      opt_state = plan.tx.init(self.carry["params"])
      if ctx.prunes and c.prune.method == "dns":
        # Start DNS from one mask update (from all kept) so the target holds
        # from the first step, however rarely `prune.update_every` updates.
        opt_state = opt_state._replace(masks=initial_masks(ctx, self.carry["params"]))
      self.carry["opt_state"] = opt_state
    self.train(plan, start_step)
    if ctx.prunes:
      if plan.num_steps == 0 and c.prune.method == "dns":
        masks = initial_masks(ctx, self.carry["params"])  # one DNS update from all-kept masks
      else:
        masks = final_masks(self.carry["opt_state"])
      self.carry["params"] = fq.apply_masks(self.carry["params"], masks)
      self.carry["masks"] = masks
      sparsity = fq.sparsity_of(masks)
    else:
      sparsity = 0.0
    result = evaluate(ctx, forward_variables(ctx, {**self.carry, "opt_state": None}))
    self.record.results["pruned"] = {**_accuracy_fields(result), "sparsity": sparsity}
    self._eval_row("prune", plan.num_steps, result, sparsity=sparsity)
    ctx.log(f"prune: sparsity {sparsity:.4f}, test accuracy {result['accuracy']:.4f}")
    self.carry.pop("opt_state", None)
    self.save("quantize", 0)

  def stage_quantize(self, start_step: int) -> None:
    ctx = self.ctx
    masks = self.carry.get("masks")
    plan = quant_plan(ctx, masks)
    if start_step == 0:
      self.carry["opt_state"] = jax.jit(plan.tx.init)(self.carry["params"])
      if ctx.quantizes and plan.num_steps and integer_lib.activation_bits(ctx.config):
        self.record.results["activation_scales"] = integer_lib.calibrate(
          ctx, forward_variables(ctx, self.carry)
        )
    self.train(plan, start_step)
    if not ctx.quantizes:
      self.carry.pop("opt_state", None)
    self.save("evaluate", 0)

  def stage_evaluate(self) -> dict[str, Any]:
    ctx = self.ctx
    t0 = time.perf_counter()
    variables = forward_variables(ctx, self.carry)
    result = evaluate(ctx, variables)
    if integer_lib.enabled(ctx.config):  # integer activations / batch norm, simulated
      if self.record.results.get("activation_scales") is None:
        self.record.results["activation_scales"] = integer_lib.calibrate(ctx, variables)
      focus = _to_host(fq.find_state(self.carry["opt_state"]).focus) if ctx.quantizes else None
      model = integer_lib.model_for(ctx, self.record.results["activation_scales"], focus=focus)
      result = {**evaluate(ctx, variables, model), "accuracy_float_activations": result["accuracy"]}
    self._eval_row("evaluate", 1, result)
    self.record.seconds["evaluate"] = (
      self.record.seconds.get("evaluate", 0.0) + time.perf_counter() - t0
    )
    t0 = time.perf_counter()
    compressed, rows = self.encode(variables, result)
    self.record.seconds["encode"] = (
      self.record.seconds.get("encode", 0.0) + time.perf_counter() - t0
    )
    report = self.report(compressed, rows)
    self.ckpt.wait()
    return report

  # -- encode and report -----------------------------------------------------

  def encode(
    self, variables: dict[str, Any], result: dict[str, float]
  ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Writes model.fqz (or estimates its size); returns the "compressed" report and layer rows."""
    ctx, c = self.ctx, self.ctx.config
    params = _to_host(self.carry["params"])
    batch_stats = _to_host(self.carry["batch_stats"])
    float_bytes = self.record.results["dense"]["float32_bytes"]
    opt_state = self.carry.get("opt_state")
    masks = self.carry.get("masks")
    if ctx.quantizes:
      state = _to_host(fq.find_state(opt_state))
      rows = fq.layer_report(params, state)
      bits = int(c.quant.bits)
    elif ctx.prunes:
      state = fq.PruneState(count=np.zeros([], np.int32), masks=_to_host(masks), inner_state=())
      rows = artifact_lib.mask_rows(params, masks)
      bits = 32
    else:
      state, rows, bits = None, [], 32
    out: dict[str, Any] = {**_accuracy_fields(result), "bits": bits}
    est = artifact_lib.estimate_sizes(params, batch_stats, rows)
    kernel_float = artifact_lib.kernel_float32_bytes(params)
    # Only the first host writes files; the others report the estimate.
    if c.encode and artifact_lib.codec_available() and ctx.is_main:
      path = os.path.join(ctx.workdir, "model.fqz")
      real = artifact_lib.write_artifact(
        path,
        {"params": params, "batch_stats": batch_stats},
        state,
        coder=c.coder,
        metadata={
          "model": ctx.model_name,
          "dataset": ctx.source.name,
          "bits": bits,
          "seed": int(c.seed),
          **integer_lib.metadata(ctx, self.record.results.get("activation_scales")),
        },
      )
      # The artifact must rebuild exactly the model that was evaluated.
      exact = artifact_lib.trees_equal(real["decoded"], _to_host(variables))
      if not exact:
        ctx.log(
          "warning: the decoded artifact differs from the evaluated model; "
          "reporting the decoded model's accuracy"
        )
        out.update(_accuracy_fields(evaluate(ctx, real["decoded"])))
      out.update(
        artifact_bytes=real["artifact_bytes"],
        estimate=False,
        paper_style_compression_ratio=real["paper_style_compression_ratio"] or 1.0,
        roundtrip_exact=exact,
        estimated_bytes=est["artifact_bytes"],
        coder=c.coder,
        entropy_bound_bytes=real["summary"].get("file_entropy_bound_bytes"),
      )
    else:
      out.update(
        artifact_bytes=est["artifact_bytes"],
        estimate=True,
        paper_style_compression_ratio=kernel_float / max(est["kernel_bytes"], 1),
      )
    if not ctx.compress:
      out["paper_style_compression_ratio"] = 1.0
    out["compression_ratio"] = float_bytes / max(out["artifact_bytes"], 1)
    return out, rows

  def report(self, compressed: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    ctx = self.ctx
    res = self.record.results
    report = {
      "model": ctx.model_name,
      "dataset": ctx.source.name,
      "reference_only": bool(ctx.config.reference_only),
      "dense": res["dense"],
      "pruned": res["pruned"],
      "compressed": compressed,
      "layers": rows,
      "seconds": {k: round(v, 3) for k, v in self.record.seconds.items()},
    }
    if ctx.is_main:
      tmp = os.path.join(ctx.workdir, "report.json.tmp")
      with open(tmp, "w") as f:
        json.dump(_jsonable(report), f, indent=1)
      os.replace(tmp, os.path.join(ctx.workdir, "report.json"))
    ctx.log(summary(report))
    return report

  def run(self) -> dict[str, Any]:
    self.restore_or_start()
    start = cfg.STAGES.index(self.record.stage)
    step = self.record.step
    for stage in cfg.STAGES[start:]:
      self._clock = time.perf_counter()
      if stage == "dense":
        self.stage_dense(step)
      elif stage == "prune":
        self.stage_prune(step)
      elif stage == "quantize":
        self.stage_quantize(step)
      else:
        return self.stage_evaluate()
      step = 0
    raise AssertionError("unreachable")


def _to_host(tree):
  """numpy copies of (replicated, possibly multi-host) arrays; None leaves stay."""
  return jax.tree.map(steps_lib.host_value, tree)


def _accuracy_fields(result: dict[str, float]) -> dict[str, float]:
  return {k: result[k] for k in ("accuracy", "top5", "accuracy_float_activations") if k in result}


def _jsonable(x):
  if isinstance(x, dict):
    return {k: _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (np.floating, np.integer, np.bool_)):
    return x.item()
  return x


def summary(report: dict[str, Any]) -> str:
  """A human-readable summary and the per-layer table."""
  d, p, c = report["dense"], report["pruned"], report["compressed"]
  est = " (estimate: codec not available)" if c.get("estimate") else ""
  lines = [
    f"== {report['model']} on {report['dataset']}"
    + (" [reference: float fine-tuning]" if report.get("reference_only") else ""),
    f"dense:      accuracy {d['accuracy']:.4f}"
    + (f", top-5 {d['top5']:.4f}" if "top5" in d else "")
    + f", {d['num_values']:,} values, {d['float32_bytes']:,} bytes as float32",
    f"pruned:     accuracy {p['accuracy']:.4f}, sparsity {p['sparsity']:.4f}",
    f"compressed: accuracy {c['accuracy']:.4f}"
    + (f", top-5 {c['top5']:.4f}" if "top5" in c else "")
    + f", {c['bits']} bits, {c['artifact_bytes']:,} bytes{est}",
    f"compression ratio {c['compression_ratio']:.2f}x (paper-style, kernels only: "
    f"{c['paper_style_compression_ratio']:.2f}x); accuracy change vs dense "
    f"{100 * (c['accuracy'] - d['accuracy']):+.2f} points",
    "seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in report["seconds"].items()),
  ]
  if report["layers"]:
    lines += ["", fq.format_report(report["layers"])]
  return "\n".join(lines)


def run(config, workdir: str, *, mesh=None, log: Log = print) -> dict[str, Any]:
  """Runs (or resumes) the whole pipeline; returns the report.

  Args:
    config: an `ml_collections.ConfigDict` like `configs/digits.py`'s.
    workdir: output folder (checkpoints, metrics.csv, model.fqz, report.json).
    mesh: device mesh (default: all devices on the 'data' axis).
    log: where progress lines and the summary go.

  Raises:
    ConfigError: for a bad setting (one-line message naming the key).
  """
  ctx = make_context(config, workdir, mesh=mesh, log=log)
  runner = Runner(ctx)
  try:
    return runner.run()
  finally:
    runner.ckpt.wait()
    runner.ckpt.close()
