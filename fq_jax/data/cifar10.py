"""CIFAR-10 from the shared JPEG archive, decoded once and cached.

Source: `../shared/data/cifar10-jpeg.tar.gz` relative to the repository root (see
`../shared/DATA.md`), layout `{train,test}/<class>/NNNN.jpg`. Labels are the indices of the
class folders in alphabetical order, which is the canonical CIFAR-10 order.

Decoding: every JPEG is decoded once with Pillow to uint8 RGB, in sorted member-name order
(deterministic), and the arrays are cached as an uncompressed `.npz` in `cache_dir`
(`$FQ_JAX_CACHE` or `~/.cache/fq_jax`), named after a sha256 prefix of the archive so a
different archive never reuses a stale cache. Decoding all 60,000 32x32 images takes ~5 s on
one core, so it is done in a single process (a process pool would cost more in start-up and
pickling than it saves). Concurrent loaders (e.g. pytest-xdist workers) serialize on a lock
file so the archive is decoded only once, and the cache is written atomically.

Normalization (as the pretrained checkpoints expect): `pixels / 255`, then per channel
`(x - mean) / std` with mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import os
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from fq_jax.data.common import InMemoryDataset, cache_dir, shared_dir

CIFAR10_CLASSES: tuple[str, ...] = (
  "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
CIFAR10_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
CIFAR10_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
_SPLITS = ("train", "test")
_CACHE_VERSION = 1  # bump when the cached layout changes


def default_cifar10_path() -> Path:
  """`<shared>/data/cifar10-jpeg.tar.gz` where `<shared>` is `<repo>/../shared`."""
  return shared_dir() / "data" / "cifar10-jpeg.tar.gz"


def _file_digest(path: Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def cifar10_cache_path(path: str | os.PathLike[str] | None = None) -> Path:
  """The cache file used for the archive at `path`.

  Args:
    path: the JPEG archive (default `default_cifar10_path`).

  Returns:
    `<cache_dir>/cifar10-jpeg-v<version>-<sha256[:16]>.npz`.
  """
  path = Path(path) if path is not None else default_cifar10_path()
  return cache_dir() / f"cifar10-jpeg-v{_CACHE_VERSION}-{_file_digest(path)[:16]}.npz"


def decode_cifar10_archive(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
  """Decodes the JPEG archive (no cache).

  Args:
    path: `.tar.gz` with members `{train,test}/<class>/<name>.jpg`.

  Returns:
    `{'train_images': uint8 (N,32,32,3), 'train_labels': int32 (N,), 'test_images': ...,
    'test_labels': ..., 'class_names': str array}`; images in sorted member-name order.

  Raises:
    ValueError: if the archive lacks a split, or the splits' class folders differ.
  """
  raw: dict[str, bytes] = {}
  with tarfile.open(path) as tar:
    for member in tar:
      parts = member.name.split("/")
      is_jpeg = parts[-1].lower().endswith((".jpg", ".jpeg"))
      if member.isfile() and len(parts) == 3 and parts[0] in _SPLITS and is_jpeg:
        raw[member.name] = tar.extractfile(member).read()
  names = sorted(raw)
  classes = {s: sorted({n.split("/")[1] for n in names if n.startswith(s + "/")}) for s in _SPLITS}
  if not classes["train"] or classes["train"] != classes["test"]:
    raise ValueError(f"{path}: train/test class folders missing or different: {classes}")
  class_index = {c: i for i, c in enumerate(classes["train"])}

  out: dict[str, np.ndarray] = {"class_names": np.array(classes["train"])}
  for split in _SPLITS:
    split_names = [n for n in names if n.startswith(split + "/")]
    # convert('RGB') so that a stray grayscale JPEG still yields three channels.
    images = [np.asarray(Image.open(io.BytesIO(raw[n])).convert("RGB")) for n in split_names]
    out[f"{split}_images"] = np.stack(images).astype(np.uint8)
    out[f"{split}_labels"] = np.array([class_index[n.split("/")[1]] for n in split_names], np.int32)
  return out


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
  lock_path.parent.mkdir(parents=True, exist_ok=True)
  with open(lock_path, "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def load_cifar10_uint8(
  path: str | os.PathLike[str] | None = None, *, use_cache: bool = True
) -> dict[str, np.ndarray]:
  """Decoded CIFAR-10 as uint8, from the cache when possible.

  Args:
    path: the JPEG archive (default `default_cifar10_path`).
    use_cache: read/write the decoded arrays in `cifar10_cache_path`.

  Returns:
    The dict of `decode_cifar10_archive`.

  Raises:
    FileNotFoundError: if the archive does not exist (the message names the path).
  """
  path = Path(path) if path is not None else default_cifar10_path()
  if not path.is_file():
    raise FileNotFoundError(f"CIFAR-10 archive not found: {path} (see ../shared/DATA.md)")
  if not use_cache:
    return decode_cifar10_archive(path)
  cache = cifar10_cache_path(path)
  with _locked(cache.with_suffix(".lock")):
    if not cache.is_file():
      arrays = decode_cifar10_archive(path)
      # Write to a temporary file and rename so a crash never leaves a truncated cache.
      fd, tmp = tempfile.mkstemp(dir=cache.parent, suffix=".npz.tmp")
      with os.fdopen(fd, "wb") as f:
        np.savez(f, **arrays)
      os.chmod(tmp, 0o644)  # mkstemp creates 0600; the cache holds nothing private
      os.replace(tmp, cache)
      return arrays
  with np.load(cache) as data:
    return {k: data[k] for k in data.files}


def normalize_cifar10(images: np.ndarray) -> np.ndarray:
  """uint8 NHWC RGB -> float32, `(x / 255 - mean) / std` per channel.

  Args:
    images: uint8 array `(..., 3)`.

  Returns:
    float32 array of the same shape.
  """
  # Same float32 operation order as torchvision's ToTensor + Normalize.
  x = images.astype(np.float32) / np.float32(255.0)
  return (x - CIFAR10_MEAN) / CIFAR10_STD


def load_cifar10(
  path: str | os.PathLike[str] | None = None, *, use_cache: bool = True
) -> InMemoryDataset:
  """CIFAR-10 train (50,000) and test (10,000) splits, normalized float32 NHWC.

  Args:
    path: the JPEG archive (default `../shared/data/cifar10-jpeg.tar.gz` from the repo).
    use_cache: use the decoded-array cache.

  Returns:
    An `InMemoryDataset` (images `(N, 32, 32, 3)` float32, labels int32).
  """
  arrays = load_cifar10_uint8(path, use_cache=use_cache)
  return InMemoryDataset(
    train=(normalize_cifar10(arrays["train_images"]), arrays["train_labels"]),
    test=(normalize_cifar10(arrays["test_images"]), arrays["test_labels"]),
    class_names=tuple(str(c) for c in arrays["class_names"]),
  )


def cifar10_augment(
  images: np.ndarray, rng: np.random.Generator, *, padding: int = 4
) -> np.ndarray:
  """Standard CIFAR training augmentation: random crop with zero padding and random flip.

  The padding is applied to the *normalized* images with value 0, i.e. the padded border
  has the dataset-mean colour. (torchvision's usual `RandomCrop(32, padding=4)` before
  `Normalize` pads black instead; with normalized arrays in memory, padding with 0 is the
  natural choice and the difference is immaterial for training.)

  Args:
    images: `(B, H, W, C)` batch (any dtype).
    rng: the generator; the result is a deterministic function of its state.
    padding: pixels of padding on each side; crops are `H x W`.

  Returns:
    The augmented batch, same shape and dtype.
  """
  b, h, w, _ = images.shape
  padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  top = rng.integers(0, 2 * padding + 1, size=b)
  left = rng.integers(0, 2 * padding + 1, size=b)
  flip = rng.random(b) < 0.5
  rows = top[:, None] + np.arange(h)
  cols = left[:, None] + np.arange(w)
  cols = np.where(flip[:, None], cols[:, ::-1], cols)  # a flip is a reversed column index
  return padded[np.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]


def cifar10_archive(data_dir: str | os.PathLike[str] | None) -> Path | None:
  """The archive a `data_dir` names: a folder holding `cifar10-jpeg.tar.gz`, or the archive.

  Returns None for None (the loaders then use `default_cifar10_path`).
  """
  if not data_dir:
    return None
  path = Path(data_dir)
  return path / "cifar10-jpeg.tar.gz" if path.is_dir() else path
