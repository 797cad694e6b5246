"""`fq-jax evaluate` on float weights (.npz): the accuracy as the headline line."""

import json

import jax
import numpy as np
import pytest
from _shared_data import RESNET20_NPZ, require_shared

from fq_jax import cli, data, models
from fq_jax._src import rules


def run(argv, capsys):
  rc = cli.main([str(a) for a in argv])
  out, err = capsys.readouterr()
  return rc, out, err


@pytest.fixture(scope="module")
def digits_npz(tmp_path_factory):
  """A randomly initialised digits CNN saved as a flat Flax .npz, and its variables."""
  model = models.get_model("digits_cnn")
  variables = model.init(jax.random.key(3), np.zeros((1, 8, 8, 1), np.float32), train=False)
  flat = {
    rules.path_str(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(variables)
  }
  path = tmp_path_factory.mktemp("eval") / "digits.npz"
  np.savez(path, **flat)
  return path, model, variables, flat


def test_flat_flax_npz_accuracy_is_the_models(digits_npz, capsys):
  path, model, variables, _ = digits_npz
  x, y = data.load_digits().test
  want = np.mean(np.argmax(np.asarray(model.apply(variables, x, train=False)), -1) == y)  # oracle
  rc, out, err = run(["evaluate", path, "--model", "digits_cnn", "--dataset", "digits"], capsys)
  assert rc == 0, err
  assert out.splitlines()[0].startswith(f"{path}: digits_cnn on digits test, float weights")
  assert f"top-1 {want:.4f} ({round(want * len(y))}/{len(y)})" in out.splitlines()[0]
  rc, out, err = run(
    ["evaluate", path, "--model", "digits_cnn", "--dataset", "digits", "--json", "--limit", "100"],
    capsys,
  )
  res = json.loads(out)
  assert rc == 0 and res["count"] == 100 and res["path"] == "float"
  logits = np.asarray(model.apply(variables, x[:100], train=False))
  assert res["correct"] == np.sum(np.argmax(logits, -1) == y[:100])


@pytest.mark.parametrize(
  "edit, message",
  [
    (lambda f: f.pop("params/fc1/kernel"), "misses for the model: params/fc1/kernel"),
    (lambda f: f.update({"params/extra/kernel": np.ones(2)}), "unexpected arrays for the model"),
    (lambda f: f.update({"params/head/bias": np.ones(3, np.float32)}), "has shape (3,), the model"),
    (lambda f: f.update({"weights/x": np.ones(2)}), "'weights/x' is under neither params/"),
  ],
)
def test_weights_that_do_not_fit_are_one_line(edit, message, digits_npz, tmp_path, capsys):
  flat = dict(digits_npz[3])
  edit(flat)
  np.savez(tmp_path / "bad.npz", **flat)
  argv = ["evaluate", tmp_path / "bad.npz", "--model", "digits_cnn", "--dataset", "digits"]
  rc, _, err = run(argv, capsys)
  assert rc == 1 and len(err.strip().splitlines()) == 1 and message in err, err


def test_shipped_resnet20_npz_gives_the_imported_accuracy(capsys):
  path = require_shared(RESNET20_NPZ)  # a PyTorch state dict; decoding CIFAR-10 takes ~20 s
  rc, out, err = run(["evaluate", path, "--model", "cifar_resnet", "--dataset", "cifar10"], capsys)
  assert rc == 0, err
  headline = out.splitlines()[0]
  assert "cifar_resnet-20 on cifar10 test" in headline
  assert "top-1 0.8103 (8103/10000)" in headline  # 81.03%: ../shared/DATA.md


def test_pth_state_dict_reads_like_its_npz(tmp_path):
  """A PyTorch .pth (read weights-only) gives the same Flax variables as the .npz of its keys."""
  import torch  # in the test extra

  from fq_jax.cli import evaluate
  from fq_jax.models import torch_import

  module = models.get_model("cifar_resnet", depth=8)
  variables = module.init(jax.random.key(1), np.zeros((1, 32, 32, 3), np.float32), train=False)
  state = torch_import.export_torch_cifar_resnet(variables)
  pth = tmp_path / "r8.pth"
  torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, pth)
  arrays = evaluate._load_float_arrays(str(pth))
  _, got = evaluate.float_variables(arrays, "cifar_resnet", None, str(pth))
  _, want = evaluate.float_variables(state, "cifar_resnet", None, "state")
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  bad = tmp_path / "bad.pth"
  bad.write_bytes(b"not a torch file")
  with pytest.raises(ValueError, match="not a readable PyTorch state dict"):
    evaluate._load_float_arrays(str(bad))
