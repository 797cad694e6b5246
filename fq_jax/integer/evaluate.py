"""Evaluation of a `.fqz` file on its dataset: the integer path or the float simulation.

`evaluate_fqz` is what `fq-jax evaluate` runs; `float_logits_fn` is the float
("fake-quantized") model of a file, the reference the integer path is tested against.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from fq_jax import data as data_lib
from fq_jax.codec import load_fqz
from fq_jax.integer.executor import IntegerModel
from fq_jax.integer.simulate import apply_quantized, weight_parts_from_symbols
from fq_jax.integer.spec import build_float_model, model_spec


def float_logits_fn(decoded, *, simulate: bool = True, dtype=None):
  """A jitted images -> logits of the file's float (fake-quantized) model.

  With `simulate`, the activation and batch-norm quantization recorded in the
  file are simulated (`fq.apply_quantized`); otherwise the plain model with
  the decoded (quantized) weights. `dtype=jnp.float64` (call it inside
  `jax.enable_x64(True)`) gives an exact reference of the integer path.
  """
  spec = model_spec(decoded)
  model = build_float_model(spec, dtype=dtype) if dtype is not None else build_float_model(spec)
  tree = decoded.tree()
  variables = {k: tree[k] for k in ("params", "batch_stats") if k in tree}
  focus = None
  if simulate and spec.bn_bits:  # exact weight parts from the stored symbols
    focus = {
      k: weight_parts_from_symbols(decoded.symbols[k], st) for k, st in decoded.focus.items()
    }

  @jax.jit
  def fn(variables, x):
    if not simulate:
      return model.apply(variables, x, train=False)
    return apply_quantized(
      model,
      variables,
      x,
      train=False,
      activation_bits=spec.activation_bits,
      activation_scales=spec.activation_scales,
      bn_bits=spec.bn_bits,
      focus=focus,
    )

  return lambda x: np.asarray(fn(variables, jnp.asarray(x, dtype or jnp.float32)))


def test_batches(
  dataset: str, *, data_dir: str | None = None, limit: int | None = None, batch_size: int = 100
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """(images, labels) batches of a dataset's test split, at most `limit` examples.

  `dataset` is a name of the registry `fq_jax.data.DATASETS`.
  """
  info = data_lib.get_dataset(dataset)
  return info.test_batches(data_dir, batch_size=batch_size, limit=limit)


test_batches.__test__ = False  # a library function, not a pytest test


def _decoded(path_or_decoded):
  if isinstance(path_or_decoded, (str, os.PathLike)):
    return load_fqz(path_or_decoded)
  return path_or_decoded


def evaluate_fqz(
  path_or_decoded,
  *,
  integer: bool = True,
  data_dir: str | None = None,
  limit: int | None = None,
  batch_size: int | None = None,
  dataset: str | None = None,
  bn_bits: int | None = None,
  progress: Callable[[int], None] | None = None,
) -> dict:
  """Top-1 accuracy of an .fqz model on its dataset's test split.

  Args:
    path_or_decoded: the file (or its `DecodedModel`).
    integer: run the integer path (`IntegerModel`); False runs the float
      model with the file's activation / batch-norm quantization simulated.
    data_dir: dataset location (see `fq_jax.data.DATASETS[name].data_dir`).
    limit: evaluate on the first `limit` test examples only.
    batch_size: default 100 (integer) or 500 (float).
    dataset: override the file's dataset name.
    bn_bits: integer path's batch-norm width (default: the file's, else 16).
    progress: called with the number of examples done after each batch.

  Returns:
    {"accuracy", "correct", "count", "path": "integer"|"float", "model",
    "dataset", "activation_bits", "bn_bits", "seconds"}.
  """
  decoded = _decoded(path_or_decoded)
  spec = model_spec(decoded)
  ds = dataset or spec.dataset
  if not ds:
    raise ValueError("the file's metadata names no dataset (pass one)")
  if integer:
    model = IntegerModel(decoded, bn_bits=bn_bits)
    fn, bs, used_bn_bits = model, batch_size or 100, model.bn_bits_used
  else:
    fn, bs, used_bn_bits = float_logits_fn(decoded), batch_size or 500, spec.bn_bits
  correct = count = 0
  t0 = time.perf_counter()
  for x, y in test_batches(ds, data_dir=data_dir, limit=limit, batch_size=bs):
    pred = np.argmax(fn(x), axis=-1)
    correct += int(np.sum(pred == np.asarray(y)))
    count += len(y)
    if progress is not None:
      progress(count)
  if count == 0:
    raise ValueError("no test examples")
  return {
    "accuracy": correct / count,
    "correct": correct,
    "count": count,
    "path": "integer" if integer else "float",
    "model": spec.name,
    "dataset": ds,
    "activation_bits": spec.activation_bits,
    "bn_bits": used_bn_bits,
    "seconds": time.perf_counter() - t0,
  }
