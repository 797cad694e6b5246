"""An NNX model is compressed through the same pure functions as a linen one.

The bridge is the parameter state as a plain dict: `nnx.split` gives the
graph definition and `nnx.State`s, `nnx.to_pure_dict` turns the parameters
into {'conv': {'kernel': ...}, ...} (paths that `fq.DEFAULT_RULES` match), and
each step rebuilds the module with `nnx.merge` from the forward-pass dict.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

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
