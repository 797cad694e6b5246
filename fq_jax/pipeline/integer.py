"""Integer activations and integer batch norm in the pipeline (quant.activation_bits, quant.bn_bits).

What train_lib does with them (docs/integer_inference.md has the arithmetic):

* quantize stage with updates: at its first step the power-of-two input scale
  of every conv / dense layer is calibrated (`fq.calibrate_activations`) on
  `quant.activation_calibration_batches` training batches with the forward
  (quantized) weights; the stage then trains with activations quantized
  (straight-through) at those scales. The scales are kept in the run record,
  so a resumed run reuses them.
* post-training (no quantize updates): the scales are calibrated at the
  evaluate stage instead.
* evaluate: the reported compressed accuracy is the model with the weights,
  the activations and (with bn_bits > 0) the integer batch norm quantized
  (`fq.apply_quantized`); the accuracy with float activations is kept too.
* encode: the .fqz metadata (`fq_jax.codec.metadata.ModelMetadata`) records
  the architecture (model, depth, num_classes), the dataset, activation_bits,
  activation_scales and bn_bits,
  so `fq-jax evaluate model.fqz --integer` needs nothing but the file and the
  dataset.
"""

from __future__ import annotations

import itertools
from typing import Any

import jax
import numpy as np

import fq_jax as fq
from fq_jax.codec.metadata import ModelMetadata, parse_activation_scales
from fq_jax.pipeline import input_pipeline

# Data for the calibration: a fixed epoch index of its own (the order is a
# function of (seed, epoch)), so a rerun calibrates on the same batches.
CALIBRATION_EPOCH = 300_000


def activation_bits(config) -> int:
  return int(config.quant.get("activation_bits", 0) or 0)


def bn_bits(config) -> int:
  return int(config.quant.get("bn_bits", 0) or 0)


def enabled(config) -> bool:
  """Whether activations or batch norm are quantized."""
  return bool(activation_bits(config) or bn_bits(config))


def calibrate(ctx, variables) -> dict[str, Any] | None:
  """JSON activation scales of `variables` on training batches (None without activation bits).

  Every host computes them on its own batches; host 0's result is broadcast
  so that all hosts use the same scales.
  """
  bits = activation_bits(ctx.config)
  if not bits:
    return None
  q = ctx.config.quant
  n = int(q.get("activation_calibration_batches", 8))
  batches = itertools.islice(ctx.source.train_epoch(CALIBRATION_EPOCH), n)
  # ImageNet batches leave the loader as uint8: calibrate on what the model sees.
  batches = (input_pipeline.normalize_batch(b) for b in batches)
  host_vars = jax.tree.map(np.asarray, jax.device_get(variables))
  scales = fq.calibrate_activations(
    ctx.model,
    host_vars,
    batches,
    bits=bits,
    percentile=float(q.get("activation_percentile", 99.99)),
  )
  paths = sorted(scales)
  table = np.array([[scales[p].exponent, int(scales[p].signed)] for p in paths], np.int32)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    table = np.asarray(multihost_utils.broadcast_one_to_all(table))
  return {p: {"exponent": int(e), "signed": bool(s)} for p, (e, s) in zip(paths, table)}


def model_for(ctx, scales, *, focus=None):
  """`ctx.model` with the run's activation (and, given `focus`, batch-norm) quantization."""
  return fq.QuantizedActivationsModel(
    ctx.model,
    activation_bits=activation_bits(ctx.config) if scales else 0,
    activation_scales=scales or {},
    bn_bits=bn_bits(ctx.config),
    focus=focus,
  )


def metadata(ctx, scales) -> ModelMetadata:
  """The .fqz metadata of the run's model: architecture, dataset, bits and the integer settings."""
  c = ctx.config
  model = ctx.model
  depth = getattr(model, "depth", None)
  width = getattr(model, "width", None)
  act_bits = activation_bits(c) if scales else 0
  return ModelMetadata(
    model=c.model.name,
    dataset=ctx.source.name,
    depth=int(depth) if c.model.name == "cifar_resnet" and depth is not None else None,
    width=float(width) if width is not None and c.model.name.startswith("mobilenet") else None,
    num_classes=int(ctx.source.num_classes),
    bits=int(c.quant.bits) if ctx.quantizes else 32,
    seed=int(c.seed),
    activation_bits=act_bits,
    activation_scales=parse_activation_scales(scales) if act_bits else {},
    bn_bits=bn_bits(c),
  )
