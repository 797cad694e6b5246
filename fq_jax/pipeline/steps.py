"""Pure training pieces: optimizers, learning-rate schedules, train and eval steps.

Nothing here does I/O. A stage's train step is

    grads of  cross_entropy(model(forward(params, opt_state), x))
    updates, opt_state = tx.update(grads, opt_state, params)

(or, with distillation, `losses.distillation_loss` against the frozen teacher's
logits) where `forward` maps the float parameters the optimizer owns to the ones the
model sees: the identity for dense training, `fq.quantized` under DNS pruning
(pruned weights read as 0) and under focused quantization (straight-through
quantized weights). Batch-norm statistics are updated in train mode from the
forward parameters, so after quantization they match the quantized weights.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import fq_jax as fq
from fq_jax.pipeline import losses
from fq_jax.pipeline import sharding as sharding_lib

Forward = Callable[[Any, Any], Any]  # (params, opt_state) -> forward params


class TrainState(NamedTuple):
  """Everything a train step reads and writes (a pytree of arrays).

  Attributes:
    params: float parameters, updated by the optimizer.
    batch_stats: batch-norm running statistics ({} for models without).
    opt_state: the stage's optimizer state (masks and FQ state included).
    teacher: variables ({"params", ["batch_stats"]}) of the frozen
      distillation teacher, or None; the step returns them unchanged.
  """

  params: Any
  batch_stats: Any
  opt_state: Any
  teacher: Any = None


def identity_forward(params, opt_state):
  """Forward parameters of dense training: the parameters themselves."""
  del opt_state
  return params


# ----------------------------------------------------------------------------
# Optimizers and schedules
# ----------------------------------------------------------------------------


def stage_schedule(
  kind: str,
  base_lr: float,
  total_steps: int,
  *,
  decay_steps: int = 0,
  decay_factor: float = 0.1,
  restarts: Sequence[int] = (),
) -> optax.Schedule:
  """The learning rate of one stage as a function of its update count.

  Args:
    kind: "constant"; "cosine" (from base_lr to 0 over the stage or over
      each restart segment); "step" (times decay_factor every decay_steps,
      counted from the last restart).
    base_lr: initial learning rate.
    total_steps: updates in the stage.
    decay_steps: period of "step" decay (0: never decays).
    decay_factor: multiplier of "step" decay.
    restarts: update counts where the schedule starts over (INQ steps: each
      step of the paper's schedule begins at the base rate).

  Returns:
    An optax schedule (jittable).
  """
  starts = jnp.asarray((0, *restarts), jnp.int32)
  ends = jnp.asarray((*restarts, max(total_steps, 1)), jnp.int32)

  def segment(count):
    i = jnp.sum(starts <= count) - 1
    return count - starts[i], jnp.maximum(ends[i] - starts[i], 1)

  def schedule(count):
    count = jnp.asarray(count, jnp.int32)
    t, length = segment(count)
    if kind == "constant":
      return jnp.float32(base_lr) * jnp.ones([], jnp.float32)
    if kind == "cosine":
      frac = jnp.clip(t / length, 0.0, 1.0)
      return jnp.float32(base_lr) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
    if kind == "step":
      if decay_steps <= 0:
        return jnp.float32(base_lr) * jnp.ones([], jnp.float32)
      return jnp.float32(base_lr) * jnp.float32(decay_factor) ** (t // decay_steps)
    raise ValueError(f"unknown schedule {kind!r}")

  return schedule


def _decay_mask(params):
  # Weight decay on conv and dense kernels only: decaying batch-norm scales
  # and biases of small networks mostly hurts.
  return jax.tree.map(lambda x: jnp.ndim(x) > 1, params)


def sgd(
  schedule: optax.Schedule, *, momentum: float, nesterov: bool = False, weight_decay: float = 0.0
) -> optax.GradientTransformation:
  """SGD with momentum and decoupled-from-BN L2 weight decay on kernels."""
  return optax.chain(
    optax.add_decayed_weights(weight_decay, mask=_decay_mask) if weight_decay else optax.identity(),
    optax.sgd(schedule, momentum=momentum or None, nesterov=nesterov),
  )


class MaskedState(NamedTuple):
  """State of `keep_pruned`: the frozen masks and the inner state."""

  masks: Any
  inner_state: Any


def _zero_pruned(masks, tree):
  return jax.tree.map(
    lambda m, g: g if m is None else jnp.where(m, g, jnp.zeros_like(g)),
    masks,
    tree,
    is_leaf=lambda x: x is None,
  )


def keep_pruned(inner: optax.GradientTransformation, masks) -> optax.GradientTransformation:
  """Masked fine-tuning: `inner` on the kept weights; pruned weights stay exactly 0.

  Gradients and updates of pruned entries are zeroed, so neither momentum
  nor weight decay can revive them. The masks ride along in the state so a
  checkpoint carries them.
  """

  def init(params):
    return MaskedState(masks, inner.init(params))

  def update(updates, state, params=None):
    updates = _zero_pruned(state.masks, updates)
    updates, inner_state = inner.update(updates, state.inner_state, params)
    return _zero_pruned(state.masks, updates), MaskedState(state.masks, inner_state)

  return optax.GradientTransformation(init, update)


# ----------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------


cross_entropy = losses.cross_entropy


def _variables(params, batch_stats):
  return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


def make_train_step(
  model: nn.Module,
  tx: optax.GradientTransformation,
  forward: Forward = identity_forward,
  *,
  distill: losses.Distillation | None = None,
  teacher_model: nn.Module | None = None,
  learns_alphas: bool = False,
):
  """The (unjitted) train step of one stage.

  Args:
    model: a Flax linen module called as `model.apply(vars, x, train=True)`.
    tx: the stage's optimizer.
    forward: maps (params, opt_state) to the parameters the model sees.
    distill: distillation settings (None or weight 0: plain cross-entropy).
      The teacher is `state.teacher`, run by `teacher_model` (default
      `model`) in eval mode (batch norm from its running statistics) inside
      the same step, frozen by stop_gradient.
    teacher_model: the teacher's module (the float network).
    learns_alphas: the stage is focused quantization: `forward` takes the
      layers' scales (`forward(params, opt_state, alphas=...)`), the loss is
      differentiated with respect to them too, and the alpha gradient goes to
      `tx.update` as `alpha_grads=` (one quantization pass per step: the
      update does not recompute the quantized values).

  Returns:
    `step(state: TrainState, batch) -> (TrainState, metrics)`, metrics the
    batch's mean loss and top-1 accuracy.
  """

  distilling = distill is not None and distill.weight > 0
  teacher_model = model if teacher_model is None else teacher_model

  def step(state: TrainState, batch):
    teacher_logits = None
    if distilling:
      teacher_logits = jax.lax.stop_gradient(
        teacher_model.apply(state.teacher, batch["image"], train=False)
      )

    def loss_fn(params, alphas=None):
      forward_params = (
        forward(params, state.opt_state, alphas=alphas)
        if learns_alphas
        else forward(params, state.opt_state)
      )
      variables = _variables(forward_params, state.batch_stats)
      logits, updates = model.apply(variables, batch["image"], train=True, mutable=["batch_stats"])
      loss = losses.distillation_loss(logits, teacher_logits, batch["label"], distill)
      return loss, (logits, updates.get("batch_stats", state.batch_stats))

    if learns_alphas:
      grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)
      (loss, (logits, batch_stats)), (grads, alpha_grads) = grad_fn(
        state.params, fq.alphas(state.opt_state)
      )
      updates, opt_state = tx.update(grads, state.opt_state, state.params, alpha_grads=alpha_grads)
    else:
      (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    new_state = TrainState(params, batch_stats, opt_state, state.teacher)
    return new_state, {"loss": loss, "accuracy": accuracy}

  return step


def make_eval_step(model: nn.Module, top5: bool):
  """The (unjitted) eval step: sums over one padded batch.

  Args:
    model: the Flax module.
    top5: also count top-5 hits.

  Returns:
    `eval_step(variables, batch) -> {'loss', 'correct', ['correct5'], 'count'}`
    (sums over the examples with batch['mask'] == 1).
  """

  def eval_step(variables, batch):
    logits = model.apply(variables, batch["image"], train=False)
    mask = batch["mask"]
    labels = batch["label"]
    out = {
      "loss": jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, labels) * mask),
      "correct": jnp.sum((jnp.argmax(logits, -1) == labels) * mask),
      "count": jnp.sum(mask),
    }
    if top5:
      _, best = jax.lax.top_k(logits, 5)
      out["correct5"] = jnp.sum(jnp.any(best == labels[:, None], axis=-1) * mask)
    return out

  return eval_step


def jit_train_step(step, mesh):
  """Jits a train step for the mesh: state replicated, batch sharded, state donated."""
  repl = sharding_lib.replicated(mesh)
  return jax.jit(
    step,
    in_shardings=(repl, sharding_lib.batch_sharding(mesh)),
    out_shardings=(repl, repl),
    donate_argnums=(0,),
  )


def with_events(step, events: fq.ScheduleEvents, count: int):
  """`step` followed, when the schedule says so, by its events, each as its own call.

  The train step itself holds no control flow; the host counts the updates
  (from `count`, the updates already made) and, after update n, runs
  `events.run` for `events.due(n)` (a DNS mask refresh, a mixture refit, an
  INQ growth). `events.run` is called eagerly: its expensive parts are
  jitted functions shared with the transform's `init`, so the first refit
  reuses the mixture fit compiled at the start of the stage.

  Returns:
    `step(state, batch) -> (state, metrics)`, with a host counter.
  """
  if not events.names:
    return step
  done = count

  def stepped(state: TrainState, batch):
    nonlocal done
    state, metrics = step(state, batch)
    done += 1
    due = events.due(done)
    if due:
      state = state._replace(opt_state=events.run(state.params, state.opt_state, due))
    return state, metrics

  return stepped


def jit_eval_step(step, mesh):
  """Jits an eval step for the mesh: variables replicated, batch sharded."""
  repl = sharding_lib.replicated(mesh)
  return jax.jit(step, in_shardings=(repl, sharding_lib.batch_sharding(mesh)), out_shardings=repl)


def host_value(x) -> np.ndarray:
  """A replicated (possibly multi-host) array as a host numpy value."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    x = x.addressable_data(0)
  return np.asarray(x)
