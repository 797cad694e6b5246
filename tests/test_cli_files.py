"""What the CLI reads and writes: array names, atomic writes, no clobbering, escaped output."""

import os
import zipfile

import numpy as np
import pytest

import fq_jax as fq
from fq_jax import cli
from fq_jax._src import tables
from fq_jax.cli import decompress
from fq_jax.codec import npz as npz_lib


def run(argv, capsys):
  rc = cli.main([str(a) for a in argv])
  out, err = capsys.readouterr()
  return rc, out, err


def fqz_with(tmp_path, names, dtype=np.float32):
  arrays = {n: np.arange(4, dtype=dtype) + 10 * i for i, n in enumerate(names)}
  path = tmp_path / "m.fqz"
  path.write_bytes(fq.encode_model(arrays))
  return path, arrays


# Names np.savez loses, merges or plants (issue 14), each refused before anything is written.
BAD_NAMES = [
  (["conv1.weight\0evil", "conv1.weight"], "contains a NUL character"),
  (["a\0x", "a\0y"], "contains a NUL character"),
  (["w", "w.npy"], "cannot both be stored"),
  (["x" * 100_000], "bytes long (an .npz name holds at most 65,531)"),
  (["ok", "é" * 40_000], "80,000 bytes long"),
]


@pytest.mark.parametrize("names, message", BAD_NAMES, ids=range(len(BAD_NAMES)))
def test_decompress_refuses_names_the_npz_would_change(names, message, tmp_path, capsys):
  model, _ = fqz_with(tmp_path, names)
  out = tmp_path / "out.npz"
  out.write_bytes(b"previous")
  rc, stdout, err = run(["decompress", model, "--out", out], capsys)
  assert rc == 1 and stdout == ""
  assert len(err.strip().splitlines()) == 1 and message in err, err
  assert "\0" not in err and out.read_bytes() == b"previous"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["m.fqz", "out.npz"]


def test_decompress_refuses_a_lone_surrogate(tmp_path, capsys, monkeypatch):
  # The encoder cannot write one (its JSON is UTF-8) but a crafted header can (JSON "\ud800").
  class Decoded:
    arrays = {"a\ud800b": np.zeros(3, np.float32)}

  model, _ = fqz_with(tmp_path, ["w"])
  monkeypatch.setattr(decompress.common, "load_fqz", lambda path: Decoded)
  rc, _, err = run(["decompress", model, "--out", tmp_path / "o.npz"], capsys)
  assert rc == 1 and "lone surrogate" in err and "\\ud800" in err
  assert not (tmp_path / "o.npz").exists()


def test_decompress_keeps_every_representable_name(tmp_path, capsys):
  names = [
    "allow_pickle",
    "file",
    "arr_0",
    "a/b/../c",
    "é ü",
    "tab\there",
    "x.npy",
    "",
    "k" * 60_000,
  ]
  model, arrays = fqz_with(tmp_path, names)
  out = tmp_path / "out.npz"
  rc, stdout, err = run(["decompress", model, "--out", out], capsys)
  assert rc == 0, err
  with np.load(out, allow_pickle=False) as back:
    assert back.files == names
    for name in names:
      np.testing.assert_array_equal(back[name], arrays[name])
  assert npz_lib.load_npz(out).keys() == arrays.keys()


def test_save_npz_is_atomic(tmp_path, monkeypatch):
  out = tmp_path / "o.npz"
  out.write_bytes(b"previous")
  calls = []
  write = np.lib.format.write_array

  def fail_second(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
      raise OSError(28, "No space left on device")
    return write(*args, **kwargs)

  monkeypatch.setattr(np.lib.format, "write_array", fail_second)
  with pytest.raises(OSError, match="No space left"):
    npz_lib.save_npz(out, {"a": np.ones(3), "b": np.ones(4)})
  assert out.read_bytes() == b"previous" and os.listdir(tmp_path) == ["o.npz"]
  monkeypatch.undo()
  npz_lib.save_npz(out, {"a": np.ones(3), "b": np.ones(4)})
  assert zipfile.is_zipfile(out) and list(np.load(out)) == ["a", "b"]


def test_outputs_never_overwrite_inputs(tmp_path, capsys):
  np.savez(tmp_path / "w.npz", k=np.ones((4, 4), np.float32))
  (tmp_path / "link.npz").symlink_to(tmp_path / "w.npz")
  os.link(tmp_path / "w.npz", tmp_path / "hard.npz")
  weights = (tmp_path / "w.npz").read_bytes()
  for out in ("link.npz", "hard.npz", f"{tmp_path}/./w.npz"):
    rc, _, err = run(["compress", tmp_path / "w.npz", "--out", tmp_path / out], capsys)
    assert rc == 1 and "is an input file: refusing to overwrite it" in err, err
  model, _ = fqz_with(tmp_path, ["w"])
  (tmp_path / "m2.fqz").symlink_to(model)
  rc, _, err = run(["decompress", tmp_path / "m2.fqz", "--out", model], capsys)
  assert rc == 1 and "is an input file" in err
  assert (tmp_path / "w.npz").read_bytes() == weights and fq.load_fqz(model).arrays["w"].size == 4


def test_nonfinite_values_outside_compressed_arrays_are_kept(tmp_path, capsys):
  rng = np.random.default_rng(0)
  bias = np.array([np.nan, np.inf, -np.inf, 1.0], np.float32)
  kernel = rng.normal(size=(8, 8)).astype(np.float32)
  skipped = kernel.copy()
  skipped[0, 0] = np.nan
  np.savez(tmp_path / "w.npz", bias=bias, kernel=kernel, skipped=skipped)
  out = tmp_path / "m.fqz"
  argv = ["compress", tmp_path / "w.npz", "--out", out, "--sparsity", "0.5"]
  rc, _, err = run(argv + ["--rules", "^skipped$:prune=false,quantize=false"], capsys)
  assert rc == 0, err
  decoded = fq.load_fqz(out)
  np.testing.assert_array_equal(decoded.arrays["bias"], bias)  # NaN == NaN here
  np.testing.assert_array_equal(decoded.arrays["skipped"], skipped)
  assert set(decoded.focus) == {"kernel"}
  rc, _, err = run(argv, capsys)  # without the rule, the NaN would be quantized: refused
  assert rc == 1 and "array 'skipped' has 1 NaN or infinite values" in err


def test_inspect_escapes_control_characters(tmp_path, capsys):
  evil = "conv\x1b[2J\x1b[31m\nfake  1x1  row\r\u202e\x07"
  model, _ = fqz_with(tmp_path, [evil, "ok"])
  rc, out, err = run(["inspect", model], capsys)
  assert rc == 0, err
  assert all(line.isprintable() for line in out.splitlines())
  table = out.split("\n\n")[0].splitlines()
  assert len(table) == 2 + 2  # header, rule, two arrays
  assert table[2].startswith(tables.escape_text(evil)) and "\\x1b[2J" in table[2]
  rc, out, err = run(["inspect", model, "--json"], capsys)
  assert rc == 0 and "\x1b" not in out and "\\u001b" in out


def test_escape_text_and_format_table():
  assert tables.escape_text("a\tb\x1b\u2028\ud800é") == "a\\x09b\\x1b\\u2028\\ud800é"
  text = tables.format_table(
    [["conv", 3, 0.5], ["fc", 10, None]], ["layer", "bits", "sparsity"], left={"layer"}
  )
  lines = text.splitlines()
  assert lines[0].split() == ["layer", "bits", "sparsity"]
  assert set(lines[1].replace(" ", "")) == {"-"} and len(lines[1]) == len(lines[0])
  assert lines[2] == "conv" + " " * 6 + "3" + " " * 7 + "0.5"  # numbers right-aligned
  assert lines[3] == "fc" + " " * 7 + "10"  # empty cell: trailing blanks stripped
  with pytest.raises(ValueError, match="row 0 has 2 cells for 3 columns"):
    tables.format_table([[1, 2]], ["a", "b", "c"])
  md = tables.format_table([["a|b", 1]], ["name", "n"], left={"name"}, markdown=True)
  assert md.splitlines() == ["| name | n |", "|------|--:|", "| a\\|b | 1 |"]
