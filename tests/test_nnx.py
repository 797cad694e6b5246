"""An NNX model is compressed through the same pure functions as a linen one.

Two bridges: the parameter state as a plain dict (`nnx.to_pure_dict`, each
step rebuilding the module with `nnx.merge`), and `nnx.Optimizer` holding an
fq transformation directly, with `nnx.State` paths ('conv/kernel/value' in
JAX's key path) normalised to the linen ones ('conv/kernel').
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen, nnx

import fq_jax as fq
from fq_jax.data import epoch_batches, load_digits
from fq_jax.pipeline import steps as steps_lib


class DigitsNNX(nnx.Module):
  """conv3x3(16)-BN-ReLU, global average pool, linear(10)."""

  def __init__(self, rngs: nnx.Rngs):
    self.conv = nnx.Conv(1, 16, (3, 3), use_bias=False, rngs=rngs)
    self.bn = nnx.BatchNorm(16, momentum=0.5, rngs=rngs)
    self.fc = nnx.Linear(16 * 4 * 4, 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn(self.conv(x)))
    x = nnx.max_pool(x, (2, 2), strides=(2, 2))
    return self.fc(x.reshape(x.shape[0], -1))


def _with_values(template: nnx.State, pure: dict) -> nnx.State:
  """A copy of `template` holding the arrays of the plain dict `pure`."""
  state = jax.tree.map(lambda x: x, template)
  nnx.replace_by_pure_dict(state, pure)
  return state


def test_nnx_model_through_masks_and_focused_quantization():
  graphdef, param_state, stat_state = nnx.split(DigitsNNX(nnx.Rngs(0)), nnx.Param, nnx.BatchStat)
  params = nnx.to_pure_dict(param_state)
  stats = nnx.to_pure_dict(stat_state)
  assert set(jax.tree.leaves(fq.leaf_paths(params))) == {
    "bn/bias",
    "bn/scale",
    "conv/kernel",
    "fc/bias",
    "fc/kernel",
  }

  masks = fq.magnitude_masks(params, 0.7)
  assert masks["conv"]["kernel"] is not None and masks["fc"]["bias"] is None
  params = fq.apply_masks(params, masks)
  tx = fq.focused_quantization(
    optax.sgd(0.05, momentum=0.9), bits=5, schedule=fq.inq_schedule(4, refit_every=4), seed=0
  )
  opt_state = tx.init(params)

  @jax.jit
  def train_step(params, stats, opt_state, x, y):
    def loss_fn(p):
      model = nnx.merge(
        graphdef,
        _with_values(param_state, fq.quantized(p, opt_state)),
        _with_values(stat_state, stats),
      )
      model.train()
      logits = model(x)
      new_stats = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
      return steps_lib.cross_entropy(logits, y), new_stats

    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_stats, opt_state, loss

  ds = load_digits()
  losses = []
  for batch in list(epoch_batches(*ds.train, 64, epoch=0, seed=0)):
    params, stats, opt_state, loss = train_step(
      params, stats, opt_state, batch["image"], batch["label"]
    )
    losses.append(float(loss))
  assert losses[-1] < losses[0]
  assert fq.quantized_fraction(opt_state) == 1.0  # all four INQ boundaries passed

  # Pruned weights stayed zero, batch statistics moved, and the forward
  # parameters of the conv layer take few distinct values.
  kernel = np.asarray(params["conv"]["kernel"])
  np.testing.assert_array_equal(kernel[~np.asarray(masks["conv"]["kernel"])], 0.0)
  assert not np.allclose(np.asarray(stats["bn"]["mean"]), 0.0)
  q = fq.quantized(params, opt_state)
  kept = np.asarray(q["conv"]["kernel"])[np.asarray(masks["conv"]["kernel"])]
  assert len(np.unique(kept)) <= 2 * (2**3 + 1)
  rows = fq.layer_report(params, opt_state)
  assert [r["path"] for r in rows] == ["conv/kernel", "fc/kernel"]

  # The quantized dict goes back into an NNX module for inference.
  model = nnx.merge(graphdef, _with_values(param_state, q), _with_values(stat_state, stats))
  model.eval()
  x, y = ds.test
  accuracy = float(jnp.mean(jnp.argmax(model(x), -1) == y))
  assert accuracy > 0.5  # one epoch: far from trained, far better than chance


class DigitsLinen(linen.Module):
  """The linen twin of `DigitsNNX`: same layers, names and shapes."""

  @linen.compact
  def __call__(self, x, train: bool):
    x = linen.Conv(16, (3, 3), use_bias=False, name="conv")(x)
    x = linen.BatchNorm(use_running_average=not train, momentum=0.5, name="bn")(x)
    x = linen.max_pool(linen.relu(x), (2, 2), strides=(2, 2))
    return linen.Dense(10, name="fc")(x.reshape(x.shape[0], -1))


def _nnx_train(model, tx, batches):
  """The documented pattern: an `nnx.Optimizer` holding an fq transformation."""
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def step(model, opt, x, y):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(params):
      # Fresh copies of the other Variables: NNX refuses to mutate (BatchStats)
      # a Variable created outside this grad trace.
      others = jax.tree.map(lambda a: a, rest)
      forward = nnx.merge(graphdef, fq.quantized(params, opt), others)
      return steps_lib.cross_entropy(forward(x), y), nnx.state(forward, nnx.BatchStat)

    (_, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    nnx.update(model, stats)
    opt.update(model, grads)

  model.train()
  for x, y in batches:
    step(model, opt, x, y)
  return opt


def _linen_train(params, stats, tx, batches):
  state = tx.init(params)

  @jax.jit
  def step(params, stats, state, x, y):
    def loss_fn(p):
      variables = {"params": fq.quantized(p, state), "batch_stats": stats}
      logits, new = DigitsLinen().apply(variables, x, train=True, mutable=["batch_stats"])
      return steps_lib.cross_entropy(logits, y), new["batch_stats"]

    (_, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), stats, state

  for x, y in batches:
    params, stats, state = step(params, stats, state, x, y)
  return params, stats, state


def _flat(tree, **kwargs):
  return {fq.path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree, **kwargs)}


def _encode(params, stats, state):
  is_focus = lambda x: isinstance(x, fq.FocusState)
  arrays = {f"params/{k}": np.asarray(v) for k, v in _flat(params).items()}
  arrays |= {f"batch_stats/{k}": np.asarray(v) for k, v in _flat(stats).items()}
  focus = _flat(fq.find_state(state).focus, is_leaf=is_focus)
  return fq.encode_model(arrays, focus={f"params/{k}": f for k, f in focus.items()})


def test_nnx_model_trains_prunes_quantizes_and_encodes_like_its_linen_twin():
  ds = load_digits()
  batches = [
    (b["image"], b["label"]) for b in list(epoch_batches(*ds.train, 32, epoch=0, seed=0))[:9]
  ]
  model = DigitsNNX(nnx.Rngs(0))
  # The NNX parameter state has the linen paths: the default rules select the kernels.
  assert sorted(_flat(nnx.state(model, nnx.Param))) == sorted(
    _flat(DigitsLinen().init(jax.random.key(0), batches[0][0], train=False)["params"])
  )
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  stats = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))

  # 1. DNS pruning.
  dns = fq.dns_pruning(optax.sgd(0.05, momentum=0.9), sparsity=0.6)
  opt = _nnx_train(model, dns, batches[:4])
  params, stats, dns_state = _linen_train(params, stats, dns, batches[:4])
  nnx_masks = _flat(fq.find_state(opt).masks)
  assert sorted(nnx_masks) == ["conv/kernel", "fc/kernel"]
  for k, m in _flat(dns_state.masks).items():
    np.testing.assert_array_equal(nnx_masks[k], m)
  # Freeze the masks: fq.quantized of a PruneState is the masked tree, in NNX containers.
  nnx.update(model, fq.quantized(nnx.state(model, nnx.Param), opt))
  params = fq.apply_masks(params, dns_state.masks)

  # 2. Focused quantization through the whole INQ schedule.
  tx = fq.focused_quantization(
    optax.sgd(0.05, momentum=0.9), bits=4, schedule=fq.inq_schedule(1), seed=3
  )
  opt = _nnx_train(model, tx, batches[4:])
  params, stats, fq_state = _linen_train(params, stats, tx, batches[4:])
  assert fq.quantized_fraction(opt) == fq.quantized_fraction(fq_state) == 1.0
  nnx_params = _flat(nnx.state(model, nnx.Param))
  for k, v in _flat(params).items():
    np.testing.assert_allclose(nnx_params[k], v, rtol=1e-6, atol=1e-7, err_msg=k)
  nnx_q = _flat(fq.quantized(nnx.state(model, nnx.Param), opt))
  for k, v in _flat(fq.quantized(params, fq_state)).items():
    np.testing.assert_allclose(nnx_q[k], v, rtol=1e-6, atol=1e-7, err_msg=k)
  assert [r["path"] for r in fq.layer_report(nnx.state(model, nnx.Param), opt)] == [
    "conv/kernel",
    "fc/kernel",
  ]

  # 3. The encoded files agree, and decode to the forward-pass weights.
  nnx_bytes = _encode(nnx.state(model, nnx.Param), nnx.state(model, nnx.BatchStat), opt)
  linen_bytes = _encode(params, stats, fq_state)
  decoded = fq.decode_model(nnx_bytes)
  linen_decoded = fq.decode_model(linen_bytes)
  for k in ("conv/kernel", "fc/kernel"):
    np.testing.assert_array_equal(decoded.arrays[f"params/{k}"], nnx_q[k])
    np.testing.assert_allclose(
      decoded.arrays[f"params/{k}"], linen_decoded.arrays[f"params/{k}"], rtol=1e-6
    )
