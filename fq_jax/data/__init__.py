"""Datasets: digits (embedded default), CIFAR-10 (shared JPEG archive), ImageNet (tfds).

In-memory datasets (`load_digits`, `load_cifar10`) return an
`InMemoryDataset` whose `train` and `test` are `(images float32 NHWC, labels
int32)`; iterate them with `batches` (one pass) or `epoch_batches` (deterministic
in `(seed, epoch)` and resumable at `start_step`). ImageNet streams through
`ImageNetPipeline`.

`DATASETS` is the one registry of datasets by name: input shape, class count and how to
load the splits. To add a dataset: write its loader module here and add one
`DatasetInfo` to `DATASETS`.
"""

from __future__ import annotations

import dataclasses
import os
import types
from collections.abc import Callable, Iterator, Mapping

import numpy as np

from fq_jax.data.cifar10 import (
  CIFAR10_CLASSES,
  CIFAR10_MEAN,
  CIFAR10_STD,
  cifar10_archive,
  cifar10_augment,
  cifar10_cache_path,
  decode_cifar10_archive,
  default_cifar10_path,
  load_cifar10,
  load_cifar10_uint8,
  normalize_cifar10,
)
from fq_jax.data.common import (
  Augment,
  InMemoryDataset,
  batches,
  cache_dir,
  epoch_batches,
  epoch_permutation,
  num_batches,
  repo_root,
  shared_dir,
  step_rng,
)
from fq_jax.data.digits import load_digits
from fq_jax.data.imagenet import (
  IMAGENET_MEAN,
  IMAGENET_STD,
  ImageNetPipeline,
  imagenet_test_batches,
  preprocess_eval,
  preprocess_train,
  random_resized_crop_box,
  shard_indices,
)

DataDir = str | os.PathLike[str] | None
Batches = Iterator[tuple[np.ndarray, np.ndarray]]


@dataclasses.dataclass(frozen=True, kw_only=True)
class DatasetInfo:
  """A dataset by name: what a model of it takes and how to load it.

  Attributes:
    name: registry name (also what `.fqz` metadata and configs write).
    input_shape: (H, W, C) of one preprocessed image.
    num_classes: number of labels.
    load: `load(data_dir) -> InMemoryDataset` with both splits, for datasets held in
      memory; None for streamed ones (ImageNet: use `stream`).
    stream: `stream(split, **ImageNetPipeline kwargs)` for streamed datasets, else None.
    augment: the standard training augmentation of an in-memory dataset, or None.
    data_dir: what `data_dir` means for this dataset (for messages and docs).
  """

  name: str
  input_shape: tuple[int, int, int]
  num_classes: int
  load: Callable[[DataDir], InMemoryDataset] | None = None
  stream: Callable[..., ImageNetPipeline] | None = None
  augment: Augment | None = None
  data_dir: str = ""

  def test_batches(
    self, data_dir: DataDir = None, *, batch_size: int = 100, limit: int | None = None
  ) -> Batches:
    """(images, labels) batches of the test split, at most `limit` examples, in order."""
    if self.load is None:
      yield from imagenet_test_batches(
        data_dir, batch_size=batch_size, limit=limit, dataset_name=self.name
      )
      return
    x, y = self.load(data_dir).test
    if limit is not None:
      x, y = x[:limit], y[:limit]
    for i in range(0, len(x), batch_size):
      yield x[i : i + batch_size], y[i : i + batch_size]


def _stream_imagenet(split: str, **kwargs) -> ImageNetPipeline:
  return ImageNetPipeline(split, dataset_name="imagenet2012", **kwargs)


DATASETS: Mapping[str, DatasetInfo] = types.MappingProxyType(
  {
    "digits": DatasetInfo(
      name="digits",
      input_shape=(8, 8, 1),
      num_classes=10,
      load=lambda data_dir: load_digits(),
      data_dir="unused (scikit-learn ships the data)",
    ),
    "cifar10": DatasetInfo(
      name="cifar10",
      input_shape=(32, 32, 3),
      num_classes=10,
      load=lambda data_dir: load_cifar10(cifar10_archive(data_dir)),
      augment=cifar10_augment,
      data_dir="a folder holding cifar10-jpeg.tar.gz, or the archive itself",
    ),
    "imagenet2012": DatasetInfo(
      name="imagenet2012",
      input_shape=(224, 224, 3),
      num_classes=1000,
      stream=_stream_imagenet,
      data_dir="the tfds data_dir",
    ),
  }
)
DATASET_NAMES: tuple[str, ...] = tuple(DATASETS)


def get_dataset(name: str) -> DatasetInfo:
  """`DATASETS[name]`, with a one-line ValueError listing the names for an unknown one."""
  try:
    return DATASETS[name]
  except KeyError:
    raise ValueError(f"unknown dataset {name!r} (valid: {', '.join(DATASET_NAMES)})") from None


__all__ = [
  "DATASETS",
  "DATASET_NAMES",
  "DatasetInfo",
  "get_dataset",
  "cifar10_archive",
  "imagenet_test_batches",
  "CIFAR10_CLASSES",
  "CIFAR10_MEAN",
  "CIFAR10_STD",
  "IMAGENET_MEAN",
  "IMAGENET_STD",
  "Augment",
  "ImageNetPipeline",
  "InMemoryDataset",
  "batches",
  "cache_dir",
  "cifar10_augment",
  "cifar10_cache_path",
  "decode_cifar10_archive",
  "default_cifar10_path",
  "epoch_batches",
  "epoch_permutation",
  "load_cifar10",
  "load_cifar10_uint8",
  "load_digits",
  "normalize_cifar10",
  "num_batches",
  "preprocess_eval",
  "preprocess_train",
  "random_resized_crop_box",
  "repo_root",
  "shard_indices",
  "shared_dir",
  "step_rng",
]
