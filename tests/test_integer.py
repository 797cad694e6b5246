"""Multiplication-free inference: activation quantization, shift-add layers, integer batch norm,
the integer path of whole models from .fqz files, op counts and `fq-jax evaluate`.

Tolerances (see docs/integer_inference.md):
  * shift-add accumulators: integer equality with an exact (float64) convolution of the
    integer codes and integer weights;
  * integer path vs the float64 simulation (`fq.apply_quantized` in float64): logits equal
    to 1e-5 (both compute the same integer batch norm; the only differences are the final
    float32 rounding of the simulation's logits and a ~2^-24 chance per activation of a
    double rounding through the wide grid);
  * integer path vs the default float32 simulation: argmax agreement >= 99% and logits
    within 1e-3 on >= 95% of the examples (float32 rounding can move an activation across a
    rounding boundary, flipping one code).
"""

from __future__ import annotations

import json
import pathlib

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

import fq_jax as fq
from fq_jax import data, models
from fq_jax import integer as IM
from fq_jax.cli import main as cli_main
from fq_jax.integer import activations, batchnorm, executor
from fq_jax.integer import shift_add_layers as shift_add_lib

REPO = pathlib.Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------
# Activation quantization
# ----------------------------------------------------------------------------


def test_quantize_activations_values_and_range():
  x = jnp.array([-3.0, -0.3, 0.0, 0.124, 0.125, 0.3, 100.0])
  q = fq.quantize_activations(x, bits=4, scale=0.25, signed=True)  # codes -8..7
  np.testing.assert_array_equal(q, [-2.0, -0.25, 0.0, 0.0, 0.25, 0.25, 1.75])
  q = fq.quantize_activations(x, bits=4, scale=0.25, signed=False)  # codes 0..15
  np.testing.assert_array_equal(q, [0.0, 0.0, 0.0, 0.0, 0.25, 0.25, 3.75])
  assert fq.quantize_activations(x, bits=0, scale=1.0) is x


def test_quantize_activations_straight_through():
  x = jnp.array([-5.0, 0.3, 1.0, 9.0])
  g = jax.grad(lambda x: jnp.sum(fq.quantize_activations(x, bits=3, scale=0.5, signed=False)))(x)
  np.testing.assert_array_equal(g, [0.0, 1.0, 1.0, 0.0])  # clipped outside [0, 7 * 0.5]


def test_scale_exponent():
  assert activations.scale_exponent(255.0, bits=8, signed=False) == 0
  assert activations.scale_exponent(256.0, bits=8, signed=False) == 1
  assert activations.scale_exponent(1.0, bits=8, signed=True) == -6  # 127 * 2^-7 < 1 <= 127 * 2^-6
  assert activations.scale_exponent(0.0, bits=8, signed=True) == 0


def test_calibrate_activations_digits_model():
  model = models.DigitsCNN()
  x = jax.random.uniform(jax.random.key(0), (64, 8, 8, 1))
  v = jax.jit(model.init)(jax.random.key(1), x)
  scales = fq.calibrate_activations(model, v, [x[:32], x[32:]], bits=8, method="max")
  assert set(scales) == {"conv1", "conv2", "fc1", "head"}
  assert not scales["conv1"].signed and scales["conv1"].exponent == -7  # max < 1 <= 255 * 2^-7
  assert not scales["conv2"].signed  # after ReLU


def test_percentile_from_log_histogram():
  x = np.random.default_rng(0).normal(size=200_000).astype(np.float32)
  hist = np.asarray(activations._log_histogram(x))
  assert hist.sum() == x.size
  exact = np.percentile(np.abs(x), 99.9)
  approx = activations._histogram_percentile(hist, 99.9)
  assert exact <= approx <= exact * 2 ** (1 / 16) * 1.001  # the upper edge of a 1/16-octave bin


def test_quantized_activations_model_trains_straight_through():
  model = models.DigitsCNN()
  x = jax.random.uniform(jax.random.key(0), (16, 8, 8, 1))
  v = jax.jit(model.init)(jax.random.key(1), x)
  scales = {
    "conv1": {"exponent": -7, "signed": False},
    "conv2": {"exponent": -4, "signed": False},
    "fc1": {"exponent": -4, "signed": False},
    "head": {"exponent": -4, "signed": False},
  }
  qmodel = fq.QuantizedActivationsModel(model, activation_bits=4, activation_scales=scales)

  @jax.jit
  def loss(params):
    logits, upd = qmodel.apply({**v, "params": params}, x, train=True, mutable=["batch_stats"])
    return jnp.sum(logits**2), (logits, upd)

  (_, (logits, upd)), g = jax.value_and_grad(loss, has_aux=True)(v["params"])
  assert set(upd) == {"batch_stats"}
  assert all(np.all(np.isfinite(a)) and np.any(a != 0) for a in jax.tree.leaves(g))

  # The forward pass saw 4-bit codes: the same as quantizing every layer input by hand.
  def by_hand(next_fun, args, kwargs, context):
    if context.method_name == "__call__" and isinstance(context.module, (nn.Conv, nn.Dense)):
      s = scales["/".join(context.module.path)]
      args = (fq.quantize_activations(args[0], bits=4, scale=2.0 ** s["exponent"], signed=False),)
    return next_fun(*args, **kwargs)

  @jax.jit
  def reference(v, x):
    with nn.intercept_methods(by_hand):
      return model.apply(v, x, train=True, mutable=["batch_stats"])[0]

  np.testing.assert_array_equal(logits, reference(v, x))


# ----------------------------------------------------------------------------
# Shift-add layers: exact against an integer convolution
# ----------------------------------------------------------------------------


def _fake_state(shape, rng, *, rec, bits=5, sparsity=0.5):
  """A random but valid focused quantizer of a kernel: (FocusState, symbols, unit values).

  unit = the quantized values before alpha (what a file stores the symbols of).
  """
  k = bits - 3 if rec else bits - 2
  per = 2 ** (k + 1) + 1
  mask = rng.random(shape) >= sparsity
  m = (rng.random(shape) < 0.5) & mask if rec else np.zeros(shape, bool)
  sym = np.where(mask, rng.integers(0, per, shape) + per * m, 0).astype(np.int32)
  if rec:
    means = np.float32([-(2.0 ** -rng.integers(3, 6)), 2.0 ** -rng.integers(3, 6)])
    bias, sigma = 2**k - 2, np.float32(rng.uniform(0.01, 0.04))
  else:
    means, bias, sigma = np.zeros(2, np.float32), 2**k + 1, np.float32(1.0)
  st = fq.FocusState(
    recentralized=np.bool_(rec),
    bits=np.int32(bits),
    means=means,
    sigma=sigma,
    bias=np.int32(bias),
    assignment=m,
    mask=mask,
    alpha=np.float32(rng.uniform(0.7, 1.3)),
    gmm=None,
    separation=None,
  )
  s_, e_, m_ = shift_add_lib.decode_symbols(sym, st)  # unit = sigma * s 2^(e - b) + mu_m, in numpy
  sv = np.ldexp(s_.astype(np.float32), (e_ - bias).astype(np.int32))
  unit = np.where(mask, sv * sigma + np.where(m_, means[1], means[0]) * rec, 0).astype(np.float32)
  return st, sym, unit


def _layer(shape, *, rec, bits=5, sparsity=0.5, seed=0):
  st, sym, unit = _fake_state(
    shape, np.random.default_rng(seed), rec=rec, bits=bits, sparsity=sparsity
  )
  return st, sym, np.asarray(fq.focused_values(sym, st))


def _ref_conv(x, k, strides, padding, groups):
  with jax.enable_x64(True):  # float64 is exact for these integer magnitudes (< 2^53)
    return np.asarray(
      jax.lax.conv_general_dilated(
        jnp.asarray(x, jnp.float64),
        jnp.asarray(k, jnp.float64),
        strides,
        padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups,
      )
    )


CASES = [
  # (name, kernel shape, strides, padding, groups)
  ("3x3", (3, 3, 6, 8), (1, 1), ((1, 1), (1, 1)), 1),
  ("1x1", (1, 1, 6, 8), (1, 1), ((0, 0), (0, 0)), 1),
  ("3x3 stride 2", (3, 3, 6, 8), (2, 2), ((1, 1), (1, 1)), 1),
  ("7x7 stride 2", (7, 7, 3, 4), (2, 2), ((3, 3), (3, 3)), 1),
  ("depthwise 3x3", (3, 3, 1, 6), (1, 1), ((1, 1), (1, 1)), 6),
  ("depthwise stride 2", (3, 3, 1, 6), (2, 2), ((1, 1), (1, 1)), 6),
]


@pytest.mark.parametrize("rec", [True, False], ids=["recentralized", "shift"])
@pytest.mark.parametrize("name,shape,strides,padding,groups", CASES, ids=[c[0] for c in CASES])
def test_shift_add_conv_is_exact(name, shape, strides, padding, groups, rec):
  st, sym, w = _layer(shape, rec=rec)
  layer = fq.prepare_layer(sym, st, kind="conv", strides=strides, padding=padding, groups=groups)
  cin = shape[2] * groups
  x = np.random.default_rng(1).integers(-128, 128, (2, 9, 9, cin)).astype(np.int32)
  a, m = fq.shift_add(layer, x)
  wa, wm = shift_add_lib.integer_weights(layer)
  np.testing.assert_array_equal(np.asarray(a), _ref_conv(x, wa, strides, padding, groups))
  np.testing.assert_array_equal(np.asarray(m), _ref_conv(x, wm, strides, padding, groups))
  if not rec:
    assert not np.any(np.asarray(m))
  # The accumulators are the float convolution of the decoded weights, exactly rescaled.
  z = float(layer.alpha) * (
    float(layer.sigma) * 2.0**-layer.bias * np.asarray(a, np.float64)
    + 2.0**-layer.q * np.asarray(m, np.float64)
  )
  ref = _ref_conv(x, w, strides, padding, groups)
  np.testing.assert_allclose(z, ref, rtol=0, atol=1e-6 * np.abs(ref).max())


@pytest.mark.parametrize("rec", [True, False], ids=["recentralized", "shift"])
def test_shift_add_dense_is_exact(rec):
  st, sym, w = _layer((40, 7), rec=rec, seed=3)
  layer = fq.prepare_layer(sym, st, kind="dense")
  x = np.random.default_rng(2).integers(0, 256, (5, 40)).astype(np.int32)
  a, m = fq.shift_add(layer, x)
  wa, wm = shift_add_lib.integer_weights(layer)
  np.testing.assert_array_equal(np.asarray(a), x.astype(np.int64) @ wa)
  np.testing.assert_array_equal(np.asarray(m), x.astype(np.int64) @ wm)


def test_shift_add_wide_exponents_int64():
  # 8-bit shift quantization spans 64 octaves: int32 would overflow, int64 is exact.
  st, sym, _ = _layer((30, 4), rec=False, bits=8, sparsity=0.0, seed=5)
  layer = fq.prepare_layer(sym, st, kind="dense")
  assert layer.accumulator_bound(255) >= 2**31
  x = np.random.default_rng(4).integers(0, 256, (3, 30)).astype(np.int64)
  with jax.enable_x64(True):
    a, _ = fq.shift_add(layer, x, acc_dtype=jnp.int64)
    a = np.asarray(a)
  wa, _ = shift_add_lib.integer_weights(layer)
  np.testing.assert_array_equal(a, x @ wa)


def test_shift_add_uses_no_multiply():
  st, sym, _ = _layer((3, 3, 4, 5), rec=True)
  layer = fq.prepare_layer(sym, st, kind="conv", padding=((1, 1), (1, 1)))
  jaxpr = jax.make_jaxpr(lambda x: fq.shift_add(layer, x))(jnp.zeros((1, 6, 6, 4), jnp.int32))
  prims = set()

  def walk(j):
    for eqn in j.eqns:
      prims.add(eqn.primitive.name)
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        walk(sub)

  walk(jaxpr.jaxpr)
  assert "shift_left" in prims and "add" in prims
  assert not prims & {"mul", "dot_general", "conv_general_dilated", "div"}, prims


# ----------------------------------------------------------------------------
# Integer batch norm
# ----------------------------------------------------------------------------


def test_fold_requant_numpy_equals_jax_and_fits_bits():
  rng = np.random.default_rng(0)
  k_a = (rng.normal(size=64) * 10.0 ** rng.uniform(-4, 2, 64)).astype(np.float32)
  k_m = (rng.normal(size=64) * 0.1).astype(np.float32)
  h = (rng.normal(size=64), rng.normal(size=64) * 1e-3)
  h = tuple(t.astype(np.float32) for t in h)
  for bits in (8, 16):
    n = batchnorm.fold_requant(k_a, k_m, h, -9, -4, bits, xp=np)
    j = jax.jit(lambda *a: batchnorm.fold_requant(*a, -9, -4, bits))(k_a, k_m, h)
    for f in ("ka", "km", "c", "r"):
      np.testing.assert_array_equal(getattr(n, f), np.asarray(getattr(j, f)))
    lim = 2 ** (bits - 1) - 1
    assert np.abs(n.ka).max() <= lim and np.abs(n.km).max() <= lim
    assert np.any(np.maximum(np.abs(n.ka), np.abs(n.km)) > lim // 2)  # full precision used
    # The quantized multipliers are within 2^-(bits-1) (relative) of the float ones.
    qa, qm, _ = (np.asarray(v) for v in batchnorm.folded_values(n, -9, -4))
    big = np.maximum(np.abs(k_a), np.abs(k_m) * 2.0**5)
    assert np.all(np.abs(qa - k_a) <= big * 2.0 ** -(bits - 1))


def test_bn_affine_numpy_equals_jax():
  rng = np.random.default_rng(1)
  args = [rng.normal(size=500).astype(np.float32) for _ in range(3)] + [
    rng.uniform(0, 4, 500).astype(np.float32)
  ]
  gn, hn = batchnorm.bn_affine(*args, 1e-5, xp=np)
  gj, hj = jax.jit(lambda *a: batchnorm.bn_affine(*a, 1e-5))(*args)
  np.testing.assert_array_equal(gn, gj)
  for a, b in zip(hn, hj):
    np.testing.assert_array_equal(a, b)


def test_requant_rounds_like_float():
  rng = np.random.default_rng(2)
  a = rng.integers(-(2**20), 2**20, (50, 4)).astype(np.int32)
  m = rng.integers(-(2**12), 2**12, (50, 4)).astype(np.int32)
  fold = batchnorm.fold_requant(
    np.float32([0.3, -1.7, 2e-3, 5.0]),
    np.float32([0.1, 0.2, 0.0, -0.4]),
    np.float32([0.5, -0.25, 3.0, 0.0]),
    -12,
    -6,
    16,
    xp=np,
  )
  with jax.enable_x64(True):
    y = np.asarray(batchnorm.requant(a, m, fold, -10))
  exact = (fold.ka.astype(np.float64) * a + fold.km * m.astype(np.float64) + fold.c) * 2.0**-fold.r
  np.testing.assert_array_equal(y, np.floor(exact * 2**10 + 0.5))


# ----------------------------------------------------------------------------
# Whole models from .fqz files
# ----------------------------------------------------------------------------


def _encode(arrays, focus, metadata):
  """.fqz bytes of {path: array}; `focus` kernels are stored as symbols."""
  return fq.encode_model(arrays, focus=focus, metadata=metadata)


def _flat(variables):
  return {fq.path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(variables)}


def _tree(flat):
  tree = {}
  for name, x in flat.items():
    node = tree
    parts = name.split("/")
    for q in parts[:-1]:
      node = node.setdefault(q, {})
    node[parts[-1]] = x
  return tree


DATA = REPO / "tests" / "data"


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
  """The digits file train.py wrote (format 1.1: 8-bit activations, 16-bit integer batch norm,
  tests/data/digits_int8_v1_1.fqz), re-encoded with its head kept in float (the integer path
  then multiplies there), with the digits test split and the integer-path logits."""
  original = fq.load_fqz(DATA / "digits_int8_v1_1.fqz")
  focus = {k: v for k, v in original.focus.items() if k != "params/head/kernel"}
  arrays = {k: np.asarray(v) for k, v in original.arrays.items()}
  decoded = fq.decode_model(fq.encode_model(arrays, focus=focus, metadata=original.metadata))
  path = tmp_path_factory.mktemp("digits") / "float_head.fqz"
  path.write_bytes(fq.encode_model(arrays, focus=focus, metadata=original.metadata))
  x, y = data.load_digits().test
  return decoded, path, (x, y), fq.IntegerModel(decoded, check_overflow=True)(x)


def test_pipeline_file_records_everything(digits_run):
  decoded = digits_run[0]
  meta = fq.load_fqz(DATA / "digits_int8_v1_1.fqz").metadata
  assert decoded.metadata == meta
  assert meta["architecture"] == "digits_cnn" and meta["dataset"] == "digits"
  assert meta["num_classes"] == 10 and meta["activation_bits"] == 8 and meta["bn_bits"] == 16
  assert set(meta["activation_scales"]) == {"conv1", "conv2", "fc1", "head"}
  assert not meta["activation_scales"]["conv2"]["signed"]  # ReLU outputs: unsigned codes


def test_digits_integer_path_matches_float64_simulation(digits_run):
  decoded, _, (x, y), logits = digits_run
  with jax.enable_x64(True):
    ref = IM.float_logits_fn(decoded, dtype=jnp.float64)(x)
  np.testing.assert_allclose(logits, ref, rtol=1e-5, atol=1e-5)
  assert np.mean(np.argmax(logits, -1) == y) > 0.9  # a trained model, not noise


def test_digits_integer_path_matches_float32_simulation(digits_run):
  decoded, _, (x, y), logits = digits_run
  sim = IM.float_logits_fn(decoded)(x)
  assert np.mean(np.argmax(logits, -1) == np.argmax(sim, -1)) >= 0.99
  assert np.mean(np.abs(logits - sim).max(-1) <= 1e-3) >= 0.95


def test_digits_op_counts(digits_run):
  decoded = digits_run[0]
  ops = fq.count_integer_ops(decoded, (8, 8, 1))
  rows = {r["layer"]: r for r in ops["layers"]}
  assert set(rows) == {"conv1", "conv2", "fc1", "head"}
  for name in ("conv1", "conv2", "fc1"):
    r = rows[name]
    assert r["kind"].startswith("shift-add") and r["multiplies"] == 0
    assert 0 < r["kept_macs"] < r["float_macs"]
    assert r["adds"] >= r["kept_macs"] - r["outputs"]  # one add per kept weight at least
    assert r["bn_multiplies"] == r["outputs"] * (2 if r["quantizer"] == "recentralized" else 1)
  assert rows["conv1"]["float_macs"] == 8 * 8 * 32 * 9 and rows["fc1"]["float_macs"] == 1024 * 48
  # The head is kept in float by this file: its multiplies are counted, not hidden.
  assert (
    rows["head"]["kind"] == "float dense"
    and rows["head"]["multiplies"] == rows["head"]["kept_macs"] > 0
  )
  assert ops["total"]["float_layers"] == ["head"]
  assert ops["total"]["multiplies"] == rows["head"]["multiplies"]


def _random_file(
  model, shape, *, seed=0, bn_bits=16, normalize=False, float_kernels=(), name, **meta
):
  """An .fqz of `model` with random focused kernels (alternately recentralized and shift),
  random batch norms (with `normalize`, statistics of a batch of the random inputs, which
  keeps deep networks from blowing up), and activation scales calibrated on random inputs."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(4, *shape)).astype(np.float32)
  abstract = jax.eval_shape(model.init, jax.random.key(0), x[:1])
  arrays, focus, values = {}, {}, {}
  for i, (name_, leaf) in enumerate(
    _flat(jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract)).items()
  ):
    if name_ in float_kernels:  # stored as float32: the integer path multiplies
      arrays[name_] = values[name_] = (rng.normal(size=leaf.shape) * 0.1).astype(np.float32)
    elif name_.endswith("kernel"):
      st, _, unit = _fake_state(leaf.shape, rng, rec=i % 2 == 0, sparsity=0.5)
      focus[name_], arrays[name_] = st, unit
      values[name_] = unit * st.alpha
    elif name_.endswith("var"):
      arrays[name_] = rng.uniform(0.5, 2.0, leaf.shape).astype(np.float32) * 0.05
    elif name_.endswith("scale"):
      arrays[name_] = rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
    else:
      arrays[name_] = (rng.normal(size=leaf.shape) * 0.1).astype(np.float32)
  variables = _tree({**arrays, **values})
  if normalize:  # flax: new = 0.9 old + 0.1 batch
    _, upd = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
      variables, x
    )
    for k, v in _flat({"batch_stats": upd["batch_stats"]}).items():
      arrays[k] = ((v - 0.9 * arrays[k]) / 0.1).astype(np.float32)
      if k.endswith("var"):
        arrays[k] = np.maximum(arrays[k], 1e-3)
    variables = _tree({**arrays, **values})
  scales = fq.calibrate_activations(model, variables, [x], bits=8, method="max")
  md = {
    "model": name,
    "dataset": "none",
    "activation_bits": 8,
    "activation_scales": {p: sc.to_json() for p, sc in scales.items()},
    "bn_bits": bn_bits,
    **meta,
  }
  return fq.decode_model(_encode(arrays, focus, md)), x


def test_integer_path_cifar_resnet8():
  # Option-A shortcuts, residual adds, 4x4 global pooling (a shift), a float convolution.
  float_kernels = ("params/stage2_block0/conv1/kernel",)
  decoded, x = _random_file(
    models.CifarResNet(depth=8),
    (16, 16, 3),
    name="cifar_resnet",
    depth=8,
    float_kernels=float_kernels,
  )
  with jax.enable_x64(True):
    ref = IM.float_logits_fn(decoded, dtype=jnp.float64)(x)
  logits = fq.IntegerModel(decoded, check_overflow=True)(x)
  np.testing.assert_allclose(logits, ref, rtol=1e-5, atol=1e-5)
  assert np.abs(ref).max() > 0.1  # not a degenerate network
  ops = fq.count_integer_ops(decoded, x.shape[1:])
  floats = [k.split("/", 1)[1].rsplit("/", 1)[0] for k in float_kernels]
  assert ops["total"]["float_layers"] == floats
  for r in ops["layers"]:
    if r["layer"] in floats:  # the float layer's multiplies are counted, not hidden
      assert r["arithmetic"] == "float" and r["multiplies"] == r["kept_macs"] > 0
    else:
      assert r["arithmetic"] == "integer" and r["multiplies"] == 0
  assert ops["total"]["multiplies"] == sum(
    r["multiplies"] for r in ops["layers"] if r["layer"] in floats
  )


class _FloatOps:
  """`fq_jax.models.IntegerOps` in float32 from a variables tree: the structure of a graph
  with no quantization, to compare with the Flax network it mirrors."""

  def __init__(self, variables):
    self.params, self.stats = variables["params"], variables["batch_stats"]

  @staticmethod
  def _at(tree, path):
    for key in path.split("/"):
      tree = tree[key]
    return tree

  def _norm(self, y, bn, path):
    if bn is None:
      bias = self._at(self.params, path).get("bias")
      return y if bias is None else y + bias
    p, st = self._at(self.params, bn), self._at(self.stats, bn)
    return (y - st["mean"]) / jnp.sqrt(st["var"] + 1e-5) * p["scale"] + p["bias"]

  def conv(self, path, x, bn=None, *, stride=1, pad=0, groups=1):
    y = jax.lax.conv_general_dilated(
      x,
      self._at(self.params, path)["kernel"],
      (stride, stride),
      ((pad, pad), (pad, pad)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=groups,
    )
    return self._norm(y, bn, path)

  def dense(self, path, x, bn=None):
    return self._norm(x @ self._at(self.params, path)["kernel"], bn, path)

  relu, relu6 = staticmethod(jax.nn.relu), staticmethod(jax.nn.relu6)

  def add(self, x, y):
    return x + y

  def max_pool(self, x, window, stride, pad=0):
    pads = ((0, 0), (pad, pad), (pad, pad), (0, 0))
    return jax.lax.reduce_window(
      x, -jnp.inf, jax.lax.max, (1, window, window, 1), (1, stride, stride, 1), pads
    )

  def mean_hw(self, x):
    return jnp.mean(x, axis=(1, 2))

  def flatten(self, x):
    return x.reshape(x.shape[0], -1)

  def option_a(self, x, stride, planes):
    p = planes // 4
    return jnp.pad(x[:, ::stride, ::stride, :], ((0, 0), (0, 0), (0, 0), (p, p)))


GRAPH_CASES = [
  ("digits_cnn", {}, (8, 8, 1)),
  ("cifar_resnet", {"depth": 14}, (8, 8, 3)),
  ("resnet18", {}, (32, 32, 3)),
  ("resnet50", {}, (32, 32, 3)),
  ("mobilenet_v1", {"width": 0.25}, (32, 32, 3)),
  ("mobilenet_v2", {"width": 0.5}, (32, 32, 3)),
]


@pytest.mark.parametrize("name,kwargs,shape", GRAPH_CASES, ids=[c[0] for c in GRAPH_CASES])
def test_integer_graph_mirrors_its_network(name, kwargs, shape):
  # Every registered model's integer graph, run in float32, is its Flax network (random
  # weights and statistics): the same layers, strides, paddings, groups, activations and
  # shortcuts. What the integer executor does with each op is tested above and below.
  model = models.build(name, num_classes=7, **kwargs)
  x = np.random.default_rng(0).normal(size=(2, *shape)).astype(np.float32)
  abstract = jax.eval_shape(model.init, jax.random.key(0), x)
  rng = np.random.default_rng(1)
  variables = {
    "params": jax.tree.map(
      lambda a: (rng.normal(size=a.shape) * 0.2).astype(np.float32), abstract["params"]
    ),
    "batch_stats": jax.tree.map(
      lambda a: rng.uniform(0.5, 1.5, a.shape).astype(np.float32), abstract["batch_stats"]
    ),
  }
  graph = models.integer_graph(name)
  # Both in one compilation, with XLA's backend optimizations off: compiling these networks
  # dominates the test, and the comparison needs no fast code.
  both = jax.jit(
    lambda v, x: (model.apply(v, x, train=False), graph(_FloatOps(v), x, model)),
    compiler_options={"xla_backend_optimization_level": 0},
  )
  want, got = (np.asarray(a) for a in both(variables, x))
  assert got.shape == want.shape == (2, 7)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
  assert np.abs(want).max() > 1e-3


def _fx_ops():
  """An executor whose ops can be called on fixed-point tensors directly."""
  return executor._Exec(model=None)


def test_executor_pooling_and_activations_are_exact():
  # relu6, padded max pooling, residual adds of different units and global pooling, on
  # fixed-point integers, against the same operations on their real values in float64.
  rng = np.random.default_rng(0)
  with jax.enable_x64(True):
    ops = _fx_ops()
    a = executor.Fx(jnp.asarray(rng.integers(-(2**12), 2**12, (2, 8, 8, 4)), jnp.int64), -9)
    b = executor.Fx(jnp.asarray(rng.integers(-(2**10), 2**10, (2, 8, 8, 4)), jnp.int64), -7)

    def real(t):
      return np.ldexp(np.asarray(t.v, np.float64), t.exp)

    np.testing.assert_array_equal(real(ops.relu6(a)), np.clip(real(a), 0, 6))
    np.testing.assert_array_equal(real(ops.relu(b)), np.maximum(real(b), 0))
    np.testing.assert_array_equal(real(ops.add(a, b)), real(a) + real(b))
    pooled = real(ops.max_pool(a, 3, 2, 1))
    padded = np.pad(real(a), ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
    want = np.empty((2, 4, 4, 4))
    for i in range(4):
      for j in range(4):
        want[:, i, j] = padded[:, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3].max(axis=(1, 2))
    np.testing.assert_array_equal(pooled, want)
    np.testing.assert_array_equal(real(ops.mean_hw(a)), real(a).mean(axis=(1, 2)))
    np.testing.assert_array_equal(real(ops.flatten(a)), real(a).reshape(2, -1))
    shortcut = real(ops.option_a(a, 2, 8))  # 4 -> 8 channels: 2 zero channels each side
    np.testing.assert_array_equal(shortcut[..., 2:6], real(a)[:, ::2, ::2])
    assert shortcut.shape == (2, 4, 4, 8)
    assert not shortcut[..., :2].any() and not shortcut[..., 6:].any()


def test_file_that_does_not_match_its_model_is_refused():
  # A MobileNet-V1 file whose metadata names a wider model than its arrays hold: the graph
  # asks for more input channels than the kernels read, which must fail loudly (a gather
  # out of range would otherwise clip silently).
  model = models.mobilenet_v1(num_classes=3, width=0.25)
  abstract = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))
  zeros = _flat(jax.tree.map(lambda a: np.zeros(a.shape, np.float32), abstract))
  arrays = {k: v + (1.0 if k.endswith(("scale", "var")) else 0.0) for k, v in zeros.items()}
  scales = {
    k.split("/", 1)[1].rsplit("/", 1)[0]: {"exponent": -4, "signed": True}
    for k in arrays
    if k.endswith("kernel")
  }
  meta = {"model": "mobilenet_v1", "width": 0.5, "activation_bits": 8}
  decoded = fq.decode_model(fq.encode_model(arrays, metadata={**meta, "activation_scales": scales}))
  with pytest.raises(ValueError, match="input channels"):
    fq.IntegerModel(decoded)(np.zeros((1, 32, 32, 3), np.float32))


def test_model_spec_inference_without_metadata(digits_run):
  decoded = digits_run[0]
  spec = IM.model_spec(decoded)
  assert (
    spec.name == "digits_cnn" and spec.kwargs["num_classes"] == 10 and spec.activation_bits == 8
  )
  bare = fq.decode_model(fq.encode_model({k: np.asarray(v) for k, v in decoded.arrays.items()}))
  spec = IM.model_spec(bare)
  assert spec.name == "digits_cnn" and spec.activation_bits == 0 and spec.dataset is None
  with pytest.raises(ValueError, match="activation scales"):
    fq.IntegerModel(bare)


# ----------------------------------------------------------------------------
# fq-jax evaluate
# ----------------------------------------------------------------------------


def test_cli_evaluate(digits_run, capsys):
  path = digits_run[1]
  assert cli_main(["evaluate", str(path), "--integer", "--limit", "100"]) == 0
  out = capsys.readouterr().out
  assert "integer path" in out and "top-1" in out and "(" in out and "/100)" in out
  assert "0 multiplies" not in out.splitlines()[2] or "float layers: head" in out
  assert cli_main(["evaluate", str(path), "--json", "--limit", "50"]) == 0
  res = json.loads(capsys.readouterr().out)
  assert res["path"] == "float" and res["count"] == 50 and 0.5 < res["accuracy"] <= 1.0
  assert res["ops"]["total"]["float_layers"] == ["head"]


def test_cli_evaluate_errors(digits_run, tmp_path, capsys):
  decoded = digits_run[0]
  assert cli_main(["evaluate", str(tmp_path / "missing.fqz"), "--integer"]) == 1
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "no such file" in err
  bare = tmp_path / "bare.fqz"
  bare.write_bytes(
    fq.encode_model(
      {k: np.asarray(v) for k, v in decoded.arrays.items()},
      metadata={"model": "digits_cnn", "dataset": "digits"},
    )
  )
  assert cli_main(["evaluate", str(bare), "--integer"]) == 1
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "activation scales" in err
  junk = tmp_path / "junk.fqz"
  junk.write_bytes(b"not an fqz file")
  assert cli_main(["evaluate", str(junk)]) == 1
  assert capsys.readouterr().err.count("\n") == 1
  with pytest.raises(SystemExit) as e:
    cli_main(["evaluate", str(bare), "--limit", "0"])
  assert e.value.code == 2
