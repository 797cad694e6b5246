"""Post-training compression of named arrays into `.fqz` bytes: the library behind `fq-jax compress`.

Each array the rules select is pruned by magnitude (`fq_jax._src.masks`) and focused-quantized
(`fq_jax._src.quantizers.focus`) on its own, with no training; everything else is stored
losslessly. Per-layer work runs under `jax.jit` on vectors padded to a few bucket sizes, so one
compilation covers every small layer (a model with fifty kernel shapes compiles a handful of
times, not fifty).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fq_jax._src import masks as masks_lib
from fq_jax._src import quantizers
from fq_jax._src import rules as rules_lib
from fq_jax.codec import encode_model
from fq_jax.codec.layout import dtype_name

# Compresses every floating array of rank >= 2 that no earlier rule claims, whatever its name
# (an .npz from PyTorch has no Flax "kernel" paths).
CATCH_ALL = rules_lib.Rule(pattern="")
MIN_BUCKET = 1 << 16


def _bucket(n: int) -> int:
  """Padded length for the jitted per-layer functions: 2^16, then x4 steps."""
  size = MIN_BUCKET
  while size < n:
    size *= 4
  return size


@jax.jit
def _padded_mask(w, num_pruned):
  # The padding is +inf: it sorts after every real entry (a stable sort keeps real NaN and inf
  # entries, mapped to inf by the core, before it), so the real entries' mask is exactly that of
  # the unpadded array.
  return masks_lib._prune_smallest(w, num_pruned)


_padded_focus = jax.jit(quantizers.focus, static_argnames=("bits", "w_sep", "recentralize"))


def magnitude_mask(w, sparsity: float) -> np.ndarray:
  """`fq_jax._src.masks.magnitude_mask` on the host's array, one compilation per bucket size.

  Args:
    w: an array.
    sparsity: fraction pruned, in [0, 1): exactly round(sparsity * size) entries, the smallest
      magnitudes, ties broken by position, NaNs never pruned.

  Returns:
    The bool keep-mask, shaped like `w` (identical to the core's).
  """
  flat = np.asarray(w, np.float32).reshape(-1)
  padded = np.full(_bucket(flat.size), np.inf, np.float32)
  padded[: flat.size] = flat
  mask = _padded_mask(padded, jnp.asarray(round(sparsity * flat.size), jnp.int32))
  return np.asarray(mask)[: flat.size].reshape(np.shape(w))


def focus_layer(w, mask, key, *, bits: int, w_sep: float, recentralize: bool):
  """`fq.focus` of one layer, flattened and padded to a bucket size under jit.

  Padding entries are masked out (they enter neither the mixture fit nor the bias), so the
  quantizer is that of the layer's kept weights; the component samples are drawn over the
  padded vector (deterministic for a given key).

  Args:
    w: the layer's weights.
    mask: its bool keep-mask (same shape).
    key: a `jax.random.key`.
    bits: the bit-width.
    w_sep: the Wasserstein separation threshold of recentralization.
    recentralize: False forces plain shift quantization.

  Returns:
    The `FocusState` (NumPy leaves), its assignment and mask shaped like `w`.
  """
  flat = np.asarray(w, np.float32).reshape(-1)
  size = _bucket(flat.size)
  wp = np.zeros(size, np.float32)
  wp[: flat.size] = flat
  mp = np.zeros(size, bool)
  mp[: flat.size] = np.asarray(mask, bool).reshape(-1)
  state = _padded_focus(wp, mp, key, bits=bits, w_sep=w_sep, recentralize=recentralize)
  shape = np.shape(w)

  def cut(x):
    return np.asarray(x)[: flat.size].reshape(shape)

  return jax.tree.map(
    np.asarray, state._replace(assignment=cut(state.assignment), mask=cut(state.mask))
  )


def compress_arrays(
  arrays: Mapping[str, Any],
  *,
  rules: Sequence[rules_lib.Rule] = (),
  sparsity: float = 0.0,
  bits: int = 5,
  w_sep: float = 2.0,
  coder: str = "ans",
  seed: int = 0,
  metadata: dict | None = None,
  float_dtype: str | None = None,
) -> bytes:
  """Prunes and focused-quantizes named arrays, with no training, and encodes them as `.fqz`.

  Args:
    arrays: name -> array (any `.fqz` dtype), in the order stored; names are the rules' paths.
    rules: per-array overrides tried in order before `CATCH_ALL` (every floating array of rank
      >= 2); a `Rule` with `prune=False, quantize=False` stores its arrays losslessly.
    sparsity: the default fraction of each compressed array pruned by magnitude, in [0, 1).
    bits: the default focused-quantization bit-width.
    w_sep: the default Wasserstein separation threshold (finite, >= 0).
    coder: "ans" or "huffman".
    seed: seed of the per-array component sampling (array i uses `fold_in(key(seed), i)`).
    metadata: JSON-serializable dict stored in the file's header.
    float_dtype: None (lossless) or "float16"/"bfloat16" for the arrays left uncompressed.

  Returns:
    The `.fqz` file's bytes.

  Raises:
    ValueError: one line naming the array for an unsupported dtype or a compressed array holding
      NaN or inf (quantization would turn them into zeros); a bad setting.
  """
  if not (np.isfinite(w_sep) and w_sep >= 0):
    raise ValueError(f"w_sep must be a finite number >= 0, got {w_sep}")
  for rule in rules:
    if rule.w_sep is not None and not (np.isfinite(rule.w_sep) and rule.w_sep >= 0):
      raise ValueError(f"rule {rule.pattern!r}: w_sep must be a finite number >= 0")
  for name, value in arrays.items():
    try:
      dtype_name(np.asarray(value).dtype)
    except ValueError as e:
      raise ValueError(f"array {name!r}: {e}") from None
  specs = rules_lib.resolve(
    dict(arrays), (*rules, CATCH_ALL), sparsity=sparsity, bits=bits, w_sep=w_sep
  )
  for name, spec in specs.items():
    if spec is not None:
      bad = np.size(arrays[name]) - np.count_nonzero(np.isfinite(arrays[name]))
      if bad:
        raise ValueError(
          f"array {name!r} has {bad:,} NaN or infinite values: compressing it would store them "
          "as zeros (fix the weights, or store the array losslessly with a rule "
          f"'{name}:prune=false,quantize=false')"
        )
  focus, masks = {}, {}
  root = jax.random.key(seed)
  for i, (name, w) in enumerate(arrays.items()):
    spec = specs[name]
    if spec is None:
      continue
    mask = magnitude_mask(w, spec.sparsity) if spec.prune else np.ones(np.shape(w), bool)
    if spec.quantize:
      focus[name] = focus_layer(
        w,
        mask,
        jax.random.fold_in(root, i),
        bits=spec.bits,
        w_sep=spec.w_sep,
        recentralize=spec.recentralize,
      )
    else:
      masks[name] = mask
  return encode_model(
    arrays, focus=focus, masks=masks, coder=coder, metadata=metadata, float_dtype=float_dtype
  )
