"""`fq-jax import-torch`: torchvision weights -> the flat Flax `.npz` that `init_from` reads.

    fq-jax import-torch --arch {resnet18,resnet50,mobilenet_v2} IN.pth --out OUT.npz [--width W]

`IN` is a torchvision state dict saved with `torch.save` (read with
`torch.load(weights_only=True)`: nothing is unpickled but tensors) or an `.npz` of the same torch
keys. `OUT.npz` holds one array per '/'-joined Flax variable path (`params/...`,
`batch_stats/...`). MobileNet-V1 has no torchvision weights (docs/imagenet.md).
"""

from __future__ import annotations

import argparse

from fq_jax.cli import common

NAME = "import-torch"
HELP = "convert torchvision ResNet-18/50 or MobileNet-V2 weights to a flat Flax .npz"


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """Declares the command's arguments."""
  from fq_jax.models.torch_import import TORCHVISION_ARCHS

  parser.add_argument(
    "--arch",
    required=True,
    choices=TORCHVISION_ARCHS,
    help="torchvision architecture (MobileNet-V1 has no torchvision weights)",
  )
  parser.add_argument("input", metavar="IN", help="state dict: .pth/.pt (torch.save) or .npz")
  parser.add_argument("--out", required=True, metavar="OUT.npz", help="flat Flax .npz to write")
  parser.add_argument(
    "--width", type=float, default=1.0, help="MobileNet-V2 width multiplier (default 1.0)"
  )


def run(args: argparse.Namespace) -> int:
  """Converts `args.input` and writes `args.out` atomically; errors are `CLIError`s."""
  from fq_jax.codec import npz as npz_lib
  from fq_jax.models import torch_import

  common.check_input(args.input)
  common.check_output(args.out, [args.input])
  try:
    variables = torch_import.import_torchvision(args.input, args.arch, width=args.width)
  except ImportError as e:
    raise common.CLIError(f"{args.input}: reading torch weights needs torch ({e})") from None
  except Exception as e:  # bad keys or shapes, or content that weights_only refuses
    first = (str(e).splitlines() or [type(e).__name__])[0]
    where = "" if first.startswith(args.input) else f"{args.input}: "
    raise common.CLIError(f"{where}{first}") from None
  flat = torch_import.flat_variables(variables)
  npz_lib.save_npz(args.out, flat)
  count = sum(int(v.size) for k, v in flat.items() if k.startswith("params/"))
  print(f"{args.arch}: {len(flat)} arrays, {count:,} parameters -> {args.out}")
  return 0
