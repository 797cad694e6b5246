"""The `fq-jax` command line (also `python -m fq_jax`).

Subcommands are registered in one place, `COMMANDS`; each is a `Command`
with a name, a help line, a function adding its arguments to its parser and
a function running it (returning the exit status). To add one (e.g.
`evaluate`), append a `Command` to `COMMANDS`.

    fq-jax compress WEIGHTS.npz --out MODEL.fqz [--sparsity S] [--bits N]
                    [--w-sep W] [--coder ans|huffman] [--rules RULE ...]
    fq-jax inspect MODEL.fqz [--json]
    fq-jax decompress MODEL.fqz --out PARAMS.npz

Errors (missing or unreadable files, unsupported arrays, bad flags, corrupt
.fqz files) are reported as one line on stderr with a non-zero exit status
(2 for usage errors, 1 otherwise). Set FQ_JAX_DEBUG=1 for tracebacks.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable

PROG = "fq-jax"

RULES_HELP = """\
Per-array overrides, tried in order before the default rule (which
compresses every floating array of rank >= 2, whatever its name). Each RULE is
REGEX=SETTINGS: REGEX is searched in the array's key (Python `re.search`) and
SETTINGS is either `dense` (store the array losslessly) or comma-separated
key:value pairs among bits:N (2..8), sparsity:S (0 <= S < 1), w_sep:W,
prune:BOOL, quantize:BOOL (false = prune only, keep float values),
recentralize:BOOL (false = plain shift quantization) and min_ndim:N (default
2). Unset keys take the global flags. Example:
--rules 'conv1\\.weight=bits:8,sparsity:0' 'fc\\.weight=quantize:false'"""


class CLIError(Exception):
  """An error reported as one line on stderr."""


class _Parser(argparse.ArgumentParser):
  """argparse with one-line errors (no usage dump)."""

  def error(self, message):
    self.exit(2, f"{self.prog}: error: {message}\n")


@dataclasses.dataclass(frozen=True)
class Command:
  """A subcommand: `add_arguments(parser)` declares its flags, `run(args)` returns the exit status."""

  name: str
  help: str
  add_arguments: Callable[[argparse.ArgumentParser], None]
  run: Callable[[argparse.Namespace], int]


# ----------------------------------------------------------------------------
# compress
# ----------------------------------------------------------------------------


def _sparsity(text: str) -> float:
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"invalid sparsity {text!r}") from None
  if not 0.0 <= value < 1.0:
    raise argparse.ArgumentTypeError(f"sparsity must be in [0, 1), got {text}")
  return value


def _bits(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"invalid bit-width {text!r}") from None
  if not 2 <= value <= 8:
    raise argparse.ArgumentTypeError(f"bits must be in [2, 8], got {text}")
  return value


def _bool(text: str, where: str) -> bool:
  t = text.strip().lower()
  if t in ("1", "true", "yes", "on"):
    return True
  if t in ("0", "false", "no", "off"):
    return False
  raise CLIError(f"{where}: expected a boolean (true/false), got {text!r}")


def parse_rule(text: str):
  """'REGEX=key:value,...' or 'REGEX=dense' -> fq.Rule (see RULES_HELP)."""
  import fq_jax as fq

  if "=" not in text:
    raise CLIError(f"--rules {text!r}: expected REGEX=SETTINGS (e.g. 'conv1\\.weight=bits:8')")
  pattern, settings = text.rsplit("=", 1)
  where = f"--rules {text!r}"
  kwargs: dict = {}
  settings = settings.strip()
  if settings.lower() in ("dense", "skip", "none"):
    kwargs.update(prune=False, quantize=False)
  elif settings:
    for item in settings.split(","):
      if ":" not in item:
        raise CLIError(f"{where}: {item!r} is not key:value")
      key, value = (s.strip() for s in item.split(":", 1))
      key = key.replace("-", "_")
      try:
        if key == "bits":
          kwargs["bits"] = int(value)
        elif key == "sparsity":
          kwargs["sparsity"] = float(value)
        elif key == "w_sep":
          kwargs["w_sep"] = float(value)
        elif key == "min_ndim":
          kwargs["min_ndim"] = int(value)
        elif key in ("prune", "quantize", "recentralize"):
          kwargs[key] = _bool(value, where)
        else:
          raise CLIError(
            f"{where}: unknown key {key!r} (bits, sparsity, w_sep, prune, "
            f"quantize, recentralize, min_ndim)"
          )
      except ValueError:
        raise CLIError(f"{where}: bad value {value!r} for {key}") from None
  try:
    return fq.Rule(pattern=pattern, **kwargs)
  except ValueError as e:
    raise CLIError(f"{where}: {e}") from None


def load_npz(path: str) -> dict:
  """The arrays of an .npz file, keyed by name (no pickles)."""
  import zipfile

  import numpy as np

  if not os.path.exists(path):
    raise CLIError(f"{path}: no such file")
  try:
    archive = np.load(path, allow_pickle=False)
  except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
    raise CLIError(f"{path}: not a readable .npz archive ({e})") from None
  if not isinstance(archive, np.lib.npyio.NpzFile):
    raise CLIError(f"{path}: not an .npz archive (a single .npy array?)")
  arrays = {}
  with archive:
    for key in archive.files:
      try:
        arrays[key] = archive[key]
      except ValueError as e:
        raise CLIError(f"{path}: array {key!r}: {e}") from None
      except Exception as e:
        raise CLIError(f"{path}: array {key!r} is unreadable ({e})") from None
  return arrays


def magnitude_mask(w, sparsity: float):
  """`fq.magnitude_mask` computed on the host (no per-shape compilation).

  Keeps the largest magnitudes: exactly round(sparsity * size) entries are
  pruned, ties broken by position, NaNs never pruned.
  """
  import numpy as np

  a = np.abs(np.asarray(w, np.float32).reshape(-1))
  a[np.isnan(a)] = np.inf
  mask = np.ones(a.size, bool)
  mask[np.argsort(a, kind="stable")[: round(sparsity * a.size)]] = False
  return mask.reshape(np.shape(w))


def _bucket(n: int) -> int:
  """Padded length for the jitted focus: one compile covers all small layers."""
  size = 1 << 16
  while size < n:
    size *= 4
  return size


_FOCUS_JIT = None


def focus_layer(w, mask, key, *, bits: int, w_sep: float, recentralize: bool):
  """`fq.focus` of one layer, flattened and padded to a bucket size under jit.

  Padding entries are masked out (they do not enter the mixture fit or the
  bias), so the quantizer is that of the layer's kept weights; the component
  samples are drawn over the padded vector (deterministic for a given key).
  """
  global _FOCUS_JIT
  import jax
  import numpy as np

  import fq_jax as fq

  if _FOCUS_JIT is None:
    _FOCUS_JIT = jax.jit(fq.focus, static_argnames=("bits", "w_sep", "recentralize"))
  flat = np.asarray(w, np.float32).reshape(-1)
  size = _bucket(flat.size)
  wp = np.zeros(size, np.float32)
  wp[: flat.size] = flat
  mp = np.zeros(size, bool)
  mp[: flat.size] = np.asarray(mask, bool).reshape(-1)
  state = _FOCUS_JIT(wp, mp, key, bits=bits, w_sep=w_sep, recentralize=recentralize)
  shape = np.shape(w)
  cut = lambda x: np.asarray(x)[: flat.size].reshape(shape)
  return jax.tree.map(
    np.asarray, state._replace(assignment=cut(state.assignment), mask=cut(state.mask))
  )


def _add_compress(p: argparse.ArgumentParser):
  p.add_argument("weights", metavar="WEIGHTS.npz", help="an .npz of named arrays")
  p.add_argument("--out", required=True, metavar="MODEL.fqz", help="output file")
  p.add_argument(
    "--sparsity",
    type=_sparsity,
    default=0.0,
    help="fraction of each compressed array pruned by magnitude (default 0)",
  )
  p.add_argument("--bits", type=_bits, default=5, help="focused-quantization bit-width (default 5)")
  p.add_argument(
    "--w-sep",
    type=float,
    default=2.0,
    dest="w_sep",
    help="Wasserstein separation threshold for recentralization (default 2.0)",
  )
  p.add_argument(
    "--coder", choices=("ans", "huffman"), default="ans", help="entropy coder (default ans)"
  )
  p.add_argument("--rules", nargs="+", action="extend", default=[], metavar="RULE", help=RULES_HELP)
  p.add_argument("--seed", type=int, default=0, help="seed for the component sampling")
  p.add_argument(
    "--float-dtype",
    choices=("float16", "bfloat16"),
    default=None,
    help="store uncompressed float arrays in this dtype (lossy; default lossless)",
  )


def _run_compress(args) -> int:
  if args.w_sep != args.w_sep or args.w_sep < 0:
    raise CLIError(f"--w-sep must be a non-negative number, got {args.w_sep}")
  rules = [parse_rule(r) for r in args.rules]
  arrays = load_npz(args.weights)
  import jax
  import numpy as np

  import fq_jax as fq

  rules.append(fq.Rule(pattern=""))  # every floating array of rank >= 2
  for key, value in arrays.items():
    try:
      fq.codec.model.dtype_name(value.dtype)
    except ValueError as e:
      raise CLIError(f"{args.weights}: array {key!r}: {e}") from None
  specs = fq.resolve(arrays, rules, sparsity=args.sparsity, bits=args.bits, w_sep=args.w_sep)
  focus, masks = {}, {}
  root = jax.random.key(args.seed)
  for i, (path, w) in enumerate(arrays.items()):
    spec = specs[path]
    if spec is None:
      continue
    mask = magnitude_mask(w, spec.sparsity) if spec.prune else np.ones(w.shape, bool)
    if spec.quantize:
      focus[path] = focus_layer(
        w,
        mask,
        jax.random.fold_in(root, i),
        bits=spec.bits,
        w_sep=spec.w_sep,
        recentralize=spec.recentralize,
      )
    else:
      masks[path] = mask
  metadata = dict(
    tool="fq-jax compress",
    source=os.path.basename(args.weights),
    sparsity=args.sparsity,
    bits=args.bits,
    w_sep=args.w_sep,
    rules=list(args.rules),
    seed=args.seed,
  )
  data = fq.encode_model(
    arrays,
    focus=focus,
    masks=masks,
    coder=args.coder,
    metadata=metadata,
    float_dtype=args.float_dtype,
  )
  with open(args.out, "wb") as fh:
    fh.write(data)
  s = fq.artifact_summary(data)
  kept = sum(r["kept"] for r in s["layers"] if r["kind"] != "raw")
  pruned = 1 - kept / s["kernel_values"] if s["kernel_values"] else 0.0
  paper = s["paper_style_compression_ratio"]
  print(
    f"{args.out}: {s['file_bytes']:,} bytes ({args.coder}) from {args.weights} "
    f"({os.path.getsize(args.weights):,} bytes, {s['num_values']:,} values = "
    f"{s['float32_bytes']:,} bytes as float32): compression ratio "
    f"{s['compression_ratio']:.2f}x, paper-style {paper or 0:.2f}x over "
    f"{len(focus) + len(masks)} compressed arrays ({pruned:.1%} pruned)"
  )
  return 0


# ----------------------------------------------------------------------------
# inspect / decompress
# ----------------------------------------------------------------------------


def _load_fqz(path: str):
  import fq_jax as fq

  if not os.path.exists(path):
    raise CLIError(f"{path}: no such file")
  try:
    return fq.load_fqz(path)
  except fq.FormatError as e:
    raise CLIError(f"{path}: {e}") from None


def _fmt(v, spec: str = "") -> str:
  return "" if v is None else format(v, spec)


def format_table(summary: dict) -> str:
  """The per-array table and totals printed by `fq-jax inspect`."""
  cols = [
    "path",
    "shape",
    "kept",
    "sparsity",
    "kind",
    "bits",
    "mu",
    "sigma",
    "bias",
    "alpha",
    "bytes",
    "bits/kept",
    "bound",
  ]
  rows = []
  for r in summary["layers"]:
    coded = r["kind"] != "raw"
    focused = r["kind"] in ("recentralized", "shift")
    rows.append(
      [
        r["path"],
        "x".join(map(str, r["shape"])) or "()",
        str(r["kept"]) if coded else "",
        f"{r['sparsity']:.3f}" if coded else "",
        r["kind"] if r["kind"] != "raw" else f"raw:{r['stored']}",
        str(r["bits"]) if focused else "",
        "{:g},{:g}".format(*r["mu"]) if focused and r["recentralized"] else "",
        f"{r['sigma']:.4g}" if focused and r["recentralized"] else "",
        str(r["bias"]) if focused else "",
        f"{r['alpha']:.4g}" if focused else "",
        str(r["section_bytes"]),
        f"{r['bits_per_kept']:.3f}" if coded else "",
        f"{r['entropy_bound_bytes']:.0f}" if coded else "",
      ]
    )
  widths = [
    max(len(c), *(len(row[i]) for row in rows)) if rows else len(c) for i, c in enumerate(cols)
  ]
  line = lambda cells: "  ".join(
    c.ljust(w) if i in (0, 1, 4) else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
  )
  out = [line(cols), line(["-" * w for w in widths])] + [line(r) for r in rows]
  s = summary
  overhead = s["coder_overhead"]
  out += [
    "",
    f"file: {s['file_bytes']:,} bytes (header {s['header_bytes']:,}), coder {s['coder']}, "
    f"format {'.'.join(map(str, s['version']))}",
    f"values: {s['num_values']:,} ({s['float32_bytes']:,} bytes as float32)",
    f"compression ratio: {s['compression_ratio']:.3f}x (4 bytes x every value / file size)",
    f"paper-style ratio: {_fmt(s['paper_style_compression_ratio'], '.3f')}x over "
    f"{s['kernel_values']:,} compressed values in {s['kernel_section_bytes']:,} bytes",
    f"entropy bound: {s['entropy_bound_bytes']:,.0f} bytes for the coded streams, "
    f"coded in {s['coded_bytes']:,.0f} bytes (overhead "
    f"{'n/a' if overhead is None else f'{100 * overhead:.2f}%'}); "
    f"file bound {s['file_entropy_bound_bytes']:,.0f} bytes",
  ]
  return "\n".join(out)


def _add_inspect(p: argparse.ArgumentParser):
  p.add_argument("model", metavar="MODEL.fqz")
  p.add_argument("--json", action="store_true", help="print the summary as JSON")


def _run_inspect(args) -> int:
  import fq_jax as fq

  summary = fq.artifact_summary(_load_fqz(args.model))
  if args.json:
    print(json.dumps(summary, indent=1))
  else:
    print(format_table(summary))
  return 0


def _add_decompress(p: argparse.ArgumentParser):
  p.add_argument("model", metavar="MODEL.fqz")
  p.add_argument(
    "--out",
    required=True,
    metavar="PARAMS.npz",
    help="output .npz (keys are the array paths; bfloat16 arrays are written as float32, exactly)",
  )


def _run_decompress(args) -> int:
  import ml_dtypes
  import numpy as np

  decoded = _load_fqz(args.model)
  arrays = {
    k: (v.astype(np.float32) if v.dtype == ml_dtypes.bfloat16 else v)
    for k, v in decoded.arrays.items()
  }
  with open(args.out, "wb") as fh:
    np.savez(fh, **arrays)
  print(f"{args.out}: {len(arrays)} arrays, {sum(a.size for a in arrays.values()):,} values")
  return 0


COMMANDS: list[Command] = [
  Command(
    "compress",
    "compress an .npz of weights into an .fqz artifact (post-training)",
    _add_compress,
    _run_compress,
  ),
  Command(
    "inspect",
    "print the per-layer table and the compression ratio of an .fqz file",
    _add_inspect,
    _run_inspect,
  ),
  Command(
    "decompress",
    "rebuild the arrays of an .fqz file into an .npz",
    _add_decompress,
    _run_decompress,
  ),
]

# evaluate: test accuracy on the integer (multiplication-free) or float path (fq_jax/_src/integer_cli.py).
from fq_jax.cli import evaluate as _integer_cli  # noqa: E402  (no jax import at load time)

COMMANDS.append(
  Command("evaluate", _integer_cli.HELP, _integer_cli.add_arguments, _integer_cli.run)
)


def build_parser() -> argparse.ArgumentParser:
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
  message = " ".join(message.split())
  print(f"{PROG}: error: {message}", file=sys.stderr)
  return 1


if __name__ == "__main__":
  sys.exit(main())
