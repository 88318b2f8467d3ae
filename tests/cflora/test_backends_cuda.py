"""On a GPU (scripts/gpu_check.sh): the tiny Llama with "full" CFLoRA on the cuda and triton backends gives
the reference backend's logits and gradients, in float32 and bfloat16, with checkpointing and dropout."""

from __future__ import annotations

import pytest
import torch
from cflora_models import model_inputs, tiny_llama

from rellax_fast.cflora import CFLoRAConfig, cflora_condition, inject_cflora, set_cflora_backend

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_backend_matches_reference_in_a_model(backend, dtype):
    model = tiny_llama(initializer_range=0.1)
    inject_cflora(
        model,
        CFLoRAConfig(
            r=8,
            alpha=16,
            dropout=0.1,
            interaction="full",
            cond_dim=5,
            target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
            init_lora="random",
            generator_init_std=0.2,
        ),
    )
    model = model.to("cuda", dtype).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    inputs = {k: v.cuda() for k, v in model_inputs(batch=4, seq=33).items()}
    cond = torch.randn(4, 5, device="cuda")

    def run(which):
        set_cflora_backend(model, which)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(7)  # the same dropout seed for both backends
        with cflora_condition(model, cond):
            out = model(**inputs, labels=inputs["input_ids"])
        out.loss.backward()
        grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}
        return out.logits.float().detach(), grads

    logits_ref, grads_ref = run("reference")
    logits_got, grads_got = run(backend)
    tol = {"rtol": 2e-3, "atol": 2e-3} if dtype == torch.float32 else {"rtol": 8e-2, "atol": 8e-2}
    torch.testing.assert_close(logits_got, logits_ref, **tol)
    for name, g in grads_ref.items():
        scale = g.abs().max().clamp_min(1e-6)
        torch.testing.assert_close(grads_got[name] / scale, g / scale, **tol, msg=name)


# ------------------------------------------------------------------------------------------------------------
# the CUDA C++ op on its own: cuBLAS shrink vs float64, fp64 dropout, non-zero device, poisoned allocations
# ------------------------------------------------------------------------------------------------------------


def _cuda_ext_ready() -> bool:
    from rellax_fast.ops._backend import why_unavailable

    return torch.cuda.is_available() and why_unavailable("cuda", "cuda", "cflora_linear") is None


needs_cuda_ext = pytest.mark.skipif(
    not _cuda_ext_ready(), reason="needs a CUDA GPU and rellax_fast._C built with CUDA"
)
needs_two_gpus = pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="needs two CUDA GPUs (tensors on cuda:1 while cuda:0 is current)"
)
GPU_TOL = {
    torch.float64: 1e-10,
    torch.float32: 2e-4,
    torch.bfloat16: 4e-2,
}  # relative to each tensor's max |value|


def _inputs(dtype, r, c_kind, x_shape, d_out=72, device="cuda", seed=0):
    """Fresh random CFLoRA inputs (float64 drawn on the CPU, then cast and moved), all requiring grad."""
    import math

    gen = torch.Generator().manual_seed(seed)
    d_in = x_shape[-1]
    x = torch.randn(*x_shape, generator=gen, dtype=torch.float64)
    weight = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64) / math.sqrt(d_in)
    bias = torch.randn(d_out, generator=gen, dtype=torch.float64)
    lora_a = torch.randn(r, d_in, generator=gen, dtype=torch.float64) / math.sqrt(d_in)
    lora_b = torch.randn(d_out, r, generator=gen, dtype=torch.float64) / math.sqrt(r)
    c = None
    if c_kind == "shared":
        c = torch.randn(r, r, generator=gen, dtype=torch.float64) / math.sqrt(r) + torch.eye(
            r, dtype=torch.float64
        )
    elif c_kind == "per":
        c = torch.randn(x_shape[0], r, r, generator=gen, dtype=torch.float64) / math.sqrt(r) + torch.eye(
            r, dtype=torch.float64
        )
    return [
        None if t is None else t.to(device, dtype).requires_grad_(True)
        for t in (x, weight, bias, lora_a, lora_b, c)
    ]


def _forward_backward(inputs, backend, grad_y, **kw):
    from rellax_fast.ops import cflora_linear

    y = cflora_linear(*inputs, backend=backend, **kw)
    want = [t for t in inputs if t is not None]
    grads = torch.autograd.grad(y, want, grad_y.to(y.device, y.dtype))
    return y, grads


def _close(got, want, dtype, name):
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    scale = want.abs().max().clamp_min(1e-6)
    err = float(((got - want).abs() / scale).max())
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    assert err <= GPU_TOL[dtype], (
        f"{name}: max error {err:.3g} of the largest |value| (tolerance {GPU_TOL[dtype]})"
    )


def _check_against_float64(inputs, backend, dtype, **kw):
    cpu64 = [None if t is None else t.detach().double().cpu().requires_grad_(True) for t in inputs]
    grad_y = torch.randn(
        *inputs[0].shape[:-1],
        inputs[1].shape[0],
        dtype=torch.float64,
        generator=torch.Generator().manual_seed(3),
    )
    y_ref, g_ref = _forward_backward(cpu64, "reference", grad_y, **kw)
    y, g = _forward_backward(inputs, backend, grad_y, **kw)
    assert y.device == inputs[0].device and y.dtype == dtype
    _close(y, y_ref, dtype, "y")
    for i, (got, want) in enumerate(zip(g, g_ref)):
        assert got.device == inputs[0].device
        _close(got, want, dtype, f"grad {i}")


@needs_cuda_ext
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("r", [12, 128])
@pytest.mark.parametrize("c_kind", [None, "shared", "per"])
@pytest.mark.parametrize("x_shape", [(9, 1000), (5, 33, 1000)], ids=["decode-2d", "tokens-33"])
@pytest.mark.parametrize("p", [0.0, 0.15])
def test_cuda_cublas_shrink_matches_float64(dtype, r, c_kind, x_shape, p):
    """The shrink S = drop(x) Aᵀ now runs in cuBLAS and T = S Cᵀ in the row kernel (decode) or a batched GEMM:
    forward and all gradients against the float64 reference, odd d_in, r above the old 64 limit."""
    inputs = _inputs(dtype, r, c_kind, x_shape, seed=r)
    _check_against_float64(inputs, "cuda", dtype, scale=0.7, dropout_p=p, seed=11)


@needs_cuda_ext
def test_cuda_seeded_dropout_float64_is_exact():
    """fp64 dropout scales in double (at::acc_type): bit-identical to the float64 reference (a float scale was not)."""
    from rellax_fast.ops.dropout import seeded_dropout, seeded_dropout_ref

    x = torch.randn(4099, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 1e3 + 1.0 / 3.0
    for p in (0.1, 0.3, 0.77):
        got = seeded_dropout(x.cuda(), p, 1234, backend="cuda").cpu()
        want = seeded_dropout_ref(x, p, 1234)
        assert torch.equal(got, want), f"p={p}: max diff {float((got - want).abs().max()):.3g}"


@needs_cuda_ext
def test_cuda_every_output_element_written():
    """Fresh allocations NaN-poisoned (deterministic mode's fill): a missed output element would stay NaN."""
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
        for c_kind in (None, "shared", "per"):
            for x_shape in ((9, 257), (4, 6, 257)):
                inputs = _inputs(torch.float32, 16, c_kind, x_shape, seed=5)
                _check_against_float64(inputs, "cuda", torch.float32, dropout_p=0.2, seed=9)
    finally:
        torch.use_deterministic_algorithms(old_alg, warn_only=old_warn)
        det.fill_uninitialized_memory = old_fill


@needs_cuda_ext
@needs_two_gpus
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_tensors_on_second_gpu(backend):
    """Inputs on cuda:1 while cuda:0 is current: the kernels must run on cuda:1 (device guards) and match."""
    from rellax_fast.ops.dropout import seeded_dropout, seeded_dropout_ref

    with torch.cuda.device(0):
        inputs = _inputs(torch.float32, 16, "per", (3, 7, 100), device="cuda:1", seed=2)
        _check_against_float64(inputs, backend, torch.float32, dropout_p=0.1, seed=5)
        if backend == "cuda":
            x = torch.randn(1000, device="cuda:1")
            got = seeded_dropout(x, 0.25, 7, backend="cuda")
            assert got.device == x.device
            torch.testing.assert_close(got.cpu(), seeded_dropout_ref(x.cpu(), 0.25, 7), rtol=1e-6, atol=0)
        assert torch.cuda.current_device() == 0
