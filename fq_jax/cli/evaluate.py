"""`fq-jax evaluate`: test accuracy of an .fqz model, on the integer path or in float.

    fq-jax evaluate MODEL.fqz --integer [--data-dir DIR] [--limit N] [--json]
    fq-jax evaluate MODEL.fqz            # the float model, quantization simulated

Everything comes from the file (architecture, dataset name, activation
scales, batch-norm width; see docs/integer_inference.md) plus the dataset.
Registered in `fq_jax.cli.COMMANDS`.
"""

from __future__ import annotations

import argparse
import json
import sys

from fq_jax._src import tables
from fq_jax.cli import common
from fq_jax.integer import executor as integer_models

HELP = "top-1 accuracy of an .fqz model on its test data (--integer: multiplication-free path) and its op counts"


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("model", metavar="MODEL.fqz")
  p.add_argument(
    "--integer",
    action="store_true",
    help="run the integer path: integer activations, shift-add convolutions and dense\n"
    "layers, integer batch norm (default: the float model with the file's\n"
    "activation and batch-norm quantization simulated)",
  )
  p.add_argument(
    "--data-dir",
    default=None,
    metavar="DIR",
    help="dataset location (cifar10: folder of cifar10-jpeg.tar.gz or the archive;\n"
    "default ../shared/data; imagenet2012: the tfds data_dir)",
  )
  p.add_argument("--dataset", default=None, help="override the file's dataset name")
  p.add_argument(
    "--limit",
    type=common.positive_int_arg,
    default=None,
    metavar="N",
    help="evaluate the first N test examples only",
  )
  p.add_argument(
    "--batch-size",
    type=common.positive_int_arg,
    default=None,
    metavar="B",
    help="examples per batch (default 100 integer, 500 float)",
  )
  p.add_argument(
    "--bn-bits",
    type=common.bn_bits_arg,
    default=None,
    metavar="N",
    help="integer batch-norm width of the integer path (default: the file's, else 16)",
  )
  p.add_argument("--layers", action="store_true", help="also print the per-layer operation counts")
  p.add_argument("--json", action="store_true", help="print the result as JSON")


def _m(n: float) -> str:
  return f"{n / 1e6:,.2f}M" if n >= 1e4 else f"{int(n):,}"


def format_ops(ops: dict, layers: bool = False) -> str:
  """Human-readable summary of `fq.count_integer_ops` (per image)."""
  t = ops["total"]
  lines = [
    f"operations per image (input {'x'.join(map(str, ops['input_shape'][1:]))}): the float model "
    f"{_m(t['float_macs'])} multiply-accumulates ({_m(t['kept_macs'])} with a kept weight)",
    f"  integer path, convolutions and dense layers: {_m(t['shifts'])} shifts, {_m(t['adds'])} "
    f"integer adds, {_m(t['multiplies'])} multiplies"
    + (f" (float layers: {', '.join(t['float_layers'])})" if t["float_layers"] else ""),
    f"  {ops['bn_bits']}-bit integer batch norm (sigma, alpha folded in): {_m(t['bn_multiplies'])} "
    f"multiplies (one per output and accumulator), {_m(t['bn_adds'])} adds, {_m(t['bn_shifts'])} shifts",
    f"  elsewhere (quantize, relu, residual adds, pooling): {_m(t['other_adds'])} adds, "
    f"{_m(t['other_shifts'])} shifts, {_m(t['other_compares'])} compares, "
    f"{_m(t['other_multiplies'])} multiplies",
  ]
  if t.get("float_multiplies"):
    lines.append(f"  float multiplies (layers kept in float): {_m(t['float_multiplies'])}")
  if layers:
    cols = (
      "layer",
      "kind",
      "quantizer",
      "float_macs",
      "kept_macs",
      "shifts",
      "adds",
      "multiplies",
      "bn_multiplies",
    )
    rows = [[r[c] for c in cols] for r in ops["layers"]]
    lines += ["", tables.format_table(rows, cols, left=cols[:3])]
  return "\n".join(lines)


def run(args) -> int:
  decoded = common.load_fqz(args.model)
  try:
    spec = integer_models.model_spec(decoded)
  except ValueError as e:
    raise common.CLIError(f"{args.model}: {e}") from None
  if args.integer and not (spec.activation_bits and spec.activation_scales):
    raise common.CLIError(
      f"{args.model}: the file records no activation scales, so it has no integer path "
      "(write it with train.py --config.quant.activation_bits=8)"
    )
  dataset = args.dataset or spec.dataset
  if not dataset:
    raise common.CLIError(f"{args.model}: the file's metadata names no dataset; pass --dataset")
  progress = None
  if sys.stderr.isatty() and not args.json:
    progress = lambda n: print(f"\r{n} examples", end="", file=sys.stderr, flush=True)  # noqa: E731
  try:
    result = integer_models.evaluate_fqz(
      decoded,
      integer=args.integer,
      data_dir=args.data_dir,
      limit=args.limit,
      batch_size=args.batch_size,
      dataset=dataset,
      bn_bits=args.bn_bits,
      progress=progress,
    )
  except FileNotFoundError as e:
    raise common.CLIError(str(e)) from None
  finally:
    if progress is not None:
      print("\r", end="", file=sys.stderr)
  ops = None
  if spec.activation_bits and spec.activation_scales:
    model = integer_models.IntegerModel(decoded, bn_bits=args.bn_bits)
    shape = _input_shape(dataset)
    ops = model.count_ops(shape)
  if args.json:
    print(json.dumps({"file": args.model, **result, "ops": ops}, indent=1, default=str))
    return 0
  what = (
    "integer path"
    if args.integer
    else "float path (weights as decoded"
    + (f", {spec.activation_bits}-bit activations simulated" if spec.activation_bits else "")
    + (f", {spec.bn_bits}-bit batch norm simulated" if spec.bn_bits else "")
    + ")"
  )
  if args.integer:
    what += (
      f" ({result['activation_bits']}-bit activations, {result['bn_bits']}-bit integer batch norm)"
    )
  depth = f"-{spec.kwargs['depth']}" if "depth" in spec.kwargs else ""
  print(
    f"{args.model}: {spec.name}{depth} on {dataset} test, {what}: top-1 {result['accuracy']:.4f} "
    f"({result['correct']}/{result['count']}) in {result['seconds']:.1f} s"
  )
  if ops is not None:
    print(format_ops(ops, layers=args.layers))
  else:
    print("no operation counts: the file records no activation scales (no integer path)")
  return 0


def _input_shape(dataset: str) -> tuple[int, int, int]:
  return {"digits": (8, 8, 1), "cifar10": (32, 32, 3)}.get(dataset, (224, 224, 3))
