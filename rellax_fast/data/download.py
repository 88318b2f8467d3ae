"""Fetching raw dataset archives: official URLs, pinned checksums, atomic writes, a progress bar.

Every dataset that is not generated locally has a :class:`DatasetSource`: the archive's URLs (official first,
then mirrors), the archive's checksum where the publisher gives one, and the files that must exist after
extraction (with their own checksums where known). When the files are missing, :func:`ensure_files`
downloads the archive with ``urllib`` (no extra dependency), verifies it, extracts only the needed members,
and writes every file through :func:`rellax_fast._io.atomic_path` (a temporary file in the same folder, then
``os.replace``) so that an interrupted download never leaves a half-written file behind. Offline, it raises
:class:`DatasetNotFoundError` that says where to put which files.

An archive whose checksum does not match is never deleted: it may be the user's own copy. It is moved aside
to ``<archive>.bad`` (numbered if that exists) and the error says where it went.
"""

from __future__ import annotations

import hashlib
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

from .._io import atomic_path

__all__ = ["DatasetSource", "SOURCES", "DatasetNotFoundError", "ChecksumError", "ensure_files", "file_digest"]

GROUPLENS = "https://files.grouplens.org/datasets/movielens/"


class DatasetNotFoundError(FileNotFoundError):
    """The raw files are missing and could not be downloaded."""


class ChecksumError(RuntimeError):
    """A downloaded or extracted file does not match its pinned checksum."""


@dataclass(frozen=True)
class DatasetSource:
    archive: str  # file name of the archive
    urls: Tuple[str, ...]  # official first, then mirrors
    member_prefix: str  # folder inside the zip that holds the files ("" for none)
    files: Tuple[str, ...]  # files the loader needs
    archive_md5: Optional[str] = None  # as published (GroupLens .md5 sidecars)
    md5_sidecar: Optional[str] = None  # URL of a published checksum file, for archives that change
    file_md5: Dict[str, str] = field(default_factory=dict)  # per-file checksums, where known
    note: str = ""


# Archive MD5s are GroupLens' published sidecars (<archive>.md5 next to each zip). ml-latest-small is
# re-issued from time to time, so its checksum is read from the sidecar at download time instead.
# BookCrossing: the original host (informatik.uni-freiburg.de/~cziegler/BX) is offline. We try it, then
# a commonly used mirror, and accept the bytes only if the three extracted CSVs match the MD5s of the
# original 2004 dump (as pinned in PIReTship/bookdata-tools' DVC lock file), whatever the mirror.
SOURCES: Dict[str, DatasetSource] = {
    "ml-100k": DatasetSource(
        "ml-100k.zip",
        (GROUPLENS + "ml-100k.zip",),
        "ml-100k",
        ("u.data", "u.item", "u.user", "u.genre"),
        archive_md5="0e33842e24a9c977be4e0107933c0723",
    ),
    "ml-1m": DatasetSource(
        "ml-1m.zip",
        (GROUPLENS + "ml-1m.zip",),
        "ml-1m",
        ("ratings.dat", "movies.dat", "users.dat"),
        archive_md5="c4d9eecfca2ab87c1945afe126590906",
    ),
    "ml-20m": DatasetSource(
        "ml-20m.zip",
        (GROUPLENS + "ml-20m.zip",),
        "ml-20m",
        ("ratings.csv", "movies.csv"),
        archive_md5="cd245b17a1ae2cc31bb14903e1204af3",
    ),
    "ml-25m": DatasetSource(
        "ml-25m.zip",
        (GROUPLENS + "ml-25m.zip",),
        "ml-25m",
        ("ratings.csv", "movies.csv"),
        archive_md5="6b51fb2759a8657d3bfcbfc42b592ada",
    ),
    "ml-latest-small": DatasetSource(
        "ml-latest-small.zip",
        (GROUPLENS + "ml-latest-small.zip",),
        "ml-latest-small",
        ("ratings.csv", "movies.csv"),
        md5_sidecar=GROUPLENS + "ml-latest-small.zip.md5",
    ),
    "bookcrossing": DatasetSource(
        "BX-CSV-Dump.zip",
        (
            "http://www2.informatik.uni-freiburg.de/~cziegler/BX/BX-CSV-Dump.zip",
            "https://web.archive.org/web/2015id_/http://www2.informatik.uni-freiburg.de/~cziegler/BX/BX-CSV-Dump.zip",
        ),
        "",
        ("BX-Book-Ratings.csv", "BX-Books.csv", "BX-Users.csv"),
        archive_md5="37d647ee9e18ba134ea6d78ee4fe5292",
        file_md5={
            "BX-Book-Ratings.csv": "b34fe0534c9b846b8a45f316c60eb92b",
            "BX-Books.csv": "d50d59b0c40f10d37d379d9fd3fb98ac",
            "BX-Users.csv": "6ec3fe6463da9e149d474ed8226612a2",
        },
        note="The original host is offline; the Wayback Machine copy of BX-CSV-Dump.zip is used as the mirror.",
    ),
}


def file_digest(path: Path, algo: str = "md5") -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _missing(data_dir: Path, source: DatasetSource) -> Sequence[str]:
    return [name for name in source.files if not (data_dir / name).exists()]


def _offline_message(
    name: str, data_dir: Path, source: DatasetSource, missing: Sequence[str], why: str
) -> str:
    return (
        f"dataset {name!r}: missing {', '.join(missing)} in {data_dir} ({why}).\n"
        f"Put the files {', '.join(source.files)} (from {source.archive}, e.g. {source.urls[0]}) directly in "
        f"{data_dir}, or pass --data-dir / set RELLAX_DATA_DIR to the folder that holds them."
    )


def _fetch(url: str, dest: Path, timeout: float = 30.0) -> None:
    """Stream ``url`` into ``dest`` atomically with a tqdm bar."""
    from tqdm.auto import tqdm

    req = urllib.request.Request(url, headers={"User-Agent": "rellax-fast"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        total = int(resp.headers.get("Content-Length") or 0) or None
        with (
            atomic_path(dest) as tmp,
            open(tmp, "wb") as out,
            tqdm(total=total, unit="B", unit_scale=True, desc=dest.name) as bar,
        ):
            for chunk in iter(lambda: resp.read(1 << 20), b""):
                out.write(chunk)
                bar.update(len(chunk))


def _published_md5(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as resp:
        text = resp.read().decode("ascii", "replace")
    for token in text.replace("=", " ").split():
        if len(token) == 32 and all(c in "0123456789abcdef" for c in token.lower()):
            return token.lower()
    raise ChecksumError(f"no MD5 digest found in {url}: {text[:200]!r}")


def _extract(archive: Path, data_dir: Path, source: DatasetSource) -> None:
    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile as exc:
        raise ChecksumError(f"{archive}: not a valid zip archive ({exc})") from exc
    with zf:
        names = {Path(n).name: n for n in zf.namelist() if not n.endswith("/")}
        for name in source.files:
            if name not in names:
                raise ChecksumError(f"{archive}: the archive has no member {name!r}")
            with atomic_path(data_dir / name) as tmp:
                with open(tmp, "wb") as out, zf.open(names[name]) as src:
                    for chunk in iter(lambda: src.read(1 << 20), b""):
                        out.write(chunk)
                expected = source.file_md5.get(name)
                got = file_digest(tmp) if expected else None
                if expected and got != expected:
                    raise ChecksumError(f"{archive}: member {name} has MD5 {got}, expected {expected}")


def _move_aside(path: Path) -> Path:
    """Rename ``path`` to ``<path>.bad`` (``.bad.1``, ``.bad.2`` ... if taken); returns the new path."""
    dest = path.with_name(path.name + ".bad")
    k = 0
    while dest.exists():
        k += 1
        dest = path.with_name(f"{path.name}.bad.{k}")
    path.rename(dest)
    return dest


def ensure_files(name: str, data_dir: Path, download: bool = True) -> Path:
    """Make sure ``data_dir`` holds the raw files of dataset ``name``; download and verify them if not."""
    source = SOURCES[name]
    data_dir = Path(data_dir)
    if data_dir.exists() and not data_dir.is_dir():
        raise DatasetNotFoundError(
            f"data folder {data_dir}: is a file, not a folder (--data-dir / RELLAX_DATA_DIR)"
        )
    for f in source.files:
        if (data_dir / f).is_dir():
            raise DatasetNotFoundError(f"{data_dir / f}: is a folder, expected the data file {f}")
    missing = _missing(data_dir, source)
    # u.genre is optional for ml-100k (the genre list is fixed by the format); everything else is needed.
    if name == "ml-100k" and missing == ["u.genre"]:
        return data_dir
    if not missing:
        return data_dir
    if not download:
        raise DatasetNotFoundError(
            _offline_message(
                name, data_dir, source, missing, "downloads disabled: download=False / --no-download"
            )
        )
    data_dir.mkdir(parents=True, exist_ok=True)
    archive = data_dir / source.archive
    errors = []
    if not archive.exists():
        for url in source.urls:
            try:
                _fetch(url, archive)
                break
            except (urllib.error.URLError, OSError, TimeoutError) as exc:
                errors.append(f"{url}: {exc}")
        else:
            raise DatasetNotFoundError(
                _offline_message(name, data_dir, source, missing, "download failed: " + "; ".join(errors))
            )
    expected = source.archive_md5
    if source.md5_sidecar:
        try:
            expected = _published_md5(source.md5_sidecar)
        except (urllib.error.URLError, OSError) as exc:
            raise DatasetNotFoundError(
                _offline_message(
                    name, data_dir, source, missing, f"checksum download failed: {source.md5_sidecar}: {exc}"
                )
            ) from exc
    # BookCrossing mirrors may re-zip the dump: there the per-file MD5s are authoritative.
    if expected and not source.file_md5:
        got = file_digest(archive)
        if got != expected:
            bad = _move_aside(archive)
            raise ChecksumError(
                f"{archive}: MD5 {got} does not match the published {expected}; moved it aside to {bad} "
                f"(delete it if it is not needed) so that the next run downloads a fresh copy"
            )
    try:
        _extract(archive, data_dir, source)
    except ChecksumError as exc:
        bad = _move_aside(archive)
        raise ChecksumError(
            f"{exc}; moved the archive aside to {bad} so that the next run downloads a fresh copy"
        ) from exc
    return data_dir
