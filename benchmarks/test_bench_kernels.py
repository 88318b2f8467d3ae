"""pytest-benchmark cases for the two ops: ``cflora_linear`` (forward, backward, forward+backward; per
backend, next to the frozen ``nn.Linear`` floor and the unfused PEFT-style composition) and
``semantic_topk`` (per backend, next to the padded torch baseline). Each benchmark's ``extra_info`` holds
its ratio to the baseline timed in the same test."""

from __future__ import annotations

import torch
from _bench_util import median_ms, record, run_benchmark

from rellax_fast.bench import cflora as bench_cflora
from rellax_fast.bench import topk as bench_topk


def _cflora_method(name: str):
    if name == "floor":
        return bench_cflora._floor
    if name == "unfused":
        return bench_cflora._unfused
    backend = name[len("cflora[") : -1]
    from rellax_fast.ops import cflora_linear

    def op(x, w, b, a, lb, c, scale):
        return cflora_linear(x, w, b, a, lb, c, scale=scale, backend=backend)

    return op


def _cflora_phase(name: str, case, tensors):
    """(fn, before) of one phase of one method; ``fn(arg)`` is what is timed."""
    x, w, b, a, lb, c = tensors
    method = _cflora_method(name)
    wrt = [x] if name == "floor" else [t for t in (x, a, lb, c) if t is not None]

    def forward(_=None):
        return method(x, w, b, a, lb, c, 2.0)

    def backward(y):
        torch.autograd.grad(y, wrt, torch.ones_like(y))

    if case.phase == "fwd":
        return forward, None
    if case.phase == "bwd":
        return backward, forward
    return (lambda _=None: backward(forward())), None


def test_cflora_linear(benchmark, cflora_case, bench_device, bench_rounds, bench_size):
    from _bench_util import WARMUP

    case, device = cflora_case, bench_device
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    samples = bench_cflora.SAMPLES
    x = torch.randn(samples, case.m // samples, case.d, device=device, dtype=dtype).requires_grad_()
    w = torch.randn(case.d, case.d, device=device, dtype=dtype) / case.d**0.5
    b = torch.randn(case.d, device=device, dtype=dtype)
    a = (torch.randn(case.r, case.d, device=device, dtype=dtype) / case.d**0.5).requires_grad_()
    lb = (torch.randn(case.d, case.r, device=device, dtype=dtype) / case.r**0.5).requires_grad_()
    c = None
    if case.c_kind == "per-sample":
        c = (torch.randn(samples, case.r, case.r, device=device, dtype=dtype) / case.r**0.5).requires_grad_()
    tensors = (x, w, b, a, lb, c)
    warmup = WARMUP[bench_size]
    base_fn, base_before = _cflora_phase("floor", case, tensors)
    baseline_ms = median_ms(base_fn, device, bench_rounds, warmup, base_before)
    fn, before = _cflora_phase(case.method, case, tensors)
    median = run_benchmark(benchmark, fn, device, bench_rounds, warmup, before)
    record(
        benchmark,
        device=device,
        dtype=dtype,
        shape={
            "M": case.m,
            "d_in": case.d,
            "d_out": case.d,
            "r": case.r,
            "C": case.c_kind,
            "samples": samples,
        },
        backend=case.method,
        median=median,
        baseline="floor (frozen nn.Linear, same phase)",
        baseline_ms=baseline_ms,
        phase=case.phase,
    )


def test_semantic_topk(benchmark, topk_case, bench_device, bench_rounds, bench_size):
    from _bench_util import WARMUP

    from rellax_fast.ops import semantic_topk

    case, device = topk_case, bench_device
    items, offsets, users, pos = (t.to(device) for t in bench_topk.synthetic_histories(case.users))
    gen = torch.Generator().manual_seed(case.d)
    emb = torch.randn(bench_topk.ML1M_ITEMS, case.d, generator=gen).to(device)

    def padded(_=None):
        return bench_topk.torch_padded_topk(emb, items, offsets, case.k, normalize=True)

    if case.method == "torch-padded":
        fn = padded
    else:
        backend = case.method[len("topk[") : -1]

        def fn(_=None):
            return semantic_topk(emb, items, offsets, users, pos, case.k, metric="cosine", backend=backend)

    rounds = min(bench_rounds, 5) if device.type == "cpu" else bench_rounds  # whole-dataset calls on the CPU
    warmup = WARMUP[bench_size]
    baseline_ms = median_ms(padded, device, rounds, warmup)
    median = run_benchmark(benchmark, fn, device, rounds, warmup)
    record(
        benchmark,
        device=device,
        dtype=emb.dtype,
        shape={
            "users": case.users,
            "samples": int(users.numel()),
            "total": int(offsets[-1]),
            "d": case.d,
            "k": case.k,
            "metric": "cosine",
        },
        backend=case.method,
        median=median,
        baseline="torch-padded (bmm + causal mask + topk)",
        baseline_ms=baseline_ms,
        samples_per_s=None if median is None else users.numel() / (median / 1e3),
    )
