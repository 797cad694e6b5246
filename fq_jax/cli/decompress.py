"""`fq-jax decompress`: the arrays of an `.fqz` file, rebuilt into an `.npz`.

    fq-jax decompress MODEL.fqz --out PARAMS.npz

Every array name is checked before anything is written (`fq_jax.codec.npz.check_npz_names`): a
name the `.npz` could not give back as itself is a one-line error, never a lost or planted
array. The file is written atomically.
"""

from __future__ import annotations

import argparse

import ml_dtypes
import numpy as np

from fq_jax.cli import common
from fq_jax.codec import npz as npz_lib

HELP = "rebuild the arrays of an .fqz file into an .npz"


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("model", metavar="MODEL.fqz")
  p.add_argument(
    "--out",
    required=True,
    metavar="PARAMS.npz",
    help="output .npz (keys are the array paths; bfloat16 arrays are written as float32, exactly)",
  )


def run(args: argparse.Namespace) -> int:
  common.check_input(args.model)
  common.check_output(args.out, [args.model])
  decoded = common.load_fqz(args.model)
  try:
    npz_lib.check_npz_names(decoded.arrays)  # before decoding the arrays' values
  except ValueError as e:
    raise common.CLIError(f"{args.model}: {e}") from None
  # np.load has no bfloat16: widen it to float32 (exact).
  arrays = {
    k: (v.astype(np.float32) if v.dtype == ml_dtypes.bfloat16 else v)
    for k, v in decoded.arrays.items()
  }
  try:
    npz_lib.save_npz(args.out, arrays)
  except ValueError as e:
    raise common.CLIError(f"{args.model}: {e}") from None
  print(f"{args.out}: {len(arrays)} arrays, {sum(a.size for a in arrays.values()):,} values")
  return 0
