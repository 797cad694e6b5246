"""Datasets: digits (embedded default), CIFAR-10 (shared JPEG archive), ImageNet (tfds).

In-memory datasets (:func:`load_digits`, :func:`load_cifar10`) return an
:class:`InMemoryDataset` whose ``train`` and ``test`` are ``(images float32 NHWC, labels
int32)``; iterate them with :func:`batches` (one pass) or :func:`epoch_batches` (deterministic
in ``(seed, epoch)`` and resumable at ``start_step``). ImageNet streams through
:class:`ImageNetPipeline`.
"""

from __future__ import annotations

from fq_jax.data.cifar10 import (
  CIFAR10_CLASSES,
  CIFAR10_MEAN,
  CIFAR10_STD,
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
  preprocess_eval,
  preprocess_train,
  random_resized_crop_box,
  shard_indices,
)

__all__ = [
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
