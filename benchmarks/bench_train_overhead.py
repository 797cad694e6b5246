"""Training-step overhead of Focused Quantization, measured side by side.

Run by hand:
  python benchmarks/bench_train_overhead.py --model cifar_resnet --depth 20 --batch 128
  python benchmarks/bench_train_overhead.py --model resnet50 --batch 64 --image 224   # GPU

The same model, batch and inner optimizer (SGD, momentum 0.9, weight decay)
are timed in two jitted train steps: a plain one, and one whose forward pass
uses fq.quantized(params, opt_state) (70% pruned, 5-bit FQ, every weight
quantized) and whose optimizer is fq.focused_quantization. The two steps are
timed alternately (ABAB...) so that load on a shared machine hits both alike;
the ratio of medians is reported.
"""

import argparse
import datetime
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import optax

import fq_jax as fq
from fq_jax import models


def make_step(model, tx, use_fq):
  def loss_fn(params, batch_stats, opt_state, x, y):
    p = fq.quantized(params, opt_state) if use_fq else params
    logits, new_vars = model.apply(
      {"params": p, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
    )
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, new_vars["batch_stats"]

  # Donating the state lets XLA alias the unchanged parts of the FQ state
  # (masks, assignments, ...) instead of copying them every step.
  @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
  def step(params, batch_stats, opt_state, x, y):
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      params, batch_stats, opt_state, x, y
    )
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss

  return step


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--model", default="cifar_resnet")
  ap.add_argument("--depth", type=int, default=20)
  ap.add_argument("--batch", type=int, default=128)
  ap.add_argument("--image", type=int, default=32)
  ap.add_argument("--classes", type=int, default=10)
  ap.add_argument("--rounds", type=int, default=20)
  args = ap.parse_args()

  kw = {"depth": args.depth} if args.model == "cifar_resnet" else {"num_classes": args.classes}
  model = models.get_model(args.model, **kw)
  x = jax.random.normal(jax.random.key(1), (args.batch, args.image, args.image, 3))
  y = jax.random.randint(jax.random.key(2), (args.batch,), 0, args.classes)
  variables = model.init(jax.random.key(0), x[:1], train=False)
  params = fq.apply_masks(variables["params"], fq.magnitude_masks(variables["params"], 0.7))
  stats = variables["batch_stats"]
  inner = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(1e-3, momentum=0.9))
  plain_tx, fq_tx = inner, fq.focused_quantization(inner, bits=5)
  runs = {}
  for name, tx, use_fq in (("plain", plain_tx, False), ("fq", fq_tx, True)):
    step = make_step(model, tx, use_fq)
    carry = jax.tree.map(jnp.copy, (params, stats, tx.init(params)))
    carry = step(*carry, x, y)[:3]  # compile
    jax.block_until_ready(carry)
    runs[name] = [step, carry]
  times = {"plain": [], "fq": []}
  for _ in range(args.rounds):
    for name in ("plain", "fq"):
      step, carry = runs[name]
      t = time.perf_counter()
      out = step(*carry, x, y)
      jax.block_until_ready(out)
      times[name].append(time.perf_counter() - t)
      runs[name][1] = out[:3]
  med = {k: statistics.median(v) for k, v in times.items()}
  dev = jax.devices()[0]
  print(
    f"date {datetime.date.today()}, device {dev.platform} ({dev.device_kind}), jax {jax.__version__}"
  )
  print("| model | batch | plain step (ms, median) | FQ step (ms, median) | ratio |")
  print("|---|---|---|---|---|")
  label = f"{args.model}{args.depth if args.model == 'cifar_resnet' else ''} {args.image}px"
  print(
    f"| {label} | {args.batch} | {1e3 * med['plain']:.1f} | {1e3 * med['fq']:.1f} | "
    f"{med['fq'] / med['plain']:.3f} |"
  )


if __name__ == "__main__":
  main()
