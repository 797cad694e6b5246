"""Sizes of the float model and of the compressed artifact (host side).

The float32 model counts every array inference needs: parameters and
batch-norm statistics. The compressed size is the size of `DIR/model.fqz` on
disk when the codec (`fq.save_fqz`) is available; until then it is an
ESTIMATE (marked `"estimate": true` in the report) from the per-layer symbol
entropies: an ideal entropy coder spends `entropy_bits` per kept weight, the
positions of the kept weights cost the binary entropy of the layer's density
per weight, every other array is stored as float32, plus a small per-array
header.
"""

from __future__ import annotations

import math
import os
from typing import Any

import jax
import numpy as np

import fq_jax as fq

# Per-array bookkeeping of the estimate: name, shape, quantizer parameters.
HEADER_BYTES = 32


def num_values(variables: dict[str, Any]) -> int:
  """Number of scalars in params and batch_stats."""
  return int(sum(np.size(x) for x in jax.tree.leaves(variables)))


def float32_bytes(variables: dict[str, Any]) -> int:
  """Size of the model stored as float32."""
  return 4 * num_values(variables)


def is_kernel(path: str, shape) -> bool:
  """Conv and dense kernels: what the paper's compression ratio counts."""
  return path.split("/")[-1] == "kernel" and len(shape) >= 2


def kernel_float32_bytes(params) -> int:
  """float32 size of the conv and dense kernels."""
  total = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    if is_kernel(fq.path_str(path), np.shape(leaf)):
      total += 4 * int(np.size(leaf))
  return total


def _binary_entropy(p: float) -> float:
  if p <= 0.0 or p >= 1.0:
    return 0.0
  return -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def estimate_sizes(params, batch_stats, rows: list[dict[str, Any]]) -> dict[str, Any]:
  """Entropy-based size estimate of the compressed model.

  Args:
    params: float parameters (compressed leaves as in `rows`).
    batch_stats: batch-norm statistics (stored as float32).
    rows: `fq.layer_report` rows (or rows with path/size/kept and kind
      "pruned" for prune-only leaves).

  Returns:
    {"artifact_bytes", "kernel_bytes", "estimate": True}; kernel_bytes is the
    part spent on conv and dense kernels.
  """
  by_path = {r["path"]: r for r in rows}
  total_bits = 0.0
  kernel_bits = 0.0
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    name = fq.path_str(path)
    r = by_path.get(name)
    if r is None:
      bits = 32.0 * np.size(leaf)
    else:
      density = r["kept"] / max(r["size"], 1)
      per_weight = 32.0 if r["kind"] == "pruned" else r["entropy_bits"]
      bits = r["kept"] * per_weight + r["size"] * _binary_entropy(density)
    bits += 8 * HEADER_BYTES
    total_bits += bits
    if is_kernel(name, np.shape(leaf)):
      kernel_bits += bits
  for leaf in jax.tree.leaves(batch_stats):
    total_bits += 32.0 * np.size(leaf) + 8 * HEADER_BYTES
  return {
    "artifact_bytes": int(math.ceil(total_bits / 8)),
    "kernel_bytes": int(math.ceil(kernel_bits / 8)),
    "estimate": True,
  }


def mask_rows(params, masks) -> list[dict[str, Any]]:
  """Rows like `fq.layer_report`'s for a pruned, unquantized model."""
  rows = []
  flat_masks = {fq.path_str(p): m for p, m in jax.tree_util.tree_leaves_with_path(masks)}
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    name = fq.path_str(path)
    m = flat_masks.get(name)
    if m is None:
      continue
    kept = int(np.sum(np.asarray(m)))
    rows.append(
      dict(
        path=name,
        shape=list(np.shape(leaf)),
        size=int(np.size(leaf)),
        kept=kept,
        sparsity=1.0 - kept / max(int(np.size(leaf)), 1),
        kind="pruned",
        bits=32,
        mse=0.0,
        entropy_bits=32.0,
      )
    )
  return rows


def codec_available() -> bool:
  """Whether the `.fqz` codec has landed in `fq_jax`."""
  return hasattr(fq, "save_fqz")


def write_artifact(
  path: str, variables: dict[str, Any], state, *, coder: str, metadata: dict[str, Any]
) -> dict[str, Any]:
  """Writes `path` with the codec, reads it back and returns its real sizes.

  Args:
    path: output file (model.fqz).
    variables: {'params', 'batch_stats'} of the float model (host arrays).
    state: the `fq.FQState` (or `fq.PruneState`, or None to store raw).
    coder: "ans" or "huffman".
    metadata: header metadata.

  Returns:
    {"artifact_bytes": bytes on disk, "paper_style_compression_ratio",
    "summary": the codec's `artifact_summary` without its per-layer rows,
    "decoded": the decoded variables tree, "estimate": False}.
  """
  fq.save_fqz(path, variables, state, coder=coder, metadata=metadata)
  decoded = fq.load_fqz(path)
  summary = fq.artifact_summary(decoded)
  return {
    "artifact_bytes": int(os.path.getsize(path)),
    "paper_style_compression_ratio": summary.get("paper_style_compression_ratio"),
    "summary": {k: v for k, v in summary.items() if k not in ("layers", "metadata")},
    "decoded": decoded.tree(),
    "estimate": False,
  }


def trees_equal(a, b) -> bool:
  """Bitwise equality of two trees of arrays (same structure and dtypes)."""
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  if jax.tree.structure(a) != jax.tree.structure(b) or len(la) != len(lb):
    return False
  return all(
    np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(np.asarray(x), np.asarray(y))
    for x, y in zip(la, lb)
  )
