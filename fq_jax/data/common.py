"""Pieces shared by the datasets: the in-memory dataset container, deterministic batching and
the location of the shared data folder.

Determinism and resumption: `epoch_batches` derives everything random in an epoch from
`(seed, epoch)` (the example order) and `(seed, epoch, step)` (the augmentation of one
batch), never from the state of a generator carried across batches. Starting an epoch at
`start_step=k` therefore yields exactly the batches `k, k+1, ...` of the uninterrupted
epoch, which is what a run restored from a checkpoint needs.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

# augment(images_batch, rng) -> augmented batch of the same shape.
Augment = Callable[[np.ndarray, np.random.Generator], np.ndarray]

# Stream tags keep the permutation and augmentation generators statistically independent
# even though both are derived from the same (seed, epoch).
_PERMUTATION_STREAM = 0
_AUGMENT_STREAM = 1


@dataclasses.dataclass(frozen=True)
class InMemoryDataset:
  """A labelled image dataset held in memory as numpy arrays.

  Attributes:
    train: `(images float32 NHWC, labels int32)` of the training split.
    test: the same for the test split.
    class_names: label `i` is `class_names[i]`.
  """

  train: tuple[np.ndarray, np.ndarray]
  test: tuple[np.ndarray, np.ndarray]
  class_names: tuple[str, ...]

  @property
  def num_classes(self) -> int:
    """Number of classes."""
    return len(self.class_names)

  @property
  def image_shape(self) -> tuple[int, ...]:
    """Shape `(H, W, C)` of one image."""
    return tuple(self.train[0].shape[1:])


def repo_root() -> Path:
  """The repository root (the folder that contains the `fq_jax` package)."""
  return Path(__file__).resolve().parents[2]


def shared_dir() -> Path:
  """The shared, read-only data folder: `$FQ_JAX_SHARED` if set, else `<repo>/../shared`."""
  env = os.environ.get("FQ_JAX_SHARED")
  return Path(env) if env else repo_root().parent / "shared"


def cache_dir() -> Path:
  """Where decoded datasets are cached: `$FQ_JAX_CACHE` if set, else `~/.cache/fq_jax`."""
  env = os.environ.get("FQ_JAX_CACHE")
  return Path(env).expanduser() if env else Path.home() / ".cache" / "fq_jax"


def num_batches(num_examples: int, batch_size: int, drop_remainder: bool) -> int:
  """Number of batches in one pass.

  Args:
    num_examples: dataset size.
    batch_size: examples per batch.
    drop_remainder: whether a final partial batch is dropped.

  Returns:
    The batch count.
  """
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  return num_examples // batch_size if drop_remainder else -(-num_examples // batch_size)


def epoch_permutation(num_examples: int, *, seed: int, epoch: int) -> np.ndarray:
  """The example order of one epoch, a pure function of `(seed, epoch)`.

  Args:
    num_examples: dataset size.
    seed: run seed.
    epoch: epoch index (0-based).

  Returns:
    int64 permutation of `range(num_examples)`.
  """
  rng = np.random.default_rng([_PERMUTATION_STREAM, seed, epoch])
  return rng.permutation(num_examples)


def step_rng(*, seed: int, epoch: int, step: int) -> np.random.Generator:
  """The augmentation generator of one batch, a pure function of `(seed, epoch, step)`.

  Args:
    seed: run seed.
    epoch: epoch index.
    step: batch index within the epoch.

  Returns:
    A fresh generator.
  """
  return np.random.default_rng([_AUGMENT_STREAM, seed, epoch, step])


def _take(
  images: np.ndarray,
  labels: np.ndarray,
  order: np.ndarray,
  batch_size: int,
  step: int,
  augment: Augment | None,
  rng: np.random.Generator | None,
) -> dict[str, np.ndarray]:
  idx = order[step * batch_size : (step + 1) * batch_size]
  x = images[idx]
  if augment is not None:
    if rng is None:
      raise ValueError("augment needs a random generator (pass rng or use epoch_batches)")
    x = augment(x, rng)
  return {"image": x, "label": labels[idx]}


def batches(
  images: np.ndarray,
  labels: np.ndarray,
  batch_size: int,
  *,
  rng: np.random.Generator | None = None,
  drop_remainder: bool = False,
  augment: Augment | None = None,
) -> Iterator[dict[str, np.ndarray]]:
  """One pass over an in-memory dataset.

  With `rng` the examples are shuffled by `rng.permutation` and `augment` draws from
  the same generator, so the output is a deterministic function of the generator's seed.
  Without `rng` the order is the stored one (evaluation). For resumable training use
  `epoch_batches`.

  Args:
    images: `(N, ...)` array.
    labels: `(N,)` array.
    batch_size: examples per batch.
    rng: shuffling/augmentation generator, or None for the stored order.
    drop_remainder: drop a final partial batch (keeps shapes static under jit).
    augment: `augment(batch_images, rng) -> batch_images`, applied per batch.

  Returns:
    An iterator of `{'image': ..., 'label': ...}` numpy dicts.
  """
  n = len(images)
  if len(labels) != n:
    raise ValueError(f"{n} images but {len(labels)} labels")
  order = rng.permutation(n) if rng is not None else np.arange(n)
  for step in range(num_batches(n, batch_size, drop_remainder)):
    yield _take(images, labels, order, batch_size, step, augment, rng)


def epoch_batches(
  images: np.ndarray,
  labels: np.ndarray,
  batch_size: int,
  *,
  epoch: int,
  seed: int,
  start_step: int = 0,
  shuffle: bool = True,
  drop_remainder: bool = True,
  augment: Augment | None = None,
) -> Iterator[dict[str, np.ndarray]]:
  """The batches of one training epoch, resumable at any step.

  The order is `epoch_permutation` `(seed, epoch)` and batch `k` is augmented with
  `step_rng` `(seed, epoch, k)`, so `epoch_batches(..., start_step=k)` yields the
  same batches as skipping the first `k` of an uninterrupted epoch, without computing them.

  Args:
    images: `(N, ...)` array.
    labels: `(N,)` array.
    batch_size: examples per batch.
    epoch: epoch index (0-based).
    seed: run seed.
    start_step: index of the first batch to yield (0 <= start_step <= batches per epoch).
    shuffle: permute the examples (False: stored order).
    drop_remainder: drop a final partial batch.
    augment: `augment(batch_images, rng) -> batch_images`.

  Returns:
    An iterator of `{'image': ..., 'label': ...}` numpy dicts.
  """
  n = len(images)
  if len(labels) != n:
    raise ValueError(f"{n} images but {len(labels)} labels")
  steps = num_batches(n, batch_size, drop_remainder)
  if not 0 <= start_step <= steps:
    raise ValueError(f"start_step {start_step} outside [0, {steps}]")
  order = epoch_permutation(n, seed=seed, epoch=epoch) if shuffle else np.arange(n)
  for step in range(start_step, steps):
    rng = step_rng(seed=seed, epoch=epoch, step=step) if augment is not None else None
    yield _take(images, labels, order, batch_size, step, augment, rng)
