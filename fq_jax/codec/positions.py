"""Sparse positions as run-length symbols with an escape.

The coded positions are the kept entries of a flattened (C-order) mask, or
the pruned ones when those are fewer ("inverted"). With coded indices
k_0 < k_1 < ... the gaps g_i = k_i - k_{i-1} - 1 (k_{-1} = -1) are written as
floor(g_i / R) escape symbols R followed by the symbol g_i mod R, so the
alphabet is {0, ..., R}. Entries after the last coded index are implicit.
R is chosen per layer to minimise the estimated coded size.
"""

from __future__ import annotations

import math

import numpy as np

from fq_jax.codec.container import FormatError

MAX_RUN = 1 << 16  # largest escape value R the encoder picks (a file may use up to 2^24)
FORMAT_MAX_RUN = 1 << 24


def coded_indices(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
  """(kept flat indices, indices to code, inverted): the pruned ones are coded
  instead of the kept ones when they are fewer."""
  flat = mask.reshape(-1)
  kept = np.flatnonzero(flat)
  inverted = kept.size * 2 > flat.size
  return kept, (np.flatnonzero(~flat) if inverted else kept), inverted


def _varint_bytes(counts: np.ndarray) -> np.ndarray:
  c = np.maximum(counts, 1).astype(np.float64)
  return 1 + np.floor(np.log2(c) / 7)


# Tie-breaker per coded symbol (bits): among escape values of (nearly) equal
# entropy -- all of them for geometric gaps -- prefer fewer symbols (speed).
SYMBOL_PENALTY_BITS = 0.02


def _estimated_bits(hist: np.ndarray, run: int, coder: str) -> float:
  """Estimated bits of the gap symbols (payload + table) for escape value `run`."""
  g = np.arange(hist.size)
  escapes = float(np.dot(hist, g // run))
  counts = np.append(np.bincount(g % run, weights=hist, minlength=run), escapes)
  present = np.flatnonzero(counts)
  table = counts[present[0] : present[-1] + 1]
  nz = counts[present]
  total = nz.sum()
  if coder == "huffman" and present.size > 1:
    # Lazy import: huffman imports nothing from here, but keep the modules independent.
    from fq_jax.codec import huffman

    bits = float(np.dot(nz, huffman.code_lengths(np.rint(nz).astype(np.int64))[: present.size]))
    table_bytes = table.size + 4
  else:
    bits = float(-(nz * np.log2(nz / total)).sum())
    table_bytes = _varint_bytes(table).sum() + 4
  return bits + 8.0 * table_bytes + SYMBOL_PENALTY_BITS * total


def choose_run(gaps: np.ndarray, coder: str = "ans") -> tuple[int, np.ndarray]:
  """Escape value R (>= 1) minimising the estimated size of the gap symbols, and
  the histogram (length R + 1) of the symbols that `encode` will produce with it."""
  if gaps.size == 0:
    return 1, np.zeros(2, np.int64)
  hist = np.bincount(gaps).astype(np.float64)
  limit = MAX_RUN if coder == "ans" else 1 << 12
  # Escape values far below the mean gap only multiply the symbols: start at mean / 4.
  low = max(0, int(np.log2(max(1.0, gaps.mean() / 4))))
  candidates = {1 << j for j in range(low, 17) if (1 << j) < min(hist.size, limit + 1)}
  if hist.size <= limit:
    candidates.add(hist.size)  # no escapes at all
  # The cost is unimodal in practice (many escapes <-> a long table): stop once it
  # has risen twice in a row past the best candidate.
  run, best, worse = 1, math.inf, 0
  for r in sorted(candidates):
    cost = _estimated_bits(hist, r, coder)
    if cost < best:
      run, best, worse = r, cost, 0
    else:
      worse += 1
      if worse == 2:
        break
  g = np.arange(hist.size)
  counts = np.bincount(g % run, weights=hist, minlength=run + 1)
  counts[run] = np.dot(hist, g // run)
  return run, np.rint(counts).astype(np.int64)


def gaps_of(indices: np.ndarray) -> np.ndarray:
  return np.diff(indices, prepend=-1) - 1


def encode(indices: np.ndarray, run: int) -> np.ndarray:
  """Gap symbols (int64) of sorted flat `indices` with escape value `run`."""
  gaps = gaps_of(indices)
  if gaps.size == 0:
    return gaps
  esc = gaps // run
  if not esc.any():
    return gaps
  reps = esc + 1
  out = np.full(int(reps.sum()), run, np.int64)
  out[np.cumsum(reps) - 1] = gaps % run
  return out


def decode(
  symbols: np.ndarray, run: int, num_coded: int, size: int, where: str, escapes: bool = True
) -> np.ndarray:
  """Flat indices from gap symbols; checks they stay inside an array of `size`.

  `escapes=False` promises that the escape symbol does not occur (its table
  entry is empty), which skips the escape handling.
  """
  if symbols.size == 0:
    if num_coded:
      raise FormatError(f"{where}: no position symbols for {num_coded} positions")
    return np.zeros(0, np.int64)
  # int32 running sums when they cannot overflow (each symbol advances <= run + 1).
  acc = np.int32 if (symbols.size + 1) * (run + 1) < 1 << 31 else np.int64
  if symbols.size != num_coded or escapes:
    if symbols[-1] == run:
      raise FormatError(f"{where}: position code ends in an escape")
    not_escape = symbols != run
    advance = symbols.astype(acc, copy=True)
    advance += not_escape  # an escape advances by run, any other symbol s by s + 1
    indices = np.cumsum(advance, dtype=acc)[not_escape]
  else:
    advance = symbols.astype(acc, copy=True)
    advance += 1
    indices = np.cumsum(advance, dtype=acc)
  indices -= 1
  if indices.size != num_coded:
    raise FormatError(f"{where}: position code gives {indices.size} positions, not {num_coded}")
  if indices[-1] >= size:
    raise FormatError(f"{where}: position code runs past the array's {size} entries")
  return indices
