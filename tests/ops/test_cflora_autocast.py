"""cflora_linear under torch.autocast: the policy of F.linear on every backend, against a float64 oracle.

Policy (cflora_linear's docstring): inside autocast for x's device type, the floating-point tensor arguments
(float64 excepted) are cast to the autocast dtype, the op computes and returns that dtype, and gradients flow
back through the casts to the float32 parameters, in float32. The oracle is the float64 reference on the
inputs rounded to the autocast dtype (what the op computes from); gradients are compared with the tolerance
of the autocast dtype. reference and cpp run in the normal pass, triton under TRITON_INTERPRET=1, and the
`cuda`-marked cases on a GPU (CUDA autocast, for the cuda, triton and reference backends).
"""

from __future__ import annotations

import math

import pytest
import torch
from rellax_testing import assert_close

from rellax_fast.ops.cflora import cflora_linear, cflora_linear_ref

N_SAMPLES, TOKENS, D_IN, D_OUT = 3, 5, 40, 24
NAMES = ("x", "weight", "bias", "lora_a", "lora_b", "interaction")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def make_params(r, c_kind, device, x_dtype=torch.float32, seed=0):
    """float32 leaves as a training loop holds them (frozen weight and bias; x may come in lower precision)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * std).float().to(device)

    x = rnd(N_SAMPLES, TOKENS, D_IN).to(x_dtype).requires_grad_()
    weight, bias = rnd(D_OUT, D_IN, std=D_IN**-0.5), rnd(D_OUT)
    lora_a = rnd(r, D_IN, std=D_IN**-0.5).requires_grad_()
    lora_b = rnd(D_OUT, r, std=r**-0.5).requires_grad_()
    c = {None: None, "shared": rnd(r, r, std=r**-0.5), "per": rnd(N_SAMPLES, r, r, std=r**-0.5)}[c_kind]
    return [x, weight, bias, lora_a, lora_b, None if c is None else c.requires_grad_()]


def check_autocast(backend, device_type, dtype, c_kind, p, x_dtype=torch.float32):
    inputs = make_params(8, c_kind, device_type, x_dtype)
    grad_out = torch.randn(
        N_SAMPLES, TOKENS, D_OUT, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    ).to(device_type)
    kw = dict(scale=0.75, dropout_p=p, seed=321)
    with torch.autocast(device_type, dtype=dtype):
        y = cflora_linear(*inputs, backend=backend, **kw)
    assert y.dtype == dtype, f"{backend}: output {y.dtype}, autocast dtype {dtype}"
    want = [t for t in inputs if t is not None and t.requires_grad]
    got = dict(
        zip(
            [n for n, t in zip(NAMES, inputs) if t is not None and t.requires_grad],
            torch.autograd.grad(y, want, grad_out.to(dtype)),
        )
    )

    # oracle: float64 on the inputs the op computes from (rounded to the autocast dtype)
    rounded = [
        None if t is None else t.detach().to(dtype).double().requires_grad_(t.requires_grad) for t in inputs
    ]
    y_ref = cflora_linear_ref(*rounded, **kw)
    ref_grads = torch.autograd.grad(
        y_ref, [t for t in rounded if t is not None and t.requires_grad], grad_out
    )
    ref = dict(zip(got, ref_grads))
    assert_close(y, y_ref, dtype, msg=f"{backend} autocast {dtype} forward")
    for name, g in got.items():
        leaf = inputs[NAMES.index(name)]
        assert g.dtype == leaf.dtype, f"grad {name} is {g.dtype}; its leaf is {leaf.dtype}"
        assert_close(
            g, ref[name], dtype, scale=math.sqrt(N_SAMPLES * TOKENS), msg=f"{backend} autocast grad {name}"
        )


CPU_BACKENDS = ["reference", "cpp", pytest.param("triton", marks=pytest.mark.triton)]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("c_kind,p", [(None, 0.0), ("per", 0.2), ("shared", 0.1)])
def test_cpu_autocast_matches_float64(backend, dtype, c_kind, p):
    check_autocast(backend, "cpu", dtype, c_kind, p)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_cpu_autocast_with_low_precision_activations(backend):
    """Inside an autocast model, x arrives in bf16 (a previous layer's output) while the weights stay fp32."""
    check_autocast(backend, "cpu", torch.bfloat16, "per", 0.2, x_dtype=torch.bfloat16)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_outside_autocast_mixed_dtypes_still_raise(backend):
    x, w, b, a, lb, c = make_params(4, "per", "cpu", torch.bfloat16)
    with pytest.raises(TypeError, match=r"weight must have x's dtype torch.bfloat16; got torch.float32"):
        cflora_linear(x, w, b, a, lb, c, backend=backend)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        with pytest.raises(TypeError, match="weight must have x's dtype"):
            cflora_linear(x, w, b, a, lb, c, backend=backend)


def test_autocast_for_another_device_type_does_not_cast():
    """CUDA autocast leaves CPU tensors alone (as F.linear does): float32 in, float32 out."""
    inputs = make_params(4, None, "cpu")
    with torch.autocast("cuda", dtype=torch.float16, enabled=torch.cuda.is_available()):
        y = cflora_linear(*inputs, backend="cpp")
    assert y.dtype == torch.float32


def test_autocast_matches_f_linear_policy_with_zero_adapter():
    """With lora_b = 0 the op is the base linear: under autocast it must equal F.linear's autocast result."""
    x, w, b, a, lb, c = make_params(4, "per", "cpu")
    with torch.no_grad():
        lb.zero_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = cflora_linear(x, w, b, a, lb, c, backend="cpp")
        want = torch.nn.functional.linear(x, w, b)
    assert got.dtype == want.dtype == torch.bfloat16
    assert_close(got, want.double(), torch.bfloat16)


def test_compiled_under_autocast_matches_eager():
    """torch.compile(fullgraph=True) of a CFLoRA call inside autocast: same dtype and values as eager."""
    import torch._dynamo

    x, w, b, a, lb, c = make_params(4, "per", "cpu")

    def f(x, a, lb):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return cflora_linear(x, w, b, a, lb, c, dropout_p=0.2, seed=5, backend="cpp")

    torch._dynamo.reset()
    eager = f(x, a, lb)
    got = torch.compile(f, backend="aot_eager", fullgraph=True)(x, a, lb)
    assert got.dtype == eager.dtype == torch.bfloat16
    torch.testing.assert_close(got, eager)


# ------------------------------------------------------------------------------------------------------------
# GPU (scripts/gpu_check.sh)
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("backend", ["cuda", "triton", "reference"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("c_kind,p", [(None, 0.0), ("per", 0.2)])
def test_cuda_autocast_matches_float64(backend, dtype, c_kind, p):
    check_autocast(backend, "cuda", dtype, c_kind, p)


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_autocast_with_low_precision_activations(backend):
    check_autocast(backend, "cuda", torch.bfloat16, "per", 0.2, x_dtype=torch.bfloat16)
