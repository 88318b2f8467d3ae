"""#28: retrieval pays its fixed costs once per dataset object, not once per call.

- ``subr.retrieval.sequence_rows`` builds the item-row map and the op's index tensors once per ``sequences``;
- ``ops.semantic_topk`` checks every entry of ``seq_items`` / ``seq_offsets`` once per tensor (identity and
  version), like the finiteness of ``item_emb``;
- the CPU kernel gets only what a call reads (``ops.topk.compact_call``: the samples' users cut after their
  last target, the item rows they name), with bit-identical results.
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rellax_fast import ops
from rellax_fast.ops import topk as topk_mod
from rellax_fast.ops._backend import why_unavailable
from rellax_fast.subr import retrieval

needs_cpp = pytest.mark.skipif(
    why_unavailable("cpp", "cpu", "semantic_topk") is not None,
    reason="rellax_fast._C not built (pure-Python install)",
)


def _data(n_users=300, n_items=500, d=24, seed=0):
    """Ragged histories (ids = 1000 + row), an embedding table with exact ties (duplicated rows)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 120, n_users)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    rows = rng.integers(0, n_items, offsets[-1]).astype(np.int64)
    emb = rng.normal(size=(n_items, d)).astype(np.float32)
    emb[1::7] = emb[0]  # ties: many items with the same vector
    sequences = SimpleNamespace(items=rows + 1000, offsets=offsets)
    return sequences, np.arange(1000, 1000 + n_items), torch.from_numpy(emb), lengths


def _few_targets(lengths, n, seed=1):
    rng = np.random.default_rng(seed)
    users = rng.choice(len(lengths), n, replace=False)
    return SimpleNamespace(user_index=users, pos=rng.integers(0, lengths[users]))


@pytest.fixture(autouse=True)
def _fresh_caches():
    retrieval._SEQUENCE_ROWS.clear()
    topk_mod._TABLES.clear()
    yield
    retrieval._SEQUENCE_ROWS.clear()
    topk_mod._TABLES.clear()


@needs_cpp
@pytest.mark.parametrize("metric", ["cosine", "dot"])
def test_compacted_cpu_call_is_bit_identical(metric):
    sequences, _, emb, lengths = _data()
    rows = torch.from_numpy(sequences.items - 1000)
    off = torch.from_numpy(sequences.offsets)
    split = _few_targets(lengths, 12)
    users, pos = torch.from_numpy(split.user_index), torch.from_numpy(split.pos)
    compact = topk_mod.compact_call(emb, rows, off, users, pos)
    assert compact is not None
    assert (
        compact[1].shape[0] <= int((pos + 1).sum()) and compact[0].shape[0] < emb.shape[0]
    )  # entries and rows cut
    for k in (1, 5, 200):
        want = topk_mod._call_ext(emb, rows, off, users, pos, k, metric == "cosine")
        got = ops.semantic_topk(emb, rows, off, users, pos, k, metric=metric, backend="cpp")
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    # a call that reads most of the data is passed on whole
    everyone = torch.arange(len(lengths))
    assert topk_mod.compact_call(emb, rows, off, everyone, torch.from_numpy(lengths - 1)) is None


@needs_cpp
def test_second_call_does_not_redo_the_fixed_work(monkeypatch):
    sequences, ids, emb, lengths = _data()
    built, marked = [], []
    real_item_rows, real_mark = retrieval.item_rows, topk_mod._TABLES.mark
    monkeypatch.setattr(retrieval, "item_rows", lambda *a: built.append(1) or real_item_rows(*a))
    monkeypatch.setattr(topk_mod._TABLES, "mark", lambda t, fact: marked.append(fact) or real_mark(t, fact))
    split = _few_targets(lengths, 20)
    first = retrieval.retrieve(emb, sequences, split, 5, item_ids=ids, backend="cpp", show_progress=False)
    assert len(built) == 1 and sorted(marked) == [
        "finite",
        "items in [0, 500)",
        f"offsets end <= {lengths.sum()}",
    ]
    built.clear(), marked.clear()
    other = _few_targets(lengths, 20, seed=2)
    second = retrieval.retrieve(emb, sequences, split, 5, item_ids=ids, backend="cpp", show_progress=False)
    retrieval.retrieve(emb, sequences, other, 5, item_ids=ids, backend="cpp", show_progress=False)
    assert built == [] and marked == []  # no row map rebuilt, no check over every entry repeated
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    # identical to a cold call (caches cleared) and to the float64 oracle up to ties
    retrieval._SEQUENCE_ROWS.clear()
    topk_mod._TABLES.clear()
    cold = retrieval.retrieve(emb, sequences, split, 5, item_ids=ids, backend="cpp", show_progress=False)
    assert len(built) == 1 and torch.equal(cold[0], first[0]) and torch.equal(cold[1], first[1])
    ref = retrieval.retrieve(emb, sequences, split, 5, item_ids=ids, backend="reference", show_progress=False)
    torch.testing.assert_close(first[1], ref[1], rtol=0, atol=2e-6)


def test_sequence_rows_rebuilds_for_other_objects_and_after_writes():
    sequences, ids, _, _ = _data(n_users=20)
    rows, seq, off = retrieval.sequence_rows(sequences, ids, "cpu")
    again = retrieval.sequence_rows(sequences, ids, "cpu")
    assert again[1] is seq and again[2] is off  # the same tensors: the op's per-tensor checks stay cached
    np.testing.assert_array_equal(rows, sequences.items - 1000)
    other_ids = ids[::-1].copy()  # another item_ids object: another map
    np.testing.assert_array_equal(retrieval.sequence_rows(sequences, other_ids)[0], len(ids) - 1 - rows)
    items = torch.from_numpy(sequences.items.copy())
    tensor_seq = SimpleNamespace(items=items, offsets=sequences.offsets)
    first = retrieval.sequence_rows(tensor_seq, ids)[0].copy()
    items[0] = 1000 + (int(items[0]) - 999) % len(ids)  # in place: the version counter moves
    assert retrieval.sequence_rows(tensor_seq, ids)[0][0] != first[0]


def test_the_op_rechecks_a_cached_tensor_after_an_in_place_write():
    sequences, _, emb, lengths = _data(n_users=20)
    rows = torch.from_numpy(sequences.items - 1000)
    off = torch.from_numpy(sequences.offsets)
    users, pos = torch.tensor([3]), torch.tensor([int(lengths[3]) - 1])
    ops.semantic_topk(emb, rows, off, users, pos, 3, backend="reference")
    assert topk_mod._TABLES.known(rows, "items in [0, 500)")
    rows[5] = 10_000
    with pytest.raises(ValueError, match=r"seq_items\[5\] = 10000"):
        ops.semantic_topk(emb, rows, off, users, pos, 3, backend="reference")
    rows[5] = 0
    off[4] = off[3] - 1
    with pytest.raises(ValueError, match="non-decreasing"):
        ops.semantic_topk(emb, rows, off, users, pos, 3, backend="reference")
