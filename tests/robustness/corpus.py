"""The bad-input corpus: a tiny MovieLens-100K-format dataset and every corrupt variant of it.

``write_clean(folder)`` writes ``u.data``, ``u.item``, ``u.user`` and ``u.genre`` in ml-100k's real format
(8 users x 12 ratings, 20 items: enough for ``prepare`` with its default ``--min-history 5``).
``write_variant(name, folder)`` writes the clean files and then applies one corruption. ``VARIANTS`` says,
for each, what a robust loader must do:

- ``Expect.same``: load, and give exactly the clean dataset (a fixable or harmless difference), optionally
  with a warning matching ``warning``;
- ``Expect.error``: raise ``error`` with a message matching ``message`` that names the file (and the line).

Nothing is copied from a real dataset: the files are generated here, small and deterministic.
"""

from __future__ import annotations

import enum
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

N_USERS, N_ITEMS, PER_USER = 8, 20, 12
GENRES = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)


def clean_rows() -> List[str]:
    """u.data rows (no newline): user, item, rating, time; interleaved users, distinct times per user."""
    rows = []
    for k in range(PER_USER):
        for u in range(1, N_USERS + 1):
            item = (u * 7 + k * 3) % N_ITEMS + 1
            rating = (u + k * k) % 5 + 1
            rows.append(f"{u}\t{item}\t{rating}\t{880000000 + 1000 * k + 37 * u}")
    return rows


def _item_lines() -> List[str]:
    lines = []
    for i in range(1, N_ITEMS + 1):
        flags = ["0"] * len(GENRES)
        flags[i % len(GENRES)] = "1"
        lines.append(
            f"{i}|Movie {i} ({1980 + i})|01-Jan-{1980 + i}||http://example.org/{i}|{'|'.join(flags)}"
        )
    return lines


def _user_lines() -> List[str]:
    return [f"{u}|{20 + u}|{'MF'[u % 2]}|other|{10000 + u}" for u in range(1, N_USERS + 1)]


def write_clean(folder: Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "u.data").write_text("".join(r + "\n" for r in clean_rows()))
    (folder / "u.item").write_text("".join(line + "\n" for line in _item_lines()), encoding="latin-1")
    (folder / "u.user").write_text("".join(line + "\n" for line in _user_lines()))
    (folder / "u.genre").write_text("".join(f"{g}|{k}\n" for k, g in enumerate(GENRES)) + "\n")
    return folder


def _rewrite_rows(folder: Path, edit: Callable[[List[str]], List[str]], end: str = "\n") -> None:
    rows = edit(clean_rows())
    (folder / "u.data").write_text(end.join(rows) + end)


def _set_field(row: int, field: int, value: str):
    def edit(rows):
        parts = rows[row].split("\t")
        parts[field] = value
        rows[row] = "\t".join(parts)
        return rows

    return edit


class Expect(enum.Enum):
    same = "same"
    error = "error"


@dataclass(frozen=True)
class Variant:
    corrupt: Callable[[Path], None]
    expect: Expect
    error: Optional[type] = None  # exception class name resolved by the tests (DataFormatError, ...)
    message: str = ""  # regex the error message must match (it names the file and the line)
    warning: str = ""  # regex of the DataWarning an Expect.same variant must give ("" = none)


def _dup_every_row(folder: Path) -> None:
    _rewrite_rows(folder, lambda rows: [r for r in rows for _ in range(2)])


def _dup_with_other_rating(folder: Path) -> None:
    # a re-rated copy of rows 0..9 earlier in the file: the later (original) row wins
    def edit(rows):
        def other(r):
            u, i, rating, t = r.split("\t")
            return "\t".join([u, i, str(int(rating) % 5 + 1), t])

        return [other(r) for r in rows[:10]] + rows

    _rewrite_rows(folder, edit)


def _cut_mid_line(folder: Path) -> None:
    data = (folder / "u.data").read_bytes()
    (folder / "u.data").write_bytes(data[:-5])  # "...\t880011296\n" -> "...\t88001"


def _no_final_newline(folder: Path) -> None:
    (folder / "u.data").write_bytes((folder / "u.data").read_bytes().rstrip(b"\n"))


def _crlf(folder: Path) -> None:
    _rewrite_rows(folder, lambda rows: rows, end="\r\n")


def _extra_column_every_row(folder: Path) -> None:
    _rewrite_rows(folder, lambda rows: [r + "\t0" for r in rows])


def _extra_column_one_row(folder: Path) -> None:
    _rewrite_rows(folder, lambda rows: rows[:6] + [rows[6] + "\t0"] + rows[7:])


def _long_first_row(folder: Path) -> None:
    _rewrite_rows(folder, lambda rows: [rows[0] + "\t0"] + rows[1:])


def _short_first_row(folder: Path) -> None:
    _rewrite_rows(folder, lambda rows: [rows[0].rsplit("\t", 1)[0]] + rows[1:])


def _udata_is_dir(folder: Path) -> None:
    (folder / "u.data").unlink()
    (folder / "u.data").mkdir()


def _uitem_is_dir(folder: Path) -> None:
    (folder / "u.item").unlink()
    (folder / "u.item").mkdir()


def _item_no_final_newline(folder: Path) -> None:
    (folder / "u.item").write_bytes((folder / "u.item").read_bytes().rstrip(b"\n"))


def _empty_udata(folder: Path) -> None:
    (folder / "u.data").write_bytes(b"")


N_ROWS = N_USERS * PER_USER

VARIANTS: Dict[str, Variant] = {
    "clean": Variant(lambda folder: None, Expect.same),
    "crlf_line_ends": Variant(_crlf, Expect.same),
    "every_row_twice": Variant(
        _dup_every_row, Expect.same, warning=rf"u\.data: dropped {N_ROWS} repeated ratings .*\({N_ROWS} exact"
    ),
    "rerated_copies": Variant(
        _dup_with_other_rating,
        Expect.same,
        warning=r"u\.data: dropped 10 repeated ratings .*\(0 exact.*line 1\b",
    ),
    "item_file_no_final_newline": Variant(
        _item_no_final_newline,
        Expect.same,
        warning=rf"u\.item: line {N_ITEMS}: the file does not end with a newline",
    ),
    "cut_mid_line": Variant(
        _cut_mid_line,
        Expect.error,
        "DataFormatError",
        rf"u\.data: line {N_ROWS}: the file does not end with a newline, so its last line may be cut short "
        r"\(it reads '8\\t\d+\\t\d\\t88001'\)",
    ),
    "no_final_newline": Variant(
        _no_final_newline,
        Expect.error,
        "DataFormatError",
        rf"u\.data: line {N_ROWS}: the file does not end with",
    ),
    "negative_timestamp": Variant(
        lambda f: _rewrite_rows(f, _set_field(2, 3, "-5")),
        Expect.error,
        "DataFormatError",
        r"u\.data: line 3: timestamp -5 is negative",
    ),
    "timestamp_beyond_int64": Variant(
        lambda f: _rewrite_rows(f, _set_field(2, 3, "99999999999999999999")),
        Expect.error,
        "DataFormatError",
        r"u\.data: line 3: field 't' is outside the 64-bit integer range: '99999999999999999999'",
    ),
    "timestamp_not_a_number": Variant(
        lambda f: _rewrite_rows(f, _set_field(4, 3, "88x")),
        Expect.error,
        "DataFormatError",
        r"u\.data: line 5: field 't' is not a valid int: '88x'",
    ),
    "extra_column_every_row": Variant(
        _extra_column_every_row,
        Expect.error,
        "DataFormatError",
        r"u\.data: line 1: 5 fields on every line, expected 4",
    ),
    "extra_column_one_row": Variant(
        _extra_column_one_row, Expect.error, "DataFormatError", r"u\.data: line 7: 5 fields, expected 4"
    ),
    "long_first_row": Variant(
        _long_first_row, Expect.error, "DataFormatError", r"u\.data: line 1: 5 fields, expected 4"
    ),
    "short_first_row": Variant(
        _short_first_row, Expect.error, "DataFormatError", r"u\.data: line 1: 3 fields, expected 4"
    ),
    "udata_is_a_folder": Variant(
        _udata_is_dir,
        Expect.error,
        "DatasetNotFoundError",
        r"u\.data: is a folder, expected the data file u\.data",
    ),
    "uitem_is_a_folder": Variant(
        _uitem_is_dir,
        Expect.error,
        "DatasetNotFoundError",
        r"u\.item: is a folder, expected the data file u\.item",
    ),
    "empty_ratings": Variant(_empty_udata, Expect.error, "DataFormatError", r"u\.data: no ratings"),
}


def write_variant(name: str, folder: Path) -> Path:
    """Write the clean dataset into ``folder`` and apply corruption ``name`` (a key of VARIANTS)."""
    folder = Path(folder)
    if folder.exists():
        shutil.rmtree(folder)
    write_clean(folder)
    VARIANTS[name].corrupt(folder)
    return folder


def write_all(root: Path) -> Dict[str, Path]:
    """Every variant in its own folder under ``root`` (``root/<name>``)."""
    return {name: write_variant(name, Path(root) / name) for name in VARIANTS}
