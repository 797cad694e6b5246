"""Bad arguments fail early, with one line naming the argument; no silent no-ops.

Each case states the exact message expected. Build-time cases must fail when
the transformation is built, before any `init` (no compilation happens).
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fq_jax as fq

SGD = optax.sgd(0.1)
FQ = "focused_quantization"

BUILD_CASES = [
  # (callable building the thing, exception type, exact message)
  (
    lambda: fq.focused_quantization(SGD, bits=1),
    ValueError,
    f"{FQ}: bits must be an integer in [2, 8], got 1",
  ),
  (
    lambda: fq.focused_quantization(SGD, bits=9),
    ValueError,
    f"{FQ}: bits must be an integer in [2, 8], got 9",
  ),
  (
    lambda: fq.focused_quantization(SGD, bits=4.0),
    ValueError,
    f"{FQ}: bits must be an integer in [2, 8], got 4.0",
  ),
  (
    lambda: fq.focused_quantization(SGD, w_sep=-1),
    ValueError,
    f"{FQ}: w_sep must be a finite number >= 0, got -1",
  ),
  (
    lambda: fq.focused_quantization(SGD, w_sep=float("nan")),
    ValueError,
    f"{FQ}: w_sep must be a finite number >= 0, got nan",
  ),
  (
    lambda: fq.focused_quantization(SGD, gmm_iters=0),
    ValueError,
    f"{FQ}: gmm_iters must be an integer >= 1, got 0",
  ),
  (
    lambda: fq.focused_quantization(SGD, unmatched="maybe"),
    ValueError,
    f"{FQ}: unmatched must be 'raise', 'warn' or 'ignore', got 'maybe'",
  ),
  (
    lambda: fq.focused_quantization(None),
    TypeError,
    f"{FQ}: inner must be an optax GradientTransformation, got NoneType",
  ),
  (
    lambda: fq.focused_quantization(SGD, alpha_optimizer=0.1),
    TypeError,
    f"{FQ}: alpha_optimizer must be an optax GradientTransformation, got float",
  ),
  (
    lambda: fq.focused_quantization(SGD, rules="kernel"),
    TypeError,
    f"{FQ}: rules must be a Rule or a sequence of Rules, got str",
  ),
  (
    lambda: fq.focused_quantization(SGD, rules=(fq.Rule(pattern="kernel"), "bias")),
    TypeError,
    f"{FQ}: rules must be a Rule or a sequence of Rules, got an item of type str",
  ),
  (
    lambda: fq.focused_quantization(SGD, schedule=3),
    TypeError,
    f"{FQ}: schedule must be a QuantSchedule (see fq.inq_schedule), got int",
  ),
  (
    lambda: fq.focused_quantization(SGD, seed=0.5),
    TypeError,
    f"{FQ}: seed must be an integer, got float",
  ),
  (
    lambda: fq.inq_schedule(-3),
    ValueError,
    "inq_schedule: steps_per_stage must be an integer >= 0, got -3",
  ),
  (
    lambda: fq.inq_schedule(2.5),
    ValueError,
    "inq_schedule: steps_per_stage must be an integer >= 0, got 2.5",
  ),
  (
    lambda: fq.inq_schedule(10, refit_every=-1),
    ValueError,
    "inq_schedule: refit_every must be an integer >= 0, got -1",
  ),
  (
    lambda: fq.dns_pruning(SGD, sparsity=1.5),
    ValueError,
    "dns_pruning: sparsity must be in [0, 1), got 1.5",
  ),
  (
    lambda: fq.dns_pruning(SGD, sparsity=-0.1),
    ValueError,
    "dns_pruning: sparsity must be in [0, 1), got -0.1",
  ),
  (
    lambda: fq.dns_pruning(SGD),
    ValueError,
    "dns_pruning: give exactly one of sparsity= and sensitivity=",
  ),
  (
    lambda: fq.dns_pruning(SGD, sparsity=0.5, update_every=0),
    ValueError,
    "dns_pruning: update_every must be an integer >= 1, got 0",
  ),
  (
    lambda: fq.dns_pruning(SGD, sensitivity="high"),
    ValueError,
    "dns_pruning: sensitivity must be a finite number, got 'high'",
  ),
  (
    lambda: fq.dns_pruning(SGD, sparsity=0.5, rules=42),
    TypeError,
    "dns_pruning: rules must be a Rule or a sequence of Rules, got int",
  ),
  (
    lambda: fq.Rule(pattern="conv", w_sep=-2.0),
    ValueError,
    "Rule(pattern='conv').w_sep: w_sep must be a finite number >= 0, got -2.0",
  ),
  (
    lambda: fq.Rule(pattern="conv", bits=1),
    ValueError,
    "Rule(pattern='conv').bits: bits must be an integer in [2, 8], got 1",
  ),
  (
    lambda: fq.Rule(pattern="conv", sparsity=1.5),
    ValueError,
    "Rule(pattern='conv').sparsity: sparsity must be in [0, 1), got 1.5",
  ),
]


@pytest.mark.parametrize("build, error, message", BUILD_CASES)
def test_bad_argument_fails_when_built_with_one_line(build, error, message):
  with pytest.raises(error) as info:
    build()
  assert str(info.value) == message
  assert "\n" not in str(info.value)


def params():
  k1, k2 = jax.random.split(jax.random.key(0))
  return {
    "conv": {"kernel": jax.random.normal(k1, (3, 3, 2, 4)) * 0.1, "bias": jnp.zeros(4)},
    "dense": {"kernel": jax.random.normal(k2, (8, 3)) * 0.1},
  }


def test_empty_selection_raises_naming_rules_and_paths():
  for rules in ((), (fq.Rule(pattern="conv9/kernel$"),)):
    tx = fq.focused_quantization(SGD, rules=rules)
    with pytest.raises(ValueError) as info:
      tx.init(params())
    patterns = [r.pattern for r in rules]
    assert str(info.value) == (
      f"{FQ}: the rules {patterns} select no parameter to compress; paths: conv/bias, "
      f"conv/kernel, dense/kernel (pass unmatched='warn' or 'ignore' to {FQ} to allow it)"
    )
  tx = fq.dns_pruning(SGD, sparsity=0.5, rules=())
  with pytest.raises(ValueError, match="^dns_pruning: the rules \\[\\] select no parameter"):
    tx.init(params())


def test_empty_selection_allowed_when_asked():
  with pytest.warns(UserWarning, match="select no parameter"):
    state = fq.focused_quantization(SGD, rules=(), unmatched="warn").init(params())
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    state = fq.focused_quantization(SGD, rules=(), unmatched="ignore").init(params())
  q = fq.quantized(params(), state)
  jax.tree.map(np.testing.assert_array_equal, q, params())


def test_rule_matching_nothing_and_integer_kernel_warn():
  p = params()
  p["embed"] = {"kernel": jnp.ones((4, 4), jnp.int32)}
  rules = (fq.Rule(pattern="conv_init/kernel$", bits=8), *fq.DEFAULT_RULES)
  with pytest.warns(UserWarning) as record:
    fq.focused_quantization(SGD, rules=rules).init(p)
  messages = [str(w.message) for w in record]
  assert (
    f"{FQ}: Rule(pattern='conv_init/kernel$') matches no parameter that an earlier rule does "
    "not take; paths: conv/bias, conv/kernel, dense/kernel, embed/kernel "
    f"(pass unmatched='ignore' to {FQ} to silence this)"
  ) in messages
  assert (
    f"{FQ}: left uncompressed because they are not floating point: embed/kernel (int32) "
    f"(pass unmatched='ignore' to {FQ} to silence this)"
  ) in messages
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    fq.focused_quantization(SGD, rules=rules, unmatched="ignore").init(p)


def test_one_rule_is_accepted_as_a_rule_tuple():
  rule = fq.Rule(pattern="kernel$", bits=4)
  a = fq.focused_quantization(SGD, rules=rule, bits=6).init(params())
  b = fq.focused_quantization(SGD, rules=(rule,), bits=6).init(params())
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert int(a.focus["conv"]["kernel"].bits) == 4


def test_params_that_do_not_match_the_state_name_the_path():
  state = fq.focused_quantization(SGD).init(params())
  missing = {"conv": params()["conv"]}
  with pytest.raises(ValueError) as info:
    fq.quantized(missing, state)
  assert str(info.value) == (
    "fq.quantized: the fq state has a leaf at 'dense/kernel' that params lacks "
    "(params paths: conv/bias, conv/kernel)"
  )
  extra = {**params(), "head": {"kernel": jnp.ones((3, 2))}}
  with pytest.raises(ValueError) as info:
    fq.quantized(extra, state)
  assert str(info.value) == (
    "fq.quantized: params has a leaf at 'head/kernel' that the fq state lacks "
    "(state paths: conv/bias, conv/kernel, dense/kernel); was the state built from other params?"
  )
  reshaped = {**params(), "dense": {"kernel": jnp.ones((3, 8))}}
  with pytest.raises(ValueError) as info:
    fq.quantized(reshaped, state)
  assert str(info.value) == (
    "fq.quantized: params leaf 'dense/kernel' has shape (3, 8), the fq state's mask (8, 3)"
  )
  with pytest.raises(ValueError, match="^fq.layer_report: the fq state has a leaf at 'dense"):
    fq.layer_report(missing, state)
  tx = fq.focused_quantization(SGD)
  with pytest.raises(ValueError, match=f"^{FQ}: updates has a leaf at 'head/kernel'"):
    tx.update(extra, state, extra)


def test_two_bits_is_the_documented_ternary_shift_mode():
  # A clearly bimodal layer: at 3 bits and above it is recentralized.
  w = jnp.concatenate([jnp.full(64, -0.5), jnp.full(64, 0.5)])
  w = (w + 0.01 * jax.random.normal(jax.random.key(1), (128,))).reshape(16, 8)
  assert bool(fq.focus(w, None, jax.random.key(0), bits=3).recentralized)
  f = fq.focus(w, None, jax.random.key(0), bits=2)
  assert not bool(f.recentralized)
  q = np.asarray(fq.focused_quantize(w, f))
  magnitude = 2.0 ** -int(f.bias)
  assert set(np.unique(q)) <= {0.0, magnitude, -magnitude}
  # Eq. 1 with k = 0 exponent bits: nearest of {0, +-2^-b} on a linear scale.
  a = np.abs(np.asarray(w))
  expected = np.where(a >= magnitude / 2, np.sign(np.asarray(w)) * magnitude, 0.0)
  np.testing.assert_array_equal(q, expected)
  assert "ternary" in fq.focused_quantization.__doc__
