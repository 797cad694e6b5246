"""The runnable examples in the core's docstrings are tests too."""

import doctest
import importlib
import pathlib

import pytest

# Every core module (fq_jax/_src/*.py): a module added later is covered without listing it.
MODULES = sorted(
  p.stem
  for p in (pathlib.Path(__file__).resolve().parents[1] / "fq_jax" / "_src").glob("*.py")
  if p.stem != "__init__"
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
  module = importlib.import_module(f"fq_jax._src.{name}")
  result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
  assert result.failed == 0


def test_public_functions_have_examples():
  import fq_jax as fq

  for fn in (
    fq.fit_gmm,
    fq.focused_quantize,
    fq.focus,
    fq.shift_quantize,
    fq.overflow_bias,
    fq.magnitude_masks,
    fq.dns_masks,
    fq.focused_quantization,
    fq.quantized,
  ):
    assert "Example:" in fn.__doc__ and ">>>" in fn.__doc__, fn.__name__
