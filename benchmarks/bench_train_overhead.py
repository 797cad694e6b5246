"""Training-step cost of DNS pruning and Focused Quantization: the pipeline's own steps.

Run by hand:
  python benchmarks/bench_train_overhead.py --model cifar_resnet --depth 20 --batch 128 \
      --json out.json                                                      # CPU
  python benchmarks/bench_train_overhead.py --model resnet50 --batch 256 --json gpu.json  # GPU

The steps timed are exactly those `train.py` compiles, built by the pipeline's
own code from the model's config (`configs/cifar10_resnet.py`,
`configs/imagenet_<model>.py`): `plans.dense_plan` / `prune_plan` /
`quant_plan` (with the config's schedule: DNS mask refresh, INQ steps,
mixture refits), `steps.make_train_step` (forward through `fq.quantized`, the
alpha gradient from the forward pass), `input_pipeline.normalizing` (uint8
batch normalised in the step) and `steps.jit_train_step` (replicated state
donated, batch sharded over every device). The schedule events (DNS mask
refresh when `prune.update_every` > 1, mixture refit, INQ growth) run
between steps as the runner runs them (`events.run`, eagerly, its pieces
jitted and shared with `init`); each is timed on its own, first call (any
compilation not already done by `init`) and second call.

The stages are timed alternately (plain, dns, fq, plain, ...), so that load on
a shared machine hits them alike; ratios are of medians. `--batch` is the
global batch (split over the devices). The data are random uint8 images (the
timing does not depend on them), so no dataset is read.

With `--json PATH` it writes {"plain": {"step_ms", "images_per_s", ...},
"dns": {..., "ratio", "hlo_conditionals", "hlo_whiles", "hlo_fusions",
"events_ms"}, "fq": {...}, "device": ..., ...}.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import json
import os
import re
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fq_jax as fq  # noqa: E402
from fq_jax import models as models_lib  # noqa: E402
from fq_jax.pipeline import configuration as cfg  # noqa: E402
from fq_jax.pipeline import context as context_lib  # noqa: E402
from fq_jax.pipeline import input_pipeline, plans  # noqa: E402
from fq_jax.pipeline import sharding as sharding_lib  # noqa: E402
from fq_jax.pipeline import steps as steps_lib  # noqa: E402

CONFIGS = {
  "cifar_resnet": ("configs.cifar10_resnet", (32, 32, 3), 10),
  "resnet18": ("configs.imagenet_resnet18", (224, 224, 3), 1000),
  "resnet50": ("configs.imagenet_resnet50", (224, 224, 3), 1000),
  "mobilenet_v1": ("configs.imagenet_mobilenet_v1", (224, 224, 3), 1000),
  "mobilenet_v2": ("configs.imagenet_mobilenet_v2", (224, 224, 3), 1000),
}


@dataclasses.dataclass
class _ShapeOnlySource:
  """What the plans read of a data source: no data is loaded."""

  image_shape: tuple[int, ...]
  num_classes: int
  steps_per_epoch: int


def _context(args) -> context_lib.Context:
  module, shape, classes = CONFIGS[args.model]
  config = importlib.import_module(module).get_config()
  config.batch_size = args.batch
  config.init_from = ""
  if args.depth and args.model == "cifar_resnet":
    config.model.depth = args.depth
  if args.image:
    shape = (args.image, args.image, 3)
  if args.dtype:
    config.model.dtype = args.dtype
  source = _ShapeOnlySource(shape, classes, args.steps_per_epoch)
  name = config.model.name
  kwargs = dict(num_classes=classes, dtype=jnp.dtype(config.model.dtype))
  if name == "cifar_resnet":
    kwargs["depth"] = config.model.depth or 20
  model = models_lib.get_model(name, **kwargs)
  ctx = context_lib.Context(
    config=config,
    workdir=tempfile.mkdtemp(),
    model=model,
    model_name=name,
    source=source,
    mesh=sharding_lib.make_mesh(),
    rules=(),
    init_variables=None,
    log=print,
    is_main=True,
  )
  ctx.rules = cfg.compression_rules(config, context_lib.abstract_variables(ctx)["params"])
  return ctx


def _count(hlo: str, op: str) -> int:
  """Instructions of kind `op` in compiled HLO text (`... = shape op(operands), ...`)."""
  return len(re.findall(rf"\b{op}\(", hlo))


def _learns_alphas(plan) -> dict:
  # Trees from before the event form (for before/after runs) have no such field.
  return {"learns_alphas": plan.learns_alphas} if hasattr(plan, "learns_alphas") else {}


def _events_of(plan) -> tuple[str, ...]:
  return plan.events.names if hasattr(plan, "events") else ()


def _stages(ctx):
  """{stage: (jitted step, state, plan)} built as the runner builds them."""
  # Replicated on the mesh, as the runner's carry is when a stage starts (init's compiled
  # pieces are then shared with the events, which see replicated arrays too).
  variables = sharding_lib.put_replicated(context_lib.initial_variables(ctx), ctx.mesh)
  params = variables["params"]
  masks = plans.initial_masks(ctx, params)
  out = {}
  for kind in ("plain", "dns", "fq"):
    if kind == "plain":
      plan, p = plans.dense_plan(ctx), params
      opt_state = plan.tx.init(p)
    elif kind == "dns":
      plan, p = plans.prune_plan(ctx), params
      opt_state = plan.tx.init(p)._replace(masks=masks)  # as Runner._start_prune
    else:
      p = sharding_lib.put_replicated(fq.apply_masks(params, masks), ctx.mesh)
      plan = plans.quant_plan(ctx, masks)
      opt_state = plan.tx.init(p)  # eagerly, as Runner.stage_quantize
    step = steps_lib.jit_train_step(
      input_pipeline.normalizing(
        steps_lib.make_train_step(ctx.model, plan.tx, plan.forward, **_learns_alphas(plan))
      ),
      ctx.mesh,
    )
    state = steps_lib.TrainState(p, variables["batch_stats"], opt_state)
    state = sharding_lib.put_replicated(state, ctx.mesh, copy=True)
    out[kind] = [step, state, plan]
  return out


def _time_events(plan, state):
  """Wall ms of each schedule event of `plan`, called as the runner calls it (eagerly)."""
  times = {}
  for name in _events_of(plan):
    out = {}
    for label in ("first_call_s", "s"):
      t = time.perf_counter()
      jax.block_until_ready(plan.events.run(state.params, state.opt_state, (name,)))
      out[label] = time.perf_counter() - t
    times[name] = {"ms": 1e3 * out["s"], "first_call_s": out["first_call_s"]}
  return times


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--model", default="cifar_resnet", choices=sorted(CONFIGS))
  ap.add_argument("--depth", type=int, default=20, help="cifar_resnet depth")
  ap.add_argument("--batch", type=int, default=128, help="global batch")
  ap.add_argument("--image", type=int, default=0, help="input size (default: the config's)")
  ap.add_argument("--dtype", default="", help="model.dtype override (float32, bfloat16)")
  ap.add_argument("--rounds", type=int, default=20)
  ap.add_argument("--steps-per-epoch", type=int, default=390, help="sets the schedule's length")
  ap.add_argument("--json", default="")
  args = ap.parse_args()

  ctx = _context(args)
  shape = ctx.source.image_shape
  rng = np.random.default_rng(0)
  batch = {
    "image": rng.integers(0, 256, (args.batch, *shape), dtype=np.uint8),
    "label": rng.integers(0, ctx.source.num_classes, (args.batch,), dtype=np.int32),
  }
  batch = jax.device_put(batch, sharding_lib.batch_sharding(ctx.mesh))
  runs = _stages(ctx)
  result: dict = {}
  for kind, (step, state, plan) in runs.items():
    t = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    hlo = compiled.as_text()
    result[kind] = {
      "compile_s": time.perf_counter() - t,
      "hlo_conditionals": _count(hlo, "conditional"),
      "hlo_whiles": _count(hlo, "while"),
      "hlo_fusions": _count(hlo, "fusion"),
      "events": list(_events_of(plan)),
    }
    state, _ = step(state, batch)  # first call (compiles through jit's own cache)
    jax.block_until_ready(state)
    runs[kind][1] = state
  times = {k: [] for k in runs}
  for _ in range(args.rounds):
    for kind, run in runs.items():
      step, state, _ = run
      t = time.perf_counter()
      state, metrics = step(state, batch)
      jax.block_until_ready((state, metrics))
      times[kind].append(time.perf_counter() - t)
      run[1] = state
  for kind, (_, state, plan) in runs.items():
    med = statistics.median(times[kind])
    result[kind].update(step_ms=1e3 * med, images_per_s=args.batch / med)
    result[kind]["events_ms"] = _time_events(plan, state)
  for kind in ("dns", "fq"):
    result[kind]["ratio"] = result[kind]["step_ms"] / result["plain"]["step_ms"]
  dev = jax.devices()[0]
  result.update(
    device=f"{dev.platform} ({dev.device_kind}) x{jax.device_count()}",
    model=args.model + (str(args.depth) if args.model == "cifar_resnet" else ""),
    batch=args.batch,
    image=shape[0],
    dtype=ctx.config.model.dtype,
    rounds=args.rounds,
    date=datetime.datetime.now().isoformat(timespec="minutes"),
    jax=jax.__version__,
    loadavg=os.getloadavg(),
    command=" ".join(sys.argv),
  )
  print(f"{result['date']}, {result['device']}, jax {jax.__version__}, load {os.getloadavg()}")
  print("| stage | step ms (median) | images/s | ratio | conditionals | whiles | fusions |")
  print("|---|---|---|---|---|---|---|")
  for kind in ("plain", "dns", "fq"):
    r = result[kind]
    print(
      f"| {kind} | {r['step_ms']:.1f} | {r['images_per_s']:.0f} | {r.get('ratio', 1.0):.3f} | "
      f"{r['hlo_conditionals']} | {r['hlo_whiles']} | {r['hlo_fusions']} |"
    )
    for name, ev in r["events_ms"].items():
      print(f"|   event {name} | {ev['ms']:.1f} (first call {ev['first_call_s']:.1f} s) |")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
