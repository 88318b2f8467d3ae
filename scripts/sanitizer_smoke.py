"""A small run of every CUDA kernel in rellax_fast._C, for ``compute-sanitizer --tool memcheck``.

Usage (scripts/gpu_check.sh runs it)::

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 \
        python scripts/sanitizer_smoke.py

With the caching allocator off, every tensor is its own cudaMalloc, so an out-of-bounds access just past
a tensor is reported instead of landing inside a pooled block. Shapes are small and odd (no multiple of a
tile size) so the tail paths of every kernel run. Each case also compares the cuda backend with the
reference backend (loose tolerances: the point here is memory safety; the ``cuda``-marked tests check
accuracy), and a case that fails is reported without stopping the others. A case whose op has no
implementation on the backend (``rellax_fast.ops._backend.implemented``) is skipped and says so. Exit status 1
if any case failed, 0 otherwise.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from typing import Callable, List, Optional, Tuple

import torch


def _close(name: str, actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    if not torch.isfinite(actual).all():
        raise AssertionError(f"{name}: non-finite values")
    err = (actual - expected).abs().max().item() if actual.numel() else 0.0
    magnitude = expected.abs().max().item() if expected.numel() else 0.0
    bound = tol * (1.0 + magnitude)
    if err > bound:
        raise AssertionError(f"{name}: max abs error {err:.3g} > {bound:.3g}")


def case_seeded_dropout(dev: torch.device, backend: str) -> None:
    from rellax_fast.ops import seeded_dropout

    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(1001, 37, device=dev, dtype=dtype, requires_grad=True)
        y = seeded_dropout(x, 0.1, 1234, backend=backend)
        ref = seeded_dropout(x.detach().cpu().float(), 0.1, 1234, backend="reference")
        _close(f"seeded_dropout {dtype}", y, ref, 1e-2)
        g = torch.randn_like(y)
        (gx,) = torch.autograd.grad(y, x, g)
        gref = seeded_dropout(g.detach().cpu().float(), 0.1, 1234, backend="reference")
        _close(f"seeded_dropout grad {dtype}", gx, gref, 1e-2)


def case_cflora(dev: torch.device, backend: str) -> None:
    from rellax_fast.ops import cflora_linear

    b, t, d_in, d_out, r = 3, 7, 100, 36, 8
    for dtype in (torch.float32, torch.bfloat16):
        for c_shape, p in (((b, r, r), 0.1), ((r, r), 0.0), (None, 0.1)):
            gen = torch.Generator().manual_seed(0)

            def rnd(*shape, gen=gen, dtype=dtype):
                return torch.randn(*shape, generator=gen).to(dev, dtype).requires_grad_(True)

            x, w, bias = rnd(b, t, d_in), rnd(d_out, d_in), rnd(d_out)
            a, bb = rnd(r, d_in), rnd(d_out, r)
            c = rnd(*c_shape) if c_shape is not None else None
            inputs = [v for v in (x, w, bias, a, bb, c) if v is not None]
            outs = {}
            for which in (backend, "reference"):
                y = cflora_linear(x, w, bias, a, bb, c, scale=0.5, dropout_p=p, seed=7, backend=which)
                grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dev, dtype)
                grads = torch.autograd.grad(y, inputs, grad_out)
                outs[which] = (y, grads)
            tol = 2e-3 if dtype == torch.float32 else 8e-2
            label = f"cflora_linear {dtype} C={c_shape} p={p}"
            _close(label, outs[backend][0], outs["reference"][0], tol)
            for i, (gc, gr) in enumerate(zip(outs[backend][1], outs["reference"][1])):
                _close(f"{label} grad[{i}]", gc, gr, tol)


def case_semantic_topk(dev: torch.device, backend: str) -> None:
    from rellax_fast.ops import semantic_topk

    gen = torch.Generator().manual_seed(0)
    n_items, d = 300, 31
    lengths = [0, 1, 2, 37, 130, 517]
    emb = torch.randn(n_items, d, generator=gen)
    seq_items = torch.randint(0, n_items, (sum(lengths),), generator=gen)
    offsets = torch.tensor([0] + lengths).cumsum(0)
    users = torch.tensor([u for u, n in enumerate(lengths) for _ in range(n)], dtype=torch.int64)
    pos = torch.tensor([p for n in lengths for p in range(n)], dtype=torch.int64)
    cpu_args = (emb, seq_items, offsets, users, pos)
    dev_args = tuple(v.to(dev) for v in cpu_args)
    for metric in ("cosine", "dot"):
        for k in (1, 5, 64):
            p_dev, s_dev = semantic_topk(*dev_args, k, metric=metric, backend=backend)
            p_ref, s_ref = semantic_topk(*cpu_args, k, metric=metric, backend="reference")
            label = f"semantic_topk {metric} k={k}"
            finite = torch.isfinite(s_ref)
            if not torch.equal(torch.isfinite(s_dev.cpu()), finite) or not torch.equal(
                p_dev.cpu() < 0, ~finite
            ):
                raise AssertionError(f"{label}: padding differs from the reference")
            _close(label, s_dev.cpu()[finite], s_ref[finite], 1e-3)


CASES: List[Tuple[str, Callable[[torch.device, str], None]]] = [
    ("seeded_dropout", case_seeded_dropout),
    ("cflora_linear", case_cflora),
    ("semantic_topk", case_semantic_topk),
]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    from rellax_fast.ops import BACKENDS, _backend, all_ops

    parser.add_argument(
        "--backend",
        default="cuda",
        choices=[b for b in BACKENDS if b != "reference"],
        help="backend under test, compared with reference (cpp: a CPU dry run of this script)",
    )
    args = parser.parse_args(argv)
    all_ops()  # every op module registers its implementations at import
    dev = torch.device("cpu" if args.backend == "cpp" else "cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("sanitizer_smoke: no CUDA device is visible", file=sys.stderr)
        return 1
    failed = []
    for name, fn in CASES:
        if args.backend not in _backend.implemented(name):
            print(f"sanitizer_smoke: {name}: skipped (no {args.backend} implementation)", flush=True)
            continue
        try:
            fn(dev, args.backend)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            print(f"sanitizer_smoke: {name}: ok", flush=True)
        except Exception:
            failed.append(name)
            print(f"sanitizer_smoke: {name}: FAILED\n{traceback.format_exc()}", flush=True)
    ran = [name for name, _ in CASES if args.backend in _backend.implemented(name)]
    print(
        f"sanitizer_smoke: {len(ran) - len(failed)}/{len(ran)} cases passed"
        + (f"; failed: {', '.join(failed)}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
