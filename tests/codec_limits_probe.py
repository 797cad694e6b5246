"""Mutation probe run in a subprocess under an address-space cap (tests/test_codec_limits.py).

Warms the decoder up (JAX kernels for every focused dtype), caps the address space at the
current size plus `--cap-mib`, then decodes `--cases` mutated files (CRCs repaired) and
prints one JSON line: outcome counts, the slowest case, and any exception other than
`FormatError` (which must not happen). Time is this process's CPU time (all threads), so
a loaded machine does not count; a case past 4x `--time-limit` is stopped by a CPU-time
timer (SIGPROF) while it runs, not judged after it finished, and reported as over time.
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import resource
import signal
import sys
import time

import fuzz_fqz
import numpy as np

import fq_jax as fq
from fq_jax.codec.layout import FOCUSED_DTYPES


class _OverTime(Exception):
  """Raised by the SIGPROF handler inside a case that ran past its CPU-time stop."""


def _stop(signum, frame):
  raise _OverTime


LIMIT_KEYS = ("run", "npos", "kept", "codewords", "shape", "lane", "bias", "stored")


def _vm_bytes() -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmSize:"):
        return int(line.split()[1]) * 1024
  raise RuntimeError("no VmSize in /proc/self/status")


def limit_mutation(data: bytes, rng: np.random.Generator) -> bytes:
  """Pushes one declared quantity to a legal or illegal extreme, CRCs repaired."""
  header, sections = fuzz_fqz._split(data)
  header = copy.deepcopy(header)
  entries = header["arrays"]
  e = entries[int(rng.integers(len(entries)))]
  key = LIMIT_KEYS[int(rng.integers(len(LIMIT_KEYS)))]
  big = [1, 2, 2**16, 2**24, 2**24 + 1, 2**31, 2**40, 2**62]
  if key == "shape":
    e["shape"] = [int(rng.choice([2**20, 2**24, 2**32]))] * int(rng.integers(1, 3))
  elif key == "lane":
    header["lane"] = int(rng.choice(big))
  elif key == "bias" and "quant" in e:
    e["quant"]["bias"] = int(rng.choice([-(2**31), -(2**15), 2**15 - 1, 2**15, 2**31 - 1]))
  elif key == "stored":
    e["stored"] = str(rng.choice(["float64", "float16", "bfloat16", "int8", "uint64"]))
  else:
    e[key] = int(rng.choice(big))
  return fuzz_fqz._repack(header, sections, fix_section_crcs=True)


def _warm(files: list[bytes]) -> None:
  """Compiles the value kernels for every focused dtype before the cap."""
  for data in files:
    fq.decode_model(data)
    header, sections = fuzz_fqz._split(data)
    for dtype in FOCUSED_DTYPES:
      h = copy.deepcopy(header)
      for e in h["arrays"]:
        if e.get("kind") == "focused":
          e["dtype"] = dtype
      try:
        fq.decode_model(fuzz_fqz._repack(h, sections, fix_section_crcs=True))
      except fq.FormatError:
        pass


def main(argv=None) -> int:
  p = argparse.ArgumentParser()
  p.add_argument("--cases", type=int, default=300)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--cap-mib", type=int, default=2048)
  p.add_argument("--time-limit", type=float, default=5.0)
  p.add_argument("--extra", nargs="*", default=[], help="further valid files to mutate")
  args = p.parse_args(argv)
  files = fuzz_fqz.sample_files() + [open(f, "rb").read() for f in args.extra]
  _warm(files)
  cap = _vm_bytes() + (args.cap_mib << 20)
  resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
  rng = np.random.default_rng(args.seed)
  counts, escaped, slowest, stopped = collections.Counter(), [], (0.0, -1), []
  signal.signal(signal.SIGPROF, _stop)
  for i in range(args.cases):
    base = files[i % len(files)]
    data = limit_mutation(base, rng) if i % 2 else fuzz_fqz.mutate(base, rng)
    start = time.process_time()
    signal.setitimer(signal.ITIMER_PROF, 4 * args.time_limit)
    try:
      fq.decode_model(data)
      counts["ok"] += 1
    except fq.FormatError:
      counts["FormatError"] += 1
    except _OverTime:
      stopped.append(i)
    except BaseException as e:  # the probe reports everything else, MemoryError included
      escaped.append(f"case {i}: {type(e).__name__}: {str(e)[:200]}")
    finally:
      signal.setitimer(signal.ITIMER_PROF, 0)
    elapsed = time.process_time() - start
    slowest = max(slowest, (elapsed, i))
  over = slowest[0] > args.time_limit or bool(stopped)
  print(
    json.dumps(
      dict(
        counts=counts,
        escaped=escaped,
        slowest_s=round(slowest[0], 3),
        slowest_case=slowest[1],
        over_time=over,
        stopped_cases=stopped,
        cap_bytes=cap,
      )
    )
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
