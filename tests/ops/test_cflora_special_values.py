"""cflora_linear on NaN/Inf inputs and degenerate scales: every backend follows the reference's IEEE semantics.

The semantics (cflora_linear's docstring): ``y = (x Wᵀ + b) + scale·P`` with the rank-r product
``P = ((drop(x) Aᵀ) Cᵀ) Bᵀ`` finished before ``scale`` multiplies it, the backward starting from
``dP = scale·dY``, and dropout a select (a dropped Inf/NaN is exactly 0 on the LoRA path). Each case puts
a few non-finite values into one input (or uses scale 0 / ±Inf / NaN) and compares the backend's output
and every gradient with the float64 reference on the same values: NaN at the same places, ±Inf equal,
finite values within the float32 tolerance. The cases are shared by every backend: reference and cpp in the
normal pass, triton under TRITON_INTERPRET=1, cuda (and triton compiled) on a GPU.
"""

from __future__ import annotations

import math

import pytest
import torch
from rellax_testing import tol

from rellax_fast.ops.cflora import cflora_linear, cflora_linear_ref

INF, NAN = math.inf, math.nan
N_SAMPLES, TOKENS, D_IN, D_OUT, R = 2, 3, 10, 6, 3
NAMES = ("x", "weight", "bias", "lora_a", "lora_b", "interaction")

# (id, {input name: [(index, value), ...]}, scale, dropout_p, interaction kind)
CASES = [
    ("x_inf_nan", {"x": [((0, 1, 3), INF), ((1, 2, 7), NAN)]}, 0.5, 0.0, "per"),
    # with dropout some of these are dropped (exactly 0 on the LoRA path) and some kept; the base path sees all
    (
        "x_inf_nan_dropout",
        {"x": [((0, t, k), (INF, -INF, NAN)[(t + k) % 3]) for t in range(3) for k in range(0, 10, 2)]},
        0.5,
        0.5,
        "per",
    ),
    ("weight_inf", {"weight": [((2, 4), INF), ((5, 0), -INF)]}, 0.5, 0.0, "shared"),
    ("weight_nan_dropout", {"weight": [((1, 1), NAN)]}, 0.5, 0.3, None),
    ("bias_inf_nan", {"bias": [((0,), INF), ((3,), NAN)]}, 0.5, 0.0, "per"),
    ("lora_a_inf", {"lora_a": [((1, 5), INF)]}, 0.5, 0.3, "per"),
    ("lora_a_nan", {"lora_a": [((0, 2), NAN)]}, 0.5, 0.0, None),
    ("lora_b_inf", {"lora_b": [((1, 2), INF), ((4, 0), -INF)]}, 0.5, 0.0, "shared"),
    ("lora_b_nan", {"lora_b": [((3, 1), NAN)]}, 0.5, 0.3, "per"),
    ("interaction_nan_one_sample", {"interaction": [((1, 0, 2), NAN)]}, 0.5, 0.0, "per"),
    ("interaction_inf_shared", {"interaction": [((2, 1), INF)]}, 0.5, 0.3, "shared"),
    # degenerate scales: 0 does not hide a non-finite P; ±Inf gives ±Inf (NaN where P = 0); NaN poisons all
    ("scale0_lora_b_inf", {"lora_b": [((1, 2), INF)]}, 0.0, 0.0, "per"),
    ("scale0_x_inf_dropout", {"x": [((0, 1, 3), INF), ((1, 0, 0), -INF)]}, 0.0, 0.3, "shared"),
    ("scale0_finite", {}, 0.0, 0.3, "per"),
    ("scale_inf", {}, INF, 0.0, "per"),
    ("scale_neg_inf_dropout", {}, -INF, 0.3, None),
    ("scale_inf_lora_b_zero_column", {"lora_b": [((2, j), 0.0) for j in range(R)]}, INF, 0.0, "shared"),
    ("scale_nan", {}, NAN, 0.0, "shared"),
]


def make_inputs(c_kind, changes, device="cpu"):
    g = torch.Generator().manual_seed(17)

    def rnd(*shape, std=1.0):
        # values bounded away from 0, so that no product of a finite value and an Inf is 0·Inf by chance
        t = torch.randn(*shape, generator=g, dtype=torch.float64)
        return (t.sign() + (t.sign() == 0).double()) * (t.abs() + 0.25) * std

    x = rnd(N_SAMPLES, TOKENS, D_IN)
    tensors = {
        "x": x,
        "weight": rnd(D_OUT, D_IN, std=D_IN**-0.5),
        "bias": rnd(D_OUT),
        "lora_a": rnd(R, D_IN, std=D_IN**-0.5),
        "lora_b": rnd(D_OUT, R, std=R**-0.5),
        "interaction": None
        if c_kind is None
        else rnd(*((N_SAMPLES, R, R) if c_kind == "per" else (R, R)), std=R**-0.5),
    }
    for name, entries in changes.items():
        for index, value in entries:
            tensors[name][index] = value
    return [None if tensors[n] is None else tensors[n].to(device) for n in NAMES]


def forward_and_grads(inputs, dtype, backend, grad_out, **kw):
    leaves = [None if t is None else t.detach().to(dtype).requires_grad_() for t in inputs]
    if backend == "oracle":
        y = cflora_linear_ref(*leaves, **kw)
    else:
        y = cflora_linear(*leaves, backend=backend, **kw)
    present = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(y, present, grad_out.to(dtype)))
    return y, [None if t is None else next(grads) for t in leaves]


def assert_same_ieee(got, want, msg):
    """NaN at the same places, ±Inf equal, finite values within the float32 tolerance."""
    rtol, atol = tol(torch.float32)
    torch.testing.assert_close(
        got.detach().double().cpu(),
        want.detach().cpu(),
        rtol=rtol * 4,
        atol=atol * 4,
        equal_nan=True,
        msg=msg,
    )


_GPU = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
BACKENDS = [  # (backend, device)
    pytest.param("reference", "cpu", id="reference"),
    pytest.param("cpp", "cpu", id="cpp"),
    pytest.param("triton", "cpu", id="triton-interpreted", marks=pytest.mark.triton),
    pytest.param("cuda", "cuda", id="cuda", marks=_GPU),
    pytest.param("triton", "cuda", id="triton-cuda", marks=_GPU),
]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("case,changes,scale,p,c_kind", CASES, ids=[c[0] for c in CASES])
def test_special_values_follow_the_reference(backend, device, case, changes, scale, p, c_kind):
    inputs = make_inputs(c_kind, changes, device)
    kw = dict(scale=scale, dropout_p=p, seed=2024)
    grad_out = torch.randn(
        N_SAMPLES, TOKENS, D_OUT, generator=torch.Generator().manual_seed(5), dtype=torch.float64
    ).to(device)
    y_ref, g_ref = forward_and_grads(inputs, torch.float64, "oracle", grad_out, **kw)
    y, g = forward_and_grads(inputs, torch.float32, backend, grad_out, **kw)
    # the case means something: its output has non-finite entries (but the finite control's)
    assert torch.isfinite(y_ref).all() == (case == "scale0_finite"), case
    assert_same_ieee(y, y_ref, f"{backend} {case}: output")
    for name, got, want in zip(NAMES, g, g_ref):
        if want is not None:
            assert_same_ieee(got, want, f"{backend} {case}: grad {name}")


def test_documented_semantics_by_hand():
    """The reference itself against the formula of the docstring, on the cases the issue reported."""
    x, w, b, a, lb, _ = make_inputs(None, {"lora_b": [((1, 2), INF)]})
    y = cflora_linear_ref(x, w, b, a, lb, None, scale=0.0)
    base = x @ w.T + b
    assert torch.isnan(y[..., 1]).all()  # 0·Inf: the Inf in lora_b's row 1 makes output column 1 NaN
    torch.testing.assert_close(y[..., [0, 2, 3, 4, 5]], base[..., [0, 2, 3, 4, 5]])
    x, w, b, a, lb, _ = make_inputs(None, {})
    p = (x @ a.T) @ lb.T
    y = cflora_linear_ref(x, w, b, a, lb, None, scale=INF)
    assert torch.equal(y, torch.where(p > 0, INF, -INF).double())
    # a dropped Inf is exactly 0 (a select), a kept one is Inf / (1 - p)
    from rellax_fast.ops.dropout import dropout_keep_mask_ref, seeded_dropout_ref

    x_inf = x.clone()
    x_inf[0, 0, :] = INF
    keep = dropout_keep_mask_ref(x.numel(), 0.5, 3).view(x.shape)
    assert keep[0, 0].any() and not keep[0, 0].all(), "pick a seed that keeps some of x[0, 0] and drops some"
    dropped = seeded_dropout_ref(x_inf, 0.5, 3)
    assert torch.equal(dropped[0, 0], torch.where(keep[0, 0], INF, 0.0).double())
