"""Decode time and memory of adversarial but well-formed .fqz files (issue 14).

Two files, written with valid CRCs by hand-built headers:

* `positions`: many 1-element pruned arrays whose position code declares the largest
  legal escape value R = 2^24 (a 3,645-byte file in issue 14): before the decoder limits,
  every position table was allocated densely over its alphabet (128 MiB each).
* `arrays`: 400,000 raw uint8 scalars (a ~3 MB file): per-array cost within every
  byte limit.

Each decode runs in a fresh process (`--one`), which reports wall time, the peak resident
and virtual memory (VmHWM / VmPeak from /proc) and the outcome. Run with PYTHONPATH set to
the tree whose decoder you want to measure:

    PYTHONPATH=$PWD python benchmarks/bench_codec_adversarial.py
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
import zlib

MAGIC = b"\x89FQZ\r\n\x1a\n"


def _pack(header: dict, sections: list[bytes]) -> bytes:
  for entry, sec in zip(header["arrays"], sections):
    entry["bytes"] = len(sec)
    entry["crc"] = zlib.crc32(sec)
  raw = json.dumps(header, separators=(",", ":")).encode()
  stored = zlib.compress(raw, 9)
  head = struct.pack("<8sHHII", MAGIC, 1, 1, len(stored), len(raw))
  crc = zlib.crc32(stored, zlib.crc32(head))
  return head + struct.pack("<I", crc) + stored + b"".join(sections)


def position_bomb(num_arrays: int = 310) -> bytes:
  """1-element pruned arrays with R = 2^24: table [lo=0, m=1, count 1], empty payload."""
  run = 1 << 24
  section = bytes([0, 1, 1, 0]) + struct.pack("<f", 1.0)
  entries = [
    dict(
      path=f"p{i}",
      shape=[1],
      dtype="float32",
      kind="pruned",
      stored="float32",
      kept=1,
      inverted=False,
      run=run,
      npos=1,
    )
    for i in range(num_arrays)
  ]
  return _pack({"coder": "ans", "metadata": {}, "arrays": entries}, [section] * num_arrays)


def many_arrays(num_arrays: int = 400_000) -> bytes:
  """Raw uint8 scalars."""
  entries = [
    dict(path=f"a{i}", shape=[], dtype="uint8", kind="raw", stored="uint8")
    for i in range(num_arrays)
  ]
  sections = [bytes([i % 256]) for i in range(num_arrays)]
  return _pack({"coder": "ans", "metadata": {}, "arrays": entries}, sections)


def _proc_status(key: str) -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(key + ":"):
        return int(line.split()[1]) * 1024
  return -1


def one(path: str, max_arrays: int | None = None) -> dict:
  """Decodes one file in this process; returns time, peak memory and outcome."""
  import fq_jax as fq

  kwargs = {}
  if max_arrays is not None:  # raise the array-count limit (DecodeLimits, issue 14)
    from fq_jax.codec import DecodeLimits

    kwargs["limits"] = DecodeLimits(max_arrays=max_arrays)
  data = open(path, "rb").read()
  base_rss = _proc_status("VmHWM")
  t = time.perf_counter()
  try:
    d = fq.decode_model(data, **kwargs)
    outcome = f"decoded {len(d.arrays)} arrays"
  except fq.FormatError as e:
    outcome = f"FormatError: {str(e)[:160]}"
  except MemoryError:
    outcome = "MemoryError"
  return dict(
    seconds=round(time.perf_counter() - t, 3),
    file_bytes=len(data),
    rss_before_mib=round(base_rss / 2**20),
    peak_rss_mib=round(_proc_status("VmHWM") / 2**20),
    peak_vm_mib=round(_proc_status("VmPeak") / 2**20),
    outcome=outcome,
  )


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--one", help="decode this file in-process and print JSON")
  p.add_argument("--max-arrays", type=int, help="DecodeLimits.max_arrays for --one")
  p.add_argument("--raise-limit", action="store_true", help="also decode with max_arrays=400k")
  args = p.parse_args(argv)
  if args.one:
    print(json.dumps(one(args.one, args.max_arrays)))
    return 0
  folder = tempfile.mkdtemp()
  runs = [("positions", position_bomb, []), ("arrays", many_arrays, [])]
  if args.raise_limit:
    runs.append(("arrays, max_arrays=400000", many_arrays, ["--max-arrays", "400000"]))
  for name, make, extra in runs:
    path = os.path.join(folder, f"{name.split(',')[0]}.fqz")
    with open(path, "wb") as f:
      f.write(make())
    out = subprocess.run(
      [sys.executable, __file__, "--one", path, *extra],
      capture_output=True,
      text=True,
      timeout=1200,
    )
    row = (
      json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else out.stderr[-300:]
    )
    print(name, row, flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
