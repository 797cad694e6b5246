"""fq-jax: Focused Quantization for sparse CNNs, as pure JAX functions."""
from fq_jax._src.gmm import GMM, fit_gmm, fit_gmms, gmm_log_likelihood, gmm_posterior, wasserstein_separation
from fq_jax._src.quantizers import (FocusState, focus, focused_quantize, focused_symbols, focused_values,
    num_symbols, overflow_bias, round_to_power_of_two, shift_quantize)
from fq_jax._src.rules import DEFAULT_RULES, LayerSpec, Rule, leaf_paths, path_str, resolve
from fq_jax._src.masks import apply_masks, dns_mask, dns_masks, dns_threshold, magnitude_mask, magnitude_masks, sparsity_of
from fq_jax._src.transforms import (FQState, PruneState, QuantSchedule, PAPER_INQ_FRACTIONS, dns_pruning, find_state,
    focused_quantization, infer_masks, inq_schedule, quantized, quantized_fraction)
from fq_jax._src.report import empirical_entropy, format_report, layer_report
from fq_jax._src.codec import (FormatError, DecodedModel, artifact_summary, decode_model, encode_model,
    load_fqz, save_fqz)
from fq_jax._src.integer import (ActivationScale, QuantizedActivationsModel, apply_quantized, calibrate_activations,
    fold_requant, prepare_layer, quantize_activations, shift_add)
from fq_jax._src.integer_models import IntegerModel, count_integer_ops, evaluate_fqz, load_integer_model
from fq_jax._src.codebook import (CodebookQState, CodebookState, codebook_mse, codebook_quantization,
    codebook_quantize, codebook_quantized, codebook_symbols, codebook_values, find_codebook_state,
    kmeans_codebook, uniform_codebook, uniform_levels)
