"""The codec's module layout (issue 9): metadata property, paper-style ratio, tree utilities, atomic saves."""

import os

import jax
import numpy as np
import pytest

import fq_jax as fq
from fq_jax import codec
from fq_jax._src import tree_util
from fq_jax.codec import summary


def _small_file(metadata):
  rng = np.random.default_rng(0)
  w = rng.normal(size=(16, 8)).astype(np.float32)
  mask = np.abs(w) > 1.0
  return fq.encode_model(
    {"k": w * mask, "b": np.ones(8, np.float32)}, masks={"k": mask}, metadata=metadata
  )


def test_public_names_and_model_metadata():
  for name in ("FormatError", "DecodedModel", "artifact_summary", "decode_model", "encode_model"):
    assert getattr(codec, name) is getattr(fq, name)
  meta = {"model": "cifar_resnet-20", "dataset": "cifar10", "bits": 5, "note": "kept"}
  decoded = fq.decode_model(_small_file(meta))
  want = codec.ModelMetadata.from_json(meta)
  assert decoded.model_metadata == want
  assert (want.model, want.depth, want.extra) == ("cifar_resnet", 20, {"note": "kept"})


def test_paper_style_ratio_is_the_summary_definition():
  s = fq.artifact_summary(_small_file({}))
  kernel = [r for r in s["layers"] if r["kind"] != "raw"]
  assert s["kernel_values"] == sum(r["size"] for r in kernel) == 128
  assert s["kernel_section_bytes"] == sum(r["section_bytes"] for r in kernel)
  assert s["paper_style_compression_ratio"] == 4 * 128 / s["kernel_section_bytes"]
  assert summary.paper_style_ratio(10, 0) is None


def test_tree_util_map_present_keeps_none_and_matches_manual_walk():
  masks = {"a": np.array([True, False]), "b": None, "c": {"d": np.array([False])}}
  params = {"a": np.array([1.0, 2.0]), "b": np.array([3.0]), "c": {"d": np.array([4.0])}}
  out = tree_util.map_present(lambda m, w: w * m, masks, params)
  assert out["b"] is None
  np.testing.assert_array_equal(out["a"], [1.0, 0.0])
  np.testing.assert_array_equal(out["c"]["d"], [0.0])
  assert tree_util.structure(masks).num_leaves == 3
  assert len(tree_util.present_leaves(masks)) == 2
  assert jax.tree.structure(masks).num_leaves == 2  # JAX alone drops the None
  assert (
    tree_util.none_or(int)(3) and tree_util.none_or(int)(None) and not tree_util.none_or(int)("x")
  )


def test_save_fqz_is_atomic(tmp_path, monkeypatch):
  path = tmp_path / "m.fqz"
  path.write_bytes(b"old")
  params = {"kernel": np.ones((4, 4), np.float32)}

  def broken(*args, **kwargs):
    raise OSError("disk full")

  monkeypatch.setattr(os, "fsync", broken)
  with pytest.raises(OSError, match="disk full"):
    fq.save_fqz(path, params)
  assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["m.fqz"]
  monkeypatch.undo()
  n = fq.save_fqz(path, params)
  assert path.stat().st_size == n and os.listdir(tmp_path) == ["m.fqz"]
  np.testing.assert_array_equal(fq.load_fqz(path).arrays["kernel"], params["kernel"])


def _mid_schedule():
  """A kernel (rule `kernel$`) at INQ stage 0 (25% of its kept weights quantized), and a bias."""
  import optax

  rng = np.random.default_rng(3)
  params = {"dense": {"kernel": rng.normal(size=(16, 12)).astype(np.float32), "bias": np.ones(12)}}
  params = fq.apply_masks(params, fq.magnitude_masks(params, 0.5))
  tx = fq.focused_quantization(optax.sgd(0.1), bits=5, schedule=fq.inq_schedule(10))
  return params, tx.init(params)


def test_save_fqz_mid_schedule_needs_partial(tmp_path):
  params, state = _mid_schedule()
  assert 0.0 < fq.quantized_fraction(state) < 1.0
  path = tmp_path / "m.fqz"
  with pytest.raises(ValueError, match=r"middle of the INQ schedule \(25\.0% .*partial="):
    fq.save_fqz(path, params, state)
  assert not path.exists()
  with pytest.raises(ValueError, match="partial must be None, 'quantize' or 'float'"):
    fq.save_fqz(path, params, state, partial="exact")
  forward = jax.tree.map(np.asarray, fq.quantized(params, state))
  kernel = forward["dense"]["kernel"]

  fq.save_fqz(path, params, state, partial="float")
  decoded = fq.load_fqz(path)
  # The oracle is the forward pass itself: the file rebuilds exactly what the network used.
  np.testing.assert_array_equal(decoded.arrays["dense/kernel"], kernel)
  np.testing.assert_array_equal(decoded.arrays["dense/bias"], forward["dense"]["bias"])
  assert {r["path"]: r["kind"] for r in decoded.layers}["dense/kernel"] == "pruned"

  fq.save_fqz(path, params, state, partial="quantize")
  decoded = fq.load_fqz(path)
  q = decoded.arrays["dense/kernel"]
  f = state.focus["dense"]["kernel"]
  inq = np.asarray(state.inq["dense"]["kernel"])
  np.testing.assert_array_equal(q[inq], kernel[inq])  # the quantized ones agree
  assert not np.array_equal(
    q, kernel
  )  # the others are quantized in the file, not in the forward pass
  want = np.asarray(fq.focused_values(fq.focused_symbols(params["dense"]["kernel"], f), f))
  np.testing.assert_array_equal(q, want)


def test_nan_or_inf_kept_weights_of_a_focused_layer_are_refused(tmp_path):
  """A NaN has no symbol: encoding it would silently store some finite level."""
  w = np.random.default_rng(0).normal(size=(16, 8)).astype(np.float32) * 0.1
  mask = np.abs(w) > 0.05
  state = fq.focus(w, mask, jax.random.key(0), bits=5)
  good = np.where(mask, w, 0.0).astype(np.float32)
  fq.encode_model({"conv/kernel": good}, focus={"conv/kernel": state})  # finite: fine
  bad = good.copy()
  kept = np.argwhere(mask)
  bad[tuple(kept[0])], bad[tuple(kept[1])] = np.nan, np.inf
  with pytest.raises(ValueError, match=r"^focus 'conv/kernel': 2 kept weights are NaN or infinite"):
    fq.encode_model({"conv/kernel": bad}, focus={"conv/kernel": state})
  # A NaN at a pruned position is never stored (it decodes as 0): accepted.
  pruned = good.copy()
  pruned[tuple(np.argwhere(~mask)[0])] = np.nan
  fq.encode_model({"conv/kernel": pruned}, focus={"conv/kernel": state})
