"""The fq-jax command line: compress / inspect / decompress and its one-line errors."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import fq_jax as fq
from fq_jax import cli
from fq_jax.codec import posttrain

REPO = pathlib.Path(__file__).resolve().parents[1]
RESNET20 = REPO.parent / "shared" / "models" / "resnet20-cifar10.npz"


def torch_style_weights():
  """A small PyTorch-style state dict: OIHW convs, (out, in) linear, BN buffers."""
  rng = np.random.default_rng(0)
  return {
    "conv1.weight": (rng.normal(size=(16, 3, 3, 3)) * 0.2).astype(np.float32),
    "bn1.weight": rng.uniform(0.5, 1.5, 16).astype(np.float32),
    "bn1.running_var": rng.uniform(0.5, 1.5, 16).astype(np.float32),
    "bn1.num_batches_tracked": np.array(1234, np.int64),
    "layer1.0.conv1.weight": (rng.normal(size=(16, 16, 3, 3)) * 0.1).astype(np.float32),
    "fc.weight": (rng.normal(size=(10, 16)) * 0.3).astype(np.float32),
    "fc.bias": rng.normal(size=10).astype(np.float32),
  }


def run(argv, capsys):
  rc = cli.main([str(a) for a in argv])
  out, err = capsys.readouterr()
  return rc, out, err


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
  path = tmp_path_factory.mktemp("cli") / "weights.npz"
  np.savez(path, **torch_style_weights())
  return path


def test_compress_inspect_decompress(weights, tmp_path, capsys):
  out = tmp_path / "model.fqz"
  rc, stdout, err = run(
    [
      "compress",
      weights,
      "--out",
      out,
      "--sparsity",
      "0.5",
      "--bits",
      "5",
      "--rules",
      r"fc\.weight:sparsity=0",
      r"^conv1\.weight:quantize=false",
    ],
    capsys,
  )
  assert rc == 0, err
  assert "compression ratio" in stdout and str(out) in stdout and len(stdout.splitlines()) == 1
  size = os.path.getsize(out)

  rc, stdout, err = run(["inspect", out, "--json"], capsys)
  assert rc == 0, err
  s = json.loads(stdout)
  values = sum(a.size for a in torch_style_weights().values())
  assert s["compression_ratio"] == 4 * values / size
  rows = {r["path"]: r for r in s["layers"]}
  assert rows["layer1.0.conv1.weight"]["kind"] in ("recentralized", "shift")
  assert rows["layer1.0.conv1.weight"]["sparsity"] == 0.5
  assert rows["fc.weight"]["sparsity"] == 0.0 and rows["fc.weight"]["bits"] == 5
  assert rows["conv1.weight"]["kind"] == "pruned"
  assert rows["bn1.num_batches_tracked"]["kind"] == "raw"
  assert s["metadata"]["tool"] == "fq-jax compress" and s["metadata"]["sparsity"] == 0.5

  rc, stdout, err = run(["inspect", out], capsys)
  assert rc == 0, err
  assert stdout.splitlines()[0].split()[:5] == ["path", "shape", "kept", "sparsity", "kind"]
  assert "compression ratio" in stdout and "layer1.0.conv1.weight" in stdout

  npz = tmp_path / "back.npz"
  rc, stdout, err = run(["decompress", out, "--out", npz], capsys)
  assert rc == 0, err
  back = dict(np.load(npz, allow_pickle=False))
  original = torch_style_weights()
  decoded = fq.load_fqz(out)
  assert list(back) == list(original)
  for k, v in original.items():
    assert back[k].dtype == v.dtype and back[k].shape == v.shape
    np.testing.assert_array_equal(back[k], decoded.arrays[k])
  for k in ("bn1.weight", "bn1.running_var", "bn1.num_batches_tracked", "fc.bias"):
    np.testing.assert_array_equal(back[k], original[k])
  assert (
    np.count_nonzero(back["layer1.0.conv1.weight"]) <= original["layer1.0.conv1.weight"].size // 2
  )


def test_huffman_and_dense_rules(weights, tmp_path, capsys):
  out = tmp_path / "h.fqz"
  rc, _, err = run(
    [
      "compress",
      weights,
      "--out",
      out,
      "--coder",
      "huffman",
      "--sparsity",
      "0.5",
      "--rules",
      r"fc\.:prune=false,quantize=false",
    ],
    capsys,
  )
  assert rc == 0, err
  d = fq.load_fqz(out)
  assert d.coder == "huffman" and "fc.weight" not in d.masks
  np.testing.assert_array_equal(d.arrays["fc.weight"], torch_style_weights()["fc.weight"])
  assert set(d.focus) == {"conv1.weight", "layer1.0.conv1.weight"}


@pytest.mark.parametrize(
  "argv, message",
  [
    (["inspect", "missing.fqz"], "missing.fqz: no such file"),
    (["decompress", "missing.fqz", "--out", "x.npz"], "no such file"),
    (["compress", "missing.npz", "--out", "x.fqz"], "missing.npz: no such file"),
    (["compress", "{text}", "--out", "x.fqz"], "not a readable .npz"),
    (["compress", "{objects}", "--out", "x.fqz"], "array 'o'"),
    (["compress", "{strings}", "--out", "x.fqz"], "array 's': unsupported dtype"),
    (["compress", "{npy}", "--out", "x.fqz"], "not an .npz archive"),
    (["inspect", "{corrupt}"], "CRC mismatch"),
    (["inspect", "{text}"], "bad magic"),
    (
      ["compress", "{weights}", "--out", "x.fqz", "--rules", "noequals"],
      "is not 'REGEX:key=value,...'",
    ),
    (["compress", "{weights}", "--out", "x.fqz", "--rules", "a:bits=9"], "bits must be"),
    (["compress", "{weights}", "--out", "x.fqz", "--rules", "a:color=red"], "unknown setting"),
    (["compress", "{weights}", "--out", "x.fqz", "--rules", "(:bits=4"], "not a regex"),
    (["compress", "{weights}", "--out", "x.fqz", "--rules", "a:prune=maybe"], "prune='maybe'"),
  ],
)
def test_errors_are_one_line(argv, message, weights, tmp_path, capsys):
  rng = np.random.default_rng(0)
  (tmp_path / "t.txt").write_text("hello, not an archive\n" * 3)
  np.savez(tmp_path / "o.npz", o=np.array([{"a": 1}, None], dtype=object))
  np.savez(tmp_path / "s.npz", s=np.array(["ab", "cd"]))
  np.save(tmp_path / "a.npy", rng.normal(size=3))
  good = fq.encode_model({"w": np.arange(10.0)})
  (tmp_path / "c.fqz").write_bytes(good[:-2] + bytes([good[-2] ^ 1]) + good[-1:])
  names = dict(
    text=tmp_path / "t.txt",
    objects=tmp_path / "o.npz",
    strings=tmp_path / "s.npz",
    npy=tmp_path / "a.npy",
    corrupt=tmp_path / "c.fqz",
    weights=weights,
  )
  argv = [a.format(**names) for a in argv]
  cwd = os.getcwd()
  os.chdir(tmp_path)
  try:
    rc, out, err = run(argv, capsys)
  finally:
    os.chdir(cwd)
  assert rc == 1
  assert len(err.strip().splitlines()) == 1, err
  assert err.startswith("fq-jax: error: ") and message in err and "Traceback" not in err


@pytest.mark.parametrize(
  "argv, message",
  [
    (["compress", "w.npz", "--out", "x.fqz", "--bits", "9"], "bits must be in [2, 8]"),
    (["compress", "w.npz", "--out", "x.fqz", "--sparsity", "1.5"], "sparsity must be in [0, 1)"),
    (["compress", "w.npz", "--out", "x.fqz", "--coder", "zip"], "invalid choice"),
    (["compress", "w.npz"], "--out"),
    (["frobnicate"], "invalid choice"),
    ([], "required"),
  ],
)
def test_bad_flags_are_one_line_usage_errors(argv, message, capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(argv)
  assert exit_info.value.code == 2
  _, err = capsys.readouterr()
  assert len(err.strip().splitlines()) == 1 and message in err, err


def test_python_dash_m_reports_one_line(tmp_path):
  proc = subprocess.run(
    [sys.executable, "-m", "fq_jax", "inspect", str(tmp_path / "no.fqz")],
    capture_output=True,
    text=True,
    cwd=REPO,
    timeout=120,
  )
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines() == [f"fq-jax: error: {tmp_path / 'no.fqz'}: no such file"]


def test_padded_magnitude_mask_is_the_cores():
  """posttrain.magnitude_mask pads to a bucket under one jit: the mask must not change."""
  rng = np.random.default_rng(0)
  w = rng.normal(size=(6, 7)).astype(np.float32)
  w[0, :3] = 0.5  # ties
  w[1, 1] = np.nan
  w[2, 2] = np.inf
  big = rng.normal(size=(70_001,)).astype(np.float32)  # the next bucket
  big[:100] = 0.25
  for x in (w, big):
    for s in (0.0, 0.3, 0.5, 0.9):
      want = np.asarray(fq.magnitude_mask(x, s))
      np.testing.assert_array_equal(posttrain.magnitude_mask(x, s), want)
      assert (~want).sum() == round(s * x.size)


def test_commands_are_registered_in_one_place():
  names = [c.name for c in cli.COMMANDS]
  assert names[:3] == ["compress", "inspect", "decompress"]
  parser = cli.build_parser()
  assert parser.parse_args(["inspect", "m.fqz", "--json"]).json is True


def test_real_resnet20(tmp_path, capsys):
  if not RESNET20.is_file():
    pytest.skip(f"needs ../shared/models/resnet20-cifar10.npz (not found at {RESNET20})")
  out = tmp_path / "r20.fqz"
  rc, stdout, err = run(
    ["compress", RESNET20, "--out", out, "--sparsity", "0.7", "--bits", "5"], capsys
  )
  assert rc == 0, err
  rc, stdout, err = run(["inspect", out, "--json"], capsys)
  assert rc == 0, err
  s = json.loads(stdout)
  original = dict(np.load(RESNET20))
  values = sum(a.size for a in original.values())
  assert s["compression_ratio"] == 4 * values / os.path.getsize(out)
  assert s["num_values"] == values == 271098
  kernels = [r for r in s["layers"] if r["kind"] != "raw"]
  assert len(kernels) == 20 and all(abs(r["sparsity"] - 0.7) < 1e-3 for r in kernels)
  assert s["compression_ratio"] > 10 and s["coder_overhead"] < 0.05
  d = fq.load_fqz(out)
  for k, v in original.items():
    assert d.arrays[k].dtype == v.dtype and d.arrays[k].shape == v.shape
    if v.ndim < 2:
      np.testing.assert_array_equal(d.arrays[k], v)
