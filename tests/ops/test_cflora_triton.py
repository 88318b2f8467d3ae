"""Tests of the fused Triton CFLoRA kernels (rellax_fast.kernels.cflora) against a float64 oracle.

Run under the interpreter: ``TRITON_INTERPRET=1 .venv/bin/python -m pytest -m triton tests/ops/test_cflora_triton.py``.
The ``cuda``-marked test at the end runs the same kernels compiled on a GPU (scripts/gpu_check.sh).
"""

from __future__ import annotations

import pytest
import torch
from rellax_testing import TOLERANCES, assert_close

from rellax_fast.ops.dropout import dropout_keep_mask_ref

D_IN, D_OUT, N_SAMPLES, TOKENS = 100, 36, 3, 7
GRAD_NAMES = ("x", "weight", "bias", "lora_a", "lora_b", "interaction")


def _kernels():
    from rellax_fast.kernels import cflora

    return cflora


def st_oracle(x, lora_a, interaction, rows_per_sample, dropout_p, seed):
    """float64 S = drop(x) Aᵀ and T = S Cᵀ (the saved activations; cflora_linear_ref does not expose them)."""
    x = x.double()
    if dropout_p > 0:
        keep = dropout_keep_mask_ref(x.numel(), dropout_p, seed, device=x.device).view(x.shape)
        x = x * keep.double() / (1.0 - dropout_p)
    s = x @ lora_a.double().T
    if interaction is None:
        t = s
    elif interaction.dim() == 2:
        t = s @ interaction.double().T
    else:
        per_row = interaction.double().repeat_interleave(rows_per_sample, dim=0)  # (M, r, r)
        t = torch.einsum("mj,mij->mi", s, per_row)
    return s, t


def make_inputs(
    r, dtype, c_kind, with_bias, m=N_SAMPLES * TOKENS, d_in=D_IN, d_out=D_OUT, n_samples=N_SAMPLES
):
    """Fresh random inputs of O(1) output scale, already rounded to ``dtype``."""
    g = torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * std).to(dtype)

    x = rnd(m, d_in)
    weight = rnd(d_out, d_in, std=d_in**-0.5)
    bias = rnd(d_out) if with_bias else None
    lora_a = rnd(r, d_in, std=d_in**-0.5)
    lora_b = rnd(d_out, r, std=r**-0.5)
    if c_kind == "none":
        c = None
    elif c_kind == "shared":
        c = rnd(r, r, std=r**-0.5)
    else:
        c = rnd(n_samples, r, r, std=r**-0.5)
    return x, weight, bias, lora_a, lora_b, c


def check(got, want, dtype, name, scale=1.0):
    """assert_close with the table tolerance for ``dtype``, keeping torch's mismatch report."""
    assert_close(got, want, dtype, scale, msg=lambda report: f"{name}: {report}")


def grad_scale(name, dtype, rows):
    """Widening for gradients that sum ``rows`` products of an intermediate rounded to a 16-bit dtype
    (dS and T live in x's dtype, as in any bf16/fp16 autograd): rounding error grows like sqrt(rows)."""
    if dtype == torch.float32 or name not in ("lora_a", "lora_b", "interaction"):
        return 1.0
    return rows**0.5


def oracle_grads(inputs, grad_y, rows_per_sample, scale, p, seed):
    """float64 y, S, T and every gradient, from the op's own reference (rellax_fast.ops.cflora_linear_ref)."""
    from rellax_fast.ops import cflora_linear_ref

    leaves = [None if t is None else t.detach().double().requires_grad_(True) for t in inputs]
    x, weight, bias, lora_a, lora_b, c = leaves
    if c is not None and c.dim() == 3:
        x_in = x.view(c.shape[0], rows_per_sample, x.shape[-1]) if rows_per_sample > 1 else x
    else:
        x_in = x
    y = cflora_linear_ref(x_in, weight, bias, lora_a, lora_b, c, scale=scale, dropout_p=p, seed=seed)
    y = y.reshape(-1, weight.shape[0])
    present = [leaf for leaf in leaves if leaf is not None]
    grads = iter(torch.autograd.grad(y, present, grad_y.double()))
    s, t = st_oracle(x.detach(), lora_a.detach(), None if c is None else c.detach(), rows_per_sample, p, seed)
    return y.detach(), s, t, [None if leaf is None else next(grads) for leaf in leaves]


# ----------------------------------------------------------------------------------------------------
# launcher-level: forward and every gradient, all C shapes, dropout, bias, dtypes, ranks
# ----------------------------------------------------------------------------------------------------
@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("c_kind", ["none", "shared", "per_sample"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
@pytest.mark.parametrize("r", [1, 4, 16])
def test_launchers_match_float64_oracle(dtype, c_kind, dropout_p, r):
    _check_fwd_bwd(dtype, c_kind, dropout_p, True, r)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("c_kind", ["none", "per_sample"])
def test_launchers_without_bias(dtype, c_kind):
    _check_fwd_bwd(dtype, c_kind, 0.1, False, 4)


def _check_fwd_bwd(dtype, c_kind, dropout_p, with_bias, r):
    k = _kernels()
    scale, seed = 0.75, 1234
    inputs = make_inputs(r, dtype, c_kind, with_bias)
    m = inputs[0].shape[0]
    grad_y = torch.randn(m, D_OUT, dtype=torch.float64).to(dtype)
    y_ref, s_ref, t_ref, grads_ref = oracle_grads(inputs, grad_y, TOKENS, scale, dropout_p, seed)

    y, s, t = k.cflora_fwd(*inputs, TOKENS, scale, dropout_p, seed)
    assert y.dtype == s.dtype == t.dtype == dtype
    assert y.shape == (m, D_OUT) and s.shape == t.shape == (m, r)
    check(s, s_ref, dtype, "S")
    check(t, t_ref, dtype, "T")
    check(y, y_ref, dtype, "y")

    x, weight, bias, lora_a, lora_b, c = inputs
    needs = [True, True, with_bias, True, True, c is not None]
    grads = k.cflora_bwd(grad_y, x, weight, lora_a, lora_b, c, s, t, TOKENS, scale, dropout_p, seed, needs)
    assert isinstance(grads, tuple) and len(grads) == 6
    for name, got, want, inp in zip(GRAD_NAMES, grads, grads_ref, inputs):
        if want is None:
            assert got is None, f"d{name} should be None"
            continue
        assert got.shape == inp.shape and got.dtype == inp.dtype, f"d{name}: {got.shape} {got.dtype}"
        check(got, want, dtype, f"d{name}", grad_scale(name, dtype, m))


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_per_sample_one_row_each_and_noncontiguous_x(dtype):
    """x (B, d_in) with per-sample C (rows_per_sample=1: every row its own C) and a strided x view."""
    k = _kernels()
    n, r, scale, p, seed = 19, 8, 2.0, 0.1, 99
    inputs = list(make_inputs(r, dtype, "per_sample", True, m=n, n_samples=n))
    inputs[0] = torch.randn(D_IN, n, dtype=torch.float64).to(dtype).T  # non-contiguous (n, d_in)
    assert not inputs[0].is_contiguous()
    grad_y = torch.randn(n, D_OUT, dtype=torch.float64).to(dtype)
    y_ref, s_ref, t_ref, grads_ref = oracle_grads(inputs, grad_y, 1, scale, p, seed)
    y, s, t = k.cflora_fwd(*inputs, 1, scale, p, seed)
    check(y, y_ref, dtype, "y")
    check(t, t_ref, dtype, "T")
    x, weight, bias, lora_a, lora_b, c = inputs
    grads = k.cflora_bwd(grad_y, x, weight, lora_a, lora_b, c, s, t, 1, scale, p, seed, [True] * 6)
    for name, got, want in zip(GRAD_NAMES, grads, grads_ref):
        check(got, want, dtype, f"d{name}", grad_scale(name, dtype, n))


@pytest.mark.triton
@pytest.mark.parametrize(
    "needs",
    [
        (False, False, False, True, True, True),  # frozen base, x without grad: the usual LoRA case
        (True, False, False, False, False, False),  # only dx
        (False, True, True, False, False, False),  # only the base layer's grads
        (False, False, False, False, True, False),  # only dB
        (False, False, False, False, False, True),  # only dC
    ],
    ids=["lora_only", "dx_only", "base_only", "db_only", "dc_only"],
)
def test_backward_subsets_return_none_and_stay_correct(needs):
    k = _kernels()
    dtype, r, scale, p, seed = torch.float32, 4, 0.5, 0.1, 5
    inputs = make_inputs(r, dtype, "per_sample", True)
    m = inputs[0].shape[0]
    grad_y = torch.randn(m, D_OUT, dtype=dtype)
    *_, grads_ref = oracle_grads(inputs, grad_y, TOKENS, scale, p, seed)
    x, weight, bias, lora_a, lora_b, c = inputs
    y, s, t = k.cflora_fwd(*inputs, TOKENS, scale, p, seed)
    grads = k.cflora_bwd(grad_y, x, weight, lora_a, lora_b, c, s, t, TOKENS, scale, p, seed, list(needs))
    for name, need, got, want in zip(GRAD_NAMES, needs, grads, grads_ref):
        if not need:
            assert got is None, f"d{name} was not requested but returned"
        else:
            check(got, want, dtype, f"d{name}", grad_scale(name, dtype, m))


# ----------------------------------------------------------------------------------------------------
# the one pass over dY (#23): dT and dB / db from the same dY tiles, every path of it
# ----------------------------------------------------------------------------------------------------
def _spy_dy_structure(monkeypatch, k, grad_y):
    """Record whether the dY pass fused dB / db, its column splits, and how many split-K rank_grad
    launches re-read dY (their u is grad_y)."""
    seen = {"fused_db": [], "splits": [], "dy_rank_grad": 0}
    real_launch, real_rank_grad = k._launch_dy_pass, k._rank_grad

    def launch(run, plan, *args):
        seen["fused_db"].append(plan.db_part is not None or plan.dbias_part is not None)
        seen["splits"].append(plan.splits)
        return real_launch(run, plan, *args)

    def rank_grad(u, *args):
        seen["dy_rank_grad"] += u.data_ptr() == grad_y.data_ptr()
        return real_rank_grad(u, *args)

    monkeypatch.setattr(k, "_launch_dy_pass", launch)
    monkeypatch.setattr(k, "_rank_grad", rank_grad)
    return seen


@pytest.mark.triton
@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "dB_apart"])
@pytest.mark.parametrize("d_out", [20, 100], ids=["one_split", "col_splits"])
@pytest.mark.parametrize("c_kind", ["none", "shared", "per_sample"])
@pytest.mark.parametrize("r", [1, 128])
def test_dy_pass_dt_db_dbias_every_path(monkeypatch, fuse, d_out, c_kind, r):
    """M = 39 rows (not a multiple of the 16-row block), r = 1 and 128, every C, dropout: with dB fused
    into the dY pass (one or two column splits, whose dT partials the finish kernel sums) and with dB in
    its own pass (_fuse_db False, the GPU's choice at r >= 64; the dY pass then finishes dT itself): every
    gradient against the float64 oracle, and the structure asserted (dY read once for dT and dB when
    fused)."""
    k = _kernels()
    dtype, n, tokens, scale, p, seed = torch.float32, 3, 13, 0.75, 0.1, 17
    m = n * tokens
    inputs = make_inputs(r, dtype, c_kind, True, m=m, d_out=d_out, n_samples=n)
    grad_y = torch.randn(m, d_out, dtype=torch.float64).to(dtype)
    *_, grads_ref = oracle_grads(inputs, grad_y, tokens, scale, p, seed)
    y, s, t = k.cflora_fwd(*inputs, tokens, scale, p, seed)
    if not fuse:
        monkeypatch.setattr(k, "_fuse_db", lambda *a: False)
    seen = _spy_dy_structure(monkeypatch, k, grad_y)
    x, weight, bias, lora_a, lora_b, c = inputs
    needs = [True, False, True, True, True, c is not None]
    grads = k.cflora_bwd(grad_y, x, weight, lora_a, lora_b, c, s, t, tokens, scale, p, seed, needs)
    assert seen["fused_db"] == [fuse]
    # fused: the interpreter's 32-column blocks in 2 splits at most (one split: the finish kernel still
    # sums and finishes dT); dT only: one split, finished in the dY pass (today's row kernel)
    assert seen["splits"] == [2 if fuse and d_out > 32 else 1]
    assert seen["dy_rank_grad"] == (0 if fuse else 1)
    for name, need, got, want in zip(GRAD_NAMES, needs, grads, grads_ref):
        if need and want is not None:
            check(got, want, dtype, f"d{name}")


@pytest.mark.triton
@pytest.mark.parametrize("c_kind", ["none", "per_sample"])
def test_fused_db_is_deterministic(c_kind):
    """dB / db come from per-row-block partials summed in a fixed order (no atomics): two backwards give
    the same bits. (A shared C's dC keeps its fp32 atomics: only its last bits may differ.)"""
    k = _kernels()
    dtype, r, scale = torch.bfloat16, 8, 0.5
    inputs = make_inputs(r, dtype, c_kind, True, m=N_SAMPLES * 29, d_out=70)
    grad_y = torch.randn(N_SAMPLES * 29, 70, dtype=torch.float64).to(dtype)
    y, s, t = k.cflora_fwd(*inputs, 29, scale, 0.0, None)
    x, weight, bias, lora_a, lora_b, c = inputs
    needs = [True, False, True, True, True, c is not None]
    first = k.cflora_bwd(grad_y, x, weight, lora_a, lora_b, c, s, t, 29, scale, 0.0, None, needs)
    second = k.cflora_bwd(grad_y, x, weight, lora_a, lora_b, c, s, t, 29, scale, 0.0, None, needs)
    for name, a, b in zip(GRAD_NAMES, first, second):
        assert (a is None) == (b is None), name
        if a is not None:
            assert torch.equal(a, b), f"d{name} differs between two identical backwards"


# ----------------------------------------------------------------------------------------------------
# poisoned buffers: every torch.empty output is NaN-filled; outputs must come back finite and right
# ----------------------------------------------------------------------------------------------------
@pytest.mark.triton
@pytest.mark.parametrize("c_kind", ["shared", "per_sample"])
def test_every_output_element_is_written(monkeypatch, c_kind):
    k = _kernels()
    real_empty = torch.empty
    poisoned = []

    def poisoned_empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        if out.is_floating_point():
            out.fill_(float("nan"))
            poisoned.append(out)
        return out

    dtype, r, scale, p, seed = torch.float16, 4, 1.5, 0.1, 3
    inputs = make_inputs(r, dtype, c_kind, True)
    m = inputs[0].shape[0]
    grad_y = torch.randn(m, D_OUT, dtype=torch.float64).to(dtype)
    y_ref, s_ref, t_ref, grads_ref = oracle_grads(inputs, grad_y, TOKENS, scale, p, seed)
    x, weight, bias, lora_a, lora_b, c = inputs
    monkeypatch.setattr(torch, "empty", poisoned_empty)
    y, s, t = k.cflora_fwd(*inputs, TOKENS, scale, p, seed)
    grads = k.cflora_bwd(grad_y, x, weight, lora_a, lora_b, c, s, t, TOKENS, scale, p, seed, [True] * 6)
    monkeypatch.undo()
    assert any(y.data_ptr() == b.data_ptr() for b in poisoned), "y was not allocated with torch.empty"
    assert len(poisoned) >= 6  # y, s, t, dS, dx, dW at least
    for name, got, want in [("y", y, y_ref), ("s", s, s_ref), ("t", t, t_ref)] + list(
        zip(("d" + g for g in GRAD_NAMES), grads, grads_ref)
    ):
        assert torch.isfinite(got).all(), f"{name} has unwritten (NaN) elements"
        check(got, want, dtype, name, grad_scale(name[1:], dtype, m))


# ----------------------------------------------------------------------------------------------------
# the TMA + persistent GEMMs (sm_90+, 16-byte aligned tensors) and the pointer GEMMs they replace there
# ----------------------------------------------------------------------------------------------------
def _spy_gemm_paths(monkeypatch, k):
    """Counts of the forward / dx GEMM launches by path, and the persistent grids' (programs, tiles)."""
    used, grids = [], []
    for name in ("_launch_fwd_gemm_tma", "_launch_dx_tma"):
        real = getattr(k, name)

        def spy(run, *args, _real=real, _name=name):
            used.append(_name)
            return _real(run, *args)

        monkeypatch.setattr(k, name, spy)
    for name in ("_cflora_fwd_gemm_tma_kernel", "_cflora_dx_tma_kernel"):
        real_run = getattr(k, name).run

        def run_spy(*args, grid, _real=real_run, **kwargs):
            grids.append(grid)
            return _real(*args, grid=grid, **kwargs)

        monkeypatch.setattr(getattr(k, name), "run", run_spy)
    return used, grids


@pytest.mark.triton
@pytest.mark.parametrize("capability", [90, 80], ids=["sm90_tma", "sm80_pointers"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_tma_and_pointer_gemms_match_oracle(monkeypatch, capability, dtype, dropout_p):
    """Aligned sizes (rows of 96 and 48 elements: 16-byte multiples in both dtypes; M = 69 leaves edge tiles)
    take the TMA GEMMs on sm_90 and the pointer GEMMs on sm_80. Both match the float64 oracle with every
    output NaN-poisoned first, and the persistent grid (2 programs under the interpreter) walks several tiles
    per program."""
    k = _kernels()
    monkeypatch.setattr(k, "_CPU_CAPABILITY", capability)
    used, grids = _spy_gemm_paths(monkeypatch, k)
    real_empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    r, scale, seed, d_in, d_out, n, rps = 5, 0.75, 99, 96, 48, 3, 23
    inputs = make_inputs(r, dtype, "per_sample", True, m=n * rps, d_in=d_in, d_out=d_out, n_samples=n)
    x, weight, bias, lora_a, lora_b, c = inputs
    grad_y = torch.randn(n * rps, d_out, dtype=torch.float64).to(dtype)
    y_ref, _, _, grads_ref = oracle_grads(inputs, grad_y, rps, scale, dropout_p, seed)
    monkeypatch.setattr(torch, "empty", poisoned_empty)
    y, s, t = k.cflora_fwd(*inputs, rps, scale, dropout_p, seed)
    grads = k.cflora_bwd(grad_y, x, weight, lora_a, lora_b, c, s, t, rps, scale, dropout_p, seed, [True] * 6)
    monkeypatch.setattr(torch, "empty", real_empty)
    assert used == (["_launch_fwd_gemm_tma", "_launch_dx_tma"] if capability >= 90 else []), used
    for grid in grids:
        assert grid == (2,), grid  # fewer programs than the 10 (forward) / 15 (dx) output tiles
    check(y, y_ref, dtype, "y")
    for name, got, want in zip(GRAD_NAMES, grads, grads_ref):
        check(got, want, dtype, f"d{name}", grad_scale(name, dtype, n * rps))


@pytest.mark.triton
def test_tma_only_where_descriptors_are_legal(monkeypatch):
    """_tma_ok: sm_90+, USE_TMA, and per tensor a unit column stride, non-overlapping rows, a 16-byte aligned
    base and row stride, and no empty tensor. Each condition alone turns TMA off."""
    k = _kernels()
    cpu = torch.device("cpu")
    base = torch.zeros(8, 64, dtype=torch.bfloat16)
    assert k._tma_ok(cpu, base, base)
    assert not k._tma_ok(cpu, base, torch.zeros(8, 36, dtype=torch.bfloat16))  # row stride 72 B
    assert k._tma_ok(cpu, torch.zeros(8, 36, dtype=torch.float32))  # 144 B
    assert not k._tma_ok(cpu, torch.zeros(64, 8, dtype=torch.bfloat16).T)  # column stride 8
    assert not k._tma_ok(cpu, torch.zeros(1, 64, dtype=torch.bfloat16).expand(8, 64))  # row stride 0
    assert not k._tma_ok(cpu, torch.zeros(8, 72, dtype=torch.bfloat16)[:, 1:65])  # base 2 B off
    assert not k._tma_ok(cpu, torch.zeros(0, 64, dtype=torch.bfloat16))
    monkeypatch.setattr(k, "_CPU_CAPABILITY", 80)
    assert not k._tma_ok(cpu, base)
    monkeypatch.setattr(k, "_CPU_CAPABILITY", 90)
    monkeypatch.setattr(k, "USE_TMA", False)
    assert not k._tma_ok(cpu, base)


# ----------------------------------------------------------------------------------------------------
# dropout: the in-kernel hash equals dropout_keep_mask_ref bit for bit, forward and backward
# ----------------------------------------------------------------------------------------------------
@pytest.mark.triton
@pytest.mark.parametrize("seed", [0, 77, 2**40 + 3, -5])
def test_dropout_mask_is_the_shared_hash(seed):
    """Read the kernels' masks out exactly: forward with A = I gives S = drop(ones); backward with
    W = 0, B = A = dY = 1 gives dx = drop'(1). Both must equal dropout_keep_mask_ref / (1 - p)."""
    k = _kernels()
    p, m, d = 0.3, 37, 100
    keep = dropout_keep_mask_ref(m * d, p, seed).view(m, d)
    expected = keep.to(torch.float32) * torch.tensor(1.0 / (1.0 - p), dtype=torch.float32)
    assert 0 < keep.sum() < keep.numel()

    ones = torch.ones(m, d)
    eye = torch.eye(d)
    _, s, _ = k.cflora_fwd(ones, torch.zeros(1, d), None, eye, torch.zeros(1, d), None, 1, 1.0, p, seed)
    assert torch.equal(s != 0, keep), "forward mask differs from dropout_keep_mask_ref"
    assert torch.equal(s, expected)

    a, b = torch.ones(1, d), torch.ones(1, 1)
    s1, t1 = torch.zeros(m, 1), torch.zeros(m, 1)
    dx, *_ = k.cflora_bwd(
        torch.ones(m, 1),
        ones,
        torch.zeros(1, d),
        a,
        b,
        None,
        s1,
        t1,
        1,
        1.0,
        p,
        seed,
        [True, False, False, False, False, False],
    )
    assert torch.equal(dx != 0, keep), "backward mask differs from dropout_keep_mask_ref"
    assert torch.equal(dx, expected)


@pytest.mark.triton
def test_dropout_is_deterministic_per_seed_and_p0_is_plain():
    k = _kernels()
    inputs = make_inputs(4, torch.float32, "shared", True)
    y1, s1, _ = k.cflora_fwd(*inputs, TOKENS, 1.0, 0.1, 42)
    y2, s2, _ = k.cflora_fwd(*inputs, TOKENS, 1.0, 0.1, 42)
    y3, _, _ = k.cflora_fwd(*inputs, TOKENS, 1.0, 0.1, 43)
    y0, s0, _ = k.cflora_fwd(*inputs, TOKENS, 1.0, 0.0, None)
    assert torch.equal(y1, y2) and torch.equal(s1, s2)
    assert not torch.equal(y1, y3)
    assert not torch.equal(s1, s0)
    check(s0, st_oracle(inputs[0], inputs[3], inputs[5], TOKENS, 0.0, None)[0], torch.float32, "S")


# ----------------------------------------------------------------------------------------------------
# bad inputs
# ----------------------------------------------------------------------------------------------------
@pytest.mark.triton
def test_launcher_rejects_bad_inputs():
    k = _kernels()
    x, w, b, a, lb, c = make_inputs(4, torch.float32, "per_sample", True)
    with pytest.raises(ValueError, match="rows_per_sample"):
        k.cflora_fwd(x, w, b, a, lb, c, TOKENS + 1, 1.0, 0.0, None)
    with pytest.raises(ValueError, match="lora_a"):
        k.cflora_fwd(x, w, b, a[:, :-1], lb, c, TOKENS, 1.0, 0.0, None)
    with pytest.raises(ValueError, match="lora_b"):
        k.cflora_fwd(x, w, b, a, lb[:, :-1], c, TOKENS, 1.0, 0.0, None)
    with pytest.raises(ValueError, match="interaction"):
        k.cflora_fwd(x, w, b, a, lb, c[:, :-1], TOKENS, 1.0, 0.0, None)
    with pytest.raises(ValueError, match="seed"):
        k.cflora_fwd(x, w, b, a, lb, c, TOKENS, 1.0, 0.2, None)
    with pytest.raises(ValueError, match="dropout_p"):
        k.cflora_fwd(x, w, b, a, lb, c, TOKENS, 1.0, 1.0, 1)
    with pytest.raises(TypeError, match="float64"):
        k.cflora_fwd(x, w.double(), b, a, lb, c, TOKENS, 1.0, 0.0, None)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        k.cflora_fwd(x.double(), w, b, a, lb, c, TOKENS, 1.0, 0.0, None)
    big = torch.randn(k.MAX_RANK + 1, x.shape[1])
    with pytest.raises(ValueError, match="rank"):
        k.cflora_fwd(x, w, b, big, torch.randn(w.shape[0], k.MAX_RANK + 1), None, TOKENS, 1.0, 0.0, None)
    y, s, t = k.cflora_fwd(x, w, b, a, lb, c, TOKENS, 1.0, 0.0, None)
    with pytest.raises(ValueError, match="needs_grad"):
        k.cflora_bwd(torch.ones_like(y), x, w, a, lb, c, s, t, TOKENS, 1.0, 0.0, None, [True] * 5)
    with pytest.raises(ValueError, match="grad_y"):
        k.cflora_bwd(torch.ones(3, 3), x, w, a, lb, c, s, t, TOKENS, 1.0, 0.0, None, [True] * 6)


# ----------------------------------------------------------------------------------------------------
# the public op: rellax_fast.ops.cflora_linear(..., backend="triton") with autograd
# ----------------------------------------------------------------------------------------------------
def _spy_launchers(monkeypatch):
    k = _kernels()
    calls = {"cflora_fwd": 0, "cflora_bwd": 0}
    for name in calls:
        real = getattr(k, name)

        def spy(*args, _real=real, _name=name):
            calls[_name] += 1
            return _real(*args)

        monkeypatch.setattr(k, name, spy)
    return calls


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("c_kind", ["none", "shared", "per_sample"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_cflora_linear_triton_backend_autograd(monkeypatch, dtype, c_kind, dropout_p):
    from rellax_fast.ops import cflora_linear, cflora_linear_ref

    calls = _spy_launchers(monkeypatch)
    r, scale, seed = 4, 0.5, 2024
    x, weight, bias, lora_a, lora_b, c = make_inputs(r, dtype, c_kind, True)
    x = x.view(N_SAMPLES, TOKENS, D_IN)
    train_base = c_kind == "shared"  # also differentiate W and b in one setting
    leaves = {"x": x, "weight": weight, "bias": bias, "lora_a": lora_a, "lora_b": lora_b, "interaction": c}
    wants_grad = {
        name: t is not None and (train_base or name not in ("weight", "bias")) for name, t in leaves.items()
    }
    ours = {n: t.clone().requires_grad_(wants_grad[n]) if t is not None else None for n, t in leaves.items()}
    refs = {n: t.double().requires_grad_(wants_grad[n]) if t is not None else None for n, t in leaves.items()}

    y = cflora_linear(*ours.values(), scale=scale, dropout_p=dropout_p, seed=seed, backend="triton")
    y_ref = cflora_linear_ref(*refs.values(), scale=scale, dropout_p=dropout_p, seed=seed)
    assert y.shape == (N_SAMPLES, TOKENS, D_OUT) and y.dtype == dtype
    check(y, y_ref, dtype, "y")
    grad_y = torch.randn(y.shape, dtype=torch.float64).to(dtype)
    y.backward(grad_y)
    y_ref.backward(grad_y.double())
    assert calls == {"cflora_fwd": 1, "cflora_bwd": 1}, f"the triton launchers were not used: {calls}"
    for name, t in ours.items():
        if t is None:
            continue
        if not wants_grad[name]:
            assert t.grad is None
            continue
        assert t.grad is not None and t.grad.dtype == dtype, f"d{name} missing"
        check(t.grad, refs[name].grad, dtype, f"d{name}", grad_scale(name, dtype, N_SAMPLES * TOKENS))


@pytest.mark.triton
def test_cflora_linear_triton_per_sample_2d_x_and_seed_reproducibility():
    from rellax_fast.ops import cflora_linear, cflora_linear_ref

    n, r = 11, 16
    x, weight, bias, lora_a, lora_b, c = make_inputs(r, torch.float32, "per_sample", False, m=n, n_samples=n)
    lora_a.requires_grad_(True)
    y1 = cflora_linear(x, weight, bias, lora_a, lora_b, c, scale=1.0, dropout_p=0.2, seed=8, backend="triton")
    y2 = cflora_linear(x, weight, bias, lora_a, lora_b, c, scale=1.0, dropout_p=0.2, seed=8, backend="triton")
    assert torch.equal(y1, y2)
    (g1,) = torch.autograd.grad(y1.sum(), lora_a)
    (g2,) = torch.autograd.grad(y2.sum(), lora_a)
    assert torch.equal(g1, g2)
    a64 = lora_a.detach().double().requires_grad_(True)
    y_ref = cflora_linear_ref(
        x.double(), weight.double(), None, a64, lora_b.double(), c.double(), scale=1.0, dropout_p=0.2, seed=8
    )
    (g_ref,) = torch.autograd.grad(y_ref.sum(), a64)
    check(y1, y_ref, torch.float32, "y")
    check(g1, g_ref, torch.float32, "dlora_a")


# ----------------------------------------------------------------------------------------------------
# decode (one row per sample, per-sample C), strided / expanded views. (The ahead-of-time compile checks
# for sm_90a / sm_80 live in test_triton_compile_gate.py.)
# ----------------------------------------------------------------------------------------------------
@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("r", [12, 128])
def test_decode_one_row_per_sample_per_sample_c(dtype, r):
    """rows_per_sample = 1 with 37 samples: every row its own C (the per-sample kernels run one program per
    sample; at r = 128 the backward runs dC and dS as two passes); forward and every gradient vs float64."""
    k = _kernels()
    n, scale, p, seed = 37, 0.5, 0.1, 21
    inputs = make_inputs(r, dtype, "per_sample", True, m=n, n_samples=n)
    grad_y = torch.randn(n, D_OUT, dtype=torch.float64).to(dtype)
    y_ref, s_ref, t_ref, grads_ref = oracle_grads(inputs, grad_y, 1, scale, p, seed)
    y, s, t = k.cflora_fwd(*inputs, 1, scale, p, seed)
    check(s, s_ref, dtype, "S")
    check(t, t_ref, dtype, "T")
    check(y, y_ref, dtype, "y")
    x, weight, bias, lora_a, lora_b, c = inputs
    grads = k.cflora_bwd(grad_y, x, weight, lora_a, lora_b, c, s, t, 1, scale, p, seed, [True] * 6)
    for name, got, want in zip(GRAD_NAMES, grads, grads_ref):
        check(got, want, dtype, f"d{name}", grad_scale(name, dtype, n))


def _strided(t, kind):
    """The same values as ``t`` in a non-contiguous layout: a transposed copy viewed back (1-D: a slice),
    or every other element of a wider buffer (stride 2 in the last dim)."""
    if kind == "transposed" and t.dim() > 1:
        return t.T.contiguous().T if t.dim() == 2 else t.transpose(-1, -2).contiguous().transpose(-1, -2)
    padded = torch.zeros(*t.shape[:-1], 2 * t.shape[-1] + 1, dtype=t.dtype)
    padded[..., 1::2] = t
    return padded[..., 1::2]  # every other column: stride 2 in the last dim


@pytest.mark.triton
@pytest.mark.parametrize("kind", ["transposed", "sliced"])
@pytest.mark.parametrize("c_kind", ["shared", "per_sample", "expanded"])
def test_strided_and_expanded_views_match_oracle(kind, c_kind):
    """Every input (x, W, b, A, B, C, dY, S, T) as a strided view; C also as an expanded (stride 0) view."""
    k = _kernels()
    dtype, r, scale, p, seed = torch.float32, 6, 0.75, 0.1, 4
    base_kind = "shared" if c_kind == "expanded" else c_kind
    inputs = list(make_inputs(r, dtype, base_kind, True))
    if c_kind == "expanded":
        inputs[5] = inputs[5].expand(N_SAMPLES, r, r)  # stride (0, r, 1): one C shared as per-sample
    m = inputs[0].shape[0]
    grad_y = torch.randn(m, D_OUT, dtype=torch.float64).to(dtype)
    y_ref, s_ref, t_ref, grads_ref = oracle_grads(
        [t.contiguous() if t is not None else None for t in inputs], grad_y, TOKENS, scale, p, seed
    )
    views = [
        None if t is None else (t if (c_kind == "expanded" and i == 5) else _strided(t, kind))
        for i, t in enumerate(inputs)
    ]
    assert all(v is None or not v.is_contiguous() for v in views)
    y, s, t = k.cflora_fwd(*views, TOKENS, scale, p, seed)
    check(y, y_ref, dtype, "y")
    check(t, t_ref, dtype, "T")
    x, weight, bias, lora_a, lora_b, c = views
    grads = k.cflora_bwd(
        _strided(grad_y, kind),
        x,
        weight,
        lora_a,
        lora_b,
        c,
        _strided(s, kind),
        _strided(t, kind),
        TOKENS,
        scale,
        p,
        seed,
        [True] * 6,
    )
    for name, got, want in zip(GRAD_NAMES, grads, grads_ref):  # an expanded C gets a per-sample dC
        check(got, want, dtype, f"d{name}", grad_scale(name, dtype, m))


# ----------------------------------------------------------------------------------------------------
# GPU: the compiled kernels (bf16 tensor cores, GPU block sizes) on CUDA tensors
# ----------------------------------------------------------------------------------------------------
# Reductions here run 500-1000 terms deep and fp32 atomics add in any order, so the table's per-dtype
# tolerance is doubled; the interpreter tests above use the table as is.
GPU_WIDEN = 2.0


def _cuda_case(
    dtype,
    c_kind,
    dropout_p,
    r=16,
    n_samples=4,
    tokens=77,
    d_in=1000,
    d_out=520,
    device="cuda",
    tol_dtype=None,
):
    """The compiled kernels on ``device`` vs the float64 oracle (CPU), forward and every gradient."""
    k = _kernels()
    tol_dtype = tol_dtype or dtype
    m = n_samples * tokens
    scale, seed = 0.5, 11
    inputs = make_inputs(r, dtype, c_kind, True, m=m, d_in=d_in, d_out=d_out, n_samples=n_samples)
    grad_y = torch.randn(m, d_out, dtype=torch.float64).to(dtype)
    y_ref, s_ref, t_ref, grads_ref = oracle_grads(inputs, grad_y, tokens, scale, dropout_p, seed)
    dev = [None if t is None else t.to(device) for t in inputs]
    y, s, t = k.cflora_fwd(*dev, tokens, scale, dropout_p, seed)
    x, weight, bias, lora_a, lora_b, c = dev
    grads = k.cflora_bwd(
        grad_y.to(device),
        x,
        weight,
        lora_a,
        lora_b,
        c,
        s,
        t,
        tokens,
        scale,
        dropout_p,
        seed,
        [True, True, True, True, True, c is not None],
    )
    torch.cuda.synchronize(device)
    assert y.device.type == torch.device(device).type  # "cuda" vs "cuda:0": compare the kind
    check(y, y_ref, tol_dtype, "y", GPU_WIDEN)
    check(t, t_ref, tol_dtype, "T", GPU_WIDEN)
    for name, got, want in zip(GRAD_NAMES, grads, grads_ref):
        if want is None:
            assert got is None
        else:
            assert torch.isfinite(got).all(), f"d{name} not finite"
            check(got, want, tol_dtype, f"d{name}", GPU_WIDEN * grad_scale(name, dtype, m))
            rel = ((got.double().cpu() - want).norm() / want.norm()).item()
            assert rel < TOLERANCES[tol_dtype][0] / 2, f"d{name}: relative error norm {rel:.2e}"


def _need_cuda(n=1):
    if not torch.cuda.is_available() or torch.cuda.device_count() < n:
        pytest.skip(f"needs {n} CUDA GPU(s) (run by scripts/gpu_check.sh)")


@pytest.mark.cuda
@pytest.mark.parametrize("tf32", [False, True], ids=["3xtf32", "tf32"])
@pytest.mark.parametrize("c_kind", ["shared", "per_sample"])
def test_triton_on_cuda_fp32_rank128(monkeypatch, tf32, c_kind):
    """fp32 at r = 128: 3xTF32 (torch's default) at fp32 tolerance, TF32 (allowed) at fp16's (10-bit mantissa)."""
    _need_cuda()
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", tf32)
    _cuda_case(
        torch.float32,
        c_kind,
        0.1,
        r=128,
        n_samples=3,
        tokens=50,
        d_in=520,
        d_out=264,
        tol_dtype=torch.float16 if tf32 else torch.float32,
    )


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("r", [16, 128])
def test_triton_on_cuda_decode_per_sample_c(dtype, r):
    """Decode: one row per sample (rows_per_sample = 1), each with its own C."""
    _need_cuda()
    _cuda_case(dtype, "per_sample", 0.0, r=r, n_samples=67, tokens=1)


@pytest.mark.cuda
def test_triton_on_cuda_tensors_on_second_device():
    """Tensors on cuda:1 while cuda:0 is current: the launches must run on the tensors' device."""
    _need_cuda(2)
    torch.cuda.set_device(0)
    _cuda_case(torch.bfloat16, "per_sample", 0.1, device="cuda:1")
    assert torch.cuda.current_device() == 0, "the device guard must restore the current device"


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("c_kind", ["none", "per_sample"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_triton_on_cuda_matches_oracle(dtype, c_kind, dropout_p):
    _need_cuda()
    _cuda_case(dtype, c_kind, dropout_p)  # several blocks in every dimension


@pytest.mark.cuda
@pytest.mark.parametrize("use_tma", [True, False], ids=["tma", "pointers"])
@pytest.mark.parametrize("d_in", [1000, 1001], ids=["aligned_rows", "unaligned_rows"])
def test_triton_on_cuda_tma_gemms(monkeypatch, use_tma, d_in):
    """On sm_90+ the forward and dx GEMMs take TMA exactly where _tma_ok allows it (rows of 1,000 bf16 are
    16-byte aligned, 1,001 are not; USE_TMA = False forces the pointer GEMMs), and every path matches the
    float64 oracle; several tiles per persistent program (M = 4 x 77 rows, d_out = 520)."""
    _need_cuda()
    k = _kernels()
    monkeypatch.setattr(k, "USE_TMA", use_tma)
    used, _ = _spy_gemm_paths(monkeypatch, k)
    _cuda_case(torch.bfloat16, "per_sample", 0.1, d_in=d_in)
    tma = use_tma and d_in == 1000 and torch.cuda.get_device_capability()[0] >= 9
    assert used == (["_launch_fwd_gemm_tma", "_launch_dx_tma"] if tma else []), used
