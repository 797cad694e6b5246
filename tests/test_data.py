"""Datasets and batching: digits split, CIFAR-10 decode/cache/augment, resumable batches,
ImageNet preprocessing and host sharding (through tfds mock data)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fq_jax import data as data_lib
from fq_jax.data import (
  CIFAR10_CLASSES,
  IMAGENET_MEAN,
  IMAGENET_STD,
  ImageNetPipeline,
  batches,
  cifar10_augment,
  cifar10_cache_path,
  epoch_batches,
  load_cifar10,
  load_cifar10_uint8,
  load_digits,
  normalize_cifar10,
  num_batches,
  preprocess_eval,
  preprocess_train,
  random_resized_crop_box,
  shard_indices,
)
from fq_jax.data import cifar10 as cifar10_module

try:
  from _shared_data import CIFAR10_ARCHIVE, cifar10_uint8, require_shared
except ImportError:  # tests/ imported as a package
  from tests._shared_data import CIFAR10_ARCHIVE, cifar10_uint8, require_shared


# ------------------------------------------------------------------------------------ digits


def test_digits_split_is_fixed_and_stratified() -> None:
  data = load_digits()
  (x_train, y_train), (x_test, y_test) = data.train, data.test
  assert x_train.shape == (1347, 8, 8, 1) and x_test.shape == (450, 8, 8, 1)
  assert x_train.dtype == np.float32 and y_train.dtype == np.int32
  assert 0.0 <= x_train.min() and x_train.max() <= 1.0 and x_train.max() == 1.0
  assert data.num_classes == 10 and data.image_shape == (8, 8, 1)
  # Stratified: every class's share of the test set is within one example of 25%.
  all_counts = np.bincount(np.concatenate([y_train, y_test]), minlength=10)
  test_counts = np.bincount(y_test, minlength=10)
  assert np.all(np.abs(test_counts - 0.25 * all_counts) <= 1)
  # Fixed: a second load gives the identical split.
  again = load_digits()
  np.testing.assert_array_equal(again.test[0], x_test)
  np.testing.assert_array_equal(again.train[1], y_train)
  # A different seed gives a different split (the default is not accidentally unseeded).
  assert not np.array_equal(load_digits(random_state=1).test[1], y_test)


def test_dataset_registry() -> None:
  assert set(data_lib.DATASETS) == {"digits", "cifar10", "imagenet2012"}
  for name, info in data_lib.DATASETS.items():
    assert info.name == name and len(info.input_shape) == 3 and info.num_classes > 1
    assert (info.load is None) != (info.stream is None), name  # in memory or streamed
  digits = data_lib.DATASETS["digits"]
  ds = digits.load(None)
  assert ds.image_shape == digits.input_shape and ds.num_classes == digits.num_classes
  x, y = ds.test
  got = list(digits.test_batches(batch_size=100, limit=250))
  assert [len(b[1]) for b in got] == [100, 100, 50]
  np.testing.assert_array_equal(np.concatenate([b[0] for b in got]), x[:250])
  np.testing.assert_array_equal(np.concatenate([b[1] for b in got]), y[:250])
  assert data_lib.DATASETS["imagenet2012"].input_shape == (224, 224, 3)
  with pytest.raises(ValueError, match="valid: digits, cifar10, imagenet2012"):
    data_lib.get_dataset("mnist")


def test_cifar10_archive_from_data_dir(tmp_path) -> None:
  assert data_lib.cifar10_archive(None) is None
  assert data_lib.cifar10_archive(tmp_path) == tmp_path / "cifar10-jpeg.tar.gz"
  archive = tmp_path / "other.tar.gz"
  assert data_lib.cifar10_archive(archive) == archive


# ---------------------------------------------------------------------------------- batching


def _toy(n: int = 23) -> tuple[np.ndarray, np.ndarray]:
  images = np.arange(n * 4, dtype=np.float32).reshape(n, 2, 2, 1)
  return images, np.arange(n, dtype=np.int32)


def test_batches_cover_dataset_once() -> None:
  images, labels = _toy()
  out = list(batches(images, labels, 5))
  assert [len(b["label"]) for b in out] == [5, 5, 5, 5, 3]
  np.testing.assert_array_equal(np.concatenate([b["label"] for b in out]), labels)
  out = list(batches(images, labels, 5, rng=np.random.default_rng(0), drop_remainder=True))
  assert len(out) == num_batches(23, 5, True) == 4
  seen = np.concatenate([b["label"] for b in out])
  assert len(set(seen.tolist())) == 20
  for b in out:  # images travel with their labels
    np.testing.assert_array_equal(b["image"][:, 0, 0, 0], 4 * b["label"])


def test_batches_deterministic_given_seed() -> None:
  images, labels = _toy()
  noisy = lambda x, rng: x + rng.standard_normal(x.shape).astype(x.dtype)  # noqa: E731
  run = lambda seed: list(
    batches(images, labels, 4, rng=np.random.default_rng(seed), augment=noisy)
  )  # noqa: E731
  a, b, c = run(3), run(3), run(4)
  for x, y in zip(a, b, strict=True):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])
  assert not np.array_equal(a[0]["label"], c[0]["label"])


def test_epoch_batches_resume_reproduces_uninterrupted_epoch() -> None:
  images, labels = _toy(50)
  kwargs = dict(epoch=3, seed=7, augment=lambda x, rng: x * rng.uniform(size=(len(x), 1, 1, 1)))
  full = list(epoch_batches(images, labels, 8, **kwargs))
  assert len(full) == 6
  for start in (0, 1, 4, 6):
    resumed = list(epoch_batches(images, labels, 8, start_step=start, **kwargs))
    assert len(resumed) == len(full) - start
    for x, y in zip(resumed, full[start:], strict=True):
      np.testing.assert_array_equal(x["image"], y["image"])
      np.testing.assert_array_equal(x["label"], y["label"])
  other_epoch = list(epoch_batches(images, labels, 8, epoch=4, seed=7))
  assert not np.array_equal(other_epoch[0]["label"], full[0]["label"])
  with pytest.raises(ValueError, match="start_step"):
    next(epoch_batches(images, labels, 8, epoch=0, seed=0, start_step=7))


# --------------------------------------------------------------------- CIFAR-10 augmentation


def test_cifar10_augment_shapes_determinism_and_crops() -> None:
  images = np.random.default_rng(0).standard_normal((16, 32, 32, 3)).astype(np.float32)
  a = cifar10_augment(images, np.random.default_rng(5))
  b = cifar10_augment(images, np.random.default_rng(5))
  assert a.shape == images.shape and a.dtype == images.dtype
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, cifar10_augment(images, np.random.default_rng(6)))
  # Every output is a (possibly flipped) 32x32 window of the zero-padded input.
  padded = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)))
  for i in range(len(images)):
    windows = [
      w[:, ::-1] if flip else w
      for dy in range(9)
      for dx in range(9)
      for flip in (False, True)
      for w in [padded[i, dy : dy + 32, dx : dx + 32]]
    ]
    assert any(np.array_equal(a[i], w) for w in windows)


# ------------------------------------------------------------------ CIFAR-10 decode and cache


def _jpeg(color: tuple[int, int, int], seed: int) -> bytes:
  rng = np.random.default_rng(seed)
  pixels = np.clip(np.array(color) + rng.integers(-40, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
  return buf.getvalue()


def _make_archive(path: Path) -> dict[str, bytes]:
  files: dict[str, bytes] = {}
  for split, count in (("train", 3), ("test", 2)):
    for c, name in enumerate(("cat", "airplane")):  # written out of order on purpose
      for k in reversed(range(count)):
        files[f"{split}/{name}/{k:04d}.jpg"] = _jpeg((200 * c, 100, 50), seed=len(files))
  with tarfile.open(path, "w:gz") as tar:
    for name, data in files.items():
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return files


def test_cifar10_decode_and_cache_on_synthetic_archive(tmp_path, monkeypatch) -> None:
  monkeypatch.setenv("FQ_JAX_CACHE", str(tmp_path / "cache"))
  archive = tmp_path / "tiny.tar.gz"
  files = _make_archive(archive)

  arrays = load_cifar10_uint8(archive)
  assert list(arrays["class_names"]) == ["airplane", "cat"]  # alphabetical
  assert arrays["train_images"].shape == (6, 32, 32, 3) and arrays["train_images"].dtype == np.uint8
  np.testing.assert_array_equal(arrays["train_labels"], [0, 0, 0, 1, 1, 1])
  np.testing.assert_array_equal(arrays["test_labels"], [0, 0, 1, 1])
  # Sorted member order: test index 3 is test/cat/0001.jpg.
  direct = np.asarray(Image.open(io.BytesIO(files["test/cat/0001.jpg"])).convert("RGB"))
  np.testing.assert_array_equal(arrays["test_images"][3], direct)

  cache = cifar10_cache_path(archive)
  assert cache.is_file() and cache.parent == tmp_path / "cache"

  def no_decode(path):  # a second load must come from the cache
    raise AssertionError("archive decoded again")

  monkeypatch.setattr(cifar10_module, "decode_cifar10_archive", no_decode)
  again = load_cifar10_uint8(archive)
  for key in arrays:
    np.testing.assert_array_equal(again[key], arrays[key])

  data = load_cifar10(archive)
  assert data.class_names == ("airplane", "cat")
  np.testing.assert_allclose(
    data.test[0][3, 0, 0],
    (direct[0, 0] / 255.0 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225],
    rtol=1e-6,
  )


def test_cifar10_missing_archive_is_reported(tmp_path) -> None:
  with pytest.raises(FileNotFoundError, match="nope.tar.gz"):
    load_cifar10_uint8(tmp_path / "nope.tar.gz")


def test_cifar10_shared_archive_decodes_like_pillow() -> None:
  archive = require_shared(CIFAR10_ARCHIVE)
  arrays = cifar10_uint8()
  assert tuple(arrays["class_names"]) == CIFAR10_CLASSES
  assert arrays["train_images"].shape == (50_000, 32, 32, 3)
  assert arrays["test_images"].shape == (10_000, 32, 32, 3)
  np.testing.assert_array_equal(np.bincount(arrays["train_labels"]), [5000] * 10)
  np.testing.assert_array_equal(np.bincount(arrays["test_labels"]), [1000] * 10)
  assert cifar10_cache_path(archive).is_file()

  # Spot check against a direct Pillow decode: in sorted order, test image 1000 c + k is
  # test/<class c>/<k-th file>, and the files are named 0000.jpg .. 0999.jpg.
  picks = {"test/airplane/0000.jpg": 0, "test/cat/0123.jpg": 3123, "test/truck/0999.jpg": 9999}
  with tarfile.open(archive) as tar:
    for member in tar:
      if member.name in picks:
        direct = np.asarray(Image.open(tar.extractfile(member)).convert("RGB"))
        np.testing.assert_array_equal(arrays["test_images"][picks[member.name]], direct)
        picks[member.name] = -1
  assert set(picks.values()) == {-1}

  x = normalize_cifar10(arrays["test_images"][:100])
  assert x.dtype == np.float32 and abs(float(x.mean())) < 1.0


# ------------------------------------------------------------------------------------ ImageNet


def test_random_resized_crop_box_in_bounds() -> None:
  rng = np.random.default_rng(0)
  for height, width in [(7, 11), (500, 375), (64, 640), (224, 224)]:
    for _ in range(50):
      top, left, h, w = random_resized_crop_box(height, width, rng)
      assert 0 <= top and top + h <= height and 0 < h
      assert 0 <= left and left + w <= width and 0 < w


def test_preprocess_shapes_and_normalization() -> None:
  image = np.full((300, 400, 3), 128, np.uint8)
  expected = (128 / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
  out = preprocess_eval(image)
  assert out.shape == (224, 224, 3) and out.dtype == np.float32
  np.testing.assert_allclose(out, np.broadcast_to(expected, out.shape), rtol=1e-5)
  out = preprocess_train(image, np.random.default_rng(0))
  np.testing.assert_allclose(out, np.broadcast_to(expected, out.shape), rtol=1e-5)
  gray = preprocess_eval(np.zeros((40, 30, 1), np.uint8), image_size=16, resize_size=20)
  assert gray.shape == (16, 16, 3)


def test_shard_indices_partition() -> None:
  n, p = 103, 4
  train = [
    shard_indices(n, process_index=i, process_count=p, train=True, seed=1, epoch=2)
    for i in range(p)
  ]
  assert all(len(s) == n // p for s in train)
  assert len(set(np.concatenate(train).tolist())) == p * (n // p)  # disjoint
  assert not np.array_equal(
    train[0], shard_indices(n, process_index=0, process_count=p, train=True, seed=1, epoch=3)
  )
  evals = [shard_indices(n, process_index=i, process_count=p, train=False) for i in range(p)]
  assert sorted(np.concatenate(evals).tolist()) == list(range(n))  # a partition
  with pytest.raises(ValueError):
    shard_indices(n, process_index=4, process_count=4, train=False)


@pytest.fixture(scope="module")
def mock_imagenet():
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=10, policy=tfds.testing.MockPolicy.USE_CODE):
    yield


def test_imagenet_pipeline_train(mock_imagenet) -> None:
  pipe = ImageNetPipeline(
    "train", batch_size=4, seed=3, process_index=0, process_count=1, image_size=32
  )
  assert pipe.train and pipe.num_examples == 10 and pipe.steps_per_epoch == 2
  full = list(pipe.epoch(0))
  assert len(full) == 2
  for batch in full:
    assert batch["image"].shape == (4, 32, 32, 3) and batch["image"].dtype == np.float32
    assert batch["label"].dtype == np.int32 and np.all(
      (0 <= batch["label"]) & (batch["label"] < 1000)
    )
    np.testing.assert_array_equal(batch["mask"], np.ones(4))
    assert np.all(np.isfinite(batch["image"]))
    # Normalized range: (0 - mean) / std .. (1 - mean) / std.
    assert batch["image"].min() >= -2.2 and batch["image"].max() <= 2.7
  # Resume reproduces the uninterrupted epoch, also with threads.
  threaded = ImageNetPipeline(
    "train", batch_size=4, seed=3, process_index=0, process_count=1, image_size=32, num_threads=2
  )
  resumed = list(threaded.epoch(0, start_step=1))
  assert len(resumed) == 1
  np.testing.assert_array_equal(resumed[0]["image"], full[1]["image"])
  np.testing.assert_array_equal(resumed[0]["label"], full[1]["label"])
  # Another epoch: another order.
  assert not np.array_equal(pipe.indices(1), pipe.indices(0))


def test_imagenet_pipeline_eval_sharded(mock_imagenet) -> None:
  hosts = [
    ImageNetPipeline(
      "validation", batch_size=2, process_index=i, process_count=3, image_size=24, resize_size=28
    )
    for i in range(3)
  ]
  assert not hosts[0].train
  steps = {h.steps_per_epoch for h in hosts}
  assert steps == {2}  # ceil(ceil(10 / 3) / 2): the same on every host
  seen = []
  total = 0.0
  for h in hosts:
    out = list(h.epoch(0))
    assert len(out) == 2
    for batch in out:
      assert batch["image"].shape == (2, 24, 24, 3)
      total += float(batch["mask"].sum())
      # Padding examples are all-zero with mask 0.
      assert np.all(batch["image"][batch["mask"] == 0] == 0)
    seen.extend(h.indices().tolist())
  assert total == 10.0
  assert sorted(seen) == list(range(10))
  # Eval is deterministic: centre crops, no randomness.
  np.testing.assert_array_equal(next(hosts[1].epoch(0))["image"], next(hosts[1].epoch(5))["image"])
