"""Files appear whole or not at all: every file fq-jax writes goes through here.

A write goes to a temporary file in the destination's folder, is flushed and fsynced, and is
renamed over the destination (atomic on POSIX file systems), so a full disk, a kill or an
exception leaves the old file (or nothing), never a truncated one.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from typing import IO


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
  """Opens a temporary file that replaces `path` when the block exits without an exception.

  Args:
    path: the destination.
    mode: "wb" or "w" (text, UTF-8).

  Yields:
    The open temporary file.
  """
  if mode not in ("wb", "w"):
    raise ValueError(f"atomic_open mode must be 'wb' or 'w', got {mode!r}")
  path = os.fspath(path)
  folder = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
  # mkstemp creates the file 0600; give it the mode a plain open() would (0666 less the umask).
  umask = os.umask(0)
  os.umask(umask)
  os.fchmod(fd, 0o666 & ~umask)
  try:
    with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
  """Writes `data` (bytes, or text as UTF-8) to `path` atomically."""
  with atomic_open(path, "wb" if isinstance(data, bytes) else "w") as f:
    f.write(data)


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
  """Whether two paths name the same existing file (links and relative paths resolved)."""
  try:
    return os.path.samefile(a, b)
  except OSError:
    return os.path.realpath(a) == os.path.realpath(b)


def refuse_overwriting_inputs(
  output: str | os.PathLike, inputs: Sequence[str | os.PathLike], *, what: str = "--out"
) -> None:
  """Raises ValueError (one line) when `output` is one of `inputs`."""
  for source in inputs:
    if same_file(output, source):
      raise ValueError(f"{what} {os.fspath(output)!r} is an input file: refusing to overwrite it")
