"""What every `fq-jax` command shares: `CLIError` and the one validation path for arguments.

Every numeric setting is checked by one function here, whether it comes from a flag
(`--bits 9`, through argparse: a usage error, exit 2) or from a rule (`--rules 'a:bits=9'`:
exit 1); both messages say what is wrong with the value. Input files are checked to be regular
files before they are opened (a FIFO would block), and outputs may not overwrite inputs.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Sequence

from fq_jax._src import quantizers, rule_syntax
from fq_jax._src import rules as rules_lib
from fq_jax.codec import atomic
from fq_jax.codec import npz as npz_lib


class CLIError(Exception):
  """An error reported as one line on stderr (exit status 1)."""


# ----------------------------------------------------------------------------
# Values: each raises ValueError with a message that names no flag (the caller adds it).
# ----------------------------------------------------------------------------


def check_sparsity(value: float) -> float:
  """A pruned fraction: a number in [0, 1)."""
  if not (isinstance(value, (int, float)) and 0.0 <= value < 1.0):
    raise ValueError(f"sparsity must be in [0, 1), got {value}")
  return float(value)


def check_bits(value: int) -> int:
  """A focused-quantization bit-width in [MIN_BITS, MAX_BITS]."""
  lo, hi = quantizers.MIN_BITS, quantizers.MAX_BITS
  if not (isinstance(value, int) and lo <= value <= hi):
    raise ValueError(f"bits must be in [{lo}, {hi}], got {value}")
  return value


def check_w_sep(value: float) -> float:
  """A Wasserstein separation threshold: a finite number >= 0."""
  if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
    raise ValueError(f"w_sep must be a finite number >= 0, got {value}")
  return float(value)


def check_min_ndim(value: int) -> int:
  """The smallest rank a rule compresses: an integer >= 0."""
  if not (isinstance(value, int) and value >= 0):
    raise ValueError(f"min_ndim must be an integer >= 0, got {value}")
  return value


def _flag(parse: Callable[[str], object], check: Callable, what: str) -> Callable[[str], object]:
  """An argparse `type=`: parses the text, then runs the shared check (exit 2 on failure)."""

  def convert(text: str):
    try:
      value = parse(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"invalid {what} {text!r}") from None
    try:
      return check(value)
    except ValueError as e:
      raise argparse.ArgumentTypeError(str(e)) from None

  convert.__name__ = what  # argparse names the type in its messages
  return convert


def _positive(value: int) -> int:
  if value <= 0:
    raise ValueError(f"must be positive, got {value}")
  return value


def _bn_bits(value: int) -> int:
  if not 2 <= value <= 24:
    raise ValueError(f"must be in [2, 24], got {value}")
  return value


def _finite_float(text: str) -> float:
  value = float(text)
  if not math.isfinite(value):
    raise ValueError(text)
  return value


sparsity_arg = _flag(_finite_float, check_sparsity, "sparsity")
bits_arg = _flag(int, check_bits, "bit-width")
w_sep_arg = _flag(_finite_float, check_w_sep, "w_sep")
positive_int_arg = _flag(int, _positive, "count")
bn_bits_arg = _flag(int, _bn_bits, "bit-width")
seed_arg = _flag(int, lambda v: v, "seed")


# ----------------------------------------------------------------------------
# Rules: the grammar of fq_jax._src.rule_syntax, then the same value checks as the flags.
# ----------------------------------------------------------------------------

RULE_CHECKS: dict[str, Callable] = {
  "sparsity": check_sparsity,
  "bits": check_bits,
  "w_sep": check_w_sep,
  "min_ndim": check_min_ndim,
}


def parse_rules(texts: Sequence[str], *, flag: str = "--rules") -> list[rules_lib.Rule]:
  """Parses `REGEX:key=value,...` rules (the config grammar); CLIError naming `flag` if bad.

  Args:
    texts: one rule per string.
    flag: the flag named in errors.

  Returns:
    The rules, in order.
  """
  out = []
  for text in texts:
    try:
      rule = rule_syntax.parse_rule(text)
    except rule_syntax.RuleSyntaxError as e:
      raise CLIError(f"{flag}: {e}") from None
    for name, check in RULE_CHECKS.items():
      value = getattr(rule, name)
      if value is not None:
        try:
          check(value)
        except ValueError as e:
          raise CLIError(f"{flag}: rule {text!r}: {e}") from None
    out.append(rule)
  return out


# ----------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------


def check_input(path: str) -> None:
  """CLIError unless `path` is an existing regular file (checked without opening it)."""
  try:
    npz_lib.check_regular_file(path)
  except ValueError as e:
    raise CLIError(str(e)) from None


def check_output(output: str, inputs: Sequence[str], *, flag: str = "--out") -> None:
  """CLIError if `output` is one of `inputs` or its folder does not exist."""
  try:
    atomic.refuse_overwriting_inputs(output, inputs, what=flag)
  except ValueError as e:
    raise CLIError(str(e)) from None
  folder = os.path.dirname(os.path.abspath(output))
  if not os.path.isdir(folder):
    raise CLIError(f"{flag} {output!r}: no such folder {folder!r}")
  if os.path.isdir(output):
    raise CLIError(f"{flag} {output!r} is a folder")


def load_fqz(path: str):
  """The decoded `.fqz` at `path`; CLIError (one line) when missing, not a file or corrupt."""
  from fq_jax import codec

  check_input(path)
  try:
    return codec.load_fqz(path)
  except codec.FormatError as e:
    raise CLIError(f"{path}: {e}") from None
