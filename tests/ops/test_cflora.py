"""cflora_linear: the cpp (and, on a GPU, cuda) backend against the float64 PyTorch reference.

Covers forward and every gradient (x, W, b, A, B, C) for C = None / (r, r) / (B, r, r), seeded dropout
(mask = shared hash, regenerated in the backward), odd sizes, three dtypes from one tolerance table,
NaN-poisoned fresh allocations, gradcheck, bad-input errors, torch.library.opcheck and
torch.compile(fullgraph=True). The Triton backend is tested in test_cflora_triton.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from rellax_testing import assert_close

from rellax_fast.ops import BackendUnavailableError
from rellax_fast.ops.cflora import cflora_linear, cflora_linear_ref
from rellax_fast.ops.dropout import dropout_keep_mask_ref

D_IN, D_OUT, T, B = 100, 36, 7, 3
GRAD_NAMES = ("x", "weight", "bias", "lora_a", "lora_b", "interaction")


def make_inputs(
    dtype=torch.float64,
    r=4,
    c_kind="per",
    bias=True,
    x_shape=(B, T, D_IN),
    d_out=D_OUT,
    device="cpu",
    requires_grad=True,
):
    """Fresh random inputs (no zeros anywhere; lora_b is non-zero unlike a fresh PEFT init)."""
    d_in = x_shape[-1]
    gen = dict(dtype=torch.float64, device=device)
    x = torch.randn(*x_shape, **gen)
    weight = torch.randn(d_out, d_in, **gen) / math.sqrt(d_in)
    b = torch.randn(d_out, **gen) if bias else None
    lora_a = torch.randn(r, d_in, **gen) / math.sqrt(d_in)
    lora_b = torch.randn(d_out, r, **gen) / math.sqrt(r)
    if c_kind is None:
        c = None
    elif c_kind == "shared":
        c = torch.randn(r, r, **gen) / math.sqrt(r) + torch.eye(r, **gen)
    else:
        c = torch.randn(x_shape[0], r, r, **gen) / math.sqrt(r) + torch.eye(r, **gen)
    tensors = [x, weight, b, lora_a, lora_b, c]
    out = []
    for t in tensors:
        if t is None:
            out.append(None)
        else:
            t = t.to(dtype)
            out.append(t.requires_grad_(requires_grad))
    return out


def run(inputs, backend, grad_out=None, **kw):
    """Output and the gradients of every input that requires grad (None elsewhere)."""
    y = cflora_linear(*inputs, backend=backend, **kw)
    if grad_out is None:
        return y, None
    want = [t for t in inputs if t is not None and t.requires_grad]
    grads = iter(torch.autograd.grad(y, want, grad_out.to(y.dtype)))
    return y, [next(grads) if (t is not None and t.requires_grad) else None for t in inputs]


def reference64(inputs, grad_out, **kw):
    up = [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in inputs]
    y = cflora_linear_ref(*up, **kw)
    want = [t for t in up if t is not None and t.requires_grad]
    grads = iter(torch.autograd.grad(y, want, grad_out.double()))
    return y, [next(grads) if (t is not None and t.requires_grad) else None for t in up]


def check_against_reference(inputs, backend, dtype, scale_tol=1.0, **kw):
    y_ref, g_ref = reference64(
        inputs,
        grad_out := torch.randn(
            *inputs[0].shape[:-1], inputs[1].shape[0], dtype=torch.float64, device=inputs[0].device
        ),
        **kw,
    )
    y, g = run(inputs, backend, grad_out, **kw)
    assert y.dtype == dtype and y.shape == y_ref.shape
    assert torch.isfinite(y).all()
    assert_close(y, y_ref, dtype, scale=scale_tol, msg=f"{backend} forward")
    for name, got, want in zip(GRAD_NAMES, g, g_ref):
        if want is None:
            assert got is None
            continue
        assert got is not None and got.shape == want.shape, name
        # gradients are reductions over M rows or d_out columns: widen by sqrt of the reduction length
        assert_close(
            got,
            want,
            dtype,
            scale=scale_tol * math.sqrt(max(inputs[0].numel() // inputs[0].shape[-1], 8)),
            msg=f"{backend} grad {name}",
        )


# ------------------------------------------------------------------------------------------------------------
# correctness against the float64 reference
# ------------------------------------------------------------------------------------------------------------

CASES = [  # (r, C kind, dropout_p, bias): every r, every C shape, dropout on/off and bias on/off all appear
    (1, None, 0.0, True),
    (1, "per", 0.1, False),
    (4, "shared", 0.0, False),
    (4, "per", 0.1, True),
    (8, None, 0.1, False),
    (8, "per", 0.0, True),
    (16, "shared", 0.1, True),
    (16, "per", 0.0, False),
    (64, "per", 0.1, True),
    (64, None, 0.0, True),
    (64, "shared", 0.1, False),
]


@pytest.mark.parametrize("r,c_kind,p,bias", CASES)
def test_cpp_matches_reference_float64(r, c_kind, p, bias):
    inputs = make_inputs(torch.float64, r, c_kind, bias)
    check_against_reference(inputs, "cpp", torch.float64, scale=0.7, dropout_p=p, seed=1234 + r)


@pytest.mark.parametrize("c_kind", [None, "shared", "per"])
def test_cpp_matches_reference_2d_and_1d_x(c_kind):
    # x (B, d_in): one row per sample
    inputs = make_inputs(torch.float64, 8, c_kind, True, x_shape=(5, D_IN))
    check_against_reference(inputs, "cpp", torch.float64, scale=2.0, dropout_p=0.1, seed=7)
    if c_kind != "per":  # x (d_in,) is one row; a per-sample C needs a batch
        inputs = make_inputs(torch.float64, 8, c_kind, False, x_shape=(D_IN,))
        check_against_reference(inputs, "cpp", torch.float64, dropout_p=0.1, seed=7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("c_kind,p", [(None, 0.0), ("per", 0.1)])
def test_low_precision_matches_float64(dtype, backend, c_kind, p):
    inputs = make_inputs(dtype, 16, c_kind, True)
    check_against_reference(inputs, backend, dtype, scale=0.5, dropout_p=p, seed=99)


def test_frozen_base_weights_get_no_grad():
    x, w, b, a, lb, c = make_inputs(torch.float64, 4, "per", True)
    w.requires_grad_(False)
    b.requires_grad_(False)
    check_against_reference([x, w, b, a, lb, c], "cpp", torch.float64, dropout_p=0.1, seed=3)
    # only the interaction requires grad
    for t in (x, a, lb):
        t.requires_grad_(False)
    g = torch.randn(B, T, D_OUT, dtype=torch.float64)
    _, grads = run([x, w, b, a, lb, c], "cpp", g, dropout_p=0.1, seed=3)
    _, g_ref = reference64([x, w, b, a, lb, c], g, dropout_p=0.1, seed=3)
    assert grads[:5] == [None] * 5
    assert_close(grads[5], g_ref[5], torch.float64)


def test_no_grad_inference_matches():
    inputs = make_inputs(torch.float32, 8, "shared", True, requires_grad=False)
    with torch.no_grad():
        y = cflora_linear(*inputs, scale=2.0, backend="cpp")
    assert_close(y, cflora_linear_ref(*[None if t is None else t.double() for t in inputs], scale=2.0))


# ------------------------------------------------------------------------------------------------------------
# dropout: deterministic in the seed, the shared hash, regenerated consistently by the backward
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_dropout_seed_determinism(backend):
    inputs = make_inputs(torch.float32, 8, "per", True, requires_grad=False)
    y1 = cflora_linear(*inputs, dropout_p=0.1, seed=5, backend=backend)
    y2 = cflora_linear(*inputs, dropout_p=0.1, seed=5, backend=backend)
    y3 = cflora_linear(*inputs, dropout_p=0.1, seed=6, backend=backend)
    y0 = cflora_linear(*inputs, dropout_p=0.0, backend=backend)
    assert torch.equal(y1, y2)
    assert not torch.allclose(y1, y3)
    assert not torch.allclose(y1, y0)
    # seed=None draws from torch's default generator: reproducible under torch.manual_seed
    torch.manual_seed(11)
    n1 = cflora_linear(*inputs, dropout_p=0.1, backend=backend)
    torch.manual_seed(11)
    n2 = cflora_linear(*inputs, dropout_p=0.1, backend=backend)
    n3 = cflora_linear(*inputs, dropout_p=0.1, backend=backend)
    assert torch.equal(n1, n2) and not torch.allclose(n1, n3)
    # dropout_p = 0 ignores the seed entirely
    assert torch.equal(
        cflora_linear(*inputs, dropout_p=0.0, seed=1, backend=backend),
        cflora_linear(*inputs, dropout_p=0.0, seed=2, backend=backend),
    )


def test_dropout_mask_is_the_shared_hash():
    """The LoRA path sees x * keep(seed, m*d_in + k) / (1 - p), computed here by hand from the hash."""
    x, w, b, a, lb, _ = make_inputs(torch.float64, 4, None, True, requires_grad=False)
    p, seed = 0.3, 2**40 + 17
    keep = dropout_keep_mask_ref(x.numel(), p, seed).view(x.shape).double()
    by_hand = x @ w.T + b + 0.5 * ((x * keep / (1 - p)) @ a.T) @ lb.T
    got = cflora_linear(x, w, b, a, lb, None, scale=0.5, dropout_p=p, seed=seed, backend="cpp")
    assert_close(got, by_hand, torch.float64)
    assert 0.6 < keep.mean().item() < 0.8


def test_dropout_backward_uses_the_forward_mask():
    """grad wrt A with dropout equals dSᵀ drop(x) with the same mask: compare with the reference per seed."""
    inputs = make_inputs(torch.float64, 4, "shared", False)
    g = torch.randn(B, T, D_OUT, dtype=torch.float64)
    _, g_cpp = run(inputs, "cpp", g, dropout_p=0.25, seed=77)
    _, g_ref_same = reference64(inputs, g, dropout_p=0.25, seed=77)
    _, g_ref_other = reference64(inputs, g, dropout_p=0.25, seed=78)
    for i in (0, 3):  # x and lora_a see the mask
        assert_close(g_cpp[i], g_ref_same[i], torch.float64)
        assert not torch.allclose(g_cpp[i], g_ref_other[i])


# ------------------------------------------------------------------------------------------------------------
# every output element written: fresh allocations are NaN-poisoned
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture
def poisoned_allocations():
    """torch fills every fresh empty()/empty_like() with NaN: an output element the kernel misses stays NaN."""
    import torch.utils.deterministic as det

    old_alg, old_fill = torch.are_deterministic_algorithms_enabled(), det.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    det.fill_uninitialized_memory = True
    try:
        probe = torch.empty(16, dtype=torch.float32)
        assert torch.isnan(probe).all(), "poisoning is not active"
        yield
    finally:
        torch.use_deterministic_algorithms(old_alg)
        det.fill_uninitialized_memory = old_fill


@pytest.mark.parametrize("c_kind", [None, "shared", "per"])
def test_every_output_element_written(poisoned_allocations, c_kind):
    inputs = make_inputs(torch.float32, 16, c_kind, True)
    g = torch.randn(B, T, D_OUT, dtype=torch.float64)
    y, grads = run(inputs, "cpp", g, dropout_p=0.1, seed=4)
    assert torch.isfinite(y).all()
    for name, t in zip(GRAD_NAMES, grads):
        if t is not None:
            assert torch.isfinite(t).all(), name
    check_against_reference(inputs, "cpp", torch.float32, dropout_p=0.1, seed=4)


# ------------------------------------------------------------------------------------------------------------
# gradcheck, opcheck, torch.compile
# ------------------------------------------------------------------------------------------------------------


def _small(c_kind, bias=True):
    return make_inputs(torch.float64, 3, c_kind, bias, x_shape=(2, 3, 9), d_out=5)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("c_kind,p", [(None, 0.0), ("shared", 0.2), ("per", 0.2)])
def test_gradcheck_float64(backend, c_kind, p):
    inputs = _small(c_kind)
    present = [t for t in inputs if t is not None]

    def f(*ts):
        it = iter(ts)
        args = [next(it) if t is not None else None for t in inputs]
        return cflora_linear(*args, scale=0.7, dropout_p=p, seed=21, backend=backend)

    assert torch.autograd.gradcheck(f, tuple(present))


def _fwd_args(c_kind, bias, p):
    x, w, b, a, lb, c = _small(c_kind, bias)
    return (x.reshape(-1, x.shape[-1]).detach().requires_grad_(), w, b, a, lb, c, 3, 0.7, p, 31)


@pytest.mark.parametrize("c_kind,bias,p", [(None, True, 0.0), ("shared", False, 0.2), ("per", True, 0.2)])
def test_opcheck_fwd_and_bwd(c_kind, bias, p):
    from rellax_fast.ops._registry import ensure_ext_registered

    ensure_ext_registered()
    args = _fwd_args(c_kind, bias, p)
    # the C++ ops are the kernels of cflora_linear's autograd.Function, not differentiable themselves
    # (test_raw_ext_op_refuses_to_differentiate): checked on inputs that need no gradient
    detached = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(torch.ops.rellax_fast.cflora_fwd.default, detached)
    with torch.no_grad():
        y, s, t = torch.ops.rellax_fast.cflora_fwd(*args)
    x, w, _, a, lb, c = args[:6]
    bwd_args = (
        torch.randn_like(y),
        x.detach(),
        w.detach(),
        a.detach(),
        lb.detach(),
        None if c is None else c.detach(),
        s,
        t,
        3,
        0.7,
        p,
        31,
        [True, True, bias, True, True, c is not None],
    )
    torch.library.opcheck(torch.ops.rellax_fast.cflora_bwd.default, bwd_args)


def test_raw_ext_op_refuses_to_differentiate():
    """Called directly on inputs that need gradients, the C++ forward raises at backward (its Autograd kernel
    is torch's not-implemented node) instead of differentiating the CPU kernel's inner ATen calls; the
    differentiable entry is cflora_linear, whose gradients match the reference (test_gradcheck_float64)."""
    from rellax_fast.ops._registry import ensure_ext_registered

    ensure_ext_registered()
    y, _, _ = torch.ops.rellax_fast.cflora_fwd(*_fwd_args("per", True, 0.0))
    with pytest.raises(RuntimeError, match="derivative for rellax_fast::cflora_fwd is not implemented"):
        y.sum().backward()


class _CFLoRAModule(torch.nn.Module):
    def __init__(self, inputs):
        super().__init__()
        _, w, b, a, lb, c = inputs
        self.weight = torch.nn.Parameter(w.detach().clone(), requires_grad=False)
        self.bias = torch.nn.Parameter(b.detach().clone(), requires_grad=False)
        self.lora_a = torch.nn.Parameter(a.detach().clone())
        self.lora_b = torch.nn.Parameter(lb.detach().clone())
        self.c = c.detach().clone()

    def forward(self, x, interaction_scale):
        h = cflora_linear(
            x * 2.0,
            self.weight,
            self.bias,
            self.lora_a,
            self.lora_b,
            self.c * interaction_scale,
            scale=0.5,
            dropout_p=0.1,
            seed=8,
        )
        return torch.relu(h).sum(-1)


def test_torch_compile_fullgraph_no_graph_break():
    import torch._dynamo

    inputs = make_inputs(torch.float32, 8, "per", True, requires_grad=False)
    module = _CFLoRAModule(inputs)
    x = inputs[0].clone().requires_grad_()
    s = torch.tensor(1.5, requires_grad=True)
    eager = module(x, s)
    g_eager = torch.autograd.grad(eager.sum(), [x, s, module.lora_a, module.lora_b])
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(module)(x, s)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(module, fullgraph=True)
    got = compiled(x, s)
    g_comp = torch.autograd.grad(got.sum(), [x, s, module.lora_a, module.lora_b])
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_comp, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------------------
# bad inputs: clear errors naming the argument
# ------------------------------------------------------------------------------------------------------------


def _bad(**change):
    x, w, b, a, lb, c = make_inputs(torch.float32, 4, "per", True, requires_grad=False)
    args = dict(x=x, weight=w, bias=b, lora_a=a, lora_b=lb, interaction=c)
    args.update(change)
    return args


BAD = [
    (dict(weight=torch.randn(D_OUT, D_IN + 1)), ValueError, r"weight must have shape \(d_out, d_in=100\)"),
    (  # a wrong x: the message shows x's shape beside the weight it was checked against
        dict(x=torch.randn(B, T, D_IN - 3)),
        ValueError,
        r"weight must have shape \(d_out, d_in=97\), d_in being x's last dimension \(x \(3, 7, 97\)\); got \(36, 100\)",
    ),
    (dict(lora_a=torch.randn(4, D_IN - 1)), ValueError, r"lora_a must have shape \(r, d_in=100\)"),
    (dict(lora_b=torch.randn(D_OUT, 5)), ValueError, r"lora_b must have shape \(d_out=36, r=4\)"),
    (dict(lora_b=torch.randn(D_OUT + 1, 4)), ValueError, r"lora_b must have shape \(d_out=36, r=4\)"),
    (dict(bias=torch.randn(D_OUT + 2)), ValueError, r"bias must have shape \(d_out=36,\)"),
    (
        dict(interaction=torch.randn(B + 1, 4, 4)),
        ValueError,
        r"interaction batch 4 does not match x's batch 3",
    ),
    (dict(interaction=torch.randn(B, 5, 5)), ValueError, r"interaction must have shape \(B, r, r\)"),
    (dict(interaction=torch.randn(3, 3)), ValueError, r"interaction must have shape \(r, r\)"),
    (dict(x=torch.randn(D_IN)), ValueError, r"per-sample interaction \(B, r, r\) needs x of shape"),
    (
        dict(lora_a=torch.randn(4, D_IN, dtype=torch.float64)),
        TypeError,
        r"lora_a must have x's dtype torch.float32",
    ),
    (dict(x=torch.randint(0, 5, (B, T, D_IN))), TypeError, r"x must be a floating-point tensor"),
    (dict(lora_b=torch.randn(D_OUT, 4, device="meta")), ValueError, r"lora_b must be on x's device cpu"),
]


@pytest.mark.parametrize("change,exc,match", BAD)
@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_bad_inputs_raise_clear_errors(change, exc, match, backend):
    with pytest.raises(exc, match=match):
        cflora_linear(**_bad(**change), backend=backend)


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, float("nan")])
def test_bad_dropout_p(p):
    with pytest.raises(ValueError, match="dropout_p must be a float in"):
        cflora_linear(**_bad(), dropout_p=p, backend="cpp")


def test_bad_seed_and_scale():
    with pytest.raises(TypeError, match="seed must be an int"):
        cflora_linear(**_bad(), dropout_p=0.1, seed=1.5)
    with pytest.raises(TypeError, match="scale must be a real number"):
        cflora_linear(**_bad(), scale="2")


def test_cpp_op_checks_direct_calls():
    """The C++ kernel validates on its own when called through torch.ops (no Python wrapper)."""
    from rellax_fast.ops._registry import ext_op

    x, w, b, a, lb, c = make_inputs(torch.float32, 4, "per", True, requires_grad=False)
    with pytest.raises(RuntimeError, match=r"lora_b must have shape \(d_out=36, r=4\)"):
        ext_op("cflora_fwd")(x.reshape(-1, D_IN), w, b, a, lb[:, :3], c, T, 1.0, 0.0, 0)
    with pytest.raises(RuntimeError, match="needs x with 24 rows; got 21"):
        ext_op("cflora_fwd")(x.reshape(-1, D_IN), w, b, a, lb, c, T + 1, 1.0, 0.0, 0)


def test_forced_unavailable_backend_says_why():
    x, w, b, a, lb, c = make_inputs(torch.float32, 4, None, True, requires_grad=False)
    with pytest.raises(BackendUnavailableError, match="cuda"):
        cflora_linear(x, w, b, a, lb, c, backend="cuda")


# ------------------------------------------------------------------------------------------------------------
# CUDA backend (run by scripts/gpu_check.sh on a GPU machine)
# ------------------------------------------------------------------------------------------------------------

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize(
    "r,c_kind,p,bias,x_shape",
    [
        (1, "per", 0.1, True, (B, T, D_IN)),
        (4, None, 0.0, False, (B, T, D_IN)),
        (8, "shared", 0.1, True, (B, T, D_IN)),
        (16, "per", 0.0, True, (5, 37, 129)),
        (16, "per", 0.1, False, (33, 200)),
        (64, "per", 0.1, True, (4, 33, 257)),
        (64, None, 0.1, True, (2, 300, 64)),
    ],
)
def test_cuda_matches_reference_float64(r, c_kind, p, bias, x_shape):
    inputs = make_inputs(torch.float64, r, c_kind, bias, x_shape=x_shape, device="cuda")
    check_against_reference(inputs, "cuda", torch.float64, scale=0.7, dropout_p=p, seed=1234 + r)


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("c_kind", [None, "per"])
def test_cuda_low_precision(dtype, c_kind):
    inputs = make_inputs(dtype, 16, c_kind, True, x_shape=(4, 33, 160), device="cuda")
    check_against_reference(inputs, "cuda", dtype, scale=0.5, dropout_p=0.1, seed=5)


@pytest.mark.cuda
@needs_gpu
def test_cuda_every_output_element_written_and_mask_matches_cpu(poisoned_allocations):
    inputs = make_inputs(torch.float32, 16, "per", True, x_shape=(3, 45, 130), device="cuda")
    g = torch.randn(3, 45, D_OUT, dtype=torch.float64, device="cuda")
    y, grads = run(inputs, "cuda", g, dropout_p=0.1, seed=4)
    assert torch.isfinite(y).all() and all(torch.isfinite(t).all() for t in grads if t is not None)
    cpu_inputs = [None if t is None else t.detach().cpu() for t in inputs]
    y_cpu = cflora_linear(*cpu_inputs, dropout_p=0.1, seed=4, backend="cpp")
    assert_close(y.cpu(), y_cpu.double(), torch.float32)


@pytest.mark.cuda
@needs_gpu
def test_cuda_gradcheck_and_opcheck():
    x, w, b, a, lb, c = [None if t is None else t.detach().cuda().requires_grad_() for t in _small("per")]

    def f(x, w, b, a, lb, c):
        return cflora_linear(x, w, b, a, lb, c, scale=0.7, dropout_p=0.2, seed=21, backend="cuda")

    assert torch.autograd.gradcheck(f, (x, w, b, a, lb, c))
    args = (x.reshape(-1, x.shape[-1]).detach().requires_grad_(), w, b, a, lb, c, 3, 0.7, 0.2, 31)
    torch.library.opcheck(torch.ops.rellax_fast.cflora_fwd.default, args)


def test_triton_op_without_kernels_module_raises_clearly(monkeypatch):
    """If rellax_fast.kernels.cflora cannot be imported, the triton op says so (no silent fallback)."""
    import sys

    import rellax_fast.kernels

    monkeypatch.setitem(sys.modules, "rellax_fast.kernels.cflora", None)  # makes the import fail
    # ... also after an earlier test imported it: `from rellax_fast.kernels import cflora` reads the attribute first
    monkeypatch.delattr(rellax_fast.kernels, "cflora", raising=False)
    x, w, b, a, lb, c = make_inputs(torch.float32, 4, None, True, requires_grad=False)
    with pytest.raises(BackendUnavailableError, match="needs rellax_fast.kernels.cflora"):
        torch.ops.rellax_fast.cflora_fwd_triton(x.reshape(-1, D_IN), w, b, a, lb, c, 1, 1.0, 0.0, 0)


@pytest.mark.parametrize(
    "backend,device",
    [
        ("reference", "cpu"),
        ("cpp", "cpu"),
        pytest.param("triton", "cpu", marks=pytest.mark.triton),
        pytest.param("cuda", "cuda", marks=[pytest.mark.cuda, needs_gpu]),
        pytest.param("triton", "cuda", marks=[pytest.mark.cuda, needs_gpu]),
    ],
)
@pytest.mark.parametrize("x_shape,c_shape", [((0, 7, 10), (0, 4, 4)), ((3, 0, 10), (3, 4, 4))])
def test_empty_batches(backend, device, x_shape, c_shape):
    """No rows (B = 0 or T = 0): empty outputs, zero parameter gradients, no kernel launched on garbage; every
    backend agrees (#26: triton raised "3 * 0 != 0" for x (3, 0, d) with a per-sample C)."""
    x = torch.randn(*x_shape, device=device, requires_grad=True)
    w = torch.randn(6, 10, device=device)
    a = torch.randn(4, 10, device=device, requires_grad=True)
    lb = torch.randn(6, 4, device=device, requires_grad=True)
    c = torch.randn(*c_shape, device=device, requires_grad=True)
    y = cflora_linear(x, w, None, a, lb, c, dropout_p=0.1, seed=1, backend=backend)
    assert y.shape == (*x_shape[:-1], 6)
    gx, ga, glb, gc = torch.autograd.grad(y.sum(), [x, a, lb, c])
    assert gx.shape == x.shape and gc.shape == c.shape
    for g in (ga, glb, gc):
        assert torch.equal(g, torch.zeros_like(g))


def test_autograd_saves_no_output_sized_activation():
    """The op saves x, S and T (and references to the parameters), never an (M, d_out) activation."""
    x, w, b, a, lb, c = make_inputs(torch.float32, 8, "per", True)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = cflora_linear(x, w, b, a, lb, c, dropout_p=0.1, seed=3, backend="cpp")
    m = B * T
    assert (m, D_IN) in saved and saved.count((m, 8)) == 2, saved
    assert not [s for s in saved if len(s) >= 2 and s[-1] == D_OUT and (s[0] == m or s[:2] == (B, T))], saved
    y.sum().backward()
    assert x.grad is not None and c.grad is not None


@pytest.mark.parametrize("case", range(6))
def test_random_shapes_match_reference(case):
    """Fresh random sizes (seeded per case) for every layout of C, float64, with dropout."""
    g = torch.Generator().manual_seed(1000 + case)
    n_samples, tokens, d_in, d_out, r = (
        int(torch.randint(lo, hi, (), generator=g))
        for lo, hi in ((1, 6), (1, 40), (1, 130), (1, 70), (1, 33))
    )
    c_kind = (None, "shared", "per")[case % 3]
    inputs = make_inputs(
        torch.float64, r, c_kind, case % 2 == 0, x_shape=(n_samples, tokens, d_in), d_out=d_out
    )
    check_against_reference(inputs, "cpp", torch.float64, scale=1.3, dropout_p=0.15, seed=case)


# ------------------------------------------------------------------------------------------------------------
# tensor seeds: what torch.compile uses (no .item() in the graph, no recompilation per seed)
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "cpp", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("seed", [0, 77, 2**40 + 17, -5, 2**63 - 1])
def test_tensor_seed_gives_the_int_seeds_mask(backend, seed):
    inputs = make_inputs(torch.float32, 4, "per", True, x_shape=(2, 5, 24), d_out=12)
    g = torch.randn(2, 5, 12, dtype=torch.float64)
    y_int, g_int = run(inputs, backend, g, dropout_p=0.3, seed=seed)
    y_t, g_t = run(inputs, backend, g, dropout_p=0.3, seed=torch.tensor(seed))
    y_other, _ = run(
        inputs, backend, g, dropout_p=0.3, seed=torch.tensor(seed + (1 if seed < 2**63 - 1 else -1))
    )
    assert torch.equal(y_t, y_int)
    assert not torch.allclose(y_other, y_int)
    for name, a, b in zip(GRAD_NAMES, g_t, g_int):
        if b is not None:
            assert torch.equal(a, b), name
    # a 0-d int32 tensor, or a one-element int64 tensor, is the same seed
    if -(2**31) <= seed < 2**31:
        assert torch.equal(
            run(inputs, backend, None, dropout_p=0.3, seed=torch.tensor([seed], dtype=torch.int32))[0], y_int
        )


@pytest.mark.parametrize("seed", [torch.tensor(1.0), torch.tensor([1, 2]), torch.tensor(True)])
def test_bad_tensor_seed(seed):
    with pytest.raises(TypeError, match="a tensor seed must hold one integer"):
        cflora_linear(**_bad(), dropout_p=0.1, seed=seed)


@pytest.mark.parametrize("c_kind,bias,p", [(None, True, 0.0), ("per", True, 0.2)])
def test_opcheck_tensor_seed_ops(c_kind, bias, p):
    from rellax_fast.ops._registry import ensure_ext_registered

    ensure_ext_registered()
    args = (*_fwd_args(c_kind, bias, p)[:9], torch.tensor(31), "cpp")
    torch.library.opcheck(torch.ops.rellax_fast.cflora_fwd_tensor_seed.default, args)
    with torch.no_grad():
        y, s, t = torch.ops.rellax_fast.cflora_fwd_tensor_seed(*args)
        y_int, _, _ = torch.ops.rellax_fast.cflora_fwd(*args[:9], 31)
    assert torch.equal(y, y_int)
    x, w, _, a, lb, c = args[:6]
    bwd_args = (
        torch.randn_like(y),
        x.detach(),
        w.detach(),
        a.detach(),
        lb.detach(),
        None if c is None else c.detach(),
        s,
        t,
        3,
        0.7,
        p,
        torch.tensor(31),
        [True, True, bias, True, True, c is not None],
        "cpp",
    )
    torch.library.opcheck(torch.ops.rellax_fast.cflora_bwd_tensor_seed.default, bwd_args)


class _DropoutModule(torch.nn.Module):
    """A CFLoRA call with dropout and the seed left to the op (seed=None), as CFLoRALinear does."""

    def __init__(self, inputs, backend):
        super().__init__()
        _, w, b, a, lb, c = (None if t is None else t.detach().clone() for t in inputs)
        self.weight, self.bias, self.c = w, b, c
        self.lora_a, self.lora_b = torch.nn.Parameter(a), torch.nn.Parameter(lb)
        self.backend = backend

    def forward(self, x, seed=None):
        return cflora_linear(
            x,
            self.weight,
            self.bias,
            self.lora_a,
            self.lora_b,
            self.c,
            scale=0.5,
            dropout_p=0.3,
            seed=seed,
            backend=self.backend,
        )


def _loss_and_grads(fn, module, x, manual_seed, **kw):
    torch.manual_seed(manual_seed)
    y = fn(x, **kw)
    return y.detach(), torch.autograd.grad((y * y).sum(), [x, module.lora_a, module.lora_b])


@pytest.mark.parametrize(
    "backend,device",
    [
        ("reference", "cpu"),
        ("cpp", "cpu"),
        pytest.param("triton", "cpu", marks=pytest.mark.triton),
        pytest.param("cuda", "cuda", marks=[pytest.mark.cuda, needs_gpu]),
        pytest.param("triton", "cuda", marks=[pytest.mark.cuda, needs_gpu]),
    ],
)
def test_compile_fullgraph_draws_the_dropout_seed_in_the_graph(backend, device):
    """seed=None inside torch.compile(fullgraph=True): the seed is drawn in the graph from torch's generator, so
    under the same torch.manual_seed the compiled op (aot_eager keeps torch's RNG) gives eager's masks. The seed
    is a CPU tensor also for CUDA inputs: reading it needs no device sync."""
    import torch._dynamo

    inputs = make_inputs(torch.float32, 4, "per", True, x_shape=(2, 5, 24), d_out=12, device=device)
    module = _DropoutModule(inputs, backend)
    x = inputs[0].detach().clone().requires_grad_()
    torch._dynamo.reset()
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    for manual_seed in (1, 2):
        y_e, g_e = _loss_and_grads(module, module, x, manual_seed)
        y_c, g_c = _loss_and_grads(compiled, module, x, manual_seed)
        torch.testing.assert_close(y_c, y_e, rtol=1e-6, atol=1e-6)
        for a, b in zip(g_c, g_e):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(
        _loss_and_grads(compiled, module, x, 1)[0], _loss_and_grads(compiled, module, x, 2)[0]
    )


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_compile_does_not_recompile_for_every_int_seed(backend):
    """An int seed that changes every step becomes a graph input (a tensor), not a constant of the graph."""
    import torch._dynamo

    inputs = make_inputs(torch.float32, 4, None, True, x_shape=(2, 5, 24), d_out=12)
    module = _DropoutModule(inputs, backend)
    x = inputs[0].detach().clone().requires_grad_()
    torch._dynamo.reset()
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    with torch._dynamo.config.patch(recompile_limit=2):  # one static and one dynamic graph at most
        for seed in range(1, 6):
            y_e, g_e = _loss_and_grads(module, module, x, 0, seed=seed)
            y_c, g_c = _loss_and_grads(compiled, module, x, 0, seed=seed)
            torch.testing.assert_close(y_c, y_e, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(g_c[1], g_e[1], rtol=1e-5, atol=1e-5)


def test_inductor_fullgraph_with_dropout_matches_eager():
    """The default backend (inductor): with fallback_random it draws torch's seeds, so it reproduces eager."""
    import torch._dynamo
    import torch._inductor.config as inductor_config

    inputs = make_inputs(torch.float32, 4, "per", True, x_shape=(2, 5, 24), d_out=12)
    module = _DropoutModule(inputs, "cpp")
    x = inputs[0].detach().clone().requires_grad_()
    torch._dynamo.reset()
    with inductor_config.patch(fallback_random=True):
        compiled = torch.compile(module, fullgraph=True)
        y_e, g_e = _loss_and_grads(module, module, x, 3)
        y_c, g_c = _loss_and_grads(compiled, module, x, 3)
    torch.testing.assert_close(y_c, y_e, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
