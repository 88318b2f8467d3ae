"""subr.embed's sharded embedding step in one process (no launcher): ``sharded_cached_embeddings`` is the
embedding cache itself, and ``ShardedEncoder`` (rank 0 of a world of 1) gives its encoder's output through a
shard that it removes. The two-process run is tests/subr/test_distributed_cli.py (slow)."""

import numpy as np

from rellax_fast.subr.cache import cached_item_embeddings
from rellax_fast.subr.embed import ShardedEncoder, sharded_cached_embeddings


class HashEncoder:
    """A deterministic fake encoder (a seeded vector per text) that counts its encode() calls."""

    def __init__(self, dim=5):
        self.dim, self.calls = dim, 0

    def identity(self):
        return {"kind": "sentence-transformers", "name": "hash", "path": None, "config_hash": f"d{self.dim}"}

    def encode(self, texts, show_progress=None):
        self.calls += 1
        return np.stack(
            [np.random.default_rng([ord(c) for c in t]).normal(size=self.dim) for t in texts]
        ).astype(np.float32)


IDS = [3, 1, 4, 15, 9]
TEXTS = [f"Book {i}. Year: 19{i:02d}" for i in IDS]


def test_sharded_cached_embeddings_in_one_process_is_the_cache(tmp_path):
    made = []

    def factory():
        made.append(HashEncoder())
        return made[-1]

    first = sharded_cached_embeddings(tmp_path / "a", "toy", IDS, TEXTS, encoder_factory=factory)
    assert first.status == "built" and len(made) == 1 and made[0].calls == 1
    expected = cached_item_embeddings(tmp_path / "b", "toy", IDS, TEXTS, encoder=HashEncoder())
    np.testing.assert_array_equal(first.embeddings, expected.embeddings)
    assert first.item_ids == IDS
    again = sharded_cached_embeddings(
        tmp_path / "a", "toy", IDS, TEXTS, encoder_factory=factory, identity=HashEncoder().identity()
    )
    assert again.status == "hit" and len(made) == 1  # a hit with a known identity loads no encoder
    np.testing.assert_array_equal(again.embeddings, first.embeddings)
    assert not list((tmp_path / "a").glob(".*shards*"))


def test_sharded_encoder_in_one_process_returns_its_encoders_output_and_no_shard(tmp_path):
    inner = HashEncoder(dim=7)
    folder = tmp_path / ".toy.encode.shards"
    sharded = ShardedEncoder(inner, folder)
    assert sharded.identity() == inner.identity()
    got = sharded.encode(TEXTS)
    assert got.dtype == np.float32 and got.shape == (len(TEXTS), 7) and inner.calls == 1
    np.testing.assert_array_equal(got, HashEncoder(dim=7).encode(TEXTS))
    assert not folder.exists()  # rank 0 removed the shards after merging
