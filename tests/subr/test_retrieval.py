"""Retrieval on ops.semantic_topk, the faiss global-ranking mode and the prompt ordering modes."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rellax_fast.subr.retrieval import (
    order_retrieved,
    positions_to_items,
    recent_positions,
    retrieve,
    retrieve_global,
    shown_positions,
)


def make_data(lengths, n_items=60, d=12, seed=0, id_offset=0, every_position=True):
    """Random ragged histories (item ids = id_offset + row, repeats allowed) and one sample per position."""
    rng = np.random.default_rng(seed)
    rows = (
        np.concatenate([rng.integers(0, n_items, n) for n in lengths]).astype(np.int64)
        if lengths
        else np.zeros(0, np.int64)
    )
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    seq = SimpleNamespace(items=rows + id_offset, offsets=offsets)
    users = [u for u, n in enumerate(lengths) for _ in range(n)]
    pos = [p for n in lengths for p in range(n)]
    split = SimpleNamespace(user_index=np.array(users, np.int64), pos=np.array(pos, np.int64))
    emb = rng.normal(size=(n_items, d)).astype(np.float32)
    return emb, seq, split, rows


def brute_force(emb, rows, offsets, split, k, metric="cosine"):
    """float64 oracle: score every earlier position, sort by (score desc, position desc)."""
    e = emb.astype(np.float64)
    if metric == "cosine":
        e = e / np.linalg.norm(e, axis=1, keepdims=True)
    S = len(split.pos)
    P = np.full((S, k), -1, np.int64)
    V = np.full((S, k), -np.inf)
    for s, (u, p) in enumerate(zip(split.user_index, split.pos)):
        hist = rows[offsets[u] : offsets[u] + p]
        sc = e[hist] @ e[rows[offsets[u] + p]]
        order = sorted(range(p), key=lambda j: (-sc[j], -j))[:k]
        P[s, : len(order)] = order
        V[s, : len(order)] = sc[order]
    return P, V


def assert_same_topk(pos, score, exp_pos, exp_score, atol=1e-5):
    """Equal gathered scores; equal positions except where scores tie (within atol)."""
    pos, score = np.asarray(pos), np.asarray(score, np.float64)
    np.testing.assert_array_equal(pos == -1, exp_pos == -1)
    np.testing.assert_allclose(score, exp_score, atol=atol)
    differ = pos != exp_pos
    if differ.any():
        rows = np.nonzero(differ.any(axis=1))[0]
        for r in rows:
            # the two results may order tied scores differently, but must pick the same multiset of scores
            assert np.allclose(np.sort(score[r]), np.sort(exp_score[r]), atol=atol)


LENGTHS = [0, 1, 2, 7, 30, 90]


@pytest.mark.parametrize("metric", ["cosine", "dot"])
@pytest.mark.parametrize("k", [0, 1, 5, 64])
def test_retrieve_matches_float64_oracle(metric, k):
    emb, seq, split, rows = make_data(LENGTHS)
    pos, score = retrieve(emb, seq, split, k, metric=metric, chunk_size=17, show_progress=False)
    assert pos.dtype == torch.int64 and score.dtype == torch.float32 and pos.shape == (len(split.pos), k)
    exp_pos, exp_score = brute_force(emb, rows, seq.offsets, split, k, metric)
    assert_same_topk(pos.numpy(), score.numpy(), exp_pos, exp_score, atol=1e-4 if metric == "dot" else 1e-5)


def test_retrieve_maps_item_ids_to_rows():
    emb, seq, split, rows = make_data(LENGTHS, id_offset=1000)
    item_ids = list(range(1000, 1000 + len(emb)))
    perm = np.random.default_rng(3).permutation(len(emb))  # the table in another order than the ids
    pos, score = retrieve(emb[perm], seq, split, 5, item_ids=[item_ids[i] for i in perm], show_progress=False)
    exp_pos, exp_score = brute_force(emb, rows, seq.offsets, split, 5)
    assert_same_topk(pos.numpy(), score.numpy(), exp_pos, exp_score)
    with pytest.raises(ValueError, match="no embedding row"):
        retrieve(emb, seq, split, 5, item_ids=list(range(len(emb))), show_progress=False)


@pytest.mark.parametrize("top_n", [None, 1, 9])
@pytest.mark.parametrize("k", [0, 1, 5, 64])
def test_global_ranking_matches_per_sample_op_under_cosine(k, top_n):
    emb, seq, split, rows = make_data(LENGTHS, seed=5)
    op_pos, op_score = retrieve(emb, seq, split, k, show_progress=False)
    gl_pos, gl_score = retrieve_global(
        emb, seq, split, k, top_n=top_n, element_budget=64, pair_budget=50, show_progress=False
    )
    assert gl_pos.shape == op_pos.shape and gl_pos.dtype == torch.int64 and gl_score.dtype == torch.float32
    assert_same_topk(gl_pos.numpy(), gl_score.numpy(), op_pos.numpy(), op_score.numpy())
    # the top-K sets are the same (the same item repeated in a history ties exactly: both keep the later one)
    for a, b in zip(gl_pos.numpy(), op_pos.numpy()):
        assert set(a.tolist()) == set(b.tolist())


def test_global_ranking_dot_metric_and_duplicates_prefer_later_position():
    emb = np.eye(4, dtype=np.float32) * np.array([[1.0], [2.0], [3.0], [4.0]], np.float32)
    emb[3] = emb[0] * 0.5 + emb[1] * 0.5
    # user 0: items 0, 1, 0, 2, then target 3 at position 4
    seq = SimpleNamespace(items=np.array([0, 1, 0, 2, 3]), offsets=np.array([0, 5]))
    split = SimpleNamespace(user_index=np.array([0]), pos=np.array([4]))
    pos, score = retrieve_global(emb, seq, split, 3, metric="dot", show_progress=False)
    # dot with target [0.5, 1, 0, 0]: item 1 -> 2.0, item 0 -> 0.5 (positions 2 and 0), item 2 -> 0
    assert pos.tolist() == [[1, 2, 0]]
    np.testing.assert_allclose(score.numpy(), [[2.0, 0.5, 0.5]])
    op_pos, _ = retrieve(emb, seq, split, 3, metric="dot", show_progress=False)
    assert op_pos.tolist() == pos.tolist()


def test_global_ranking_rejects_bad_input():
    emb, seq, split, _ = make_data([3, 4])
    with pytest.raises(ValueError, match="metric"):
        retrieve_global(emb, seq, split, 2, metric="l2", show_progress=False)
    bad = emb.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        retrieve_global(bad, seq, split, 2, show_progress=False)
    with pytest.raises(ValueError, match="split.pos"):
        retrieve_global(
            emb, seq, SimpleNamespace(user_index=np.array([0]), pos=np.array([3])), 2, show_progress=False
        )
    with pytest.raises(ValueError, match="k must be"):
        retrieve(emb, seq, split, -1, show_progress=False)


# ------------------------------------------------------------------------------------ ordering modes

# one user, 6 behaviours; samples at positions 0, 2 and 5
SEQ = SimpleNamespace(items=np.array([50, 51, 52, 53, 54, 55]), offsets=np.array([0, 6]))
SPLIT = SimpleNamespace(user_index=np.array([0, 0, 0]), pos=np.array([0, 2, 5]))
# retrieved top-3 by score (desc): sample 1 has 2 candidates, sample 2 has 5 candidates
RETRIEVED = np.array([[-1, -1, -1], [0, 1, -1], [1, 4, 0]])
RETRIEVED_SCORE = np.array([[-np.inf] * 3, [0.9, 0.2, -np.inf], [0.8, 0.5, 0.1]], np.float32)


def test_recent_is_the_last_k_in_time_order():
    assert shown_positions(SEQ, SPLIT, 3, "recent").tolist() == [[-1, -1, -1], [0, 1, -1], [2, 3, 4]]
    assert recent_positions(np.array([4]), 0).shape == (1, 0)


def test_sequential_is_the_topk_set_in_time_order():
    out = shown_positions(SEQ, SPLIT, 3, "sequential", RETRIEVED)
    assert out.dtype == np.int64
    assert out.tolist() == [[-1, -1, -1], [0, 1, -1], [0, 1, 4]]
    assert shown_positions(SEQ, SPLIT, 2, "sequential", RETRIEVED).tolist() == [[-1, -1], [0, 1], [1, 4]]


def test_high_and_low_are_similarity_orders():
    assert shown_positions(SEQ, SPLIT, 3, "high", RETRIEVED).tolist() == [[-1, -1, -1], [0, 1, -1], [1, 4, 0]]
    assert shown_positions(SEQ, SPLIT, 3, "low", RETRIEVED).tolist() == [[-1, -1, -1], [1, 0, -1], [0, 4, 1]]


def test_scores_resort_rows_from_any_source():
    shuffled = np.array([[-1, -1, -1], [1, 0, -1], [0, 1, 4]])
    shuffled_score = np.array([[-np.inf] * 3, [0.2, 0.9, -np.inf], [0.1, 0.8, 0.5]], np.float32)
    assert order_retrieved(shuffled, "high", retrieved_score=shuffled_score).tolist() == RETRIEVED.tolist()
    # a tie goes to the larger position
    tied = order_retrieved(np.array([[2, 7, 5]]), "high", retrieved_score=np.array([[0.5, 0.5, 0.9]]))
    assert tied.tolist() == [[5, 7, 2]]


def test_positions_to_items():
    shown = shown_positions(SEQ, SPLIT, 3, "sequential", RETRIEVED)
    assert positions_to_items(SEQ, SPLIT, shown).tolist() == [[-1, -1, -1], [50, 51, -1], [50, 51, 54]]


def test_ordering_errors_are_clear():
    with pytest.raises(ValueError, match="mode must be one of"):
        shown_positions(SEQ, SPLIT, 3, "random", RETRIEVED)
    with pytest.raises(ValueError, match="needs retrieved_pos"):
        shown_positions(SEQ, SPLIT, 3, "sequential")
    with pytest.raises(ValueError, match="k=4 is more than the 3"):
        shown_positions(SEQ, SPLIT, 4, "high", RETRIEVED)
    with pytest.raises(ValueError, match="3 samples"):
        shown_positions(SEQ, SPLIT, 3, "low", RETRIEVED[:2])
    with pytest.raises(ValueError, match="padding at the end"):
        order_retrieved(np.array([[-1, 3]]), "sequential")


def test_modes_on_real_retrieval_are_permutations_of_one_set():
    emb, seq, split, _ = make_data(LENGTHS, seed=9)
    pos, score = retrieve(emb, seq, split, 5, show_progress=False)
    seq_mode = shown_positions(seq, split, 5, "sequential", pos)
    high = shown_positions(seq, split, 5, "high", pos)
    low = shown_positions(seq, split, 5, "low", pos)
    for a, b, c, p in zip(seq_mode, high, low, split.pos):
        n = min(int(p), 5)
        assert sorted(a[:n]) == sorted(b[:n]) == sorted(c[:n]) and (a[n:] == -1).all()
        assert (np.diff(a[:n]) > 0).all()  # time order
        assert c[:n].tolist() == b[:n][::-1].tolist()


def test_global_ranking_gpu_request_without_faiss_gpu_is_a_clear_error():
    import faiss

    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        pytest.skip("faiss-gpu with a GPU is present: the GPU path is covered by the cuda-marked test")
    emb, seq, split, _ = make_data([3, 4])
    with pytest.raises(RuntimeError, match="faiss-gpu"):
        retrieve_global(emb, seq, split, 2, use_gpu=True, show_progress=False)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_global_ranking_on_cuda_tensors_matches_op():
    pytest.importorskip("faiss")  # an optional extra; GPU images may lack it (CI installs it)
    emb, seq, split, _ = make_data(LENGTHS, seed=11)
    emb_cuda = torch.from_numpy(emb).cuda()
    op_pos, op_score = retrieve(emb_cuda, seq, split, 5, show_progress=False)
    gl_pos, gl_score = retrieve_global(emb_cuda, seq, split, 5, show_progress=False)  # GPU index if faiss-gpu
    assert_same_topk(gl_pos.numpy(), gl_score.numpy(), op_pos.numpy(), op_score.numpy())
