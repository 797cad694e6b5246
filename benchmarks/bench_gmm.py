"""GMM fitting speed: fq.fit_gmm against scikit-learn, and a whole ResNet-50.

Run by hand:  python benchmarks/bench_gmm.py [--repeats 3]
Prints a markdown table (and the machine line) for BENCHMARKS.md.

1. One 2,359,296-value layer (ResNet-50's largest convolution, 3x3x512x512),
   Laplace-distributed like trained conv weights, 80% magnitude-pruned: time of
   fq.fit_gmm (compiled, excluding the first call) against
   sklearn.mixture.GaussianMixture (default settings, the paper's init passed as
   means_init / weights_init / precisions_init), and the mean log-likelihood
   each reaches (computed by the same function on the same data).
2. Every kernel of ResNet-50 (shapes from fq_jax.models, 25.5M values),
   pruned 80%: fq.fit_gmms (one batched EM) wall time, compile excluded.
"""

import argparse
import datetime
import platform
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.mixture import GaussianMixture

import fq_jax as fq
from fq_jax import models
from fq_jax._src.tables import format_table


def machine() -> str:
  try:
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    name = next(l.split(":", 1)[1].strip() for l in cpu.splitlines() if l.startswith("Model name"))
  except Exception:  # lscpu missing: still say something true
    name = platform.processor() or "unknown CPU"
  return f"{name}, {jax.device_count()} JAX device(s) ({jax.devices()[0].platform}), jax {jax.__version__}"


def timed(fn, repeats):
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    out = fn()
    jax.block_until_ready(out)
    best = min(best, time.perf_counter() - t)
  return best, out


def pruned_laplace(shape, sparsity, seed):
  rng = np.random.default_rng(seed)
  w = rng.laplace(0, 0.01, shape).astype(np.float32)
  mask = np.asarray(fq.magnitude_mask(jnp.asarray(w), sparsity))
  return w, mask


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  print(f"machine: {machine()}; date: {datetime.date.today()}")

  w, mask = pruned_laplace((3, 3, 512, 512), 0.8, 0)
  kept = w[mask]
  fit = jax.jit(fq.fit_gmm)
  jax.block_until_ready(fit(w, mask))  # compile
  t_fq, g = timed(lambda: fit(w, mask), args.repeats)
  ll_fq = float(fq.gmm_log_likelihood(g, kept))

  neg, pos = kept[kept < 0], kept[kept >= 0]
  sk = GaussianMixture(
    2,
    weights_init=[0.5, 0.5],
    means_init=[[neg.mean()], [pos.mean()]],
    precisions_init=[[[1 / neg.var()]], [[1 / pos.var()]]],
  )
  t_sk, sk = timed(lambda: sk.fit(kept[:, None].astype(np.float64)), 1)
  g_sk = fq.GMM(
    jnp.asarray(sk.weights_, jnp.float32),
    jnp.asarray(sk.means_[:, 0], jnp.float32),
    jnp.asarray(np.sqrt(sk.covariances_[:, 0, 0]), jnp.float32),
  )
  ll_sk = float(fq.gmm_log_likelihood(g_sk, kept))
  default = GaussianMixture(2, random_state=0)
  t_default, default = timed(lambda: default.fit(kept[:, None].astype(np.float64)), 1)
  g_default = fq.GMM(
    jnp.asarray(default.weights_, jnp.float32),
    jnp.asarray(default.means_[:, 0], jnp.float32),
    jnp.asarray(np.sqrt(default.covariances_[:, 0, 0]), jnp.float32),
  )
  ll_default = float(fq.gmm_log_likelihood(g_default, kept))
  rows = [
    ["fq.fit_gmm (jit, compiled)", f"{t_fq:.3f}", f"{ll_fq:.5f}", "<= 200 (tol 1e-7)"],
    ["sklearn GaussianMixture (defaults, paper init)", f"{t_sk:.3f}", f"{ll_sk:.5f}", sk.n_iter_],
    [
      "sklearn GaussianMixture (defaults: k-means init)",
      f"{t_default:.3f}",
      f"{ll_default:.5f}",
      default.n_iter_,
    ],
    [
      "ratio sklearn (paper init) / fq",
      f"{t_sk / t_fq:.1f}x",
      f"fq - sklearn = {ll_fq - ll_sk:+.2e}",
      "",
    ],
    [
      "ratio sklearn (defaults) / fq",
      f"{t_default / t_fq:.1f}x",
      f"fq - sklearn = {ll_fq - ll_default:+.2e}",
      "",
    ],
  ]
  columns = ["2,359,296-value layer, 80% pruned", "seconds", "mean log-likelihood", "EM iterations"]
  print("\n" + format_table(rows, columns, left=columns[:1], markdown=True))

  resnet50 = models.get_model("resnet50")
  shapes = jax.eval_shape(
    lambda: resnet50.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)), train=False)
  )
  kernels = [
    x
    for p, x in jax.tree_util.tree_flatten_with_path(shapes["params"])[0]
    if fq.path_str(p).endswith("kernel")
  ]
  layers = [pruned_laplace(k.shape, 0.8, i) for i, k in enumerate(kernels)]
  ws = [jnp.asarray(w) for w, _ in layers]
  ms = [jnp.asarray(m) for _, m in layers]
  fit_all = jax.jit(fq.fit_gmms)
  t0 = time.perf_counter()
  jax.block_until_ready(fit_all(ws, ms))
  compile_s = time.perf_counter() - t0
  t_all, gs = timed(lambda: fit_all(ws, ms), args.repeats)
  total = sum(w.size for w in ws)
  rows = [
    ["fq.fit_gmms, one batched EM (compiled)", f"{t_all:.3f}"],
    ["first call incl. compilation", f"{compile_s:.3f}"],
  ]
  columns = [f"all ResNet-50 kernels ({len(ws)} layers, {total:,} values, 80% pruned)", "seconds"]
  print("\n" + format_table(rows, columns, left=columns[:1], markdown=True))
  assert np.all(np.isfinite(np.asarray(gs.means)))


if __name__ == "__main__":
  main()
