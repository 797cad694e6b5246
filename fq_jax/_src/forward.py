"""The forward-pass parameter tree (`quantized`) and read-outs of a compression state."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from fq_jax._src import masks as masks_lib
from fq_jax._src import quantizers
from fq_jax._src import rules as rules_lib
from fq_jax._src.fq_state import FQState, find_state
from fq_jax._src.pruning import PruneState
from fq_jax._src.state_layout import _is_none, _is_slot, _map_present, _to_state_layout


def _masked_straight_through(w, mask):
  """DNS forward: pruned entries read as 0, gradients reach every entry."""
  return w + jax.lax.stop_gradient(jnp.where(mask, w, jnp.zeros_like(w)) - w)


def quantized(params, state, alphas=None) -> Any:
  """The forward-pass parameter tree for a training or evaluation step.

  Under `focused_quantization`: weights in the current INQ fraction are
  focused-quantized (straight-through gradients), the other kept weights are
  used as they are, pruned weights are 0 with zero gradient; dense leaves pass
  through. Under `dns_pruning`: pruned weights read as 0 but, as DNS requires,
  gradients reach all weights so pruned ones can be spliced back.

  Args:
    params: the float parameters the optimizer updates: a Flax dict, an
      `nnx.State` (of `nnx.Param`s or of arrays) or a pure dict of it.
      Leaves are matched to the state by path, so the container may differ
      from the one `init` saw; leaves `optax.masked` kept out of the state
      pass through.
    state: an `FQState`, a `PruneState`, any optax state containing one, or
      an `nnx.Optimizer`.
    alphas: optional tree of the quantized layers' scales (`fq.alphas(state)`)
      used instead of the state's: differentiate the loss with respect to it
      to get the alpha gradient from the forward pass, and hand that to the
      transform's update as `alpha_grads=` (saves recomputing it there).

  Returns:
    A tree like `params` (same containers, NNX Variables included) to feed
    to the model.

  Raises:
    ValueError: when `params` does not match the state, naming the path.

  Example:
    >>> import jax, jax.numpy as jnp, optax, fq_jax as fq
    >>> params = {"kernel": jax.random.normal(jax.random.key(0), (8, 8))}
    >>> params = fq.apply_masks(params, fq.magnitude_masks(params, 0.5))
    >>> tx = fq.focused_quantization(optax.sgd(0.1), bits=5)
    >>> state = tx.init(params)
    >>> q = fq.quantized(params, state)
    >>> int(jnp.sum(q["kernel"] != 0))
    32
  """
  state = find_state(state)
  laid_out, back = _to_state_layout(state.masks, params, what="params", where="fq.quantized")
  if isinstance(state, PruneState):
    return back(
      jax.tree.map(
        lambda m, w: w if m is None else _masked_straight_through(w, m),
        state.masks,
        laid_out,
        is_leaf=_is_none,
      )
    )

  if alphas is None:
    alphas = _map_present(lambda f: f.alpha, state.focus)

  def one(m, f, inq, a, w):
    if m is None:
      return w
    kept = jnp.where(m, w, jnp.zeros_like(w))
    if f is None:
      return kept
    return jnp.where(inq, quantizers.focused_quantize(w, f, a), kept)

  return back(
    jax.tree.map(one, state.masks, state.focus, state.inq, alphas, laid_out, is_leaf=_is_none)
  )


def alphas(state) -> Any:
  """The learned scale of each quantized layer (None elsewhere), in the state's tree layout.

  Pass it to `fq.quantized(params, state, alphas=...)` and differentiate with
  respect to it: the result is the `alpha_grads=` of `update`.

  Example:
    >>> import jax, jax.numpy as jnp, optax, fq_jax as fq
    >>> params = {"kernel": jax.random.normal(jax.random.key(0), (8, 8))}
    >>> state = fq.focused_quantization(optax.sgd(0.1)).init(params)
    >>> float(fq.alphas(state)["kernel"])
    1.0
  """
  state = find_state(state)
  if not isinstance(state, FQState):
    raise ValueError("fq.alphas: the state is a dns_pruning state, which learns no alphas")
  return _map_present(lambda f: f.alpha, state.focus)


def _derive_masks(masks, specs, params):
  if masks is None:
    # Pruned weights are exact zeros after `apply_masks`: recover the masks.
    return masks_lib.map_specs(
      lambda s, w: (w != 0) if s.prune else jnp.ones(w.shape, bool), specs, params
    )
  if callable(masks):
    masks = masks(params)
  return masks_lib.map_specs(lambda s, m: jnp.asarray(m, bool), specs, masks)


def quantized_fraction(state) -> float:
  """Fraction of kept quantized-layer weights currently quantized (host float)."""
  state = find_state(state)
  if not isinstance(state, FQState):
    return 0.0
  pairs = [
    (jnp.sum(q), jnp.sum(f.mask))
    for q, f in zip(
      jax.tree.leaves(state.inq),
      jax.tree.leaves(state.focus, is_leaf=lambda x: isinstance(x, quantizers.FocusState)),
    )
  ]
  kept = sum(int(k) for _, k in pairs)
  return 1.0 if kept == 0 else sum(int(q) for q, _ in pairs) / kept


def infer_masks(params, *, rules: Sequence[rules_lib.Rule] = rules_lib.DEFAULT_RULES):
  """Masks recovered from the exact zeros of prunable leaves (None for dense)."""
  params = rules_lib.unwrap_variables(params)
  return _derive_masks(None, rules_lib.resolve(params, rules), params)


def aligned_layers(params, state) -> list[tuple[str, Any, Any, Any]]:
  """(path, mask, focus, weight) per leaf the fq state compresses, in tree order.

  Args:
    params: the float parameters (any container, matched by path).
    state: an optax state holding an `FQState` or `PruneState`.

  Returns:
    One tuple per compressed leaf; focus is None for a prune-only leaf
    (and always under `dns_pruning`).

  Raises:
    ValueError: when `params` does not match the state, naming the path.
  """
  state = find_state(state)
  laid_out, _ = _to_state_layout(state.masks, params, what="params", where="fq.layer_report")
  laid_out = rules_lib.unwrap_variables(laid_out)
  flat, treedef = jax.tree_util.tree_flatten_with_path(state.masks, is_leaf=_is_slot)
  focus = treedef.flatten_up_to(state.focus) if isinstance(state, FQState) else [None] * len(flat)
  ws = treedef.flatten_up_to(laid_out)
  return [
    (rules_lib.path_str(p), m, f, w)
    for (p, m), f, w in zip(flat, focus, ws)
    if m is not None and not isinstance(m, optax.MaskedNode)
  ]
