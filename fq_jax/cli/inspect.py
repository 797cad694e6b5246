"""`fq-jax inspect`: the per-array table and the compression ratios of an `.fqz` file.

    fq-jax inspect MODEL.fqz [--json]

Paths come from the file: the table escapes their control characters (`fq_jax._src.tables`),
and `--json` escapes them as JSON does, so a crafted file cannot write to the terminal.
"""

from __future__ import annotations

import argparse
import json

from fq_jax._src import tables
from fq_jax.cli import common
from fq_jax.codec import artifact_summary

HELP = "print the per-layer table and the compression ratio of an .fqz file"

COLUMNS = (
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
)


def _row(r: dict) -> list[str]:
  coded = r["kind"] != "raw"
  focused = r["kind"] in ("recentralized", "shift")
  recentralized = focused and r["recentralized"]
  return [
    r["path"],
    "x".join(map(str, r["shape"])) or "()",
    str(r["kept"]) if coded else "",
    f"{r['sparsity']:.3f}" if coded else "",
    r["kind"] if coded else f"raw:{r['stored']}",
    str(r["bits"]) if focused else "",
    "{:g},{:g}".format(*r["mu"]) if recentralized else "",
    f"{r['sigma']:.4g}" if recentralized else "",
    str(r["bias"]) if focused else "",
    f"{r['alpha']:.4g}" if focused else "",
    str(r["section_bytes"]),
    f"{r['bits_per_kept']:.3f}" if coded else "",
    f"{r['entropy_bound_bytes']:.0f}" if coded else "",
  ]


def format_summary(summary: dict) -> str:
  """The per-array table and the totals printed by `fq-jax inspect`.

  Args:
    summary: `fq.artifact_summary` of a file.

  Returns:
    The text (no trailing newline).
  """
  s = summary
  table = tables.format_table(
    [_row(r) for r in s["layers"]], COLUMNS, left={"path", "shape", "kind"}
  )
  overhead = s["coder_overhead"]
  paper = s["paper_style_compression_ratio"]
  lines = [
    table,
    "",
    f"file: {s['file_bytes']:,} bytes (header {s['header_bytes']:,}), coder {s['coder']}, "
    f"format {'.'.join(map(str, s['version']))}",
    f"values: {s['num_values']:,} ({s['float32_bytes']:,} bytes as float32)",
    f"compression ratio: {s['compression_ratio']:.3f}x (4 bytes x every value / file size)",
    f"paper-style ratio: {'' if paper is None else f'{paper:.3f}'}x over "
    f"{s['kernel_values']:,} compressed values in {s['kernel_section_bytes']:,} bytes",
    f"entropy bound: {s['entropy_bound_bytes']:,.0f} bytes for the coded streams, "
    f"coded in {s['coded_bytes']:,.0f} bytes (overhead "
    f"{'n/a' if overhead is None else f'{100 * overhead:.2f}%'}); "
    f"file bound {s['file_entropy_bound_bytes']:,.0f} bytes",
  ]
  return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("model", metavar="MODEL.fqz")
  p.add_argument("--json", action="store_true", help="print the summary as JSON")


def run(args: argparse.Namespace) -> int:
  summary = artifact_summary(common.load_fqz(args.model))
  if args.json:
    print(json.dumps(summary, indent=1))
  else:
    print(format_summary(summary))
  return 0
