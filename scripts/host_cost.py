"""Per-call host cost of ``cflora_linear`` at one decode step, against the unfused composition, in this tree.

Times, in one process and one thread, the forward (under no_grad: inference; with grad: training) and the
forward+backward of a CFLoRA layer at one decode step of 16 samples (M = 16 rows, r = 8, per-sample C), by
default at d = 64, where the arithmetic is about a microsecond and the per-call Python and dispatcher cost is
the time (``--d 576``, SmolLM2-135M's hidden size, adds the small GEMMs). Methods run interleaved, one block
of calls each per round; each figure is the median over rounds. To compare two commits, run it from each
checkout in alternation (``PYTHONPATH=<tree>``) on the same machine.

    python scripts/host_cost.py [--backend cpp] [--d 64] [--rounds 15] [--calls 200]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

import rellax_fast
from rellax_fast.ops import cflora_linear


def _inputs(m: int, d: int, r: int, samples: int):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, d, generator=g)
    w, b = torch.randn(d, d, generator=g) / d**0.5, torch.randn(d, generator=g)
    a = (torch.randn(r, d, generator=g) / d**0.5).requires_grad_()
    lb = (torch.randn(d, r, generator=g) / r**0.5).requires_grad_()
    c = torch.randn(samples, r, r, generator=g).requires_grad_()
    return x, w, b, a, lb, c


def _methods(backend: str, x, w, b, a, lb, c):
    rows = x.shape[0] // c.shape[0]

    def unfused():
        s = (x @ a.T).view(c.shape[0], rows, -1)
        return F.linear(x, w, b) + torch.bmm(s, c.transpose(1, 2)).reshape(x.shape[0], -1) @ lb.T

    def fused():
        return cflora_linear(x, w, b, a, lb, c, backend=backend)

    return {"unfused": unfused, f"cflora[{backend}]": fused}


def _per_call_us(fn, calls: int, phase: str) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        if phase == "forward+backward":
            fn().sum().backward()
        elif phase == "forward (grad)":
            fn()
        else:
            with torch.no_grad():
                fn()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="cpp", help="cflora_linear backend (default: cpp)")
    parser.add_argument("--d", type=int, default=64, help="d_in = d_out (default: 64)")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds (default: 15)")
    parser.add_argument("--calls", type=int, default=200, help="calls per method per round (default: 200)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    methods = _methods(args.backend, *_inputs(16, args.d, 8, 16))
    out = {}
    for phase in ("forward (no_grad)", "forward (grad)", "forward+backward"):
        times = {name: [] for name in methods}
        for fn in methods.values():  # warm-up
            _per_call_us(fn, args.calls, phase)
        for _ in range(args.rounds):
            for name, fn in methods.items():
                times[name].append(_per_call_us(fn, args.calls, phase))
        out[phase] = {name: round(statistics.median(ts), 1) for name, ts in times.items()}
    print(json.dumps({"tree": rellax_fast.__file__, "d": args.d, "us_per_call": out}))


if __name__ == "__main__":
    main()
