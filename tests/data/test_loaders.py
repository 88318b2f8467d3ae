"""Every loader parses small files written in the dataset's real format (odd rows included); corrupt files
raise DataFormatError naming file and line; downloads verify checksums and write atomically."""

from __future__ import annotations

import hashlib
import io
import zipfile

import numpy as np
import pytest

from rellax_fast.data import DataFormatError, DatasetNotFoundError, load_dataset
from rellax_fast.data import download as dl
from rellax_fast.data.datasets import DataWarning

# ------------------------------------------------------------------------------------------------ writers


def _genre_flags(*on):
    flags = ["0"] * 19
    for k in on:
        flags[k] = "1"
    return "|".join(flags)


def write_ml100k(d, udata=None):
    d.mkdir(parents=True, exist_ok=True)
    (d / "u.data").write_bytes(
        (udata or "1\t1\t5\t881250949\n1\t2\t3\t881250950\n2\t3\t1\t891717742\n2\t1\t4\t878887116\n").encode()
    )
    items = [
        f"1|Toy Story (1995)|01-Jan-1995||http://us.imdb.com/M/title-exact?Toy%20Story%20(1995)|{_genre_flags(3, 4, 5)}",
        # latin-1 accent, comma inside the title
        f"2|Misérables, Les (1995)|01-Jan-1995||http://x|{_genre_flags(8, 12)}",
        # no genre flag set at all -> empty genre list; empty dates
        f"3|unknown||||{_genre_flags()}",
    ]
    (d / "u.item").write_bytes(("\n".join(items) + "\n").encode("latin-1"))
    (d / "u.user").write_bytes(b"1|24|M|technician|85711\n2|53|F|other|94043\n")
    names = [
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
    ]
    (d / "u.genre").write_bytes(("".join(f"{n}|{k}\n" for k, n in enumerate(names)) + "\n").encode())
    return d


def write_ml1m(d):
    d.mkdir(parents=True, exist_ok=True)
    (d / "ratings.dat").write_bytes(b"1::1193::5::978300760\n1::661::3::978302109\n2::1193::4::978298413\n")
    (d / "movies.dat").write_bytes(
        "1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n"
        "661::James and the Giant Peach: Part 1 (1996)::Animation|Children's|Musical\n"
        "42::Café au lait (Métisse) (1993)::Comedy\n".encode("latin-1")
    )
    (d / "users.dat").write_bytes(b"1::F::1::10::48067\n2::M::56::16::70072\n")
    return d


def write_ml_csv(d):
    d.mkdir(parents=True, exist_ok=True)
    (d / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n1,1,4.0,1147880044\n1,2,3.5,1147868817\n2,3,0.5,1147868828\n"
    )
    (d / "movies.csv").write_text(
        "movieId,title,genres\n"
        "1,Toy Story (1995),Adventure|Animation|Children|Comedy|Fantasy\n"
        '2,"American President, The (1995)",Comedy|Drama|Romance\n'
        '3,"Bad ""Quoted"" Title, A (2001)",(no genres listed)\n'
        "4,Amélie (Fabuleux destin d'Amélie Poulain) (2001),Comedy|Romance\n",
        encoding="utf-8",
    )
    return d


def write_bx(d):
    d.mkdir(parents=True, exist_ok=True)
    (d / "BX-Book-Ratings.csv").write_bytes(
        b'"User-ID";"ISBN";"Book-Rating"\n"276725";"034545104X";"0"\n"276726";"0155061224";"5"\n'
        b'"276725";"0155061224";"8"\n'
    )
    (d / "BX-Books.csv").write_bytes(
        '"ISBN";"Book-Title";"Book-Author";"Year-Of-Publication";"Publisher";"Image-URL-S";"Image-URL-M";"Image-URL-L"\n'
        '"034545104X";"Flesh Tones: A Novel";"M. J. Rose";"2002";"Ballantine Books";"s";"m";"l"\n'
        '"0155061224";"Rites of Passage; a \\"quoted\\" story";"Judith Rae";"0";"Heinle";"s";"m";"l"\n'.encode(
            "latin-1"
        )
    )
    (d / "BX-Users.csv").write_bytes(
        '"User-ID";"Location";"Age"\n"276725";"tyler, texas, usa";NULL\n"276726";"séville, spain";"18"\n'.encode(
            "latin-1"
        )
    )
    return d


# -------------------------------------------------------------------------------------------------- parsing


def test_ml100k_format(tmp_path):
    ds = load_dataset("ml-100k", write_ml100k(tmp_path / "ml-100k"), download=False)
    assert ds.domain == "movie" and len(ds.ratings) == 4
    assert list(ds.ratings.dtypes.astype(str)) == ["int64", "int64", "float32", "int64"]
    assert ds.items.loc[2, "title"] == "Misérables, Les (1995)"
    assert ds.items.loc[1, "genres"] == ["Animation", "Children's", "Comedy"]
    assert ds.items.loc[3, "genres"] == []
    assert ds.users.loc[2, "gender"] == "F" and ds.users.loc[2, "age"] == 53
    assert ds.users.loc[1, "occupation"] == "technician"


def test_ml1m_format(tmp_path):
    ds = load_dataset("ml-1m", write_ml1m(tmp_path / "ml-1m"), download=False)
    assert ds.ratings["rating"].tolist() == [5.0, 3.0, 4.0]
    assert ds.items.loc[661, "title"] == "James and the Giant Peach: Part 1 (1996)"
    assert ds.items.loc[661, "genres"] == ["Animation", "Children's", "Musical"]
    assert ds.items.loc[42, "title"] == "Café au lait (Métisse) (1993)"
    assert ds.users.loc[1, "occupation"] == "K-12 student" and ds.users.loc[1, "age"] == 1
    assert ds.users.loc[2, "occupation"] == "self-employed"


@pytest.mark.parametrize("name", ["ml-25m", "ml-20m", "ml-latest-small"])
def test_movielens_csv_format(tmp_path, name):
    ds = load_dataset(name, write_ml_csv(tmp_path / name), download=False)
    assert ds.name == name and ds.users is None
    assert ds.ratings["rating"].tolist() == [4.0, 3.5, 0.5]  # half stars
    assert ds.items.loc[2, "title"] == "American President, The (1995)"
    assert ds.items.loc[3, "title"] == 'Bad "Quoted" Title, A (2001)'
    assert ds.items.loc[3, "genres"] == []  # (no genres listed)
    assert ds.items.loc[4, "title"].startswith("Amélie")


def test_bookcrossing_format(tmp_path):
    ds = load_dataset("bookcrossing", write_bx(tmp_path / "bx"), download=False)
    assert ds.domain == "book" and len(ds.ratings) == 3
    isbn = ds.items["isbn"]
    by_isbn = ds.items.set_index("isbn")
    assert by_isbn.loc["0155061224", "title"] == 'Rites of Passage; a "quoted" story'
    assert np.isnan(by_isbn.loc["0155061224", "year"])  # year 0 means unknown
    assert by_isbn.loc["034545104X", "year"] == 2002 and by_isbn.loc["034545104X", "author"] == "M. J. Rose"
    r = ds.ratings
    assert r["rating"].tolist() == [0.0, 5.0, 8.0] and r["timestamp"].tolist() == [0, 1, 2]
    assert isbn[r["item_id"].iloc[1]] == "0155061224"
    assert np.isnan(ds.users.loc[276725, "age"]) and ds.users.loc[276726, "location"] == "séville, spain"


def test_data_dir_env_var(tmp_path, monkeypatch):
    write_ml1m(tmp_path / "ml-1m")
    monkeypatch.setenv("RELLAX_DATA_DIR", str(tmp_path))
    assert len(load_dataset("ml-1m", download=False).ratings) == 3


# ----------------------------------------------------------------------------------------------- corruption


@pytest.mark.parametrize(
    "udata, line, what",
    [
        ("1\t1\t5\t881250949\n1\t2\t3\n", 2, "missing field"),  # truncated row
        ("1\t1\t5\t881250949\n1\t2\tfive\t881250950\n", 2, "not a valid"),  # non-numeric rating
        ("1\t1\t5\t881250949\n1\t2\t3\t881250950\t7\n", 2, "wrong number of fields"),  # extra field
        ("1\t1\t5\t881250949\n\n1\t2\t3\t881250950\n", 2, "missing field"),  # blank line
        ("1\t1\t5\t881250949\n1\t2\t9\t881250950\n", 2, "outside"),  # rating out of range
        ("1\t1\t5\t881250949\n1\t77\t3\t881250950\n", 2, "not in the item table"),
    ],
)
def test_ml100k_corruption_names_file_and_line(tmp_path, udata, line, what):
    d = write_ml100k(tmp_path / "ml-100k", udata=udata)
    with pytest.raises(DataFormatError) as err:
        load_dataset("ml-100k", d, download=False)
    msg = str(err.value)
    assert "u.data" in msg and f"line {line}" in msg and what in msg


def test_corrupt_item_and_csv_files(tmp_path):
    d = write_ml100k(tmp_path / "a")
    (d / "u.item").write_bytes((d / "u.item").read_bytes()[:-30])  # cut mid-row
    with (
        pytest.raises(DataFormatError, match=r"u\.item: line 3"),
        pytest.warns(DataWarning, match=r"u\.item: line 3: the file does not end with a newline"),
    ):
        load_dataset("ml-100k", d, download=False)
    d = write_ml_csv(tmp_path / "b")
    (d / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,1,4.0,1147880044\n1,2,x,1\n")
    with pytest.raises(DataFormatError, match=r"ratings\.csv: line 3: field 'r' is not a valid float"):
        load_dataset("ml-25m", d, download=False)
    d = write_ml_csv(tmp_path / "c")
    (d / "ratings.csv").write_text("user,movie,rating,timestamp\n1,1,4.0,1\n")
    with pytest.raises(DataFormatError, match=r"line 1: expected header"):
        load_dataset("ml-25m", d, download=False)
    d = write_ml1m(tmp_path / "d")
    (d / "ratings.dat").write_bytes(b"1::1193::5::978300760\n1::661\n")
    with pytest.raises(DataFormatError, match=r"ratings\.dat: line 2: missing field"):
        load_dataset("ml-1m", d, download=False)
    d = write_ml_csv(tmp_path / "e")
    (d / "movies.csv").write_bytes(b"movieId,title,genres\n1,Bad \xff byte,Drama\n")
    with pytest.raises(DataFormatError, match=r"movies\.csv: line 2: not valid utf-8"):
        load_dataset("ml-25m", d, download=False)


@pytest.mark.parametrize("name", ["ml-25m", "ml-20m"])
def test_movielens_csv_ratings_are_read_typed_by_pyarrow(tmp_path, name, monkeypatch):
    """The ratings file goes through pyarrow.csv with explicit int64/float64 columns (no object column, no
    string re-parse) and gives the same values as the string parser; odd rows still fall back and name their
    line."""
    from rellax_fast.data import movielens, parsing

    rng = np.random.default_rng(0)
    n = 5000
    rows = np.stack(
        [rng.integers(1, 300, n), rng.integers(1, 4, n), rng.integers(1, 11, n), rng.permutation(n) + 10**9]
    )
    d = write_ml_csv(tmp_path / "typed")
    text = "userId,movieId,rating,timestamp\n" + "".join(f"{u},{i},{r / 2},{t}\n" for u, i, r, t in rows.T)
    (d / "ratings.csv").write_text(text)
    fallbacks = []
    slow = parsing.parse_table
    for module in (parsing, movielens):  # the ratings fall-back path and the movies.csv reader
        monkeypatch.setattr(
            module, "parse_table", lambda path, *a, **k: fallbacks.append(path.name) or slow(path, *a, **k)
        )
    ds = load_dataset(name, d, download=False)
    assert fallbacks == ["movies.csv"]  # ratings.csv never needed the string parser
    assert ds.ratings["user_id"].dtype == np.int64 and ds.ratings["rating"].dtype == np.float32
    assert ds.ratings["timestamp"].dtype == np.int64
    cols = slow(d / "ratings.csv", text, ",", ["u", "i", "r", "t"], header=True)
    np.testing.assert_array_equal(ds.ratings["user_id"], cols["u"].astype(np.int64))
    np.testing.assert_array_equal(ds.ratings["rating"], cols["r"].astype(np.float32))
    np.testing.assert_array_equal(ds.ratings["timestamp"], cols["t"].astype(np.int64))
    # a blank line, a float user id and an out-of-range int fall back to the string parser, which names the line
    for bad, match in (
        ("1,1,4.0,1\n\n2,2,3.0,2\n", "line 3"),
        ("1,1,4.0,1\n1.5,2,3.0,2\n", "line 3: field 'u'"),
        ("1,1,4.0,1\n2,2,3.0,99999999999999999999\n", "line 3: field 't'"),
    ):
        (d / "ratings.csv").write_text("userId,movieId,rating,timestamp\n" + bad)
        with pytest.raises(DataFormatError, match=match):
            load_dataset(name, d, download=False)


# ---------------------------------------------------------------------------------------------- downloads


def test_offline_error_says_where_to_put_what(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("ml-1m", tmp_path / "nothing", download=False)
    msg = str(err.value)
    assert (
        "ratings.dat" in msg
        and "movies.dat" in msg
        and str(tmp_path / "nothing") in msg
        and "ml-1m.zip" in msg
    )


def _zip_of(folder, prefix):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for f in sorted(folder.iterdir()):
            zf.write(f, f"{prefix}/{f.name}")
    return buf.getvalue()


def test_download_verifies_checksum_and_extracts(tmp_path, monkeypatch):
    payload = _zip_of(write_ml1m(tmp_path / "src"), "ml-1m")
    (tmp_path / "mirror").mkdir()
    (tmp_path / "mirror" / "ml-1m.zip").write_bytes(payload)
    url = (tmp_path / "mirror" / "ml-1m.zip").as_uri()
    good = dl.DatasetSource(
        "ml-1m.zip",
        (url,),
        "ml-1m",
        ("ratings.dat", "movies.dat", "users.dat"),
        archive_md5=hashlib.md5(payload).hexdigest(),
    )
    monkeypatch.setitem(dl.SOURCES, "ml-1m", good)
    ds = load_dataset("ml-1m", tmp_path / "dest", download=True)
    assert len(ds.ratings) == 3
    # nothing half-written or temporary is left: exactly the archive and the extracted files
    assert sorted(p.name for p in (tmp_path / "dest").iterdir()) == [
        "ml-1m.zip",
        "movies.dat",
        "ratings.dat",
        "users.dat",
    ]

    bad = dl.DatasetSource("ml-1m.zip", (url,), "ml-1m", good.files, archive_md5="0" * 32)
    monkeypatch.setitem(dl.SOURCES, "ml-1m", bad)
    with pytest.raises(dl.ChecksumError, match="does not match .* moved it aside to .*ml-1m.zip.bad"):
        load_dataset("ml-1m", tmp_path / "dest2", download=True)
    assert not (tmp_path / "dest2" / "ml-1m.zip").exists()  # the next run downloads afresh
    assert (tmp_path / "dest2" / "ml-1m.zip.bad").read_bytes() == payload  # kept, not deleted

    dead = dl.DatasetSource("ml-1m.zip", ((tmp_path / "gone.zip").as_uri(),), "ml-1m", good.files)
    monkeypatch.setitem(dl.SOURCES, "ml-1m", dead)
    with pytest.raises(DatasetNotFoundError, match="download failed"):
        load_dataset("ml-1m", tmp_path / "dest3", download=True)


def test_users_own_bad_archive_is_moved_aside_not_deleted(tmp_path, monkeypatch):
    """#13 item 11: a user's own ml-100k.zip that fails the checksum is renamed to .bad (numbered when taken)."""
    d = tmp_path / "ml-100k"
    d.mkdir()
    own = b"PK\x03\x04 my own, slightly different copy"
    (d / "ml-100k.zip").write_bytes(own)
    for k in range(2):
        with pytest.raises(dl.ChecksumError) as err:
            load_dataset("ml-100k", d, download=True)
        bad = d / ("ml-100k.zip.bad" + ("" if k == 0 else ".1"))
        assert f"moved it aside to {bad}" in str(err.value) and str(d / "ml-100k.zip") in str(err.value)
        assert bad.read_bytes() == own
        (d / "ml-100k.zip").write_bytes(own)  # the user puts it back
    # an archive with the published checksum that is not a zip: moved aside too, with a clear error
    monkeypatch.setitem(
        dl.SOURCES,
        "ml-100k",
        dl.DatasetSource(
            "ml-100k.zip",
            ("file:///nonexistent",),
            "ml-100k",
            ("u.data",),
            archive_md5=hashlib.md5(own).hexdigest(),
        ),
    )
    with pytest.raises(dl.ChecksumError, match=r"not a valid zip archive.*moved the archive aside"):
        load_dataset("ml-100k", d, download=True)
    assert (d / "ml-100k.zip.bad.2").read_bytes() == own


def test_download_per_file_checksums(tmp_path, monkeypatch):
    src = write_bx(tmp_path / "src")
    payload = _zip_of(src, "dump")
    (tmp_path / "BX.zip").write_bytes(payload)
    md5 = {f.name: hashlib.md5(f.read_bytes()).hexdigest() for f in src.iterdir()}
    files = ("BX-Book-Ratings.csv", "BX-Books.csv", "BX-Users.csv")
    ok = dl.DatasetSource("BX.zip", ((tmp_path / "BX.zip").as_uri(),), "", files, file_md5=md5)
    monkeypatch.setitem(dl.SOURCES, "bookcrossing", ok)
    assert len(load_dataset("bookcrossing", tmp_path / "d1").ratings) == 3
    wrong = dl.DatasetSource("BX.zip", ok.urls, "", files, file_md5=dict(md5, **{"BX-Books.csv": "1" * 32}))
    monkeypatch.setitem(dl.SOURCES, "bookcrossing", wrong)
    with pytest.raises(dl.ChecksumError, match="BX-Books.csv has MD5"):
        load_dataset("bookcrossing", tmp_path / "d2")
    assert not (tmp_path / "d2" / "BX-Books.csv").exists()


def test_pinned_sources_are_complete():
    for name, src in dl.SOURCES.items():
        assert src.urls and src.files, name
        assert src.archive_md5 or src.md5_sidecar or src.file_md5, f"{name} has no checksum"


def test_data_warnings_to_stderr_prints_each_data_warning_once_per_event(capsys):
    import warnings

    from rellax_fast.data.parsing import data_warnings_to_stderr

    with pytest.warns(RuntimeWarning, match="not a data warning"):  # other warnings are shown as usual
        with data_warnings_to_stderr():
            for _ in range(2):  # repeats are not deduplicated: each fixed line is its own event
                warnings.warn("u.data: line 7: repeated rating", DataWarning, stacklevel=2)
            warnings.warn("not a data warning", RuntimeWarning, stacklevel=2)
    err = capsys.readouterr().err
    assert err.splitlines() == ["warning: u.data: line 7: repeated rating"] * 2
    with pytest.raises(ValueError, match="boom"):  # a failed load prints its error, not half its warnings
        with data_warnings_to_stderr():
            warnings.warn("u.item: fixed", DataWarning, stacklevel=2)
            raise ValueError("boom")
    assert capsys.readouterr().err == ""
