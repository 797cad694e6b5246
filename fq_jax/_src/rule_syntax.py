"""The one text form of a compression rule, shared by the configs and the command line.

    REGEX:key=value[,key=value...]

for example `conv_init/kernel$:bits=8,sparsity=0`, `dw_conv/kernel$:prune=false`,
`head/kernel$:sparsity=0.5,w_sep=3`. The part before the last ':' is a regular expression
searched in the '/'-joined parameter path; each key is a field of `Rule` (the keys and their
types are read from the dataclass, so a new `Rule` field is writable here with no other change).
Booleans are true/false (also 1/0, yes/no, on/off). Several rules in one string are separated by
';'.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Sequence

from fq_jax._src import rules as rules_lib

_BOOL_WORDS = {
  "true": True,
  "1": True,
  "yes": True,
  "on": True,
  "false": False,
  "0": False,
  "no": False,
  "off": False,
}


class RuleSyntaxError(ValueError):
  """A rule string that does not parse; `str(e)` is one line quoting the rule."""


def _field_kinds() -> dict[str, type]:
  hints = typing.get_type_hints(rules_lib.Rule)
  kinds = {}
  for field in dataclasses.fields(rules_lib.Rule):
    if field.name == "pattern":
      continue
    hint = hints[field.name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
      hint = next(a for a in typing.get_args(hint) if a is not type(None))
    kinds[field.name] = hint
  return kinds


def _convert(kind: type, value: str):
  if kind is bool:
    return _BOOL_WORDS[value.lower()]
  if kind is int:
    return int(value)
  if kind is float:
    number = float(value)
    if not math.isfinite(number):
      raise ValueError(value)
    return number
  return kind(value)


def parse_rule(text: str) -> rules_lib.Rule:
  """Parses one `REGEX:key=value,...` string into a `Rule`.

  Args:
    text: the rule (module docstring has the syntax).

  Returns:
    The rule.

  Raises:
    RuleSyntaxError: a malformed rule, an unknown key or a bad value, in one line.

  Example:
    >>> rule = parse_rule("conv_init/kernel$:bits=8,sparsity=0")
    >>> rule.pattern, rule.bits, rule.sparsity
    ('conv_init/kernel$', 8, 0.0)
  """
  if ":" not in text:
    raise RuleSyntaxError(f"rule {text!r} is not 'REGEX:key=value,...'")
  pattern, _, body = text.rpartition(":")
  kinds = _field_kinds()
  fields = {}
  for item in filter(None, (s.strip() for s in body.split(","))):
    name, eq, value = item.partition("=")
    name, value = name.strip().replace("-", "_"), value.strip()
    if not eq or name not in kinds:
      raise RuleSyntaxError(
        f"rule {text!r}: unknown setting {item!r} (known: {', '.join(sorted(kinds))})"
      )
    try:
      fields[name] = _convert(kinds[name], value)
    except (KeyError, ValueError):
      kind = kinds[name].__name__
      raise RuleSyntaxError(f"rule {text!r}: {name}={value!r} is not a finite {kind}") from None
  try:
    return rules_lib.Rule(pattern=pattern, **fields)
  except ValueError as e:
    raise RuleSyntaxError(f"rule {text!r}: {e}") from None


def parse_rules(texts: str | Sequence[str]) -> tuple[rules_lib.Rule, ...]:
  """Parses rules given as one ';'-separated string or a sequence of strings (empty ones skipped)."""
  if isinstance(texts, str):
    texts = texts.split(";")
  return tuple(parse_rule(t.strip()) for t in texts if t and t.strip())
