"""The datasets of `fq_jax.data` behind one small interface for the training loop.

`DataSource.train_epoch(epoch, start_step)` yields this host's numpy batches
of one training epoch, a pure function of (seed, epoch), resumable at any
step; `eval_batches()` yields padded test batches with a 0/1 'mask' so every
batch has the same shape (one compilation) and every example counts once.
`DataSource.to_device(batches, sharding)` puts them on the devices.

Digits and CIFAR-10 batches are float32, normalized on the host. ImageNet
batches come from grain worker processes (`GrainImageNetLoader`) as uint8,
two of them prefetched onto the devices; `normalizing(step)` makes a train or
eval step normalize uint8 images first, inside the jit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from fq_jax import data as data_lib
from fq_jax.data import imagenet_grain
from fq_jax.pipeline import sharding as sharding_lib
from fq_jax.pipeline.configuration import ConfigError

Batch = dict[str, np.ndarray]


@dataclasses.dataclass
class DataSource:
  """What the loop needs from a dataset (see module docstring).

  Attributes:
    name: dataset name.
    num_classes: number of classes.
    image_shape: (H, W, C) of the model input.
    steps_per_epoch: training batches per epoch (all hosts run as many).
    eval_steps: test batches per evaluation.
  """

  name: str
  num_classes: int
  image_shape: tuple[int, ...]
  steps_per_epoch: int
  eval_steps: int

  def train_epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
    raise NotImplementedError

  def eval_batches(self) -> Iterator[Batch]:
    raise NotImplementedError

  def to_device(self, batches: Iterable[Batch], sharding) -> Iterator[dict[str, jax.Array]]:
    """Host batches -> global arrays sharded along the batch axis, one at a time."""
    for batch in batches:
      yield sharding_lib.put_batch(batch, sharding)


def normalize_batch(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """ImageNet-normalizes uint8 images (float32 out); float images pass unchanged.

  Called inside the jitted steps (the dtype is static there), so uint8 images
  cross to the devices and are normalized on them.
  """
  if batch["image"].dtype != jnp.uint8:
    return batch
  return {**batch, "image": imagenet_grain.normalize(batch["image"])}


def normalizing(step: Callable) -> Callable:
  """`step(x, batch)` (a train or eval step) that first applies `normalize_batch`."""

  def normalized_step(x, batch):
    return step(x, normalize_batch(batch))

  return normalized_step


def _cap(natural: int, cap: int) -> int:
  return natural if cap is None or cap < 0 else min(natural, cap)


class InMemorySource(DataSource):
  """Digits or CIFAR-10 held in host memory."""

  def __init__(
    self,
    name,
    dataset: data_lib.InMemoryDataset,
    *,
    batch_size: int,
    eval_batch_size: int,
    seed: int,
    augment=None,
    steps_per_epoch_cap: int = -1,
    eval_steps_cap: int = -1,
  ):
    self.dataset = dataset
    self.batch_size = batch_size
    self.eval_batch_size = eval_batch_size
    self.seed = seed
    self.augment = augment
    natural = data_lib.num_batches(len(dataset.train[0]), batch_size, drop_remainder=True)
    if natural == 0:
      raise ConfigError(
        "batch_size", f"{batch_size} exceeds the {len(dataset.train[0])} training examples"
      )
    eval_natural = data_lib.num_batches(len(dataset.test[0]), eval_batch_size, drop_remainder=False)
    super().__init__(
      name=name,
      num_classes=dataset.num_classes,
      image_shape=dataset.image_shape,
      steps_per_epoch=_cap(natural, steps_per_epoch_cap),
      eval_steps=_cap(eval_natural, eval_steps_cap),
    )

  def train_epoch(self, epoch, start_step=0):
    x, y = self.dataset.train
    rows = sharding_lib.host_slice(self.batch_size)
    it = data_lib.epoch_batches(
      x,
      y,
      self.batch_size,
      epoch=epoch,
      seed=self.seed,
      start_step=start_step,
      augment=self.augment,
    )
    for _, batch in zip(range(start_step, self.steps_per_epoch), it):
      yield {k: v[rows] for k, v in batch.items()}

  def eval_batches(self):
    x, y = self.dataset.test
    b = self.eval_batch_size
    rows = sharding_lib.host_slice(b)
    for i in range(self.eval_steps):
      xi, yi = x[i * b : (i + 1) * b], y[i * b : (i + 1) * b]
      pad = b - len(xi)
      # Pad to the fixed batch shape; padded rows have mask 0 and do not count.
      batch = {
        "image": np.concatenate([xi, np.zeros((pad, *xi.shape[1:]), xi.dtype)]),
        "label": np.concatenate([yi, np.zeros((pad,), yi.dtype)]),
        "mask": np.concatenate([np.ones(len(xi), np.float32), np.zeros(pad, np.float32)]),
      }
      yield {k: v[rows] for k, v in batch.items()}


class ImageNetSource(DataSource):
  """ImageNet (or any tfds image classification set) through `GrainImageNetLoader`.

  Batches hold uint8 images (a quarter of float32's bytes), decoded in
  `dataset.num_workers` grain processes (0: in this process); `to_device`
  keeps two batches in flight to the devices.
  """

  PREFETCH = 2  # batches on the devices ahead of the step

  def __init__(self, config, *, num_classes: int = 1000):
    d = config.dataset
    per_host = config.batch_size // jax.process_count()
    per_host_eval = config.eval_batch_size // jax.process_count()
    common = dict(
      seed=config.seed,
      data_dir=d.data_dir or None,
      dataset_name=d.name,
      image_size=d.image_size,
      resize_size=d.resize_size,
      num_workers=d.num_workers,
    )
    self.train_loader = imagenet_grain.GrainImageNetLoader(
      d.train_split, batch_size=per_host, train=True, **common
    )
    self.eval_loader = imagenet_grain.GrainImageNetLoader(
      d.eval_split, batch_size=per_host_eval, train=False, **common
    )
    super().__init__(
      name=d.name,
      num_classes=num_classes,
      image_shape=(d.image_size, d.image_size, 3),
      steps_per_epoch=_cap(self.train_loader.steps_per_epoch, config.steps_per_epoch),
      eval_steps=_cap(self.eval_loader.steps_per_epoch, config.eval_steps),
    )

  def train_epoch(self, epoch, start_step=0):
    it = self.train_loader.epoch(epoch, start_step=start_step)
    for _, batch in zip(range(start_step, self.steps_per_epoch), it):
      yield {k: v for k, v in batch.items() if k != "mask"}

  def eval_batches(self):
    for _, batch in zip(range(self.eval_steps), self.eval_loader.epoch(0)):
      yield batch

  def to_device(self, batches, sharding):
    return imagenet_grain.prefetch_to_device(batches, self.PREFETCH, sharding)


def make_source(config) -> DataSource:
  """The config's dataset (`dataset.name`, a name of `fq_jax.data.DATASETS`).

  In-memory datasets (`DatasetInfo.load`) are loaded from `dataset.data_dir`
  ("" = the dataset's default) and augmented with the registry's augmentation
  when `dataset.augment` is set; streamed ones (ImageNet) go through tfds.
  """
  name = config.dataset.name
  try:
    info = data_lib.get_dataset(name)
  except ValueError as e:
    raise ConfigError("dataset.name", str(e)) from None
  if info.load is None:
    return ImageNetSource(config, num_classes=info.num_classes)
  try:
    dataset = info.load(config.dataset.data_dir or None)
  except FileNotFoundError as e:
    raise ConfigError("dataset.data_dir", str(e)) from None
  augment = info.augment if config.dataset.augment else None
  return InMemorySource(
    name,
    dataset,
    augment=augment,
    batch_size=config.batch_size,
    eval_batch_size=config.eval_batch_size,
    seed=config.seed,
    steps_per_epoch_cap=config.steps_per_epoch,
    eval_steps_cap=config.eval_steps,
  )
