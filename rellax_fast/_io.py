"""Atomic file writes shared by every module that writes caches, checkpoints, adapters and reports.

A file is written into a temporary sibling in the same folder, flushed and fsynced, then moved into place
with ``os.replace``; on any failure (an exception or KeyboardInterrupt) the temporary file is removed and
the previous file, if any, is left untouched.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Union

PathLike = Union[str, os.PathLike]


def atomic_write(path: PathLike, writer: Callable[[IO[bytes]], Any]) -> None:
    """Write ``path`` through ``writer(binary file)``: temp file in the same folder, fsync, ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            writer(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    atomic_write(path, lambda fh: fh.write(data))


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))
