"""The paper's Table 3 experiment on the shipped CIFAR-10 ResNet-20: integer inference.

Run by hand (not part of the tests):

    python benchmarks/bench_integer.py [--sparsity 0.0] [--bits 5] [--limit N] \
        [--out benchmarks/results/integer_resnet20.json] [--fqz /tmp/resnet20-int.fqz]

POST-TRAINING (no fine-tuning), on ../shared/models/resnet20-cifar10.npz and the
JPEG CIFAR-10 of ../shared/data:

  1. the float model as imported, and with its batch-norm statistics
     re-estimated on training images (the fair float reference: the
     compressed rows re-estimate them too);
  2. "5-bit FQ": every conv and dense kernel magnitude-pruned to --sparsity and
     focused-quantized (`fq.focus`, w_sep 2.0), batch-norm statistics
     re-estimated on --bn-images training images with the quantized weights;
  3. "+ 8-bit activations": power-of-two input scales of every layer calibrated
     on --calib-images training images (`fq.calibrate_activations`), activations
     simulated (`fq.apply_quantized`);
  4. "+ 16-bit batch norm": the integer batch norm (sigma and alpha folded in)
     simulated;
  5. the .fqz file is written (architecture, dataset, scales and bn_bits in its
     metadata) and evaluated from the file alone: float path and the integer
     path (`fq.evaluate_fqz`, what `fq-jax evaluate --integer` runs), plus the
     per-image operation counts (`fq.count_integer_ops`).

Prints a markdown table and writes JSON (--out).

With --from-fqz FILE (e.g. the model.fqz of a train.py run with
--config.quant.activation_bits=8 --config.quant.bn_bits=16, fine-tuned), the
same rows are measured on that file's weights instead: weights only (float
activations and batch norm), + activations, + integer batch norm, and the
integer path.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

import jax
import numpy as np

import fq_jax as fq
from fq_jax import data, models
from fq_jax import integer as integer_lib
from fq_jax.codec.posttrain import focus_layer

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def _flat(tree):
  return {fq.path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _tree(flat):
  out = {}
  for name, x in flat.items():
    node = out
    parts = name.split("/")
    for q in parts[:-1]:
      node = node.setdefault(q, {})
    node[parts[-1]] = x
  return out


def accuracy(fn, x, y, batch=1000):
  correct = 0
  for i in range(0, len(x), batch):
    correct += int(np.sum(np.argmax(np.asarray(fn(x[i : i + batch])), -1) == y[i : i + batch]))
  return correct / len(x)


def reestimate_batch_norm(model, variables, images, batch=250):
  """Population batch-norm statistics of `variables` on `images` (train-mode batch statistics).

  Flax's train-mode update is new = m old + (1 - m) batch (m = 0.9 here), so the
  batch statistics are recovered from it; means and E[x^2] are averaged over
  the batches.
  """
  momentum = 0.9

  @jax.jit
  def batch_stats(v, x):
    _, upd = model.apply(v, x, train=True, mutable=["batch_stats"])
    return jax.tree.map(
      lambda new, old: (new - momentum * old) / (1 - momentum), upd["batch_stats"], v["batch_stats"]
    )

  sums, n = None, 0
  for i in range(0, len(images) - batch + 1, batch):
    b = jax.device_get(batch_stats(variables, images[i : i + batch]))
    moments = {
      k: {"mean": s["mean"], "sq": s["var"] + s["mean"] ** 2} for k, s in _by_layer(b).items()
    }
    sums = moments if sums is None else jax.tree.map(np.add, sums, moments)
    n += 1
  stats = {
    k: {"mean": m["mean"] / n, "var": np.maximum(m["sq"] / n - (m["mean"] / n) ** 2, 0.0)}
    for k, m in sums.items()
  }
  flat = {f"{k}/{f}": v.astype(np.float32) for k, s in stats.items() for f, v in s.items()}
  return {**variables, "batch_stats": _tree(flat)}


def _by_layer(stats):
  flat = _flat(stats)
  out = {}
  for k, v in flat.items():
    layer, field = k.rsplit("/", 1)
    out.setdefault(layer, {})[field] = np.asarray(v, np.float64)
  return out


def from_fqz(path, limit, out):
  """Table 3's rows from a file written by train.py (see the module docstring)."""
  decoded = fq.load_fqz(path)
  spec = integer_lib.model_spec(decoded)
  if not spec.activation_bits:
    sys.exit(f"{path} records no activation scales")
  model = integer_lib.build_float_model(spec)
  tree = decoded.tree()
  variables = {k: tree[k] for k in ("params", "batch_stats")}
  parts = {
    k: integer_lib.weight_parts_from_symbols(decoded.symbols[k], st)
    for k, st in decoded.focus.items()
  }
  ds = data.DATASETS[spec.dataset].load(None)
  x, y = ds.test
  if limit:
    x, y = x[:limit], y[:limit]
  rows = []
  for name, act, bn in (
    (f"{decoded.metadata.get('bits', '?')}-bit FQ weights (float activations, float BN)", 0, 0),
    (f"+ {spec.activation_bits}-bit activations (simulated)", spec.activation_bits, 0),
    (
      f"+ {spec.bn_bits or 16}-bit integer batch norm (simulated)",
      spec.activation_bits,
      spec.bn_bits or 16,
    ),
  ):
    fn = jax.jit(
      lambda v, x, act=act, bn=bn: fq.apply_quantized(
        model,
        v,
        x,
        train=False,
        activation_bits=act,
        activation_scales=spec.activation_scales,
        bn_bits=bn,
        focus=parts,
      )
    )
    rows.append({"setting": name, "accuracy": accuracy(lambda x: fn(variables, x), x, y)})
    print(f"  {name}: {rows[-1]['accuracy']:.4f}", flush=True)
  res = fq.evaluate_fqz(decoded, integer=True, limit=limit)
  rows.append(
    {"setting": "file, integer path", "accuracy": res["accuracy"], "seconds": res["seconds"]}
  )
  print(f"  file, integer path: {res['accuracy']:.4f}", flush=True)
  result = {
    "benchmark": "bench_integer --from-fqz",
    "file": str(path),
    "metadata": {k: v for k, v in decoded.metadata.items() if k != "activation_scales"},
    "date": datetime.date.today().isoformat(),
    "test_examples": len(y),
    "rows": rows,
    "ops_per_image": fq.count_integer_ops(decoded, x.shape[1:])["total"],
  }
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, "w") as f:
    json.dump(result, f, indent=1, default=str)
  print()
  print(f"| {spec.name} from {path} ({len(y)} test images) | top-1 |")
  print("|---|---|")
  for r in rows:
    print(f"| {r['setting']} | {100 * r['accuracy']:.2f}% |")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--depth", type=int, default=20, choices=(20, 56))
  p.add_argument("--sparsity", type=float, default=0.0)
  p.add_argument("--bits", type=int, default=5)
  p.add_argument("--act-bits", type=int, default=8)
  p.add_argument("--bn-bits", type=int, default=16)
  p.add_argument("--bn-images", type=int, default=10000)
  p.add_argument("--calib-images", type=int, default=2000)
  p.add_argument("--percentile", type=float, default=99.99)
  p.add_argument("--limit", type=int, default=None, help="test examples (default: all 10,000)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--fqz", default="/tmp/fq_jax_bench_integer.fqz")
  p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "integer_resnet20.json"))
  p.add_argument(
    "--from-fqz",
    default=None,
    metavar="FILE",
    help="measure the rows on a train.py model.fqz instead (see the docstring)",
  )
  args = p.parse_args(argv)
  if args.from_fqz:
    return from_fqz(args.from_fqz, args.limit, args.out)

  t_start = time.perf_counter()
  npz = SHARED / "models" / f"resnet{args.depth}-cifar10.npz"
  if not npz.is_file():
    sys.exit(f"needs {npz} (the ../shared folder)")
  depth, variables = models.import_torch_cifar_resnet(npz)
  model = models.CifarResNet(depth=depth)
  ds = data.load_cifar10()
  (xtr, _), (xte, yte) = ds.train, ds.test
  if args.limit:
    xte, yte = xte[: args.limit], yte[: args.limit]
  rng = np.random.default_rng(args.seed)
  order = rng.permutation(len(xtr))
  x_bn = xtr[order[: args.bn_images]]
  x_cal = xtr[order[args.bn_images : args.bn_images + args.calib_images]]
  rows, seconds = [], {}

  plain = jax.jit(lambda v, x: model.apply(v, x, train=False))

  def row(name, acc, **extra):
    rows.append({"setting": name, "accuracy": acc, **extra})
    print(f"  {name}: {acc:.4f}", flush=True)

  t = time.perf_counter()
  row("float (as imported)", accuracy(lambda x: plain(variables, x), xte, yte))
  v_ref = reestimate_batch_norm(model, variables, x_bn)
  row("float, batch norm re-estimated", accuracy(lambda x: plain(v_ref, x), xte, yte))
  seconds["float"] = time.perf_counter() - t

  # 2. 5-bit FQ, post-training.
  t = time.perf_counter()
  flat = _flat(variables["params"])
  focus, stored = {}, {}
  for i, (name, w) in enumerate(flat.items()):
    if not name.endswith("kernel"):
      stored[name] = w
      continue
    mask = (
      np.asarray(fq.magnitude_mask(w, args.sparsity))
      if args.sparsity > 0
      else np.ones(w.shape, bool)
    )
    st = focus_layer(
      w, mask, jax.random.key(args.seed * 1000 + i), bits=args.bits, w_sep=2.0, recentralize=True
    )
    focus["params/" + name] = st
    stored[name] = np.asarray(fq.focused_values(fq.focused_symbols(w, st), st))
  v_fq = reestimate_batch_norm(
    model, {"params": _tree(stored), "batch_stats": variables["batch_stats"]}, x_bn
  )
  kinds = {k: ("recentralized" if bool(s.recentralized) else "shift") for k, s in focus.items()}
  n_rec = sum(k == "recentralized" for k in kinds.values())
  seconds["compress"] = time.perf_counter() - t
  row(
    f"{args.bits}-bit FQ (post-training, BN re-estimated)",
    accuracy(lambda x: plain(v_fq, x), xte, yte),
    recentralized_layers=n_rec,
    layers=len(kinds),
  )

  # 3. + activations.
  t = time.perf_counter()
  scales = fq.calibrate_activations(
    model,
    v_fq,
    [x_cal[i : i + 500] for i in range(0, len(x_cal), 500)],
    bits=args.act_bits,
    percentile=args.percentile,
  )
  seconds["calibrate"] = time.perf_counter() - t
  act = jax.jit(
    lambda v, x: fq.apply_quantized(
      model, v, x, train=False, activation_bits=args.act_bits, activation_scales=scales
    )
  )
  row(f"+ {args.act_bits}-bit activations (simulated)", accuracy(lambda x: act(v_fq, x), xte, yte))

  # 4. + integer batch norm.
  parts = {
    k: integer_lib.weight_parts_from_symbols(np.asarray(fq.focused_symbols(flat[k[7:]], st)), st)
    for k, st in focus.items()
  }
  bn = jax.jit(
    lambda v, x: fq.apply_quantized(
      model,
      v,
      x,
      train=False,
      activation_bits=args.act_bits,
      activation_scales=scales,
      bn_bits=args.bn_bits,
      focus=parts,
    )
  )
  row(
    f"+ {args.bn_bits}-bit integer batch norm (simulated)",
    accuracy(lambda x: bn(v_fq, x), xte, yte),
  )

  # 5. The file, and the integer path from the file alone.
  arrays = {
    **{"params/" + k: v for k, v in flat.items()},
    **{"batch_stats/" + k: v for k, v in _flat(v_fq["batch_stats"]).items()},
  }
  for k in focus:
    arrays[k] = flat[k[7:]]  # the float weights; the file stores their symbols
  meta = {
    "model": "cifar_resnet",
    "depth": depth,
    "num_classes": 10,
    "dataset": "cifar10",
    "bits": args.bits,
    "activation_bits": args.act_bits,
    "activation_scales": {p: s.to_json() for p, s in scales.items()},
    "bn_bits": args.bn_bits,
    "tool": "benchmarks/bench_integer.py (post-training)",
  }
  blob = fq.encode_model(
    arrays, focus={k: jax.tree.map(np.asarray, s) for k, s in focus.items()}, metadata=meta
  )
  with open(args.fqz, "wb") as f:
    f.write(blob)
  t = time.perf_counter()
  res_float = fq.evaluate_fqz(args.fqz, integer=False, limit=args.limit)
  row("file, float path (act + BN simulated)", res_float["accuracy"], seconds=res_float["seconds"])
  res_int = fq.evaluate_fqz(args.fqz, integer=True, limit=args.limit)
  row("file, integer path", res_int["accuracy"], seconds=res_int["seconds"])
  seconds["evaluate_files"] = time.perf_counter() - t
  ops = fq.count_integer_ops(fq.load_fqz(args.fqz), (32, 32, 3))
  tot = ops["total"]

  result = {
    "benchmark": "bench_integer",
    "date": datetime.date.today().isoformat(),
    "command": "python " + " ".join([os.path.relpath(__file__, REPO), *(argv or sys.argv[1:])]),
    "machine": {
      "platform": platform.platform(),
      "processor": platform.processor(),
      "cpus": os.cpu_count(),
      "jax": jax.__version__,
      "device": str(jax.devices()[0]),
    },
    "commit": subprocess.run(
      ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip(),
    "settings": vars(args),
    "file_bytes": len(blob),
    "test_examples": len(yte),
    "rows": rows,
    "layer_kinds": kinds,
    "activation_scales": {p: s.to_json() for p, s in scales.items()},
    "ops_per_image": tot,
    "ops_layers": ops["layers"],
    "seconds": seconds,
    "total_seconds": time.perf_counter() - t_start,
  }
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1, default=str)

  print()
  print(f"| ResNet-{depth}, CIFAR-10 JPEG test ({len(yte)} images), post-training | top-1 |")
  print("|---|---|")
  for r in rows:
    print(f"| {r['setting']} | {100 * r['accuracy']:.2f}% |")
  print()
  print(
    f"file: {len(blob):,} bytes; {n_rec}/{len(kinds)} layers recentralized; per image: "
    f"{tot['float_macs'] / 1e6:.2f}M float MACs -> integer path {tot['shifts'] / 1e6:.2f}M shifts, "
    f"{tot['adds'] / 1e6:.2f}M adds, {tot['multiplies']} multiplies in conv/dense, "
    f"{tot['bn_multiplies'] / 1e6:.3f}M integer batch-norm multiplies, "
    f"{tot['other_multiplies']} other multiplies"
  )
  print(f"total {result['total_seconds']:.0f} s; JSON in {args.out}")


if __name__ == "__main__":
  main()
