"""Files written by the format-1.1 code (before the restructure) still decode to the same arrays.

The fixtures under tests/data were written by commit 3d36d63's code: `fq-jax compress` of the
shipped ResNet-20 at 70% sparsity / 5 bits, and `train.py` on digits with 8-bit activations and
16-bit integer batch norm. Their JSON files hold SHA-256 digests of what that code decoded (and, for
the digits file, of the integer path's logits on the digits test split): the oracle is the old
decoder itself.
"""

import hashlib
import json
import pathlib

import numpy as np

import fq_jax as fq
from fq_jax.codec.metadata import ModelMetadata

DATA = pathlib.Path(__file__).parent / "data"


def _digest(a) -> str:
  return hashlib.sha256(np.ascontiguousarray(np.asarray(a)).tobytes()).hexdigest()


def test_resnet20_v1_1_file_decodes_bit_exactly():
  expected = json.loads((DATA / "resnet20_s70_b5_v1_1.sha256.json").read_text())
  decoded = fq.load_fqz(DATA / "resnet20_s70_b5_v1_1.fqz")
  assert decoded.version == (1, 1)
  assert decoded.metadata == expected["metadata"]
  arrays = {k: v for k, v in expected.items() if ":" not in k and k != "metadata"}
  assert sorted(decoded.arrays) == sorted(arrays)
  for path, want in arrays.items():
    got = np.asarray(decoded.arrays[path])
    assert str(got.dtype) == want["dtype"] and list(got.shape) == want["shape"], path
    assert _digest(got) == want["sha256"], path
  for key, want in expected.items():
    if key.startswith("focus:"):
      state = decoded.focus[key[len("focus:") :]]
      assert {f: _digest(getattr(state, f)) for f in state._fields} == want, key
    elif key.startswith("mask:"):
      assert _digest(decoded.masks[key[len("mask:") :]]) == want, key


def test_digits_v1_1_file_integer_path_is_unchanged():
  expected = json.loads((DATA / "digits_int8_v1_1.json").read_text())
  decoded = fq.load_fqz(DATA / "digits_int8_v1_1.fqz")
  assert decoded.metadata == expected["metadata"]
  assert {k: _digest(v) for k, v in sorted(decoded.arrays.items())} == expected["arrays"]
  meta = ModelMetadata.from_json(decoded.metadata)
  assert (meta.model, meta.activation_bits, meta.bn_bits) == ("digits_cnn", 8, 16)
  assert meta.to_json() == decoded.metadata  # this file's keys are all owned by the type

  # The digits test split as the data layer defines it (stratified, fixed seed).
  from fq_jax.data import load_digits

  x, y = load_digits().test
  assert _digest(x) == expected["images_sha256"], "the digits test split changed"
  model = fq.load_integer_model(decoded)
  logits, exponent = model.integer_logits(x)
  assert exponent == expected["exponent"]
  assert _digest(np.asarray(logits)) == expected["logits_sha256"]
  assert int((np.asarray(logits).argmax(-1) == y).sum()) == expected["correct"]
