"""The event form of the compression transforms: a step with no control flow, same results.

Oracles: the in-step form (`fq.dns_pruning`, `fq.focused_quantization`, whose
`jax.lax.cond` schedule the event form must reproduce bit for bit), the
alpha gradient of the paper (sum over quantized weights of g * Q[w] / alpha),
and the compiled HLO of the steps `train.py` runs.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fq_jax as fq
from configs import digits
from fq_jax._src import events as events_lib
from fq_jax._src import quantizers
from fq_jax.pipeline import input_pipeline, plans, train_lib
from fq_jax.pipeline import steps as steps_lib


def _params():
  keys = jax.random.split(jax.random.key(0), 2)
  params = {
    "a": {"kernel": jax.random.normal(keys[0], (3, 3, 4, 8)) * 0.1},
    "b": {"kernel": jax.random.normal(keys[1], (16, 8)) * 0.1, "bias": jnp.zeros(8)},
  }
  return fq.apply_masks(params, fq.magnitude_masks(params, 0.6))


_TARGET = jax.random.normal(jax.random.key(2), (16,))


def _loss(p):
  return jnp.sum((p["b"]["kernel"] @ jnp.ones(8) - _TARGET) ** 2) + jnp.sum(p["a"]["kernel"] ** 3)


def _step(tx, learns_alphas=False):
  @jax.jit
  def step(params, state):
    if learns_alphas:
      grad_fn = jax.grad(lambda p, a: _loss(fq.quantized(p, state, alphas=a)), argnums=(0, 1))
      grads, alpha_grads = grad_fn(params, fq.alphas(state))
      updates, state = tx.update(grads, state, params, alpha_grads=alpha_grads)
    else:
      grads = jax.grad(lambda p: _loss(fq.quantized(p, state)))(params)
      updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return step


def _run_both(in_step_tx, event_tx, events, num_steps, learns_alphas=False):
  """Trains both forms side by side; returns (in-step result, event result, events seen)."""
  params = _params()
  a = (params, in_step_tx.init(params))
  b = (params, event_tx.init(params))
  step_a, step_b = _step(in_step_tx, learns_alphas), _step(event_tx, learns_alphas)
  seen = []
  for count in range(1, num_steps + 1):
    a = step_a(*a)
    b = step_b(*b)
    if due := events.due(count):
      seen.append((count, due))
      b = (b[0], events.run(b[0], b[1], due))  # eagerly, as the pipeline runs it
  return a, b, seen


def _assert_identical(a, b):
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_focused_quantization_event_form_equals_in_step_form():
  """The pipeline's path: alpha gradients from the forward pass (the other path: below)."""
  schedule = fq.inq_schedule(3, refit_every=2, refit_growth=1.5)
  kwargs = dict(bits=5, schedule=schedule, gmm_iters=20)
  inner = optax.sgd(0.05, momentum=0.9)
  event_tx, events = fq.focused_quantization_with_events(inner, **kwargs)
  a, b, seen = _run_both(
    fq.focused_quantization(inner, **kwargs), event_tx, events, 14, learns_alphas=True
  )
  # Refits at 2, 2 + ceil(3) = 5, 5 + ceil(4.5) = 10; INQ boundaries at 3, 6, 9, 12.
  assert seen == [
    (2, ("refit",)),
    (3, ("inq",)),
    (5, ("refit",)),
    (6, ("inq",)),
    (9, ("inq",)),
    (10, ("refit",)),
    (12, ("inq",)),
  ]
  _assert_identical(a, b)
  assert fq.quantized_fraction(a[1]) == 1.0
  assert int(a[1].next_refit) == 17  # 10 + ceil(6.75): the host schedule agrees


def test_refit_and_inq_on_one_update_run_in_order():
  """Alpha gradients recomputed by update (no alpha_grads=): the plain optax path."""
  schedule = fq.inq_schedule(2, refit_every=2, refit_growth=1.0)  # both every 2 updates
  inner = optax.sgd(0.05)
  event_tx, events = fq.focused_quantization_with_events(inner, schedule=schedule, gmm_iters=10)
  a, b, seen = _run_both(
    fq.focused_quantization(inner, schedule=schedule, gmm_iters=10), event_tx, events, 6
  )
  assert seen == [(2, ("refit", "inq")), (4, ("refit", "inq")), (6, ("refit", "inq"))]
  _assert_identical(a, b)


@pytest.mark.parametrize("ramp", [False, True])
def test_dns_event_form_equals_in_step_form(ramp):
  from fq_jax._src import sparsity_ramp

  kwargs = dict(sparsity=0.5, update_every=3)
  if ramp:
    kwargs["sparsity_schedule"] = sparsity_ramp.cubic(6)
  inner = optax.sgd(0.05, momentum=0.9)
  event_tx, events = fq.dns_pruning_with_events(inner, **kwargs)
  a, b, seen = _run_both(fq.dns_pruning(inner, **kwargs), event_tx, events, 10)
  assert seen == [(3, ("masks",)), (6, ("masks",)), (9, ("masks",))]
  _assert_identical(a, b)
  assert fq.sparsity_of(a[1].masks) == pytest.approx(0.5, abs=0.01)


def test_dns_every_update_needs_no_events():
  tx, events = fq.dns_pruning_with_events(optax.sgd(0.1), sparsity=0.5)
  assert events.names == () and all(events.due(n) == () for n in range(1, 5))
  a, b, _ = _run_both(fq.dns_pruning(optax.sgd(0.1), sparsity=0.5), tx, events, 3)
  _assert_identical(a, b)


def test_alpha_gradient_from_the_forward_pass_is_the_papers():
  """d loss / d alpha through fq.quantized equals sum(g * Q[w] / alpha) over quantized weights."""
  params = _params()
  state = fq.focused_quantization(optax.sgd(0.1), bits=4).init(params)
  state = state._replace(focus=jax.tree.map(lambda f: f, state.focus))
  alphas = jax.tree.map(lambda a: a * 1.3, fq.alphas(state))
  grads, alpha_grads = jax.grad(
    lambda p, a: _loss(fq.quantized(p, state, alphas=a)), argnums=(0, 1)
  )(params, alphas)
  for name in ("a", "b"):
    f = state.focus[name]["kernel"]
    w = params[name]["kernel"]
    unit = np.asarray(quantizers.focused_values(quantizers.focused_symbols(w, f), f, alpha=1.0))
    g = np.asarray(grads[name]["kernel"], np.float64)  # straight-through: dL/dQ
    expected = np.sum(np.where(np.asarray(state.inq[name]["kernel"]), g * unit, 0.0))
    np.testing.assert_allclose(float(alpha_grads[name]["kernel"]), expected, rtol=1e-5)
  assert alpha_grads["b"]["bias"] is None


def test_event_form_validates_like_the_in_step_form():
  with pytest.raises(ValueError, match="bits must be an integer in"):
    fq.focused_quantization_with_events(optax.sgd(0.1), bits=9)
  with pytest.raises(TypeError, match="unexpected keyword"):
    fq.dns_pruning_with_events(optax.sgd(0.1), sparsity=0.5, every=2)


def test_refit_counts_follow_float32_growth():
  assert events_lib.refit_counts(4, 2.0, 100) == [4, 12, 28, 60]
  assert events_lib.refit_counts(0, 2.0, 100) == []
  counts = events_lib.refit_counts(3, 1.1, 10_000)
  interval, nxt, expected = np.float32(3), 3, []
  while nxt <= 10_000:
    expected.append(nxt)
    interval = np.float32(interval * np.float32(1.1))
    nxt += int(np.ceil(interval))
  assert counts == expected
  assert [n for n in range(1, 400) if events_lib.is_refit_count(3, 1.1, n)] == [
    n for n in counts if n < 400
  ]


# ----------------------------------------------------------------------------
# The steps train.py compiles
# ----------------------------------------------------------------------------

_CONTROL_FLOW = re.compile(r"\b(conditional|while)\(|custom-call.*callback", re.IGNORECASE)


def _pipeline_step_hlo(tmp_path, stage):
  config = digits.get_config()
  config.batch_size = 8
  config.quant.epochs_per_step = 1.0
  config.prune.update_every = 5  # a DNS mask refresh that is an event, not every step
  ctx = train_lib.make_context(config, str(tmp_path))
  variables = train_lib.initial_variables(ctx)
  params = variables["params"]
  masks = plans.initial_masks(ctx, params)
  plan = plans.plan_for(ctx, stage, masks if stage == "quantize" else None)
  if stage == "quantize":
    params = fq.apply_masks(params, masks)
  opt_state = jax.eval_shape(plan.tx.init, params)
  step = steps_lib.jit_train_step(
    input_pipeline.normalizing(
      steps_lib.make_train_step(ctx.model, plan.tx, plan.forward, learns_alphas=plan.learns_alphas)
    ),
    ctx.mesh,
  )
  state = steps_lib.TrainState(params, variables["batch_stats"], opt_state)
  batch = next(iter(ctx.source.train_epoch(0)))
  hlo = step.lower(state, batch).compile().as_text()
  return plan, hlo


@pytest.mark.parametrize("stage", ["prune", "quantize"])
def test_pipeline_steps_hold_no_control_flow(tmp_path, stage):
  plan, hlo = _pipeline_step_hlo(tmp_path, stage)
  assert plan.events.names  # the schedule has events: they are outside the step
  assert not _CONTROL_FLOW.search(hlo), _CONTROL_FLOW.search(hlo).group(0)


def test_the_hlo_check_sees_the_in_step_forms_conditionals():
  params = _params()
  tx = fq.dns_pruning(optax.sgd(0.1), sparsity=0.5, update_every=2)
  hlo = _step(tx).lower(params, tx.init(params)).compile().as_text()
  assert _CONTROL_FLOW.search(hlo)


def test_init_groups_layers_of_different_shapes_like_per_layer_focus():
  """init focuses layers of one size class together, zero-padded: each equals fq.focus alone."""
  keys = jax.random.split(jax.random.key(3), 2)
  params = {  # two shapes, one power-of-8 size class (512 <= size < 4096)
    "a": {"kernel": jax.random.normal(keys[0], (3, 3, 8, 12)) * 0.1},
    "b": {"kernel": jax.random.laplace(keys[1], (28, 25)) * 0.05 + 0.01},
  }
  params = fq.apply_masks(params, fq.magnitude_masks(params, 0.5))
  state = fq.focused_quantization(optax.sgd(0.1), seed=7).init(params)
  rng = jax.random.fold_in(jax.random.key(7), 0)
  focus = jax.jit(functools.partial(quantizers.focus, bits=5, w_sep=2.0))
  for i, name in enumerate(("a", "b")):
    w = params[name]["kernel"]
    got = state.focus[name]["kernel"]
    want = focus(w, w != 0, jax.random.fold_in(rng, i))
    assert got.assignment.shape == w.shape
    np.testing.assert_array_equal(np.asarray(got.mask), np.asarray(want.mask))
    for field in ("recentralized", "bits", "bias", "means"):
      np.testing.assert_array_equal(
        np.asarray(getattr(got, field)), np.asarray(getattr(want, field))
      )
    # Padded sums reduce in another order: EM stops (tol 1e-7) at a neighbouring iterate.
    np.testing.assert_allclose(float(got.sigma), float(want.sigma), rtol=1e-4)
    agree = np.mean(np.asarray(got.assignment) == np.asarray(want.assignment))
    assert agree > 0.995, agree
