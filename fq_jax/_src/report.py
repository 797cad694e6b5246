"""Per-layer compression report (host side: returns plain Python values)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fq_jax._src import quantizers, tables, transforms


def empirical_entropy(symbols: np.ndarray) -> float:
  """Zeroth-order entropy of a symbol sequence, in bits per symbol."""
  symbols = np.asarray(symbols).ravel()
  if symbols.size == 0:
    return 0.0
  counts = np.bincount(symbols - symbols.min())
  p = counts[counts > 0] / symbols.size
  return float(-(p * np.log2(p)).sum())


@jax.jit
def _layer_numbers(w, f: quantizers.FocusState):
  symbols = quantizers.focused_symbols(w, f)
  q = quantizers.focused_values(symbols, f)
  err = jnp.where(f.mask, (q - w.astype(jnp.float32)) ** 2, 0.0)
  return symbols, jnp.sum(err) / jnp.maximum(jnp.sum(f.mask), 1)


def layer_report(params, state) -> list[dict[str, Any]]:
  """One row per compressed leaf: what was done to it and what it costs.

  Args:
    params: the float parameters.
    state: an `FQState` (or an optax state containing one).

  Returns:
    A list of dicts with keys path, shape, size, kept, sparsity, kind
    ("recentralized", "shift", or "pruned" for prune-only leaves),
    separation, bits, mu (pair), sigma, bias, alpha, mse (mean squared
    quantization error over kept weights) and entropy_bits (empirical entropy
    of the quantized symbols, bits per kept weight).
  """
  state = transforms.find_state(state)
  if not isinstance(state, transforms.FQState):
    raise TypeError("layer_report needs the state of fq.focused_quantization")
  rows = []
  for path, m, f, w in transforms.aligned_layers(params, state):
    kept = int(np.sum(np.asarray(m)))
    row = dict(
      path=path,
      shape=list(w.shape),
      size=int(w.size),
      kept=kept,
      sparsity=1.0 - kept / max(int(w.size), 1),
    )
    if f is None:
      row.update(kind="pruned", bits=32, mse=0.0, entropy_bits=32.0)
    else:
      symbols, mse = _layer_numbers(w, f)
      kept_symbols = np.asarray(symbols)[np.asarray(f.mask)]
      row.update(
        kind="recentralized" if bool(f.recentralized) else "shift",
        separation=float(f.separation),
        bits=int(f.bits),
        mu=[float(v) for v in np.asarray(f.means)],
        sigma=float(f.sigma),
        bias=int(f.bias),
        alpha=float(f.alpha),
        mse=float(mse),
        entropy_bits=empirical_entropy(kept_symbols),
      )
    rows.append(row)
  return rows


def format_report(rows: list[dict[str, Any]]) -> str:
  """A fixed-width text table of `layer_report` rows.

  Columns: path; shape; kept (weights the mask keeps); sparsity (pruned
  fraction); kind (recentralized: Eq. 2, shift: Eq. 1 power-of-two,
  pruned: masked but left in float); W (the layer's Wasserstein separation
  of Eq. 4, compared with `w_sep` to choose recentralized over shift; "-"
  for prune-only leaves); bits (n, 32 for float); mse (mean squared
  quantization error over kept weights); H bits (empirical entropy of the
  kept weights' symbols, bits per weight: what an ideal entropy coder
  would spend).
  """
  cells = [
    [
      r["path"],
      str(tuple(r["shape"])),
      r["kept"],
      f"{r['sparsity']:.2%}",
      r["kind"],
      f"{r['separation']:.2f}" if "separation" in r else "-",
      r["bits"],
      f"{r['mse']:.3g}",
      f"{r['entropy_bits']:.3f}",
    ]
    for r in rows
  ]
  columns = ["path", "shape", "kept", "sparsity", "kind", "W", "bits", "mse", "H bits"]
  return tables.format_table(cells, columns, left={"path", "shape", "kind"}, separator=" ")
