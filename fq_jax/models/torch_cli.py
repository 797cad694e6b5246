"""The ``import-torch`` command: torchvision weights -> flat Flax ``.npz`` for ``init_from``.

    fq-jax import-torch --arch {resnet18,resnet50,mobilenet_v2} IN.pth --out OUT.npz [--width W]

``IN`` is a torchvision state dict saved with ``torch.save`` (read with
``torch.load(weights_only=True)``: no arbitrary unpickling) or an ``.npz`` of the same torch
keys. ``OUT.npz`` holds one array per ``/``-joined Flax variable path (``params/...``,
``batch_stats/...``), the format ``--config.init_from`` reads.

Self-contained (argparse only) so that the CLI package can register it as a subcommand::

    Command(NAME, HELP, torch_cli.add_arguments, torch_cli.run)

Errors are one line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import os
import sys

NAME = "import-torch"
HELP = "convert torchvision ResNet-18/50 or MobileNet-V2 weights to a flat Flax .npz"


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """Declares the command's arguments.

  Args:
    parser: the (sub)parser to fill.
  """
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
  """Converts ``args.input`` and writes ``args.out``.

  Args:
    args: parsed arguments (``arch``, ``input``, ``out``, ``width``).

  Returns:
    0 on success, 1 on error (reported as one line on stderr).
  """
  import numpy as np

  from fq_jax.models import torch_import

  prog = f"fq-jax {NAME}"
  if not os.path.isfile(args.input):
    print(f"{prog}: error: {args.input}: no such file", file=sys.stderr)
    return 1
  try:
    variables = torch_import.import_torchvision(args.input, args.arch, width=args.width)
  except Exception as e:  # bad keys/shapes, no torch, or content weights_only refuses
    first = (str(e).splitlines() or [type(e).__name__])[0]
    where = "" if first.startswith(args.input) else f"{args.input}: "
    print(f"{prog}: error: {where}{first}", file=sys.stderr)
    return 1
  flat = torch_import.flat_variables(variables)
  with open(args.out, "wb") as f:
    np.savez(f, **flat)
  count = sum(int(v.size) for k, v in flat.items() if k.startswith("params/"))
  print(f"{args.arch}: {len(flat)} arrays, {count:,} parameters -> {args.out}")
  return 0
