"""Size accounting of an .fqz artifact: `artifact_summary` and THE paper-style ratio.

`paper_style_ratio` is the one definition of the paper's compression ratio (float32 bytes
of the compressed kernels over the bytes of their sections: no header, biases or batch
statistics); every report, CLI command and benchmark takes it from here.
"""

from __future__ import annotations

from fq_jax.codec.decode import decode_model
from fq_jax.codec.decoded import DecodedModel


def paper_style_ratio(kernel_values: int, kernel_section_bytes: int) -> float | None:
  """The paper's compression ratio: 4 * kernel_values / kernel_section_bytes.

  Args:
    kernel_values: number of values of the compressed (focused, codebook,
      pruned) arrays, pruned entries included.
    kernel_section_bytes: bytes those arrays take in the file (or an
      estimate of them).

  Returns:
    The ratio, or None when there are no compressed arrays (0 bytes).
  """
  return 4 * kernel_values / kernel_section_bytes if kernel_section_bytes else None


def _row(info: dict) -> dict:
  row = dict(info)
  kept = row["kept"]
  row["sparsity"] = 1.0 - kept / row["size"] if row["size"] else 0.0
  row["bits_per_kept"] = 8.0 * row["section_bytes"] / kept if kept else 0.0
  if row["kind"] == "focused":
    row["kind"] = "recentralized" if row["recentralized"] else "shift"
  return row


def artifact_summary(decoded_or_bytes) -> dict:
  """Honest size accounting of an .fqz artifact.

  Args:
    decoded_or_bytes: a `DecodedModel`, or the file's bytes (decoded here).

  Returns:
    A dict with
      file_bytes, header_bytes, num_values (every value the file rebuilds),
      compression_ratio = 4 * num_values / file_bytes (float32 model size over
        the file, everything counted);
      kernel_values, kernel_section_bytes and paper_style_compression_ratio =
        4 * kernel_values / kernel_section_bytes over the focused, codebook and
        pruned arrays only (the paper's way: no header, biases or batch statistics);
      entropy_bound_bytes: zeroth-order entropy of the coded position and
        symbol streams (sum over layers of n_pos H(pos) + n_sym H(sym), /8);
      coded_bytes: the bytes actually spent on those streams, tables included;
      coder_overhead = coded_bytes / entropy_bound_bytes - 1;
      file_entropy_bound_bytes: the bound plus everything stored raw and the
        header (what a perfect zeroth-order coder would leave);
      coder, version, metadata, and `layers`: one row per array (see
      `DecodedModel.layers`) with bits_per_kept = 8 * section_bytes / kept.
  """
  d = decoded_or_bytes
  if not isinstance(d, DecodedModel):
    d = decode_model(d)
  num_values = sum(int(a.size) for a in d.arrays.values())
  kernel_values = kernel_bytes = 0
  bound = coded = 0.0
  raw_bytes = 0
  for info in d.layers:
    if info["kind"] == "raw":
      raw_bytes += info["section_bytes"]
    else:
      kernel_values += info["size"]
      kernel_bytes += info["section_bytes"]
      bound += info["entropy_bound_bytes"]
      coded += info["coded_bytes"]
      raw_bytes += info["section_bytes"] - info["coded_bytes"]
  return dict(
    file_bytes=d.file_bytes,
    header_bytes=d.header_bytes,
    num_values=num_values,
    float32_bytes=4 * num_values,
    compression_ratio=4 * num_values / d.file_bytes,
    kernel_values=kernel_values,
    kernel_section_bytes=kernel_bytes,
    paper_style_compression_ratio=paper_style_ratio(kernel_values, kernel_bytes),
    entropy_bound_bytes=bound,
    coded_bytes=coded,
    coder_overhead=(coded / bound - 1.0) if bound > 0 else None,
    file_entropy_bound_bytes=bound + raw_bytes + d.header_bytes,
    coder=d.coder,
    version=list(d.version),
    metadata=d.metadata,
    layers=[_row(info) for info in d.layers],
  )
