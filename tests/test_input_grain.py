"""The grain ImageNet loader against the current pipeline (fq_jax.data.imagenet) as oracle.

Photos: crops of scikit-learn's bundled sample photos, JPEG-encoded in memory (plus a
grayscale JPEG and a PNG), so decoding and resampling see real image statistics.
"""

import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_sample_images

from fq_jax.data import imagenet as current
from fq_jax.data import imagenet_grain as grain_input


def _jpeg(array: np.ndarray, fmt: str = "JPEG") -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
  return buf.getvalue()


@pytest.fixture(scope="module")
def photos() -> list[bytes]:
  rng = np.random.default_rng(0)
  out = []
  for k, image in enumerate(load_sample_images().images * 6):  # 12 crops, 2 photos
    h, w = ((375, 500), (500, 375), (200, 300))[k % 3]
    h, w = min(h, image.shape[0]), min(w, image.shape[1])
    t, l = rng.integers(0, image.shape[0] - h + 1), rng.integers(0, image.shape[1] - w + 1)
    out.append(_jpeg(image[t : t + h, l : l + w]))
  gray = load_sample_images().images[0][:300, :400].mean(-1).astype(np.uint8)
  out.append(_jpeg(gray))
  out.append(_jpeg(load_sample_images().images[1][:250, :330], "PNG"))
  return out


def _decoded(data: bytes) -> np.ndarray:
  return np.asarray(Image.open(io.BytesIO(data)))  # what tfds' default decoding gives


def test_full_decode_gives_the_current_training_pixels(photos):
  for k, data in enumerate(photos):
    want = current.preprocess_train(_decoded(data), np.random.default_rng(k))
    got = grain_input.decode_train(data, np.random.default_rng(k), draft=False)
    assert got.dtype == np.uint8 and got.shape == (224, 224, 3)
    np.testing.assert_array_equal(current._normalize(got), want, err_msg=str(k))


def test_full_decode_gives_the_current_eval_pixels(photos):
  for data in photos:
    want = current.preprocess_eval(_decoded(data))
    np.testing.assert_array_equal(
      current._normalize(grain_input.decode_eval(data, draft=False)), want
    )


def test_draft_decodes_at_reduced_scale_and_keeps_the_pixels_close():
  big = np.asarray(
    Image.fromarray(load_sample_images().images[0]).resize((1280, 854), Image.BILINEAR)
  )
  data = _jpeg(big)
  image = Image.open(io.BytesIO(data))
  assert grain_input._draft(image, (300, 300)) == 2.0 and image.size == (640, 427)
  scaled = 0
  for k in range(16):
    rng = np.random.default_rng(k)
    _, _, h, w = current.random_resized_crop_box(854, 1280, rng)
    scaled += min(h, w) >= 2 * 224  # crops this large decode at 1/2 or less
    full = grain_input.decode_train(data, np.random.default_rng(k), draft=False)
    fast = grain_input.decode_train(data, np.random.default_rng(k), draft=True)
    # Same box and flip (a wrong box or flip would differ by tens of levels on a photo).
    assert np.abs(full.astype(int) - fast.astype(int)).mean() < 2.0, k
  assert scaled > 0
  full, fast = grain_input.decode_eval(data, draft=False), grain_input.decode_eval(data)
  assert np.abs(full.astype(int) - fast.astype(int)).mean() < 2.0


def test_normalize_matches_the_current_normalization():
  x = np.random.default_rng(0).integers(0, 256, (2, 5, 5, 3), dtype=np.uint8)
  got = jax.jit(grain_input.normalize)(x)
  np.testing.assert_allclose(np.asarray(got), current._normalize(x), rtol=1e-6, atol=1e-6)
  assert grain_input.normalize(x, jnp.bfloat16).dtype == jnp.bfloat16


def _source(photos):
  return [{"image": data, "label": k % 5} for k, data in enumerate(photos)]


@pytest.mark.parametrize("train", [True, False])
def test_loader_gives_the_current_pipelines_batches_and_resumes(photos, train):
  kw = dict(batch_size=4, train=train, seed=7, image_size=64, resize_size=72)
  for p in range(2):  # two hosts
    hosts = dict(process_index=p, process_count=2)
    decoded = [{"image": _decoded(e["image"]), "label": e["label"]} for e in _source(photos)]
    old = current.ImageNetPipeline(source=decoded, **kw, **hosts)
    new = grain_input.GrainImageNetLoader(source=_source(photos), draft=False, **kw, **hosts)
    assert new.steps_per_epoch == old.steps_per_epoch
    np.testing.assert_array_equal(new.indices(3), old.indices(3))
    want = list(old.epoch(3))
    got = list(new.epoch(3))
    assert len(got) == len(want) == new.steps_per_epoch
    for a, b in zip(want, got, strict=True):
      assert b["image"].dtype == np.uint8
      np.testing.assert_array_equal(b["mask"], a["mask"])
      real = a["mask"] == 1  # padding rows are zeros in either space; only the mask matters
      np.testing.assert_array_equal(current._normalize(b["image"][real]), a["image"][real])
      np.testing.assert_array_equal(b["label"], a["label"])
    resumed = list(new.epoch(3, start_step=1))
    for a, b in zip(got[1:], resumed, strict=True):
      np.testing.assert_array_equal(a["image"], b["image"])


def test_worker_processes_give_the_same_batches(photos):
  kw = dict(batch_size=3, seed=1, image_size=48, process_index=0, process_count=1)
  inline = grain_input.GrainImageNetLoader("train", source=_source(photos), **kw)
  workers = grain_input.GrainImageNetLoader("train", source=_source(photos), num_workers=2, **kw)
  want = list(inline.epoch(0, start_step=1))
  got = list(workers.epoch(0, start_step=1))
  assert len(got) == len(want) == inline.steps_per_epoch - 1
  for a, b in zip(want, got, strict=True):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_prefetch_to_device_keeps_order_and_values():
  batches = [{"image": np.full((2, 3), i, np.uint8), "label": np.arange(2) + i} for i in range(5)]
  out = list(grain_input.prefetch_to_device(iter(batches), size=2))
  assert len(out) == 5
  for a, b in zip(batches, out, strict=True):
    assert isinstance(b["image"], jax.Array)
    np.testing.assert_array_equal(np.asarray(b["image"]), a["image"])
    np.testing.assert_array_equal(np.asarray(b["label"]), a["label"])


def test_reads_a_tfds_array_record_dataset(photos, tmp_path):
  examples = [(data, k % 5) for k, data in enumerate(photos[:6])]
  name = grain_input.write_jpeg_dataset(tmp_path, {"validation": examples}, num_classes=5)
  loader = grain_input.GrainImageNetLoader(
    "validation",
    batch_size=6,
    dataset_name=name,
    data_dir=tmp_path,
    image_size=32,
    resize_size=40,
    process_index=0,
    process_count=1,
  )
  (batch,) = list(loader.epoch(0))
  # tfds stores its own order: match examples by content.
  want = {(grain_input.decode_eval(d, 32, 40).tobytes(), label) for d, label in examples}
  got = {(image.tobytes(), int(label)) for image, label in zip(batch["image"], batch["label"])}
  assert got == want and batch["mask"].sum() == 6
