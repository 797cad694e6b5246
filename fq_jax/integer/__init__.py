"""Multiplication-free inference: integer activations, folded batch norm, shift-add layers.

Sits above the codec, the models and the data: it reads a `.fqz` file and runs the network it
describes with integer arithmetic (see docs/integer_inference.md). Modules, bottom up:

* `floatbits`: exact power-of-two arithmetic (numpy and traced jax alike);
* `activations`: power-of-two activation quantizers and their calibration;
* `batchnorm`: batch norm (with sigma and alpha) folded into an integer requantization;
* `shift_add_layers`: focused layers as tap lists evaluated with shifts and adds only;
* `simulate`: the float simulation of all of the above (`apply_quantized`);
* `spec`: what a file's metadata says about its model (`model_spec`);
* `executor`: the integer executor (`IntegerModel`) and its operation counts;
* `evaluate`: accuracy of a file on its dataset (`evaluate_fqz`).
"""

from fq_jax.codec.metadata import ActivationScale
from fq_jax.integer.activations import (
  activation_range,
  calibrate_activations,
  quantize_activations,
  scale_exponent,
)
from fq_jax.integer.batchnorm import (
  DEFAULT_BN_BITS,
  FoldedBN,
  bn_affine,
  fold_requant,
  folded_values,
  requant,
)
from fq_jax.integer.evaluate import evaluate_fqz, float_logits_fn, test_batches
from fq_jax.integer.executor import (
  IntegerModel,
  count_integer_ops,
  load_integer_model,
)
from fq_jax.integer.shift_add_layers import (
  ShiftAddLayer,
  decode_symbols,
  integer_weights,
  prepare_layer,
  shift_add,
)
from fq_jax.integer.simulate import (
  QuantizedActivationsModel,
  WeightParts,
  apply_quantized,
  weight_parts_from_symbols,
)
from fq_jax.integer.spec import ModelSpec, build_float_model, model_spec

__all__ = [
  "DEFAULT_BN_BITS",
  "ActivationScale",
  "FoldedBN",
  "IntegerModel",
  "ModelSpec",
  "QuantizedActivationsModel",
  "ShiftAddLayer",
  "WeightParts",
  "activation_range",
  "apply_quantized",
  "bn_affine",
  "build_float_model",
  "calibrate_activations",
  "count_integer_ops",
  "decode_symbols",
  "evaluate_fqz",
  "float_logits_fn",
  "fold_requant",
  "folded_values",
  "integer_weights",
  "load_integer_model",
  "model_spec",
  "prepare_layer",
  "quantize_activations",
  "requant",
  "scale_exponent",
  "shift_add",
  "test_batches",
  "weight_parts_from_symbols",
]
