"""cflora_linear(backend="triton"): the torch.library custom ops that wrap rellax_fast.kernels.cflora.

The kernels themselves are tested in test_cflora_triton.py; this checks the op layer around them (routing,
autograd through rellax_fast::cflora_fwd_triton / cflora_bwd_triton, frozen weights, opcheck) against the
float64 reference. Run under the interpreter: ``TRITON_INTERPRET=1 pytest -m triton``.
"""

from __future__ import annotations

import pytest
import torch
from rellax_testing import assert_close

from rellax_fast.ops.cflora import cflora_linear, cflora_linear_ref

pytestmark = pytest.mark.triton


def _inputs(c_kind, bias=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 24, generator=g)
    w = torch.randn(12, 24, generator=g) / 5
    b = torch.randn(12, generator=g) if bias else None
    a = torch.randn(4, 24, generator=g) / 5
    lb = torch.randn(12, 4, generator=g) / 2
    c = {None: None, "shared": torch.randn(4, 4, generator=g), "per": torch.randn(2, 4, 4, generator=g)}[
        c_kind
    ]
    return [None if t is None else t.to(dtype).requires_grad_() for t in (x, w, b, a, lb, c)]


@pytest.mark.parametrize("c_kind,p,bias", [(None, 0.0, True), ("shared", 0.2, False), ("per", 0.2, True)])
def test_triton_op_matches_reference(c_kind, p, bias):
    inputs = _inputs(c_kind, bias)
    present = [t for t in inputs if t is not None]
    g = torch.randn(2, 5, 12)
    y = cflora_linear(*inputs, scale=0.5, dropout_p=p, seed=9, backend="triton")
    grads = torch.autograd.grad(y, present, g)
    up = [None if t is None else t.detach().double().requires_grad_() for t in inputs]
    y_ref = cflora_linear_ref(*up, scale=0.5, dropout_p=p, seed=9)
    g_ref = torch.autograd.grad(y_ref, [t for t in up if t is not None], g.double())
    assert_close(y, y_ref, torch.float32)
    for got, want in zip(grads, g_ref):
        assert_close(got, want, torch.float32, scale=4.0)


def test_triton_op_frozen_weight_and_opcheck():
    x, w, b, a, lb, c = _inputs("per")
    w.requires_grad_(False)
    b.requires_grad_(False)
    y = cflora_linear(x, w, b, a, lb, c, dropout_p=0.1, seed=2, backend="triton")
    gx, ga = torch.autograd.grad(y.sum(), [x, a])
    assert torch.isfinite(gx).all() and torch.isfinite(ga).all()
    args = (x.detach().reshape(-1, 24).requires_grad_(), w, b, a, lb, c, 5, 0.5, 0.1, 2)
    torch.library.opcheck(
        torch.ops.rellax_fast.cflora_fwd_triton.default,
        args,
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )
