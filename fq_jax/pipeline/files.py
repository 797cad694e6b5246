"""The workdir's files on any file system `etils.epath` knows (local, `gs://...`, ...).

Local paths keep their atomic writes (`fq_jax.codec.atomic`: a temporary file
renamed over the destination). Object stores have no rename, but an object
upload is whole or absent, so a remote file is written with one
`epath.Path.write_bytes`.
"""

from __future__ import annotations

import os

from etils import epath

from fq_jax.codec import atomic


def is_local(path: str | os.PathLike) -> bool:
  """Whether `path` is on the local file system (no `scheme://` prefix)."""
  return "://" not in os.fspath(path)


def absolute(path: str | os.PathLike) -> str:
  """`path` made absolute when local; a remote path as given."""
  path = os.fspath(path)
  return os.path.abspath(path) if is_local(path) else path


def join(folder: str | os.PathLike, *names: str) -> str:
  """`folder/name/...` as a string, for local and remote folders alike."""
  return os.fspath(epath.Path(folder).joinpath(*names)) if names else os.fspath(folder)


def exists(path: str | os.PathLike) -> bool:
  return epath.Path(path).exists()


def is_dir(path: str | os.PathLike) -> bool:
  return epath.Path(path).is_dir()


def make_dirs(path: str | os.PathLike) -> None:
  """Creates folder `path` and its parents (no-op when it exists)."""
  epath.Path(path).mkdir(parents=True, exist_ok=True)


def read_text(path: str | os.PathLike) -> str:
  return epath.Path(path).read_text()


def write(path: str | os.PathLike, data: bytes | str) -> None:
  """Writes `data` (bytes, or text as UTF-8) to `path` whole: atomically when local.

  Args:
    path: the destination, local or remote.
    data: the whole content.
  """
  if is_local(path):
    atomic.atomic_write(path, data)
    return
  if isinstance(data, str):
    data = data.encode("utf-8")
  epath.Path(path).write_bytes(data)
