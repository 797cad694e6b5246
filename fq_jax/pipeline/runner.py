"""The loop of a run: stages in order, checkpoints at every stage end, resumption, preemption.

`Runner` owns the I/O edges of a run (checkpoints, metrics.csv, progress,
logs); the pure pieces come from `plans` (what each stage trains) and
`artifact` (the encoded file and the report).

Resumption: the run checkpoints (Orbax) its arrays and its position at every
stage end and every `checkpoint_every_steps` updates. Starting the same
command again restores the newest intact checkpoint and continues (a damaged
one is reported, moved to `workdir/damaged_checkpoints/` and skipped);
because data order, augmentation, initialisation and the FQ sampling are
functions of the seed and the position only, the final report is identical to
that of an uninterrupted run. Checkpoint ids are global steps (`global_step`:
updates of all stages so far); the position record says the stage and the
step within it.

Multi-host: process 0 picks the checkpoint to restore and broadcasts its id;
a checkpoint that fails to restore on any process is set aside on all, so
every process resumes from the same step.

Preemption: on SIGTERM the run saves a checkpoint at the current step and
raises `Preempted` (train.py exits with `Preempted.EXIT_CODE`); on several
processes JAX's preemption service makes them agree on the step
(`multihost_utils.reached_preemption_sync_point`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import jax
import jax.numpy as jnp

import fq_jax as fq
from fq_jax.pipeline import artifact as artifact_lib
from fq_jax.pipeline import checkpoint as checkpoint_lib
from fq_jax.pipeline import configuration as cfg
from fq_jax.pipeline import files, input_pipeline, plans, processes
from fq_jax.pipeline import integer as integer_lib
from fq_jax.pipeline import metrics as metrics_lib
from fq_jax.pipeline import sharding as sharding_lib
from fq_jax.pipeline import steps as steps_lib
from fq_jax.pipeline.configuration import ConfigError
from fq_jax.pipeline.context import (
  Context,
  abstract_variables,
  accuracy_fields,
  evaluate,
  forward_variables,
  initial_variables,
  make_context,
  sparsity_report,
  to_host,
)

# Epoch indices handed to the data pipeline are offset per stage so that each
# stage sees its own sequence of shuffles (the order is a function of (seed, epoch)).
EPOCH_OFFSET = {"dense": 0, "prune": 100_000, "quantize": 200_000}


# ----------------------------------------------------------------------------
# Checkpoint positions
# ----------------------------------------------------------------------------


def stage_offsets(ctx: Context) -> dict[str, int]:
  """{stage: updates of all earlier stages}; "evaluate" maps to the run's total."""
  steps = cfg.stage_steps(ctx.config, ctx.steps_per_epoch)
  out, total = {}, 0
  for stage in cfg.STAGES:
    out[stage] = total
    total += steps.get(stage, 0)
  return out


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
  abstract_masks = lambda: jax.eval_shape(
    lambda p: fq.magnitude_masks(p, 0.5, rules=ctx.rules), variables["params"]
  )
  if plans.has_teacher(ctx.config, stage, step):
    out["teacher"] = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
  masks = None
  if _has_masks(ctx, stage):
    masks = out["masks"] = abstract_masks()
  if _has_opt_state(ctx, stage, step):
    plan_stage = "quantize" if stage == "evaluate" else stage
    if plan_stage == "prune" and ctx.config.prune.method == "magnitude" and ctx.prunes:
      masks = abstract_masks()
    out["opt_state"] = jax.eval_shape(
      lambda p, m: plans.plan_for(ctx, plan_stage, m).tx.init(p), variables["params"], masks
    )
  return _replicated_abstract(out, ctx.mesh)


@dataclasses.dataclass
class RunRecord:
  """The JSON side of a checkpoint: where the run is and what it measured."""

  stage: str = "dense"
  step: int = 0
  results: dict[str, Any] = dataclasses.field(default_factory=dict)
  seconds: dict[str, float] = dataclasses.field(default_factory=dict)

  def to_json(self, config_dict, global_step: int) -> dict[str, Any]:
    return {
      "position": {"stage": self.stage, "step": self.step, "global_step": global_step},
      "results": self.results,
      "seconds": self.seconds,
      "config": config_dict,
    }


# ----------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------


class Runner:
  """Drives the stages; owns the I/O edges (checkpoints, CSV, progress, logs)."""

  def __init__(self, ctx: Context):
    self.ctx = ctx
    c = ctx.config
    self.config_dict = cfg.config_json(c)
    self.ckpt = checkpoint_lib.Checkpoints(
      files.join(ctx.workdir, "checkpoints"),
      max_to_keep=c.max_checkpoints,
      async_save=c.async_checkpointing,
    )
    self.record = RunRecord()
    self.carry: dict[str, Any] = {}
    self._clock = time.perf_counter()
    self.offsets = stage_offsets(ctx)
    self.preemption = processes.PreemptionWatch()
    self.writer: metrics_lib.MetricsWriter | None = None

  def global_step(self, stage: str, step: int) -> int:
    """Updates of the whole run at position (stage, step): the checkpoint id."""
    return self.offsets[stage] + step

  # -- positions -------------------------------------------------------------

  def _restore(self, step: int) -> None:
    """Restores checkpoint `step` (raises `checkpoint_lib.DamagedCheckpoint` if unreadable)."""
    ctx = self.ctx
    meta = self.ckpt.meta(step)
    diff = cfg.config_differences(meta.get("config", {}), self.config_dict)
    if diff:
      raise ConfigError(
        "workdir",
        f"{ctx.workdir} holds a run with a different config "
        f"({', '.join(diff[:5])}); resume with the same settings or use a new --workdir",
      )
    try:
      pos = meta["position"]
      record = RunRecord(
        stage=pos["stage"],
        step=int(pos["step"]),
        results=meta.get("results", {}),
        seconds=meta.get("seconds", {}),
      )
      if record.stage not in cfg.STAGES:
        raise ValueError(f"unknown stage {record.stage!r}")
    except (KeyError, TypeError, ValueError) as e:
      raise checkpoint_lib.DamagedCheckpoint(step, f"bad position record: {e}") from None
    self.carry = self.ckpt.restore(step, abstract_carry(ctx, record.stage, record.step))
    self.record = record

  def restore_or_start(self) -> None:
    """Restores the newest intact checkpoint (damaged ones are set aside), or starts afresh.

    Process 0 names the candidate; a candidate that any process fails to read
    is set aside everywhere, so all processes resume from the same checkpoint.
    """
    ctx = self.ctx
    restored = None
    while True:
      newest = self.ckpt.steps_newest_first()
      step = processes.broadcast_int(newest[0] if newest else -1)
      if step < 0:
        break
      error = None
      try:
        self._restore(step)
      except checkpoint_lib.DamagedCheckpoint as e:
        error = e
      if processes.all_true(error is None):
        restored = step
        break
      moved = self.ckpt.set_aside(step)
      why = error or checkpoint_lib.DamagedCheckpoint(step, "unreadable on another process")
      ctx.log(f"warning: {why}; moved to {moved}, trying an older checkpoint")
    if restored is None:
      self.carry = dict(initial_variables(ctx))
      self.record = RunRecord()
    else:
      ctx.log(
        f"resumed from checkpoint {restored}: stage {self.record.stage}, step {self.record.step}"
      )
    self.writer = metrics_lib.MetricsWriter(
      files.join(ctx.workdir, "metrics.csv"),
      resume_stage=self.record.stage,
      resume_step=self.record.step,
      enabled=ctx.is_main,
      tensorboard_dir=ctx.workdir if ctx.config.get("tensorboard", True) else None,
      purge_step=self.global_step(self.record.stage, self.record.step) if restored else None,
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
    if plans.has_teacher(self.ctx.config, stage, step):
      keys.append("teacher")
    state = {k: self.carry[k] for k in keys}
    if self.ctx.config.async_checkpointing:
      # The next train step donates these buffers; save private copies.
      state = jax.tree.map(lambda x: x.copy() if isinstance(x, jax.Array) else x, state)
    global_step = self.global_step(stage, step)
    self.ckpt.save(global_step, state, self.record.to_json(self.config_dict, global_step))

  def _tick(self, stage: str) -> None:
    now = time.perf_counter()
    self.record.seconds[stage] = self.record.seconds.get(stage, 0.0) + (now - self._clock)
    self._clock = now

  # -- training --------------------------------------------------------------

  def train(self, plan: plans.StagePlan, start_step: int) -> None:
    """Runs `plan` from `start_step` to its end on the carry, one epoch at a time."""
    ctx = self.ctx
    if plan.num_steps <= start_step:
      return
    model = ctx.model
    scales = self.record.results.get("activation_scales")
    if plan.name == "quantize" and scales:  # integer activations, straight-through
      model = integer_lib.model_for(ctx, scales)
    step_fn = steps_lib.jit_train_step(
      input_pipeline.normalizing(
        steps_lib.make_train_step(
          model,
          plan.tx,
          plan.forward,
          distill=plan.distill,
          teacher_model=ctx.model,
          learns_alphas=plan.learns_alphas,
        )
      ),
      ctx.mesh,
    )
    step_fn = steps_lib.with_events(step_fn, plan.events, start_step)
    state = steps_lib.TrainState(
      self.carry["params"],
      self.carry["batch_stats"],
      self.carry["opt_state"],
      self.carry["teacher"] if plan.distill else None,
    )
    state = sharding_lib.put_replicated(state, ctx.mesh, copy=True)  # the steps donate it
    step, clock = start_step, time.perf_counter()
    while step < plan.num_steps:
      state, step = self._train_epoch(plan, step_fn, state, step, clock)
    self.carry.update(params=state.params, batch_stats=state.batch_stats, opt_state=state.opt_state)

  def _train_epoch(self, plan, step_fn, state, step: int, clock: float):
    """Trains from `step` to the end of its epoch (or of the stage); returns (state, step)."""
    ctx, c = self.ctx, self.ctx.config
    spe = ctx.steps_per_epoch
    num_epochs = math.ceil(plan.num_steps / spe)
    epoch, offset = divmod(step, spe)
    todo = min(spe, plan.num_steps - epoch * spe)
    bar = metrics_lib.progress(
      todo,
      f"{plan.name} {epoch + 1}/{num_epochs}",
      initial=offset,
      enabled=c.progress_bar and ctx.is_main,
    )
    bs = sharding_lib.batch_sharding(ctx.mesh)
    sums, n = None, 0
    window = _LogWindow(time.perf_counter())
    batches = ctx.source.train_epoch(EPOCH_OFFSET[plan.name] + epoch, start_step=offset)
    for batch in ctx.source.to_device(batches, bs):
      if offset >= todo:
        break
      state, m = step_fn(state, batch)
      sums = m if sums is None else jax.tree.map(jnp.add, sums, m)
      step, offset, n = step + 1, offset + 1, n + 1
      bar.update()
      if c.log_every and n % c.log_every == 0:  # the only host reads inside the loop
        self._log_step(plan, step, n, sums, window, bar)
      every = c.checkpoint_every_steps
      preempted = self.preemption.reached(self.global_step(plan.name, step))
      if preempted or (every and step % every == 0 and step < plan.num_steps):
        self.carry.update(
          params=state.params, batch_stats=state.batch_stats, opt_state=state.opt_state
        )
        self.save(plan.name, step)
      if preempted:
        bar.close()
        raise processes.Preempted(self.global_step(plan.name, step))
    bar.close()
    if n:
      self._epoch_row(plan, state, epoch, num_epochs, step, sums, n, clock)
      every = c.eval_every_epochs
      if every and (epoch + 1) % every == 0 and step < plan.num_steps:
        self._epoch_eval(plan, state, step)  # the stage's own evaluation covers its end
    return state, step

  def _epoch_eval(self, plan, state, step: int) -> None:
    """A test row mid-stage (`eval_every_epochs`) of the network the forward pass sees."""
    ctx = self.ctx
    carry = {"params": state.params, "batch_stats": state.batch_stats, "opt_state": None}
    extra = {}
    if plan.name == "prune" and ctx.prunes and ctx.config.prune.method == "dns":
      masks = plans.final_masks(state.opt_state)  # (magnitude: params already masked)
      carry["params"] = fq.apply_masks(state.params, masks)
      extra["sparsity"] = fq.sparsity_of(masks)
    elif plan.name == "quantize" and ctx.quantizes:
      carry["opt_state"] = state.opt_state
      extra["quantized_fraction"] = fq.quantized_fraction(state.opt_state)
    result = evaluate(ctx, forward_variables(ctx, carry))
    self._eval_row(plan.name, step, result, **extra)
    ctx.log(f"{plan.name} step {step}/{plan.num_steps}: test accuracy {result['accuracy']:.4f}")

  def _log_step(self, plan, step: int, n: int, sums, window: _LogWindow, bar) -> None:
    """A line (or the bar's postfix) with the loss and accuracy since the last one,
    images/s and the training ETA; the same values go to TensorBoard."""
    ctx = self.ctx
    loss_sum = float(steps_lib.host_value(sums["loss"]))  # waits for the step
    acc_sum = float(steps_lib.host_value(sums["accuracy"]))
    now = time.perf_counter()
    steps = n - window.n
    loss = (loss_sum - window.loss_sum) / steps
    acc = (acc_sum - window.acc_sum) / steps
    per_step = (now - window.time) / steps
    images_per_s = ctx.config.batch_size / max(per_step, 1e-9)
    global_step = self.global_step(plan.name, step)
    eta = metrics_lib.format_seconds(per_step * (self.offsets["evaluate"] - global_step))
    window.time, window.n, window.loss_sum, window.acc_sum = now, n, loss_sum, acc_sum
    if self.writer is not None:
      self.writer.scalars(
        global_step,
        f"{plan.name}/train_step",
        {"loss": loss, "accuracy": acc, "images_per_second": images_per_s},
      )
    if metrics_lib.is_live(bar):
      bar.set_postfix(loss=f"{loss:.4f}", acc=f"{acc:.4f}", img_s=f"{images_per_s:.0f}", eta=eta)
    elif ctx.is_main:
      ctx.log(
        f"{plan.name} step {step}/{plan.num_steps}: loss {loss:.4f}, accuracy {acc:.4f}, "
        f"{images_per_s:.1f} images/s, ETA {eta} (training, {global_step}/"
        f"{self.offsets['evaluate']} steps done)"
      )

  def _epoch_row(self, plan, state, epoch, num_epochs, step, sums, n, clock) -> None:
    loss = float(steps_lib.host_value(sums["loss"])) / n
    acc = float(steps_lib.host_value(sums["accuracy"])) / n
    row = dict(
      stage=plan.name,
      epoch=epoch,
      step=step,
      global_step=self.global_step(plan.name, step),
      split="train",
      loss=loss,
      accuracy=acc,
      learning_rate=float(plan.schedule(step - 1)),
      seconds=round(time.perf_counter() - clock, 3),
    )
    if plan.name == "quantize" and self.ctx.quantizes:
      row["quantized_fraction"] = fq.quantized_fraction(state.opt_state)
    self.writer.write(**row)
    self.ctx.log(
      f"{plan.name} epoch {epoch + 1}/{num_epochs}: loss {loss:.4f}, train accuracy {acc:.4f}"
    )

  def _eval_row(self, stage: str, step: int, result: dict[str, float], **extra) -> None:
    self.writer.write(
      stage=stage,
      step=step,
      global_step=self.offsets["evaluate"]
      if stage == "evaluate"
      else self.global_step(stage, step),
      split="test",
      loss=result["loss"],
      accuracy=result["accuracy"],
      top5=result.get("top5"),
      **extra,
    )

  # -- stages ----------------------------------------------------------------

  def stage_dense(self, start_step: int) -> None:
    ctx = self.ctx
    plan = plans.dense_plan(ctx)
    if start_step == 0:
      self.carry["opt_state"] = plan.tx.init(self.carry["params"])
    self.train(plan, start_step)
    result = evaluate(ctx, forward_variables(ctx, {**self.carry, "opt_state": None}))
    variables = {"params": self.carry["params"], "batch_stats": self.carry["batch_stats"]}
    self.record.results["dense"] = {
      **accuracy_fields(result),
      "num_values": artifact_lib.num_values(variables),
      "float32_bytes": artifact_lib.float32_bytes(variables),
    }
    self._eval_row("dense", plan.num_steps, result)
    ctx.log(f"dense: test accuracy {result['accuracy']:.4f}")
    self.carry.pop("opt_state", None)
    self.save("prune", 0)

  def _start_prune(self, plan: plans.StagePlan) -> plans.StagePlan:
    """Initial masks and optimizer state of the prune stage; returns the plan to train."""
    ctx = self.ctx
    method = ctx.config.prune.method
    if ctx.prunes and method == "magnitude":
      masks = plans.initial_masks(ctx, self.carry["params"])
      self.carry["params"] = fq.apply_masks(self.carry["params"], masks)
      plan = plans.prune_plan(ctx, masks)
    opt_state = plan.tx.init(self.carry["params"])
    if ctx.prunes and method == "dns":
      # Start DNS from one mask update (from all kept) so the target holds
      # from the first step, however rarely `prune.update_every` updates.
      opt_state = opt_state._replace(masks=plans.initial_masks(ctx, self.carry["params"]))
    self.carry["opt_state"] = opt_state
    return plan

  def stage_prune(self, start_step: int) -> None:
    ctx, c = self.ctx, self.ctx.config
    if start_step == 0 and plans.distillation(c) is not None:
      self.carry["teacher"] = plans.teacher_variables(self.carry)  # the model before pruning
    if not ctx.prunes and not c.reference_only:
      dense = self.record.results["dense"]
      self.record.results["pruned"] = {
        **{k: v for k, v in dense.items() if k in ("accuracy", "top5")},
        "sparsity": 0.0,
      }
      self.save("quantize", 0)
      return
    plan = plans.prune_plan(ctx)
    if start_step == 0:
      plan = self._start_prune(plan)
    self.train(plan, start_step)
    sparsity, report = 0.0, {}
    if ctx.prunes:
      if plan.num_steps == 0 and c.prune.method == "dns":
        masks = plans.initial_masks(ctx, self.carry["params"])  # one DNS update from all kept
      else:
        masks = plans.final_masks(self.carry["opt_state"])
      self.carry["params"] = fq.apply_masks(self.carry["params"], masks)
      self.carry["masks"] = masks
      sparsity = fq.sparsity_of(masks)
      # Requested against reached, per layer and in total ({"layers": [...], "total": {...}}).
      report = sparsity_report(ctx, to_host(self.carry["params"]), to_host(masks))
    result = evaluate(ctx, forward_variables(ctx, {**self.carry, "opt_state": None}))
    self.record.results["pruned"] = {**accuracy_fields(result), "sparsity": sparsity, **report}
    self._eval_row("prune", plan.num_steps, result, sparsity=sparsity)
    ctx.log(f"prune: sparsity {sparsity:.4f}, test accuracy {result['accuracy']:.4f}")
    self.carry.pop("opt_state", None)
    self.save("quantize", 0)

  def stage_quantize(self, start_step: int) -> None:
    ctx = self.ctx
    plan = plans.quant_plan(ctx, self.carry.get("masks"))
    if start_step == 0:
      self.carry["opt_state"] = plan.tx.init(self.carry["params"])
      if ctx.quantizes and plan.num_steps and integer_lib.activation_bits(ctx.config):
        self.record.results["activation_scales"] = integer_lib.calibrate(
          ctx, forward_variables(ctx, self.carry)
        )
    self.train(plan, start_step)
    if not ctx.quantizes:
      self.carry.pop("opt_state", None)
    self.carry.pop("teacher", None)
    self.save("evaluate", 0)

  def stage_evaluate(self) -> dict[str, Any]:
    ctx = self.ctx
    t0 = time.perf_counter()
    variables = forward_variables(ctx, self.carry)
    result = evaluate(ctx, variables)
    if integer_lib.enabled(ctx.config):  # integer activations / batch norm, simulated
      if self.record.results.get("activation_scales") is None:
        self.record.results["activation_scales"] = integer_lib.calibrate(ctx, variables)
      focus = to_host(fq.find_state(self.carry["opt_state"]).focus) if ctx.quantizes else None
      model = integer_lib.model_for(ctx, self.record.results["activation_scales"], focus=focus)
      result = {**evaluate(ctx, variables, model), "accuracy_float_activations": result["accuracy"]}
    self._eval_row("evaluate", 1, result)
    seconds = self.record.seconds
    seconds["evaluate"] = seconds.get("evaluate", 0.0) + time.perf_counter() - t0
    t0 = time.perf_counter()
    compressed, rows = artifact_lib.encode(ctx, self.carry, self.record.results, variables, result)
    seconds["encode"] = seconds.get("encode", 0.0) + time.perf_counter() - t0
    report = artifact_lib.make_report(ctx, self.record.results, seconds, compressed, rows)
    artifact_lib.write_report(ctx, report)
    self.ckpt.wait()
    return report

  def run(self) -> dict[str, Any]:
    """Runs (or resumes) every stage; returns the report."""
    self.restore_or_start()
    self.ctx.log(plans.describe_lengths(plans.stage_lengths(self.ctx)))
    start = cfg.STAGES.index(self.record.stage)
    step = self.record.step
    stages = {"dense": self.stage_dense, "prune": self.stage_prune, "quantize": self.stage_quantize}
    for stage in cfg.STAGES[start:]:
      self._clock = time.perf_counter()
      if stage == "evaluate":
        return self.stage_evaluate()
      stages[stage](step)
      step = 0
    raise AssertionError("unreachable")


@dataclasses.dataclass
class _LogWindow:
  """Where the last step-level log line left off (time, steps, running sums)."""

  time: float
  n: int = 0
  loss_sum: float = 0.0
  acc_sum: float = 0.0


def run(config, workdir: str, *, mesh=None, log=print) -> dict[str, Any]:
  """Runs (or resumes) the whole pipeline; returns the report.

  Args:
    config: an `ml_collections.ConfigDict` like `configs/digits.py`'s.
    workdir: output folder (checkpoints, metrics.csv, model.fqz, report.json).
    mesh: device mesh (default: all devices on the 'data' axis).
    log: where progress lines and the summary go.

  Raises:
    ConfigError: for a bad setting or workdir (one-line message naming the key),
      before the first step.
    processes.Preempted: a SIGTERM arrived; a checkpoint at the current step is saved.
  """
  ctx = make_context(config, workdir, mesh=mesh, log=log)
  runner = Runner(ctx)
  try:
    with runner.preemption:
      return runner.run()
  finally:
    runner.ckpt.wait()
    runner.ckpt.close()
    if runner.writer is not None:
      runner.writer.close()
