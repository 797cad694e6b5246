"""ImageNet through grain: JPEG bytes in worker processes, uint8 batches out, 2 on the devices.

The fast counterpart of :class:`fq_jax.data.imagenet.ImageNetPipeline`, with the same
examples, order, sharding and augmentation draws:

* reading: ``tfds.data_source(..., decoders={'image': SkipDecoding()})`` over the
  ``array_record`` files gives the stored JPEG bytes, so decoding happens once, here;
* decoding does the least work: the crop box is drawn from the image size in the JPEG header
  (torchvision's ``RandomResizedCrop.get_params``, same generator draws as the current
  pipeline), then Pillow's ``draft`` decodes at the smallest DCT scale 1/1, 1/2, 1/4 or 1/8
  that still leaves at least ``image_size`` pixels across the crop, and the crop is resampled
  (bilinear, antialiased) to ``image_size`` straight from that. Eval decodes at the smallest
  scale that keeps the shorter side >= 256. ``draft=False`` decodes at full size and then
  gives exactly the current pipeline's pixels;
* workers: a grain ``MapDataset`` of this host's positions in the epoch, mapped to examples,
  batched, and run by ``mp_prefetch`` in ``num_workers`` processes. Whole batches are built
  in the workers and come back in order, so the batches do not depend on the worker count;
* order and sharding: the index sampler of the current pipeline
  (:func:`fq_jax.data.imagenet.shard_indices`): a global permutation seeded by
  ``(seed, epoch)``, host ``i`` of ``P`` takes ``perm[i::P][:N // P]``; evaluation takes
  ``i::P`` in order, padded with ``mask == 0`` examples to equal step counts;
* resume: ``epoch(e, start_step=k)`` slices the batched dataset at ``k``: the same batches as
  the uninterrupted epoch, for any worker count, without grain's iterator state;
* batches leave the host as ``uint8`` ``(B, S, S, 3)`` (a quarter of float32's bytes);
  :func:`normalize` turns them into ImageNet-normalized floats inside the jitted step, and
  :func:`prefetch_to_device` keeps two batches in flight to the devices.

Use::

    loader = GrainImageNetLoader("train", batch_size=256, seed=0, data_dir=..., num_workers=8)
    for step, batch in enumerate(prefetch_to_device(loader.epoch(e, start_step=k), 2, sharding), k):
        state = train_step(state, normalize(batch["image"], jnp.bfloat16), batch["label"])
"""

from __future__ import annotations

import collections
import io
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
from PIL import Image

from fq_jax.data.imagenet import (
  _EXAMPLE_STREAM,
  IMAGENET_MEAN,
  IMAGENET_STD,
  random_resized_crop_box,
  shard_indices,
)

_DRAFT_SCALES = (8, 4, 2, 1)  # JPEG DCT scaling Pillow's draft can decode at


def _open(data: bytes | np.ndarray) -> Image.Image:
  if isinstance(data, np.ndarray) and data.ndim >= 2:
    image = np.asarray(data, np.uint8)
    if image.ndim == 3 and image.shape[-1] == 1:
      image = image[..., 0]
    return Image.fromarray(image)  # already decoded: nothing to save
  return Image.open(io.BytesIO(bytes(data)))


def _draft(image: Image.Image, request: tuple[int, int]) -> float:
  """Lets a JPEG decode at the smallest DCT scale at least ``request``; returns the scale."""
  if image.format != "JPEG":
    return 1.0
  width, height = image.size
  image.draft("RGB", request)  # picks 1/s with s the largest of 8,4,2,1 keeping >= request
  # Pixel i of the 1/s image covers source pixels [i s, (i + 1) s): coordinates divide by s.
  for s in _DRAFT_SCALES:
    if image.size == (-(-width // s), -(-height // s)):
      return float(s)
  raise AssertionError(f"draft gave {image.size} from {(width, height)}")


def _rgb(image: Image.Image) -> Image.Image:
  return image if image.mode == "RGB" else image.convert("RGB")


def decode_train(
  data: bytes | np.ndarray,
  rng: np.random.Generator,
  image_size: int = 224,
  *,
  draft: bool = True,
) -> np.ndarray:
  """Random-resized crop and flip of one encoded image, decoding only what the crop needs.

  The draws from ``rng`` (box, then flip) are those of
  :func:`fq_jax.data.imagenet.preprocess_train`; with ``draft=False`` the output equals its
  pixels before normalization.

  Args:
    data: encoded image bytes (JPEG, PNG, ...) or an already decoded uint8 array.
    rng: the example's generator.
    image_size: output side.
    draft: decode JPEGs at a reduced DCT scale when the crop allows it.

  Returns:
    uint8 ``(image_size, image_size, 3)``.
  """
  image = _open(data)
  width, height = image.size  # from the header: nothing decoded yet
  top, left, h, w = random_resized_crop_box(height, width, rng)
  box = (left, top, left + w, top + h)
  if draft:
    # Ask for the scale at which the crop still spans >= image_size pixels each way.
    request = (math.ceil(width * image_size / w), math.ceil(height * image_size / h))
    scale = _draft(image, request)
    box = tuple(c / scale for c in box) if scale != 1.0 else box
  out = np.asarray(_rgb(image).resize((image_size, image_size), Image.BILINEAR, box=box))
  if rng.random() < 0.5:
    out = out[:, ::-1]  # a view: batching copies it once anyway
  return out


def decode_eval(
  data: bytes | np.ndarray,
  image_size: int = 224,
  resize_size: int = 256,
  *,
  draft: bool = True,
) -> np.ndarray:
  """Resize the shorter side to ``resize_size`` and centre-crop ``image_size``.

  With ``draft=False`` the output equals :func:`fq_jax.data.imagenet.preprocess_eval`'s
  pixels before normalization.

  Args:
    data: encoded image bytes or an already decoded uint8 array.
    image_size: output side.
    resize_size: target of the shorter side.
    draft: decode JPEGs at a reduced DCT scale that keeps the shorter side >= resize_size.

  Returns:
    uint8 ``(image_size, image_size, 3)``.
  """
  image = _open(data)
  w, h = image.size
  # torchvision Resize(int): the longer side is truncated, not rounded.
  if w <= h:
    new_w, new_h = resize_size, int(resize_size * h / w)
  else:
    new_w, new_h = int(resize_size * w / h), resize_size
  if draft:
    _draft(image, (new_w, new_h))
  image = _rgb(image).resize((new_w, new_h), Image.BILINEAR)
  top = int(round((new_h - image_size) / 2.0))
  left = int(round((new_w - image_size) / 2.0))
  return np.asarray(image.crop((left, top, left + image_size, top + image_size)))


def normalize(images: Any, dtype: Any = None) -> Any:
  """ImageNet normalization of uint8 images, for use inside the jitted step.

  ``(images / 255 - mean) / std`` computed in float32, then cast to ``dtype``.

  Args:
    images: uint8 ``(..., 3)`` array (numpy or jax).
    dtype: output dtype (default float32), e.g. ``jnp.bfloat16``.

  Returns:
    A jax array of ``images``' shape.
  """
  import jax.numpy as jnp

  x = jnp.asarray(images, jnp.float32) / jnp.float32(255.0)
  x = (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)
  return x if dtype is None else x.astype(dtype)


def prefetch_to_device(
  batches: Iterable[dict[str, np.ndarray]], size: int = 2, sharding: Any = None
) -> Iterator[dict[str, Any]]:
  """Keeps ``size`` batches in flight to the devices while the caller computes.

  ``jax.device_put`` is asynchronous, so putting batch ``k + size`` before batch ``k`` is
  handed out overlaps the transfer with the step on batch ``k``.

  Args:
    batches: host batches (numpy dicts), e.g. :meth:`GrainImageNetLoader.epoch`.
    size: batches on the devices ahead of the consumer.
    sharding: a ``jax.sharding.Sharding`` of the global batch (leading axis over the data
      axis); each host's batch is its local part (``jax.make_array_from_process_local_data``).
      None: default device.

  Returns:
    An iterator of dicts of jax arrays.
  """
  import jax

  def put(batch: dict[str, np.ndarray]) -> dict[str, Any]:
    if sharding is None:
      return jax.device_put(batch)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}

  queue: collections.deque[dict[str, Any]] = collections.deque()
  for batch in batches:
    queue.append(put(batch))
    if len(queue) > size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


class _Example:
  """Position in this host's epoch -> ``{'image': uint8, 'label': int32, 'mask': float32}``.

  Picklable (sent once to every worker process): holds the source, the epoch's indices and
  the preprocessing settings.
  """

  def __init__(
    self,
    source: Sequence[dict[str, Any]],
    indices: np.ndarray,
    *,
    train: bool,
    seed: int,
    epoch: int,
    image_size: int,
    resize_size: int,
    draft: bool,
  ) -> None:
    self.source = source
    self.indices = indices
    self.train = train
    self.seed = seed
    self.epoch = epoch
    self.image_size = image_size
    self.resize_size = resize_size
    self.draft = draft

  def __call__(self, position: int) -> dict[str, np.ndarray]:
    s = self.image_size
    if position >= len(self.indices):  # eval padding up to the common step count
      return {
        "image": np.zeros((s, s, 3), np.uint8),
        "label": np.int32(0),
        "mask": np.float32(0.0),
      }
    index = int(self.indices[position])
    example = self.source[index]
    if self.train:
      # The generator of ImageNetPipeline._example: same crops and flips.
      rng = np.random.default_rng([_EXAMPLE_STREAM, self.seed, self.epoch, index])
      image = decode_train(example["image"], rng, s, draft=self.draft)
    else:
      image = decode_eval(example["image"], s, self.resize_size, draft=self.draft)
    return {"image": image, "label": np.int32(example["label"]), "mask": np.float32(1.0)}


class GrainImageNetLoader:
  """Deterministic, resumable, host-sharded ImageNet batches from grain worker processes.

  Same constructor, :attr:`steps_per_epoch`, :meth:`indices` and :meth:`epoch` as
  :class:`fq_jax.data.imagenet.ImageNetPipeline`, but batches hold ``uint8`` images (apply
  :func:`normalize` on the device).
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
    num_workers: int = 0,
    worker_buffer_size: int = 2,
    draft: bool = True,
    source: Sequence[dict[str, Any]] | None = None,
  ) -> None:
    """Creates the loader (opens the data source lazily on first use).

    Args:
      split: tfds split, e.g. "train", "validation", "train[:1%]".
      batch_size: examples per batch on this host.
      train: augment, shuffle and drop remainders (default: ``split`` starts with "train").
      seed: run seed (order and augmentation).
      data_dir: tfds data directory (None: tfds default).
      dataset_name: tfds dataset name.
      process_index: this host (default ``jax.process_index()``).
      process_count: number of hosts (default ``jax.process_count()``).
      image_size: output side.
      resize_size: eval resize of the shorter side.
      num_workers: grain worker processes (0: in this process). Results do not depend on it.
      worker_buffer_size: batches each worker prepares ahead.
      draft: decode JPEGs at reduced DCT scale where the crop allows it (False: full decode,
        pixels identical to ``ImageNetPipeline``).
      source: an already opened random-access source of ``{'image', 'label'}`` dicts
        (``image``: encoded bytes or uint8 array), instead of ``tfds.data_source``.
    """
    if process_index is None or process_count is None:
      import jax

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
    self.num_workers = num_workers
    self.worker_buffer_size = worker_buffer_size
    self.draft = draft
    self._source = source

  @property
  def source(self) -> Sequence[dict[str, Any]]:
    """The random-access source of encoded examples (opened on first access)."""
    if self._source is None:
      import tensorflow_datasets as tfds

      self._source = tfds.data_source(
        self.dataset_name,
        split=self.split,
        data_dir=self.data_dir,
        decoders={"image": tfds.decode.SkipDecoding()},  # JPEG bytes: decoded in workers
      )
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
    return -(-(-(-n // p)) // b)  # ceil(ceil(n / p) / b)

  def indices(self, epoch: int = 0) -> np.ndarray:
    """This host's dataset indices for ``epoch``, in reading order (before padding).

    Args:
      epoch: epoch index.

    Returns:
      int64 indices (those of ``ImageNetPipeline.indices``).
    """
    return shard_indices(
      self.num_examples,
      process_index=self.process_index,
      process_count=self.process_count,
      train=self.train,
      seed=self.seed,
      epoch=epoch,
    )

  def dataset(self, epoch: int, start_step: int = 0) -> Any:
    """The grain ``MapDataset`` of this host's batches ``start_step, ...`` of ``epoch``.

    Args:
      epoch: epoch index.
      start_step: first batch.

    Returns:
      A ``grain.MapDataset`` of batch dicts (random access: ``ds[k]``).
    """
    import grain

    steps = self.steps_per_epoch
    if not 0 <= start_step <= steps:
      raise ValueError(f"start_step {start_step} outside [0, {steps}]")
    example = _Example(
      self.source,
      self.indices(epoch),
      train=self.train,
      seed=self.seed,
      epoch=epoch,
      image_size=self.image_size,
      resize_size=self.resize_size,
      draft=self.draft,
    )
    ds = grain.MapDataset.range(steps * self.batch_size).map(example)
    return ds.batch(self.batch_size, drop_remainder=True)[start_step:]

  def epoch(self, epoch: int, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Batches of one epoch on this host, starting at batch ``start_step``.

    Args:
      epoch: epoch index (0-based; selects the order and augmentation when training).
      start_step: first batch to produce (for resuming from a checkpoint).

    Returns:
      An iterator of ``{'image': uint8 (B, S, S, 3), 'label': int32 (B,), 'mask': float32
      (B,)}`` numpy dicts.
    """
    import grain
    from absl import flags

    ds = self.dataset(epoch, start_step)
    if self.num_workers == 0:
      # Sequentially in this thread (iterating a MapDataset would start grain's read threads).
      return (ds[k] for k in range(len(ds)))
    if not flags.FLAGS.is_parsed():
      # grain reads its absl flags when starting workers; outside an absl app (tests,
      # notebooks) take their defaults rather than fail.
      flags.FLAGS.mark_as_parsed()
    # One read thread per worker: the parallelism is the processes (PIL releases the GIL, but
    # threads on top would oversubscribe the cores the workers already use).
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1))
    options = grain.MultiprocessingOptions(
      num_workers=self.num_workers, per_worker_buffer_size=self.worker_buffer_size
    )
    return iter(it.mp_prefetch(options))


def write_jpeg_dataset(
  data_dir: str | os.PathLike[str],
  splits: dict[str, Sequence[tuple[bytes, int]]],
  num_classes: int,
) -> str:
  """Writes encoded images as a tfds ``array_record`` dataset (no TensorFlow needed).

  The dataset has ImageNet's features (``image`` JPEG, ``label``), so
  ``GrainImageNetLoader(dataset_name=..., data_dir=data_dir)`` and ``ImageNetPipeline`` read
  it like ImageNet; used by the tests and ``benchmarks/bench_input.py``. tfds stores the
  examples in its own (hashed) order.

  Args:
    data_dir: tfds data directory to write into.
    splits: split name -> ``(encoded JPEG bytes, label)`` pairs.
    num_classes: label range.

  Returns:
    The dataset name, ``"jpeg_images"``.
  """

  builder = _jpeg_builder_class()(
    data_dir=os.fspath(data_dir), file_format="array_record", splits=splits, classes=num_classes
  )
  builder.download_and_prepare()
  return builder.name


def _jpeg_builder_class() -> type:
  import tensorflow_datasets as tfds
  from etils import epath

  global _JPEG_BUILDER
  if _JPEG_BUILDER is not None:
    return _JPEG_BUILDER

  # Unregistered: readers then build the dataset from its files (features.json), as for any
  # prepared dataset whose builder code is not imported.
  with tfds.core.registered.skip_registration():

    class JpegImages(tfds.core.GeneratorBasedBuilder):
      """Encoded images and labels given in memory."""

      VERSION = tfds.core.Version("1.0.0")
      # tfds locates checksum/metadata files next to the builder's code through
      # importlib_resources, which may be absent; there are none, so point at this file.
      code_path = epath.Path(__file__)

      def __init__(self, *, splits: dict[str, Any], classes: int, **kwargs: Any) -> None:
        self._splits, self._classes = splits, classes
        super().__init__(**kwargs)

      def _info(self) -> Any:
        # DatasetInfo directly: dataset_info_from_configs looks for metadata files next to the
        # defining module.
        features = tfds.features.FeaturesDict(
          {
            "image": tfds.features.Image(encoding_format="jpeg"),
            "label": tfds.features.ClassLabel(num_classes=self._classes),
          }
        )
        return tfds.core.DatasetInfo(builder=self, features=features)

      def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
        return {name: self._generate_examples(examples) for name, examples in self._splits.items()}

      def _generate_examples(self, examples: Sequence[tuple[bytes, int]]) -> Iterator[Any]:
        for i, (data, label) in enumerate(examples):
          # A file object is stored as is: tfds would need TensorFlow to encode an array.
          yield i, {"image": io.BytesIO(data), "label": int(label)}

  _JPEG_BUILDER = JpegImages
  return JpegImages


_JPEG_BUILDER: type | None = None
