"""semantic_topk: reference and cpp backends vs the float64 oracle, padding, tie order, errors, registration.

Triton tests live in test_topk_triton.py (interpreter pass); CUDA tests here are marked ``cuda``.
"""

from __future__ import annotations

import functools

import pytest
import torch
from topk_cases import check_against_reference, exact_tie_embeddings, oracle, ragged_case, view_cases

from rellax_fast.ops import BackendUnavailableError, semantic_topk

LENGTHS = [0, 1, 2000, 37, 5, 0, 130]  # users with 0, 1 and 2000 items among others
KS = [0, 1, 5, 64, 2100]  # 2100 > every history
ATOL = {"cosine": 2e-5, "dot": 2e-3}  # float32 kernels vs float64 oracle (dot values are ~sqrt(d) large)


def _has_cpp() -> bool:
    from rellax_fast.ops._backend import why_unavailable

    return why_unavailable("cpp", "cpu", "semantic_topk") is None


needs_cpp = pytest.mark.skipif(not _has_cpp(), reason="rellax_fast._C not built (pure-Python install)")


@functools.cache
def _case(d: int):
    return ragged_case(LENGTHS, n_items=300, d=d, seed=d)


@functools.cache
def _oracle(d: int, metric: str):
    return oracle(_case(d), max(KS) + 1, metric)


@needs_cpp
@pytest.mark.parametrize("d", [31, 384])
@pytest.mark.parametrize("metric", ["cosine", "dot"])
@pytest.mark.parametrize("k", KS)
def test_cpp_matches_reference(d, metric, k):
    case = _case(d)
    result = semantic_topk(*case, k, metric=metric, backend="cpp")
    check_against_reference(result, case, k, metric, ATOL[metric] * (d / 31) ** 0.5, ref=_oracle(d, metric))


@pytest.mark.parametrize("d", [31, 384])
@pytest.mark.parametrize("metric", ["cosine", "dot"])
@pytest.mark.parametrize("k", [0, 5, 2100])
def test_reference_backend_matches_oracle(d, metric, k):
    case = _case(d)
    result = semantic_topk(*case, k, metric=metric, backend="reference")
    check_against_reference(result, case, k, metric, 1e-5, ref=_oracle(d, metric))


BACKENDS_CPU = ["reference", pytest.param("cpp", marks=needs_cpp)]


def _tie_case():
    # user 0: one item repeated (every score ties exactly); user 1: two alternating items
    emb = exact_tie_embeddings(19)  # exact in any summation order: ties must not depend on the CPU or BLAS
    items = torch.tensor([3] * 40 + [1, 2] * 25, dtype=torch.int64)
    offsets = torch.tensor([0, 40, 90])
    users = torch.tensor([0, 0, 0, 1, 1, 1])
    pos = torch.tensor([39, 1, 10, 49, 48, 3])
    return emb, items, offsets, users, pos


@pytest.mark.parametrize("backend", BACKENDS_CPU)
@pytest.mark.parametrize("metric", ["cosine", "dot"])
def test_exact_ties_prefer_larger_position(backend, metric):
    emb, items, offsets, users, pos = _tie_case()
    out_pos, out_score = semantic_topk(emb, items, offsets, users, pos, 6, metric=metric, backend=backend)
    assert out_pos[0].tolist() == [38, 37, 36, 35, 34, 33]
    assert out_pos[1].tolist() == [0, -1, -1, -1, -1, -1]
    assert out_pos[2].tolist() == [9, 8, 7, 6, 5, 4]
    assert torch.equal(out_score[0], out_score[0, :1].expand(6)), "identical items must score identically"
    # user 1, target at 49 is item 2: the earlier item-2 positions (odd) tie among themselves; the item-1
    # positions tie among themselves; the item-2 group wins (self-similarity beats cross-similarity under
    # cosine; under dot the order depends on the norms, so derive the group order from the scores)
    a, b = emb[1], emb[2]
    if metric == "cosine":
        a, b = a / a.norm(), b / b.norm()
    same_first = float(b @ b) >= float(a @ b)
    odd, even = [47, 45, 43, 41, 39, 37], [48, 46, 44, 42, 40, 38]
    assert out_pos[3].tolist() == (odd if same_first else even)
    # target at 48 is item 1 (even positions are item 1)
    same_first = float(a @ a) >= float(a @ b)
    assert out_pos[4].tolist() == ([46, 44, 42, 40, 38, 36] if same_first else [47, 45, 43, 41, 39, 37])
    # target at 3 is item 2; candidates: 0 (item 1), 1 (item 2), 2 (item 1)
    assert out_pos[5].tolist() == ([1, 2, 0] if float(b @ b) >= float(a @ b) else [2, 0, 1]) + [-1, -1, -1]


@pytest.mark.parametrize("backend", BACKENDS_CPU)
def test_zero_vector_scores_zero_under_cosine(backend):
    emb = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]])
    items = torch.tensor([0, 2, 1])
    out_pos, out_score = semantic_topk(
        emb, items, torch.tensor([0, 3]), torch.tensor([0]), torch.tensor([2]), 3, backend=backend
    )
    assert out_pos.tolist() == [[0, 1, -1]]
    assert out_score[0, :2].tolist() == [0.0, -1.0] and out_score[0, 2] == float("-inf")


@pytest.mark.parametrize("backend", BACKENDS_CPU)
def test_empty_shapes(backend):
    emb, items, offsets, users, pos = ragged_case([3, 4], n_items=10, d=5, seed=1)
    p, s = semantic_topk(emb, items, offsets, users, pos, 0, backend=backend)
    assert p.shape == (7, 0) and s.shape == (7, 0) and p.dtype == torch.int64 and s.dtype == torch.float32
    e = torch.zeros(0, dtype=torch.int64)
    p, s = semantic_topk(emb, items, offsets, e, e, 4, backend=backend)
    assert p.shape == (0, 4) and s.shape == (0, 4)
    # no users, no items at all
    p, s = semantic_topk(emb, e, torch.zeros(1, dtype=torch.int64), e, e, 2, backend=backend)
    assert p.shape == (0, 2)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_cpp_other_dtypes(dtype):
    case = ragged_case([50, 3, 77], n_items=40, d=24, seed=3, dtype=dtype)
    result = semantic_topk(*case, 7, metric="cosine", backend="cpp")
    # the oracle sees the same (rounded) embeddings in float64; the kernel computes in float32
    check_against_reference(result, case, 7, "cosine", 2e-5)


@needs_cpp
def test_auto_backend_is_cpp_on_cpu(monkeypatch):
    from rellax_fast.ops import resolve

    monkeypatch.delenv("RELLAX_BACKEND", raising=False)
    assert resolve("semantic_topk", torch.device("cpu")) == "cpp"


def test_forced_unavailable_backend_says_why():
    emb, items, offsets, users, pos = ragged_case([3], n_items=5, d=4, seed=0)
    with pytest.raises(BackendUnavailableError, match="cuda"):
        semantic_topk(emb, items, offsets, users, pos, 2, backend="cuda")


def _good():
    emb = torch.randn(6, 4)
    items = torch.tensor([0, 1, 2, 3, 4, 5, 1])
    offsets = torch.tensor([0, 4, 7])
    users = torch.tensor([0, 1, 1])
    pos = torch.tensor([3, 0, 2])
    return dict(item_emb=emb, seq_items=items, seq_offsets=offsets, sample_user=users, sample_pos=pos)


def _nan_emb():
    e = torch.randn(6, 4)
    e[2, 1] = float("nan")
    return e


def _inf_emb():
    e = torch.randn(6, 4)
    e[5, 0] = float("inf")
    return e


BAD_INPUTS = [
    ("item_emb", _nan_emb, ValueError, "item_emb must be finite; row 2"),
    ("item_emb", _inf_emb, ValueError, "item_emb must be finite; row 5"),
    ("item_emb", lambda: torch.randn(6), ValueError, "item_emb must be 2-D"),
    ("item_emb", lambda: torch.ones(6, 4, dtype=torch.int64), TypeError, "item_emb must be float"),
    ("item_emb", lambda: [[0.0]], TypeError, "item_emb must be a torch.Tensor"),
    ("seq_offsets", lambda: torch.tensor([1, 4, 7]), ValueError, "seq_offsets must start at 0"),
    ("seq_offsets", lambda: torch.tensor([0, 5, 4]), ValueError, "seq_offsets must be non-decreasing"),
    ("seq_offsets", lambda: torch.tensor([0, 4, 9]), ValueError, "seq_offsets overruns seq_items"),
    (
        "seq_offsets",
        lambda: torch.tensor([0, 4, 7], dtype=torch.int32),
        TypeError,
        "seq_offsets must be int64",
    ),
    ("seq_offsets", lambda: torch.zeros(0, dtype=torch.int64), ValueError, "seq_offsets must have"),
    ("seq_items", lambda: torch.tensor([0, 1, 2, 3, 4, 6, 1]), ValueError, r"seq_items\[5\] = 6"),
    ("seq_items", lambda: torch.tensor([0, 1, -1, 3, 4, 5, 1]), ValueError, r"seq_items\[2\] = -1"),
    ("seq_items", lambda: torch.tensor([[0, 1, 2, 3, 4, 5, 1]]), ValueError, "seq_items must be 1-D"),
    ("sample_user", lambda: torch.tensor([0, 2, 1]), ValueError, r"sample_user must be in \[0, 2\)"),
    ("sample_user", lambda: torch.tensor([0.0, 1.0, 1.0]), TypeError, "sample_user must be int64"),
    (
        "sample_pos",
        lambda: torch.tensor([4, 0, 2]),
        ValueError,
        r"sample_pos\[0\] = 4 but user 0 has 4 items",
    ),
    ("sample_pos", lambda: torch.tensor([3, 0, -1]), ValueError, r"sample_pos\[2\] = -1"),
    ("sample_pos", lambda: torch.tensor([3, 0]), ValueError, "same length"),
]


@pytest.mark.parametrize(
    "name,make,exc,match", BAD_INPUTS, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD_INPUTS)]
)
@pytest.mark.parametrize("backend", BACKENDS_CPU)
def test_bad_inputs_name_the_argument(name, make, exc, match, backend):
    args = _good()
    args[name] = make()
    with pytest.raises(exc, match=match):
        semantic_topk(*args.values(), 2, backend=backend)


@pytest.mark.parametrize(
    "k,metric,exc,match",
    [
        (-1, "cosine", ValueError, "k must be >= 0"),
        (2.0, "cosine", TypeError, "k must be an int"),
        (True, "cosine", TypeError, "k must be an int"),
        (2, "euclidean", ValueError, "metric must be one of"),
    ],
)
def test_bad_k_and_metric(k, metric, exc, match):
    with pytest.raises(exc, match=match):
        semantic_topk(*_good().values(), k, metric=metric)


@needs_cpp
def test_cpp_op_checks_its_own_arguments():
    """The raw torch.ops entry (no Python validation) must still refuse out-of-range samples cleanly."""
    from rellax_fast.ops._registry import ext_op

    args = list(_good().values())
    args[4] = torch.tensor([3, 0, 9])
    with pytest.raises(RuntimeError, match=r"sample_pos\[2\] = 9"):
        ext_op("semantic_topk")(*args, 2, True)
    args = list(_good().values())
    args[1] = torch.tensor([0, 1, 2, 3, 4, 99, 1])
    with pytest.raises(RuntimeError, match=r"seq_items\[5\] = 99"):
        ext_op("semantic_topk")(*args, 2, True)


# ------------------------------------------------------------------------------------------------------------
# the CPU kernel's two paths (row-major for <= 32 targets of a user, in passes of 8; panels beyond) and its
# sample ordering
# ------------------------------------------------------------------------------------------------------------

FEW_LENGTHS = [0, 1, 3, 17, 64, 0, 300, 9, 41, 1000, 2, 130, 77, 500]
PER_USER = (1, 2, 5, 8, 9, 16, 33)  # targets per user: 33 > the row-major kernel's 32


def _few_targets(lengths, seed: int, per_user=None):
    """(users, pos): user u gets min(len, PER_USER[u % 7]) distinct random targets (``per_user`` overrides),
    shuffled: one pass of the row-major kernel, several, and the panel kernel."""
    gen = torch.Generator().manual_seed(seed)
    users, pos = [], []
    for u, n in enumerate(lengths):
        t = min(n, per_user if per_user is not None else PER_USER[u % len(PER_USER)])
        users.append(torch.full((t,), u, dtype=torch.int64))
        pos.append(torch.randperm(n, generator=gen)[:t])
    users, pos = torch.cat(users), torch.cat(pos)
    perm = torch.randperm(users.numel(), generator=gen)
    return users[perm], pos[perm]


@needs_cpp
@pytest.mark.parametrize("d", [17, 31, 384])
@pytest.mark.parametrize("metric", ["cosine", "dot"])
@pytest.mark.parametrize("k", [1, 7, 50, 1500])  # 1500 > every history
def test_cpp_users_with_few_targets_match_oracle(d, metric, k):
    emb, items, offsets, _, _ = ragged_case(FEW_LENGTHS, n_items=120, d=d, seed=30 + d)
    users, pos = _few_targets(FEW_LENGTHS, seed=d)
    case = (emb, items, offsets, users, pos)
    result = semantic_topk(*case, k, metric=metric, backend="cpp")
    check_against_reference(result, case, k, metric, ATOL[metric] * (d / 31) ** 0.5)


@needs_cpp
@pytest.mark.parametrize("metric", ["cosine", "dot"])
@pytest.mark.parametrize("d", [19, 384])
def test_cpp_row_major_and_panel_paths_give_identical_scores(metric, d):
    """A user's few targets (row-major kernel) score bit-identically when more targets send them to the panels."""
    from rellax_fast.ops.topk import _call_ext

    emb, items, offsets, _, _ = ragged_case([700, 90], n_items=200, d=d, seed=31)
    few = torch.tensor([699, 5, 388])
    many = torch.cat([few, torch.arange(10, 690, 23)])  # 33 targets of the same user: the panel kernel
    normalize = metric == "cosine"
    alone = _call_ext(emb, items, offsets, torch.zeros(3, dtype=torch.int64), few, 40, normalize)
    together = _call_ext(emb, items, offsets, torch.zeros(len(many), dtype=torch.int64), many, 40, normalize)
    assert torch.equal(alone[0], together[0][:3]) and torch.equal(alone[1], together[1][:3])
    check_against_reference(
        alone,
        (emb, items, offsets, torch.zeros(3, dtype=torch.int64), few),
        40,
        metric,
        ATOL[metric] * (d / 31) ** 0.5,
    )


@needs_cpp
@pytest.mark.parametrize("n_targets", [1, 2, 8, 9, 32, 33, 40])
def test_cpp_exact_ties_on_both_paths(n_targets):
    emb = exact_tie_embeddings(19)
    items = torch.tensor([3] * 60 + [1, 2] * 20, dtype=torch.int64)
    offsets = torch.tensor([0, 60, 100])
    pos = torch.arange(59, 59 - n_targets, -1)
    users = torch.zeros(n_targets, dtype=torch.int64)
    out_pos, out_score = semantic_topk(emb, items, offsets, users, pos, 5, backend="cpp")
    for row, p in zip(out_pos.tolist(), pos.tolist()):
        assert row == [p - 1 - i for i in range(5)]  # equal scores: the most recent first
    assert torch.equal(out_score, out_score[:1, :1].expand_as(out_score))


@needs_cpp
def test_cpp_result_does_not_depend_on_sample_order():
    """Sorted samples (no sort), shuffled ones over a small history (counting sort) and over a large one
    (comparison sort) give identical rows."""
    from rellax_fast.ops.topk import _call_ext

    lengths = FEW_LENGTHS + [60_000]  # the last user is never sampled: only its size changes the sort
    emb, items, offsets, _, _ = ragged_case(lengths, n_items=120, d=24, seed=32)
    users, pos = _few_targets(FEW_LENGTHS, seed=3, per_user=40)
    order = torch.argsort(offsets[users] + pos, stable=True)
    small = offsets[len(FEW_LENGTHS)]  # the history without the unsampled user
    got = {}
    for name, (u, p, off, it) in {
        "sorted": (users[order], pos[order], offsets, items),
        "counting": (users, pos, offsets[: len(FEW_LENGTHS) + 1], items[:small]),
        "comparison": (users, pos, offsets, items),
    }.items():
        assert name != "comparison" or it.shape[0] > 8 * u.shape[0]
        res = _call_ext(emb, it, off, u, p, 6, True)
        got[name] = res if name != "sorted" else tuple(r[torch.argsort(order)] for r in res)
    for name in ("counting", "comparison"):
        assert torch.equal(got[name][0], got["sorted"][0]) and torch.equal(got[name][1], got["sorted"][1])
    check_against_reference(got["comparison"], (emb, items, offsets, users, pos), 6, "cosine", ATOL["cosine"])


@needs_cpp
def test_cpp_op_reads_only_what_its_samples_need():
    """The raw op checks and reads each sampled user's prefix up to its last target, nothing else: a bad
    entry after it, or in an unsampled user, is never read (the per-call cost does not grow with the whole
    history); the Python op checks every entry once per tensor."""
    from rellax_fast.ops._registry import ext_op

    emb, items, offsets, _, _ = ragged_case([30, 40, 25], n_items=50, d=8, seed=33)
    users, pos = torch.tensor([0, 2, 0]), torch.tensor([12, 24, 3])
    want = ext_op("semantic_topk")(emb, items, offsets, users, pos, 4, True)
    poisoned = items.clone()
    poisoned[13:30] = 10**9  # user 0 after its last target (12)
    poisoned[30:70] = -5  # user 1: not sampled
    got = ext_op("semantic_topk")(emb, poisoned, offsets, users, pos, 4, True)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    poisoned[12] = 10**9  # the target itself is read
    with pytest.raises(RuntimeError, match=r"seq_items\[12\] = 1000000000"):
        ext_op("semantic_topk")(emb, poisoned, offsets, users, pos, 4, True)
    bad_offsets = torch.tensor([0, 30, 70, 60])  # user 2's start is past its end
    with pytest.raises(RuntimeError, match=r"seq_offsets must be non-negative and non-decreasing"):
        ext_op("semantic_topk")(emb, items, bad_offsets, users, pos, 4, True)


@needs_cpp
def test_opcheck_and_outputs_not_differentiable():
    from rellax_fast.ops._registry import ext_op

    op = ext_op("semantic_topk")
    emb, items, offsets, users, pos = ragged_case([9, 4, 0, 12], n_items=20, d=8, seed=5)
    torch.library.opcheck(op, (emb, items, offsets, users, pos, 3, True))
    emb.requires_grad_(True)
    p, s = semantic_topk(emb, items, offsets, users, pos, 3)
    assert not s.requires_grad and not p.requires_grad


@pytest.mark.cuda
@pytest.mark.parametrize(
    "backend,k",
    [(b, k) for b in ("cuda", "triton") for k in (0, 1, 5, 64)] + [("cuda", 2100), ("triton", 256)],
)  # triton's largest k: TRITON_MAX_K
@pytest.mark.parametrize("metric", ["cosine", "dot"])
def test_gpu_backends_match_reference(backend, metric, k):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    case = ragged_case(LENGTHS, n_items=300, d=384, seed=11, device="cuda")
    result = semantic_topk(*case, k, metric=metric, backend=backend)
    check_against_reference(result, case, k, metric, ATOL[metric] * (384 / 31) ** 0.5)


VIEW_LENGTHS = [0, 1, 45, 9, 3]


@pytest.mark.parametrize("view", ["strided", "column_major", "expanded"])
@pytest.mark.parametrize("backend", BACKENDS_CPU)
@pytest.mark.parametrize("metric", ["cosine", "dot"])
def test_strided_and_expanded_views(backend, metric, view):
    case = dict(view_cases(VIEW_LENGTHS, n_items=40, d=21, seed=13))[view]
    contiguous = tuple(t.contiguous() for t in case)
    result = semantic_topk(*case, 6, metric=metric, backend=backend)
    check_against_reference(result, contiguous, 6, metric, ATOL[metric], ref=oracle(contiguous, 7, metric))


@pytest.mark.parametrize("backend", BACKENDS_CPU)
def test_table_cache_sees_in_place_writes(backend):
    """The finiteness check and the prepared tables are cached per item_emb: an in-place write must be seen."""
    emb, items, offsets, users, pos = ragged_case([30, 12], n_items=20, d=16, seed=21)
    first = semantic_topk(emb, items, offsets, users, pos, 4, backend=backend)
    semantic_topk(emb, items, offsets, users, pos, 4, backend=backend)  # a cache hit
    emb.copy_(torch.randn(emb.shape, generator=torch.Generator().manual_seed(5)))  # a new table, same tensor
    flipped = semantic_topk(emb, items, offsets, users, pos, 4, backend=backend)
    check_against_reference(flipped, (emb, items, offsets, users, pos), 4, "cosine", ATOL["cosine"])
    assert not torch.equal(first[0], flipped[0])
    emb[3, 2] = float("nan")
    with pytest.raises(ValueError, match="item_emb must be finite; row 3"):
        semantic_topk(emb, items, offsets, users, pos, 4, backend=backend)


def test_validation_reads_back_once(monkeypatch):
    """Every value check and max(sample_pos) come back in one host read (one sync on a GPU)."""
    from rellax_fast.ops import topk as topk_mod

    calls = {"tolist": 0, "item": 0}
    real_tolist, real_item = torch.Tensor.tolist, torch.Tensor.item

    def tolist(self):
        calls["tolist"] += 1
        return real_tolist(self)

    def item(self):
        calls["item"] += 1
        return real_item(self)

    emb, items, offsets, users, pos = ragged_case([30, 12, 0, 5], n_items=20, d=16, seed=22)
    topk_mod._TABLES.clear()
    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    monkeypatch.setattr(torch.Tensor, "item", item)
    max_pos = topk_mod.validate_topk_args(emb, items, offsets, users, pos, 3, "cosine")
    assert max_pos == int(pos.max())
    assert calls == {"tolist": 1, "item": 0}


# ------------------------------------------------------------------------------------------------------------
# GPU only (scripts/gpu_check.sh): views, non-zero device, host syncs, recompiles, poisoned allocations
# ------------------------------------------------------------------------------------------------------------


def _gpu_backend_ready(backend: str) -> bool:
    from rellax_fast.ops._backend import why_unavailable

    return torch.cuda.is_available() and why_unavailable(backend, "cuda", "semantic_topk") is None


GPU_BACKENDS = [
    pytest.param(
        b, marks=pytest.mark.skipif(not _gpu_backend_ready(b), reason=f"needs a CUDA GPU and the {b} backend")
    )
    for b in ("cuda", "triton")
]
GPU_ATOL = {"cosine": 1e-4, "dot": 1e-2}


@pytest.mark.cuda
@pytest.mark.parametrize("view", ["strided", "column_major", "expanded"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_strided_and_expanded_views(backend, view):
    case = dict(view_cases(VIEW_LENGTHS, n_items=40, d=21, seed=13, device="cuda"))[view]
    contiguous = tuple(t.contiguous() for t in case)
    for metric in ("cosine", "dot"):
        result = semantic_topk(*case, 6, metric=metric, backend=backend)
        check_against_reference(
            result, contiguous, 6, metric, GPU_ATOL[metric], ref=oracle(contiguous, 7, metric)
        )


@pytest.mark.cuda
@pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="needs two CUDA GPUs (tensors on cuda:1 while cuda:0 is current)"
)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_tensors_on_second_device(backend):
    case = ragged_case(LENGTHS, n_items=300, d=64, seed=12, device="cuda:1")
    with torch.cuda.device(0):
        result = semantic_topk(*case, 9, metric="cosine", backend=backend)
        assert result[0].device == case[0].device and torch.cuda.current_device() == 0
    check_against_reference(result, case, 9, "cosine", GPU_ATOL["cosine"])


@pytest.mark.cuda
@pytest.mark.parametrize("backend,max_syncs", [("triton", 1), ("cuda", 2)])
def test_gpu_host_syncs_per_call(backend, max_syncs):
    """Warm calls sync at most once (triton: the validation read-back) or twice (cuda: + the raw op's own check)."""
    import warnings

    if not _gpu_backend_ready(backend):
        pytest.skip(f"needs a CUDA GPU and the {backend} backend")
    case = ragged_case(LENGTHS, n_items=300, d=64, seed=16, device="cuda")
    semantic_topk(*case, 8, backend=backend)  # warm: compile, cache the prepared table
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            semantic_topk(*case, 8, backend=backend)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    assert len(syncs) <= max_syncs, [str(w.message)[:120] for w in syncs]


@pytest.mark.cuda
def test_gpu_triton_no_recompile_for_new_history_lengths():
    """K = min(k, longest prefix) is a runtime value: histories of new lengths in the same KPAD bucket reuse the binary."""
    if not _gpu_backend_ready("triton"):
        pytest.skip("needs a CUDA GPU and the triton backend")
    from rellax_fast.kernels.topk import _semantic_topk_kernel

    def n_binaries():
        caches = getattr(_semantic_topk_kernel, "device_caches", None)
        if caches is None:
            pytest.skip("this triton version has no JITFunction.device_caches")
        return sum(len(c[0]) for c in caches.values())

    semantic_topk(*ragged_case([40, 9], n_items=50, d=32, seed=1, device="cuda"), 16, backend="triton")
    before = n_binaries()
    for lengths in (
        [17, 3],
        [23],
        [30, 30, 2],
        [38],
    ):  # longest prefixes 16..37: K = 16, KPAD = 16 throughout
        semantic_topk(*ragged_case(lengths, n_items=50, d=32, seed=2, device="cuda"), 16, backend="triton")
    assert n_binaries() == before


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_every_output_element_written(backend):
    import torch.utils.deterministic as det

    old_alg, old_warn = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    old_fill = det.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    det.fill_uninitialized_memory = True
    try:
        assert torch.isnan(torch.empty(64, device="cuda")).all(), "poisoning is not active"
        case = ragged_case([0, 1, 70, 9, 33], n_items=60, d=40, seed=17, device="cuda")
        for k in (1, 7, 100):
            check_against_reference(
                semantic_topk(*case, k, backend=backend), case, k, "cosine", GPU_ATOL["cosine"]
            )
    finally:
        torch.use_deterministic_algorithms(old_alg, warn_only=old_warn)
        det.fill_uninitialized_memory = old_fill


def test_triton_supports_k_up_to_its_limit():
    """Triton's k limit is a `supports` row of the backend table, read by resolve like every other limit."""
    from rellax_fast.ops import _backend
    from rellax_fast.ops import topk as topk_mod

    limit = topk_mod.TRITON_MAX_K
    assert topk_mod._triton_supports(k=limit) is None
    reason = topk_mod._triton_supports(k=limit + 1)
    assert f"k={limit + 1}" in reason and str(limit) in reason
    assert _backend._refusal("semantic_topk", "triton", {"k": limit + 1}) == reason
    for b in ("reference", "cpp", "cuda"):  # the other backends take any k
        assert _backend._refusal("semantic_topk", b, {"k": 10**6}) is None


def _pretend_gpu_backends(monkeypatch, cuda_ok: bool):
    """Environment checks that pass for triton (and cuda when ``cuda_ok``) on 'cuda' tensors; nothing runs."""
    from rellax_fast.ops import _backend

    monkeypatch.delenv("RELLAX_BACKEND", raising=False)
    checks = dict(_backend._CHECKS)
    checks["triton"] = lambda device_type: None
    checks["cuda"] = (lambda device_type: None) if cuda_ok else (lambda device_type: "built without CUDA")
    monkeypatch.setattr(_backend, "_CHECKS", checks)
    monkeypatch.setattr(_backend, "EXT_BACKENDS", ())  # nothing to load: resolve only picks
    return torch.device("cuda")  # a device object only


def test_auto_takes_next_backend_for_large_k(monkeypatch):
    from rellax_fast.ops import _backend
    from rellax_fast.ops import topk as topk_mod

    dev = _pretend_gpu_backends(monkeypatch, cuda_ok=True)
    big = topk_mod.TRITON_MAX_K + 1
    assert _backend.resolve("semantic_topk", dev, None, k=big - 1) == "triton"
    assert _backend.resolve("semantic_topk", dev, None, k=big) == "cuda"
    assert _backend.resolve("semantic_topk", dev, "auto", k=big) == "cuda"
    dev = _pretend_gpu_backends(monkeypatch, cuda_ok=False)
    assert _backend.resolve("semantic_topk", dev, None, k=big) == "reference"


@pytest.mark.parametrize("source", ["argument", "env"])
def test_forced_triton_with_large_k_names_k_and_the_limit(monkeypatch, source):
    from rellax_fast.ops import _backend
    from rellax_fast.ops import topk as topk_mod

    dev = _pretend_gpu_backends(monkeypatch, cuda_ok=True)
    big = topk_mod.TRITON_MAX_K + 1
    backend = "triton" if source == "argument" else None
    if source == "env":
        monkeypatch.setenv("RELLAX_BACKEND", "triton")
    with pytest.raises(BackendUnavailableError, match=rf"triton.*k={big} exceeds .* limit of {big - 1}"):
        _backend.resolve("semantic_topk", dev, backend, k=big)


@pytest.mark.triton
def test_forced_triton_large_k_refused_by_the_op():
    """Through the public op (TRITON_INTERPRET=1 on the CPU, or a GPU): a clear error, not a slow run."""
    from rellax_fast.ops import topk as topk_mod

    device = "cuda" if torch.cuda.is_available() else "cpu"
    case = ragged_case([3, 5], n_items=8, d=4, seed=0, device=device)
    big = topk_mod.TRITON_MAX_K + 1
    with pytest.raises(BackendUnavailableError, match=rf"k={big} exceeds"):
        semantic_topk(*case, big, backend="triton")


@pytest.mark.cuda
def test_gpu_auto_large_k_runs_on_cuda(monkeypatch):
    if not (_gpu_backend_ready("cuda") and _gpu_backend_ready("triton")):
        pytest.skip("needs a CUDA GPU with the cuda and triton backends")
    from rellax_fast.ops import resolve

    monkeypatch.delenv("RELLAX_BACKEND", raising=False)
    assert resolve("semantic_topk", torch.device("cuda"), k=2100) == "cuda"
    case = ragged_case(LENGTHS, n_items=300, d=64, seed=18, device="cuda")
    check_against_reference(semantic_topk(*case, 2100), case, 2100, "cosine", GPU_ATOL["cosine"])
