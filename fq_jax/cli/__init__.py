"""The `fq-jax` command line (also `python -m fq_jax`).

Subcommands are registered in one place, `COMMANDS`; each is a `Command` with a name, a help
line, a function adding its arguments to its parser and a function running it (returning the
exit status). A command lives in its own module of this package (`compress`, `inspect`,
`decompress`, `evaluate`); what they share (`CLIError`, the argument checks) is in `common`.

    fq-jax compress WEIGHTS.npz --out MODEL.fqz [--sparsity S] [--bits N]
                    [--w-sep W] [--coder ans|huffman] [--rules RULE ...]
    fq-jax inspect MODEL.fqz [--json]
    fq-jax decompress MODEL.fqz --out PARAMS.npz
    fq-jax evaluate MODEL.fqz [--integer] [--dataset NAME] ...

Errors (missing or unreadable files, unsupported arrays, bad flags, corrupt .fqz files) are
reported as one line on stderr with a non-zero exit status (2 for usage errors, 1 otherwise).
Set FQ_JAX_DEBUG=1 for tracebacks.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable

from fq_jax._src import tables
from fq_jax.cli import compress, decompress, evaluate, import_torch, inspect
from fq_jax.cli.common import CLIError

__all__ = ["COMMANDS", "CLIError", "Command", "build_parser", "main"]

PROG = "fq-jax"


class _Parser(argparse.ArgumentParser):
  """argparse with one-line errors (no usage dump)."""

  def error(self, message):
    self.exit(2, f"{self.prog}: error: {_one_line(message)}\n")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Command:
  """A subcommand: `add_arguments(parser)` declares its flags, `run(args)` returns the exit status."""

  name: str
  help: str
  add_arguments: Callable[[argparse.ArgumentParser], None]
  run: Callable[[argparse.Namespace], int]


COMMANDS: list[Command] = [
  Command(
    name=getattr(m, "NAME", m.__name__.rsplit(".", 1)[-1]),
    help=m.HELP,
    add_arguments=m.add_arguments,
    run=m.run,
  )
  for m in (compress, inspect, decompress, evaluate, import_torch)
]


def build_parser() -> argparse.ArgumentParser:
  """The argument parser of every command in `COMMANDS`."""
  parser = _Parser(prog=PROG, description="Focused Quantization artifacts (.fqz).")
  sub = parser.add_subparsers(
    dest="command", required=True, metavar="COMMAND", parser_class=_Parser
  )
  for c in COMMANDS:
    p = sub.add_parser(
      c.name, help=c.help, description=c.help, formatter_class=argparse.RawTextHelpFormatter
    )
    c.add_arguments(p)
    p.set_defaults(_run=c.run)
  return parser


def _one_line(message: str) -> str:
  # Paths in messages come from the user or from a file: no control characters reach stderr.
  return tables.escape_text(" ".join(message.split()))


def main(argv: list[str] | None = None) -> int:
  """Runs the command line; returns the exit status."""
  args = build_parser().parse_args(argv)
  try:
    return args._run(args)
  except CLIError as e:
    message = str(e)
  except KeyboardInterrupt:
    return 130
  except Exception as e:  # FormatError, ValueError, OSError, ...: one line, no traceback
    if os.environ.get("FQ_JAX_DEBUG"):
      raise
    message = f"{type(e).__name__}: {e}" if not isinstance(e, (ValueError, OSError)) else str(e)
  print(f"{PROG}: error: {_one_line(message)}", file=sys.stderr)
  return 1


if __name__ == "__main__":
  sys.exit(main())
