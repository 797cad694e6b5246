"""Distillation from the dense model and the gradual DNS sparsity ramp (issue 15, items 3 and 4)."""

from __future__ import annotations

import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fq_jax as fq
from fq_jax._src import sparsity_ramp
from fq_jax.pipeline import ConfigError, losses, plans, train_lib
from fq_jax.pipeline import configuration as cfg
from fq_jax.pipeline import steps as steps_lib

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the configs/ package, as train.py sees it

from configs import digits  # noqa: E402

# ----------------------------------------------------------------------------
# The loss
# ----------------------------------------------------------------------------


def _np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _np_distillation(student, teacher, labels, w, temp):
  """The issue's formula written out in float64 numpy."""
  student, teacher = student.astype(np.float64), teacher.astype(np.float64)
  ce = -np.mean(_np_log_softmax(student)[np.arange(len(labels)), labels])
  p = np.exp(_np_log_softmax(teacher / temp))
  kl = np.mean(np.sum(p * (np.log(p) - _np_log_softmax(student / temp)), -1))
  return (1 - w) * ce + w * temp**2 * kl


def _logits(seed, shape=(6, 5), scale=3.0):
  return np.asarray(np.random.default_rng(seed).normal(size=shape) * scale, np.float32)


@pytest.mark.parametrize("w, temp", [(0.5, 4.0), (0.3, 1.0), (1.0, 2.5)])
def test_distillation_loss_matches_the_formula(w, temp):
  student, teacher = _logits(0), _logits(1)
  labels = np.array([0, 1, 2, 3, 4, 0])
  got = losses.distillation_loss(
    student, teacher, labels, losses.Distillation(weight=w, temperature=temp)
  )
  assert float(got) == pytest.approx(_np_distillation(student, teacher, labels, w, temp), rel=1e-5)


def test_hand_computed_two_class_value():
  # One example, two classes, T = 2, w = 0.5: student logits (0, 0), teacher (2 ln 3, 0).
  # CE(label 0) = ln 2; teacher softened: p = (3/4, 1/4); student softened: q = (1/2, 1/2);
  # KL = 3/4 ln(3/2) + 1/4 ln(1/2); loss = 0.5 ln 2 + 0.5 * 4 * KL.
  student = np.array([[0.0, 0.0]], np.float32)
  teacher = np.array([[2 * np.log(3.0), 0.0]], np.float32)
  kl = 0.75 * np.log(1.5) + 0.25 * np.log(0.5)
  expected = 0.5 * np.log(2.0) + 0.5 * 4.0 * kl
  got = losses.distillation_loss(
    student, teacher, np.array([0]), losses.Distillation(weight=0.5, temperature=2.0)
  )
  assert float(got) == pytest.approx(expected, rel=1e-6)


def test_weight_zero_is_plain_cross_entropy_exactly():
  student, teacher = _logits(2), _logits(3)
  labels = np.array([4, 3, 2, 1, 0, 1])
  off = losses.distillation_loss(
    student, teacher, labels, losses.Distillation(weight=0.0, temperature=4.0)
  )
  assert np.array_equal(np.asarray(off), np.asarray(steps_lib.cross_entropy(student, labels)))
  assert np.array_equal(
    np.asarray(losses.distillation_loss(student, None, labels, None)), np.asarray(off)
  )


def test_soft_gradient_is_t_times_q_minus_p():
  # d/ds [T^2 KL(p || softmax(s / T))] = T (softmax(s / T) - p), per example over the batch.
  student, teacher = _logits(4), _logits(5)
  temp = 3.0
  grad_s, grad_t = jax.grad(lambda s, t: temp**2 * losses.soft_kl(t, s, temp), argnums=(0, 1))(
    jnp.asarray(student), jnp.asarray(teacher)
  )
  q = np.exp(_np_log_softmax(student.astype(np.float64) / temp))
  p = np.exp(_np_log_softmax(teacher.astype(np.float64) / temp))
  np.testing.assert_allclose(grad_s, temp * (q - p) / len(student), atol=1e-6)
  assert not np.any(np.asarray(grad_t))  # the teacher is frozen


class _Tiny(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Dense(8)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.5)(x)
    return nn.Dense(3)(nn.relu(x))


def test_train_step_distills_from_the_frozen_teacher():
  model = _Tiny()
  x = jnp.asarray(_logits(6, (16, 4), 1.0))
  batch = {"image": x, "label": jnp.arange(16) % 3}
  student = model.init(jax.random.key(0), x)
  teacher = model.init(jax.random.key(1), x)
  tx = optax.sgd(0.1)
  state = steps_lib.TrainState(
    student["params"], student["batch_stats"], tx.init(student["params"])
  )
  plain = jax.jit(steps_lib.make_train_step(model, tx))
  d = losses.Distillation(weight=0.5, temperature=4.0)
  distilled = jax.jit(steps_lib.make_train_step(model, tx, distill=d))
  off = jax.jit(
    steps_lib.make_train_step(model, tx, distill=losses.Distillation(weight=0.0, temperature=4.0))
  )

  s_plain, m_plain = plain(state, batch)
  s_off, m_off = off(state._replace(teacher=teacher), batch)
  for a, b in zip(jax.tree.leaves(s_plain[:3]), jax.tree.leaves(s_off[:3])):
    assert np.array_equal(np.asarray(a), np.asarray(b))  # w = 0: the plain step, bit for bit
  assert float(m_off["loss"]) == float(m_plain["loss"])

  s_d, m_d = distilled(state._replace(teacher=teacher), batch)
  # The loss is the formula on the student's train-mode logits and the teacher's eval-mode ones.
  s_logits, _ = model.apply(student, x, train=True, mutable=["batch_stats"])
  t_logits = model.apply(teacher, x, train=False)
  expected = _np_distillation(
    np.asarray(s_logits), np.asarray(t_logits), np.arange(16) % 3, 0.5, 4.0
  )
  assert float(m_d["loss"]) == pytest.approx(expected, rel=1e-5)
  for a, b in zip(jax.tree.leaves(s_d.teacher), jax.tree.leaves(teacher)):
    assert np.array_equal(np.asarray(a), np.asarray(b))  # frozen: params and BN stats unchanged
  assert not np.allclose(s_d.params["Dense_1"]["kernel"], s_plain.params["Dense_1"]["kernel"])


# ----------------------------------------------------------------------------
# The sparsity ramp
# ----------------------------------------------------------------------------


def test_cubic_ramp_follows_zhu_and_gupta():
  ramp_steps, s_f, s_i = 20, 0.7, 0.0
  ramp = jax.jit(sparsity_ramp.cubic(ramp_steps))
  for t in range(0, 31):
    tt = min(t, ramp_steps)
    expected = s_f + (s_i - s_f) * (1 - tt / ramp_steps) ** 3  # Zhu and Gupta 2017, Eq. 1
    assert float(ramp(t)) * s_f == pytest.approx(expected, abs=1e-6)
  assert float(ramp(0)) == 0.0 and float(ramp(ramp_steps)) == 1.0
  assert float(sparsity_ramp.cubic(0)(0)) == 1.0  # no ramp: the target at once


def test_dns_sparsity_follows_the_ramp_then_matches_plain_dns():
  rng = np.random.default_rng(0)
  params = {"a": {"kernel": jnp.asarray(rng.normal(size=(12, 10)), jnp.float32)}}
  target, ramp_steps, num_steps = 0.6, 8, 12
  ramp = sparsity_ramp.cubic(ramp_steps)
  tx = fq.dns_pruning(optax.sgd(0.05), sparsity=target, sparsity_schedule=ramp)
  grads = {"a": {"kernel": jnp.asarray(rng.normal(size=(12, 10)), jnp.float32)}}

  @jax.jit
  def step(p, s):
    u, s = tx.update(grads, s, p)
    return optax.apply_updates(p, u), s

  p, s = params, tx.init(params)
  size = 120
  for t in range(1, num_steps + 1):
    p, s = step(p, s)
    pruned = size - int(jnp.sum(s.masks["a"]["kernel"]))
    fraction = 1 - (1 - min(t / ramp_steps, 1.0)) ** 3  # s_t / s_f
    # Each update prunes round(fraction * round(target * size)) weights: s_t to the nearest weight.
    assert abs(pruned - fraction * round(target * size)) <= 0.5 + 1e-6
    assert pruned / size == pytest.approx(target * fraction, abs=0.5 / size)
    if t >= ramp_steps:
      assert pruned == round(target * size)
  # Past the ramp, an update is plain DNS at the target (same hysteresis, same mask).
  plain = fq.dns_masks(p, s.masks, sparsity=target)
  assert np.array_equal(np.asarray(plain["a"]["kernel"]), np.asarray(s.masks["a"]["kernel"]))
  with pytest.raises(ValueError, match="sparsity_schedule"):
    fq.dns_pruning(optax.sgd(0.1), sensitivity=0.5, sparsity_schedule=ramp)


# ----------------------------------------------------------------------------
# In the pipeline
# ----------------------------------------------------------------------------


def _config(**overrides):
  c = digits.get_config()
  c.dense.epochs, c.dense.steps = None, 6
  c.prune.epochs, c.prune.steps = None, 8
  c.quant.epochs_per_step, c.quant.steps_per_step = None, 2
  c.quant.final_epochs, c.quant.final_steps = None, 2
  c.quant.inq_fractions = (0.5, 1.0)
  c.quant.gmm_iters = 20
  c.eval_steps = 1
  c.progress_bar = False
  c.async_checkpointing = False
  c.checkpoint_every_steps = 3
  c.max_checkpoints = 100
  for key, value in overrides.items():
    *sections, leaf = key.split(".")
    node = c
    for section in sections:
      node = node[section]
    node[leaf] = value
  return c


@pytest.mark.parametrize(
  "key, value, match",
  [
    ("distill.weight", 1.5, "distill.weight: must be in"),
    ("distill.temperature", 0.0, "distill.temperature: must be a finite number > 0"),
    ("prune.ramp_fraction", -0.1, "prune.ramp_fraction: must be in"),
  ],
)
def test_new_keys_are_validated(key, value, match):
  with pytest.raises(ConfigError, match=match):
    cfg.validate(_config(**{key: value}))


def test_ramp_needs_dns():
  with pytest.raises(ConfigError, match="prune.ramp_fraction: the ramp needs prune.method=dns"):
    cfg.validate(_config(**{"prune.ramp_fraction": 0.5, "prune.method": "magnitude"}))


@pytest.mark.slow(12)
def test_teacher_is_checkpointed_from_prune_start_to_quantize_end(tmp_path):
  config = _config(**{"distill.weight": 0.5})
  ctx = train_lib.make_context(config, str(tmp_path), log=lambda s: None)
  runner = train_lib.Runner(ctx)
  runner.restore_or_start()
  dense = {k: runner.carry[k] for k in ("params", "batch_stats")}
  runner.carry["teacher"] = plans.teacher_variables(runner.carry)
  runner.carry["params"] = jax.tree.map(lambda x: x + 1.0, dense["params"])  # the student moves
  masks = train_lib.initial_masks(ctx, dense["params"])
  runner.carry["opt_state"] = train_lib.prune_plan(ctx).tx.init(dense["params"])
  runner.carry["opt_state"] = runner.carry["opt_state"]._replace(masks=masks)
  positions = {("prune", 0): False, ("prune", 3): True, ("quantize", 0): True}
  for (stage, step), carried in positions.items():
    if stage == "quantize":
      runner.carry["masks"] = masks
      runner.carry.pop("opt_state")
    runner.save(stage, step)
    runner.ckpt.wait()
    restored = runner.ckpt.restore(runner.ckpt.latest(), train_lib.abstract_carry(ctx, stage, step))
    assert ("teacher" in restored) == carried
    if carried:  # bit for bit the model before pruning, not the student
      for x, y in zip(jax.tree.leaves(restored["teacher"]), jax.tree.leaves(dense)):
        assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))
  runner.ckpt.close()
  assert not plans.has_teacher(_config(), "quantize", 0)  # distillation off: no teacher kept


@pytest.mark.slow(20)
def test_distilled_ramped_prune_stage_runs_in_the_pipeline(tmp_path):
  config = _config(
    **{
      "distill.weight": 0.5,
      "prune.ramp_fraction": 0.5,
      "dense.steps": 0,
      "quant.enabled": False,
      "quant.steps_per_step": 0,
      "quant.final_steps": 0,
      "checkpoint_every_steps": 0,
      "encode.enabled": False,
    }
  )
  report = train_lib.run(config, str(tmp_path), log=lambda s: None)
  for row in report["layers"]:  # past the ramp every layer is at its target
    assert row["sparsity"] == pytest.approx(row["requested_sparsity"], abs=1 / row["size"])
  rows = (tmp_path / "metrics.csv").read_text().splitlines()
  assert sum(r.startswith("prune,") and ",train," in r for r in rows) == 1
