"""Compile time of fq-jax's optax transformations, against a plain train step.

Run by hand (CPU):
  python benchmarks/bench_compile.py --models digits_cnn,cifar_resnet20 --json out.json
  python benchmarks/bench_compile.py --trees /tmp/nnx_base,. --models cifar_resnet20

For each model it measures, in a fresh process per tree (no warm caches):
  * init: `focused_quantization(inner, bits=5).init(params)` called eagerly,
    wall time of the first call (compilation dominates; 70%-pruned params);
  * events (event form only): the first refit + INQ growth after init, called
    eagerly as the runner does (its compiled pieces are shared with init);
  * plain / fq / dns: lower + compile time of one jitted train step (forward,
    backward, optimizer update) with a plain SGD optimizer, with
    `focused_quantization` (INQ schedule and re-estimation on, as in the
    paper's fine-tuning: in a tree with the event form, the event-form step
    train.py runs, alpha gradient from the forward pass; in an older tree the
    in-step form) and with `dns_pruning(update_every=1)`.
With --trees A,B each model is measured under tree A, then tree B (then the
next model), so that load on a shared machine hits both alike; the load
average is printed with the results. Wall seconds and process CPU seconds
are both reported: on a machine shared with other jobs the CPU seconds are
the steadier measure of compilation work.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

MODELS = {
  # name: (registry name, kwargs, input shape without batch, classes)
  "digits_cnn": ("digits_cnn", {}, (8, 8, 1), 10),
  "cifar_resnet20": ("cifar_resnet", {"depth": 20}, (32, 32, 3), 10),
  "resnet50": ("resnet50", {"num_classes": 10}, (32, 32, 3), 10),
}


def measure(name: str, batch: int) -> dict:
  """Compile times (seconds) for one model under the fq_jax on sys.path."""
  import jax
  import optax

  import fq_jax as fq
  from fq_jax import models

  registry, kwargs, shape, classes = MODELS[name]
  model = models.get_model(registry, **kwargs)
  x = jax.random.normal(jax.random.key(1), (batch, *shape))
  y = jax.random.randint(jax.random.key(2), (batch,), 0, classes)
  variables = model.init(jax.random.key(0), x[:1], train=False)
  params = fq.apply_masks(variables["params"], fq.magnitude_masks(variables["params"], 0.7))
  stats = variables.get("batch_stats", {})
  inner = optax.sgd(1e-3, momentum=0.9)
  schedule = fq.inq_schedule(100)
  # The event form (what train.py runs) where the tree has it; older trees: the in-step form.
  event_form = hasattr(fq, "focused_quantization_with_events")
  events = None
  if event_form:
    fq_tx, events = fq.focused_quantization_with_events(inner, bits=5, schedule=schedule)
  else:
    fq_tx = fq.focused_quantization(inner, bits=5, schedule=schedule)
  txs = {"plain": inner, "fq": fq_tx, "dns": fq.dns_pruning(inner, sparsity=0.7, update_every=1)}
  out = {
    "model": name,
    "fq_jax": os.path.dirname(os.path.dirname(fq.__file__)),
    "form": "event" if event_form else "in-step",
  }

  t, c = time.perf_counter(), time.process_time()
  fq_state = txs["fq"].init(params)
  jax.block_until_ready(fq_state)
  out["init"] = time.perf_counter() - t
  out["init_cpu"] = time.process_time() - c
  if event_form:  # the first refit and INQ growth after init, as the runner calls them
    t, c = time.perf_counter(), time.process_time()
    jax.block_until_ready(events.run(params, fq_state, ("refit", "inq")))
    out["events"] = time.perf_counter() - t
    out["events_cpu"] = time.process_time() - c

  for kind, tx in txs.items():
    use_fq = kind != "plain"

    def step(params, stats, opt_state, x, y, tx=tx, use_fq=use_fq):
      def loss_fn(p):
        p = fq.quantized(p, opt_state) if use_fq else p
        logits, new = model.apply(
          {"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
        )
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new

      if use_fq and event_form and kind == "fq":  # the alpha gradient from the forward pass
        alphas = fq.alphas(opt_state)

        def loss_alphas(p, a):
          q = fq.quantized(p, opt_state, alphas=a)
          logits, new = model.apply(
            {"params": q, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
          )
          return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new

        (_, new), (grads, alpha_grads) = jax.value_and_grad(
          loss_alphas, argnums=(0, 1), has_aux=True
        )(params, alphas)
        updates, opt_state = tx.update(grads, opt_state, params, alpha_grads=alpha_grads)
        return optax.apply_updates(params, updates), new["batch_stats"], opt_state
      (_, new), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), new["batch_stats"], opt_state

    opt_state = jax.eval_shape(tx.init, params)
    t, c = time.perf_counter(), time.process_time()
    lowered = jax.jit(step).lower(params, stats, opt_state, x, y)
    lowered.compile()
    out[kind] = time.perf_counter() - t
    out[f"{kind}_cpu"] = time.process_time() - c
  for k in ("fq", "dns"):
    out[f"{k}/plain"] = out[k] / out["plain"]
    out[f"{k}/plain_cpu"] = out[f"{k}_cpu"] / out["plain_cpu"]
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--models", default="digits_cnn,cifar_resnet20,resnet50")
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--trees", default="", help="comma-separated checkouts to compare")
  ap.add_argument("--json", default="", help="write the results here")
  ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = ap.parse_args()
  names = [n for n in args.models.split(",") if n]
  for n in names:
    if n not in MODELS:
      ap.error(f"unknown model {n!r}; choose from {', '.join(MODELS)}")

  if args.child:
    print(json.dumps([measure(n, args.batch) for n in names]))
    return

  trees = [os.path.abspath(t) for t in args.trees.split(",") if t] or [None]
  results = []
  load_before = os.getloadavg()
  for n in names:
    for tree in trees:
      env = dict(os.environ)
      if tree is not None:
        env["PYTHONPATH"] = tree
      cmd = [sys.executable, __file__, "--child", "--models", n, "--batch", str(args.batch)]
      proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
      if proc.returncode != 0:
        sys.exit(f"{n} under {tree}: failed\n{proc.stderr[-3000:]}")
      row = json.loads(proc.stdout.strip().splitlines()[-1])[0]
      row["load"] = os.getloadavg()[0]
      results.append(row)
      print(
        f"{row['model']:<15} {row['fq_jax']:<22} {row.get('form', 'in-step'):<8} "
        f"events {row.get('events', float('nan')):5.1f} wall: init {row['init']:6.1f} plain "
        f"{row['plain']:5.1f} fq {row['fq']:5.1f} ({row['fq/plain']:.2f}x) dns "
        f"{row['dns']:5.1f} ({row['dns/plain']:.2f}x) | cpu: init {row['init_cpu']:6.1f} plain "
        f"{row['plain_cpu']:5.1f} fq {row['fq_cpu']:5.1f} ({row['fq/plain_cpu']:.2f}x) dns "
        f"{row['dns_cpu']:5.1f} ({row['dns/plain_cpu']:.2f}x) | load {row['load']:.1f}",
        flush=True,
      )
  import jax

  meta = {
    "date": datetime.datetime.now().isoformat(timespec="minutes"),
    "device": jax.devices()[0].device_kind,
    "cpus": os.cpu_count(),
    "jax": jax.__version__,
    "loadavg_before": load_before,
    "loadavg_after": os.getloadavg(),
    "batch": args.batch,
  }
  print(json.dumps(meta))
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"meta": meta, "results": results}, f, indent=1)


if __name__ == "__main__":
  main()
