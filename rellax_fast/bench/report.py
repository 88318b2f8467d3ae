"""Timing, memory and report writing shared by every ``rellax-fast bench`` suite.

Timings (:func:`time_ms`, the one median timer of the benches and of ``benchmarks/``): CUDA events on the GPU
(after a synchronize; or the host clock up to a synchronize), ``time.perf_counter`` on the CPU; the median of
``repeat`` runs after ``warmup`` runs, each optionally preceded, untimed, by a setup and an L2 flush. Peak memory: ``torch.cuda.max_memory_allocated`` on the GPU; on the
CPU, the growth of the process's peak RSS (a coarse, upper-bound figure; reported as such).
Reports: one CSV, one Markdown table and optional matplotlib PNGs per suite, written atomically.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import os
import platform
import resource
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .._io import atomic_write_png, atomic_write_text
from ..train.metrics import markdown_table as _markdown_table


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


L2_FLUSH_BYTES = 256 << 20  # written before a timed call with flush_l2=True, as triton.testing.do_bench does
_flush_buffers: Dict[torch.device, torch.Tensor] = {}


def flush_l2(device: torch.device) -> None:
    """Overwrite ``L2_FLUSH_BYTES`` on a CUDA ``device`` (a no-op on the CPU), so a timed call starts cold."""
    if device.type != "cuda":
        return
    buf = _flush_buffers.get(device)
    if buf is None:
        buf = _flush_buffers[device] = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device)
    buf.zero_()


def time_once(
    fn: Callable[..., object], device: torch.device, args: tuple = (), cuda_events: bool = True
) -> float:
    """Milliseconds of one ``fn(*args)``, started after a synchronize: on a GPU timed by CUDA events, or with
    ``cuda_events=False`` by the host clock up to a synchronize; ``time.perf_counter`` on the CPU."""
    sync(device)
    if device.type == "cuda" and cuda_events:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*args)
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn(*args)
    sync(device)
    return (time.perf_counter() - t0) * 1e3


def time_ms(
    fn: Callable[..., object],
    device: torch.device,
    warmup: int = 3,
    repeat: int = 10,
    *,
    before: Optional[Callable[[], object]] = None,
    l2_flush: bool = False,
    cuda_events: bool = True,
) -> float:
    """Median wall time of ``fn()`` in milliseconds over ``repeat`` calls after ``warmup`` untimed ones.

    ``before``: a setup run untimed before every call (warm-up included); ``fn`` then gets its result,
    ``fn(before())`` (e.g. the forward that builds the graph a timed backward needs). ``l2_flush``: on a GPU, the
    L2 cache is overwritten before every timed call. Every timed call starts after a synchronize; on a GPU it is
    timed by CUDA events, or with ``cuda_events=False`` by the host clock up to a synchronize (what
    pytest-benchmark's fixture sees, so that a baseline timed so compares fairly with it): :func:`time_once`."""
    call = fn if before is None else (lambda: fn(before()))
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeat):
        args = () if before is None else (before(),)
        if l2_flush:
            flush_l2(device)
        times.append(time_once(fn, device, args, cuda_events))
    return statistics.median(times)


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> Optional[float]:
    """Peak memory of one ``fn()`` call in MiB: CUDA allocator peak above the starting allocation, or,
    on the CPU, the growth of the process peak RSS (0 when the peak was already higher)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (after - before) / 1024.0


def machine_label(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()}"


def environment_line(device: torch.device) -> str:
    try:
        from importlib.metadata import version

        triton_v = version("triton")
    except Exception:
        triton_v = "none"
    return (
        f"{machine_label(device)}; torch {torch.__version__}; CUDA {torch.version.cuda or 'none'}; "
        f"triton {triton_v}; {_dt.date.today().isoformat()}"
    )


def markdown_table(rows: Sequence[Dict[str, object]], columns: Optional[Sequence[str]] = None) -> str:
    """The bench reports' Markdown table: :func:`rellax_fast.train.metrics.markdown_table` with the columns
    of the first row by default and floats to 4 significant digits; ``(no rows)`` for no rows."""
    if not rows:
        return "(no rows)\n"
    return _markdown_table(rows, columns, float_format=".4g")


def write_reports(rows: List[Dict[str, object]], out_dir: str, name: str, header: str) -> Dict[str, str]:
    """Write ``<name>.csv`` and ``<name>.md`` under ``out_dir``; return their paths."""
    os.makedirs(out_dir, exist_ok=True)
    columns: List[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    csv_path = os.path.join(out_dir, f"{name}.csv")
    md_path = os.path.join(out_dir, f"{name}.md")
    atomic_write_text(csv_path, buf.getvalue())
    atomic_write_text(md_path, f"{header}\n\n{markdown_table(rows, columns)}")
    return {"csv": csv_path, "md": md_path}


def bar_chart(
    rows: Sequence[Dict[str, object]],
    out_path: str,
    label_keys: Sequence[str],
    value_key: str,
    group_key: str,
    title: str,
) -> str:
    """One grouped bar chart (matplotlib, Agg): x = the joined ``label_keys``, bars per ``group_key``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(" ".join(str(r[k]) for k in label_keys) for r in rows))
    groups = list(dict.fromkeys(str(r[group_key]) for r in rows))
    width = 0.8 / max(1, len(groups))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(labels)), 4))
    for gi, g in enumerate(groups):
        vals = []
        for lab in labels:
            match = [
                r for r in rows if str(r[group_key]) == g and " ".join(str(r[k]) for k in label_keys) == lab
            ]
            v = match[0].get(value_key) if match else None
            vals.append(float(v) if isinstance(v, (int, float)) else 0.0)
        ax.bar([i + gi * width for i in range(len(labels))], vals, width, label=g)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))])
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(value_key)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write_png(out_path, fig)
    return out_path


# ------------------------------------------------------------------------------- BENCHMARKS.md sections


def _suite_body(md_text: str) -> str:
    """A suite report's Markdown without its own ``# bench`` heading."""
    lines = md_text.strip().splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    return "\n".join(lines).strip()


def benchmarks_section(
    out_dir: str,
    command: str,
    suites: Sequence[str] = ("cflora", "topk", "e2e"),
    device=None,
    title: str = "GPU check",
) -> str:
    """The Markdown section for one run: card, versions, date, exact command, then each suite's table
    (from ``<out_dir>/<suite>.md``; a missing one is listed as not produced)."""
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        f"## {title}: {machine_label(device)} ({now})",
        "",
        f"- Machine: {environment_line(device)}",
        f"- Command: `{command}`",
        "",
    ]
    for suite in suites:
        path = os.path.join(out_dir, f"{suite}.md")
        parts.append(f"### bench {suite}")
        parts.append("")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as fh:
                parts.append(_suite_body(fh.read()))
        else:
            partial = os.path.join(out_dir, f"{suite}_partial.md")
            if os.path.exists(partial):
                with open(partial, encoding="utf-8") as fh:
                    parts.append(
                        "Run did not finish (timeout or failure); rows measured before it stopped:\n"
                    )
                    parts.append(_suite_body(fh.read()))
            else:
                parts.append(f"Not produced: {path} is missing (the step failed or timed out; see the logs).")
        parts.append("")
    return "\n".join(parts).rstrip() + "\n"


def append_benchmarks_section(
    benchmarks_md: str,
    out_dir: str,
    command: str,
    suites: Sequence[str] = ("cflora", "topk", "e2e"),
    device=None,
    title: str = "GPU check",
) -> str:
    """Append :func:`benchmarks_section` to ``benchmarks_md`` (atomically, :mod:`rellax_fast._io`); return the
    section."""
    section = benchmarks_section(out_dir, command, suites, device, title)
    existing = ""
    if os.path.exists(benchmarks_md):
        with open(benchmarks_md, encoding="utf-8") as fh:
            existing = fh.read()
    if existing and not existing.endswith("\n"):
        existing += "\n"
    text = existing + ("\n" if existing else "# Benchmarks\n\n") + section
    atomic_write_text(benchmarks_md, text)
    return section
