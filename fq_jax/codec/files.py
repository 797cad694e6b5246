"""Parameter trees <-> .fqz files: `save_fqz` and `load_fqz`."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np

from fq_jax._src import quantizers, transforms, tree_util
from fq_jax._src import rules as rules_lib
from fq_jax.codec import atomic
from fq_jax.codec.decode import decode_model
from fq_jax.codec.decoded import DecodedModel
from fq_jax.codec.encode import encode_model
from fq_jax.codec.limits import DecodeLimits

_is_state_leaf = tree_util.none_or(quantizers.FocusState)


def _params_of(tree, state, params_key):
  """(params subtree, path prefix, resolved params_key) of `save_fqz`'s first argument."""
  if params_key == "auto":
    params_key = None
    if (
      state is not None
      and isinstance(tree, Mapping)
      and "params" in tree
      and tree_util.structure(state.masks) != tree_util.structure(tree)
    ):
      params_key = "params"
  if params_key is None:
    return tree, "", None
  if not isinstance(tree, Mapping) or params_key not in tree:
    raise ValueError(f"params_key {params_key!r} is not a key of the tree")
  return tree[params_key], f"{params_key}/", params_key


PARTIAL_MODES = ("quantize", "float")


def _state_arrays(state, params, prefix: str, params_key, partial) -> tuple[dict, dict, dict]:
  """(focus, masks, replaced values) by full path from the compression state's trees.

  With partial="float", a focused layer whose kept weights are not all quantized yet
  (mid-INQ) is stored as a pruned layer holding `fq.quantized(params, state)`'s values.
  """
  focus, masks, values = {}, {}, {}
  treedef = jax.tree.structure(state.masks, is_leaf=_is_state_leaf)
  try:
    mask_leaves = treedef.flatten_up_to(state.masks)
    param_paths = treedef.flatten_up_to(rules_lib.leaf_paths(params))
    none = [None] * len(mask_leaves)
    focus_leaves = treedef.flatten_up_to(state.focus) if hasattr(state, "focus") else none
    inq_leaves = treedef.flatten_up_to(state.inq) if hasattr(state, "inq") else none
  except (ValueError, TypeError) as e:
    raise ValueError(
      f"the compression state's trees do not mirror the parameters (params_key={params_key!r}): {e}"
    ) from None
  forward = None
  for i, (m, f, inq, p) in enumerate(zip(mask_leaves, focus_leaves, inq_leaves, param_paths)):
    if m is None:
      continue
    pending = (
      partial == "float" and f is not None and bool(np.any(np.asarray(m) & ~np.asarray(inq)))
    )
    if f is not None and not pending:
      focus[prefix + p] = f
      continue
    masks[prefix + p] = np.asarray(m, bool)
    if pending:
      if forward is None:
        forward = treedef.flatten_up_to(transforms.quantized(params, state))
      values[prefix + p] = np.asarray(forward[i])
  return focus, masks, values


def _check_partial(state, partial) -> None:
  """Refuses a state in the middle of the INQ schedule unless `partial` says what to do."""
  if partial is not None and partial not in PARTIAL_MODES:
    raise ValueError(f"partial must be None, 'quantize' or 'float', got {partial!r}")
  if partial is None and isinstance(state, transforms.FQState):
    fraction = transforms.quantized_fraction(state)
    if fraction < 1.0:
      raise ValueError(
        f"the state is in the middle of the INQ schedule ({fraction:.1%} of the kept weights "
        "quantized): pass partial='quantize' to store every kept weight quantized, or "
        "partial='float' to store the layers not fully quantized yet as lossless floats"
      )


def save_fqz(
  path,
  params_or_variables,
  opt_state_or_fq_state=None,
  *,
  extra=None,
  coder: str = "ans",
  metadata: dict | None = None,
  params_key: str | None = "auto",
  float_dtype: str | None = None,
  partial: str | None = None,
) -> int:
  """Writes a model and its compression state to an .fqz file (atomically).

  Args:
    path: output file.
    params_or_variables: the parameter tree, or a full Flax variables dict
      ({'params': ..., 'batch_stats': ...}). Every leaf is stored under its
      '/'-joined path (`fq.leaf_paths`), e.g. 'params/conv/kernel'.
    opt_state_or_fq_state: an `fq.FQState` / `fq.PruneState` or any optax
      state containing one (found with `fq.find_state`), or None to store
      everything raw. Its mask and focus trees mirror the *parameters*.
    extra: an optional further tree stored losslessly under its own paths
      (e.g. {'batch_stats': ...} when the first argument is just the params).
    coder: "ans" or "huffman".
    metadata: JSON-serializable dict for the header.
    params_key: where the parameters sit in `params_or_variables`: "auto"
      (default) uses the 'params' entry of a dict when the state's trees
      mirror it and the whole tree otherwise; None means the whole tree; a
      string names the top-level key explicitly. The stored paths always
      start from the root of `params_or_variables`.
    float_dtype: see `encode_model`.
    partial: what to do with a `focused_quantization` state in the middle of
      its INQ schedule (some kept weights not quantized yet): None (default)
      refuses it with a ValueError; "quantize" stores every kept weight
      quantized (the file then differs from `fq.quantized(params, state)`
      in the weights not quantized yet); "float" stores each layer that is
      not fully quantized as a pruned layer holding exactly
      `fq.quantized(params, state)`'s values (lossless floats: the file
      rebuilds the forward pass, those layers lose their symbols and
      FocusState). A state at the end of its schedule ignores `partial`.

  Returns:
    The number of bytes written.

  Raises:
    ValueError: a mid-schedule state without `partial`, trees that do not
      match, or anything `encode_model` rejects.
  """
  tree = params_or_variables
  state = None if opt_state_or_fq_state is None else transforms.find_state(opt_state_or_fq_state)
  _check_partial(state, partial)
  params, prefix, params_key = _params_of(tree, state, params_key)
  flat_paths = jax.tree.leaves(rules_lib.leaf_paths(tree))
  arrays = dict(zip(flat_paths, (np.asarray(x) for x in jax.tree.leaves(tree))))
  if len(arrays) != len(flat_paths):
    raise ValueError("two leaves of the tree have the same '/'-joined path")
  focus, masks = {}, {}
  if state is not None:
    focus, masks, values = _state_arrays(state, params, prefix, params_key, partial)
    for p, v in values.items():
      arrays[p] = v.astype(arrays[p].dtype, copy=False)
  if extra is not None:
    for p, x in zip(jax.tree.leaves(rules_lib.leaf_paths(extra)), jax.tree.leaves(extra)):
      if p in arrays:
        raise ValueError(f"extra path {p!r} clashes with a model path")
      arrays[p] = np.asarray(x)
  data = encode_model(
    arrays, focus=focus, masks=masks, coder=coder, metadata=metadata, float_dtype=float_dtype
  )
  atomic.atomic_write(path, data)
  return len(data)


def load_fqz(
  path, *, max_output_bytes: int | None = None, limits: DecodeLimits | None = None
) -> DecodedModel:
  """Reads and decodes an .fqz file (see `decode_model` for `max_output_bytes` and `limits`)."""
  with open(path, "rb") as fh:
    data = fh.read()
  return decode_model(data, max_output_bytes=max_output_bytes, limits=limits)
