"""Host cost of the Triton CFLoRA launchers themselves, on any machine (no GPU): the Python that plans and
issues one forward and one backward, with every @triton.jit kernel's ``run`` replaced by the compile gate's
launch capture (tests/ops/triton_aot.py ``capture_launches``), so neither Triton's argument binding and
specialisation nor any device work is timed. What it measures runs on the GPU host unchanged before each real
launch; the H200 run of 2026-12-04 found about 1 ms of host time per forward+backward in the Triton backend
(BENCHMARKS.md).

The shapes only steer the plan (which kernels, how many splits), not the time: by default the headline's
per-sample C over 16 samples at r = 16, bf16, on CPU tensors of M = 64 rows, d = 256. CPU tensors plan as the
sm_90 card the compile gate assumes (TMA GEMMs, 132 SMs). To compare two commits, run it from each checkout in
alternation (``PYTHONPATH=<tree>``) on the same machine.

    python scripts/triton_host_cost.py [--rounds 7] [--calls 200] [--dropout 0.1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "ops"))
from triton_aot import capture_launches  # noqa: E402  (the compile gate's capture; standard library only)


def _kernels():
    """Every ``*_kernel`` JITFunction of rellax_fast.kernels.cflora."""
    import triton

    from rellax_fast.kernels import cflora as K

    jit = triton.runtime.jit.JITFunction
    return [f for n, f in vars(K).items() if isinstance(f, jit) and n.endswith("_kernel")]


def _calls(dropout: float):
    """(forward, backward) closures over fixed CPU bf16 inputs (per-sample C, 16 samples, r = 16)."""
    import torch

    from rellax_fast.kernels import cflora as K

    g = torch.Generator().manual_seed(0)
    m, d, r, samples, dt = 64, 256, 16, 16, torch.bfloat16
    x, w, gy = (torch.randn(*shape, generator=g).to(dt) for shape in ((m, d), (d, d), (m, d)))
    b, a = torch.randn(d, generator=g).to(dt), torch.randn(r, d, generator=g).to(dt)
    lb, c = torch.randn(d, r, generator=g).to(dt), torch.randn(samples, r, r, generator=g).to(dt)
    seed = 1234 if dropout else None

    def forward():
        return K.cflora_fwd(x, w, b, a, lb, c, m // samples, 2.0, dropout, seed)

    _, s, t = forward()
    needs = (True, False, False, True, True, True)  # dx, dA, dB, dC; W and b frozen

    def backward():
        return K.cflora_bwd(gy, x, w, a, lb, c, s, t, m // samples, 2.0, dropout, seed, needs)

    return forward, backward


def measure(rounds: int = 7, calls: int = 200, dropout: float = 0.0) -> dict:
    """{"launches": {kernel: n per forward+backward}, "us": {"forward": median us, "backward": ...}}."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("triton_host_cost: unset TRITON_INTERPRET (the interpreter plans different blocks)")
    with capture_launches(_kernels()) as launched:
        forward, backward = _calls(dropout)
        launched.clear()
        forward()
        backward()
        launches = dict(sorted(Counter(launch.name for launch in launched).items()))
        us = {}
        for name, fn in (("forward", forward), ("backward", backward)):
            times = []
            for _ in range(rounds):
                launched.clear()
                t0 = time.perf_counter()
                for _ in range(calls):
                    fn()
                times.append((time.perf_counter() - t0) / calls * 1e6)
            us[name] = round(statistics.median(times), 1)
    return {"launches": launches, "us": us}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="rounds; the median is reported (default: 7)")
    parser.add_argument("--calls", type=int, default=200, help="calls per round (default: 200)")
    parser.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout p (default: 0)")
    args = parser.parse_args()
    import torch

    import rellax_fast

    torch.set_num_threads(1)
    result = measure(args.rounds, args.calls, args.dropout)
    print(json.dumps({"tree": rellax_fast.__file__, "dropout": args.dropout, **result}))


if __name__ == "__main__":
    main()
