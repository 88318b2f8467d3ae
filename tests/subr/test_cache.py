"""Embedding cache: hit, miss, stale key, corrupt files, atomic writes (rellax_fast.subr.cache)."""

import json
import logging

import numpy as np
import pytest

from rellax_fast._io import file_sha256
from rellax_fast.subr import cache as cache_mod
from rellax_fast.subr.cache import cache_paths, cached_item_embeddings, load_entry


class CountingEncoder:
    """A deterministic fake encoder: embeds a text by hashing its characters; counts encode() calls."""

    kind = "sentence-transformers"

    def __init__(self, dim=6, salt=0):
        self.dim, self.salt, self.calls = dim, salt, 0

    def identity(self):
        return {
            "kind": self.kind,
            "name": "counting",
            "path": None,
            "config_hash": f"dim{self.dim}-salt{self.salt}",
        }

    def encode(self, texts, show_progress=None):
        self.calls += 1
        out = np.zeros((len(texts), self.dim), np.float32)
        for i, t in enumerate(texts):
            rng = np.random.default_rng([ord(c) for c in t] + [self.salt])
            out[i] = rng.normal(size=self.dim)
        return out


IDS = [10, 11, 12, 13, 14, 15, 16]
TEXTS = [f"Movie {i}. Genres: Drama" for i in IDS]


def _get(tmp_path, enc, ids=IDS, texts=TEXTS, **kw):
    return cached_item_embeddings(tmp_path, "toy", ids, texts, encoder=enc, show_progress=False, **kw)


def test_miss_then_hit_without_encoding(tmp_path):
    enc = CountingEncoder()
    first = _get(tmp_path, enc)
    assert first.status == "built" and enc.calls == 1
    assert first.embeddings.shape == (7, 6)
    np.testing.assert_allclose(np.linalg.norm(first.embeddings, axis=1), 1, atol=1e-6)
    second = _get(tmp_path, enc)
    assert second.status == "hit" and enc.calls == 1
    np.testing.assert_array_equal(first.embeddings, second.embeddings)
    assert second.item_ids == IDS
    meta = json.loads(first.path.with_suffix(".json").read_text())
    assert meta["shape"] == [7, 6] and meta["dtype"] == "float32" and meta["item_ids"] == IDS
    assert len(meta["sha256"]) == 64 and meta["key"]["dataset"] == "toy"
    emb, ids, _ = load_entry(first.path)
    np.testing.assert_array_equal(emb, first.embeddings)
    assert ids == IDS


def test_hit_never_calls_the_factory_when_identity_is_given(tmp_path):
    enc = CountingEncoder()
    _get(tmp_path, enc)

    def factory():
        raise AssertionError("the model must not be loaded on a cache hit")

    res = cached_item_embeddings(
        tmp_path, "toy", IDS, TEXTS, encoder_factory=factory, identity=enc.identity(), show_progress=False
    )
    assert res.status == "hit"


@pytest.mark.parametrize(
    "change",
    [dict(texts=[t + "!" for t in TEXTS]), dict(ids=IDS[::-1])],
    ids=["texts", "item-set"],
)
def test_stale_key_is_detected_and_rebuilt(tmp_path, caplog, change):
    first = _get(tmp_path, CountingEncoder())
    enc = CountingEncoder()
    with caplog.at_level(logging.WARNING, logger="rellax_fast.subr.cache"):
        res = _get(tmp_path, enc, **change)
    assert res.status == "rebuilt-stale" and enc.calls == 1 and res.path == first.path
    assert "stale" in caplog.text and "rebuilding" in caplog.text
    assert _get(tmp_path, enc, **change).status == "hit"  # the rebuilt entry is valid


@pytest.mark.parametrize(
    "change",
    [dict(pca_dims=3), dict(normalize=False), dict(enc=CountingEncoder(salt=1))],
    ids=["pca", "normalize", "encoder-config"],
)
def test_other_options_get_their_own_entry(tmp_path, change):
    """Options that change the array are in the key and in the file name: both entries stay valid side by side."""
    first = _get(tmp_path, CountingEncoder())
    enc = change.pop("enc", CountingEncoder())
    res = _get(tmp_path, enc, **change)
    assert res.status == "built" and enc.calls == 1 and res.path != first.path
    if "pca_dims" in change:
        assert res.embeddings.shape == (7, 3) and res.key["postprocess"]["sklearn"]
    assert not np.array_equal(res.embeddings, first.embeddings)
    again = CountingEncoder(salt=enc.salt)
    assert _get(tmp_path, again, **change).status == "hit" and _get(tmp_path, again).status == "hit"
    assert again.calls == 0


def _corrupt_truncate(npy, meta):
    data = npy.read_bytes()
    npy.write_bytes(data[: len(data) // 2])


def _corrupt_flip_byte(npy, meta):
    data = bytearray(npy.read_bytes())
    data[-3] ^= 0xFF
    npy.write_bytes(bytes(data))


def _corrupt_meta_json(npy, meta):
    meta.write_text("{not json")


def _corrupt_delete_array(npy, meta):
    npy.unlink()


def _rewrite_consistently(npy, meta, array):
    """Replace the array AND update checksum/size, so only the shape/value checks can catch it."""
    np.save(npy, array)
    m = json.loads(meta.read_text())
    m["sha256"] = file_sha256(npy)
    m["bytes"] = npy.stat().st_size
    meta.write_text(json.dumps(m))


def _corrupt_shape(npy, meta):
    _rewrite_consistently(npy, meta, np.zeros((5, 6), np.float32))


def _corrupt_nan(npy, meta):
    arr = np.load(npy)
    arr[1, 2] = np.nan
    _rewrite_consistently(npy, meta, arr)


@pytest.mark.parametrize(
    "corrupt, reason",
    [
        (_corrupt_truncate, "truncated"),
        (_corrupt_flip_byte, "checksum"),
        (_corrupt_meta_json, "unreadable"),
        (_corrupt_delete_array, "missing"),
        (_corrupt_shape, "metadata says"),
        (_corrupt_nan, "NaN"),
    ],
    ids=["truncated", "bitflip", "bad-json", "no-array", "shape", "nan"],
)
def test_corrupt_cache_is_detected_and_rebuilt(tmp_path, caplog, corrupt, reason):
    first = _get(tmp_path, CountingEncoder())
    npy, meta = cache_paths(tmp_path, "toy", CountingEncoder().identity())
    assert npy.name.startswith("toy__counting__st__")
    assert npy == first.path
    corrupt(npy, meta)
    enc = CountingEncoder()
    with caplog.at_level(logging.WARNING, logger="rellax_fast.subr.cache"):
        res = _get(tmp_path, enc)
    assert res.status == "rebuilt-corrupt" and enc.calls == 1
    assert reason in res.reason and "corrupt" in caplog.text
    np.testing.assert_array_equal(res.embeddings, first.embeddings)
    assert _get(tmp_path, enc).status == "hit"
    with pytest.raises(ValueError, match="corrupt|unreadable"):
        corrupt(npy, meta)
        load_entry(npy)


def test_write_is_atomic_when_interrupted(tmp_path, monkeypatch):
    first = _get(tmp_path, CountingEncoder())
    before = first.path.read_bytes()
    real_save = np.save

    def crashing_save(fh, arr, **kw):
        real_save(fh, arr[: len(arr) // 2], **kw)  # part of the data reaches the temp file, then we die
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(cache_mod.np, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        _get(tmp_path, CountingEncoder(), rebuild=True)  # rebuild -> crash mid-write
    monkeypatch.undo()
    assert first.path.read_bytes() == before  # the old entry is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        first.path.with_suffix(".json").name,
        first.path.name,
    ]
    assert _get(tmp_path, CountingEncoder()).status == "hit"


def test_metadata_vouches_only_for_the_bytes_this_process_wrote(tmp_path, monkeypatch):
    """Another process replaces the array between our rename and our metadata write: the metadata must not
    take that array's checksum, so the entry reads as corrupt (rebuilt), never as a hit on the other array."""
    real_write = cache_mod.atomic_write
    other = np.full((7, 6), 0.5, np.float32)

    def racing_write(path, writer):
        real_write(path, writer)
        if path.suffix == ".npy":  # the other writer wins the array right after our rename
            np.save(path, other, allow_pickle=False)

    monkeypatch.setattr(cache_mod, "atomic_write", racing_write)
    built = _get(tmp_path, CountingEncoder())
    monkeypatch.undo()
    enc = CountingEncoder()
    res = _get(tmp_path, enc)
    assert res.status == "rebuilt-corrupt" and "checksum" in res.reason and enc.calls == 1
    np.testing.assert_array_equal(res.embeddings, built.embeddings)


def test_identity_that_does_not_match_the_built_encoder_is_not_trusted(tmp_path, caplog):
    enc = CountingEncoder(salt=2)
    wrong = CountingEncoder(salt=0).identity()
    with caplog.at_level(logging.WARNING, logger="rellax_fast.subr.cache"):
        res = cached_item_embeddings(
            tmp_path, "toy", IDS, TEXTS, encoder_factory=lambda: enc, identity=wrong, show_progress=False
        )
    assert res.status == "built" and "keying the entry by the encoder's own" in caplog.text
    assert res.key["encoder"]["config_hash"] == enc.identity()["config_hash"]
    # the entry is found under the true identity, not under the wrong one
    assert _get(tmp_path, CountingEncoder(salt=2)).status == "hit"
    assert _get(tmp_path, CountingEncoder(salt=0)).status == "built"


def test_forced_rebuild_and_argument_errors(tmp_path):
    enc = CountingEncoder()
    _get(tmp_path, enc)
    assert _get(tmp_path, enc, rebuild=True).status == "rebuilt-forced" and enc.calls == 2
    with pytest.raises(ValueError, match="same length"):
        _get(tmp_path, enc, texts=TEXTS[:3])
    with pytest.raises(ValueError, match="encoder or encoder_factory"):
        cached_item_embeddings(tmp_path, "toy", IDS, TEXTS)


def test_key_fields_keep_their_bytes():
    # every cache on disk was keyed with these: the normalisation descriptor (now derived from NORM_EPS) and
    # the text hashes (ensure_ascii=False, unlike _io.json_sha256: non-ASCII titles hash other bytes)
    import hashlib

    from rellax_fast._io import json_sha256

    assert cache_mod.POSTPROCESS["normalize"] == "l2, eps 1e-12"
    texts = ["Amélie (2001)", "Léon (1994)"]
    key = cache_mod.cache_key("toy", {"kind": "k", "name": "n"}, [1, 2], texts)
    raw = json.dumps(texts, sort_keys=True, ensure_ascii=False).encode()
    assert key["texts_hash"] == hashlib.sha256(raw).hexdigest() != json_sha256(texts)
    assert key["postprocess"]["normalize"] == "l2, eps 1e-12"
