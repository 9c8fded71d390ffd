"""Files that readers see whole or not at all: written beside their path, then renamed onto it."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import IO


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
  """Opens a temporary file beside ``path`` (its folder made if needed); when the block ends
  without an exception the file is flushed to disk and renamed onto ``path``, so a reader, or a
  run killed mid-write, finds the old file or the new one, never half of one. On an exception
  the temporary file is removed and ``path`` is left as it was."""
  path = os.fspath(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  temporary = f"{path}.tmp-{os.getpid()}"
  try:
    with open(temporary, mode) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(temporary, path)
  finally:
    if os.path.exists(temporary):
      os.remove(temporary)


def atomic_write(path: str | os.PathLike, data: str | bytes) -> None:
  """Writes text or bytes to ``path`` through :func:`atomic_file`."""
  with atomic_file(path, "wb" if isinstance(data, bytes) else "w") as f:
    f.write(data)
