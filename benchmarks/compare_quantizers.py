"""A fair comparison of FQ with other quantizers on sparse CNNs (issue 12).

Every method runs under the same magnitude masks, the same INQ staging (25 / 50 / 75 / 87.5 /
100% of each layer's kept weights quantized in the forward pass, largest magnitude first, a
weight once in never released), the same re-estimation schedule where it applies (FQ and
shift refit their mixtures; k-means re-clusters the kept weights; uniform re-chooses its
clipping range: all at the same steps, the first after one stage, then at intervals doubling),
the same number of steps, the same optimizer and learning-rate schedule of the float weights
(adam(1e-4) for FQ's alpha, the k-means centroids and the uniform scale), and the same `.fqz`
encoder and rANS coder (every array the file rebuilds counted in the ratio):

  fq        Focused Quantization, w_sep = 2.0 (fq.focused_quantization)
  shift     shift quantization everywhere, INQ-style (recentralize=False)
  kmeans    Deep Compression weight sharing: per-layer 1-D k-means, 2^n centroids,
            linear init; fine-tuned centroids (gradient = sum of members' gradients)
  uniform   symmetric uniform n-bit integers per layer, MSE-optimal clipping
            (fq.uniform_codebook(clip="mse")); fine-tuned per-layer scale

The schedule: with S fine-tuning steps, each of the first four INQ stages lasts S // 8 steps
and the last (100%) the remaining S - 4 (S // 8), about half (the paper: 3 epochs per stage,
10 for the last); `fq.inq_schedule(S // 8)` for every method.

Reported per model, sparsity and method: post-training accuracy (PTQ: the quantizer built on
the masked fine-tuned weights, no training; optional), accuracy after the staged fine-tune,
file bytes and ratio, and the operations per image of the quantized layers, counted from the
layer shapes and masks (kept weights x output positions): FQ and shift layers need no
multiplier (each kept weight is a shift and an add; a recentralized FQ layer adds two
multiplies per output value, mu_+ and mu_- times their partial sums, Sec. 4.2), k-means and
uniform need one multiply (and an add) per kept weight and position.

Run by hand (CPU):

    python benchmarks/compare_quantizers.py --models digits --quick       # ~minutes
    python benchmarks/compare_quantizers.py --models digits --steps 120
    python benchmarks/compare_quantizers.py --models resnet20 --steps 150 --eval-size 2000

Outputs in benchmarks/results/ (stem compare_fair<tag>): .md (table), .json (everything),
_layers.csv (per-layer MSE), _<model>.png (Pareto plot of accuracy against file ratio).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fq_jax as fq
from fq_jax import data as data_lib
from fq_jax import models

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("fq", "shift", "kmeans", "uniform")
T0 = time.time()


def log(*args):
  print(f"[{time.time() - T0:7.1f}s]", *args, flush=True)


# ----------------------------------------------------------------------------
# Methods: how to build the optimizer, the forward tree, the file and the MSE
# ----------------------------------------------------------------------------

SHIFT_RULES = (fq.Rule(pattern=r"(^|/)kernel$", recentralize=False),)


@dataclasses.dataclass(frozen=True)
class Method:
  name: str
  make_tx: Callable[[optax.GradientTransformation, int, fq.QuantSchedule], Any]
  forward: Callable[[Any, Any], Any]
  kind: str  # "focus" or "codebook"


def _fq_tx(w_sep=2.0, rules=fq.DEFAULT_RULES):
  return lambda inner, bits, schedule: fq.focused_quantization(
    inner, bits=bits, w_sep=w_sep, rules=rules, schedule=schedule
  )


def method(name: str) -> Method:
  if name == "fq":
    return Method(name, _fq_tx(), fq.quantized, "focus")
  if name == "shift":
    return Method(name, _fq_tx(rules=SHIFT_RULES), fq.quantized, "focus")
  if name == "kmeans":
    return Method(
      name,
      lambda inner, bits, schedule: fq.codebook_quantization(
        inner, bits=bits, method="kmeans", kmeans_iters=100, schedule=schedule
      ),
      fq.codebook_quantized,
      "codebook",
    )
  if name == "uniform":
    return Method(
      name,
      lambda inner, bits, schedule: fq.codebook_quantization(
        inner, bits=bits, method="uniform", clip="mse", schedule=schedule
      ),
      fq.codebook_quantized,
      "codebook",
    )
  raise ValueError(name)


def _paths(tree):
  return jax.tree.leaves(fq.leaf_paths(tree))


def quant_layers(m: Method, params, opt_state) -> dict[str, Any]:
  """param path -> FocusState / CodebookState of every quantized leaf."""
  if m.kind == "focus":
    st = fq.find_state(opt_state)
    tree = st.focus
    is_leaf = lambda x: x is None or isinstance(x, fq.FocusState)
  else:
    tree = fq.find_codebook_state(opt_state).codebooks
    is_leaf = lambda x: x is None or isinstance(x, fq.CodebookState)
  treedef = jax.tree.structure(tree, is_leaf=is_leaf)
  leaves = treedef.flatten_up_to(tree)
  paths = treedef.flatten_up_to(fq.leaf_paths(params))
  return {p: s for p, s in zip(paths, leaves) if s is not None}


def encode(m: Method, params, batch_stats, opt_state, coder="ans") -> bytes:
  variables = {"params": params, "batch_stats": batch_stats}
  arrays = dict(zip(_paths(variables), (np.asarray(x) for x in jax.tree.leaves(variables))))
  layers = {"params/" + p: s for p, s in quant_layers(m, params, opt_state).items()}
  if m.kind == "focus":
    return fq.encode_model(arrays, focus=layers, coder=coder)
  return fq.encode_model(arrays, codebooks=layers, coder=coder)


def encode_pruned(params, batch_stats, masks) -> bytes:
  variables = {"params": params, "batch_stats": batch_stats}
  arrays = dict(zip(_paths(variables), (np.asarray(x) for x in jax.tree.leaves(variables))))
  mk = {
    "params/" + p: np.asarray(x)
    for p, x in zip(jax.tree.leaves(fq.leaf_paths(masks)), jax.tree.leaves(masks))
  }
  return fq.encode_model(arrays, masks=mk)


def layer_errors(m: Method, params, opt_state) -> list[dict]:
  """Per quantized layer: kept, MSE of the quantized values against the float weights it
  quantized, MSE / mean(w^2) of the kept weights, and the quantizer kind."""
  flat = dict(zip(_paths(params), jax.tree.leaves(params)))
  rows = []
  for path, s in quant_layers(m, params, opt_state).items():
    w = np.asarray(flat[path], np.float32)
    mask = np.asarray(s.mask, bool)
    if m.kind == "focus":
      q = np.asarray(fq.focused_values(fq.focused_symbols(w, s), s))
      kind = "recentralized" if bool(s.recentralized) else "shift"
      extra = dict(separation=float(s.separation))
    else:
      q = np.asarray(fq.codebook_values(s.symbols, s.codebook, s.mask))
      kind = "codebook"
      extra = {}
    kept = int(mask.sum())
    err = float(np.sum((q - w)[mask] ** 2) / max(kept, 1))
    power = float(np.sum(w[mask] ** 2) / max(kept, 1))
    rows.append(
      dict(
        layer=path, kept=kept, mse=err, rel_mse=err / power if power else 0.0, kind=kind, **extra
      )
    )
  return rows


# ----------------------------------------------------------------------------
# Models, data, training and evaluation
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class Setup:
  name: str
  model: Any
  params: Any
  batch_stats: Any
  train: tuple[np.ndarray, np.ndarray]
  test: tuple[np.ndarray, np.ndarray]
  batch: int
  augment: Any
  mask_steps: int
  ft_steps: int
  mask_inner: Callable[[int], optax.GradientTransformation]
  ft_inner: Callable[[int], optax.GradientTransformation]
  eval_chunk: int
  sparsities: tuple[float, ...]


def make_eval(model, chunk):
  @jax.jit
  def predict(variables, x):
    return jnp.argmax(model.apply(variables, x, train=False), -1)

  def evaluate(params, batch_stats, test):
    x, y = test
    variables = {"params": params, "batch_stats": batch_stats}
    pred = np.concatenate(
      [np.asarray(predict(variables, x[i : i + chunk])) for i in range(0, len(x), chunk)]
    )
    return float(np.mean(pred == y))

  return evaluate


def train(setup: Setup, params, batch_stats, tx, forward, steps: int, seed: int):
  """`steps` SGD steps on quantized (or masked) forward params; BN in training mode."""
  model = setup.model
  opt_state = tx.init(params)

  @jax.jit
  def step(params, batch_stats, opt_state, x, y):
    def loss_fn(p):
      logits, new = model.apply(
        {"params": forward(p, opt_state), "batch_stats": batch_stats},
        x,
        train=True,
        mutable=["batch_stats"],
      )
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return loss, new["batch_stats"]

    (loss, new_bs), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_bs, opt_state, loss

  x, y = setup.train
  done, losses = 0, []
  epoch = 0
  while done < steps:
    for b in data_lib.epoch_batches(
      x, y, setup.batch, epoch=epoch, seed=seed, augment=setup.augment
    ):
      params, batch_stats, opt_state, loss = step(
        params, batch_stats, opt_state, b["image"], b["label"]
      )
      losses.append(loss)
      done += 1
      if done >= steps:
        break
    epoch += 1
  return params, batch_stats, opt_state, float(np.mean(np.asarray(losses[-10:])))


def masked_forward(params, opt_state):
  return fq.quantized(params, opt_state)


def mask_tx(inner, masks):
  """A fixed-mask fine-tune: dns_pruning's state holds the masks; updates of pruned weights
  are zeroed so they stay exactly 0."""

  def zero(updates):
    return jax.tree.map(
      lambda m, u: u if m is None else jnp.where(m, u, 0.0),
      masks,
      updates,
      is_leaf=lambda v: v is None,
    )

  def init(params):
    return fq.PruneState(jnp.zeros([], jnp.int32), masks, inner.init(params))

  def update(updates, state, params=None):
    u, inner_state = inner.update(zero(updates), state.inner_state, params)
    return zero(u), fq.PruneState(state.count + 1, state.masks, inner_state)

  return optax.GradientTransformation(init, update)


def digits_setup(args) -> Setup:
  ds = data_lib.load_digits()
  model = models.DigitsCNN()
  variables = model.init(jax.random.key(0), ds.train[0][:2], train=False)
  steps = args.steps or (40 if args.quick else 120)
  setup = Setup(
    name="digits",
    model=model,
    params=variables["params"],
    batch_stats=variables["batch_stats"],
    train=ds.train,
    test=ds.test,
    batch=64,
    augment=None,
    mask_steps=args.digits_mask_steps // (2 if args.quick else 1),
    ft_steps=steps,
    mask_inner=lambda n: optax.adam(optax.cosine_decay_schedule(1e-3, n)),
    ft_inner=lambda n: optax.adam(optax.cosine_decay_schedule(3e-4, n)),
    eval_chunk=450,
    sparsities=tuple(args.sparsities or (0.7, 0.9)),
  )
  # Dense training from scratch (quick).
  dense_steps = args.digits_dense_steps // (2 if args.quick else 1)
  dense_tx = optax.adam(optax.cosine_decay_schedule(2e-3, dense_steps))
  identity = lambda p, s: p
  params, bs, _, loss = train(
    setup, setup.params, setup.batch_stats, dense_tx, identity, dense_steps, seed=100
  )
  setup.params, setup.batch_stats = params, bs
  log(f"digits: dense training {dense_steps} steps, last loss {loss:.4f}")
  return setup


def resnet_setup(args) -> Setup:
  model_path = args.resnet20 or str(data_lib.shared_dir() / "models" / "resnet20-cifar10.npz")
  depth, variables = models.import_torch_cifar_resnet(model_path)
  ds = data_lib.load_cifar10(args.cifar10)
  x, y = ds.test
  eval_size = 500 if args.quick and not args.eval_size else args.eval_size
  if eval_size and eval_size < len(x):
    # A fixed random subset (seed 0) of the test split; the split is stored sorted by class.
    idx = np.sort(np.random.default_rng(0).permutation(len(x))[:eval_size])
    x, y = x[idx], y[idx]
  return Setup(
    name="resnet20",
    model=models.CifarResNet(depth=depth),
    params=jax.tree.map(jnp.asarray, variables["params"]),
    batch_stats=jax.tree.map(jnp.asarray, variables["batch_stats"]),
    train=ds.train,
    test=(x, y),
    batch=args.batch,
    augment=data_lib.cifar10_augment,
    mask_steps=args.mask_steps // (4 if args.quick else 1),
    ft_steps=args.steps or (32 if args.quick else 150),
    mask_inner=lambda n: optax.sgd(optax.cosine_decay_schedule(0.01, n), momentum=0.9),
    ft_inner=lambda n: optax.sgd(optax.cosine_decay_schedule(0.005, n), momentum=0.9),
    eval_chunk=500,
    sparsities=tuple(args.sparsities or (0.5, 0.7)),
  )


def fair_schedule(steps: int) -> fq.QuantSchedule:
  """The one schedule every method runs: four INQ stages of steps // 8, the last ~half."""
  return fq.inq_schedule(max(steps // 8, 1))


# ----------------------------------------------------------------------------
# Operations per image
# ----------------------------------------------------------------------------


def kernel_positions(setup: Setup, params, batch_stats) -> dict[str, int]:
  """param path of every kernel -> output positions per image (H_out x W_out; 1 for Dense).

  A kernel of a layer applied at P output positions costs (kept weights) x P
  multiply-accumulates per image; read off one forward pass.
  """
  x = setup.test[0][:1]
  _, inter = setup.model.apply(
    {"params": params, "batch_stats": batch_stats},
    x,
    train=False,
    capture_intermediates=True,
    mutable=["intermediates"],
  )
  inter = inter["intermediates"]
  out = {}
  for path in _paths(params):
    if not path.endswith("kernel"):
      continue
    node = inter
    for part in path.split("/")[:-1]:
      node = node[part]
    y = node["__call__"][0]
    out[path] = int(np.prod(y.shape[1:-1])) if y.ndim > 2 else 1
  return out


def ops_per_image(m: Method, params, opt_state, positions: dict[str, int], masks) -> dict:
  """Multiplies and shift/adds per image over every kernel of the network.

  A kernel the method quantizes: FQ/shift cost one shift and one add per kept weight and
  output position (no multiply), plus two multiplies per output value of a recentralized
  layer (mu_+ and mu_- times their partial sums); k-means/uniform cost one multiply and one
  add per kept weight and position. A kernel left in float (none under the default rules)
  costs a multiply and an add per kept weight and position for every method. Batch-norm,
  biases and activations are the same for every method and not counted.
  """
  layers = quant_layers(m, params, opt_state)
  flat_masks = dict(zip(_paths(masks), jax.tree.leaves(masks)))
  flat = dict(zip(_paths(params), jax.tree.leaves(params)))
  mults = shifts = adds = 0
  for path, pos in positions.items():
    mk = flat_masks.get(path)
    kept = int(np.sum(np.asarray(mk))) if mk is not None else int(np.size(flat[path]))
    macs = kept * pos
    adds += macs
    s = layers.get(path)
    if s is None or m.kind == "codebook":
      mults += macs
    else:
      shifts += macs
      if bool(s.recentralized):
        mults += 2 * int(flat[path].shape[-1]) * pos
  return dict(multiplies=mults, shifts=shifts, adds=adds)


# ----------------------------------------------------------------------------
# The grid
# ----------------------------------------------------------------------------


def run_setup(setup: Setup, args, results: dict, layer_rows: list, save: Callable):
  evaluate = make_eval(setup.model, setup.eval_chunk)
  out = results.setdefault(setup.name, {"runs": [], "float": []})
  n_values = sum(
    int(np.size(a))
    for a in jax.tree.leaves({"params": setup.params, "batch_stats": setup.batch_stats})
  )
  positions = kernel_positions(setup, setup.params, setup.batch_stats)
  dense_macs = sum(
    int(np.size(w)) * positions[p]
    for p, w in zip(_paths(setup.params), jax.tree.leaves(setup.params))
    if p in positions
  )
  acc = evaluate(setup.params, setup.batch_stats, setup.test)
  out["float"].append(
    dict(sparsity=0.0, accuracy=acc, file_bytes=4 * n_values, ratio=1.0, multiplies=dense_macs)
  )
  out["eval_examples"] = int(len(setup.test[1]))
  schedule = fair_schedule(setup.ft_steps)
  out["schedule"] = dataclasses.asdict(schedule)
  log(f"{setup.name}: dense float accuracy {acc:.4f} on {len(setup.test[1])} test images")
  log(f"{setup.name}: schedule {schedule}")
  starts = {}
  for sp in setup.sparsities:
    masks = fq.magnitude_masks(setup.params, sp)
    p0 = fq.apply_masks(setup.params, masks)
    acc_pruned = evaluate(p0, setup.batch_stats, setup.test)
    tx = mask_tx(setup.mask_inner(setup.mask_steps), masks)
    params, bs, _, loss = train(
      setup, p0, setup.batch_stats, tx, masked_forward, setup.mask_steps, seed=1
    )
    params = fq.apply_masks(params, masks)
    acc = evaluate(params, bs, setup.test)
    nbytes = len(encode_pruned(params, bs, masks))
    flat_masks = dict(zip(_paths(masks), jax.tree.leaves(masks)))
    sparse_macs = sum(
      int(np.sum(np.asarray(flat_masks[p]))) * n if flat_masks.get(p) is not None else 0
      for p, n in positions.items()
    )
    out["float"].append(
      dict(
        sparsity=sp,
        accuracy=acc,
        accuracy_before_finetune=acc_pruned,
        file_bytes=nbytes,
        ratio=4 * n_values / nbytes,
        multiplies=sparse_macs,
      )
    )
    log(
      f"{setup.name} sparsity {sp}: pruned {acc_pruned:.4f} -> masked fine-tune "
      f"{setup.mask_steps} steps {acc:.4f}; float sparse file {4 * n_values / nbytes:.2f}x"
    )
    starts[sp] = (params, bs)
    for bits in args.bits:
      for name in args.methods:
        m = method(name)
        for stage in ("ptq", "ft") if args.ptq else ("ft",):
          t = time.time()
          inner = setup.ft_inner(setup.ft_steps)
          if stage == "ptq":
            tx = m.make_tx(inner, bits, fq.QuantSchedule())
            qp, qbs, state = params, bs, jax.jit(tx.init)(params)
            loss = None
          else:
            tx = m.make_tx(inner, bits, schedule)
            qp, qbs, state, loss = train(setup, params, bs, tx, m.forward, setup.ft_steps, seed=2)
          acc = evaluate(m.forward(qp, state), qbs, setup.test)
          data = encode(m, qp, qbs, state)
          summ = fq.artifact_summary(data)
          errs = layer_errors(m, qp, state)
          ops = ops_per_image(m, qp, state, positions, masks)
          row = dict(
            sparsity=sp,
            bits=bits,
            method=name,
            stage=stage,
            accuracy=acc,
            file_bytes=len(data),
            ratio=summ["compression_ratio"],
            paper_ratio=summ["paper_style_compression_ratio"],
            mean_mse=float(np.mean([e["mse"] for e in errs])),
            mean_rel_mse=float(np.mean([e["rel_mse"] for e in errs])),
            recentralized_layers=sum(e["kind"] == "recentralized" for e in errs),
            layers=len(errs),
            final_loss=loss,
            seconds=time.time() - t,
            steps=0 if stage == "ptq" else setup.ft_steps,
            **ops,
          )
          out["runs"].append(row)
          for e in errs:
            layer_rows.append(
              dict(model=setup.name, sparsity=sp, bits=bits, method=name, stage=stage, **e)
            )
          log(
            f"{setup.name} sp={sp} bits={bits} {name:8s} {stage}: acc {acc:.4f} "
            f"ratio {row['ratio']:.2f}x ({len(data)} B) mult {ops['multiplies']:,} "
            f"shift {ops['shifts']:,} rel-mse {row['mean_rel_mse']:.4f} ({row['seconds']:.0f}s)"
          )
          save()
  return starts


def ablation(setup: Setup, start, args, results: dict, save: Callable):
  evaluate = make_eval(setup.model, setup.eval_chunk)
  params, bs = start
  rows = []
  for w_sep in args.w_seps:
    m = Method("fq", _fq_tx(w_sep=w_sep), fq.quantized, "focus")
    tx = m.make_tx(optax.sgd(0.0), args.ablation_bits, fq.QuantSchedule())
    state = jax.jit(tx.init)(params)
    acc = evaluate(fq.quantized(params, state), bs, setup.test)
    data = encode(m, params, bs, state)
    errs = layer_errors(m, params, state)
    rows.append(
      dict(
        w_sep=w_sep,
        accuracy=acc,
        ratio=fq.artifact_summary(data)["compression_ratio"],
        mean_mse=float(np.mean([e["mse"] for e in errs])),
        mean_rel_mse=float(np.mean([e["rel_mse"] for e in errs])),
        kinds={e["layer"]: e["kind"] for e in errs},
        separation={e["layer"]: e["separation"] for e in errs},
      )
    )
    log(
      f"ablation w_sep={w_sep}: acc {acc:.4f}, recentralized "
      f"{sum(k == 'recentralized' for k in rows[-1]['kinds'].values())}/{len(errs)}"
    )
    results["ablation"] = dict(
      model=setup.name, sparsity=args.ablation_sparsity, bits=args.ablation_bits, rows=rows
    )
    save()


# ----------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------


def _millions(n) -> str:
  return f"{n / 1e6:.3f}M" if n >= 1e6 else f"{int(n):,}"


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
  """The (ratio, accuracy) points no other point beats on both, by increasing ratio."""
  front = []
  for r, a in sorted(points, key=lambda p: (-p[0], -p[1])):
    if not front or a > front[-1][1]:
      front.append((r, a))
  return sorted(front)


def write_markdown(results: dict, path: Path):
  meta = results["meta"]
  lines = [
    "# A fair comparison of FQ with other quantizers on sparse CNNs (issue 12)",
    "",
    f"Generated by `{meta['command']}` on {meta['date']} ({meta['machine']}, "
    f"{meta['platform']}; JAX {meta['jax']}; load average at start {meta.get('load', '?')}); "
    f"wall time {meta.get('wall_s', 0) / 60:.1f} min"
    f"{' (partial: run still going or stopped)' if not meta.get('complete') else ''}.",
    "",
    "Every method: the same magnitude masks (per-layer magnitude pruning, then a short masked",
    "fine-tune of the float weights: the common start), the same INQ staging (25 / 50 / 75 /",
    "87.5 / 100% of each layer's kept weights quantized in the forward pass, largest magnitude",
    "first, never released), the same re-estimation steps (FQ and shift refit their mixtures,",
    "k-means re-clusters, uniform re-chooses its clip), the same steps, optimizer and",
    "learning-rate schedule of the float weights (adam(1e-4) for FQ's alpha, the k-means",
    "centroids and the uniform scale), and the same encoder (`fq.encode_model`, rANS); ratio =",
    "4 x (values of every array the file rebuilds) / file bytes. Operations per image over all",
    "kernels, from the layer shapes and masks: FQ/shift use one shift and one add per kept",
    "weight and output position and no multiplier (a recentralized FQ layer adds 2 multiplies",
    "per output value); k-means/uniform one multiply and one add per kept weight and position.",
    "",
  ]
  for model_name in ("digits", "resnet20"):
    r = results.get(model_name)
    if not r:
      continue
    cfg = meta["settings"][model_name]
    lines += [f"## {model_name}", "", cfg, ""]
    if "schedule" in r:
      sc = r["schedule"]
      lines += [
        f"Schedule (every method): INQ fractions {tuple(sc['inq_fractions'])} beginning at "
        f"steps {(0, *sc['inq_boundaries'])}; re-estimation first at step {sc['refit_every']},"
        f" intervals x{sc['refit_growth']:g}.",
        "",
      ]
    lines += [
      "| float model | accuracy | file ratio | multiplies / image |",
      "|---|---|---|---|",
    ]
    for f in r["float"]:
      extra = (
        f" (pruned, before the masked fine-tune: {f['accuracy_before_finetune']:.4f})"
        if "accuracy_before_finetune" in f
        else ""
      )
      mults = _millions(f["multiplies"]) if "multiplies" in f else "-"
      lines.append(
        f"| sparsity {f['sparsity']:.2f} | {f['accuracy']:.4f}{extra} | {f['ratio']:.2f}x | "
        f"{mults} |"
      )
    lines += [
      "",
      "| sparsity | bits | method | accuracy (staged FT) | PTQ acc | file ratio | file bytes | "
      "multiplies / image | shifts / image | adds / image | rel. MSE |",
      "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    runs = r["runs"]
    keys = sorted({(x["sparsity"], x["bits"]) for x in runs})
    for sp, bits in keys:
      group = {
        (x["method"], x["stage"]): x for x in runs if (x["sparsity"], x["bits"]) == (sp, bits)
      }
      best = max((x["accuracy"] for (_, st), x in group.items() if st == "ft"), default=None)
      for name in METHODS:
        p, f = group.get((name, "ptq")), group.get((name, "ft"))
        x = f or p
        if x is None:
          continue
        acc = "-" if f is None else f"{f['accuracy']:.4f}"
        if f is not None and f["accuracy"] == best:
          acc = f"**{acc}**"
        tag = name
        if name == "fq":
          tag = f"fq ({x['recentralized_layers']}/{x['layers']} rec.)"
        lines.append(
          f"| {sp:.2f} | {bits} | {tag} | {acc} | "
          f"{'-' if p is None else format(p['accuracy'], '.4f')} | {x['ratio']:.2f}x | "
          f"{x['file_bytes']:,} | {_millions(x.get('multiplies', 0))} | "
          f"{_millions(x.get('shifts', 0))} | {_millions(x.get('adds', 0))} | "
          f"{x['mean_rel_mse']:.4f} |"
        )
    front = pareto_front([(x["ratio"], x["accuracy"]) for x in runs if x["stage"] == "ft"])
    names = {
      (x["ratio"], x["accuracy"]): f"{x['method']}@{x['sparsity']:.2f}"
      for x in runs
      if x["stage"] == "ft"
    }
    lines += [
      "",
      "Pareto front (staged FT; accuracy against file ratio): "
      + ", ".join(f"{names[p]} ({p[0]:.2f}x, {p[1]:.4f})" for p in front)
      + ".",
      "",
    ]
  ab = results.get("ablation")
  if ab and ab["rows"]:
    rows = ab["rows"]
    lines += [
      f"## w_sep ablation ({ab['model']}, {ab['sparsity']:.0%} pruned, {ab['bits']} bits, PTQ)",
      "",
      "| w_sep | recentralized layers | PTQ acc | ratio | MSE (rel) |",
      "|---|---|---|---|---|",
    ]
    for x in rows:
      nrec = sum(k == "recentralized" for k in x["kinds"].values())
      lines.append(
        f"| {x['w_sep']:.1f} | {nrec}/{len(x['kinds'])} | {x['accuracy']:.4f} | "
        f"{x['ratio']:.2f}x | {x['mean_mse']:.3g} ({x['mean_rel_mse']:.4f}) |"
      )
    lines.append("")
  lines += results.get("discussion", [])
  path.write_text("\n".join(lines) + "\n")


MARKERS = {"fq": "o", "shift": "s", "kmeans": "^", "uniform": "D"}


def plot(results: dict, outdir: Path, stem: str):
  """One PNG per model: accuracy against file ratio, every method and sparsity, with the
  Pareto front of the staged fine-tuned points."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  for model_name in ("digits", "resnet20"):
    r = results.get(model_name)
    if not r or not r["runs"]:
      continue
    runs = [x for x in r["runs"] if x["stage"] == "ft"] or r["runs"]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name in METHODS:
      pts = [x for x in runs if x["method"] == name]
      if not pts:
        continue
      ax.scatter(
        [x["ratio"] for x in pts],
        [x["accuracy"] for x in pts],
        marker=MARKERS[name],
        s=45,
        label=f"{name} ({'no multiplier' if name in ('fq', 'shift') else 'multiplies'})",
      )
      for x in pts:
        ax.annotate(
          f"{x['sparsity']:.0%}",
          (x["ratio"], x["accuracy"]),
          fontsize=7,
          xytext=(4, 3),
          textcoords="offset points",
        )
    front = pareto_front([(x["ratio"], x["accuracy"]) for x in runs])
    ax.plot([p[0] for p in front], [p[1] for p in front], "k--", lw=0.8, label="Pareto front")
    for f in r["float"]:
      ax.axhline(f["accuracy"], color="grey", lw=0.5, ls=":")
    bits = sorted({x["bits"] for x in runs})
    ax.set_xlabel("compression ratio (file on disk)")
    ax.set_ylabel(f"top-1 accuracy ({r.get('eval_examples', '?')} test images)")
    ax.set_title(
      f"{model_name}: {bits} bits, same masks, INQ staging, refits, steps "
      f"(labels: sparsity; dotted: float models)",
      fontsize=8,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(outdir / f"{stem}_{model_name}.png", dpi=110)
    plt.close(fig)


def replot(json_path: str):
  """Redraws the figures and the markdown of a saved run (e.g. one copied from another machine)."""
  path = Path(json_path)
  results = json.loads(path.read_text())
  plot(results, path.parent, path.stem)
  write_markdown(results, path.with_suffix(".md"))


def main(argv=None):
  ap = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  ap.add_argument("--models", nargs="+", default=["digits"], choices=["digits", "resnet20"])
  ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
  ap.add_argument("--bits", nargs="+", type=int, default=[5])
  ap.add_argument(
    "--sparsities",
    nargs="+",
    type=float,
    default=None,
    help="magnitude sparsities (default: digits 0.7 0.9, resnet20 0.5 0.7)",
  )
  ap.add_argument(
    "--steps",
    "--ft-steps",
    type=int,
    default=0,
    help="staged fine-tuning steps per method (default: digits 120, resnet20 150; quick: 40 / 32)",
  )
  ap.add_argument(
    "--quick",
    action="store_true",
    help="a smoke run: fewer dense / masked / staged steps, ResNet-20 on 500 test images",
  )
  ap.add_argument("--no-ptq", dest="ptq", action="store_false", help="skip the PTQ rows")
  ap.add_argument("--batch", type=int, default=64, help="ResNet-20 batch size")
  ap.add_argument("--mask-steps", type=int, default=60, help="ResNet-20 masked fine-tune steps")
  ap.add_argument(
    "--eval-size",
    type=int,
    default=0,
    help="ResNet-20 test images (fixed random subset); 0 = all 10,000",
  )
  ap.add_argument("--digits-dense-steps", type=int, default=400)
  ap.add_argument("--digits-mask-steps", type=int, default=63)
  ap.add_argument(
    "--w-seps",
    nargs="*",
    type=float,
    default=[],
    help="also the paper's w_sep ablation (ResNet-20, PTQ) at these thresholds",
  )
  ap.add_argument("--ablation-bits", type=int, default=5)
  ap.add_argument("--ablation-sparsity", type=float, default=0.7)
  ap.add_argument("--resnet20", default=None, help="checkpoint (default ../shared/models/...)")
  ap.add_argument("--cifar10", default=None, help="JPEG archive (default ../shared/data/...)")
  ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
  ap.add_argument("--tag", default="", help="suffix of the output files")
  ap.add_argument(
    "--replot",
    default=None,
    metavar="JSON",
    help="only redraw the figures and markdown of a saved run's JSON",
  )
  args = ap.parse_args(argv)
  if args.replot:
    replot(args.replot)
    return
  outdir = Path(args.out)
  outdir.mkdir(parents=True, exist_ok=True)
  cache = os.environ.get("FQ_JAX_BENCH_JIT_CACHE", "/tmp/fq_jax_bench_jit_cache")
  jax.config.update("jax_compilation_cache_dir", cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

  machine = platform.processor() or platform.machine()
  try:
    for line in open("/proc/cpuinfo"):
      if line.startswith("model name"):
        machine = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  try:
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
  except OSError:
    load = "?"
  device = jax.devices()[0]
  results = {
    "meta": dict(
      command="python benchmarks/compare_quantizers.py "
      + " ".join(sys.argv[1:] if argv is None else argv),
      date=time.strftime("%Y-%m-%d %H:%M %Z"),
      machine=f"{machine}, {os.cpu_count()} cpus",
      load=load,
      platform=f"{device.platform} ({getattr(device, 'device_kind', '')})",
      jax=jax.__version__,
      complete=False,
      settings={},
    )
  }
  layer_rows: list[dict] = []
  stem = f"compare_fair{args.tag}"

  def save():
    results["meta"]["wall_s"] = time.time() - T0
    (outdir / f"{stem}.json").write_text(json.dumps(results, indent=1))
    with open(outdir / f"{stem}_layers.csv", "w", newline="") as fh:
      if layer_rows:
        keys = list(dict.fromkeys(k for r in layer_rows for k in r))
        wr = csv.DictWriter(fh, fieldnames=keys)
        wr.writeheader()
        wr.writerows(layer_rows)
    write_markdown(results, outdir / f"{stem}.md")

  for name in args.models:
    if name == "digits":
      setup = digits_setup(args)
      results["meta"]["settings"]["digits"] = (
        f"DigitsCNN trained from scratch (adam, batch 64); sparsities {setup.sparsities}; "
        f"masked fine-tune {setup.mask_steps} adam steps; staged quantized fine-tune "
        f"{setup.ft_steps} steps of adam(3e-4, cosine) per method; all "
        f"{len(setup.test[1])} test images."
      )
    else:
      setup = resnet_setup(args)
      results["meta"]["settings"]["resnet20"] = (
        f"Shipped ResNet-20 (../shared/models/resnet20-cifar10.npz); sparsities "
        f"{setup.sparsities}; masked fine-tune {setup.mask_steps} steps of SGD(0.01, momentum "
        f"0.9, cosine), batch {setup.batch}, crop+flip augmentation; staged quantized "
        f"fine-tune {setup.ft_steps} steps of SGD(0.005, momentum 0.9, cosine), batch "
        f"{setup.batch} (= {setup.ft_steps * setup.batch / 50000:.3f} epochs) per method; "
        f"accuracy on {len(setup.test[1])} images of the CIFAR-10 JPEG test split"
        f"{' (fixed random subset, seed 0)' if len(setup.test[1]) < 10000 else ''}."
      )
    starts = run_setup(setup, args, results, layer_rows, save)
    if name == "resnet20" and args.w_seps and args.ablation_sparsity in starts:
      ablation(setup, starts[args.ablation_sparsity], args, results, save)
    plot(results, outdir, stem)
  results["meta"]["complete"] = True
  save()
  plot(results, outdir, stem)
  log("done")


if __name__ == "__main__":
  main()
