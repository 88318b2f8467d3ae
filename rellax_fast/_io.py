"""Atomic file writes shared by every module that writes caches, checkpoints, adapters and reports.

A file is written into a temporary sibling in the same folder, flushed and fsynced, then moved into place
with ``os.replace``; on any failure (an exception or KeyboardInterrupt) the temporary file is removed and
the previous file, if any, is left untouched.

- Permissions: the temporary file is created with mode ``0o666`` and the process umask applies, exactly as
  for a plain ``open(path, "w")`` (``tempfile.mkstemp`` would give ``0o600``).
- Names: temporaries are ``.{name}.tmp-{pid}-{host}-{random}`` (``host`` is a 6-hex tag of the host name), so
  the ones left by a killed process are recognisable. Every write into a folder first removes the stale
  ones there (:func:`remove_stale_temps`): those of a process of this host that no longer runs, and any older
  than a day. Nothing else in the folder is touched.
- :func:`atomic_path` yields the temporary path for writers that take a path rather than a file object
  (pyarrow, ``np.save``, ``torch.save``, safetensors); :func:`atomic_write` takes a writer of a binary file;
  :func:`atomic_write_png` saves a matplotlib figure;
  :func:`make_temp_dir` makes a temporary sibling folder (umask permissions, same cleanup) for whole-folder
  writes that are renamed into place by their caller.

Also here: :func:`check_out_dir`, the shared check that an ``--out`` folder can be one; :func:`file_sha256`
and :func:`json_sha256`, the content hashes that caches and fingerprints store; :func:`file_lock`, the one
``flock`` helper (a prepared-data folder's writers and readers, a backbone's first conversion).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import time
from pathlib import Path
from typing import IO, Any, Callable, Iterator, List, Union

PathLike = Union[str, os.PathLike]

logger = logging.getLogger(__name__)

STALE_AFTER_S = 24 * 3600  # a temporary untouched for this long is stale whoever made it
_TEMP_RE = re.compile(r"^\..+\.tmp-(?P<pid>\d+)-(?P<host>[0-9a-f]{6})-[0-9a-z]{8}$")


def _host_tag() -> str:
    return hashlib.sha1(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:6]


def temp_path_for(path: PathLike) -> Path:
    """A fresh, recognisable temporary sibling of ``path``: ``.{name}.tmp-{pid}-{host}-{random}``."""
    path = Path(path)
    return path.parent / f".{path.name}.tmp-{os.getpid()}-{_host_tag()}-{secrets.token_hex(4)}"


def make_temp_dir(path: PathLike) -> Path:
    """Create and return an empty temporary sibling folder of ``path`` (for writing a whole folder, then
    renaming it into place): recognisable like the temporary files, so a killed writer's one is removed by
    :func:`remove_stale_temps`, and with mode ``0o777 & ~umask`` as ``mkdir`` (``tempfile.mkdtemp``: 0o700)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent)
    tmp = temp_path_for(path)
    os.mkdir(tmp, 0o777)
    return tmp


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists (another user's); anything else: assume it runs
        return True
    return True


def remove_stale_temps(folder: PathLike, *, max_age_s: float = STALE_AFTER_S) -> List[Path]:
    """Remove this module's temporaries in ``folder`` whose writer is gone; returns what was removed.

    A temporary is stale when it was made on this host by a process that no longer runs, or when it has
    not been modified for ``max_age_s`` seconds (another host's, or a pid that was reused). Files and folders
    with any other name are never touched. Errors (a race with another cleaner, permissions) are ignored.
    """
    folder = Path(folder)
    removed: List[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    host, now = _host_tag(), time.time()
    for entry in entries:
        m = _TEMP_RE.match(entry.name)
        if m is None:
            continue
        try:
            age = now - entry.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        dead = m.group("host") == host and not _pid_alive(int(m.group("pid")))
        if not (dead or age > max_age_s):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed.append(Path(entry.path))
        except OSError:
            pass
    return removed


def _fsync_path(path: Path) -> None:
    """fsync a file or folder by path (best effort for folders: not every filesystem allows it)."""
    is_dir = path.is_dir()
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if is_dir:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not is_dir:
            raise
    finally:
        os.close(fd)


def fsync_dir(folder: PathLike) -> None:
    """fsync a folder so that renames into it survive a crash (best effort: some filesystems refuse)."""
    _fsync_path(Path(folder))


def file_sha256(path: PathLike) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def json_sha256(obj: Any) -> str:
    """sha256 (hex) of ``json.dumps(obj, sort_keys=True, default=str)``, UTF-8 encoded with ASCII escapes.

    The canonical-JSON hash behind the encoder ``config_hash`` and the bench-quality cache keys: its value is
    stored on disk, so these ``json.dumps`` arguments must never change. (Hashes made with other arguments,
    such as the embedding cache's ``ensure_ascii=False`` one, are a different function and stay with their
    owner.)
    """
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(OSError):
    """An atomic write ran out of space (ENOSPC) or quota (EDQUOT): the message names the file being written
    ("disk full writing <path>"); its temporary was removed and the previous file, if any, is untouched."""


@contextlib.contextmanager
def atomic_path(path: PathLike, *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on a clean exit it is fsynced and renamed onto ``path``.

    For writers that take a path (``pq.write_table(table, tmp)``, ``np.save(tmp, a)``, ``torch.save``).
    The temporary file already exists, empty, with the umask's permissions (a writer that opens it for
    writing keeps them). A writer may also make a folder there instead (after removing the empty file); it
    is renamed into place only if ``path`` does not exist or is an empty folder. On an exception the
    temporary is removed and ``path`` is left as it was; a full disk (or quota) is raised as
    :class:`DiskFullError` naming ``path``.
    """
    path = Path(path)
    if path.is_dir() and not path.is_symlink() and any(path.iterdir()):
        raise IsADirectoryError(f"{path}: is a folder, cannot write a file there")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent)
    tmp = temp_path_for(path)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # mode 0o666 & ~umask, as open()
    try:
        yield tmp
        if fsync:
            _fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp)
            else:
                os.unlink(tmp)
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS and not isinstance(exc, DiskFullError):
            raise DiskFullError(
                exc.errno, f"disk full writing {path} ({exc.strerror or exc})", str(path)
            ) from exc
        raise
    if fsync:
        _fsync_path(path.parent)


def atomic_write(path: PathLike, writer: Callable[[IO[bytes]], Any]) -> None:
    """Write ``path`` through ``writer(binary file)``: temp file in the same folder, fsync, ``os.replace``."""
    with atomic_path(path, fsync=False) as tmp:
        with open(tmp, "wb") as fh:
            writer(fh)
            fh.flush()
            os.fsync(fh.fileno())
    _fsync_path(Path(path).parent)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    atomic_write(path, lambda fh: fh.write(data))


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_npy(path: PathLike, array) -> bytes:
    """Save one array to ``path`` in ``.npy`` form atomically (no pickles; ``np.save`` on a path would append
    ``.npy`` to the temp name); returns the bytes written, for callers that checksum them."""
    import io

    import numpy as np

    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array), allow_pickle=False)
    payload = buffer.getvalue()
    atomic_write_bytes(path, payload)
    return payload


def atomic_write_png(path: PathLike, fig, *, dpi: int = 110) -> Path:
    """Save a matplotlib figure to ``path`` as PNG atomically, then close it (pyplot keeps every open figure
    alive otherwise); returns ``path``. matplotlib is imported only here, and only to close the figure."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def check_out_dir(out: PathLike, what: str = "--out") -> Path:
    """``out`` as a Path, or a ValueError naming ``what`` if it exists and is not a folder (a file, a
    broken link). The folder itself is created by whoever writes into it."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(
            f"{what} {out}: exists and is not a folder; give a folder path (it is created if missing)"
        )
    if not out.exists() and out.is_symlink():
        raise ValueError(f"{what} {out}: is a broken symbolic link")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{what} {out}: {parent} is a file, not a folder")
            break
    return out


class PathOutsideFolderError(ValueError):
    """A path read from a file (a manifest key, a ``latest`` pointer, a run's recorded dependency) points outside
    the folder it must lie in."""


def path_inside(folder: PathLike, relative: str, what: str) -> Path:
    """``folder / relative`` when ``relative`` (a path read from a file) is a relative path that stays inside
    ``folder`` after normalisation; otherwise :class:`PathOutsideFolderError` naming ``what`` (the file and key
    it came from). Decided on the text alone: nothing is opened, stat'ed or resolved, so a refused target is
    never touched."""
    if not isinstance(relative, str) or not relative or "\x00" in relative:
        raise PathOutsideFolderError(f"{what}: expected a relative path inside {folder}, got {relative!r}")
    normal = os.path.normpath(relative)
    if os.path.isabs(relative) or normal == ".." or normal.startswith(".." + os.sep):
        raise PathOutsideFolderError(
            f"{what}: {relative!r} points outside {folder}; refusing to open it (only paths inside the folder are "
            "followed: the file was edited, or written by something else)"
        )
    return Path(folder) / normal


@contextlib.contextmanager
def file_lock(path: PathLike, *, exclusive: bool = True) -> Iterator[None]:
    """Hold an ``flock`` on ``path`` for the block: exclusive, or shared with ``exclusive=False``.

    A folder is locked itself (opened read-only: no lock file is left behind); any other path is a lock file,
    created (with its folder) if missing and left in place afterwards (removing it would race with a waiter).
    Closing the descriptor releases the lock. Where the platform has no ``fcntl`` the block runs unlocked, and
    where the filesystem refuses locks (some network mounts) it runs unlocked after a logged warning: callers
    use the lock to serialise or to spare work, and must stay correct without it.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    path = Path(path)
    if path.is_dir():
        fd = os.open(path, os.O_RDONLY)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        except OSError as exc:
            logger.warning("%s: cannot lock it (%s); concurrent writers are not serialised", path, exc)
        yield
    finally:
        os.close(fd)
