"""Multiplication-free inference: integer activations, folded batch norm, shift-add layers.

Sits above the codec, the models and the data: it reads a `.fqz` file and runs the network it
describes with integer arithmetic (see docs/integer_inference.md).
"""

from fq_jax.integer.executor import (
  IntegerModel,
  count_integer_ops,
  evaluate_fqz,
  load_integer_model,
)
from fq_jax.integer.layers import (
  ActivationScale,
  QuantizedActivationsModel,
  apply_quantized,
  calibrate_activations,
  fold_requant,
  prepare_layer,
  quantize_activations,
  shift_add,
)

__all__ = [
  "ActivationScale",
  "IntegerModel",
  "QuantizedActivationsModel",
  "apply_quantized",
  "calibrate_activations",
  "count_integer_ops",
  "evaluate_fqz",
  "fold_requant",
  "load_integer_model",
  "prepare_layer",
  "quantize_activations",
  "shift_add",
]
