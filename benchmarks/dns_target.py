"""Reached DNS sparsity on the ResNet-20 convolutions: the old rule against `fq.dns_masks`.

For each convolution of the pretrained ResNet-20 (../shared/models/resnet20-cifar10.npz) and
each requested sparsity s, the mask update is iterated to its fixed point from all weights
kept (and, for `fq.dns_masks`, from all pruned) with the weights held fixed, and the reached
sparsity is printed. "old" is the rule before issue 12, restated in NumPy: t = the s-quantile
of |w|, prune below 0.9 t, splice above 1.1 t, keep in between.

Run by hand (not a test):
  FQ_JAX_SHARED=/work/shared PYTHONPATH=. python benchmarks/dns_target.py
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from fq_jax._src import masks as masks_lib
from fq_jax.data import shared_dir

MAX_ITERS = 100


def old_rule_fixed_point(w: np.ndarray, s: float) -> float:
  """Fixed point of the pre-fix update (quantile threshold + 0.9/1.1 hysteresis) from all kept."""
  a = np.abs(w.ravel()).astype(np.float32)
  t = np.sort(a)[min(max(round(s * a.size) - 1, 0), a.size - 1)]
  m = np.ones(a.size, bool)
  for _ in range(MAX_ITERS):
    new = np.where(a < 0.9 * t, False, np.where(a > 1.1 * t, True, m))
    if np.array_equal(new, m):
      break
    m = new
  return 1.0 - m.mean()


def library_fixed_point(update, w: jax.Array, s: float, start: bool) -> tuple[float, int]:
  """Fixed point of `fq.dns_masks` from all-`start` masks: (sparsity, iterations to settle)."""
  params = {"kernel": w}
  m = {"kernel": jnp.full(w.shape, start)}
  for i in range(MAX_ITERS):
    new = update(params, m, s)
    if bool(jnp.array_equal(new["kernel"], m["kernel"])):
      return 1.0 - float(jnp.mean(m["kernel"])), i
    m = new
  return 1.0 - float(jnp.mean(m["kernel"])), MAX_ITERS


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.7, 0.827])
  p.add_argument(
    "--eval-images",
    type=int,
    default=0,
    help="also evaluate one-shot magnitude pruning, per layer against global, on this many\n"
    "test images (no fine-tuning, no batch-norm recalibration); 0 skips it",
  )
  args = p.parse_args()
  npz = np.load(shared_dir() / "models" / "resnet20-cifar10.npz")
  convs = [k for k in npz.files if k.endswith(".weight") and npz[k].ndim == 4]
  update = jax.jit(lambda p, m, s: masks_lib.dns_masks(p, m, sparsity=s), static_argnums=2)
  print(
    f"{'layer':<24} {'size':>6} "
    + " ".join(
      f"{'s=' + str(s) + ' old':>12} {'new(kept)':>9} {'new(pruned)':>11}" for s in args.sparsities
    )
  )
  summary = {s: [] for s in args.sparsities}
  for k in convs:
    w = jnp.asarray(npz[k])
    cells = []
    for s in args.sparsities:
      old = old_rule_fixed_point(npz[k], s)
      kept, _ = library_fixed_point(update, w, s, True)
      pruned, _ = library_fixed_point(update, w, s, False)
      summary[s].append((old, kept, pruned))
      cells.append(f"{old:>12.4f} {kept:>9.4f} {pruned:>11.4f}")
    print(f"{k:<24} {w.size:>6} " + " ".join(cells))
  for s, rows in summary.items():
    r = np.asarray(rows)
    print(
      f"s={s}: old {r[:, 0].min():.4f}-{r[:, 0].max():.4f}, "
      f"dns_masks from kept {r[:, 1].min():.4f}-{r[:, 1].max():.4f}, "
      f"from pruned {r[:, 2].min():.4f}-{r[:, 2].max():.4f} (max |err| "
      f"{np.abs(r[:, 1:] - s).max() * 100:.2f} pp)"
    )
  # Global scope: one threshold over every kernel (convolutions and the classifier).
  kernels = {
    k: jnp.asarray(npz[k]) for k in npz.files if k.endswith(".weight") and npz[k].ndim >= 2
  }
  params = {k.replace(".", "_"): {"kernel": w} for k, w in kernels.items()}
  print("\nscope='global' (fixed point from all kept; per-layer reached sparsity):")
  print(f"{'layer':<24} {'size':>6} " + " ".join(f"{'s=' + str(s):>8}" for s in args.sparsities))
  reports = []
  for s in args.sparsities:
    m = masks_lib.magnitude_masks(params, 0.0)
    for _ in range(3):
      m = masks_lib.dns_masks(params, m, sparsity=s, scope="global")
    reports.append(masks_lib.sparsity_report(params, m, sparsity=s, scope="global"))
  reached = [{row["path"]: row["reached"] for row in r["layers"]} for r in reports]
  for k in kernels:
    path = k.replace(".", "_") + "/kernel"
    cells = " ".join(f"{r[path]:>8.4f}" for r in reached)
    print(f"{k:<24} {kernels[k].size:>6} {cells}")
  print(
    f"{'total':<24} {reports[0]['total']['size']:>6} "
    + " ".join(f"{r['total']['reached']:>8.4f}" for r in reports)
  )
  if args.eval_images:
    evaluate_scopes(args.sparsities, args.eval_images)


def evaluate_scopes(sparsities, num_images: int) -> None:
  """Top-1 of the ResNet-20 magnitude-pruned per layer and globally (no fine-tuning)."""
  from fq_jax.data.cifar10 import load_cifar10_uint8, normalize_cifar10
  from fq_jax.models import CifarResNet, import_torch_cifar_resnet

  depth, variables = import_torch_cifar_resnet(shared_dir() / "models" / "resnet20-cifar10.npz")
  arrays = load_cifar10_uint8()
  images = normalize_cifar10(arrays["test_images"][:num_images])
  labels = arrays["test_labels"][:num_images]
  model = CifarResNet(depth=depth)

  @jax.jit
  def correct(v, x, y):
    return jnp.sum(jnp.argmax(model.apply(v, x, train=False), -1) == y)

  def accuracy(v):
    hits = sum(
      int(correct(v, images[i : i + 500], labels[i : i + 500])) for i in range(0, len(images), 500)
    )
    return hits / len(images)

  print(f"\nmagnitude pruning, no fine-tuning, first {num_images} test images:")
  print(f"dense: {accuracy(variables):.4f}")
  for s in sparsities:
    row = []
    for scope in ("layer", "global"):
      m = masks_lib.magnitude_masks(variables, s, scope=scope)
      row.append(f"{scope} {accuracy(masks_lib.apply_masks(variables, m)):.4f}")
    print(f"s={s}: " + ", ".join(row))


if __name__ == "__main__":
  main()
