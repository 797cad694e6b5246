"""Named arrays in `.npz` files: read without pickles, written atomically, names checked first.

`save_npz` writes the same zip of `.npy` members as `np.savez` (so `np.load` reads it), but
through `fq_jax.codec.atomic` (the file appears whole or not at all) and with every name
checked before a byte is written: a name that `np.load` would give back differently (cut at a
NUL, shadowing another array, too long for a zip entry, not encodable) is a one-line
`ValueError`, never a lost or planted array. Names that `np.savez` cannot take as keywords
(`file`, `allow_pickle`) are written faithfully: the members are written directly, not as
keyword arguments.
"""

from __future__ import annotations

import os
import stat
import zipfile
from collections.abc import Iterable, Mapping

import numpy as np

from fq_jax.codec import atomic

# A zip entry name is at most 65,535 bytes (a 16-bit length field); `.npy` is appended to each.
NPY_SUFFIX = ".npy"
MAX_NAME_BYTES = 0xFFFF - len(NPY_SUFFIX)


def check_regular_file(path: str | os.PathLike) -> None:
  """Raises ValueError (one line) unless `path` is an existing regular file.

  Checked with `stat` before opening, so a FIFO, a device or a directory is refused instead of
  blocking or reading forever.
  """
  try:
    mode = os.stat(path).st_mode
  except FileNotFoundError:
    raise ValueError(f"{os.fspath(path)}: no such file") from None
  except OSError as e:
    raise ValueError(f"{os.fspath(path)}: cannot read ({e.strerror or e})") from None
  if not stat.S_ISREG(mode):
    raise ValueError(f"{os.fspath(path)}: not a regular file")


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """The arrays of an `.npz` file, keyed by name, in the file's order (no pickles).

  Args:
    path: the `.npz` file (a regular file).

  Returns:
    name -> array.

  Raises:
    ValueError: one line naming the file (and the array, where one is at fault) when the file
      is missing, not a regular file, not an `.npz` archive, or holds an unreadable or object
      array.
  """
  path = os.fspath(path)
  check_regular_file(path)
  try:
    archive = np.load(path, allow_pickle=False)
  except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
    raise ValueError(f"{path}: not a readable .npz archive ({e})") from None
  if not isinstance(archive, np.lib.npyio.NpzFile):
    raise ValueError(f"{path}: not an .npz archive (a single .npy array?)")
  arrays = {}
  with archive:
    for key in archive.files:
      try:
        arrays[key] = archive[key]
      except ValueError as e:
        raise ValueError(f"{path}: array {key!r}: {e}") from None
      except Exception as e:  # zlib/zip/format errors of a damaged member: name the array
        raise ValueError(f"{path}: array {key!r} is unreadable ({e})") from None
  return arrays


def check_npz_names(names: Iterable[str]) -> None:
  """Raises ValueError (one line) unless every name reads back from an `.npz` as itself.

  Refused: non-strings; a NUL (zip readers cut the name there); lone surrogates or anything
  else not encodable as UTF-8; a name longer than `MAX_NAME_BYTES` UTF-8 bytes (the zip entry
  limit); duplicates; and a name `X.npy` beside a name `X` (`np.load(...)['X.npy']` would return
  the array `X`).

  Args:
    names: the array names, in order.
  """
  seen: set[str] = set()
  for name in names:
    if not isinstance(name, str):
      raise ValueError(f"array name {name!r} is not a string")
    if "\0" in name:
      raise ValueError(f"array name {name!r} contains a NUL character")
    try:
      size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
      raise ValueError(f"array name {name!r} is not valid Unicode (a lone surrogate)") from None
    if size > MAX_NAME_BYTES:
      raise ValueError(
        f"array name {name[:40]!r}... is {size:,} bytes long (an .npz name holds at most "
        f"{MAX_NAME_BYTES:,})"
      )
    if name in seen:
      raise ValueError(f"array name {name!r} appears twice")
    seen.add(name)
  for name in seen:
    if name.endswith(NPY_SUFFIX) and name[: -len(NPY_SUFFIX)] in seen:
      raise ValueError(
        f"array names {name[: -len(NPY_SUFFIX)]!r} and {name!r} cannot both be stored in an "
        f".npz (np.load would return the first for the second)"
      )


def save_npz(path: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> None:
  """Writes `arrays` to an uncompressed `.npz` at `path`, atomically, names checked first.

  Args:
    path: the destination (replaced whole, or left as it was on any error).
    arrays: name -> array (no object arrays), in the order written.

  Raises:
    ValueError: a name that would not read back as itself (see `check_npz_names`) or an object
      array; nothing is written.
  """
  check_npz_names(arrays)
  for name, value in arrays.items():
    if np.asarray(value).dtype.hasobject:
      raise ValueError(f"array {name!r} holds Python objects (not storable without pickles)")
  with atomic.atomic_open(path, "wb") as f:
    # The members np.savez writes, written directly so that no name is taken as a keyword.
    with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
      for name, value in arrays.items():
        with archive.open(name + NPY_SUFFIX, "w", force_zip64=True) as member:
          np.lib.format.write_array(member, np.asanyarray(value), allow_pickle=False)
