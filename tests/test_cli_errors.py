"""Bad `fq-jax` calls: each is refused with its one-line message, before anything is written."""

import os
import signal

import numpy as np
import pytest

import fq_jax as fq
from fq_jax import cli


@pytest.fixture
def files(tmp_path):
  """A folder with good and bad inputs; the tests run in it."""
  rng = np.random.default_rng(0)
  kernel = rng.normal(size=(4, 3, 3, 3)).astype(np.float32)
  np.savez(tmp_path / "w.npz", **{"conv.weight": kernel, "conv.bias": np.zeros(4, np.float32)})
  nan = kernel.copy()
  nan[0, 0, 0, 0] = np.nan
  np.savez(tmp_path / "nan.npz", **{"conv.weight": nan})
  inf = kernel.copy()
  inf[1, 2, 0, 1] = -np.inf
  inf[0, 0, 0, 0] = np.inf
  np.savez(tmp_path / "inf.npz", **{"fc.weight": inf.reshape(4, -1)})
  (tmp_path / "m.fqz").write_bytes(fq.encode_model({"w": np.arange(6.0).reshape(2, 3)}))
  os.mkfifo(tmp_path / "fifo")
  (tmp_path / "folder").mkdir()
  cwd = os.getcwd()
  os.chdir(tmp_path)
  yield tmp_path
  os.chdir(cwd)


COMPRESS = ["compress", "w.npz", "--out", "x.fqz"]

# (argv, exit status, a fragment of the message after "fq-jax[ COMMAND]: error: ")
BAD_CALLS = [
  # usage errors (argparse, exit 2): the flags' values
  (COMPRESS + ["--bits", "9"], 2, "argument --bits: bits must be in [2, 8], got 9"),
  (COMPRESS + ["--bits", "five"], 2, "argument --bits: invalid bit-width 'five'"),
  (COMPRESS + ["--sparsity", "1"], 2, "argument --sparsity: sparsity must be in [0, 1), got 1.0"),
  (COMPRESS + ["--sparsity", "nan"], 2, "argument --sparsity: invalid sparsity 'nan'"),
  (COMPRESS + ["--w-sep", "nan"], 2, "argument --w-sep: invalid w_sep 'nan'"),
  (COMPRESS + ["--w-sep", "inf"], 2, "argument --w-sep: invalid w_sep 'inf'"),
  (
    COMPRESS + ["--w-sep", "-1"],
    2,
    "argument --w-sep: w_sep must be a finite number >= 0, got -1.0",
  ),
  (COMPRESS + ["--seed", "1.5"], 2, "argument --seed: invalid seed '1.5'"),
  (COMPRESS + ["--coder", "zstd"], 2, "argument --coder: invalid choice: 'zstd'"),
  (["compress", "w.npz"], 2, "the following arguments are required: --out"),
  (["evaluate", "m.fqz", "--limit", "0"], 2, "argument --limit: must be positive, got 0"),
  (["evaluate", "m.fqz", "--bn-bits", "30"], 2, "argument --bn-bits: must be in [2, 24], got 30"),
  # rules (exit 1): the config grammar, then the same value checks as the flags
  (COMPRESS + ["--rules", "conv:w_sep=nan"], 1, "--rules: rule 'conv:w_sep=nan': w_sep='nan'"),
  (COMPRESS + ["--rules", "conv:w_sep=inf"], 1, "--rules: rule 'conv:w_sep=inf': w_sep='inf'"),
  (COMPRESS + ["--rules", "conv:w_sep=-1"], 1, "w_sep must be a finite number >= 0, got -1.0"),
  (COMPRESS + ["--rules", "conv:bits=9"], 1, "--rules: rule 'conv:bits=9': "),
  (COMPRESS + ["--rules", "conv:sparsity=1"], 1, "sparsity must be in [0, 1), got 1.0"),
  (COMPRESS + ["--rules", "conv:min_ndim=-1"], 1, "min_ndim must be an integer >= 0, got -1"),
  (COMPRESS + ["--rules", "conv:colour=red"], 1, "--rules: rule 'conv:colour=red': unknown"),
  (COMPRESS + ["--rules", "conv"], 1, "--rules: rule 'conv' is not 'REGEX:key=value,...'"),
  (COMPRESS + ["--rules", "conv=bits:8"], 1, "--rules: rule 'conv=bits:8': unknown setting '8'"),
  (COMPRESS + ["--rules", "(:bits=4"], 1, "is not a regex"),
  # files (exit 1)
  (["compress", "w.npz", "--out", "w.npz"], 1, "--out 'w.npz' is an input file"),
  (["compress", "w.npz", "--out", "./sub/../w.npz"], 1, "is an input file: refusing"),
  (["decompress", "m.fqz", "--out", "m.fqz"], 1, "--out 'm.fqz' is an input file"),
  (["compress", "w.npz", "--out", "nowhere/x.fqz"], 1, "no such folder"),
  (["compress", "w.npz", "--out", "folder"], 1, "--out 'folder' is a folder"),
  (["decompress", "m.fqz", "--out", "folder"], 1, "--out 'folder' is a folder"),
  (["compress", "fifo", "--out", "x.fqz"], 1, "fifo: not a regular file"),
  (["compress", "folder", "--out", "x.fqz"], 1, "folder: not a regular file"),
  (["inspect", "fifo"], 1, "fifo: not a regular file"),
  (["decompress", "fifo", "--out", "x.npz"], 1, "fifo: not a regular file"),
  (["evaluate", "fifo"], 1, "fifo: not a regular file"),
  (["inspect", "missing.fqz"], 1, "missing.fqz: no such file"),
  (["evaluate", "missing.fqz"], 1, "missing.fqz: no such file"),
  # evaluate: float weights
  (["evaluate", "w.npz"], 1, "w.npz: an .npz names no architecture or dataset: pass --model and"),
  (["evaluate", "w.npz", "--model", "digits_cnn"], 1, "pass --dataset"),
  (["evaluate", "w.npz", "--integer"], 1, "w.npz: float weights have no integer path"),
  (
    ["evaluate", "w.npz", "--model", "mobilenet_v1", "--dataset", "digits"],
    1,
    "PyTorch-style keys",
  ),
  (
    ["evaluate", "w.npz", "--model", "resnet18", "--dataset", "digits"],
    1,
    "missing key 'bn1.bias' for torchvision resnet18",
  ),
  (
    ["evaluate", "w.npz", "--model", "digits_cnn", "--depth", "8", "--dataset", "digits"],
    1,
    "--depth",
  ),
  (["evaluate", "w.npz", "--model", "vgg"], 2, "argument --model: invalid choice: 'vgg'"),
  # weights that cannot be compressed (exit 1, naming the array)
  (["compress", "nan.npz", "--out", "x.fqz"], 1, "array 'conv.weight' has 1 NaN or infinite"),
  (["compress", "inf.npz", "--out", "x.fqz"], 1, "array 'fc.weight' has 2 NaN or infinite"),
]


def _contents(folder):
  return {p.name: p.read_bytes() if p.is_file() else None for p in sorted(folder.iterdir())}


def _alarm(signum, frame):
  raise TimeoutError("the command blocked")


@pytest.mark.parametrize("argv, status, message", BAD_CALLS, ids=lambda x: None)
def test_bad_call_is_one_line(argv, status, message, files, capsys):
  (files / "sub").mkdir()
  before = _contents(files)
  old = signal.signal(signal.SIGALRM, _alarm)
  signal.alarm(60)  # a FIFO opened for reading would block forever
  try:
    try:
      rc = cli.main(argv)
    except SystemExit as e:
      rc = e.code
  finally:
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)
  out, err = capsys.readouterr()
  assert rc == status, err
  assert len(err.strip().splitlines()) == 1, err
  prefix = "fq-jax: error: " if status == 1 else f"fq-jax {argv[0]}: error: "
  assert err.startswith(prefix) and message in err, err
  assert "Traceback" not in err and out == ""
  assert _contents(files) == before  # nothing written or overwritten, no temporary file left
