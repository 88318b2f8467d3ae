"""semantic_topk Triton backend vs the float64 oracle (run under TRITON_INTERPRET=1 on the CPU).

Small ragged data (the interpreter costs ~ms per program): users with 0, 1 and up to 30 items.
"""

from __future__ import annotations

import pytest
import torch
from topk_cases import check_against_reference, exact_tie_embeddings, oracle, ragged_case, view_cases

from rellax_fast.ops import semantic_topk

pytestmark = pytest.mark.triton

LENGTHS = [0, 1, 30, 9, 3, 0]
ATOL = {"cosine": 2e-5, "dot": 2e-3}


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("metric", ["cosine", "dot"])
@pytest.mark.parametrize("k", [0, 1, 5, 64])  # 64 > every history here
def test_triton_matches_reference_d31(metric, k):
    case = ragged_case(LENGTHS, n_items=40, d=31, seed=7, device=_device())
    result = semantic_topk(*case, k, metric=metric, backend="triton")
    check_against_reference(result, case, k, metric, ATOL[metric])


@pytest.mark.parametrize("metric", ["cosine", "dot"])
def test_triton_matches_reference_d384(metric):
    case = ragged_case([0, 1, 20, 6], n_items=30, d=384, seed=8, device=_device())
    result = semantic_topk(*case, 5, metric=metric, backend="triton")
    check_against_reference(result, case, 5, metric, ATOL[metric] * 4)


def test_triton_exact_ties_prefer_larger_position():
    # exact in any summation order: the interpreter's numpy dots round differently per tile and per CPU
    emb = exact_tie_embeddings(19)
    items = torch.tensor([3] * 20 + [1, 2] * 5, dtype=torch.int64)
    offsets = torch.tensor([0, 20, 30])
    users = torch.tensor([0, 0, 1])
    pos = torch.tensor([19, 1, 9])
    dev = _device()
    out_pos, out_score = semantic_topk(
        emb.to(dev), items.to(dev), offsets.to(dev), users.to(dev), pos.to(dev), 6, backend="triton"
    )
    assert out_pos[0].tolist() == [18, 17, 16, 15, 14, 13]
    assert out_pos[1].tolist() == [0, -1, -1, -1, -1, -1]
    assert torch.isneginf(out_score[1, 1:]).all()
    # target 9 is item 2: the item-2 positions (odd) beat the item-1 ones under cosine, newest first
    assert out_pos[2].tolist() == [7, 5, 3, 1, 8, 6]


def test_triton_bfloat16_embeddings():
    case = ragged_case([12, 25], n_items=20, d=32, seed=9, dtype=torch.bfloat16, device=_device())
    result = semantic_topk(*case, 4, metric="cosine", backend="triton")
    # the normalised rows are stored back in bf16 for the tensor-core dot: bf16 rounding (2^-8) of the
    # operands bounds the cosine error
    check_against_reference(result, case, 4, "cosine", 1e-2)


@pytest.mark.parametrize("view", ["strided", "column_major", "expanded"])
@pytest.mark.parametrize("metric", ["cosine", "dot"])
def test_triton_strided_and_expanded_views(metric, view):
    # before the fix, non-contiguous seq_items / sample_pos gave wrong rows (and out-of-bounds reads on a GPU)
    case = dict(view_cases([0, 1, 21, 6], n_items=30, d=19, seed=14, device=_device()))[view]
    contiguous = tuple(t.contiguous() for t in case)
    result = semantic_topk(*case, 5, metric=metric, backend="triton")
    check_against_reference(result, contiguous, 5, metric, ATOL[metric], ref=oracle(contiguous, 6, metric))


def test_triton_writes_every_output_entry():
    """No prefill: poisoned out buffers must come back fully overwritten (k beyond every history included)."""
    from rellax_fast.kernels.topk import semantic_topk_triton

    case = ragged_case([0, 1, 13, 4], n_items=20, d=17, seed=15, device=_device())
    n, k = case[3].shape[0], 20  # 20 > KPAD = 16 for the longest prefix (12): the padding loop runs
    out = (
        torch.full((n, k), -7, dtype=torch.int64, device=case[0].device),
        torch.full((n, k), float("nan"), dtype=torch.float32, device=case[0].device),
    )
    result = semantic_topk_triton(*case, k, normalize=True, out=out)
    assert result[0] is out[0] and result[1] is out[1]
    assert not bool((out[0] == -7).any()) and not bool(torch.isnan(out[1]).any())
    check_against_reference(out, case, k, "cosine", ATOL["cosine"])


def test_triton_k_is_not_a_constexpr():
    """Only KPAD (a power of two) may be a compile-time shape: K = min(k, longest prefix) and k are runtime."""
    import inspect

    import triton.language as tl

    from rellax_fast.kernels.topk import _semantic_topk_kernel

    fn = getattr(_semantic_topk_kernel, "fn", _semantic_topk_kernel)
    params = inspect.signature(fn).parameters
    constexprs = {n for n, p in params.items() if p.annotation is tl.constexpr}
    assert "KPAD" in constexprs and not constexprs & {"K", "KOUT", "D"}


def test_triton_table_cache_sees_in_place_writes():
    emb, items, offsets, users, pos = ragged_case([25, 9], n_items=16, d=16, seed=23, device=_device())
    first = semantic_topk(emb, items, offsets, users, pos, 3, backend="triton")
    assert torch.equal(semantic_topk(emb, items, offsets, users, pos, 3, backend="triton")[0], first[0])
    emb.copy_(torch.randn(emb.shape, generator=torch.Generator().manual_seed(6)).to(emb.device))
    again = semantic_topk(emb, items, offsets, users, pos, 3, backend="triton")
    check_against_reference(again, (emb, items, offsets, users, pos), 3, "cosine", ATOL["cosine"])
    assert not torch.equal(first[0], again[0])
