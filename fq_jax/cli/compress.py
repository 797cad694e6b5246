"""`fq-jax compress`: post-training compression of an `.npz` of named arrays into an `.fqz`.

    fq-jax compress WEIGHTS.npz --out MODEL.fqz [--sparsity S] [--bits N] [--w-sep W]
                    [--coder ans|huffman] [--rules RULE ...] [--seed N] [--float-dtype D]

The work is `fq_jax.codec.posttrain.compress_arrays`; this module parses and checks the
arguments, writes the file atomically and prints one summary line.
"""

from __future__ import annotations

import argparse
import os

from fq_jax.cli import common
from fq_jax.codec import artifact_summary, atomic, posttrain
from fq_jax.codec import npz as npz_lib

HELP = "compress an .npz of weights into an .fqz artifact (post-training)"

RULES_HELP = """\
Per-array overrides, tried in order before the default rule (which
compresses every floating array of rank >= 2, whatever its name). Each RULE
is REGEX:key=value,... (the grammar of the training configs): REGEX is
searched in the array's name (Python `re.search`; the part before the last
':') and the keys are bits=N (2..8), sparsity=S (0 <= S < 1), w_sep=W
(finite, >= 0), prune=BOOL, quantize=BOOL (false = prune only, keep float
values; prune=false,quantize=false stores the array losslessly),
recentralize=BOOL (false = plain shift quantization) and min_ndim=N
(default 2). Unset keys take the global flags. Example:
--rules 'conv1\\.weight$:bits=8,sparsity=0' 'fc\\.weight:quantize=false'"""


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("weights", metavar="WEIGHTS.npz", help="an .npz of named arrays")
  p.add_argument("--out", required=True, metavar="MODEL.fqz", help="output file")
  p.add_argument(
    "--sparsity",
    type=common.sparsity_arg,
    default=0.0,
    help="fraction of each compressed array pruned by magnitude (default 0)",
  )
  p.add_argument(
    "--bits", type=common.bits_arg, default=5, help="focused-quantization bit-width (default 5)"
  )
  p.add_argument(
    "--w-sep",
    type=common.w_sep_arg,
    default=2.0,
    dest="w_sep",
    help="Wasserstein separation threshold for recentralization (default 2.0)",
  )
  p.add_argument(
    "--coder", choices=("ans", "huffman"), default="ans", help="entropy coder (default ans)"
  )
  p.add_argument("--rules", nargs="+", action="extend", default=[], metavar="RULE", help=RULES_HELP)
  p.add_argument("--seed", type=common.seed_arg, default=0, help="seed for the component sampling")
  p.add_argument(
    "--float-dtype",
    choices=("float16", "bfloat16"),
    default=None,
    help="store uncompressed float arrays in this dtype (lossy; default lossless)",
  )


def run(args: argparse.Namespace) -> int:
  rules = common.parse_rules(args.rules)
  common.check_input(args.weights)
  common.check_output(args.out, [args.weights])
  try:
    arrays = npz_lib.load_npz(args.weights)
  except ValueError as e:
    raise common.CLIError(str(e)) from None
  metadata = dict(
    tool="fq-jax compress",
    source=os.path.basename(args.weights),
    sparsity=args.sparsity,
    bits=args.bits,
    w_sep=args.w_sep,
    rules=list(args.rules),
    seed=args.seed,
  )
  try:
    data = posttrain.compress_arrays(
      arrays,
      rules=rules,
      sparsity=args.sparsity,
      bits=args.bits,
      w_sep=args.w_sep,
      coder=args.coder,
      seed=args.seed,
      metadata=metadata,
      float_dtype=args.float_dtype,
    )
  except ValueError as e:
    raise common.CLIError(f"{args.weights}: {e}") from None
  atomic.atomic_write(args.out, data)
  s = artifact_summary(data)
  compressed = [r for r in s["layers"] if r["kind"] != "raw"]
  kept = sum(r["kept"] for r in compressed)
  pruned = 1 - kept / s["kernel_values"] if s["kernel_values"] else 0.0
  paper = s["paper_style_compression_ratio"]
  print(
    f"{args.out}: {s['file_bytes']:,} bytes ({args.coder}) from {args.weights} "
    f"({os.path.getsize(args.weights):,} bytes, {s['num_values']:,} values = "
    f"{s['float32_bytes']:,} bytes as float32): compression ratio "
    f"{s['compression_ratio']:.2f}x, paper-style {paper or 0:.2f}x over "
    f"{len(compressed)} compressed arrays ({pruned:.1%} pruned)"
  )
  return 0
