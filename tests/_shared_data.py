"""Test helpers for the shared data folder (``../shared`` relative to the repository root).

The shared folder is read-only and may be absent (e.g. on a fresh CI machine): tests that need
it call :func:`require_shared`, which skips with a message naming the missing ``../shared``
path. Decoded CIFAR-10 is memoized per test process (and cached on disk by the library), so
the archive is decoded at most once per machine.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fq_jax.data import load_cifar10_uint8, normalize_cifar10, shared_dir

CIFAR10_ARCHIVE = "data/cifar10-jpeg.tar.gz"
RESNET20_NPZ = "models/resnet20-cifar10.npz"
RESNET56_NPZ = "models/resnet56-cifar10.npz"


def require_shared(relative: str) -> Path:
  """Path of ``../shared/<relative>``; skips the calling test when the file is absent.

  Args:
    relative: path inside the shared folder, e.g. "models/resnet20-cifar10.npz".

  Returns:
    The absolute path.
  """
  path = shared_dir() / relative
  if not path.is_file():
    pytest.skip(f"needs ../shared/{relative} (shared data folder not found at {path})")
  return path


@functools.cache
def cifar10_uint8() -> dict[str, np.ndarray]:
  """Decoded CIFAR-10 (uint8) from the shared archive, memoized for this process."""
  return load_cifar10_uint8(require_shared(CIFAR10_ARCHIVE))


@functools.cache
def cifar10_test_normalized() -> tuple[np.ndarray, np.ndarray]:
  """The normalized CIFAR-10 test split ``(images float32, labels int32)``."""
  arrays = cifar10_uint8()
  return normalize_cifar10(arrays["test_images"]), arrays["test_labels"]


def count_correct(
  model, variables, images: np.ndarray, labels: np.ndarray, batch_size: int = 500
) -> int:
  """Number of correct top-1 predictions, BatchNorm in inference mode, jitted batches.

  Args:
    model: a Flax module taking ``(x, train=False)``.
    variables: its variables.
    images: NHWC images.
    labels: int labels.
    batch_size: evaluation batch size (the last batch may be smaller).

  Returns:
    The count of correct predictions.
  """

  @jax.jit
  def correct(variables, x, y):
    logits = model.apply(variables, x, train=False)
    return jnp.sum(jnp.argmax(logits, -1) == y)

  variables = jax.device_put(variables)  # convert once, not per batch
  total = 0
  for i in range(0, len(images), batch_size):
    total += int(correct(variables, images[i : i + batch_size], labels[i : i + batch_size]))
  return total
