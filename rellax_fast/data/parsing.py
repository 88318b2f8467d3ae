"""Checked parsing of the raw rating files: the one place that turns delimited text into typed columns
and reports corruption, shared by every dataset reader (:mod:`.movielens`, :mod:`.bookcrossing`).

Every reader checks what it reads; a corrupted file raises :class:`DataFormatError` naming the file and
the (1-based) line:

- a row with more or fewer fields than the format has (the column count is reported; an extra column is
  never taken for an index), a value that is not a number, out of range or beyond int64;
- a ratings file whose last line has no newline (a download or copy cut mid-line: its last row may be
  short, e.g. a timestamp ``8843``); for metadata files, and for BookCrossing's fully quoted rows where a
  cut shows as an unclosed quote, that is a :class:`DataWarning` instead;
- a negative timestamp;
- a path that is a folder or missing.

Repeated ratings would put a sample's own target into its history (label leakage): every reader keeps only
the last row of each (user, item, timestamp) -- for BookCrossing, which has no time, of each (user, ISBN) --
and says how many it dropped with a :class:`DataWarning` (:func:`drop_duplicate_ratings`).
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import re
import warnings
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import pandas as pd


class DataFormatError(ValueError):
    """A raw data file does not follow its published format (names the file and line)."""


class DataWarning(UserWarning):
    """A raw data file was read, but something in it was fixed or looks suspicious (names the file)."""


@contextlib.contextmanager
def data_warnings_to_stderr():
    """For command-line tools: every :class:`DataWarning` raised inside (repeats included) is printed on
    leaving as one ``warning: <message>`` line on stderr, not as a warnings-module dump; other warnings
    are shown as usual. Nothing is printed if the block raises (its error is the message)."""
    import sys

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DataWarning)
        yield
    for w in caught:
        if issubclass(w.category, DataWarning):
            print(f"warning: {w.message}", file=sys.stderr)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)


def _check_file(path: Path) -> None:
    """``path`` must be an existing regular file (not a folder, not a broken link)."""
    if path.is_dir():
        raise DataFormatError(f"{path}: is a folder, expected a data file")
    if not path.exists():
        raise DataFormatError(f"{path}: file not found")


def check_final_newline(path: Path, strict: bool) -> None:
    """A text file must end with a newline: without one, the last line may have been cut mid-row.

    ``strict``: a :class:`DataFormatError` (ratings files, whose values would be silently wrong); otherwise a
    :class:`DataWarning`. An empty file passes here (it is reported by whoever needs rows).
    """
    _check_file(path)
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        f.seek(max(0, size - 4096))
        tail = f.read()
        f.seek(0)
        line = sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 24), b"")) + 1
    last = tail.rsplit(b"\n", 1)[-1].decode("latin-1")[-200:]
    msg = (
        f"{path}: line {line}: the file does not end with a newline, so its last line may be cut short "
        f"(it reads {last!r})"
    )
    if strict:
        raise DataFormatError(
            msg + "; if that row is complete, end the file with a newline, else remove the row"
        )
    warnings.warn(msg, DataWarning, stacklevel=3)


def read_text(path: Path, encoding: str) -> str:
    """The whole file decoded as ``encoding``; an unreadable file or a bad byte is reported with its line."""
    _check_file(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError as exc:
        raise DataFormatError(f"{path}: file not found") from exc
    except OSError as exc:
        raise DataFormatError(f"{path}: cannot be read: {exc.strerror or exc}") from exc
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataFormatError(f"{path}: line {line}: not valid {encoding} ({exc.reason})") from exc


def _field_count_error(path: Path, exc: Exception, n_fields: int, header: bool) -> DataFormatError:
    """A pandas ParserError ("Expected 4 fields in line 7, saw 5") as a DataFormatError naming the line.

    pandas counts fields from the first data line: when that count is not the format's, the first data line
    is the odd one out, so it is named instead."""
    text = str(exc)
    m = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", text)
    if m:
        expected, line, saw = (int(g) for g in m.groups())
        if expected != n_fields:
            line, saw = 1 + int(header), expected
        return DataFormatError(
            f"{path}: line {line}: {saw} fields, expected {n_fields} (wrong number of fields)"
        )
    m = re.search(r"EOF inside string starting at row (\d+)", text)
    if m:  # pandas counts rows from 0, the header and skipped rows included
        return DataFormatError(
            f"{path}: line {int(m.group(1)) + 1}: a quoted field is never closed (file cut short, or a stray quote)"
        )
    m = re.search(r"line (\d+)", text)
    where = f"line {m.group(1)}: " if m else ""
    return DataFormatError(f"{path}: {where}cannot be parsed ({text.strip()})")


def _check_column_count(path: Path, df: pd.DataFrame, n_fields: int, header: bool) -> None:
    """pandas sized the table from the first data line (a longer later line raised); it must be the format's.
    Lines shorter than the first are padded with missing values: they tell whether every line is too long."""
    if df.shape[1] == n_fields:
        return
    if df.shape[1] > n_fields:
        extra = df.iloc[:, n_fields:]
        long_rows = (extra.notna() & (extra != "")).any(axis=1).to_numpy()  # padding is "" or NaN
        if long_rows.any() and not long_rows.all():
            raise DataFormatError(
                f"{path}: line {_line_of(df, int(np.flatnonzero(long_rows)[0]), header)}: {df.shape[1]} fields, "
                f"expected {n_fields} (wrong number of fields)"
            )
    raise DataFormatError(
        f"{path}: line {1 + int(header)}: {df.shape[1]} fields on every line, expected {n_fields} "
        f"(wrong separator, or an extra or missing column)"
    )


def parse_table(
    path: Path,
    text: str,
    sep: str,
    names: Sequence[str],
    *,
    header: bool,
    quoting: int = csv.QUOTE_NONE,
    escapechar: Optional[str] = None,
) -> pd.DataFrame:
    """Parse delimited ``text`` with pandas' C parser (fast for 25M rows); every value stays a string.

    Columns are counted, never guessed: ``index_col=False`` and no ``names`` while parsing, so that a row
    with an extra field is not silently turned into an index (pandas' default) or cut off (with ``names``).
    Rows with too many fields, or a file whose every row has the wrong count, raise here; rows with too few
    show up as missing values, which :func:`require` reports with their line number. Blank lines are not
    skipped (they are corruption). The header row, if any, is skipped here and checked by the caller.
    """
    try:
        df = pd.read_csv(
            io.StringIO(text),
            sep=sep,
            header=None,
            skiprows=1 if header else None,
            index_col=False,
            dtype=str,
            keep_default_na=False,
            na_values=[],
            quoting=quoting,
            escapechar=escapechar,
            skip_blank_lines=False,
            engine="c",
        )
    except pd.errors.EmptyDataError:
        return pd.DataFrame({n: pd.Series([], dtype=object) for n in names})
    except pd.errors.ParserError as exc:
        raise _field_count_error(path, exc, len(names), header) from exc
    _check_column_count(path, df, len(names), header)
    df.columns = list(names)
    return df


def numeric_columns(
    path: Path,
    sep: str,
    names: Sequence[str],
    kinds: Sequence[str],
    *,
    header: bool,
    encoding: str,
    text: Optional[str] = None,
) -> dict:
    """Parse an all-numeric table (ratings files: up to 25M rows).

    Fast path, straight from a file with a one-character separator: ``pyarrow.csv`` with explicit column
    types (int64 / float64; multithreaded, typed buffers, never object columns), strict about column counts
    and blank lines. Otherwise (``::`` files, text given) pandas' typed C parser. If the fast path fails or
    yields missing or non-finite values, the file is re-parsed as strings to report the first bad line
    precisely (:func:`parse_table`).
    """
    if text is None:
        _check_file(path)
        if len(sep) == 1:
            cols = _arrow_numeric_columns(path, sep, names, kinds, header=header, encoding=encoding)
            if cols is not None:
                return cols
    dtypes = {k: (np.int64 if kind == "int" else np.float64) for k, kind in enumerate(kinds)}
    try:
        df = pd.read_csv(
            io.StringIO(text) if text is not None else path,
            sep=sep,
            header=None,
            skiprows=1 if header else None,
            index_col=False,
            dtype=dtypes,
            quoting=csv.QUOTE_NONE,
            skip_blank_lines=False,
            engine="c",
            encoding=None if text is not None else encoding,
        )
        if df.shape[1] == len(names):
            cols = {n: df[k].to_numpy() for k, n in enumerate(names)}
            if all(np.isfinite(v).all() for v in cols.values()):
                return cols
    except pd.errors.EmptyDataError:
        return {
            n: np.zeros(0, dtype=np.int64 if kind == "int" else np.float64) for n, kind in zip(names, kinds)
        }
    except (ValueError, OverflowError, pd.errors.ParserError, UnicodeDecodeError):
        pass
    if text is None:
        text = read_text(path, encoding)
    df = parse_table(path, text, sep, names, header=header)
    require(path, df, names, header)
    return {n: numeric(path, df, n, header, k) for n, k in zip(names, kinds)}


def _arrow_numeric_columns(
    path: Path, sep: str, names: Sequence[str], kinds: Sequence[str], *, header: bool, encoding: str
) -> Optional[dict]:
    """The typed ``pyarrow.csv`` read of an all-numeric file, or None when it cannot be read cleanly that way
    (any parse error, a missing or non-finite value, a wrong column count, a blank line: the caller's slow
    path then names the line). An empty file (no data rows) gives empty columns."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    types = {n: (pa.int64() if kind == "int" else pa.float64()) for n, kind in zip(names, kinds)}
    try:
        table = pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(
                column_names=list(names),
                skip_rows=int(header),
                use_threads=False,
                encoding="utf8" if encoding.lower() in ("utf-8", "utf8") else encoding,
            ),
            parse_options=pacsv.ParseOptions(delimiter=sep, quote_char=False, ignore_empty_lines=False),
            convert_options=pacsv.ConvertOptions(column_types=types, strings_can_be_null=False),
            # one thread and the system allocator: the columns come out as one chunk each (zero-copy to numpy)
            # and the parse buffers go back to the OS; arrow's threaded default kept about 60 bytes per rating
            # resident for the rest of `prepare` (measured at 1.2M ratings), for ~0.4 s per million rows saved
            memory_pool=pa.system_memory_pool(),
        )
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, UnicodeDecodeError, ValueError, OSError):
        return None
    cols = {}
    for n, kind in zip(names, kinds):
        col = table.column(n)
        if col.null_count:
            return None
        arr = col.to_numpy()
        if kind != "int" and not np.isfinite(arr).all():
            return None
        cols[n] = arr.astype(np.int64 if kind == "int" else np.float64, copy=False)
    return cols


def _line_of(df: pd.DataFrame, row: int, header: bool) -> int:
    return int(row) + 1 + int(header)


def require(path: Path, df: pd.DataFrame, cols: Sequence[str], header: bool, nonempty: bool = False) -> None:
    """Every listed column must be present (and, with ``nonempty``, not empty) on every row."""
    for col in cols:
        bad = (df[col].isna() | (df[col] == "")).to_numpy() if nonempty else df[col].isna().to_numpy()
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise DataFormatError(
                f"{path}: line {_line_of(df, row, header)}: missing field {col!r} (wrong number of fields, "
                f"blank or truncated line)"
            )


_INT64_LIMIT = float(2**63)


def numeric(path: Path, df: pd.DataFrame, col: str, header: bool, kind: str = "int") -> np.ndarray:
    """Convert a string column to int64/float64; a non-numeric or out-of-int64 value is reported with its line."""
    values = pd.to_numeric(df[col].str.strip(), errors="coerce")
    arr = values.to_numpy(dtype=np.float64, na_value=np.nan)
    bad = ~np.isfinite(arr)
    if kind == "int" and not bad.any():
        bad = arr != np.round(arr)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        value = df[col].iloc[row]
        if value == "":
            raise DataFormatError(
                f"{path}: line {_line_of(df, row, header)}: missing field {col!r} (empty: wrong number of "
                f"fields or truncated line)"
            )
        raise DataFormatError(
            f"{path}: line {_line_of(df, row, header)}: field {col!r} is not a valid {kind}: {value!r}"
        )
    if kind != "int":
        return arr
    too_big = (arr >= _INT64_LIMIT) | (arr < -_INT64_LIMIT)
    if values.dtype != np.int64 and too_big.any():
        row = int(np.flatnonzero(too_big)[0])
        raise DataFormatError(
            f"{path}: line {_line_of(df, row, header)}: field {col!r} is outside the 64-bit integer range: "
            f"{df[col].iloc[row].strip()!r}"
        )
    # exact when pandas parsed int64 itself; via float64 only for values it could not (then within 2**63)
    return values.to_numpy(dtype=np.int64) if values.dtype == np.int64 else arr.astype(np.int64)


def check_range(
    path: Path, df: pd.DataFrame, values: np.ndarray, col: str, lo: float, hi: float, header: bool
):
    """Every value of ``col`` must lie in [lo, hi]; the first one outside is reported with its line."""
    bad = (values < lo) | (values > hi)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataFormatError(
            f"{path}: line {_line_of(df, row, header)}: {col} {values[row]} outside [{lo}, {hi}]"
        )


def check_timestamps(path: Path, ts: np.ndarray, header: bool) -> None:
    """Unix timestamps are seconds since 1970: a negative one is corruption (a sign or a cut)."""
    bad = ts < 0
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataFormatError(
            f"{path}: line {_line_of(None, row, header)}: timestamp {int(ts[row])} is negative "
            f"(expected Unix seconds >= 0)"
        )


def _duplicated_last(ratings: pd.DataFrame, keys: List[str]) -> np.ndarray:
    """``ratings.duplicated(keys, keep="last")``, fast at 25M rows: one hash pass over a packed (user, item)
    key finds the few candidate rows, and only those are compared on every key."""
    user, item = ratings["user_id"].to_numpy(), ratings["item_id"].to_numpy()
    if len(ratings) < 100_000 or user.min() < 0 or item.min() < 0 or max(user.max(), item.max()) >= 2**32:
        return ratings.duplicated(subset=keys, keep="last").to_numpy()
    packed = (user.astype(np.uint64) << np.uint64(32)) | item.astype(np.uint64)
    candidates = np.flatnonzero(pd.Series(packed).duplicated(keep=False).to_numpy())
    dup = np.zeros(len(ratings), dtype=bool)
    if len(candidates):
        dup[candidates] = ratings.iloc[candidates].duplicated(subset=keys, keep="last").to_numpy()
    return dup


def drop_duplicate_ratings(
    path: Path, ratings: pd.DataFrame, keys: Sequence[str], header: bool
) -> pd.DataFrame:
    """Keep the last row (in file order) of each ``keys`` group and warn how many were dropped.

    A repeated (user, item, timestamp) is one event listed twice: kept, the copy would sit in the history of
    its own target (the label leaks into the prompt and into DIN's input). An empty ratings file is an error."""
    if len(ratings) == 0:
        raise DataFormatError(f"{path}: no ratings (the file has no data rows)")
    dup = _duplicated_last(ratings, list(keys))
    n = int(dup.sum())
    if n == 0:
        return ratings
    first = int(np.flatnonzero(dup)[0])
    exact = int(ratings[dup].merge(ratings[~dup], on=list(ratings.columns), how="inner").shape[0])
    warnings.warn(
        f"{path}: dropped {n:,} repeated rating{'s' if n > 1 else ''} of the same ({', '.join(keys)}) ({exact:,} exact cop{'ies' if exact != 1 else 'y'}), "
        f"keeping the last row of each; the first dropped is line {_line_of(None, first, header)}",
        DataWarning,
        stacklevel=3,
    )
    return ratings.loc[~dup].reset_index(drop=True)


# One rating event: a repeat of these keys is the same event listed twice (timed datasets).
EVENT_KEYS = ("user_id", "item_id", "timestamp")


def ratings_frame(user, item, rating, ts) -> pd.DataFrame:
    """The ratings table of a :class:`~rellax_fast.data.domains.RecDataset`: int64 ids and time, float32 rating."""
    return pd.DataFrame(
        {
            "user_id": np.asarray(user, dtype=np.int64),
            "item_id": np.asarray(item, dtype=np.int64),
            "rating": np.asarray(rating, dtype=np.float32),
            "timestamp": np.asarray(ts, dtype=np.int64),
        }
    )


def check_known(path: Path, ratings: pd.DataFrame, col: str, known: pd.Index, what: str) -> None:
    """Every ``col`` id of ``ratings`` must be in ``known`` (the item or user table)."""
    unknown = ~ratings[col].isin(known).to_numpy()
    if unknown.any():
        row = int(np.flatnonzero(unknown)[0])
        raise DataFormatError(
            f"{path}: line {row + 1}: {what} {ratings[col].iloc[row]} is not in the {what} table"
        )


def expect_header(path: Path, text: str, header: str) -> None:
    """The first line of ``text`` (a UTF-8 BOM ignored) must be ``header``."""
    first = text.split("\n", 1)[0].strip().lstrip("\ufeff")
    if first != header:
        raise DataFormatError(f"{path}: line 1: expected header {header!r}, got {first[:80]!r}")
