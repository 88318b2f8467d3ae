"""``retrieve(max_history=W)``: only the W most recent behaviours before each target are candidates.

Checked against a float64 brute-force window oracle on fresh random histories of odd lengths (shorter,
equal to and much longer than W), for the reference and C++ backends (and Triton under the interpreter),
with tiny chunk / window budgets so that every chunking path runs; plus the edge cases and bad values.
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rellax_fast.ops import availability
from rellax_fast.subr.retrieval import retrieve, retrieve_sharded

LENGTHS = [0, 1, 3, 6, 7, 8, 19, 53, 131]


def make_data(lengths, n_items=41, d=13, seed=0):
    rng = np.random.default_rng(seed)
    rows = np.concatenate([rng.integers(0, n_items, n) for n in lengths]).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    users = np.array([u for u, n in enumerate(lengths) for _ in range(n)], np.int64)
    pos = np.array([p for n in lengths for p in range(n)], np.int64)
    order = rng.permutation(len(pos))  # samples in random order: the windowed and direct ones interleave
    split = SimpleNamespace(user_index=users[order], pos=pos[order])
    emb = rng.normal(size=(n_items, d)).astype(np.float32)
    return emb, SimpleNamespace(items=rows, offsets=offsets), split, rows


def window_oracle(emb, rows, offsets, split, k, window, metric):
    """float64: score positions max(0, p-W)..p-1 of the user's sequence, sort by (score desc, position desc)."""
    e = emb.astype(np.float64)
    if metric == "cosine":
        e = e / np.linalg.norm(e, axis=1, keepdims=True)
    P = np.full((len(split.pos), k), -1, np.int64)
    V = np.full((len(split.pos), k), -np.inf)
    for s, (u, p) in enumerate(zip(split.user_index, split.pos)):
        lo = 0 if window is None else max(0, p - window)
        cand = np.arange(lo, p)
        sc = (e @ e[rows[offsets[u] + p]])[rows[offsets[u] + cand]]  # one score per item: repeats tie exactly
        best = sorted(range(len(cand)), key=lambda j: (-sc[j], -cand[j]))[:k]
        P[s, : len(best)] = cand[best]
        V[s, : len(best)] = sc[best]
    return P, V


def check(pos, score, exp_pos, exp_score, split, window, atol):
    pos, score = pos.numpy(), score.numpy().astype(np.float64)
    np.testing.assert_array_equal(pos == -1, exp_pos == -1)
    np.testing.assert_allclose(score, exp_score, atol=atol)
    valid = pos >= 0
    lo = np.maximum(0, split.pos - window)[:, None] if window is not None else 0
    assert (pos[valid] < np.broadcast_to(split.pos[:, None], pos.shape)[valid]).all()
    assert (pos >= lo)[valid].all()  # nothing older than the window
    for r in np.nonzero((pos != exp_pos).any(axis=1))[0]:  # tied scores may come in another order
        np.testing.assert_allclose(np.sort(score[r]), np.sort(exp_score[r]), atol=atol)
        assert len(set(pos[r][valid[r]])) == valid[r].sum()


def cpu_backends():
    return [b for b in ("reference", "cpp") if availability("semantic_topk", "cpu")[b] is None]


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("metric", ["cosine", "dot"])
@pytest.mark.parametrize("window,k,band", [(1, 3, 64), (7, 3, 3), (7, 10, 64), (30, 5, 1), (30, 5, 8)])
def test_window_matches_float64_oracle(backend, metric, window, k, band):
    if backend not in cpu_backends():
        pytest.skip(f"{backend}: {availability('semantic_topk', 'cpu')[backend]}")
    emb, seq, split, rows = make_data(LENGTHS, seed=window * 7 + k + band)
    pos, score = retrieve(
        emb,
        seq,
        split,
        k,
        metric=metric,
        backend=backend,
        max_history=window,
        chunk_size=23,
        window_budget=5 * (window + 1),
        window_band=band,
        show_progress=False,
    )
    assert pos.shape == (len(split.pos), k) and pos.dtype == torch.int64 and score.dtype == torch.float32
    exp_pos, exp_score = window_oracle(emb, rows, seq.offsets, split, k, window, metric)
    check(pos, score, exp_pos, exp_score, split, window, 1e-4 if metric == "dot" else 1e-5)
    # a window shorter than the longest history changes some rows (else the test could not fail)
    full_pos, _ = window_oracle(emb, rows, seq.offsets, split, k, None, metric)
    assert (full_pos != exp_pos).any()


def test_window_with_sparse_targets_and_ties():
    """Few targets per user (one per band) and repeated items (exact score ties), k larger than the window."""
    emb, seq, split, rows = make_data([300, 211], n_items=5, seed=9)
    keep = np.random.default_rng(2).random(len(split.pos)) < 0.1
    sparse = SimpleNamespace(user_index=split.user_index[keep], pos=split.pos[keep])
    pos, score = retrieve(emb, seq, sparse, 12, max_history=9, window_band=16, show_progress=False)
    exp_pos, exp_score = window_oracle(emb, rows, seq.offsets, sparse, 12, 9, "cosine")
    check(pos, score, exp_pos, exp_score, sparse, 9, 1e-5)
    # with 5 items most scores tie exactly: the op's tie rule (the larger position first) must survive the
    # band shift and the dropping of out-of-window candidates, so the positions match the oracle's exactly
    np.testing.assert_array_equal(pos.numpy(), exp_pos)


def test_window_longer_than_every_history_is_the_plain_retrieval():
    emb, seq, split, rows = make_data(LENGTHS, seed=3)
    plain = retrieve(emb, seq, split, 4, show_progress=False)
    for window in (int(split.pos.max()), 10_000):
        got = retrieve(emb, seq, split, 4, max_history=window, show_progress=False)
        np.testing.assert_array_equal(got[0].numpy(), plain[0].numpy())
        np.testing.assert_array_equal(got[1].numpy(), plain[1].numpy())


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "7"])
def test_bad_window_is_a_clear_error(bad):
    emb, seq, split, _ = make_data([5, 9])
    with pytest.raises(ValueError, match="max_history must be an integer >= 1"):
        retrieve(emb, seq, split, 3, max_history=bad, show_progress=False)


def test_sharded_in_one_process_is_retrieve(tmp_path):
    emb, seq, split, _ = make_data(LENGTHS, seed=5)
    got = retrieve_sharded(
        emb, seq, split, 3, shard_dir=tmp_path / "shards", max_history=6, show_progress=False
    )
    ref = retrieve(emb, seq, split, 3, max_history=6, show_progress=False)
    np.testing.assert_array_equal(got[0].numpy(), ref[0].numpy())
    assert not (tmp_path / "shards").exists()  # no shard files without a launcher


@pytest.mark.triton
def test_window_triton_interpreted_matches_oracle():
    why = availability("semantic_topk", "cpu").get("triton")
    if why is not None:
        pytest.skip(f"triton: {why}")
    emb, seq, split, rows = make_data([4, 9, 17], n_items=11, d=8, seed=11)
    pos, score = retrieve(emb, seq, split, 3, backend="triton", max_history=5, show_progress=False)
    exp_pos, exp_score = window_oracle(emb, rows, seq.offsets, split, 3, 5, "cosine")
    check(pos, score, exp_pos, exp_score, split, 5, 1e-5)


@pytest.mark.parametrize("extra", [["--max-history", "0"], ["--max-history", "5", "--method", "global"]])
def test_cli_max_history_bad_values_are_errors(tmp_path, capsys, extra):
    from rellax_fast.cli import main

    assert main(["retrieve", "--dataset", "synthetic", "--out", str(tmp_path), *extra]) == 2
    assert "--max-history must be >= 1 and needs --method op" in capsys.readouterr().err
    assert not (tmp_path / "retrieval").exists()


@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("metric", ["cosine", "dot"])
def test_retrieve_with_the_bf16_prefilter_is_the_reference_backend(window, metric):
    emb, seq, split, _ = make_data(LENGTHS, seed=9)
    kw = dict(metric=metric, max_history=window, chunk_size=17, window_budget=40, show_progress=False)
    ref = retrieve(emb, seq, split, 4, backend="reference", **kw)
    got = retrieve(emb, seq, split, 4, prefilter="bf16", **kw)
    np.testing.assert_array_equal(got[0].numpy(), ref[0].numpy())
    np.testing.assert_array_equal(got[1].numpy(), ref[1].numpy())


@pytest.mark.parametrize("extra", [["--backend", "cpp"], ["--method", "global"]])
def test_cli_prefilter_refuses_a_backend_or_the_global_method(tmp_path, capsys, extra):
    from rellax_fast.cli import main

    assert (
        main(["retrieve", "--dataset", "synthetic", "--out", str(tmp_path), "--prefilter", "bf16", *extra])
        == 2
    )
    assert "--prefilter bf16 needs --method op and no --backend" in capsys.readouterr().err
    assert not (tmp_path / "retrieval").exists()
