"""ImageNet (ILSVRC-2012) through `tfds.data_source`, with numpy/Pillow preprocessing.

Reading: `tfds.data_source('imagenet2012', split=..., data_dir=...)` gives random access to
decoded examples (`{'image': uint8 HxWx3, 'label': int}`) without TensorFlow. The data must
already be prepared in `data_dir` in the `array_record` file format.

Preprocessing (standard ResNet recipe, torchvision semantics, Pillow bilinear resampling):

* train: random-resized-crop to 224 (area scale U(0.08, 1), log-uniform aspect ratio in
  [3/4, 4/3], 10 tries then a centre crop) and a horizontal flip with probability 1/2;
* eval: resize the shorter side to 256, centre crop 224;
* both: `pixels / 255` normalized with the ImageNet mean and std.

Sharding across hosts (process `i` of `P`):

* train: every epoch draws one global permutation of all `N` indices from `(seed, epoch)`
  (identical on all hosts); host `i` takes the strided slice `perm[i::P]` truncated to
  `N // P` examples, so shards are disjoint, all hosts run the same number of steps, and the
  data a host sees changes from epoch to epoch. Partial batches are dropped.
* eval: host `i` takes `i::P` in dataset order; its last batch, and any batches needed to
  give every host the same number of steps, are padded with `mask == 0` examples, so that
  summing `mask`-weighted counts over hosts evaluates every example exactly once.

Every batch is `{'image': float32 (B, 224, 224, 3), 'label': int32 (B,), 'mask': float32
(B,)}`. The crop/flip of an example is drawn from a generator seeded by `(seed, epoch,
dataset index)`, so the output does not depend on threading, batch size or host count, and an
epoch restarted at `start_step` reproduces the uninterrupted one.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from PIL import Image

from fq_jax.data.common import epoch_permutation

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
_EXAMPLE_STREAM = 2  # keeps per-example crop generators apart from other streams


def _to_pil(image: np.ndarray) -> Image.Image:
  image = np.asarray(image, dtype=np.uint8)
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  return Image.fromarray(image).convert("RGB")


def _normalize(image: np.ndarray) -> np.ndarray:
  return (image.astype(np.float32) / np.float32(255.0) - IMAGENET_MEAN) / IMAGENET_STD


def random_resized_crop_box(
  height: int,
  width: int,
  rng: np.random.Generator,
  scale: tuple[float, float] = (0.08, 1.0),
  ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
  """Samples an Inception-style crop box (torchvision's RandomResizedCrop.get_params).

  Args:
    height: image height.
    width: image width.
    rng: the generator.
    scale: range of the crop area as a fraction of the image area.
    ratio: range of the aspect ratio w/h (sampled log-uniformly).

  Returns:
    `(top, left, crop_height, crop_width)`.
  """
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  # Fallback: the largest centred crop whose aspect ratio lies within `ratio`.
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    h, w = height, int(round(height * max(ratio)))
  else:
    h, w = height, width
  return (height - h) // 2, (width - w) // 2, h, w


def preprocess_train(
  image: np.ndarray, rng: np.random.Generator, image_size: int = 224
) -> np.ndarray:
  """Random-resized crop, horizontal flip and normalization of one training image.

  Args:
    image: uint8 `(H, W, 3)` (or `(H, W)` / `(H, W, 1)` grayscale).
    rng: the generator for this example.
    image_size: output side.

  Returns:
    float32 `(image_size, image_size, 3)`, ImageNet-normalized.
  """
  pil = _to_pil(image)
  top, left, h, w = random_resized_crop_box(pil.height, pil.width, rng)
  # resize(box=...) crops and resamples in one step, like torchvision's resized_crop on PIL.
  out = np.asarray(
    pil.resize((image_size, image_size), Image.BILINEAR, box=(left, top, left + w, top + h))
  )
  if rng.random() < 0.5:
    out = out[:, ::-1]
  return _normalize(out)


def preprocess_eval(image: np.ndarray, image_size: int = 224, resize_size: int = 256) -> np.ndarray:
  """Resize the shorter side to `resize_size`, centre crop `image_size`, normalize.

  Args:
    image: uint8 `(H, W, 3)` (or grayscale).
    image_size: output side.
    resize_size: target of the shorter side.

  Returns:
    float32 `(image_size, image_size, 3)`, ImageNet-normalized.
  """
  pil = _to_pil(image)
  w, h = pil.size
  # torchvision Resize(int): the longer side is truncated, not rounded.
  if w <= h:
    new_w, new_h = resize_size, int(resize_size * h / w)
  else:
    new_w, new_h = int(resize_size * w / h), resize_size
  pil = pil.resize((new_w, new_h), Image.BILINEAR)
  top = int(round((new_h - image_size) / 2.0))
  left = int(round((new_w - image_size) / 2.0))
  out = np.asarray(pil.crop((left, top, left + image_size, top + image_size)))
  return _normalize(out)


def shard_indices(
  num_examples: int,
  *,
  process_index: int,
  process_count: int,
  train: bool,
  seed: int = 0,
  epoch: int = 0,
) -> np.ndarray:
  """The dataset indices host `process_index` reads in one epoch, in reading order.

  Args:
    num_examples: dataset (split) size `N`.
    process_index: this host, `0 <= i < P`.
    process_count: number of hosts `P`.
    train: training sharding (global `(seed, epoch)` permutation, strided, truncated to
      `N // P`) or evaluation sharding (`i::P` in dataset order, all of it).
    seed: run seed (train only).
    epoch: epoch (train only).

  Returns:
    int64 indices.
  """
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} outside [0, {process_count})")
  if not train:
    return np.arange(process_index, num_examples, process_count)
  perm = epoch_permutation(num_examples, seed=seed, epoch=epoch)
  return perm[process_index::process_count][: num_examples // process_count]


class ImageNetPipeline:
  """Deterministic, resumable, host-sharded ImageNet batches.

  Example::

      pipe = ImageNetPipeline("train", batch_size=256, seed=0, data_dir="/data/tfds")
      for step, batch in enumerate(pipe.epoch(epoch, start_step=resume_step), resume_step):
          ...
  """

  def __init__(
    self,
    split: str = "train",
    *,
    batch_size: int,
    train: bool | None = None,
    seed: int = 0,
    data_dir: str | os.PathLike[str] | None = None,
    dataset_name: str = "imagenet2012",
    process_index: int | None = None,
    process_count: int | None = None,
    image_size: int = 224,
    resize_size: int = 256,
    num_threads: int = 0,
    source: Sequence[dict[str, Any]] | None = None,
  ) -> None:
    """Creates the pipeline (opens the data source lazily on first use).

    Args:
      split: tfds split, e.g. "train", "validation", "train[:1%]".
      batch_size: examples per batch on this host.
      train: augment, shuffle and drop remainders (default: `split` starts with "train").
      seed: run seed (order and augmentation).
      data_dir: tfds data directory (None: tfds default).
      dataset_name: tfds dataset name.
      process_index: this host (default `jax.process_index()`).
      process_count: number of hosts (default `jax.process_count()`).
      image_size: output side.
      resize_size: eval resize of the shorter side.
      num_threads: threads reading and preprocessing examples (0: in the caller's
        thread). Results do not depend on it.
      source: an already opened random-access source of `{'image', 'label'}` dicts,
        instead of `tfds.data_source` (e.g. for tests).
    """
    if process_index is None or process_count is None:
      import jax  # only needed for the defaults; keeps data loading importable without it

      process_index = jax.process_index() if process_index is None else process_index
      process_count = jax.process_count() if process_count is None else process_count
    self.split = split
    self.batch_size = batch_size
    self.train = split.startswith("train") if train is None else train
    self.seed = seed
    self.data_dir = None if data_dir is None else os.fspath(data_dir)
    self.dataset_name = dataset_name
    self.process_index = process_index
    self.process_count = process_count
    self.image_size = image_size
    self.resize_size = resize_size
    self.num_threads = num_threads
    self._source = source

  @property
  def source(self) -> Sequence[dict[str, Any]]:
    """The random-access data source (opened on first access)."""
    if self._source is None:
      import tensorflow_datasets as tfds  # slow import, only when really reading

      self._source = tfds.data_source(self.dataset_name, split=self.split, data_dir=self.data_dir)
    return self._source

  @property
  def num_examples(self) -> int:
    """Size of the whole split (all hosts)."""
    return len(self.source)

  @property
  def steps_per_epoch(self) -> int:
    """Batches per epoch on this host (the same on every host)."""
    n, p, b = self.num_examples, self.process_count, self.batch_size
    if self.train:
      return (n // p) // b
    largest_shard = -(-n // p)  # ceil(n / p); smaller shards are padded up to it
    return -(-largest_shard // b)

  def indices(self, epoch: int = 0) -> np.ndarray:
    """This host's dataset indices for `epoch`, in reading order (before padding).

    Args:
      epoch: epoch index.

    Returns:
      int64 indices.
    """
    return shard_indices(
      self.num_examples,
      process_index=self.process_index,
      process_count=self.process_count,
      train=self.train,
      seed=self.seed,
      epoch=epoch,
    )

  def _example(self, index: int, epoch: int) -> tuple[np.ndarray, int]:
    ex = self.source[int(index)]
    if self.train:
      rng = np.random.default_rng([_EXAMPLE_STREAM, self.seed, epoch, int(index)])
      image = preprocess_train(ex["image"], rng, self.image_size)
    else:
      image = preprocess_eval(ex["image"], self.image_size, self.resize_size)
    return image, int(ex["label"])

  def epoch(self, epoch: int, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Batches of one epoch on this host, starting at batch `start_step`.

    Args:
      epoch: epoch index (0-based; selects the order and augmentation when training).
      start_step: first batch to produce (for resuming from a checkpoint).

    Returns:
      An iterator of `{'image', 'label', 'mask'}` numpy dicts.
    """
    steps = self.steps_per_epoch
    if not 0 <= start_step <= steps:
      raise ValueError(f"start_step {start_step} outside [0, {steps}]")
    indices = self.indices(epoch)
    b = self.batch_size
    pool = ThreadPoolExecutor(self.num_threads) if self.num_threads > 0 else None
    fetch: Callable[[int], tuple[np.ndarray, int]] = lambda i: self._example(i, epoch)  # noqa: E731
    try:
      for step in range(start_step, steps):
        chunk = indices[step * b : (step + 1) * b]
        results = list(pool.map(fetch, chunk)) if pool is not None else [fetch(i) for i in chunk]
        images = np.zeros((b, self.image_size, self.image_size, 3), np.float32)
        labels = np.zeros((b,), np.int32)
        mask = np.zeros((b,), np.float32)
        for j, (image, label) in enumerate(results):
          images[j], labels[j], mask[j] = image, label, 1.0
        yield {"image": images, "label": labels, "mask": mask}
    finally:
      if pool is not None:
        pool.shutdown(wait=False, cancel_futures=True)


def imagenet_test_batches(
  data_dir: str | os.PathLike[str] | None = None,
  *,
  batch_size: int = 100,
  limit: int | None = None,
  dataset_name: str = "imagenet2012",
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """(images, labels) batches of the validation split (eval preprocessing), at most `limit`.

  Padding examples of the last batch (`mask == 0`) are dropped.
  """
  pipe = ImageNetPipeline(
    "validation",
    batch_size=batch_size,
    train=False,
    data_dir=data_dir or None,
    dataset_name=dataset_name,
  )
  seen = 0
  for batch in pipe.epoch(0):
    keep = batch["mask"] > 0 if "mask" in batch else slice(None)
    xi, yi = batch["image"][keep], batch["label"][keep]
    if limit is not None:
      xi, yi = xi[: max(limit - seen, 0)], yi[: max(limit - seen, 0)]
    if len(xi) == 0:
      return
    seen += len(xi)
    yield np.asarray(xi, np.float32), np.asarray(yi)
