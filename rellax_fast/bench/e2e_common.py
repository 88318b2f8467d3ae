"""What every ``rellax-fast bench e2e`` measurement shares: the report columns, one row, a ratio, a failure
note (:func:`error_note`, also the note of a failed method in ``bench cflora``), and the CUDA memory
accounting between providers. Imports no torch at module level."""

from __future__ import annotations

import gc
import math
from typing import Callable, Dict, Optional

COLUMNS = (
    "phase",
    "provider",
    "batch",
    "seq",
    "ms",
    "tokens_per_s",
    "peak_mem_mb",
    "resident_mb",
    "total_peak_mb",
    "baseline",
    "speed_vs_baseline",
    "mem_vs_baseline",
    "speed_vs_compiled",
    "loss",
    "note",
)


def free_memory(device) -> None:
    """Collect the last provider's model and optimizer and hand cached CUDA blocks back."""
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def allocated_mb(device) -> Optional[float]:
    """CUDA memory held by live tensors, MiB (None off CUDA)."""
    import torch

    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return torch.cuda.memory_allocated(device) / 2**20


def error_note(exc: BaseException) -> str:
    """``failed: <type>: <message>``: the message's white space (newlines included) folded to single spaces and
    cut at 300 characters, so that a report row stays one line."""
    text = " ".join(str(exc).split())
    return f"failed: {type(exc).__name__}: {text[:300]}"


def row(phase: str, provider: str, batch: int, seq: Optional[int], **values) -> Dict[str, object]:
    """One report row: every column of :data:`COLUMNS` (None where not measured) plus ``values``."""
    out = {c: None for c in COLUMNS}
    out.update(phase=phase, provider=provider, batch=batch, seq=seq)
    out.update(values)
    return out


def ratio(num: Optional[float], den: Optional[float]) -> Optional[float]:
    """``num / den``, or None when either is missing, not finite, or ``den`` is not positive."""
    if num is None or den is None or not math.isfinite(num) or not math.isfinite(den) or den <= 0:
        return None
    return num / den


def interleaved_ms(
    calls: Dict[str, Callable[[], object]], device, warmup: int, repeat: int
) -> Dict[str, float]:
    """Median wall time (ms) of each call, measured interleaved: ``warmup`` untimed rounds, then ``repeat``
    timed rounds that each run every call once, in an order rotated every round. On a machine whose load
    drifts (a shared CPU), every call sees the same conditions, so their ratios stay meaningful."""
    import statistics

    from .report import time_once

    names = list(calls)
    for _ in range(warmup):
        for name in names:
            calls[name]()
    times: Dict[str, list] = {name: [] for name in names}
    for i in range(repeat):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            times[name].append(time_once(calls[name], device, cuda_events=False))
    return {name: statistics.median(t) for name, t in times.items()}
