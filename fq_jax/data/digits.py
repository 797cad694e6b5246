"""scikit-learn's 8x8 handwritten digits: the embedded default dataset (no download).

1,797 images, 10 classes. Pixels (0..16 in sklearn) are divided by 16 into [0, 1] and shaped
`(N, 8, 8, 1)` NHWC. The split is fixed and stratified: 25% test (450 images) and 75% train
(1,347) with `random_state=0`, so every run and every test sees the same split.
"""

from __future__ import annotations

import numpy as np

from fq_jax.data.common import InMemoryDataset

DIGITS_TEST_SIZE = 0.25
DIGITS_SPLIT_SEED = 0


def load_digits(
  test_size: float = DIGITS_TEST_SIZE, random_state: int = DIGITS_SPLIT_SEED
) -> InMemoryDataset:
  """Loads the digits with a fixed stratified train/test split.

  Args:
    test_size: fraction of the data held out for testing.
    random_state: seed of the split (the default split is the project's reference split).

  Returns:
    An `InMemoryDataset` with float32 images `(N, 8, 8, 1)` in [0, 1] and int32
    labels; class names "0".."9".
  """
  # Imported here: scikit-learn takes about a second to import and only this loader needs it.
  import sklearn.datasets
  from sklearn.model_selection import train_test_split

  bunch = sklearn.datasets.load_digits()
  images = (bunch.images.astype(np.float32) / 16.0)[..., None]
  labels = bunch.target.astype(np.int32)
  x_train, x_test, y_train, y_test = train_test_split(
    images, labels, test_size=test_size, random_state=random_state, stratify=labels
  )
  return InMemoryDataset(
    train=(np.ascontiguousarray(x_train), y_train),
    test=(np.ascontiguousarray(x_test), y_test),
    class_names=tuple(str(i) for i in range(10)),
  )
