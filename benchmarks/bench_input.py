"""ImageNet input pipeline: the current one (fq_jax.data.imagenet) against the grain loader.

On the same JPEGs (crops of scikit-learn's two bundled sample photos, re-encoded at
500x375 / 375x500, quality 90, like ImageNet's typical sizes), written as a local tfds
array_record dataset, it measures:

* per core: training preprocessing images per CPU-second of one process (reading from the
  tfds source, decoding, random-resized crop, flip, batch assembly), current vs new;
* end to end: images/s (wall clock, after the first batch) of the grain loader with 1 and
  2 worker processes, and the parallel efficiency ``ips(2) / (2 ips(1))``;
* bytes per batch handed to the devices (float32 vs uint8 images).

    python benchmarks/bench_input.py [--images 2048] [--batch 32] [--json out.json]

The machine's load average is printed: on a shared machine wall-clock numbers are only as
good as the cores that were free.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time

import numpy as np
import psutil
from PIL import Image
from sklearn.datasets import load_sample_images

from fq_jax.data import imagenet as current
from fq_jax.data import imagenet_grain


def make_jpegs(n: int, seed: int = 0) -> list[tuple[bytes, int]]:
  """``n`` JPEG crops (landscape 500x375 or portrait 375x500) of the sample photos."""
  rng = np.random.default_rng(seed)
  photos = [
    np.asarray(Image.fromarray(p).resize((800, 534), Image.BILINEAR))
    for p in load_sample_images().images
  ]
  out = []
  for k in range(n):
    photo = photos[k % 2]
    h, w = (375, 500) if rng.random() < 0.75 else (500, 375)
    t = rng.integers(0, photo.shape[0] - h + 1)
    l = rng.integers(0, photo.shape[1] - w + 1)
    crop = photo[t : t + h, l : l + w]
    if rng.random() < 0.5:
      crop = crop[:, ::-1]
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(crop)).save(buf, "JPEG", quality=90)
    out.append((buf.getvalue(), k % 10))
  return out


def per_core(batches, num_images: int) -> tuple[float, float]:
  """(images per CPU-second of this process, images per wall second)."""
  cpu, wall = time.process_time(), time.perf_counter()
  count = 0
  for batch in batches:
    count += len(batch["label"])
    if count >= num_images:
      break
  return count / (time.process_time() - cpu), count / (time.perf_counter() - wall)


def _cpu_seconds() -> float:
  # This process and its worker processes (grain starts them as children).
  me = psutil.Process()
  procs = [me, *me.children(recursive=True)]
  total = 0.0
  for p in procs:
    try:
      t = p.cpu_times()
      total += t.user + t.system
    except psutil.NoSuchProcess:
      pass
  return total


def end_to_end(loader, num_batches: int) -> tuple[float, float]:
  """(images/s wall clock, CPU-seconds per image over all processes), after the first batch."""
  it = loader.epoch(0)
  next(it)
  start, cpu, count = time.perf_counter(), _cpu_seconds(), 0
  for _, batch in zip(range(num_batches), it, strict=False):
    count += len(batch["label"])
  cpu_per_image = (_cpu_seconds() - cpu) / count
  return count / (time.perf_counter() - start), cpu_per_image


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  # 2048 images = 64 batches per end-to-end measurement: with 24 (768 images) the workers'
  # start-up and the first batches' latency weigh on the 1 -> 2 worker wall-clock figure.
  parser.add_argument("--images", type=int, default=2048, help="dataset size")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--per-core-images", type=int, default=512)
  parser.add_argument("--json", help="write the results here")
  args = parser.parse_args()

  print(f"load average before: {os.getloadavg()}, cpus: {os.cpu_count()}")
  with tempfile.TemporaryDirectory() as data_dir:
    examples = make_jpegs(args.images)
    mean_kb = np.mean([len(d) for d, _ in examples]) / 1024
    name = imagenet_grain.write_jpeg_dataset(data_dir, {"train": examples}, num_classes=10)
    print(f"{args.images} JPEGs, mean {mean_kb:.0f} KiB, tfds array_record in {data_dir}")
    common = dict(
      batch_size=args.batch,
      seed=0,
      data_dir=data_dir,
      dataset_name=name,
      process_index=0,
      process_count=1,
    )
    old = current.ImageNetPipeline("train", num_threads=0, **common)
    new = imagenet_grain.GrainImageNetLoader("train", num_workers=0, **common)
    next(old.epoch(1)), next(new.epoch(1))  # open sources, warm caches

    old_cpu, old_wall = per_core(old.epoch(0), args.per_core_images)
    new_cpu, new_wall = per_core(new.epoch(0), args.per_core_images)
    print(f"per core (images / CPU-s): current {old_cpu:.0f}, new {new_cpu:.0f} "
          f"({new_cpu / old_cpu:.2f}x); wall: {old_wall:.0f} vs {new_wall:.0f}")  # fmt: skip

    workers, cpu_per_image = {}, {}
    steps = new.steps_per_epoch - 1
    for w in (1, 2):
      loader = imagenet_grain.GrainImageNetLoader("train", num_workers=w, **common)
      workers[str(w)], cpu_per_image[str(w)] = end_to_end(loader, steps)
      print(f"end to end, {w} worker(s): {workers[str(w)]:.0f} images/s, "
            f"{1e3 * cpu_per_image[str(w)]:.2f} CPU-ms/image (all processes)")  # fmt: skip
    efficiency = workers["2"] / (2 * workers["1"])
    # What the CPU cost says efficiency is on free cores: no per-image overhead added by the
    # second worker means linear scaling while cores are free.
    cpu_efficiency = cpu_per_image["1"] / cpu_per_image["2"]
    print(f"parallel efficiency 1 -> 2 workers: {efficiency:.0%} wall clock, "
          f"{cpu_efficiency:.0%} by CPU cost per image")  # fmt: skip

    old_batch, new_batch = next(old.epoch(0)), next(new.epoch(0))
    bytes_old = int(sum(v.nbytes for v in old_batch.values()))
    bytes_new = int(sum(v.nbytes for v in new_batch.values()))
    print(f"bytes per batch of {args.batch}: current {bytes_old:,}, new {bytes_new:,} "
          f"({bytes_old / bytes_new:.2f}x fewer)")  # fmt: skip
  load_after = os.getloadavg()
  print(f"load average after: {load_after}")
  result = {
    "old": {"per_core": old_cpu, "per_core_wall": old_wall},
    "new": {"per_core": new_cpu, "per_core_wall": new_wall, "workers": workers},
    "speedup_per_core": new_cpu / old_cpu,
    "parallel_efficiency": efficiency,
    "parallel_efficiency_cpu": cpu_efficiency,
    "cpu_ms_per_image": {k: 1e3 * v for k, v in cpu_per_image.items()},
    "bytes_per_batch": {"old": bytes_old, "new": bytes_new, "batch_size": args.batch},
    "load_average_after": load_after,
    "cpus": os.cpu_count(),
  }
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  main()
