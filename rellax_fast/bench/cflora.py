"""``rellax-fast bench cflora``: the CFLoRA linear against its floor and the unfused composition.

For every shape (M = B·T rows, d_in = d_out = d, rank r, per-sample C with B = 16 or C = None) this times
forward, backward and forward+backward, all in the same run, of:

- ``floor``: the frozen base ``nn.Linear`` alone (forward plus the input gradient): what any adapter costs
  at least;
- ``unfused``: the PEFT-style composition in eager PyTorch (Linear + lora_A + bmm C + lora_B);
- ``unfused+compile``: that composition under ``torch.compile`` (a row note says why if it fails);
- ``cflora[<backend>]``: :func:`rellax_fast.ops.cflora_linear` with each backend available on the device.

x, A, B and C require grad; W and b are frozen (the fine-tuning setting). Dropout is 0 (the benchmarked
cost is the layer's, not the mask's). Reported: ms, TFLOP/s of forward+backward (the floor counts its own
FLOPs, the adapters count base + LoRA FLOPs), ratios to the floor, and peak memory of forward+backward
(allocator peak on the GPU; coarse RSS growth on the CPU). Methods are timed interleaved, one call each
per round, and each figure is the median over rounds, so that a noisy shared machine affects all alike.
"""

from __future__ import annotations

import os
import statistics
from typing import Callable, Dict, List, Optional, Tuple

SAMPLES = 16  # B for the per-sample interaction

SIZES = {
    # (M, d) pairs x ranks x C kinds; M = 16 is one decode step of 16 samples, where the op's per-call host
    # cost, not its arithmetic, sets the time (d = 576 is SmolLM2-135M's hidden size)
    "gpu": ([(16, 4096)] + [(m, d) for m in (4096, 16384) for d in (2048, 4096)], (8, 16, 64)),
    "cpu": ([(16, 576), (512, 256), (2048, 512)], (8, 16)),
    "tiny": ([(64, 48)], (4,)),
}


def _shapes(size: str):
    pairs, ranks = SIZES.get(size, SIZES["cpu"])
    return [(m, d, r, c) for (m, d) in pairs for r in ranks for c in ("per-sample", "none")]


def _flops(m: int, d: int, r: int, per_sample: bool) -> Dict[str, Dict[str, float]]:
    """Forward / backward FLOPs of the floor (frozen Linear: y and dx) and of the adapter layer."""
    base = 2.0 * m * d * d
    c = 2.0 * m * r * r if per_sample else 0.0
    lora_fwd = 2.0 * m * r * d * 2 + c  # shrink, expand, interaction
    lora_bwd = 2.0 * m * r * d * 4 + (2 * c)  # dT, dB, dA, dx(lora); dS and dC
    return {
        "floor": {"fwd": base, "bwd": base},
        "adapter": {"fwd": base + lora_fwd, "bwd": base + lora_bwd},
    }


def _time_once(fn: Callable[[], object], device, before: Optional[Callable[[], object]] = None) -> float:
    """Wall time of one ``fn(arg)`` in ms (``report.time_once``: CUDA events on the GPU); ``before()`` runs untimed
    first and its result is passed to ``fn``."""
    from . import report

    return report.time_once(fn, device, (before() if before is not None else None,))


def _floor(x, w, b, a, lb, c, scale):
    import torch.nn.functional as F

    return F.linear(x, w, b)


def _unfused(x, w, b, a, lb, c, scale):
    """The PEFT-style composition: base Linear + lora_A, then bmm with the per-sample C, then lora_B."""
    import torch
    import torch.nn.functional as F

    s = F.linear(x, a)
    if c is not None:
        s = torch.bmm(s, c.transpose(1, 2))
    return F.linear(x, w, b) + scale * F.linear(s, lb)


def _methods(device, compiled_unfused: Optional[Callable], compile_note: str):
    """(name, forward or None, note) for every method; forwards take the tensors and return y."""
    from ..ops import _backend
    from ..ops.cflora import cflora_linear

    methods: List[Tuple[str, Optional[Callable], str]] = [
        ("floor", _floor, ""),
        ("unfused", _unfused, ""),
        ("unfused+compile", compiled_unfused, compile_note),
    ]
    for backend in _backend.auto_order("cflora_linear", device.type):  # the op's own automatic order
        reason = _backend.why_unavailable(backend, device.type, "cflora_linear")
        if reason is not None:
            methods.append((f"cflora[{backend}]", None, f"unavailable: {reason}"))
            continue

        def op(x, w, b, a, lb, c, scale, _backend_name=backend):
            return cflora_linear(x, w, b, a, lb, c, scale=scale, backend=_backend_name)

        methods.append((f"cflora[{backend}]", op, ""))
    return methods


def _bench_shape(m, d, r, c_kind, device, dtype, warmup, repeat, compiled_unfused, compile_note):
    """All methods at one shape; a method that fails becomes a row with a note."""
    import torch

    from . import report
    from .e2e_common import error_note

    rows: List[Dict[str, object]] = []
    per_sample = c_kind == "per-sample"
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    t_len = m // SAMPLES
    x = torch.randn(SAMPLES, t_len, d, device=device, dtype=dtype).requires_grad_()
    w = torch.randn(d, d, device=device, dtype=dtype) / d**0.5
    b = torch.randn(d, device=device, dtype=dtype)
    a = (torch.randn(r, d, device=device, dtype=dtype) / d**0.5).requires_grad_()
    lb = (torch.randn(d, r, device=device, dtype=dtype) / r**0.5).requires_grad_()
    c = (
        (torch.randn(SAMPLES, r, r, device=device, dtype=dtype) / r**0.5).requires_grad_()
        if per_sample
        else None
    )
    flops = _flops(m, d, r, per_sample)

    # Methods are timed interleaved, round by round (each round times every method once), so that load from
    # other processes on a shared machine hits all of them alike; each figure is the median over rounds.
    timed = []
    for name, fn, note in _methods(device, compiled_unfused, compile_note):
        row: Dict[str, object] = {"M": m, "d": d, "r": r, "C": c_kind, "method": name, "note": note}
        rows.append(row)
        if fn is None:
            continue
        wrt = [x] if name == "floor" else [t for t in (x, a, lb, c) if t is not None]

        def forward(_=None, fn=fn):
            return fn(x, w, b, a, lb, c, 2.0)

        def backward(y, wrt=wrt):
            torch.autograd.grad(y, wrt, torch.ones_like(y))

        def fwd_bwd(_=None, forward=forward, backward=backward):
            backward(forward())

        try:
            for _ in range(max(1, warmup)):  # the first call compiles / loads; warm-up stays untimed
                fwd_bwd()
            row["peak_mb"] = report.peak_memory_mb(fwd_bwd, device)
        except Exception as exc:  # a failing method becomes a row note, the suite goes on
            row["note"] = error_note(exc)
            continue
        timed.append((row, forward, backward, fwd_bwd, {"fwd": [], "bwd": [], "fb": []}))
    for _ in range(repeat):
        for _row, forward, backward, fwd_bwd, times in timed:
            times["fwd"].append(_time_once(forward, device))
            times["bwd"].append(_time_once(backward, device, before=forward))
            times["fb"].append(_time_once(fwd_bwd, device))
    medians = {id(row): {k: statistics.median(v) for k, v in times.items()} for row, *_, times in timed}
    floor = next((medians[id(row)] for row, *_ in timed if row["method"] == "floor"), None)
    for row, *_ in timed:
        ms = medians[id(row)]
        kind = "floor" if row["method"] == "floor" else "adapter"
        fb_flops = flops[kind]["fwd"] + flops[kind]["bwd"]
        row.update(
            {
                "fwd_ms": ms["fwd"],
                "bwd_ms": ms["bwd"],
                "fwd_bwd_ms": ms["fb"],
                "fwd_bwd_tflops": fb_flops / (ms["fb"] * 1e-3) / 1e12,
                "fwd_vs_floor": ms["fwd"] / floor["fwd"] if floor else None,
                "bwd_vs_floor": ms["bwd"] / floor["bwd"] if floor else None,
                "fwd_bwd_vs_floor": ms["fb"] / floor["fb"] if floor else None,
            }
        )
        row["peak_mb"] = row.pop("peak_mb")
        row["note"] = row.pop("note")  # keep the note as the last column
    return rows


def run_suite(args) -> Tuple[List[Dict[str, object]], Dict[str, object]]:
    import torch

    from . import report

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    size = args.size if args.size in SIZES else "cpu"
    warmup, repeat = int(args.warmup), int(args.repeat)
    if size == "tiny":
        warmup, repeat = min(warmup, 1), min(repeat, 2)
    rows: List[Dict[str, object]] = []
    load_at_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None  # disclosed: shared machines
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover

        def tqdm(it, **_):
            return it

    if size == "tiny":
        compiled_unfused, compile_note = None, "compile skipped at tiny size"
    else:  # one dynamic-shape compile serves every shape (per C kind), instead of one per shape
        compiled_unfused, compile_note = torch.compile(_unfused, fullgraph=True, dynamic=True), ""
    for m, d, r, c_kind in tqdm(_shapes(size), desc="bench cflora", unit="shape"):
        rows += _bench_shape(m, d, r, c_kind, device, dtype, warmup, repeat, compiled_unfused, compile_note)

    def plot(rows_, path):
        timed = [r_ for r_ in rows_ if r_.get("fwd_bwd_vs_floor") is not None]
        return report.bar_chart(
            timed,
            path,
            ("M", "d", "r", "C"),
            "fwd_bwd_vs_floor",
            "method",
            f"CFLoRA forward+backward / frozen Linear ({args.dtype}, {report.machine_label(device)})",
        )

    meta = {
        "title": (
            f"CFLoRA linear, {args.dtype}, dropout 0, W/b frozen, x/A/B/C require grad; per-sample C has "
            f"B={SAMPLES}. Times are medians of {repeat} runs after {warmup} warm-up runs; *_vs_floor divides "
            "by the frozen nn.Linear (forward + input grad) measured in the same run; peak_mb is for one "
            "forward+backward"
            + (" (CPU: growth of the process peak RSS, coarse)" if device.type == "cpu" else "")
            + f". torch threads: {torch.get_num_threads()}"
            + (f"; load average at start: {load_at_start:.1f}" if load_at_start is not None else "")
            + "."
        ),
        "plot": plot,
    }
    return rows, meta
