#!/usr/bin/env python3
"""scripts/gpu_lean.py - the headline-first GPU run for a short, lent window (<= 7 min after the machine is up).

What a GPU window runs FIRST (scripts/gpu_check.sh is the long, full version). It owns the step plan, the
hard caps, the results file and the summary. In order:

  interpreter         pick the python that imports a CUDA torch (not a name: `python` may be a CPU one)
  build               start the CUDA build of rellax_fast._C in the background (setup.py build_ext --inplace)
  worker-start        a worker process imports torch / rellax_fast once and runs the in-process steps below
  env                 card, capability, versions, git revision
  triton-correctness  max relative error vs an fp32 torch reference (TF32 off), y and every gradient, at
                        headline   bf16, M = 16 samples x 1024 tokens = 16384, d_in = d_out = 4096, r = 16,
                                   per-sample C, dropout 0 and 0.1
                        decode     bf16, 64 samples x 1 row, r = 16, per-sample C
                        fp32-tf32  fp32 with TF32, 4 x 1024 rows, r = 128, per-sample C
  triton-timing       medians (CUDA events, L2 flushed before every repeat) of forward+backward for: the frozen
                      linear (y and dx only: the floor), the unfused PEFT-style composition, and cflora[triton]
                      (on sm_90+ its forward and dx GEMMs use TMA on a persistent grid; cflora[triton,no-tma]
                      times the pointer GEMMs on the same card: the A/B)
  calibrate           cuBLAS bf16 (and TF32) GEMM TFLOP/s: what "share of peak" is measured against
  triton-profile      torch.profiler per-kernel breakdown of cflora[triton] at the headline shape (us, TFLOP/s,
                      share of the cuBLAS rate) from the kernels' FLOP model
  build-wait          wait for the background build (its cap counts from the start)
  cuda-*              correctness, timing and profile of the cuda backend (a fresh worker loads the new _C)
  topk                semantic_topk: triton, cuda and torch (per-user GEMM + mask + topk) at an ML-1M-like
                      setting (6,040 users, every position a sample, d = 384, k = 10) and at L = 16k
                      (4 users x 16,384 behaviours, 20,000 targets); all methods must agree on the k-th score
  tests               pytest -m cuda with the time left
  e2e                 rellax-fast bench e2e --size 1b, only if time remains

Robust to being cut off: every measurement is appended to <out>/results.jsonl (one JSON object a line,
flushed and fsynced) as soon as it exists; every step has a hard cap (a step over it is killed with its
process group, recorded as a timeout, and the run goes on with a fresh worker); the summary is printed
last, written to <out>/summary.md, and rebuildable from the results alone:
    python3 scripts/gpu_lean.py --summary gpu_lean_out/results.jsonl

--simulate runs every step's plumbing on the CPU at tiny shapes (Triton interpreter for "triton", the C++
CPU backend for "cuda", a stand-in build), so that the script cannot rot between GPU windows; CI runs it
(tests/test_gpu_lean.py).

Usage:   python3 scripts/gpu_lean.py [--out DIR] [--budget S] [--python PY]      (or bash scripts/gpu_lean.sh)
         python3 scripts/gpu_lean.py --simulate --out /tmp/lean
Exit status: 0 when every step that ran passed, 1 otherwise. The driver needs only the standard library.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import queue
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
BUDGET_S = 420  # 7 minutes of wall time after the machine is up
MIN_STEP_S = 5  # a step with less than this left of the budget is skipped
RESULTS = "results.jsonl"

# Hard caps in seconds. The fixed steps' caps add up to the budget (tested); `tests` and `e2e` get the time
# that is left. The build runs beside the triton steps; its cap counts from its start.
CAPS = {
    "interpreter": 20,
    "build": 300,
    "worker-start": 30,
    "env": 10,
    "triton-correctness": 60,
    "triton-timing": 40,
    "calibrate": 10,
    "triton-profile": 20,
    "build-wait": 80,
    "cuda-correctness": 30,
    "cuda-timing": 25,
    "cuda-profile": 15,
    "topk": 50,
    "tests": None,
    "e2e": None,  # None: the time left
}
FIXED_STEPS = (
    "interpreter",
    "worker-start",
    "env",
    "triton-correctness",
    "triton-timing",
    "calibrate",
    "triton-profile",
    "build-wait",
    "worker-start",
    "cuda-correctness",
    "cuda-timing",
    "cuda-profile",
    "topk",
)
E2E_MIN_S = 60  # e2e runs only with at least this much left

# (dtype, samples, tokens per sample, d_in = d_out, r, TF32, dropouts); M = samples * tokens
SHAPES = {
    "headline": ("bfloat16", 16, 1024, 4096, 16, False, (0.0, 0.1)),
    "decode": ("bfloat16", 64, 1, 4096, 16, False, (0.0,)),
    "fp32-tf32-r128": ("float32", 4, 1024, 4096, 128, True, (0.0,)),
}
SIM_SHAPES = {
    "headline": ("bfloat16", 2, 12, 40, 4, False, (0.0, 0.1)),
    "decode": ("bfloat16", 3, 1, 40, 4, False, (0.0,)),
    "fp32-tf32-r128": ("float32", 2, 6, 24, 20, True, (0.0,)),
}
# max relative error (max |got - ref| / max |ref|) allowed per dtype against the fp32 reference
REL_TOL = {"bfloat16": 3e-2, "float32": 1e-2}
TOPK = {  # setting: (kind, users, length or None, targets or None, d, k)
    "ml-1m-like": ("ml1m", 6040, None, None, 384, 10),
    "L=16k": ("lifelong", 4, 16384, 20000, 384, 10),
}
SIM_TOPK = {"ml-1m-like": ("ml1m", 4, None, None, 16, 5), "L=16k": ("lifelong", 2, 70, 20, 16, 5)}
TOPK_TOL = 1e-3  # cosine scores of fp32 embeddings


# ------------------------------------------------------------------------------------------------------------
# results file: one JSON object a line, appended as soon as a measurement exists
# ------------------------------------------------------------------------------------------------------------


def append_record(path: Path, record: dict) -> None:
    """Append one record as a single write to an O_APPEND file, flushed and fsynced: a run killed at any
    point leaves every earlier record intact (at worst a torn last line, which read_records skips)."""
    line = (json.dumps(dict(record, t=round(time.time(), 3)), default=str) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_records(path: Path) -> List[dict]:
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line torn by a kill
    return records


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------------------
# summary (built only from the records, so --summary rebuilds it after a cut-off run)
# ------------------------------------------------------------------------------------------------------------


def _table(title: str, columns: Sequence[str], rows: Sequence[Sequence[object]]) -> List[str]:
    if not rows:
        return []
    out = [f"## {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return out + [""]


def _fmt(v, spec=".3g"):
    return "-" if v is None else format(v, spec)


def _timing_rows(records: List[dict]) -> List[list]:
    timing = [r for r in records if r.get("kind") == "timing"]
    frozen = [r for r in timing if r["method"] == "frozen-linear"]
    floor = {(r["shape"], r["dropout"]): r["median_ms"] for r in frozen}
    graph_floor = {(r["shape"], r["dropout"]): r.get("graph_ms") for r in frozen}
    rows = []
    for r in timing:
        key = (r["shape"], r["dropout"])
        base, graph_base, graph = floor.get(key), graph_floor.get(key), r.get("graph_ms")
        rows.append(
            [
                r["shape"],
                r["dropout"],
                r["method"],
                _fmt(r["median_ms"], ".4g"),
                _fmt(r["median_ms"] / base if base else None, ".3f"),
                _fmt(r.get("host_ms"), ".3g"),
                _fmt(graph, ".4g"),
                _fmt(graph / graph_base if graph and graph_base else None, ".3f"),
                r["repeats"],
            ]
        )
    return rows


def summarize(records: List[dict]) -> str:
    """The summary tables (markdown) of one run's records."""
    lines = ["# gpu_lean summary", ""]
    for r in records:
        if r.get("kind") in ("interpreter", "env"):
            lines.append(
                f"- {r['kind']}: " + ", ".join(f"{k}={v}" for k, v in r.items() if k not in ("kind", "t"))
            )
    lines.append("")
    steps = [r for r in records if r.get("kind") == "step"]
    lines += _table(
        "steps",
        ["step", "status", "seconds", "note"],
        [[r["step"], r["status"], _fmt(r["seconds"], ".1f"), r.get("note", "")] for r in steps],
    )
    corr = [r for r in records if r.get("kind") == "correctness"]
    lines += _table(
        "correctness: max relative error vs the fp32 torch reference",
        ["backend", "shape", "dropout", "tensor", "max rel err", "tolerance", "ok"],
        [
            [
                r["backend"],
                r["shape"],
                r["dropout"],
                r["tensor"],
                _fmt(r["max_rel_err"]),
                r["tolerance"],
                "ok" if r["ok"] else "FAIL",
            ]
            for r in corr
        ],
    )
    lines += _table(
        "forward+backward: median ms (L2 flushed), ratio to the frozen linear; host ms = time to issue one "
        "call; graph = CUDA-graph replay (no host overhead)",
        ["shape", "dropout", "method", "ms", "x frozen", "host ms", "graph ms", "graph x frozen", "repeats"],
        _timing_rows(records),
    )
    cal = [r for r in records if r.get("kind") == "calibration"]
    lines += _table(
        "cuBLAS calibration",
        ["dtype", "m=n=k", "TFLOP/s"],
        [[r["dtype"], r["size"], _fmt(r["tflops"], ".4g")] for r in cal],
    )
    kern = [r for r in records if r.get("kind") == "kernel"]
    lines += _table(
        "per-kernel breakdown (torch.profiler, per forward+backward)",
        ["backend", "shape", "kernel", "us", "calls", "TFLOP/s", "share of cuBLAS"],
        [
            [
                r["backend"],
                r["shape"],
                r["kernel"][:60],
                _fmt(r["us"], ".4g"),
                r["calls"],
                _fmt(r.get("tflops"), ".4g"),
                _fmt(r.get("share_of_peak"), ".0%"),
            ]
            for r in kern
        ],
    )
    topk = [r for r in records if r.get("kind") == "topk"]
    lines += _table(
        "semantic_topk: median ms, k-th score gap to the first method",
        ["setting", "samples", "method", "ms", "k-th gap", "agree"],
        [
            [
                r["setting"],
                r["samples"],
                r["method"],
                _fmt(r["median_ms"], ".4g"),
                _fmt(r["kth_gap"]),
                "yes" if r["agree"] else "NO",
            ]
            for r in topk
        ],
    )
    return "\n".join(lines).rstrip() + "\n"


# ------------------------------------------------------------------------------------------------------------
# interpreter detection
# ------------------------------------------------------------------------------------------------------------

PROBE = (
    "import json, sys, torch; print(json.dumps({'python': sys.executable, 'torch': torch.__version__, "
    "'cuda': torch.version.cuda, 'gpu': torch.cuda.is_available()}))"
)


def candidate_pythons(explicit: Optional[str]) -> List[str]:
    names = [
        explicit,
        os.environ.get("PYTHON"),
        "python3",
        "python",
        sys.executable,
        "/usr/bin/python3",
        "/opt/conda/bin/python",
    ]
    seen, out = set(), []
    for name in names:
        path = shutil.which(name) if name else None
        if path and os.path.realpath(path) not in seen:
            seen.add(os.path.realpath(path))
            out.append(path)
    return out


def pick_interpreter(candidates: Sequence[str], need_cuda: bool, timeout: float) -> tuple:
    """(python, probe dict, notes): the first candidate whose torch is a CUDA build that sees a GPU (with
    need_cuda), or that imports torch at all (without); (None, None, notes) when none does."""
    notes = []
    for cand in candidates:
        try:
            out = subprocess.run([cand, "-c", PROBE], capture_output=True, text=True, timeout=timeout)
            info = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else None
        except (OSError, subprocess.TimeoutExpired, ValueError, IndexError) as exc:
            notes.append(f"{cand}: {type(exc).__name__}")
            continue
        if info is None:
            notes.append(f"{cand}: no torch (rc {out.returncode})")
        elif need_cuda and not (info.get("cuda") and info.get("gpu")):
            notes.append(f"{cand}: torch {info.get('torch')} without a usable CUDA GPU")
        else:
            return cand, info, notes
    return None, None, notes


# ------------------------------------------------------------------------------------------------------------
# worker: the in-process steps (imports torch; run by the chosen interpreter)
# ------------------------------------------------------------------------------------------------------------


class Ctx:
    """What the worker's steps share: the mode, the device, the shapes and the results file."""

    def __init__(self, simulate: bool, results: Path):
        import torch

        self.torch, self.simulate, self.results = torch, simulate, results
        self.device = torch.device("cpu" if simulate else "cuda")
        self.shapes = SIM_SHAPES if simulate else SHAPES
        self.topk = SIM_TOPK if simulate else TOPK
        self.repeats, self.warmup = (2, 0) if simulate else (20, 3)
        flush_bytes = (1 << 20) if simulate else (256 << 20)  # > 2x the largest L2 (H200: 50 MB)
        self.flush_buf = torch.empty(flush_bytes // 4, dtype=torch.float32, device=self.device)

    def backend(self, name: str) -> str:
        """ "cuda" is the C++ CPU backend ("cpp") in --simulate; "triton" runs under the interpreter there."""
        return "cpp" if self.simulate and name == "cuda" else name

    def record(self, **rec) -> None:
        append_record(self.results, rec)

    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def median_ms(self, fn: Callable[[], object], repeats: Optional[int] = None) -> float:
        """Median of ``repeats`` timed calls (CUDA events on the GPU), the L2 flushed before each."""
        torch = self.torch
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(repeats or self.repeats):
            self.flush_buf.zero_()
            self.sync()
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    def host_ms(self, fn: Callable[[], object]) -> float:
        """Median wall time the host spends issuing one call (from an idle, synchronised device; no sync
        inside the timed span). Near the device time: the call blocks on the device (a sync) or the host is
        the bottleneck; far below it: launches are queued ahead of the device, as they should be."""
        times = []
        for _ in range(self.repeats):
            self.sync()
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        self.sync()
        return statistics.median(times)

    def graph_ms(self, fn: Callable[[], object]) -> Optional[float]:
        """Median of replays of ``fn`` captured in a CUDA graph (host overhead removed: the device time of
        the work alone). None on the CPU (--simulate) or when the capture fails (recorded by the caller)."""
        torch = self.torch
        if self.device.type != "cuda":
            return None
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # warm up on a side stream, as torch.cuda.graph's docs ask
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return self.median_ms(graph.replay)


def make_case(ctx: Ctx, shape: str, seed: int = 0) -> dict:
    """Random inputs of one shape: x (samples, tokens, d) (or (samples, d) for one row each), W, b, A, B (non-zero),
    a per-sample C = I + noise, and dy."""
    torch = ctx.torch
    dtype_name, samples, tokens, d, r, _, _ = ctx.shapes[shape]
    dtype = getattr(torch, dtype_name)
    gen = torch.Generator(device=ctx.device).manual_seed(seed)

    def rnd(*size, std=1.0):
        return (torch.randn(*size, generator=gen, device=ctx.device) * std).to(dtype)

    x_shape = (samples, d) if tokens == 1 else (samples, tokens, d)
    eye = torch.eye(r, device=ctx.device, dtype=dtype)
    case = dict(
        x=rnd(*x_shape),
        w=rnd(d, d, std=d**-0.5),
        b=rnd(d),
        a=rnd(r, d, std=d**-0.5),
        lb=rnd(d, r, std=r**-0.5),
        c=rnd(samples, r, r, std=r**-0.5) + eye,
        dy=rnd(*x_shape[:-1], d),
    )
    case.update(scale=2.0, m=samples * tokens, d=d, r=r, tf32=ctx.shapes[shape][5])
    return case


def _grads_of(torch, y, inputs, dy):
    return [y.detach(), *torch.autograd.grad(y, inputs, dy)]


def fused_fwd_bwd(ctx: Ctx, case: dict, backend: str, p: float, ref: bool = False) -> list:
    """[y, dx, dA, dB, dC] of cflora_linear (or of its reference, ref=True) with W and b frozen."""
    from rellax_fast.ops.cflora import cflora_linear, cflora_linear_ref

    x, a, lb, c = (case[k].detach().requires_grad_() for k in ("x", "a", "lb", "c"))
    kw = dict(scale=case["scale"], dropout_p=p, seed=1234)
    if ref:
        y = cflora_linear_ref(x, case["w"], case["b"], a, lb, c, **kw)
    else:
        y = cflora_linear(x, case["w"], case["b"], a, lb, c, backend=backend, **kw)
    return _grads_of(ctx.torch, y, [x, a, lb, c], case["dy"])


def frozen_fwd_bwd(ctx: Ctx, case: dict, p: float) -> list:
    """The floor: the frozen base linear's y and dx."""
    x = case["x"].detach().requires_grad_()
    y = ctx.torch.nn.functional.linear(x, case["w"], case["b"])
    return _grads_of(ctx.torch, y, [x], case["dy"])


def unfused_fwd_bwd(ctx: Ctx, case: dict, p: float) -> list:
    """The PEFT-style composition: base linear + lora_B(C·lora_A(dropout(x))) * scale, autograd throughout."""
    torch, F = ctx.torch, ctx.torch.nn.functional
    x, a, lb, c = (case[k].detach().requires_grad_() for k in ("x", "a", "lb", "c"))
    s = F.linear(F.dropout(x, p) if p else x, a)
    s3 = s if s.dim() == 3 else s.unsqueeze(1)
    t = torch.bmm(s3, c.transpose(1, 2)).view_as(s)
    y = F.linear(x, case["w"], case["b"]) + F.linear(t, lb) * case["scale"]
    return _grads_of(torch, y, [x, a, lb, c], case["dy"])


class _TF32:
    def __init__(self, torch, on: bool):
        self.torch, self.on = torch, on

    def __enter__(self):
        self.old = self.torch.backends.cuda.matmul.allow_tf32
        self.torch.backends.cuda.matmul.allow_tf32 = self.on

    def __exit__(self, *exc):
        self.torch.backends.cuda.matmul.allow_tf32 = self.old


def step_correctness(ctx: Ctx, backend_name: str):
    """Max relative error of y, dx, dA, dB, dC against the fp32 reference (TF32 off), every shape."""
    torch, backend, ok = ctx.torch, ctx.backend(backend_name), True
    for shape, spec in ctx.shapes.items():
        for p in spec[6]:
            case = make_case(ctx, shape)
            with _TF32(torch, case["tf32"]):
                got = fused_fwd_bwd(ctx, case, backend, p)
            up = {k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in case.items()}
            with _TF32(torch, False):
                want = fused_fwd_bwd(ctx, up, backend, p, ref=True)
            tol = REL_TOL[spec[0]]
            for tensor, g, w in zip(("y", "dx", "dA", "dB", "dC"), got, want):
                err = float((g.float() - w).abs().max() / w.abs().max().clamp_min(1e-30))
                good = err <= tol and bool(torch.isfinite(g).all())
                ok &= good
                ctx.record(
                    kind="correctness",
                    backend=backend_name,
                    shape=shape,
                    dropout=p,
                    tensor=tensor,
                    max_rel_err=err,
                    tolerance=tol,
                    ok=good,
                )
            del got, want, up, case
    return ok, "" if ok else "max relative error over tolerance (see the correctness table)"


def _timing_methods(ctx: Ctx, case: dict, p: float, backend_name: str, baselines: bool) -> list:
    backend = ctx.backend(backend_name)
    methods = [(f"cflora[{backend_name}]", lambda: fused_fwd_bwd(ctx, case, backend, p))]
    if backend_name == "triton":  # the A/B of the TMA + persistent GEMMs (sm_90+) on the same card
        methods.append(
            ("cflora[triton,no-tma]", _pointer_gemms(lambda: fused_fwd_bwd(ctx, case, backend, p)))
        )
    if baselines:
        methods = [
            ("frozen-linear", lambda: frozen_fwd_bwd(ctx, case, p)),
            ("unfused-peft", lambda: unfused_fwd_bwd(ctx, case, p)),
        ] + methods
    return methods


def _pointer_gemms(fn):
    """``fn`` with kernels.cflora.USE_TMA off: the forward and dx GEMMs take the pointer kernels (as on sm_80)."""
    from rellax_fast.kernels import cflora as kernels

    def run():
        kernels.USE_TMA = False
        try:
            return fn()
        finally:
            kernels.USE_TMA = True

    return run


def step_timing(ctx: Ctx, backend_name: str, baselines: bool):
    """Median forward+backward per shape: frozen linear and unfused (baselines) and the fused backend."""
    for shape, spec in ctx.shapes.items():
        for p in spec[6]:
            case = make_case(ctx, shape)
            with _TF32(ctx.torch, case["tf32"]):
                for method, fn in _timing_methods(ctx, case, p, backend_name, baselines):
                    median = ctx.median_ms(fn)
                    graph, note = _graph_or_note(ctx, fn)
                    ctx.record(
                        kind="timing",
                        backend=backend_name,
                        shape=shape,
                        dropout=p,
                        method=method,
                        median_ms=median,
                        host_ms=ctx.host_ms(fn),
                        graph_ms=graph,
                        note=note,
                        repeats=ctx.repeats,
                        m=case["m"],
                        d=case["d"],
                        r=case["r"],
                    )
    return True, ""


def _graph_or_note(ctx: Ctx, fn) -> tuple:
    """(CUDA-graph replay median, "") or (None, why): a capture that fails is a note, not a failed step."""
    try:
        return ctx.graph_ms(fn), ""
    except Exception as exc:  # e.g. an op that syncs the host cannot be captured: that is the finding
        ctx.torch.cuda.synchronize()
        return None, f"graph capture failed: {type(exc).__name__}: {exc}"[:200]


def step_calibrate(ctx: Ctx):
    """cuBLAS (CPU: torch's) GEMM TFLOP/s in bf16 and in fp32 with TF32: the peak the kernels are put against."""
    torch = ctx.torch
    n = 64 if ctx.simulate else 8192
    for dtype_name, tf32 in (("bfloat16", False), ("float32+tf32", True)):
        dtype = torch.bfloat16 if dtype_name == "bfloat16" else torch.float32
        a = torch.randn(n, n, device=ctx.device).to(dtype)
        with _TF32(torch, tf32):
            ms = ctx.median_ms(functools.partial(torch.mm, a, a.T.contiguous()))
        ctx.record(
            kind="calibration", dtype=dtype_name, size=n, median_ms=ms, tflops=2 * n**3 / (ms * 1e-3) / 1e12
        )
    return True, ""


def kernel_flops(name: str, m: int, d: int, r: int) -> Optional[float]:
    """FLOPs of one Triton cflora kernel per forward+backward (W frozen, per-sample C), from its algorithm."""
    model = {
        "_cflora_shrink_kernel": 2 * m * d * r,
        "_cflora_interact_fwd_kernel": 2 * m * r * r,
        "_cflora_fwd_gemm_kernel": 2 * m * d * (d + r),
        "_cflora_fwd_gemm_tma_kernel": 2 * m * d * (d + r),  # sm_90+: TMA loads/stores, a persistent grid
        "_cflora_dy_pass_kernel": 4 * m * d * r,  # dT and dB in one pass over dY (r <= 32 in 16-bit)
        "_cflora_interact_bwd_kernel": 4 * m * r * r,
        "_cflora_rank_grad_kernel": 2 * m * d * r,  # dA only, when dB is fused
        "_cflora_dx_kernel": 2 * m * d * (d + r),
        "_cflora_dx_tma_kernel": 2 * m * d * (d + r),
    }
    return next((float(v) for k, v in model.items() if k in name), None)


def step_profile(ctx: Ctx, backend_name: str, top: int = 12):
    """torch.profiler breakdown of one fused forward+backward at the headline shape: the top kernels' time,
    and for the Triton kernels their TFLOP/s and share of the measured cuBLAS bf16 rate."""
    torch = ctx.torch
    case, backend, iters = make_case(ctx, "headline"), ctx.backend(backend_name), 2 if ctx.simulate else 5
    for _ in range(2):
        fused_fwd_bwd(ctx, case, backend, 0.0)
    ctx.sync()
    acts = [torch.profiler.ProfilerActivity.CPU]
    if ctx.device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(iters):
            fused_fwd_bwd(ctx, case, backend, 0.0)
        ctx.sync()
    peak = [
        r["tflops"]
        for r in read_records(ctx.results)
        if r.get("kind") == "calibration" and r["dtype"] == "bfloat16"
    ]
    events = []
    for evt in prof.key_averages():
        if ctx.device.type == "cuda":
            us = evt.self_device_time_total if evt.device_type == torch.autograd.DeviceType.CUDA else 0
        else:
            us = evt.self_cpu_time_total
        if us > 0:
            events.append((us / iters, evt.key, evt.count / iters))
    for us, name, calls in sorted(events, reverse=True)[:top]:
        flops = kernel_flops(name, case["m"], case["d"], case["r"])
        tflops = flops / (us * 1e-6) / 1e12 if flops else None
        ctx.record(
            kind="kernel",
            backend=backend_name,
            shape="headline",
            kernel=name,
            us=us,
            calls=calls,
            tflops=tflops,
            share_of_peak=(tflops / peak[-1]) if tflops and peak else None,
        )
    return bool(events), "" if events else "the profiler saw no kernels"


def _topk_data(ctx: Ctx, kind: str, users: int, length, targets):
    from rellax_fast.bench import topk as bench_topk

    if kind == "ml1m":  # every position of every history is a sample
        max_len = 24 if ctx.simulate else bench_topk.ML1M_MAX
        data = bench_topk.synthetic_histories(users, max_len=max_len)
    else:
        data = bench_topk.lifelong_histories(length, users, targets)
    return tuple(t.to(ctx.device) for t in data)


def _topk_methods(ctx: Ctx, emb, data: tuple, k: int) -> list:
    from rellax_fast.bench import topk as bench_topk
    from rellax_fast.ops import semantic_topk

    methods = [
        (name, functools.partial(semantic_topk, emb, *data, k, backend=ctx.backend(name)))
        for name in ("triton", "cuda")
    ]
    return methods + [("torch", functools.partial(bench_topk.torch_gemm_topk, emb, *data, k, True))]


def step_topk(ctx: Ctx):
    """semantic_topk on triton, cuda and torch (per-user GEMM + causal mask + topk); the k-th scores must agree."""
    from rellax_fast.bench import topk as bench_topk

    torch, ok = ctx.torch, True
    for setting, (kind, users, length, targets, d, k) in ctx.topk.items():
        items, offsets, s_user, s_pos = _topk_data(ctx, kind, users, length, targets)
        gen = torch.Generator(device=ctx.device).manual_seed(1)
        emb = torch.randn(bench_topk.ML1M_ITEMS, d, generator=gen, device=ctx.device)
        methods = _topk_methods(ctx, emb, (items, offsets, s_user, s_pos), k)
        first = None
        for method, fn in methods:
            try:
                kth = fn()[1][:, k - 1].float()
                ms = ctx.median_ms(fn, repeats=2 if ctx.simulate else (3 if method == "torch" else 5))
            except Exception as exc:  # e.g. the cuda backend when the build failed: a row, not the end
                ok = False
                ctx.record(
                    kind="topk",
                    setting=setting,
                    samples=len(s_user),
                    method=method,
                    median_ms=None,
                    kth_gap=None,
                    agree=False,
                    note=f"{type(exc).__name__}: {exc}"[:300],
                )
                continue
            first = kth if first is None else first
            both_pad = torch.isinf(kth) & torch.isinf(first)
            gap = float((kth - first).abs().masked_fill(both_pad, 0.0).max()) if len(kth) else 0.0
            ok &= gap <= TOPK_TOL
            ctx.record(
                kind="topk",
                setting=setting,
                samples=len(s_user),
                method=method,
                median_ms=ms,
                kth_gap=gap,
                agree=gap <= TOPK_TOL,
                d=d,
                k=k,
            )
    return ok, "" if ok else "a method failed or disagreed on the k-th score (see the topk table)"


def step_env(ctx: Ctx):
    import platform

    torch = ctx.torch
    info = dict(
        python=platform.python_version(),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        simulate=ctx.simulate,
    )
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError as exc:
        info["triton"] = f"missing ({exc})"
    if ctx.device.type == "cuda":
        info.update(card=torch.cuda.get_device_name(0), capability=torch.cuda.get_device_capability(0))
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    info["git"] = git.stdout.strip() or "(no git)"
    ctx.record(kind="env", **info)
    return True, ""


WORKER_STEPS: Dict[str, Callable[[Ctx], tuple]] = {
    "env": step_env,
    "triton-correctness": lambda ctx: step_correctness(ctx, "triton"),
    "triton-timing": lambda ctx: step_timing(ctx, "triton", baselines=True),
    "calibrate": step_calibrate,
    "triton-profile": lambda ctx: step_profile(ctx, "triton"),
    "cuda-correctness": lambda ctx: step_correctness(ctx, "cuda"),
    "cuda-timing": lambda ctx: step_timing(ctx, "cuda", baselines=False),
    "cuda-profile": lambda ctx: step_profile(ctx, "cuda"),
    "topk": step_topk,
}


def worker_main(args) -> int:
    """Read {"step": name} lines on stdin, run each, answer {"done": name, "status", "note"} on stdout.
    Everything else the steps print goes to stderr (the worker log)."""
    import traceback

    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    import torch  # noqa: F401  (the import time belongs to worker-start)

    import rellax_fast.ops  # noqa: F401

    ctx = Ctx(args.simulate, Path(args.out) / RESULTS)
    proto.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        name = json.loads(line)["step"]
        if name == args.hang:  # test hook: a step that never returns, to exercise the hard cap
            time.sleep(3600)
        try:
            ok, note = WORKER_STEPS[name](ctx)
            status = "pass" if ok else "fail"
        except Exception as exc:
            traceback.print_exc()
            status, note = "fail", f"{type(exc).__name__}: {exc}"[:300]
        proto.write(json.dumps({"done": name, "status": status, "note": note}) + "\n")
    return 0


# ------------------------------------------------------------------------------------------------------------
# driver: the plan, the hard caps, the background build, the worker and command steps (standard library only)
# ------------------------------------------------------------------------------------------------------------


def _kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


class Worker:
    """The worker process (its own process group, so a timeout kills everything it started)."""

    def __init__(self, cmd: List[str], env: dict, log: Path):
        self.log = open(log, "a")
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env=env,
            cwd=REPO,
            start_new_session=True,
        )
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def wait(self, timeout: float) -> tuple:
        """("ok", message) | ("timeout", None) | ("died", None)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return "timeout", None
            if line is None:
                return "died", None
            try:
                return "ok", json.loads(line)
            except json.JSONDecodeError:
                continue

    def send(self, message: dict) -> bool:
        try:
            self.proc.stdin.write(json.dumps(message) + "\n")
            self.proc.stdin.flush()
            return True
        except (BrokenPipeError, OSError):
            return False

    def close(self) -> None:
        _kill_group(self.proc)
        self.log.close()


class Run:
    """One run of the plan: the clock, the caps, the results file, the worker and the build."""

    def __init__(self, args):
        self.args, self.simulate = args, args.simulate
        self.out = Path(args.out).resolve()
        (self.out / "logs").mkdir(parents=True, exist_ok=True)
        self.results = self.out / RESULTS
        if self.results.exists():  # a new run: keep the previous results beside it
            os.replace(self.results, self.out / "results.prev.jsonl")
        self.t0, self.budget = time.monotonic(), args.budget
        self.caps = dict(CAPS, **dict(parse_cap(c) for c in args.cap))
        self.python: Optional[str] = None
        self.worker: Optional[Worker] = None
        self.build: Optional[subprocess.Popen] = None
        self.build_status: Optional[str] = None
        self.failures = 0

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.t0)

    def limit(self, name: str) -> Optional[float]:
        """Seconds step ``name`` may run: its cap (or all that is left), never past the budget; None: skip."""
        left = self.left()
        if left < MIN_STEP_S:
            return None
        cap = self.caps.get(name)
        return left if cap is None else min(cap, left)

    def record(self, name: str, status: str, seconds: float, note: str = "") -> None:
        append_record(
            self.results, dict(kind="step", step=name, status=status, seconds=round(seconds, 2), note=note)
        )
        if not (status == "pass" or status.startswith("skipped")):
            self.failures += 1
        print(f"=== [{name}] {status} in {seconds:.1f}s {note}".rstrip(), flush=True)

    def env(self) -> dict:
        env = dict(
            os.environ,
            PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            PYTHONUNBUFFERED="1",
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            TOKENIZERS_PARALLELISM="false",
        )
        if self.simulate:
            env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
        else:
            env.pop("TRITON_INTERPRET", None)  # Triton must compile for the GPU, not interpret
        return env

    def pick_python(self) -> Optional[str]:
        t, limit = time.monotonic(), self.limit("interpreter")
        if limit is None:
            self.record("interpreter", "skipped (budget)", 0.0)
            return None
        py, info, notes = pick_interpreter(candidate_pythons(self.args.python), not self.simulate, limit)
        if py:
            append_record(
                self.results,
                dict(kind="interpreter", python=py, **{k: v for k, v in info.items() if k != "python"}),
            )
        self.record(
            "interpreter",
            "pass" if py else "fail",
            time.monotonic() - t,
            "; ".join(notes) + ("" if py else " -> no interpreter imports a CUDA torch"),
        )
        self.python = py
        return py

    def _start_worker(self) -> bool:
        limit = self.limit("worker-start")
        if limit is None:
            self.record("worker-start", "skipped (budget)", 0.0)
            return False
        t = time.monotonic()
        cmd = [self.python, str(Path(__file__).resolve()), "--worker", "--out", str(self.out)]
        cmd += (["--simulate"] if self.simulate else []) + (
            ["--hang", self.args.hang] if self.args.hang else []
        )
        self.worker = Worker(cmd, self.env(), self.out / "logs" / "worker.log")
        state, _ = self.worker.wait(limit)
        status = {"ok": "pass", "timeout": f"timeout ({limit:.0f}s)", "died": "fail (worker exited)"}[state]
        self.record(
            "worker-start", status, time.monotonic() - t, "" if state == "ok" else "see logs/worker.log"
        )
        if state != "ok":
            self.stop_worker()
        return state == "ok"

    def stop_worker(self) -> None:
        if self.worker is not None:
            self.worker.close()
            self.worker = None

    def worker_step(self, name: str) -> None:
        """Run one in-process step in the worker (started if needed) under its hard cap."""
        if self.limit(name) is None:
            self.record(name, "skipped (budget)", 0.0)
            return
        if self.worker is None and not self._start_worker():
            self.record(name, "skipped (no worker)", 0.0)
            return
        limit = self.limit(name) or MIN_STEP_S
        t = time.monotonic()
        state, msg = ("ok", None) if self.worker.send({"step": name}) else ("died", None)
        if state == "ok":
            state, msg = self.worker.wait(limit)
        if state == "ok":
            self.record(name, msg["status"], time.monotonic() - t, msg.get("note", ""))
            self.poll_build()
            return
        self.stop_worker()  # a timed-out or dead worker is replaced by a fresh one for the next step
        status = f"timeout ({limit:.0f}s)" if state == "timeout" else "fail (worker exited)"
        self.record(name, status, time.monotonic() - t, "see logs/worker.log")

    def command_step(self, name: str, cmd: List[str], env: Optional[dict] = None) -> None:
        limit = self.limit(name)
        if limit is None:
            self.record(name, "skipped (budget)", 0.0)
            return
        t = time.monotonic()
        with open(self.out / "logs" / f"{name}.log", "w") as log:
            proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env or self.env(),
                cwd=REPO,
                start_new_session=True,
            )
            try:
                rc = proc.wait(timeout=limit)
                status = "pass" if rc == 0 else f"fail (rc {rc})"
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                status = f"timeout ({limit:.0f}s)"
        self.record(name, status, time.monotonic() - t, f"logs/{name}.log")

    def start_build(self) -> None:
        """The CUDA build of rellax_fast._C in place, in the background (a stand-in command in --simulate)."""
        env = self.env()
        if self.simulate:
            cmd = [self.python, "-c", "import time; time.sleep(1); print('simulated build: no compiler run')"]
        else:
            cmd = [self.python, "setup.py", "build_ext", "--inplace"]
            env.update(
                TORCH_CUDA_ARCH_LIST=os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0a"),
                RELLAX_BUILD_CUDA="1",
                RELLAX_BUILD_EXT="1",
                MAX_JOBS=os.environ.get("MAX_JOBS", "12"),
            )
        self.build_log = open(self.out / "logs" / "build.log", "w")
        self.build_t0 = time.monotonic()
        self.build = subprocess.Popen(
            cmd, stdout=self.build_log, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True
        )
        print(f"=== [build] started in the background: {' '.join(cmd[1:])}", flush=True)

    def poll_build(self) -> Optional[str]:
        """The build's status once it has ended (recorded then, with its duration), else None."""
        if self.build_status is None and self.build is not None and self.build.poll() is not None:
            rc = self.build.returncode
            self._end_build("pass" if rc == 0 else f"fail (rc {rc})")
        return self.build_status

    def _end_build(self, status: str) -> None:
        self.build_status = status
        self.build_log.close()
        self.record("build", status, time.monotonic() - self.build_t0, "logs/build.log")

    def wait_build(self) -> bool:
        """Wait for the build within build-wait's cap and the build's own cap (counted from its start)."""
        t = time.monotonic()
        if self.poll_build() is None:
            limit, build_left = self.limit("build-wait"), self.caps["build"] - (t - self.build_t0)
            try:
                self.build.wait(timeout=max(0.0, min(limit, build_left)) if limit is not None else 0.0)
                self.poll_build()
            except subprocess.TimeoutExpired:
                _kill_group(self.build)
                self._end_build(
                    "timeout (build cap)"
                    if limit is None or build_left <= limit
                    else "timeout (build-wait cap or budget)"
                )
        self.record("build-wait", "pass", time.monotonic() - t)
        return self.build_status == "pass"


def parse_cap(text: str) -> tuple:
    name, _, seconds = text.partition("=")
    if name not in CAPS or not seconds:
        raise argparse.ArgumentTypeError(
            f"--cap takes STEP=SECONDS with STEP in {', '.join(CAPS)}; got {text!r}"
        )
    return name, float(seconds)


def tests_command(run: Run) -> List[str]:
    if run.simulate:  # the marker expression and the collection, without a GPU
        return [
            run.python,
            "-m",
            "pytest",
            "--collect-only",
            "-q",
            "-m",
            "cuda",
            "-p",
            "no:cacheprovider",
            "tests/ops/test_cflora_triton.py",
        ]
    return [
        run.python,
        "-m",
        "pytest",
        "-m",
        "cuda",
        "-q",
        "-rfEs",
        "-p",
        "no:cacheprovider",
        f"--junitxml={run.out / 'pytest_cuda.xml'}",
        "tests",
    ]


def run_plan(run: Run) -> None:
    if not run.pick_python():
        return
    run.start_build()
    for step in ("env", "triton-correctness", "triton-timing", "calibrate", "triton-profile"):
        run.worker_step(step)
    run.stop_worker()  # the cuda steps need a process that loads the new _C
    built = run.wait_build()
    for step in ("cuda-correctness", "cuda-timing", "cuda-profile"):
        if built:
            run.worker_step(step)
        else:
            run.record(step, "skipped (build failed)", 0.0)
    run.worker_step("topk")
    run.stop_worker()
    run.command_step("tests", tests_command(run))
    if run.simulate:
        run.record("e2e", "skipped (simulate: needs a GPU and a 1B model)", 0.0)
    elif run.left() < E2E_MIN_S:
        run.record("e2e", "skipped (budget)", 0.0)
    else:
        run.command_step(
            "e2e",
            [
                run.python,
                "-m",
                "rellax_fast.cli",
                "bench",
                "e2e",
                "--size",
                "1b",
                "--out",
                str(run.out / "bench"),
            ],
        )


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def run_all(args) -> int:
    run = Run(args)
    signal.signal(signal.SIGTERM, _interrupt)
    print(f"gpu_lean: out {run.out}, budget {run.budget:.0f}s, simulate={run.simulate}", flush=True)
    try:
        run_plan(run)
    except KeyboardInterrupt as exc:
        run.record("interrupted", "fail (interrupted)", 0.0, str(exc))
    finally:
        run.stop_worker()
        if run.build is not None and run.poll_build() is None:
            _kill_group(run.build)
            run._end_build("killed (run ended)")
        text = summarize(read_records(run.results))
        write_text_atomic(run.out / "summary.md", text)
        print(
            "\n"
            + text
            + f"\nresults: {run.results}   summary: {run.out / 'summary.md'}   logs: {run.out / 'logs'}"
        )
    return 1 if run.failures else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out",
        default=os.environ.get("OUT") or str(REPO / "gpu_lean_out"),
        help="output folder (default $OUT, else ./gpu_lean_out)",
    )
    parser.add_argument(
        "--budget", type=float, default=BUDGET_S, help="wall-clock budget of the run in seconds"
    )
    parser.add_argument(
        "--python", help="the interpreter to try first (default: $PYTHON, python3, python, ...)"
    )
    parser.add_argument(
        "--simulate", action="store_true", help="every step's plumbing on the CPU at tiny shapes"
    )
    parser.add_argument(
        "--cap", action="append", default=[], metavar="STEP=SECONDS", help="override one step's cap"
    )
    parser.add_argument(
        "--summary", metavar="RESULTS", help="print the summary rebuilt from a results.jsonl; no run"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--hang", help=argparse.SUPPRESS)  # test hook: this worker step never returns
    args = parser.parse_args(argv)
    for cap in args.cap:
        try:
            parse_cap(cap)
        except argparse.ArgumentTypeError as exc:
            parser.error(str(exc))
    if args.summary:
        print(summarize(read_records(Path(args.summary))), end="")
        return 0
    if args.worker:
        return worker_main(args)
    return run_all(args)


if __name__ == "__main__":
    sys.exit(main())
