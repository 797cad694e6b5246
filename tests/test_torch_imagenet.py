"""torchvision ImageNet weights <-> Flax models: same logits, exact round trip, safe reading.

The oracle is torchvision itself: a randomly initialised model in eval mode (BatchNorm running
statistics and affine parameters randomised too, so that a swapped mean/var or scale/bias
cannot hide) against the converted Flax model with ``train=False``. Small inputs (64x64,
batch 2, 10 classes, MobileNet-V2 at width 0.5) keep it to seconds.
"""

import copy
import pickle
import sys
import types

import jax
import numpy as np
import pytest
import torch  # in the 'test' extra: a missing torch fails here rather than skipping

from fq_jax import cli
from fq_jax.models import get_model
from fq_jax.models import torch_import as ti


def torchvision_models():
  """``torchvision.models``, importable even when torchvision's C++ ops are unavailable.

  A torchvision wheel built for a different torch (e.g. CUDA torchvision with a CPU torch)
  fails in ``import torchvision`` while registering fake kernels of its C++ ops
  ("operator torchvision::nms does not exist"). The classification models are pure
  ``torch.nn`` and need none of those ops, so the registration module is replaced by an empty
  one and the import retried.
  """
  try:
    import torchvision.models as models

    return models
  except RuntimeError as e:
    if "torchvision::" not in str(e):
      raise
  for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
    del sys.modules[name]
  stub = "torchvision._meta_registrations"
  sys.modules[stub] = types.ModuleType(stub)
  import torchvision.models as models

  return models


NUM_CLASSES = 10
ARCHS = {  # arch -> (torchvision kwargs, Flax width)
  "resnet18": ({}, 1.0),
  "resnet50": ({}, 1.0),
  "mobilenet_v2": ({"width_mult": 0.5}, 0.5),
}


def _randomise_bn(net) -> None:
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.normal_(0.0, 0.2)
        m.running_var.uniform_(0.5, 2.0)
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_(0.0, 0.2)


@pytest.fixture(scope="module", params=list(ARCHS))
def case(request):
  arch = request.param
  tv_kwargs, width = ARCHS[arch]
  torch.manual_seed(0)
  net = getattr(torchvision_models(), arch)(num_classes=NUM_CLASSES, **tv_kwargs).eval()
  _randomise_bn(net)
  x = np.random.default_rng(1).standard_normal((2, 3, 64, 64)).astype(np.float32)
  with torch.no_grad():
    logits = net(torch.from_numpy(x)).numpy()
  state = {k: v.numpy().copy() for k, v in net.state_dict().items()}
  flax_kwargs = {"width": width} if arch == "mobilenet_v2" else {}
  model = get_model(arch, num_classes=NUM_CLASSES, **flax_kwargs)
  apply = jax.jit(lambda v, images: model.apply(v, images, train=False))
  return types.SimpleNamespace(
    arch=arch, width=width, net=net, state=state, x=x, logits=logits, apply=apply
  )


def _flax_logits(case, variables) -> np.ndarray:
  return np.asarray(case.apply(variables, case.x.transpose(0, 2, 3, 1)))  # NCHW -> NHWC


def _assert_same_logits(got, want) -> None:
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_converted_model_gives_torchvision_logits(case):
  variables = ti.torchvision_to_flax(case.state, case.arch, width=case.width)
  _assert_same_logits(_flax_logits(case, variables), case.logits)


def test_export_gives_back_the_same_state_dict(case):
  variables = ti.torchvision_to_flax(case.state, case.arch, width=case.width)
  back = ti.flax_to_torchvision(variables, case.arch)
  assert list(back) == list(case.state)  # same keys, same order
  for key, value in case.state.items():
    assert back[key].dtype == value.dtype, key
    np.testing.assert_array_equal(back[key], value, err_msg=key)
  # torchvision accepts it strictly and computes the same logits.
  net = copy.deepcopy(case.net)
  net.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)
  with torch.no_grad():
    np.testing.assert_array_equal(net(torch.from_numpy(case.x)).numpy(), case.logits)


@pytest.mark.parametrize("case", ["resnet50"], indirect=True)  # the example
def test_cli_writes_init_from_npz_with_the_same_logits(case, tmp_path):
  pth = tmp_path / "weights.pth"
  torch.save(case.net.state_dict(), pth)
  out = tmp_path / "flax.npz"
  argv = ["--arch", case.arch, str(pth), "--out", str(out), "--width", str(case.width)]
  assert cli.main(["import-torch", *argv]) == 0
  variables: dict = {}
  with np.load(out) as data:
    assert all(k.startswith(("params/", "batch_stats/")) for k in data.files)
    for key in data.files:
      node = variables
      *parents, leaf = key.split("/")
      for p in parents:
        node = node.setdefault(p, {})
      node[leaf] = data[key]
  _assert_same_logits(_flax_logits(case, variables), case.logits)


@pytest.mark.parametrize("case", ["mobilenet_v2"], indirect=True)
def test_npz_of_torch_keys_reads_like_the_pth(case, tmp_path):
  path = tmp_path / "weights.npz"
  np.savez(path, **case.state)
  assert ti.is_torch_state(case.state) and not ti.is_torch_state(["params/head/kernel"])
  got = ti.import_torchvision(path, case.arch, width=case.width)
  want = ti.torchvision_to_flax(case.state, case.arch, width=case.width)
  jax.tree.map(np.testing.assert_array_equal, got, want)


def test_full_width_mobilenet_v2_converts():
  # Shapes only (no forward pass): the key map also fits the paper's full-width model.
  net = torchvision_models().mobilenet_v2()
  state = {k: v.detach().numpy() for k, v in net.state_dict().items()}
  variables = ti.torchvision_to_flax(state, "mobilenet_v2")
  n = sum(v.size for v in jax.tree.leaves(variables["params"]))
  assert n == sum(p.numel() for p in net.parameters()) == 3_504_872


class _Payload:
  def __reduce__(self):
    return (print, ("code from the file ran",))


def test_pth_reader_refuses_arbitrary_pickles(tmp_path, capsys):
  path = tmp_path / "evil.pth"
  with open(path, "wb") as f:
    pickle.dump({"conv1.weight": _Payload()}, f, protocol=2)
  with pytest.raises(pickle.UnpicklingError):
    ti.load_torch_state(path)
  argv = ["import-torch", "--arch", "resnet18", str(path), "--out", str(tmp_path / "o.npz")]
  assert cli.main(argv) == 1
  captured = capsys.readouterr()
  assert "code from the file ran" not in captured.out
  assert "error" in captured.err and len(captured.err.strip().splitlines()) == 1


def test_errors_name_the_key():
  state = {k: v.numpy() for k, v in torchvision_models().resnet18().state_dict().items()}
  with pytest.raises(ValueError, match="missing key 'fc.bias'"):
    ti.torchvision_to_flax({k: v for k, v in state.items() if k != "fc.bias"}, "resnet18")
  with pytest.raises(ValueError, match="shape mismatch for key 'layer1.0.conv1.weight'"):
    ti.torchvision_to_flax({**state, "layer1.0.conv1.weight": np.zeros((64, 64, 1, 1))}, "resnet18")
  with pytest.raises(ValueError, match="unexpected key 'layer1.0.downsample.0.weight'"):
    ti.torchvision_to_flax({**state, "layer1.0.downsample.0.weight": np.zeros(1)}, "resnet18")
  with pytest.raises(ValueError, match="no MobileNet-V1"):
    ti.torchvision_key_map("mobilenet_v1")
