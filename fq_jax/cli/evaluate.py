"""`fq-jax evaluate`: test accuracy of a model file, the accuracy as the headline line.

    fq-jax evaluate MODEL.fqz [--integer] [--data-dir DIR] [--limit N] [--json]
    fq-jax evaluate WEIGHTS.npz --model NAME [--depth N] --dataset NAME [--data-dir DIR]

An `.fqz` describes itself (architecture, dataset name, activation scales, batch-norm width; see
docs/integer_inference.md): the float path (quantization simulated) by default, the integer
path with `--integer`, then its operation counts. An `.npz` of float weights (flat Flax paths
`params/...` and `batch_stats/...`, or a PyTorch CIFAR ResNet state dict as shipped in
../shared/models) names neither, so `--model` and `--dataset` are required; it is evaluated in
float, as stored. Registered in `fq_jax.cli.COMMANDS`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
import time

import jax
import numpy as np

from fq_jax import data as data_lib
from fq_jax import integer as integer_models
from fq_jax import models
from fq_jax._src import tables
from fq_jax.cli import common
from fq_jax.codec import npz as npz_lib

HELP = (
  "top-1 accuracy of an .fqz model (--integer: multiplication-free path; op counts) "
  "or of float .npz weights on a test set"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("weights", metavar="MODEL.fqz|WEIGHTS.npz|WEIGHTS.pth")
  p.add_argument(
    "--model",
    choices=models.MODEL_NAMES,
    default=None,
    metavar="NAME",
    help="architecture of an .npz: " + ", ".join(models.MODEL_NAMES) + "\n"
    "(an .fqz names its own; if given, it must agree)",
  )
  p.add_argument(
    "--depth",
    type=common.positive_int_arg,
    default=None,
    metavar="N",
    help="cifar_resnet depth 6n+2 (default: inferred from the arrays)",
  )
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
  p.add_argument(
    "--dataset",
    default=None,
    metavar="NAME",
    help="test set: digits, cifar10 or imagenet2012 (required for an .npz;\n"
    "default for an .fqz: the one its metadata names)",
  )
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


def run(args: argparse.Namespace) -> int:
  common.check_input(args.weights)
  if args.weights.lower().endswith(_TORCH_SUFFIXES):  # torch.save writes zip archives too
    return _run_npz(args)
  with open(args.weights, "rb") as f:
    is_npz = f.read(2) == b"PK"  # a zip archive; an .fqz starts with its own magic
  return (_run_npz if is_npz else _run_fqz)(args)


_TORCH_SUFFIXES = (".pth", ".pt")


def _load_float_arrays(path: str) -> dict[str, np.ndarray]:
  """The named arrays of an `.npz`, or of a PyTorch `.pth`/`.pt` (read weights-only)."""
  if not path.lower().endswith(_TORCH_SUFFIXES):
    return npz_lib.load_npz(path)
  from fq_jax.models import torch_import

  try:
    return torch_import.load_torch_state(path)
  except ImportError as e:
    raise ValueError(f"reading a .pth needs torch (pip install -e '.[torch]'): {e}") from None
  except Exception as e:  # what torch.load(weights_only=True) refuses, or a damaged file
    raise ValueError(f"not a readable PyTorch state dict: {str(e).splitlines()[0]}") from None


def _progress(args):
  if sys.stderr.isatty() and not args.json:
    return lambda n: print(f"\r{n} examples", end="", file=sys.stderr, flush=True)
  return None


def _run_fqz(args: argparse.Namespace) -> int:
  decoded = common.load_fqz(args.weights)
  try:
    spec = integer_models.model_spec(decoded)
  except ValueError as e:
    raise common.CLIError(f"{args.weights}: {e}") from None
  for flag, given, stored in (
    ("--model", args.model, spec.name),
    ("--depth", args.depth, spec.kwargs.get("depth")),
  ):
    if given is not None and given != stored:
      raise common.CLIError(f"{args.weights}: the file holds {flag[2:]} {stored}, not {given}")
  if args.integer and not (spec.activation_bits and spec.activation_scales):
    raise common.CLIError(
      f"{args.weights}: the file records no activation scales, so it has no integer path "
      "(write it with train.py --config.quant.activation_bits=8)"
    )
  dataset = args.dataset or spec.dataset
  if not dataset:
    raise common.CLIError(f"{args.weights}: the file's metadata names no dataset; pass --dataset")
  progress = _progress(args)
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
  except (FileNotFoundError, ValueError) as e:
    raise common.CLIError(f"{args.weights}: {e}") from None
  finally:
    if progress is not None:
      print("\r", end="", file=sys.stderr)
  ops = None
  if spec.activation_bits and spec.activation_scales:
    model = integer_models.IntegerModel(decoded, bn_bits=args.bn_bits)
    shape = _input_shape(dataset)
    ops = model.count_ops(shape)
  if args.json:
    print(json.dumps({"file": args.weights, **result, "ops": ops}, indent=1, default=str))
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
    f"{args.weights}: {spec.name}{depth} on {dataset} test, {what}: top-1 {result['accuracy']:.4f} "
    f"({result['correct']}/{result['count']}) in {result['seconds']:.1f} s"
  )
  if ops is not None:
    print(format_ops(ops, layers=args.layers))
  else:
    print("no operation counts: the file records no activation scales (no integer path)")
  return 0


def _input_shape(dataset: str) -> tuple[int, int, int]:
  try:
    return data_lib.get_dataset(dataset).input_shape
  except ValueError as e:
    raise common.CLIError(str(e)) from None


# ----------------------------------------------------------------------------
# Float weights (.npz)
# ----------------------------------------------------------------------------

_COLLECTIONS = ("params", "batch_stats")


def _nest(flat: dict[str, np.ndarray]) -> dict:
  """'params/a/b' -> {'params': {'a': {'b': ...}}}."""
  tree: dict = {}
  for path, value in flat.items():
    *parents, leaf = path.split("/")
    node = tree
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value
  return tree


def _flat(tree, prefix: str = "") -> dict[str, tuple[int, ...]]:
  """The '/'-joined path -> shape of every leaf of a nested dict (of arrays or shape structs)."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat(value, f"{prefix}{key}/"))
    else:
      out[f"{prefix}{key}"] = tuple(value.shape)
  return out


def float_variables(arrays: dict[str, np.ndarray], name: str, depth: int | None, source: str):
  """The Flax module and variables of an `.npz` of float weights.

  Args:
    arrays: the file's arrays: flat Flax paths (`params/...`, `batch_stats/...`) or, for
      "cifar_resnet", a PyTorch state dict (`conv1.weight`, `layer1.0.bn1.running_mean`, ...).
    name: the model registry name (`fq_jax.models.MODEL_NAMES`).
    depth: the cifar_resnet depth, or None to infer it from the arrays.
    source: the file, for messages.

  Returns:
    `(module, variables)`.

  Raises:
    ValueError: one line, for arrays that are neither layout or a model that cannot be built.
  """
  if depth is not None and name != "cifar_resnet":
    raise ValueError(f"--depth applies to cifar_resnet, not {name}")
  kwargs: dict = {}
  if not any("/" in k for k in arrays):  # a PyTorch state dict
    from fq_jax.models import torch_import

    if name in torch_import.TORCHVISION_ARCHS:
      variables = torch_import.import_torchvision(arrays, name)
    elif name == "cifar_resnet":
      depth, variables = models.torch_state_to_flax(arrays, depth, source=source)
    else:
      raise ValueError(
        f"holds PyTorch-style keys ({next(iter(arrays), '')!r}, ...): read only for "
        f"cifar_resnet and {', '.join(torch_import.TORCHVISION_ARCHS)}"
      )
  else:
    stray = [k for k in arrays if k.split("/", 1)[0] not in _COLLECTIONS]
    if stray:
      raise ValueError(
        f"array {stray[0]!r} is under neither params/ nor batch_stats/ (a flat Flax .npz) "
        "and is no PyTorch state-dict key"
      )
    variables = _nest(arrays)
    if name == "cifar_resnet" and depth is None:
      blocks = [re.match(r"params/stage1_block(\d+)/", k) for k in arrays]
      depth = 6 * (max([int(m.group(1)) for m in blocks if m], default=2) + 1) + 2
  if name == "cifar_resnet":
    kwargs["depth"] = depth
  head = variables.get("params", {}).get("head", {}).get("kernel")
  if head is not None:
    kwargs["num_classes"] = int(head.shape[-1])
  return models.get_model(name, **kwargs), variables


def _check_fits(module, variables, images: np.ndarray) -> None:
  """ValueError naming the first missing, unexpected or misshapen array of `variables`."""
  init = lambda x: module.init(jax.random.key(0), x, train=False)  # noqa: E731
  want = _flat(jax.eval_shape(init, jax.ShapeDtypeStruct(images.shape, np.float32)))
  have = _flat(variables)
  for problem, paths in (
    ("misses", [p for p in want if p not in have]),
    ("has unexpected arrays", [p for p in have if p not in want]),
  ):
    if paths:
      more = f" and {len(paths) - 3} more" if len(paths) > 3 else ""
      raise ValueError(f"{problem} for the model: {', '.join(paths[:3])}{more}")
  for path, shape in want.items():
    if have[path] != shape:
      raise ValueError(f"array {path!r} has shape {have[path]}, the model needs {shape}")


def evaluate_float(
  module, variables, batches, *, progress=None
) -> dict:  # the float loop of integer_models.evaluate_fqz, for weights with no .fqz
  """Top-1 accuracy of `module.apply(variables, x, train=False)` over (images, labels) batches."""
  apply = jax.jit(lambda v, x: module.apply(v, x, train=False))
  correct = count = 0
  start = time.perf_counter()
  for x, y in batches:
    correct += int(np.sum(np.argmax(np.asarray(apply(variables, x)), axis=-1) == np.asarray(y)))
    count += len(y)
    if progress is not None:
      progress(count)
  return {
    "accuracy": correct / count,
    "correct": correct,
    "count": count,
    "seconds": time.perf_counter() - start,
  }


def _run_npz(args: argparse.Namespace) -> int:
  where = args.weights
  if args.integer:
    raise common.CLIError(
      f"{where}: float weights have no integer path (--integer needs an .fqz with activation "
      "scales)"
    )
  if args.model is None or args.dataset is None:
    missing = " and ".join(
      f for f, v in (("--model", args.model), ("--dataset", args.dataset)) if v is None
    )
    raise common.CLIError(f"{where}: an .npz names no architecture or dataset: pass {missing}")
  try:
    arrays = _load_float_arrays(where)
    module, variables = float_variables(arrays, args.model, args.depth, where)
    batches = integer_models.test_batches(
      args.dataset, data_dir=args.data_dir, limit=args.limit, batch_size=args.batch_size or 500
    )
    first = next(batches, None)
    if first is None:
      raise ValueError(f"no test examples in {args.dataset}")
    _check_fits(module, variables, first[0])
  except (FileNotFoundError, ValueError) as e:
    message = str(e)  # the loaders name the file themselves, the checks here do not
    raise common.CLIError(message if message.startswith(where) else f"{where}: {message}") from None
  progress = _progress(args)
  try:
    result = evaluate_float(module, variables, itertools.chain([first], batches), progress=progress)
  finally:
    if progress is not None:
      print("\r", end="", file=sys.stderr)
  depth = f"-{module.depth}" if args.model == "cifar_resnet" else ""
  result.update(path="float", model=args.model, dataset=args.dataset)
  if args.json:
    print(json.dumps({"file": where, **result}, indent=1))
    return 0
  print(
    f"{where}: {args.model}{depth} on {args.dataset} test, float weights as stored: top-1 "
    f"{result['accuracy']:.4f} ({result['correct']}/{result['count']}) in "
    f"{result['seconds']:.1f} s"
  )
  return 0
