"""Stage plans: how many updates each stage runs, with which optimizer and forward (pure).

A `StagePlan` is everything the training loop needs to run one stage: its
length in updates, its optax transform (the compression transforms wrap the
stage's SGD), the `forward` that maps the optimizer's float parameters to the
ones the model sees, and its learning-rate schedule. Stage lengths come from
the config in epochs or in steps (`configuration.length_steps`); `stage_lengths`
reports both units.

Two options soften the prune and quantize stages: distillation from the
teacher, the model as it stood at the start of the prune stage (`distill.*`,
`StagePlan.distill`; the runner carries the teacher's variables and
checkpoints them, `has_teacher`), and a gradual DNS sparsity ramp over the
first `prune.ramp_fraction` of the prune stage (`fq.dns_pruning`'s
`sparsity_schedule`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

import fq_jax as fq
from fq_jax._src import sparsity_ramp
from fq_jax.pipeline import configuration as cfg
from fq_jax.pipeline import losses
from fq_jax.pipeline import steps as steps_lib
from fq_jax.pipeline.context import Context


@dataclasses.dataclass
class StagePlan:
  """One training stage: how many updates, with what optimizer and forward."""

  name: str
  num_steps: int
  tx: optax.GradientTransformation
  forward: steps_lib.Forward
  schedule: optax.Schedule
  distill: losses.Distillation | None = None
  # Schedule events (DNS mask refresh, mixture refit, INQ growth) run as their own
  # jitted calls between steps, so the compiled step holds no control flow.
  events: fq.ScheduleEvents = dataclasses.field(default_factory=fq.no_events)
  learns_alphas: bool = False  # forward(params, opt_state, alphas=...) gives the alpha gradient


def learning_rate(config, section: str) -> float:
  """The stage's learning rate (prune/quant: None takes dense.learning_rate)."""
  lr = config[section].learning_rate
  return config.dense.learning_rate if lr is None else lr


def _schedule(ctx: Context, section: str, num_steps: int, restarts=()) -> optax.Schedule:
  sub = ctx.config[section]
  return steps_lib.stage_schedule(
    sub.lr_schedule,
    learning_rate(ctx.config, section),
    num_steps,
    decay_steps=cfg.steps_for(sub.lr_decay_epochs, ctx.steps_per_epoch),
    decay_factor=sub.lr_decay_factor,
    restarts=restarts,
  )


def _inner(ctx: Context, schedule) -> optax.GradientTransformation:
  o = ctx.config.optimizer
  return steps_lib.sgd(
    schedule, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay
  )


def dense_plan(ctx: Context) -> StagePlan:
  """The dense stage: plain SGD for `dense.epochs` / `dense.steps`."""
  n = cfg.stage_steps(ctx.config, ctx.steps_per_epoch)["dense"]
  sched = _schedule(ctx, "dense", n)
  return StagePlan("dense", n, _inner(ctx, sched), steps_lib.identity_forward, sched)


def distillation(config) -> losses.Distillation | None:
  """The prune and quantize stages' distillation settings (None when `distill.weight` is 0)."""
  d = config.distill
  if not d.weight:
    return None
  return losses.Distillation(weight=float(d.weight), temperature=float(d.temperature))


def has_teacher(config, stage: str, step: int) -> bool:
  """Whether a checkpoint at (stage, step) carries the teacher's variables.

  The teacher is captured when the prune stage starts (step 0), so it is in
  every checkpoint from then to the end of the quantize stage.
  """
  if distillation(config) is None:
    return False
  return (stage == "prune" and step > 0) or stage == "quantize"


def teacher_variables(carry) -> dict[str, Any]:
  """The teacher captured from the carry: private copies of its params and batch stats."""
  copy = lambda t: jax.tree.map(lambda x: x.copy() if isinstance(x, jax.Array) else x, t)
  return {"params": copy(carry["params"]), "batch_stats": copy(carry["batch_stats"])}


def ramp_steps(config, num_steps: int) -> int:
  """Updates of the DNS sparsity ramp: round(prune.ramp_fraction * prune stage length)."""
  return round(config.prune.ramp_fraction * num_steps)


def prune_plan(ctx: Context, masks=None) -> StagePlan:
  """The prune stage; `masks` (magnitude pruning only) are the frozen masks."""
  return dataclasses.replace(_prune_plan(ctx, masks), distill=distillation(ctx.config))


def _prune_plan(ctx: Context, masks=None) -> StagePlan:
  c = ctx.config
  n = cfg.stage_steps(c, ctx.steps_per_epoch)["prune"]
  sched = _schedule(ctx, "prune", n)
  inner = _inner(ctx, sched)
  if not ctx.prunes:
    return StagePlan("prune", n, inner, steps_lib.identity_forward, sched)
  if c.prune.method == "dns":
    ramp = ramp_steps(c, n)
    tx, events = fq.dns_pruning_with_events(
      inner,
      sparsity=c.prune.sparsity,
      sensitivity=c.prune.sensitivity,
      rules=ctx.rules,
      update_every=c.prune.update_every,
      scope=c.prune.scope,
      sparsity_schedule=sparsity_ramp.cubic(ramp) if ramp else None,
    )
    return StagePlan("prune", n, tx, fq.quantized, sched, events=events)
  # Magnitude: pruned weights are exact zeros and keep_pruned holds them there.
  return StagePlan(
    "prune", n, steps_lib.keep_pruned(inner, masks), steps_lib.identity_forward, sched
  )


def quant_plan(ctx: Context, masks=None) -> StagePlan:
  """The quantize stage: INQ steps of `quant.epochs_per_step`, the last `quant.final_epochs`."""
  return dataclasses.replace(_quant_plan(ctx, masks), distill=distillation(ctx.config))


def _quant_plan(ctx: Context, masks=None) -> StagePlan:
  c = ctx.config
  q = cfg.quant_steps(c, ctx.steps_per_epoch)
  restarts = q.boundaries() if c.quant.lr_restart else ()
  sched = _schedule(ctx, "quant", q.total, restarts)
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
  tx, events = fq.focused_quantization_with_events(
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
  return StagePlan("quantize", q.total, tx, fq.quantized, sched, events=events, learns_alphas=True)


def plan_for(ctx: Context, stage: str, masks=None) -> StagePlan:
  """The plan of training stage `stage` ("dense", "prune" or "quantize")."""
  return {
    "dense": lambda: dense_plan(ctx),
    "prune": lambda: prune_plan(ctx, masks),
    "quantize": lambda: quant_plan(ctx, masks),
  }[stage]()


def initial_masks(ctx: Context, params):
  """Masks at the start of the prune stage: magnitude pruning, or one DNS update from all kept.

  With a DNS sparsity ramp the stage starts at sparsity 0 (all kept): the
  cubic ramp is 0 at step 0.
  """
  c = ctx.config
  n = cfg.stage_steps(c, ctx.steps_per_epoch)["prune"]
  ramped = c.prune.method == "dns" and ramp_steps(c, n) > 0
  if c.prune.method == "magnitude":
    sparsity = cfg.global_sparsity(c)
    fn = lambda p: fq.magnitude_masks(p, sparsity, rules=ctx.rules, scope=c.prune.scope)
  else:

    def fn(p):
      specs = fq.resolve(p, ctx.rules, sparsity=cfg.global_sparsity(c))
      ones = jax.tree.map(
        lambda s, w: None if s is None else jnp.ones(w.shape, bool),
        specs,
        p,
        is_leaf=lambda x: x is None or isinstance(x, fq.LayerSpec),
      )
      if ramped:
        return ones
      return fq.dns_masks(
        p,
        ones,
        sparsity=c.prune.sparsity,
        sensitivity=c.prune.sensitivity,
        rules=ctx.rules,
        scope=c.prune.scope,
      )

  return jax.jit(fn)(params)


def final_masks(opt_state):
  """The masks inside a prune-stage optimizer state."""
  return opt_state.masks


def stage_lengths(ctx: Context) -> dict[str, Any]:
  """Every stage's length in both units, for the log and report.json.

  Returns:
    {"steps_per_epoch": n, "dense": {"steps", "epochs"}, "prune": {...},
    "quantize": {"steps", "epochs", "steps_per_inq_step", "final_steps"}}.
  """
  spe = ctx.steps_per_epoch
  steps = cfg.stage_steps(ctx.config, spe)
  q = cfg.quant_steps(ctx.config, spe)
  out: dict[str, Any] = {"steps_per_epoch": spe}
  for stage, n in steps.items():
    out[stage] = {"steps": n, "epochs": n / spe}
  out["quantize"].update(steps_per_inq_step=q.per_inq_step, final_steps=q.final)
  return out


def describe_lengths(lengths: dict[str, Any]) -> str:
  """One log line: each stage's length in steps and epochs."""
  parts = [
    f"{stage} {lengths[stage]['steps']} steps ({lengths[stage]['epochs']:.3g} epochs)"
    for stage in cfg.TRAIN_STAGES
  ]
  return f"stages ({lengths['steps_per_epoch']} steps per epoch): " + ", ".join(parts)
