"""Time and peak memory of `fq-jax compress` against the number of values.

Run by hand:  python benchmarks/bench_compress_scaling.py
Writes ResNet-shaped synthetic .npz files (Laplace weights, conv kernels of the
ResNet-50 channel plan repeated to reach each size) from 0.27M to 25.5M values
into a temporary folder, runs `python -m fq_jax compress X.npz --out X.fqz
--sparsity 0.8 --bits 5` on each in a fresh process, and reports wall time,
peak resident memory (ru_maxrss of the child) and the per-value cost.
"""

import datetime
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

SIZES = [270_000, 1_000_000, 4_000_000, 12_000_000, 25_500_000]
SHAPES = [
  (3, 3, 64, 64),
  (1, 1, 256, 64),
  (3, 3, 128, 128),
  (1, 1, 512, 128),
  (3, 3, 256, 256),
  (1, 1, 1024, 256),
  (3, 3, 512, 512),
  (1, 1, 2048, 512),
]


def make_npz(path, total, rng):
  arrays, n, i = {}, 0, 0
  while n < total:
    shape = SHAPES[i % len(SHAPES)]
    size = int(np.prod(shape))
    if n + size > total:  # the last layer takes what is left, as a dense kernel
      shape = (total - n, 1) if total - n > 1 else (1, 1)
      size = int(np.prod(shape))
    arrays[f"layer{i}.weight"] = rng.laplace(0, 0.01, shape).astype(np.float32)
    n += size
    i += 1
  np.savez(path, **arrays)
  return n


def main():
  rng = np.random.default_rng(0)
  print(
    f"date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cpus"
  )
  print("| values | seconds | peak RSS (MiB) | microseconds per value | file bytes |")
  print("|---|---|---|---|---|")
  with tempfile.TemporaryDirectory() as tmp:
    for total in SIZES:
      src, out = os.path.join(tmp, f"w{total}.npz"), os.path.join(tmp, f"w{total}.fqz")
      n = make_npz(src, total, rng)
      before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
      t = time.perf_counter()
      subprocess.run(
        [
          sys.executable,
          "-m",
          "fq_jax",
          "compress",
          src,
          "--out",
          out,
          "--sparsity",
          "0.8",
          "--bits",
          "5",
        ],
        check=True,
        capture_output=True,
      )
      seconds = time.perf_counter() - t
      peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB, max over children so far
      print(
        f"| {n:,} | {seconds:.1f} | {peak / 1024:.0f}{'' if peak > before else ' (<= previous)'} | "
        f"{1e6 * seconds / n:.2f} | {os.path.getsize(out):,} |",
        flush=True,
      )


if __name__ == "__main__":
  main()
