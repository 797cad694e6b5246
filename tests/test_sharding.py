"""Data parallelism: a train step on 8 (fake CPU) devices matches the 1-device step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from fq_jax.pipeline import sharding

REPO = Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter: the fake device count must be set before JAX
# is imported. It trains a small CNN on digits for 3 steps under focused
# quantization (pruned layers, an INQ boundary after step 1 and a mixture
# refit after step 2, batch norm in train mode), once on a 1-device mesh and
# once on all 8 devices, and prints the largest differences.
SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import json
    import flax.linen as nn
    import jax, jax.numpy as jnp, numpy as np, optax
    import fq_jax as fq
    from fq_jax.data import epoch_batches, load_digits
    from fq_jax.pipeline import sharding, steps

    class Small(nn.Module):
      # A small CNN keeps the four compilations short; same step code as any model.
      @nn.compact
      def __call__(self, x, train=False):
        x = nn.Conv(16, (3, 3), use_bias=False, name="conv")(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn")(x)
        x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
        return nn.Dense(10, name="head")(x.reshape(x.shape[0], -1))

    assert jax.device_count() == 8
    model = Small()
    variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), train=False)
    params, stats = variables["params"], variables["batch_stats"]
    # The conv layer is pruned only, the classifier pruned and quantized: one
    # FQ layer keeps the compilation short, and both kinds of state are sharded.
    rules = (fq.Rule(pattern="conv/kernel$", quantize=False), *fq.DEFAULT_RULES)
    ds = load_digits()
    batches = list(epoch_batches(*ds.train, 64, epoch=0, seed=0))[:3]

    def run(mesh):
      inner = steps.sgd(lambda _: 0.05, momentum=0.9, weight_decay=5e-4)
      p = fq.apply_masks(params, fq.magnitude_masks(params, 0.7, rules=rules))
      tx = fq.focused_quantization(inner, bits=5, rules=rules,
                                   schedule=fq.inq_schedule(1, refit_every=2), seed=0)
      state = steps.TrainState(p, stats, tx.init(p))
      state = sharding.put_replicated(state, mesh, copy=True)
      step = steps.jit_train_step(steps.make_train_step(model, tx, fq.quantized), mesh)
      bs = sharding.batch_sharding(mesh)
      losses = []
      for b in batches:
        state, m = step(state, sharding.put_batch(b, bs))
        losses.append(float(m["loss"]))
      assert state.params["head"]["kernel"].sharding.is_fully_replicated
      return jax.device_get(state), losses

    try:
      sharding.check_batch_size(12, sharding.make_mesh())
      raise AssertionError("12 examples cannot split over 8 devices")
    except ValueError as e:
      assert "batch_size" in str(e)
    one, l1 = run(sharding.make_mesh(jax.devices()[:1]))
    eight, l8 = run(sharding.make_mesh())
    assert jax.tree.structure(one) == jax.tree.structure(eight)
    diffs = [float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
             if np.asarray(a).dtype != bool else float(np.sum(np.asarray(a) != np.asarray(b)))
             for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(eight))]
    out = {"max_diff": max(diffs), "loss_diff": max(abs(a - b) for a, b in zip(l1, l8)),
           "losses": l1, "quantized_fraction": fq.quantized_fraction(one.opt_state)}
    print("RESULT " + json.dumps(out))
""")


@pytest.mark.slow(40)
def test_eight_devices_match_one_device():
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  result = subprocess.run(
    [sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=300, env=env
  )
  assert result.returncode == 0, result.stderr[-3000:]
  line = next(l for l in result.stdout.splitlines() if l.startswith("RESULT "))
  out = json.loads(line[len("RESULT ") :])
  # Only the order of the cross-device sums differs: float32 rounding (the
  # masks, assignments and INQ sets, compared by count, are identical).
  assert out["max_diff"] < 1e-5, out
  assert out["loss_diff"] < 1e-5, out
  assert out["losses"][-1] < out["losses"][0]  # it trained
  assert abs(out["quantized_fraction"] - 0.875) < 1e-3  # three INQ boundaries passed


def test_mesh_and_batch_helpers():
  mesh = sharding.make_mesh()
  assert mesh.axis_names == ("data",) and mesh.devices.size == jax.device_count()
  batch = {"image": np.ones((8, 4), np.float32), "label": np.arange(8, dtype=np.int32)}
  placed = sharding.put_batch(batch, sharding.batch_sharding(mesh))
  assert placed["image"].shape == (8, 4)
  np.testing.assert_array_equal(np.asarray(placed["label"]), batch["label"])
  assert sharding.host_slice(8) == slice(0, 8)  # one host reads the whole global batch
  sharding.check_batch_size(8 * jax.device_count(), mesh)


def test_initialize_distributed_is_off_by_default(monkeypatch):
  monkeypatch.delenv(sharding.DISTRIBUTED_ENV, raising=False)
  assert sharding.initialize_distributed() is False
  assert sharding.initialize_distributed(False) is False
