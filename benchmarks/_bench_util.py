"""Cases, timing and ``extra_info`` shared by the pytest-benchmark suite (see conftest.py).

Timing semantics (the same for the benchmark fixture and for the in-test baseline, so their ratio is
fair): every timed call is preceded, untimed, by its setup (for a backward: the forward that builds the
graph) and, on a GPU, by an L2 flush (a 256 MiB write, as ``triton.testing.do_bench`` does) and a
``torch.cuda.synchronize``; the timed call ends with a ``synchronize``, so the clock sees the kernels
finish, not just their launch. Warm-up rounds run first and are not timed.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

ROUNDS = {"tiny": 3, "cpu": 10, "gpu": 30}
WARMUP = {"tiny": 1, "cpu": 2, "gpu": 5}
PHASES = ("fwd", "bwd", "fwd_bwd")


# ------------------------------------------------------------------------------------------------ cases


@dataclasses.dataclass(frozen=True)
class CFLoRACase:
    m: int
    d: int
    r: int
    c_kind: str  # "per-sample" or "none"
    method: str  # "floor", "unfused" or "cflora[<backend>]"
    phase: str

    @property
    def id(self) -> str:
        return f"M{self.m}-d{self.d}-r{self.r}-C{self.c_kind}-{self.method}-{self.phase}"


@dataclasses.dataclass(frozen=True)
class TopkCase:
    users: int
    d: int
    k: int
    method: str  # "torch-padded" or "topk[<backend>]"

    @property
    def id(self) -> str:
        return f"U{self.users}-d{self.d}-k{self.k}-{self.method}"


def available_backends(op: str, device: torch.device) -> List[str]:
    """Backends that can run ``op`` on ``device`` here; the reference is left out on the GPU (it is the
    oracle, not a contender) and the Triton interpreter is never benchmarked."""
    from rellax_fast.ops import availability

    names = [b for b, why in availability(op, device.type).items() if why is None]
    return [b for b in names if not (device.type == "cuda" and b == "reference")]


def cflora_cases(size: str, device: torch.device) -> List[CFLoRACase]:
    from rellax_fast.bench.cflora import _shapes

    methods = ["floor", "unfused"] + [f"cflora[{b}]" for b in available_backends("cflora_linear", device)]
    return [
        CFLoRACase(m, d, r, c, method, phase)
        for (m, d, r, c) in _shapes(size)
        for method in methods
        for phase in PHASES
    ]


def topk_cases(size: str, device: torch.device) -> List[TopkCase]:
    from rellax_fast.bench.topk import SIZES

    cfg = SIZES[size]
    backends = available_backends("semantic_topk", device)
    if size != "tiny":  # the reference loops per user in Python: an oracle, too slow to time at scale
        backends = [b for b in backends if b != "reference"]
    methods = ["torch-padded"] + [f"topk[{b}]" for b in backends]
    return [TopkCase(cfg["users"], d, k, m) for d in cfg["dims"] for k in cfg["ks"] for m in methods]


def train_providers(device: torch.device) -> List[Tuple[str, str, Optional[str]]]:
    """(name, kind, backend) rows of ``bench e2e``'s training table, minus the compiled ones (a compile per
    test would dominate the suite; ``rellax-fast bench e2e`` measures them)."""
    from rellax_fast.bench.e2e import TRAIN_PROVIDERS, is_compiled

    return [p for p in TRAIN_PROVIDERS if not is_compiled(p[1]) and p[2] != "reference"]


# ----------------------------------------------------------------------------------------------- timing


def _prepared(before: Optional[Callable[[], Any]], device: torch.device) -> Tuple[tuple, dict]:
    from rellax_fast.bench.report import flush_l2, sync

    arg = before() if before is not None else None
    flush_l2(device)
    sync(device)
    return (arg,), {}


def median_ms(
    fn: Callable[[Any], Any],
    device: torch.device,
    rounds: int,
    warmup: int,
    before: Optional[Callable[[], Any]] = None,
) -> float:
    """Median wall time in ms of ``fn(before())`` with the module's timing semantics (the in-test baseline):
    ``rellax_fast.bench.report.time_ms`` on the host clock, the L2 flushed before every timed call."""
    from rellax_fast.bench.report import time_ms

    return time_ms(
        fn, device, warmup, rounds, before=before or (lambda: None), l2_flush=True, cuda_events=False
    )


def run_benchmark(
    benchmark,
    fn: Callable[[Any], Any],
    device: torch.device,
    rounds: int,
    warmup: int,
    before: Optional[Callable[[], Any]] = None,
) -> Optional[float]:
    """Time ``fn(before())`` with the benchmark fixture; returns its median in ms (None when benchmarks are
    disabled, e.g. ``--benchmark-disable``, where the fixture runs the call once untimed)."""

    from rellax_fast.bench.report import sync

    def target(arg):
        out = fn(arg)
        sync(device)
        return out

    benchmark.pedantic(
        target, setup=lambda: _prepared(before, device), rounds=rounds, warmup_rounds=warmup, iterations=1
    )
    stats = getattr(benchmark, "stats", None)
    inner = getattr(stats, "stats", None)
    return None if inner is None else inner.median * 1e3


def record(
    benchmark,
    *,
    device: torch.device,
    dtype: torch.dtype,
    shape: Dict[str, Any],
    backend: str,
    median: Optional[float],
    baseline: str,
    baseline_ms: float,
    **more: Any,
) -> None:
    """``extra_info`` of one benchmark: device, dtype, shape, backend and the ratio to its baseline measured
    in the same test (``ratio_to_baseline`` = this median / the baseline's median; < 1 is faster)."""
    from rellax_fast.bench.report import machine_label

    benchmark.extra_info.update(
        {
            "device": machine_label(device),
            "dtype": str(dtype).replace("torch.", ""),
            "shape": shape,
            "backend": backend,
            "baseline": baseline,
            "baseline_median_ms": baseline_ms,
            "median_ms": median,
            "ratio_to_baseline": None if median is None else median / baseline_ms,
            "torch_threads": torch.get_num_threads(),
            **more,
        }
    )
