"""semantic_topk(prefilter="bf16"): bf16 scores, a certified error bound, float64 rescoring of the survivors.
The result must be the float64 oracle's (the reference backend), positions and float32 scores alike, on
fresh random inputs with odd sizes, near-ties below bf16's resolution, exact ties, short histories, small
batches, and a table changed in place; the bound must hold and be tight enough to filter."""

import pytest
import torch

from rellax_fast.ops import semantic_topk
from rellax_fast.ops import topk_prefilter as tp


def _has_cpp() -> bool:
    from rellax_fast.ops._backend import cpp_unavailable

    return cpp_unavailable("cpu") is None


# every exactness test runs both finishing steps: the C++ op (make test builds _C) and the torch ops
FINISHERS = [
    pytest.param("cpp", marks=pytest.mark.skipif(not _has_cpp(), reason="rellax_fast._C not built")),
    "torch",
]


@pytest.fixture(params=FINISHERS)
def finish(request, monkeypatch):
    fn = tp._finish_cpp if request.param == "cpp" else tp._finish_torch
    monkeypatch.setattr(tp, "finisher", lambda device: fn)
    return request.param


def histories(n_users, max_len, n_items, gen, min_len=1):
    lens = torch.randint(min_len, max_len + 1, (n_users,), generator=gen)
    off = torch.zeros(n_users + 1, dtype=torch.int64)
    off[1:] = lens.cumsum(0)
    items = torch.randint(0, n_items, (int(off[-1]),), generator=gen)
    users = torch.repeat_interleave(torch.arange(n_users), lens)
    pos = torch.cat([torch.arange(int(n)) for n in lens])
    return items, off, users, pos


def both(emb, items, off, su, sp, k, metric="cosine"):
    ref = semantic_topk(emb, items, off, su, sp, k, metric=metric, backend="reference")
    got = semantic_topk(emb, items, off, su, sp, k, metric=metric, prefilter="bf16")
    return ref, got


def assert_same(ref, got):
    assert torch.equal(got[0], ref[0]), (got[0] != ref[0]).nonzero()[:5]
    assert torch.equal(got[1], ref[1]), (got[1] != ref[1]).nonzero()[:5]


@pytest.mark.parametrize("metric", ["cosine", "dot"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 7, 40])
def test_equals_the_float64_oracle_on_random_inputs(metric, dtype, k, finish):
    gen = torch.Generator().manual_seed(k * 7 + len(metric))
    emb = (torch.randn(101, 37, generator=gen) * torch.rand(101, 1, generator=gen) * 3).to(dtype)
    items, off, users, pos = histories(13, 90, 101, gen)
    pick = torch.randperm(users.shape[0], generator=gen)[:300]  # unsorted, repeated users, position-0 targets
    ref, got = both(emb, items, off, users[pick], pos[pick], k, metric)
    assert (ref[0] == -1).any() and (ref[0] >= 0).any()  # some rows padded (fewer than k candidates)
    assert_same(ref, got)


def test_near_ties_below_bf16_resolution_and_exact_ties_follow_the_oracle(finish):
    gen = torch.Generator().manual_seed(3)
    target, base = torch.randn(2, 1, 64, generator=gen, dtype=torch.float64)
    # rows equal in bf16 whose exact cosines with the target differ by ~1e-8 (first order in the
    # perturbation, far above float64 rounding), plus exact duplicates
    near = base + 1e-8 * torch.randn(30, 64, generator=gen, dtype=torch.float64)
    emb = torch.cat([target, near, near[:5], torch.randn(20, 64, generator=gen, dtype=torch.float64)])
    assert torch.equal(near.to(torch.bfloat16)[0], near.to(torch.bfloat16)[1])  # bf16 cannot tell them apart
    seq = torch.cat([torch.arange(1, emb.shape[0]), torch.tensor([0])])  # target (row 0) last
    items, off = seq, torch.tensor([0, seq.shape[0]])
    su, sp = torch.tensor([0]), torch.tensor([seq.shape[0] - 1])
    for k in (3, 10, 33):
        ref, got = both(emb, items, off, su, sp, k)
        assert_same(ref, got)
    # an exact duplicate ties with its original: the later position comes first
    dup = semantic_topk(emb, items, off, su, sp, 60, prefilter="bf16")
    order = dup[0][0].tolist()
    for c in range(5):
        first, second = c, 30 + c  # seq positions of near[c] and its duplicate
        assert order.index(second) < order.index(first)


def test_small_batches_and_groups_cut_the_work_but_not_the_result(monkeypatch, finish):
    gen = torch.Generator().manual_seed(5)
    emb = torch.randn(77, 19, generator=gen)
    items, off, users, pos = histories(9, 60, 77, gen)
    ref = semantic_topk(emb, items, off, users, pos, 5, backend="reference")
    monkeypatch.setattr(tp, "SCORE_BUDGET", 50)
    monkeypatch.setattr(tp, "GATHER_BUDGET", 19 * 70)
    monkeypatch.setattr(tp, "TARGETS_PER_GROUP", 3)
    assert_same(ref, semantic_topk(emb, items, off, users, pos, 5, prefilter="bf16"))


def test_the_bound_holds_for_every_pair_and_is_tight_enough_to_filter():
    gen = torch.Generator().manual_seed(11)
    for metric, scale in (("cosine", 1.0), ("dot", 4.0)):
        emb = torch.randn(300, 384, generator=gen) * scale
        emb64, lo, norms = tp.prefilter_tables(emb, metric == "cosine")
        targ = torch.arange(0, 40)
        lo_scores = (lo[targ] @ lo.T).to(torch.float32).to(torch.float64)  # the bf16 GEMM, as the op runs it
        exact = emb64[targ] @ emb64.T
        bound = tp.row_bounds(norms, targ, 384).to(torch.float64)[:, None]
        assert ((exact - lo_scores).abs() <= bound).all()
        worst = ((exact - lo_scores).abs() / bound).max()
        assert worst > 0.05, f"the bound is {1 / worst:.0f}x the worst error: looser than it needs to be"
        if metric == "cosine":
            assert bound.max() < 0.01  # for unit rows: about 2^-8 from the inputs plus 2^-8 from the output


def test_only_a_few_candidates_per_target_are_rescored(monkeypatch):
    # the torch finishing step, whose survivors can be counted; the C++ one applies the same threshold
    monkeypatch.setattr(tp, "finisher", lambda device: tp._finish_torch)
    gen = torch.Generator().manual_seed(2)
    emb = torch.randn(2000, 128, generator=gen)
    items, off, users, pos = histories(4, 1500, 2000, gen, min_len=1000)
    keep = pos >= 500
    seen = []
    survivors = tp._survivors
    monkeypatch.setattr(tp, "_survivors", lambda *a: seen.append(survivors(*a)) or seen[-1])
    ref, got = both(emb, items, off, users[keep], pos[keep], 10)
    assert_same(ref, got)
    rescored = sum(s[0].shape[0] for s in seen) / int(keep.sum())
    assert 10 <= rescored < 100, rescored  # of at least 500 candidates per target


def test_a_table_changed_in_place_is_prepared_again(finish):
    gen = torch.Generator().manual_seed(4)
    emb = torch.randn(50, 16, generator=gen)
    items, off, users, pos = histories(5, 40, 50, gen)
    semantic_topk(emb, items, off, users, pos, 4, prefilter="bf16")
    emb.mul_(torch.rand(50, 1, generator=gen) + 0.1).add_(torch.randn(50, 16, generator=gen))
    ref, got = both(emb, items, off, users, pos, 4, "dot")
    assert_same(ref, got)


def test_bad_prefilter_arguments_are_named():
    emb = torch.randn(4, 3)
    args = (emb, torch.tensor([0, 1, 2]), torch.tensor([0, 3]), torch.tensor([0]), torch.tensor([2]), 1)
    with pytest.raises(ValueError, match=r"prefilter must be None or one of \('bf16',\); got 'int8'"):
        semantic_topk(*args, prefilter="int8")
    with pytest.raises(
        ValueError, match=r"prefilter='bf16' runs on torch GEMMs and takes no backend; got backend='cpp'"
    ):
        semantic_topk(*args, prefilter="bf16", backend="cpp")
    with pytest.raises(ValueError, match="k must be >= 0"):
        semantic_topk(*args[:-1], -1, prefilter="bf16")
    with pytest.raises(ValueError, match=r"sample_pos\[0\] = 3 but user 0 has 3 items"):
        semantic_topk(*args[:-2], torch.tensor([3]), 1, prefilter="bf16")
    empty = semantic_topk(*args[:-1], 0, prefilter="bf16")
    assert empty[0].shape == (1, 0) and empty[1].shape == (1, 0)


@pytest.mark.skipif(not _has_cpp(), reason="rellax_fast._C not built")
def test_the_cpp_finishing_op_refuses_bad_arguments_by_name():
    from rellax_fast.ops._registry import ext_op

    op = ext_op("topk_rescore")
    scores = torch.zeros(2, 3, 5, dtype=torch.bfloat16)
    hist, targ = torch.zeros(2, 5, dtype=torch.int64), torch.zeros(2, 3, dtype=torch.int64)
    tpos, bound, emb = torch.full((2, 3), 5), torch.zeros(2, 3), torch.zeros(4, 8, dtype=torch.float64)
    pos, score = op(scores, hist, targ, tpos, bound, emb, 2)
    assert pos.shape == (2, 3, 2) and torch.equal(pos[..., 0], torch.full((2, 3), 4))  # ties: the last slot
    torch.library.opcheck(op, (scores, hist, targ, tpos, bound, emb, 2))  # schema and fake agree
    with pytest.raises(RuntimeError, match=r"scores must be a \(B, n, W\) bfloat16 tensor; got Float"):
        op(scores.float(), hist, targ, tpos, bound, emb, 2)
    with pytest.raises(RuntimeError, match=r"hist\[3\] = 9 is out of \[0, 4\)"):
        op(
            scores,
            hist.flatten().index_put((torch.tensor([3]),), torch.tensor(9)).view(2, 5),
            targ,
            tpos,
            bound,
            emb,
            2,
        )
    with pytest.raises(RuntimeError, match=r"tpos\[0\] = 6 is out of \[0, 5\]"):
        op(
            scores,
            hist,
            targ,
            tpos.flatten().index_put((torch.tensor([0]),), torch.tensor(6)).view(2, 3),
            bound,
            emb,
            2,
        )
    with pytest.raises(RuntimeError, match="emb64 must be a \\(N, d\\) float64 tensor"):
        op(scores, hist, targ, tpos, bound, emb.float(), 2)
    with pytest.raises(RuntimeError, match="k must be >= 1"):
        op(scores, hist, targ, tpos, bound, emb, 0)


@pytest.mark.parametrize("normalize", [True, False])
def test_the_float64_table_is_the_oracles_bit_for_bit_across_row_blocks(normalize):
    from rellax_fast.ops.topk import normalized_rows

    emb = torch.randn(20_011, 37) * torch.rand(20_011, 1) * 5  # more rows than one block of 8,192
    emb64, lo, norms = tp.prefilter_tables(emb, normalize)
    want = normalized_rows(emb, torch.float64) if normalize else emb.to(torch.float64)
    assert torch.equal(emb64, want)
    assert torch.equal(lo, want.to(torch.bfloat16))
    torch.testing.assert_close(norms[:, 2], (want - lo.to(torch.float64)).norm(dim=1), rtol=0, atol=0)
