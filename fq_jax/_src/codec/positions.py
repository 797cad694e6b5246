"""Sparse positions as run-length symbols with an escape.

The coded positions are the kept entries of a flattened (C-order) mask, or
the pruned ones when those are fewer ("inverted"). With coded indices
k_0 < k_1 < ... the gaps g_i = k_i - k_{i-1} - 1 (k_{-1} = -1) are written as
floor(g_i / R) escape symbols R followed by the symbol g_i mod R, so the
alphabet is {0, ..., R}. Entries after the last coded index are implicit.
R is chosen per layer to minimise the estimated coded size.
"""

from __future__ import annotations

import numpy as np

from fq_jax._src.codec.container import FormatError

MAX_RUN = 1 << 16  # largest escape value R the encoder picks (a file may use up to 2^24)
FORMAT_MAX_RUN = 1 << 24


def coded_indices(mask: np.ndarray) -> tuple[np.ndarray, bool]:
  """Flat indices to code and whether they are the pruned ones (inverted)."""
  flat = mask.reshape(-1)
  kept = int(np.count_nonzero(flat))
  inverted = kept * 2 > flat.size
  return np.flatnonzero(~flat if inverted else flat), inverted


def _varint_bytes(counts: np.ndarray) -> np.ndarray:
  c = np.maximum(counts, 1).astype(np.float64)
  return 1 + np.floor(np.log2(c) / 7)


def _estimated_bits(hist: np.ndarray, run: int) -> float:
  """Zeroth-order bits of the gap symbols plus the table bytes, for escape value `run`."""
  g = np.arange(hist.size)
  escapes = float(np.dot(hist, g // run))
  counts = np.append(np.bincount(g % run, weights=hist, minlength=run), escapes)
  present = np.flatnonzero(counts)
  table = counts[present[0]:present[-1] + 1]
  nz = counts[present]
  bits = -(nz * np.log2(nz / nz.sum())).sum()
  return bits + 8.0 * (_varint_bytes(table).sum() + 4)


def choose_run(gaps: np.ndarray) -> int:
  """Escape value R (>= 1) minimising the estimated size of the gap symbols."""
  if gaps.size == 0:
    return 1
  hist = np.bincount(gaps).astype(np.float64)
  candidates = {1 << j for j in range(17) if (1 << j) < hist.size}
  if hist.size <= MAX_RUN:
    candidates.add(hist.size)  # no escapes at all
  return min(sorted(candidates), key=lambda r: _estimated_bits(hist, r))


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


def decode(symbols: np.ndarray, run: int, num_coded: int, size: int, where: str) -> np.ndarray:
  """Flat indices from gap symbols; checks they stay inside an array of `size`."""
  if symbols.size == 0:
    if num_coded:
      raise FormatError(f"{where}: no position symbols for {num_coded} positions")
    return np.zeros(0, np.int64)
  if symbols[-1] == run:
    raise FormatError(f"{where}: position code ends in an escape")
  advance = np.where(symbols == run, run, symbols + 1)
  ends = np.cumsum(advance) - 1
  indices = ends[symbols != run]
  if indices.size != num_coded:
    raise FormatError(f"{where}: position code gives {indices.size} positions, "
                      f"not {num_coded}")
  if indices[-1] >= size:
    raise FormatError(f"{where}: position code runs past the array's {size} entries")
  return indices
