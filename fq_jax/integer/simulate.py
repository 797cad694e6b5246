"""The float ("fake-quantized") simulation of the integer path, through Flax method interception.

`apply_quantized` runs a Flax model with its layer inputs quantized as the integer path
quantizes them and, in inference mode, each batch norm replaced by the integer batch norm
(`fq_jax.integer.batchnorm`) applied to the two parts of the focused convolution before it.
`QuantizedActivationsModel` wraps it for training loops.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fq_jax._src import quantizers
from fq_jax._src import rules as rules_lib
from fq_jax.codec.metadata import parse_activation_scales
from fq_jax.integer.activations import is_layer, module_path, quantize_activations
from fq_jax.integer.batchnorm import bn_affine, fold_requant, folded_values
from fq_jax.integer.shift_add_layers import decode_symbols, means_offset


def _means_offset_traced(means):
  """`means_offset` for traced means."""
  means = jnp.abs(jnp.asarray(means, jnp.float32))
  _, e = jnp.frexp(jnp.where(means > 0, means, 1.0))
  p = jnp.where(means > 0, e - 1, jnp.iinfo(jnp.int32).max)
  lowest = jnp.min(p)
  return jnp.where(lowest == jnp.iinfo(jnp.int32).max, 0, -lowest).astype(jnp.int32)


def mean_plane(state: quantizers.FocusState):
  """mu_m per weight (0 for pruned weights and shift layers), float32."""
  rec = jnp.asarray(state.recentralized, bool)
  means = jnp.asarray(state.means, jnp.float32)
  mu = jnp.where(jnp.asarray(state.assignment, bool), means[1], means[0])
  return jnp.where(jnp.asarray(state.mask, bool) & rec, mu, 0.0)


def weight_parts(kernel, state: quantizers.FocusState):
  """(alpha, sigma, S, MU) with kernel = alpha * (sigma * S + MU).

  S is the shift-code value s 2^(e - b) of quantized weights (exactly, when
  the kernel is fully quantized) and MU the per-weight mean (0 for a shift
  layer, whose sigma is 1).
  """
  alpha = jnp.asarray(state.alpha, jnp.float32)
  rec = jnp.asarray(state.recentralized, bool)
  sigma = jnp.where(rec, jnp.asarray(state.sigma, jnp.float32), 1.0)
  mu = mean_plane(state)
  w = jnp.asarray(kernel, jnp.float32)
  approx = (w / alpha - mu) / sigma
  # A quantized weight's S is exactly its shift value s 2^(e - b): take it from
  # the nearest symbol when that symbol decodes to the very same weight (the
  # others, e.g. not yet quantized INQ weights, keep the approximate S).
  sym = quantizers.focused_symbols(w / alpha, state)
  k = quantizers.exponent_bits(state)
  per = quantizers.num_shift_symbols(k)
  code = jnp.where(rec & (sym >= per), sym - per, sym)
  exact = quantizers.shift_values(code, k, state.bias)
  same = quantizers.focused_values(sym, state) == w
  s = jnp.where(same, exact, approx)
  s = jnp.where(jnp.asarray(state.mask, bool), s, 0.0)
  return alpha, sigma, s, mu


class WeightParts(NamedTuple):
  """A focused kernel split as kernel = alpha * (sigma * s_plane + mu), with its code parameters.

  `apply_quantized` accepts these in place of FocusStates (precomputed on the
  host: a lighter graph to compile). Build them with `weight_parts_from_symbols`.
  """

  alpha: Any
  sigma: Any
  s_plane: Any
  mu: Any
  recentralized: bool
  bias: int
  q: int


def weight_parts_from_symbols(symbols, state: quantizers.FocusState) -> WeightParts:
  """Exact `WeightParts` (numpy) of a focused kernel from its symbols."""
  s, e, m = decode_symbols(symbols, state)
  mask = np.asarray(state.mask, bool)
  rec = bool(np.asarray(state.recentralized))
  b = int(np.asarray(state.bias))
  s_plane = np.where(mask, np.ldexp(s.astype(np.float32), (e - b).astype(np.int32)), 0.0)
  means = np.asarray(state.means, np.float32).reshape(-1)
  mu = np.where(mask & rec, np.where(m, means[1], means[0]), 0.0).astype(np.float32)
  return WeightParts(
    alpha=np.float32(np.asarray(state.alpha)),
    sigma=np.float32(np.asarray(state.sigma)) if rec else np.float32(1.0),
    s_plane=s_plane.astype(np.float32),
    mu=mu,
    recentralized=rec,
    bias=b,
    q=means_offset(means) if rec else 0,
  )


def focus_by_module(focus) -> dict[str, quantizers.FocusState]:
  """{module path: FocusState} from a DecodedModel.focus mapping or an FQState.focus tree.

  Accepts keys like 'params/conv1/kernel', 'conv1/kernel' or a nested tree
  mirroring the parameters; keeps the states of '.../kernel' leaves.
  """
  if focus is None:
    return {}
  out = {}
  if isinstance(focus, Mapping) and all(isinstance(k, str) and "/" in k for k in focus) and focus:
    items = list(focus.items())
  else:
    leaves = jax.tree_util.tree_leaves_with_path(
      focus, is_leaf=lambda x: x is None or isinstance(x, (quantizers.FocusState, WeightParts))
    )
    items = [(rules_lib.path_str(p), v) for p, v in leaves]
  for key, state in items:
    if not isinstance(state, (quantizers.FocusState, WeightParts)):
      continue
    parts = key.split("/")
    if parts[-1] != "kernel":
      continue
    parts = parts[:-1]
    if parts and parts[0] == "params":
      parts = parts[1:]
    out["/".join(parts)] = state
  return out


class _Simulation:
  """The interceptor state of one `apply_quantized` call.

  The state lives in this per-call object rather than in module globals: Flax keeps its
  interceptor stack per thread, so an interceptor only ever sees the calls of the thread
  that installed it and needs no thread-local state of its own. `bypass` is set while a
  layer's two parts are computed through a clone of the layer (whose own `__call__` must
  not be intercepted again).
  """

  def __init__(self, *, activation_bits, scales, states, bn_bits, fold_bn):
    self.activation_bits = activation_bits
    self.scales = scales
    self.states = states
    self.bn_bits = bn_bits
    self.fold_bn = fold_bn
    self.bypass = False
    # id(conv output) -> (output, its two parts and units); the stored output keeps the id
    # from being reused by another array while the batch norm that reads it is pending.
    self.stash: dict[int, tuple] = {}

  def __call__(self, next_fun, args, kwargs, context):
    module = context.module
    if self.bypass or context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    if is_layer(module):
      return self.layer(next_fun, module, args, kwargs)
    if isinstance(module, nn.BatchNorm) and self.fold_bn:
      return self.batch_norm(next_fun, module, args, kwargs)
    return next_fun(*args, **kwargs)

  def apply_layer(self, module, x, kernel):
    """`module`'s convolution / matmul of `x` with another kernel and no bias."""
    clone = module.clone(parent=None, use_bias=False)
    self.bypass = True
    try:
      return clone.apply({"params": {"kernel": kernel}}, x)
    finally:
      self.bypass = False

  def layer(self, next_fun, module, args, kwargs):
    """A conv / dense layer: quantize its input; with bn folding, split it into T_A and T_M."""
    path = module_path(module)
    x = args[0]
    act = self.scales.get(path)
    ex = 0
    if act is not None:
      x = quantize_activations(x, bits=self.activation_bits, scale=act.scale, signed=act.signed)
      ex = act.exponent
    state = self.states.get(path)
    if not self.fold_bn or state is None:
      return next_fun(x, *args[1:], **kwargs)
    if isinstance(state, WeightParts):
      alpha, sigma, s_plane, mu = (jnp.asarray(a) for a in state[:4])
      rec, b, q = state.recentralized, state.bias, state.q
    else:
      kernel = module.variables["params"]["kernel"]
      alpha, sigma, s_plane, mu = weight_parts(kernel, state)
      rec = jnp.asarray(state.recentralized, bool)
      b = jnp.asarray(state.bias, jnp.int32)
      q = jnp.where(rec, _means_offset_traced(state.means), 0)
    t_a = self.apply_layer(module, x, s_plane)
    if rec is False:
      t_m = jnp.zeros_like(t_a)
    else:
      t_m = self.apply_layer(module, x, mu)  # zeros for a shift layer (mu = 0)
    z = alpha * (sigma * t_a + t_m)
    info = (t_a, t_m, alpha * sigma, jnp.where(rec, alpha, 0.0), ex - b, ex - q)
    if module.use_bias:
      bias = module.variables["params"]["bias"]
      one = jnp.ones_like(bias, jnp.float32)
      return _requant_sim(info, one, bias, self.bn_bits).astype(z.dtype)
    self.stash[id(z)] = (z, info)
    return z

  def batch_norm(self, next_fun, module, args, kwargs):
    """An inference batch norm: the integer batch norm of the layer output it reads."""
    use_ra = kwargs.get("use_running_average", module.use_running_average)
    if not use_ra:
      return next_fun(*args, **kwargs)
    y_in = args[0]
    p = module.variables["params"]
    st = module.variables["batch_stats"]
    c = y_in.shape[-1]
    gamma = p["scale"] if module.use_scale else jnp.ones((c,), jnp.float32)
    beta = p["bias"] if module.use_bias else jnp.zeros((c,), jnp.float32)
    g, h = bn_affine(gamma, beta, st["mean"], st["var"], module.epsilon)
    paired = self.stash.get(id(y_in))
    info = paired[1] if paired is not None and paired[0] is y_in else None
    if info is None:
      info = (y_in, jnp.zeros((), y_in.dtype), jnp.float32(1.0), jnp.float32(0.0), 0, 0)
    return _requant_sim(info, g, h, self.bn_bits).astype(y_in.dtype)


def apply_quantized(
  model: nn.Module,
  variables,
  x,
  *,
  activation_bits: int = 0,
  activation_scales: Mapping[str, Any] | None = None,
  bn_bits: int = 0,
  focus=None,
  **apply_kwargs,
):
  """`model.apply` with integer-activation and integer-batch-norm simulation.

  The float ("fake-quantized") counterpart of the integer path:

  * every `nn.Conv` / `nn.Dense` whose module path has an entry in
    `activation_scales` gets its input through `quantize_activations`
    (straight-through in training);
  * with `bn_bits > 0`, in inference mode (`train=False`), each focused layer
    (one with a `FocusState` in `focus`) is split into its two parts
    T_A = conv(x, S) and T_M = conv(x, MU) (`weight_parts`) and the batch
    norm that reads it (or, for a dense layer with a bias, the bias) is
    replaced by the integer batch norm of `fold_requant`, applied as
    qa * T_A + qm * T_M + qc (`folded_values`). A batch norm after a layer
    without a FocusState is folded alone (k_a = G, exp 0).

  Args:
    model: the Flax model.
    variables: its variables (weights already quantized, e.g. by
      `fq.quantized` or decoded from a file).
    x: the input batch.
    activation_bits: activation code width (0: no activation quantization).
    activation_scales: {module path: ActivationScale or its JSON}.
    bn_bits: integer batch-norm multiplier width (0: float batch norm).
    focus: FocusStates of the quantized kernels (DecodedModel.focus or an
      FQState.focus tree), or `WeightParts`; needed for the exact batch-norm
      simulation.
    **apply_kwargs: passed to `model.apply` (train=, mutable=, rngs=).

  Returns:
    What `model.apply` returns.
  """
  train = bool(apply_kwargs.get("train", False))
  sim = _Simulation(
    activation_bits=activation_bits,
    scales=parse_activation_scales(activation_scales) if activation_bits else {},
    states=focus_by_module(focus) if bn_bits else {},
    bn_bits=bn_bits,
    fold_bn=bool(bn_bits) and not train,
  )
  with nn.intercept_methods(sim):
    return model.apply(variables, x, **apply_kwargs)


def _requant_sim(info, g, h, bits):
  t_a, t_m, k_a, k_m, exp_a, exp_m = info
  fold = fold_requant(g * k_a, g * k_m, h, exp_a, exp_m, bits)
  qa, qm, qc = folded_values(fold, exp_a, exp_m)
  return qa * t_a + qm * t_m + qc


class QuantizedActivationsModel:
  """A model whose `apply` / `init` run through `apply_quantized` (duck-types `nn.Module.apply`).

  For training loops that call `model.apply(variables, x, train=..., mutable=...)`:
  the activation quantization (straight-through) and, in inference mode, the
  batch-norm simulation follow the settings given here. `focus` may be set
  later (`with_focus`) since it changes during training.
  """

  def __init__(
    self, model: nn.Module, *, activation_bits: int, activation_scales, bn_bits: int = 0, focus=None
  ):
    self.model = model
    self.activation_bits = int(activation_bits)
    self.activation_scales = parse_activation_scales(activation_scales)
    self.bn_bits = int(bn_bits)
    self.focus = focus

  def with_focus(self, focus) -> "QuantizedActivationsModel":
    return QuantizedActivationsModel(
      self.model,
      activation_bits=self.activation_bits,
      activation_scales=self.activation_scales,
      bn_bits=self.bn_bits,
      focus=focus,
    )

  def apply(self, variables, *args, **kwargs):
    return apply_quantized(
      self.model,
      variables,
      *args,
      activation_bits=self.activation_bits,
      activation_scales=self.activation_scales,
      bn_bits=self.bn_bits,
      focus=self.focus,
      **kwargs,
    )

  def init(self, *args, **kwargs):
    return self.model.init(*args, **kwargs)

  def __getattr__(self, name):
    if name == "model":  # not yet set (e.g. while unpickling)
      raise AttributeError(name)
    return getattr(self.model, name)
