"""rellax_fast._io: outputs get the umask's permissions (as a plain open would), a failed or killed write
leaves the old file, and the temporaries a killed writer leaves are removed on the next write there; the
canonical-JSON hash keeps the bytes the inline copies it replaced hashed."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from rellax_fast._io import (
    atomic_path,
    atomic_write_bytes,
    atomic_write_npy,
    atomic_write_png,
    atomic_write_text,
    check_out_dir,
    file_lock,
    json_sha256,
    make_temp_dir,
    remove_stale_temps,
    temp_path_for,
)


@pytest.fixture
def umask():
    """Set the process umask for one test and restore it afterwards."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def _mode(path) -> int:
    return os.stat(path).st_mode & 0o777


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002, 0o027])
def test_modes_follow_the_umask_like_plain_open(tmp_path, umask, mask):
    umask(mask)
    with open(tmp_path / "plain.txt", "w") as fh:
        fh.write("x")
    atomic_write_text(tmp_path / "atomic.txt", "x")
    with atomic_path(tmp_path / "by_path.bin") as tmp:
        with open(tmp, "wb") as fh:  # a writer that takes a path re-opens the prepared file
            fh.write(b"x")
    expected = 0o666 & ~mask
    assert _mode(tmp_path / "plain.txt") == expected
    assert _mode(tmp_path / "atomic.txt") == expected
    assert _mode(tmp_path / "by_path.bin") == expected


def test_atomic_path_with_pyarrow_and_numpy(tmp_path, umask):
    np = pytest.importorskip("numpy")
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    umask(0o002)
    with atomic_path(tmp_path / "t.parquet") as tmp:
        pq.write_table(pa.table({"a": [1, 2, 3]}), tmp)
    with atomic_path(tmp_path / "a.npy") as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, np.arange(4))
    assert pq.read_table(tmp_path / "t.parquet").column("a").to_pylist() == [1, 2, 3]
    assert np.load(tmp_path / "a.npy").tolist() == [0, 1, 2, 3]
    assert _mode(tmp_path / "t.parquet") == 0o664 and _mode(tmp_path / "a.npy") == 0o664
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy", "t.parquet"]


def test_failed_write_keeps_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "out.json"
    atomic_write_text(target, "old")

    def broken(fh):
        fh.write(b"half")
        raise RuntimeError("disk full")

    from rellax_fast._io import atomic_write

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, broken)
    with pytest.raises(KeyError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise KeyError("interrupted")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def _dead_pid() -> int:
    """A pid no process has: above the kernel's pid_max (so never reused), else a child that has exited."""
    try:
        with open("/proc/sys/kernel/pid_max") as fh:
            return int(fh.read()) + 1
    except (OSError, ValueError):
        proc = subprocess.Popen([sys.executable, "-c", "pass"])
        proc.wait()
        return proc.pid


def test_stale_temporaries_of_dead_processes_are_removed_on_next_write(tmp_path):
    live = temp_path_for(tmp_path / "keep.bin")  # this process: alive
    live.write_bytes(b"in flight")
    name = temp_path_for(tmp_path / "x.bin").name
    dead = tmp_path / name.replace(f"-{os.getpid()}-", f"-{_dead_pid()}-")
    dead.write_bytes(b"orphan")
    dead_dir = tmp_path / temp_path_for(tmp_path / "folder").name.replace(
        f"-{os.getpid()}-", f"-{_dead_pid()}-"
    )
    dead_dir.mkdir()
    (dead_dir / "part.parquet").write_bytes(b"orphan")
    other_host = tmp_path / ".y.bin.tmp-1-zzzzzz-abcdef01"  # not our pattern (host tag is hex): untouched
    other_host.write_bytes(b"?")
    foreign_live = tmp_path / f".z.bin.tmp-{_dead_pid()}-000000-abcdef01"  # another host's: age decides
    foreign_live.write_bytes(b"?")
    foreign_old = tmp_path / f".w.bin.tmp-{_dead_pid()}-000000-abcdef02"
    foreign_old.write_bytes(b"?")
    old = time.time() - 2 * 24 * 3600
    os.utime(foreign_old, (old, old))
    users = [tmp_path / ".hidden.tmp", tmp_path / "data.tmp-1-abcdef-abcdef01"]  # user files: untouched
    for p in users:
        p.write_bytes(b"user")

    atomic_write_bytes(tmp_path / "x.bin", b"new")

    left = {p.name for p in tmp_path.iterdir()}
    assert dead.name not in left and dead_dir.name not in left and foreign_old.name not in left
    assert {live.name, other_host.name, foreign_live.name, "x.bin"} <= left
    assert all(p.exists() for p in users)
    assert remove_stale_temps(tmp_path) == []  # nothing more to remove


_KILLED_WRITER = r"""
import sys, time
from rellax_fast._io import atomic_write

def writer(fh):
    fh.write(b"partial" * 1000)
    fh.flush()
    print("writing", flush=True)
    time.sleep(60)

atomic_write(sys.argv[1], writer)
"""


def test_killed_writer_keeps_old_file_and_next_write_cleans_up(tmp_path):
    target = tmp_path / "result.json"
    atomic_write_text(target, '{"ok": 1}')
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, str(target)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "writing"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    orphans = [p for p in tmp_path.iterdir() if p.name != "result.json"]
    assert len(orphans) == 1 and f".tmp-{proc.pid}-" in orphans[0].name
    assert target.read_text() == '{"ok": 1}'

    atomic_write_text(target, '{"ok": 2}')
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]
    assert target.read_text() == '{"ok": 2}'


def test_check_out_dir(tmp_path):
    assert check_out_dir(tmp_path / "new" / "run") == tmp_path / "new" / "run"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"--out .*file: exists and is not a folder"):
        check_out_dir(tmp_path / "file")
    with pytest.raises(ValueError, match=r"--out .*: .*file is a file, not a folder"):
        check_out_dir(tmp_path / "file" / "sub")
    (tmp_path / "link").symlink_to(tmp_path / "missing")
    with pytest.raises(ValueError, match="broken symbolic link"):
        check_out_dir(tmp_path / "link")


def test_make_temp_dir_mode_and_cleanup(tmp_path, umask):
    umask(0o022)
    made = make_temp_dir(tmp_path / "prepared")
    assert made.parent == tmp_path and made.is_dir() and not any(made.iterdir())
    assert _mode(made) == 0o755  # as mkdir, not mkdtemp's 0o700
    (made / "train.parquet").write_bytes(b"x")
    assert remove_stale_temps(tmp_path) == []  # this process is alive: kept
    orphan = tmp_path / made.name.replace(f"-{os.getpid()}-", f"-{_dead_pid()}-")
    made.rename(orphan)
    again = make_temp_dir(tmp_path / "prepared")  # the next run removes the dead writer's folder
    assert not orphan.exists() and again.is_dir()


class _Opaque:
    def __str__(self) -> str:
        return "opaque-object"


@pytest.mark.parametrize(
    "obj",
    [
        {"source": {"files": [["config.json", 12, "ab"]]}, "options": {"batch_size": 64, "max_length": None}},
        {"b": 1, "a": [1.5, float("nan"), True], "é": "Amélie (2001)"},
        [3, "x", {"z": {"y": 1, "x": 2}}],
        {"path": Path("/tmp/x"), "object": _Opaque(), "tuple": (1, 2)},
        "plain string",
    ],
)
def test_json_sha256_equals_the_inline_expressions_it_replaced(obj):
    # subr/encoders.py and bench/quality.py both hashed exactly this (cache keys on disk depend on it)
    inline = hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
    assert json_sha256(obj) == inline


def test_json_sha256_is_canonical_and_ascii_escaped():
    assert json_sha256({"b": 1, "a": "é"}) == json_sha256({"a": "é", "b": 1})
    assert json_sha256({"b": 1, "a": "é"}) == hashlib.sha256(b'{"a": "\\u00e9", "b": 1}').hexdigest()
    assert json_sha256({"a": 1}) != json_sha256({"a": 2}) != json_sha256({"a": "1"})
    assert json_sha256({"p": _Opaque()}) == json_sha256({"p": "opaque-object"})  # default=str


def test_atomic_write_png_saves_closes_and_keeps_old_file_on_failure(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    path = atomic_write_png(tmp_path / "p.png", fig)
    assert path == tmp_path / "p.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not plt.fignum_exists(fig.number)  # closed
    old = path.read_bytes()

    class Broken:
        def savefig(self, *args, **kwargs):
            raise RuntimeError("renderer failed")

    with pytest.raises(RuntimeError, match="renderer failed"):
        atomic_write_png(path, Broken())
    assert path.read_bytes() == old and sorted(p.name for p in tmp_path.iterdir()) == ["p.png"]


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.int64])
def test_atomic_write_npy_round_trips_returns_its_bytes_and_refuses_objects(tmp_path, dtype):
    arr = (np.random.default_rng(7).standard_normal((5, 3)) * 100).astype(dtype)
    path = tmp_path / "a.npy"
    payload = atomic_write_npy(path, arr)
    assert path.read_bytes() == payload  # the bytes a caller checksums are the bytes on disk
    back = np.load(path, allow_pickle=False)
    assert back.dtype == arr.dtype and np.array_equal(back, arr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy"]  # no temp left, no ".npy.npy"
    with pytest.raises(ValueError):  # object arrays would need pickles: refused, the old file kept
        atomic_write_npy(path, np.array([{"a": 1}], dtype=object))
    assert path.read_bytes() == payload and sorted(p.name for p in tmp_path.iterdir()) == ["a.npy"]


# ------------------------------------------------------------------------------------------------ file_lock

PROBE = r"""
import fcntl, os, sys
path, mode = sys.argv[1], sys.argv[2]
fd = os.open(path, os.O_RDONLY)
try:
    fcntl.flock(fd, (fcntl.LOCK_EX if mode == "ex" else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    print("free")
except BlockingIOError:
    print("held")
"""


def _probe(path, mode: str) -> str:
    """Whether another process could take the lock on ``path`` now, without waiting."""
    return subprocess.run(
        [sys.executable, "-c", PROBE, str(path), mode], capture_output=True, text=True, check=True
    ).stdout.strip()


def test_file_lock_on_a_folder_is_exclusive_or_shared_and_leaves_nothing(tmp_path):
    pytest.importorskip("fcntl")
    folder = tmp_path / "prepared"
    folder.mkdir()
    with file_lock(folder, exclusive=True):
        assert _probe(folder, "sh") == "held" and _probe(folder, "ex") == "held"
    assert _probe(folder, "ex") == "free"  # released on exit
    with file_lock(folder, exclusive=False):
        assert _probe(folder, "sh") == "free" and _probe(folder, "ex") == "held"
    assert list(folder.iterdir()) == []  # a folder is locked itself: no lock file


def test_file_lock_on_a_file_path_creates_the_lock_file_and_releases_on_error(tmp_path):
    pytest.importorskip("fcntl")
    lock = tmp_path / "cache" / ".model.lock"  # its folder does not exist yet
    with pytest.raises(RuntimeError, match="boom"):
        with file_lock(lock):
            assert lock.is_file() and _probe(lock, "ex") == "held"
            raise RuntimeError("boom")
    assert _probe(lock, "ex") == "free"


def test_file_lock_where_the_filesystem_refuses_locks_warns_and_runs(tmp_path, monkeypatch, caplog):
    fcntl = pytest.importorskip("fcntl")

    def refuse(fd, op):
        raise OSError(37, "No locks available")

    monkeypatch.setattr(fcntl, "flock", refuse)
    ran = []
    with caplog.at_level("WARNING", logger="rellax_fast._io"):
        with file_lock(tmp_path):
            ran.append(True)
    assert ran == [True]
    assert f"{tmp_path}: cannot lock it" in caplog.text and "No locks available" in caplog.text
