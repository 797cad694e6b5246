"""Steady-state time of one ResNet-20 DNS prune step with and without distillation (by hand).

The train step of `fq_jax.pipeline.steps.make_train_step` under `fq.dns_pruning`
(70%), batch 128 of 32x32x3, random init (timing only): distillation adds one
eval-mode forward pass of the frozen teacher inside the same jitted step.

    PYTHONPATH=. python benchmarks/bench_distill_step.py [--steps 5] [--ramp]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import optax

import fq_jax as fq
from fq_jax import models
from fq_jax._src import sparsity_ramp
from fq_jax.pipeline import losses
from fq_jax.pipeline import steps as steps_lib


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--batch", type=int, default=128)
  ap.add_argument("--ramp", action="store_true", help="also time the cubic sparsity ramp")
  args = ap.parse_args()
  model = models.build("cifar_resnet", depth=20, num_classes=10)
  x = jnp.asarray(jax.random.normal(jax.random.key(0), (args.batch, 32, 32, 3)))
  batch = {"image": x, "label": jnp.arange(args.batch) % 10}
  v = jax.jit(lambda: model.init(jax.random.key(1), x[:1], train=False))()
  variants = {
    "plain": (None, None),
    "distill w=0.5 T=4": (losses.Distillation(weight=0.5, temperature=4.0), None),
  }
  if args.ramp:
    variants["ramp 50 steps"] = (None, sparsity_ramp.cubic(50))
  for name, (distill, ramp) in variants.items():
    tx = fq.dns_pruning(optax.sgd(0.01, momentum=0.9), sparsity=0.7, sparsity_schedule=ramp)
    step = jax.jit(steps_lib.make_train_step(model, tx, fq.quantized, distill=distill))
    state = steps_lib.TrainState(v["params"], v["batch_stats"], tx.init(v["params"]), v)
    t0 = time.perf_counter()
    state, m = step(state, batch)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.steps):
      state, m = step(state, batch)
    jax.block_until_ready(m)
    ms = 1000 * (time.perf_counter() - t0) / args.steps
    print(f"{name}: {ms:.0f} ms/step (first step with compilation {compile_s:.1f} s)", flush=True)


if __name__ == "__main__":
  main()
