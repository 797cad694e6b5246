"""Seeded mutation fuzzer for the .fqz decoder (used by tests/test_codec_fuzz.py).

Every mutated file must either decode or raise `fq.FormatError`; any other
exception, a decode using more CPU than `TIME_LIMIT_S` or a decoded model larger
than the allowance is a failure. Mutations: bit flips, truncations, byte
insertions/deletions/overwrites, preamble field edits, header JSON edits with
the CRCs fixed up (so the structural validation is what gets exercised), and
section edits with their CRC fixed up (so the stream decoders get garbage).

Run by hand for longer campaigns:

    python tests/fuzz_fqz.py --iterations 200000 --seed 1

(The decoder has no catch-all any more, so every exception but `FormatError` surfaces.)
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import struct
import sys
import time
import zlib

import numpy as np

import fq_jax as fq
from fq_jax.codec import container

TIME_LIMIT_S = 5.0
MAX_OUTPUT_BYTES = 1 << 22  # the decoder's allowance while fuzzing


def _state(shape, rng, *, bits, recentralized, sparsity):
  """A synthetic FocusState (the codec only needs its fields)."""
  import jax.numpy as jnp

  size = int(np.prod(shape))
  mask = rng.random(shape) >= sparsity
  assignment = (rng.random(shape) < 0.5) & mask & recentralized
  return fq.FocusState(
    recentralized=jnp.bool_(recentralized),
    bits=jnp.int32(bits),
    means=jnp.array([-0.125, 0.0625], jnp.float32),
    sigma=jnp.float32(0.03),
    bias=jnp.int32(3),
    assignment=jnp.asarray(assignment),
    mask=jnp.asarray(mask),
    alpha=jnp.float32(1.25),
    gmm=fq.GMM(jnp.array([0.4, 0.6]), jnp.array([-0.1, 0.07]), jnp.array([0.03, 0.02])),
    separation=jnp.float32(3.5 if size else 0.0),
  )


def sample_files() -> list[bytes]:
  """Small valid files covering every kind, dtype family and both coders."""
  import ml_dtypes

  rng = np.random.default_rng(1234)
  w = (rng.normal(size=(8, 4, 3, 3)) * 0.05).astype(np.float32)
  v = (rng.normal(size=(10, 16)) * 0.1).astype(ml_dtypes.bfloat16)
  d = (rng.normal(size=(6, 7)) * 0.1).astype(np.float32)
  arrays = {
    "conv/kernel": w,
    "dense/kernel": v,
    "pruned/kernel": d,
    "bn/mean": rng.normal(size=8).astype(np.float32),
    "count": np.int64(12345),
    "empty": np.zeros((0, 3), np.float32),
    "flag": np.array([True, False]),
  }
  focus = {
    "conv/kernel": _state(w.shape, rng, bits=5, recentralized=True, sparsity=0.6),
    "dense/kernel": _state(v.shape, rng, bits=4, recentralized=False, sparsity=0.2),
  }
  masks = {"pruned/kernel": rng.random(d.shape) > 0.5}
  # Format 1.1: a codebook layer (last, so the indices of the entries above stay put).
  c = (rng.normal(size=(5, 6)) * 0.1).astype(np.float16)
  arrays["codebook/kernel"] = c
  cmask = rng.random(c.shape) > 0.3
  book = np.sort(rng.normal(size=8) * 0.1).astype(np.float32)
  codebooks = {
    "codebook/kernel": fq.CodebookState(
      codebook=book,
      symbols=np.where(cmask, rng.integers(0, 8, c.shape), 0).astype(np.int32),
      mask=cmask,
    )
  }
  files = []
  for coder in ("ans", "huffman"):
    files.append(
      fq.encode_model(
        arrays,
        focus=focus,
        masks=masks,
        codebooks=codebooks,
        coder=coder,
        metadata={"model": "fuzz", "n": 1},
        huffman_lane=16,
      )
    )
  return files


def _repack(header: dict, sections: list[bytes], *, fix_section_crcs=False) -> bytes:
  raw = json.dumps(header, separators=(",", ":")).encode()
  stored = zlib.compress(raw, 9)
  if fix_section_crcs:
    for e, s in zip(header.get("arrays", []), sections):
      if isinstance(e, dict):
        e["crc"] = zlib.crc32(s)
        e["bytes"] = len(s)
    raw = json.dumps(header, separators=(",", ":")).encode()
    stored = zlib.compress(raw, 9)
  head = struct.pack("<8sHHII", container.MAGIC, 1, 0, len(stored), len(raw))
  crc = zlib.crc32(stored, zlib.crc32(head))
  return head + struct.pack("<I", crc) + stored + b"".join(sections)


def _split(data: bytes):
  header, spans, _ = container.unpack(data)
  return header, [data[a:b] for a, b in spans]


_WILD = [
  0,
  1,
  -1,
  2,
  3,
  7,
  8,
  255,
  65536,
  2**31,
  2**32 - 1,
  2**40,
  10**12,
  2**63,
  2**64,
  -(2**63),
  1.5,
  -0.0,
  1e300,
  "x",
  "",
  "NaN",
  None,
  True,
  False,
  [],
  {},
  [1, 2],
  [10**12],
]


def _json_leaves(obj, path=()):
  if isinstance(obj, dict):
    yield path, obj
    for k, v in obj.items():
      yield from _json_leaves(v, path + (k,))
  elif isinstance(obj, list):
    yield path, obj
    for i, v in enumerate(obj):
      yield from _json_leaves(v, path + (i,))


def _edit_header(header: dict, rng) -> None:
  containers = [c for _, c in _json_leaves(header) if c]
  c = containers[rng.integers(len(containers))]
  keys = list(c.keys()) if isinstance(c, dict) else list(range(len(c)))
  key = keys[rng.integers(len(keys))]
  choice = rng.integers(6)
  old = c[key]
  if choice == 0 and isinstance(c, dict):
    del c[key]
  elif choice == 1 and isinstance(old, int) and not isinstance(old, bool):
    c[key] = old + int(rng.integers(-3, 4))
  elif choice == 2 and isinstance(old, int) and not isinstance(old, bool):
    c[key] = old * int(rng.choice([2, 1000, 10**9]))
  elif choice == 3 and isinstance(old, list) and old:
    if rng.random() < 0.5:
      old.append(old[-1])
    else:
      old.pop()
  else:
    c[key] = copy.deepcopy(_WILD[rng.integers(len(_WILD))])


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
  """One random mutation of a valid file."""
  kind = rng.integers(10)
  b = bytearray(data)
  n = len(b)
  if kind == 0:  # bit flips
    for _ in range(rng.integers(1, 9)):
      i = rng.integers(n)
      b[i] ^= 1 << rng.integers(8)
    return bytes(b)
  if kind == 1:  # truncation
    return bytes(b[: rng.integers(n)])
  if kind == 2:  # insertion
    i = rng.integers(n + 1)
    return bytes(b[:i] + rng.bytes(int(rng.integers(1, 16))) + b[i:])
  if kind == 3:  # deletion
    i = rng.integers(n)
    return bytes(b[:i] + b[i + rng.integers(1, 16) :])
  if kind == 4:  # overwrite with random / 0x00 / 0xff
    i = rng.integers(n)
    k = int(rng.integers(1, 9))
    fill = rng.choice([b"\x00" * k, b"\xff" * k, rng.bytes(k)])
    b[i : i + k] = fill
    return bytes(b[:n])
  if kind == 5:  # preamble field edit (version, lengths), CRC left alone or fixed
    off = int(rng.choice([8, 10, 12, 16]))
    size = 2 if off < 12 else 4
    val = int(rng.choice([0, 1, 2, 0xFFFF, 0xFFFFFFFF, 10**6, n]))
    val &= (1 << (8 * size)) - 1
    b[off : off + size] = val.to_bytes(size, "little")
    if rng.random() < 0.5:
      h = struct.unpack_from("<I", b, 12)[0]
      crc = zlib.crc32(bytes(b[24 : 24 + h]), zlib.crc32(bytes(b[0:20])))
      b[20:24] = struct.pack("<I", crc)
    return bytes(b)
  header, sections = _split(data)
  if kind in (6, 7):  # header edit, CRCs fixed
    for _ in range(rng.integers(1, 3)):
      _edit_header(header, rng)
    return _repack(header, sections)
  if kind == 8:  # section content edit, CRC fixed
    idx = [i for i, s in enumerate(sections) if s]
    i = idx[rng.integers(len(idx))]
    s = bytearray(sections[i])
    op = rng.integers(4)
    if op == 0:
      for _ in range(rng.integers(1, 5)):
        j = rng.integers(len(s))
        s[j] ^= 1 << rng.integers(8)
    elif op == 1:
      s = s[: rng.integers(len(s))]
    elif op == 2:
      j = rng.integers(len(s) + 1)
      s[j:j] = rng.bytes(int(rng.integers(1, 8)))
    else:
      j = rng.integers(len(s))
      s[j] = int(rng.choice([0, 0x7F, 0x80, 0xFF]))
    sections[i] = bytes(s)
    return _repack(header, sections, fix_section_crcs=True)
  # kind 9: claim huge shapes / counts with CRCs fixed
  entries = header["arrays"]
  e = entries[rng.integers(len(entries))]
  field = rng.choice(["shape", "kept", "npos", "run"])
  if field == "shape":
    e["shape"] = [int(rng.choice([10**6, 10**12, 2**40, 2**47]))] * int(rng.integers(1, 3))
  else:
    e[field] = int(rng.choice([10**6, 10**12, 2**40, 2**62]))
  return _repack(header, sections, fix_section_crcs=True)


def check_one(data: bytes, max_output_bytes: int = MAX_OUTPUT_BYTES) -> str:
  """'ok' or 'FormatError'; raises AssertionError for anything else."""
  # CPU time, not wall time: a shared CI machine stalls the wall clock, never the work.
  start = time.process_time()
  try:
    decoded = fq.decode_model(data, max_output_bytes=max_output_bytes)
    outcome = "ok"
    total = sum(a.nbytes for a in decoded.arrays.values())
    assert total <= max_output_bytes, f"decoded {total} bytes > allowance"
  except fq.FormatError as e:
    outcome = "FormatError"
    assert str(e), "empty FormatError message"
  except Exception as e:
    raise AssertionError(f"{type(e).__name__} escaped the decoder: {e}") from e
  elapsed = time.process_time() - start
  assert elapsed < TIME_LIMIT_S, f"decoding took {elapsed:.1f} CPU-s"
  return outcome


def run(iterations: int, seed: int, files: list[bytes] | None = None) -> collections.Counter:
  """Runs `iterations` mutations; returns the outcome counts."""
  files = files or sample_files()
  rng = np.random.default_rng(seed)
  counts = collections.Counter()
  for it in range(iterations):
    base = files[it % len(files)]
    data = mutate(base, rng)
    try:
      counts[check_one(data)] += 1
    except AssertionError as e:
      raise AssertionError(
        f"iteration {it} (seed {seed}): {e}; mutated file {data[:64].hex()}... ({len(data)} bytes)"
      ) from e
  return counts


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--iterations", type=int, default=10000)
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  start = time.perf_counter()
  counts = run(args.iterations, args.seed)
  print(f"{args.iterations} mutations in {time.perf_counter() - start:.1f} s: {dict(counts)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
