"""The end of a run: `model.fqz` written by the codec, report.json and the printed summary.

Sizes are the codec's: the file on disk and `fq.artifact_summary` (the one
owner of the paper-style ratio, kernels only). The float32 model counts every
array inference needs: parameters and batch-norm statistics.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import jax
import numpy as np

import fq_jax as fq
from fq_jax.pipeline import files, plans
from fq_jax.pipeline import integer as integer_lib
from fq_jax.pipeline.context import Context, accuracy_fields, evaluate, requested_sparsity, to_host


def num_values(variables: dict[str, Any]) -> int:
  """Number of scalars in params and batch_stats."""
  return int(sum(np.size(x) for x in jax.tree.leaves(variables)))


def float32_bytes(variables: dict[str, Any]) -> int:
  """Size of the model stored as float32."""
  return 4 * num_values(variables)


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


def write_artifact(
  path: str, variables: dict[str, Any], state, *, coder: str, metadata: dict[str, Any]
) -> dict[str, Any]:
  """Writes `path` with the codec, reads it back and returns its real sizes.

  Args:
    path: output file (model.fqz).
    variables: {'params', 'batch_stats'} of the float model (host arrays).
    state: the `fq.FQState` (or `fq.PruneState`, or None to store raw).
    coder: "ans" or "huffman".
    metadata: header metadata (`ModelMetadata.to_json()`).

  Returns:
    {"artifact_bytes": bytes on disk, "summary": the codec's `artifact_summary`
    without its per-layer rows, "decoded": the decoded variables tree}.
  """
  fq.save_fqz(path, variables, state, coder=coder, metadata=metadata)
  decoded = fq.load_fqz(path)
  summary = fq.artifact_summary(decoded)
  return {
    "artifact_bytes": int(os.path.getsize(path)),
    "summary": {k: v for k, v in summary.items() if k not in ("layers", "metadata")},
    "decoded": decoded.tree(),
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


def _compression_state(ctx: Context, carry: dict[str, Any], params):
  """(state for the codec, per-layer rows, bits) of the run's final model."""
  if ctx.quantizes:
    state = to_host(fq.find_state(carry.get("opt_state")))
    return state, fq.layer_report(params, state), int(ctx.config.quant.bits)
  if ctx.prunes:
    masks = to_host(carry.get("masks"))
    state = fq.PruneState(count=np.zeros([], np.int32), masks=masks, inner_state=())
    return state, mask_rows(params, masks), 32
  return None, [], 32


def _write(ctx: Context, folder: str, variables, state, scales) -> dict[str, Any]:
  """`write_artifact` into `folder/model.fqz`; a remote folder gets a copy of a local file."""
  metadata = integer_lib.metadata(ctx, scales).to_json()
  kwargs = dict(coder=ctx.config.encode.coder, metadata=metadata)
  if files.is_local(folder):
    return write_artifact(os.path.join(folder, "model.fqz"), variables, state, **kwargs)
  with tempfile.TemporaryDirectory() as local:
    path = os.path.join(local, "model.fqz")
    real = write_artifact(path, variables, state, **kwargs)
    with open(path, "rb") as f:
      files.write(files.join(folder, "model.fqz"), f.read())
  return real


def encode(
  ctx: Context,
  carry: dict[str, Any],
  results: dict[str, Any],
  variables: dict[str, Any],
  result: dict[str, float],
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
  """Encodes the final model; returns the report's "compressed" entry and its layer rows.

  The file goes to `workdir/model.fqz` on the first host with `encode.enabled`;
  otherwise it is written to a temporary folder, measured and removed, so the
  sizes are always the codec's.

  Args:
    ctx: the run's context.
    carry: the runner's arrays (params, batch_stats, masks, opt_state).
    results: the run record's results (dense sizes, activation scales).
    variables: the evaluated (forward) variables.
    result: their `evaluate` result.
  """
  params, batch_stats = to_host(carry["params"]), to_host(carry["batch_stats"])
  state, rows, bits = _compression_state(ctx, carry, params)
  requested = requested_sparsity(ctx)
  for row in rows:
    row["requested_sparsity"] = requested.get(row["path"], 0.0)
  tree = {"params": params, "batch_stats": batch_stats}
  scales = results.get("activation_scales")
  if ctx.config.encode.enabled and ctx.is_main:
    real = _write(ctx, ctx.workdir, tree, state, scales)
  else:
    with tempfile.TemporaryDirectory() as folder:
      real = _write(ctx, folder, tree, state, scales)
  out: dict[str, Any] = {**accuracy_fields(result), "bits": bits}
  # The artifact must rebuild exactly the model that was evaluated.
  exact = trees_equal(real["decoded"], to_host(variables))
  if not exact:
    ctx.log(
      "warning: the decoded artifact differs from the evaluated model; "
      "reporting the decoded model's accuracy"
    )
    out.update(accuracy_fields(evaluate(ctx, real["decoded"])))
  paper = real["summary"].get("paper_style_compression_ratio")
  out.update(
    artifact_bytes=real["artifact_bytes"],
    estimate=False,  # kept for report.json readers: sizes are always the real file's
    paper_style_compression_ratio=(paper or 1.0) if ctx.compress else 1.0,
    roundtrip_exact=exact,
    coder=ctx.config.encode.coder,
    entropy_bound_bytes=real["summary"].get("file_entropy_bound_bytes"),
  )
  out["compression_ratio"] = results["dense"]["float32_bytes"] / max(out["artifact_bytes"], 1)
  return out, rows


def make_report(
  ctx: Context,
  results: dict[str, Any],
  seconds: dict[str, float],
  compressed: dict[str, Any],
  rows: list[dict[str, Any]],
) -> dict[str, Any]:
  """The report of a finished run (the content of report.json)."""
  return {
    "model": ctx.model_name,
    "dataset": ctx.source.name,
    "reference_only": bool(ctx.config.reference_only),
    "dense": results["dense"],
    "pruned": results["pruned"],
    "compressed": compressed,
    "layers": rows,
    "stages": plans.stage_lengths(ctx),
    "seconds": {k: round(v, 3) for k, v in seconds.items()},
  }


def write_report(ctx: Context, report: dict[str, Any]) -> None:
  """Writes workdir/report.json whole (first process only) and logs the summary."""
  if ctx.is_main:
    text = json.dumps(_jsonable(report), indent=1)
    files.write(files.join(ctx.workdir, "report.json"), text)
  ctx.log(summary(report))


def _jsonable(x):
  if isinstance(x, dict):
    return {k: _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (np.floating, np.integer, np.bool_)):
    return x.item()
  return x


def summary(report: dict[str, Any]) -> str:
  """A human-readable summary and the per-layer table."""
  d, p, c = report["dense"], report["pruned"], report["compressed"]
  lines = [
    f"== {report['model']} on {report['dataset']}"
    + (" [reference: float fine-tuning]" if report.get("reference_only") else ""),
    f"dense:      accuracy {d['accuracy']:.4f}"
    + (f", top-5 {d['top5']:.4f}" if "top5" in d else "")
    + f", {d['num_values']:,} values, {d['float32_bytes']:,} bytes as float32",
    f"pruned:     accuracy {p['accuracy']:.4f}, sparsity {p['sparsity']:.4f}",
    f"compressed: accuracy {c['accuracy']:.4f}"
    + (f", top-5 {c['top5']:.4f}" if "top5" in c else "")
    + f", {c['bits']} bits, {c['artifact_bytes']:,} bytes",
    f"compression ratio {c['compression_ratio']:.2f}x (paper-style, kernels only: "
    f"{c['paper_style_compression_ratio']:.2f}x); accuracy change vs dense "
    f"{100 * (c['accuracy'] - d['accuracy']):+.2f} points",
    "seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in report["seconds"].items()),
  ]
  if report["layers"]:
    lines += ["", fq.format_report(report["layers"])]
  return "\n".join(lines)
