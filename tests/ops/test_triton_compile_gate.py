"""Ahead-of-time compile gate for the Triton kernels: no GPU needed, runs in the normal (compiled) CI pass.

Every launcher (kernels/cflora.py cflora_fwd / cflora_bwd, kernels/topk.py semantic_topk_triton) is called
on CPU tensors with each kernel's ``run`` replaced, which records the launch arguments it really chooses
(block sizes, warps, stages, constexprs) without running anything. Each distinct launch is compiled with
``triton.compile`` for sm_90a (H100/H200) and sm_80 (A100), and its resources are read: registers and
spill bytes from ``ptxas -v``, shared memory from the compiled metadata, tensor-core instructions from
the PTX. The table goes to build/triton_compile_gate/table.md (path printed; $RELLAX_GATE_DIR overrides).

The matrix: {bf16, fp16, fp32 (3xTF32), fp32+TF32} x r in {8, 16, 32, 64, 128} x C in {none, shared,
per-sample} x dropout {0, 0.1} x grads {LoRA pattern (W, b frozen), all} at d_in = d_out = 4096 with
64 tokens per sample (M = 16384); M = 8192 (its row kernels take 32-row blocks); odd sizes (d_in = d_out =
1000, r = 12, M = 1073); decode (rows_per_sample = 1, M = 64); and the top-k kernel. Launches are
deduplicated by (kernel, pointer element types, constexprs, divisibility hints, num_warps, num_stages):
what decides the binary. The %16 hints belong in the key: without them (d = 1000) Triton cannot vectorise
the loads and the same tiles need other registers (the odd-size GEMM spilled 136 B where d = 4096 did not).
In CI (the pytest) the cflora kernels are compiled at BLOCK_R in {16, 64, 128} for sm_90a (bf16, fp32)
and at every BLOCK_R for sm_80 (bf16, fp32: 3xTF32 is the worst case), plus every top-k launch;
fp16 has bf16's tiles. The script mode (__main__) compiles every distinct launch for both targets;
``--headline`` compiles only the shapes scripts/gpu_lean.py runs first, for a run under another triton.

Asserted per compiled kernel: shared memory within the target's limit; spill stores within bounds (none on
sm_90a at r <= 64; at r = 128 SPILL_BOUND_R128 (16-bit) / SPILL_BOUND_FP32_R128 (fp32); on sm_80 at
r <= 64 at most SPILL_BOUND_SM80_R64 (16-bit) / SPILL_BOUND_SM80_FP32_R64 (fp32)); tensor-core
instructions in every cflora kernel, and on sm_90a wgmma wherever the main dot's tile has >= 64 rows (a
GEMM that falls back to mma.sync fails), mma allowed below that (decode, small-M row blocks); the top-k
kernel (no GEMM) has its own spill bound instead. A triton without native_specialize_impl fails at
collection, naming why, instead of skipping.

Triton versions: the GPU image has triton 3.6; CI runs the gate under the dev extra's triton (3.8). 3.6 has
native_specialize_impl and the same AOT API, so ``--headline`` runs under it (Makefile ``triton36-gate``
overlays triton 3.6 on the dev venv); the whole matrix under both versions would double the gate's time.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import pytest
import torch
import triton_aot as aot
from rellax_testing import REPO

from rellax_fast.ops._backend import triton_interpreting

if triton_interpreting():
    pytest.skip(
        "the compile gate compiles for a real GPU target; it runs in the non-TRITON_INTERPRET pass",
        allow_module_level=True,
    )
triton = pytest.importorskip("triton")
# no silent skip: a triton whose runtime specialisation the gate cannot reproduce is an error at collection
aot.native_specializer()

DTYPES = {
    "bf16": (torch.bfloat16, False),
    "fp16": (torch.float16, False),
    "fp32": (torch.float32, False),
    "fp32+tf32": (torch.float32, True),
}
RANKS = (8, 16, 32, 64, 128)
C_KINDS = ("none", "shared", "per_sample")
LORA_GRADS = (True, False, False, True, True, True)  # x, W, b, A, B, C: W and b frozen
ALL_GRADS = (True,) * 6

# Spill bounds (bytes per thread, ptxas "spill stores"), set from the measured table (BENCHMARKS.md):
# none anywhere on sm_90a; on sm_80 (mma.sync keeps both operands and the accumulator in registers) the
# 16-bit rank-128 dB GEMM spills 8 B and the fp32 (3xTF32: hi/lo operand halves) rank-128 dy pass and
# dB/dA GEMMs up to 84 B. The bounds leave room for compiler drift, not for a regression in kind.
SPILL_BOUND_R128 = 64  # 16-bit, r = 128 (r <= 64: 0)
SPILL_BOUND_FP32 = 0  # fp32 / fp32+TF32, r <= 64
SPILL_BOUND_FP32_R128 = 128
# sm_80 at r <= 64 (every rank is gated there, #23; mma.sync holds operands and accumulator in registers):
# 16-bit spills none (room for drift); fp32 (3xTF32: hi/lo halves) up to 60 B (the r = 32 shrink with a
# shared C), 8-16 B in the r = 16 GEMMs
SPILL_BOUND_SM80_R64 = 16
SPILL_BOUND_SM80_FP32_R64 = 64
# semantic_topk has no GEMM (a running top-k in registers): exempt from the tensor-core check, with its own
# spill bound (the measured value, with room for compiler drift)
TOPK_SPILL_BOUND = 64
# CI compiles BLOCK_R in {16, 64, 128} for sm_90a and every BLOCK_R for sm_80; the script mode compiles
# every distinct launch for both.
CI_RANKS_SM90 = (16, 64, 128)
CI_RANKS_SM80 = (16, 32, 64, 128)
# fp16 has bf16's tiles (only the pointer type differs) and 3xTF32 is fp32's worst case on sm_80
CI_DTYPES_SM90 = ("bf16", "fp32")  # fp32+TF32: in --headline (r = 128) and the script mode
CI_DTYPES_SM80 = ("bf16", "fp32")
# sm_90a: a dot whose tile has at least this many rows must use wgmma (mma.sync there is a fallback that
# loses half the tensor-core rate); smaller tiles (decode, small-M row blocks) may use mma.
WGMMA_MIN_ROWS = 64
# the constexpr holding each kernel's main dot's row count (the M of its tile); BLOCK_M where not listed
TILE_ROWS = {"_cflora_rank_grad_kernel": "BLOCK_N"}  # dot(trans(u) (BLOCK_N, BLOCK_M), v)

# kernels whose dots are GEMMs that must run on tensor cores; the dT finish kernel has dots only for a
# shared C (dS = dT C, dC = dTᵀ S), else it only sums partials. The partial-sum reduction has no dot.
TC_KERNELS = {
    "_cflora_shrink_kernel",
    "_cflora_fwd_gemm_kernel",
    "_cflora_dy_pass_kernel",
    "_cflora_dx_kernel",
    "_matmul_kernel",
    "_cflora_rank_grad_kernel",
    "_cflora_interact_fwd_kernel",
    "_cflora_interact_bwd_kernel",
    "_cflora_dt_finish_kernel",
    "_cflora_fwd_gemm_tma_kernel",
    "_cflora_dx_tma_kernel",
}
# the TMA + persistent GEMMs that sm_90+ launches for aligned tensors: their PTX must move tiles with the copy
# engine (cp.async.bulk.tensor); a kernel that compiled its descriptor loads to plain loads fails
TMA_KERNELS = {"_cflora_fwd_gemm_tma_kernel", "_cflora_dx_tma_kernel"}
TC_ONLY_WITH = {"_cflora_dt_finish_kernel": "SHARED_C=True"}  # kernel -> the constexpr that gives it its dots


def needs_tensor_cores(kernel_name, constexprs_text):
    flag = TC_ONLY_WITH.get(kernel_name)
    return kernel_name in TC_KERNELS and (flag is None or flag in constexprs_text.split())


def _cflora():
    from rellax_fast.kernels import cflora

    return cflora


def _cflora_kernels(k):
    return [
        k._cflora_shrink_kernel,
        k._cflora_interact_fwd_kernel,
        k._cflora_fwd_gemm_kernel,
        k._cflora_dy_pass_kernel,
        k._cflora_dt_finish_kernel,
        k._cflora_partial_sum_kernel,
        k._cflora_interact_bwd_kernel,
        k._cflora_rank_grad_kernel,
        k._cflora_dx_kernel,
        k._matmul_kernel,
        k._cflora_fwd_gemm_tma_kernel,
        k._cflora_dx_tma_kernel,
    ]


def _empty(*shape, dtype):
    return torch.empty(*shape, dtype=dtype)  # never touched: the launches are captured, not run


@contextlib.contextmanager
def cflora_capability(capability):
    """Within the block, launches on CPU tensors describe a GPU of ``capability`` (90: the TMA GEMMs; 80: the
    pointer GEMMs): kernels.cflora._CPU_CAPABILITY, restored after."""
    k = _cflora()
    old, k._CPU_CAPABILITY = k._CPU_CAPABILITY, capability
    try:
        yield
    finally:
        k._CPU_CAPABILITY = old


def cflora_launches(
    dtype_name, r, c_kind, dropout_p, grads, d_in=4096, d_out=4096, n_samples=256, tokens=64, capability=90
):
    """The launches cflora_fwd + cflora_bwd choose for one case on a GPU of ``capability`` (captured on CPU
    tensors: the launchers read the capability of CPU tensors from kernels.cflora._CPU_CAPABILITY)."""
    k = _cflora()
    dtype, tf32 = DTYPES[dtype_name]
    m = n_samples * tokens
    x, w, b = _empty(m, d_in, dtype=dtype), _empty(d_out, d_in, dtype=dtype), _empty(d_out, dtype=dtype)
    a, lb = _empty(r, d_in, dtype=dtype), _empty(d_out, r, dtype=dtype)
    c = {
        "none": None,
        "shared": _empty(r, r, dtype=dtype),
        "per_sample": _empty(n_samples, r, r, dtype=dtype),
    }[c_kind]
    gy, s, t = _empty(m, d_out, dtype=dtype), _empty(m, r, dtype=dtype), _empty(m, r, dtype=dtype)
    seed = 7 if dropout_p else None
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:

        def run():
            k.cflora_fwd(x, w, b, a, lb, c, tokens, 0.5, dropout_p, seed)
            k.cflora_bwd(gy, x, w, a, lb, c, s, t, tokens, 0.5, dropout_p, seed, list(grads))

        with cflora_capability(capability):
            return aot.capture(_cflora_kernels(k), run)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def topk_launches(dtype, d, k_top):
    from rellax_fast.kernels import topk

    n_items, users, per_user = 5000, 64, 50
    emb = torch.randn(n_items, d).to(dtype)
    seq_items = torch.randint(0, n_items, (users * per_user,))
    offsets = torch.arange(0, users * per_user + 1, per_user)
    sample_user = torch.arange(users).repeat_interleave(4)
    sample_pos = torch.randint(1, per_user, (users * 4,))
    return aot.capture(
        [topk._semantic_topk_kernel],
        lambda: topk.semantic_topk_triton(emb, seq_items, offsets, sample_user, sample_pos, k_top, True),
    )


def matrix():
    """(label, dtype name, r, launcher-call kwargs) for the whole matrix, before any capture; r = 0 is top-k."""
    items = []
    for dn in DTYPES:
        for r in RANKS:
            for c_kind in C_KINDS:
                for p in (0.0, 0.1):
                    for grads, gname in ((LORA_GRADS, "lora"), (ALL_GRADS, "all")):
                        items.append(
                            (
                                f"{dn} r={r} C={c_kind} p={p} grads={gname}",
                                dn,
                                r,
                                dict(c_kind=c_kind, dropout_p=p, grads=grads),
                            )
                        )
            # decode: one row per sample with per-sample C
            for grads, gname in ((LORA_GRADS, "lora"), (ALL_GRADS, "all")):
                items.append(
                    (
                        f"{dn} r={r} decode rows_per_sample=1 grads={gname}",
                        dn,
                        r,
                        dict(c_kind="per_sample", dropout_p=0.0, grads=grads, n_samples=64, tokens=1),
                    )
                )
            for c_kind in (
                "none",
                "per_sample",
            ):  # M = 8192: the row kernels' BLOCK_M drops to 32 (grid < SMs)
                for p in (0.0, 0.1):
                    items.append(
                        (
                            f"{dn} r={r} M=8192 C={c_kind} p={p} grads=lora",
                            dn,
                            r,
                            dict(c_kind=c_kind, dropout_p=p, grads=LORA_GRADS, n_samples=128, tokens=64),
                        )
                    )
        for p in (
            0.0,
            0.1,
        ):  # rows of 1,001 elements: no TMA (not 16-byte aligned), the pointer GEMMs on sm_90a
            items.append(
                (
                    f"{dn} r=12 d=1001 C=per_sample p={p} grads=lora",
                    dn,
                    12,
                    dict(
                        c_kind="per_sample",
                        dropout_p=p,
                        grads=LORA_GRADS,
                        d_in=1001,
                        d_out=1001,
                        n_samples=37,
                        tokens=29,
                    ),
                )
            )
        for c_kind in C_KINDS:  # odd sizes
            for p in (0.0, 0.1):
                for grads, gname in ((LORA_GRADS, "lora"), (ALL_GRADS, "all")):
                    items.append(
                        (
                            f"{dn} r=12 d=1000 C={c_kind} p={p} grads={gname}",
                            dn,
                            12,
                            dict(
                                c_kind=c_kind,
                                dropout_p=p,
                                grads=grads,
                                d_in=1000,
                                d_out=1000,
                                n_samples=37,
                                tokens=29,
                            ),
                        )
                    )
    for dn in ("fp32", "bf16", "fp16"):
        for d, k_top in ((384, 10), (64, 5)):
            items.append((f"topk {dn} d={d} k={k_top}", dn, 0, dict(d=d, k_top=k_top)))
    return items


def capture_case(dn, r, kwargs, capability=90):
    if r == 0:
        return topk_launches(DTYPES[dn][0], kwargs["d"], kwargs["k_top"])
    return cflora_launches(
        dn,
        r,
        kwargs["c_kind"],
        kwargs["dropout_p"],
        kwargs["grads"],
        capability=capability,
        **{k: v for k, v in kwargs.items() if k not in ("c_kind", "dropout_p", "grads")},
    )


def resource_key(launch, backend):
    """(kernel, pointer types, constexprs, divisibility attributes, num_warps, num_stages): what fixes the
    binary. The divisibility attributes belong in it: without the %16 hints (d = 1000) Triton cannot vectorise
    the loads, and the same tiles then need other registers (the odd-size GEMM spilled where d = 4096 did not)."""
    signature, constexprs, attrs, options = aot.specialise(launch, backend)
    named = sorted((launch.fn.arg_names[k[0]], repr(v)) for k, v in constexprs.items())
    pointers = tuple(ty for ty in signature.values() if ty.startswith("*"))  # element types (bf16 vs fp16)
    hints = tuple(sorted((launch.fn.arg_names[k[0]], repr(v)) for k, v in attrs.items()))
    return (launch.name, pointers, tuple(named), hints, tuple(sorted(options.items())))


def _spill_bound(dtype_name, block_r, arch="sm_90a"):
    if dtype_name.startswith("fp32"):
        bound = SPILL_BOUND_FP32_R128 if block_r >= 128 else SPILL_BOUND_FP32
    else:
        bound = SPILL_BOUND_R128 if block_r >= 128 else 0
    if arch == "sm_80" and block_r <= 64:
        bound = max(
            bound, SPILL_BOUND_SM80_FP32_R64 if dtype_name.startswith("fp32") else SPILL_BOUND_SM80_R64
        )
    return bound


def tile_rows(kernel_name, constexprs_text):
    """The row count of a kernel's main dot tile, read from the row's constexprs ("BLOCK_M=64 ...")."""
    values = dict(item.split("=", 1) for item in constexprs_text.split() if "=" in item)
    return int(values.get(TILE_ROWS.get(kernel_name, "BLOCK_M"), 0))


def gate_dir() -> Path:
    return Path(os.environ.get("RELLAX_GATE_DIR", REPO / "build" / "triton_compile_gate"))


def ci_selection(cap, launch, dtype_name, block_r):
    """What the pytest compiles (the script mode compiles everything): the cflora kernels at CI_RANKS_* in
    CI_DTYPES_*, and every top-k launch."""
    if not launch.name.startswith("_cflora") and launch.name != "_matmul_kernel":
        return True
    ranks, dtypes = (CI_RANKS_SM90, CI_DTYPES_SM90) if cap == 90 else (CI_RANKS_SM80, CI_DTYPES_SM80)
    return block_r in ranks and dtype_name in dtypes


def headline_matrix():
    """The shapes scripts/gpu_lean.py runs first (headline bf16 r=16 per-sample C at p 0 and 0.1, decode, fp32+TF32
    r=128), LoRA gradients: the set checked under the GPU image's triton (3.6) by ``--headline``."""
    lora = dict(grads=LORA_GRADS, c_kind="per_sample")
    return [
        (f"headline bf16 r=16 p={p}", "bf16", 16, dict(lora, dropout_p=p, n_samples=16, tokens=1024))
        for p in (0.0, 0.1)
    ] + [
        ("decode bf16 r=16", "bf16", 16, dict(lora, dropout_p=0.0, n_samples=64, tokens=1)),
        ("fp32+tf32 r=128", "fp32+tf32", 128, dict(lora, dropout_p=0.0, n_samples=4, tokens=1024)),
        ("topk fp32 d=384 k=10", "fp32", 0, dict(d=384, k_top=10)),
    ]


def run_gate(capabilities=(90, 80), select=None, log=print, items=None):
    """Capture (per capability: sm_90 launches the TMA GEMMs where sm_80 launches the pointer ones), dedupe,
    compile, measure. ``select(cap, launch, dtype name, block_r)`` picks the distinct launches to compile
    (None: all); ``items`` is the matrix (default :func:`matrix`). Returns (rows, n_cases, n_launches,
    n_unique), the counts summed over the capabilities."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    backend = make_backend(GPUTarget("cuda", 90, 32))
    rows, n_cases, n_launches, n_unique = [], 0, 0, 0
    t0 = time.perf_counter()
    for cap in capabilities:
        cases = [(label, dn, r, capture_case(dn, r, kw, cap)) for label, dn, r, kw in (items or matrix())]
        unique = {}  # resource key -> (launch, dtype name, block_r, first label)
        for label, dn, r, launches in cases:
            for launch in launches:
                n_launches += 1
                block_r = max(16, triton.next_power_of_2(r)) if r else 0
                unique.setdefault(resource_key(launch, backend), (launch, dn, block_r, label))
        n_cases, n_unique = n_cases + len(cases), n_unique + len(unique)
        for launch, dn, block_r, label in unique.values():
            if select is None or select(cap, launch, dn, block_r):
                rows.append(_gate_row(launch, cap, dn, block_r, label, log, t0))
    return rows, n_cases, n_launches, n_unique


def _gate_row(launch, cap, dn, block_r, label, log, t0):
    """Compile one distinct launch for sm_<cap> and return its table row."""
    _, res = aot.compile_launch(launch, cap)
    log(
        f"[{time.perf_counter() - t0:6.1f}s] {res.arch} {res.kernel} {dn} r={block_r} "
        f"regs={res.registers} spill={res.spill_stores} smem={res.shared} tc={res.tensor_cores} tma={res.tma}"
    )
    return dict(
        arch=res.arch,
        kernel=res.kernel.lstrip("_").removesuffix("_kernel"),
        dtype=dn,
        block_r=block_r or "-",
        warps=res.num_warps,
        stages=res.num_stages,
        regs=res.registers,
        spill_st=res.spill_stores,
        spill_ld=res.spill_loads,
        smem=res.shared,
        smem_limit=res.smem_limit,
        tc=res.tensor_cores,
        tma=res.tma,
        constexprs=res.constexprs,
        first_case=label,
    )


def check_rows(rows):
    """The gate's assertions, as a list of failure messages."""
    failures = []
    for row in rows:
        what = f"{row['arch']} {row['kernel']} {row['dtype']} r={row['block_r']} ({row['constexprs']})"
        if row["smem"] > row["smem_limit"]:
            failures.append(f"{what}: shared memory {row['smem']} B > {row['smem_limit']} B")
        if row["kernel"] == "semantic_topk":  # no GEMM: no tensor-core check; its own spill bound
            if row["spill_st"] > TOPK_SPILL_BOUND:
                failures.append(
                    f"{what}: {row['spill_st']} B spill stores > top-k bound {TOPK_SPILL_BOUND} B"
                )
            continue
        bound = _spill_bound(row["dtype"], row["block_r"], row["arch"])
        if row["spill_st"] > bound:
            failures.append(f"{what}: {row['spill_st']} B spill stores > bound {bound} B")
        name = "_" + row["kernel"] + "_kernel"
        if name in TMA_KERNELS and row["arch"] == "sm_90a" and row.get("tma") != "load+store":
            failures.append(f"{what}: TMA {row.get('tma')!r}, expected cp.async.bulk.tensor loads and stores")
        if needs_tensor_cores(name, row["constexprs"]):
            if row["arch"] == "sm_90a" and tile_rows(name, row["constexprs"]) >= WGMMA_MIN_ROWS:
                allowed = ("wgmma",)
            else:
                allowed = ("wgmma", "mma") if row["arch"] == "sm_90a" else ("mma",)
            if row["tc"] not in allowed:
                failures.append(
                    f"{what}: tensor-core instructions {row['tc']!r}, expected {' or '.join(allowed)}"
                )
    return failures


@pytest.mark.slow
def test_triton_kernels_compile_within_limits_for_sm90a_and_sm80():
    rows, n_cases, n_launches, n_unique = run_gate(select=ci_selection, log=lambda *_: None)
    path = aot.write_table(rows, gate_dir() / "table.md")
    print(
        f"\ncompile gate: {n_cases} launcher calls, {n_launches} launches, {n_unique} distinct; "
        f"{len(rows)} compiles; table: {path}"
    )
    assert {r["arch"] for r in rows} == {"sm_90a", "sm_80"}
    for arch, dtypes, ranks in (
        ("sm_90a", CI_DTYPES_SM90, CI_RANKS_SM90),
        ("sm_80", CI_DTYPES_SM80, CI_RANKS_SM80),
    ):
        cflora = [r for r in rows if r["arch"] == arch and r["kernel"].startswith("cflora")]
        assert {(r["dtype"], r["block_r"]) for r in cflora} == {(d, b) for d in dtypes for b in ranks}, arch
    assert any(r["kernel"] == "semantic_topk" for r in rows), "topk kernel missing from the gate"
    failures = check_rows(rows)
    assert not failures, "\n".join(failures)


def test_gate_assertions_catch_a_violation():
    """check_rows must flag a kernel over the smem limit, a spilling 16-bit kernel and a GEMM without MMA."""
    base = dict(
        arch="sm_90a",
        kernel="cflora_dx",
        dtype="bf16",
        block_r=64,
        constexprs="BLOCK_M=128",
        spill_st=0,
        smem=1000,
        smem_limit=aot.SMEM_LIMIT[90],
        tc="wgmma",
    )
    assert check_rows([base]) == []
    assert check_rows([dict(base, smem=aot.SMEM_LIMIT[90] + 1)])
    assert check_rows([dict(base, spill_st=8)])
    assert check_rows([dict(base, tc="-")])
    assert check_rows([dict(base, arch="sm_80", tc="-", smem_limit=aot.SMEM_LIMIT[80])])


def test_gate_requires_wgmma_for_64_row_tiles_on_sm90a():
    """#23: on sm_90a a GEMM that fell back to mma.sync passed the gate. Tiles of >= 64 rows need wgmma;
    smaller ones (decode, small-M row blocks) may use mma; the rank-grad kernel's tile rows are BLOCK_N."""
    base = dict(
        arch="sm_90a",
        kernel="cflora_fwd_gemm",
        dtype="bf16",
        block_r=16,
        spill_st=0,
        smem=1000,
        smem_limit=aot.SMEM_LIMIT[90],
    )
    assert check_rows([dict(base, constexprs="BLOCK_M=128 BLOCK_N=128", tc="mma")])
    assert check_rows([dict(base, constexprs="BLOCK_M=64", tc="mma")])
    assert check_rows([dict(base, constexprs="BLOCK_M=32", tc="mma")]) == []
    assert check_rows([dict(base, constexprs="BLOCK_M=128", tc="wgmma")]) == []
    grad = dict(base, kernel="cflora_rank_grad")
    assert check_rows([dict(grad, constexprs="BLOCK_M=16 BLOCK_N=128", tc="mma")])
    assert check_rows([dict(grad, constexprs="BLOCK_M=64 BLOCK_N=32", tc="mma")]) == []
    assert tile_rows("_cflora_rank_grad_kernel", "BLOCK_M=16 BLOCK_N=128") == 128


def test_topk_has_its_own_bounds():
    """Top-k has no GEMM: no tensor-core check, but a spill bound of its own (before: no check at all)."""
    row = dict(
        arch="sm_90a",
        kernel="semantic_topk",
        dtype="fp32",
        block_r="-",
        constexprs="BLOCK_M=64",
        spill_st=0,
        smem=1000,
        smem_limit=aot.SMEM_LIMIT[90],
        tc="-",
    )
    assert check_rows([row]) == []
    assert check_rows([dict(row, spill_st=TOPK_SPILL_BOUND + 8)])
    assert check_rows([dict(row, smem=aot.SMEM_LIMIT[90] + 1)])


def test_sm80_is_gated_at_every_rank():
    """#23: sm_80 was compiled at r = 128 only, so its r = 32-64 spills were never seen. Every BLOCK_R the
    matrix produces is compiled for sm_80 in CI, and a spill there beyond its bound fails."""
    block_rs = {max(16, triton.next_power_of_2(r)) for r in RANKS}
    assert block_rs <= set(CI_RANKS_SM80)
    row = dict(
        arch="sm_80",
        kernel="cflora_rank_grad",
        dtype="bf16",
        block_r=32,
        constexprs="BLOCK_N=128",
        spill_st=SPILL_BOUND_SM80_R64,
        smem=1000,
        smem_limit=aot.SMEM_LIMIT[80],
        tc="mma",
    )
    assert check_rows([row]) == []
    assert check_rows([dict(row, spill_st=SPILL_BOUND_SM80_R64 + 4)])


def test_matrix_has_m8192_whose_row_kernels_use_32_row_blocks():
    """#23: M = 8192 was not in the matrix, so the 32-row blocks that _row_block picks there were never compiled."""
    items = [(label, dn, r, kw) for label, dn, r, kw in matrix() if "M=8192" in label]
    assert {(dn, r) for _, dn, r, _ in items} == {(dn, r) for dn in DTYPES for r in RANKS}
    # r = 64: dB keeps its own pass (_fuse_db), so the dY pass is the dT-only row kernel, cut to 32 rows
    launches = capture_case(*next(it for it in items if it[2] == 64)[1:])
    blocks = {launch.name: launch.kwargs["BLOCK_M"] for launch in launches if "BLOCK_M" in launch.kwargs}
    assert blocks["_cflora_shrink_kernel"] == 32 and blocks["_cflora_dy_pass_kernel"] == 32
    # the fp32 (3xTF32) r = 64 shrink there spilled 16 B on sm_90a at 4 warps
    shrink = next(
        la
        for la in capture_case(
            "fp32", 64, dict(c_kind="none", dropout_p=0.1, grads=LORA_GRADS, n_samples=128, tokens=64)
        )
        if la.name == "_cflora_shrink_kernel"
    )
    assert aot.compile_launch(shrink, 90)[1].spill_stores == 0


def test_dedupe_key_holds_the_divisibility_hints():
    """#23: the key ignored divisibility, so 5 of the 8 odd-size (d = 1000) launches were dropped as
    duplicates of d = 4096 ones and never compiled. The shrink kernel has the same constexprs at both sizes;
    only the %16 hints of D_IN and the strides differ, and so must the keys."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    backend = make_backend(GPUTarget("cuda", 90, 32))
    kw = dict(c_kind="none", dropout_p=0.0, grads=LORA_GRADS, n_samples=4, tokens=64)
    odd = capture_case("bf16", 16, dict(kw, d_in=1000, d_out=1000))
    even = capture_case("bf16", 16, dict(kw, d_in=1024, d_out=1024))
    shrink_odd, shrink_even = (
        next(la for la in ls if la.name == "_cflora_shrink_kernel") for ls in (odd, even)
    )
    assert (
        aot.specialise(shrink_odd, backend)[1] == aot.specialise(shrink_even, backend)[1]
    )  # same constexprs
    assert resource_key(shrink_odd, backend) != resource_key(shrink_even, backend)


def test_odd_size_gemm_does_not_spill_on_sm90a():
    """#23: compiled for sm_90a, the odd-size (d = 1000) bf16 forward GEMM used 255 registers and spilled
    136 B/thread (no %16 hints: no vectorised loads); the launcher now takes a 32-deep K step there. Rows of
    1,000 bf16 are 16-byte aligned, so sm_90a now runs the TMA GEMMs at d = 1000 (descriptor loads need no
    hints); the pointer GEMMs are checked at d = 1001, where TMA is not allowed."""
    odd = dict(c_kind="per_sample", dropout_p=0.1, grads=ALL_GRADS, n_samples=37, tokens=29)
    launches = capture_case("bf16", 12, dict(odd, d_in=1000, d_out=1000))
    unaligned = capture_case("bf16", 12, dict(odd, d_in=1001, d_out=1001))
    picks = [
        next(la for la in launches if la.name == name)
        for name in ("_cflora_fwd_gemm_tma_kernel", "_cflora_dx_tma_kernel")
    ] + [
        next(la for la in unaligned if la.name == name)
        for name in ("_cflora_fwd_gemm_kernel", "_cflora_dx_kernel")
    ]
    # and the dA split-K GEMM with dropout, which spilled 196 B at 4 warps
    picks.append(
        next(la for la in launches if la.name == "_cflora_rank_grad_kernel" and la.kwargs["DROPOUT"])
    )
    for launch in picks:
        _, res = aot.compile_launch(launch, 90)
        assert res.spill_stores == 0, (launch.name, res)
        assert res.tensor_cores == "wgmma", (launch.name, res)


def test_sm90a_gemms_are_tma_and_persistent():
    """#23 section 3: on sm_90a the forward and dx GEMMs move x / W / y and dY / W / dx through TMA descriptors
    (cp.async.bulk.tensor loads and stores in the PTX) on a persistent grid of one program per SM, with wgmma
    and no spills; sm_80 keeps the pointer GEMMs with one program per tile. Before, both targets launched
    the pointer GEMMs (no cp.async.bulk.tensor anywhere), so this failed."""
    lora = dict(c_kind="per_sample", grads=LORA_GRADS, n_samples=16, tokens=1024)
    tiles = (16 * 1024 // 128) * (4096 // 128)
    for p in (0.0, 0.1):
        sm90 = {la.name: la for la in capture_case("bf16", 16, dict(lora, dropout_p=p), 90)}
        sm80 = {la.name: la for la in capture_case("bf16", 16, dict(lora, dropout_p=p), 80)}
        assert "_cflora_fwd_gemm_kernel" not in sm90 and "_cflora_dx_kernel" not in sm90, sorted(sm90)
        assert not TMA_KERNELS & set(sm80), sorted(sm80)
        assert sm80["_cflora_fwd_gemm_kernel"].kwargs["_grid"] == (tiles,)
        for name in sorted(TMA_KERNELS):
            launch = sm90[name]
            assert launch.kwargs["_grid"] == (launch.kwargs["NUM_SMS"],) and launch.kwargs["NUM_SMS"] < tiles
            _, res = aot.compile_launch(launch, 90)
            assert (res.tma, res.tensor_cores, res.spill_stores) == ("load+store", "wgmma", 0), (p, res)
    row = dict(
        arch="sm_90a",
        kernel="cflora_fwd_gemm_tma",
        dtype="bf16",
        block_r=16,
        constexprs="BLOCK_M=128",
        spill_st=0,
        smem=1000,
        smem_limit=aot.SMEM_LIMIT[90],
        tc="wgmma",
        tma="load+store",
    )
    assert check_rows([row]) == []
    assert check_rows([dict(row, tma="store")]) and check_rows([dict(row, tma="-")])
    assert (
        aot.tma_kind("cp.async.bulk.tensor.2d.shared::cta.global.mbarrier::complete_tx::bytes [a], [b];")
        == "load"
    )


def test_fused_dy_pass_runs_both_dots_on_wgmma_without_spills():
    """#23 section 3: at the headline shape the dY pass computes dT = dY B (a BLOCK_M-row dot) and the dB
    partial dYᵀ T (a BLOCK_N-row dot) from one read of dY. On sm_90a both must be wgmma (no mma.sync
    fallback hidden behind the other dot's wgmma), with no spills; the same at the odd size (d = 1000).
    fp32 (3xTF32) fuses with 32-column steps, whose dB dot (32 rows) may use mma: there no spills and wgmma
    for the dT dot only."""
    import re

    lora = dict(c_kind="per_sample", dropout_p=0.0, grads=LORA_GRADS)
    cases = [
        ("bf16", 16, dict(lora, n_samples=16, tokens=1024)),
        ("bf16", 12, dict(lora, d_in=1000, d_out=1000, n_samples=37, tokens=29)),
        ("fp32", 16, dict(lora, n_samples=16, tokens=1024)),
        ("fp32", 12, dict(lora, dropout_p=0.1, d_in=1000, d_out=1000, n_samples=37, tokens=29)),
    ]
    for dn, r, kw in cases:
        launch = next(la for la in capture_case(dn, r, kw) if la.name == "_cflora_dy_pass_kernel")
        assert launch.kwargs["NEED_DB"] and launch.kwargs["NEED_DT"], (dn, r, "dB not fused")
        assert launch.kwargs["BLOCK_M"] >= WGMMA_MIN_ROWS and launch.kwargs["BLOCK_N"] >= 32
        compiled, res = aot.compile_launch(launch, 90)
        ptx = compiled.asm["ptx"]
        assert res.spill_stores == 0, (dn, r, res)
        assert "wgmma.mma_async" in ptx, (dn, r, res)
        if dn == "bf16":
            assert not re.search(r"\bmma\.sync\.aligned", ptx), (dn, r, res)


def test_finish_kernel_needs_tensor_cores_only_with_a_shared_c():
    """The dT finish kernel sums the dY pass's column-split partials; only a shared C gives it dots."""
    row = dict(
        arch="sm_90a",
        kernel="cflora_dt_finish",
        dtype="bf16",
        block_r=16,
        constexprs="SHARED_C=False NEED_DS=True BLOCK_M=64",
        spill_st=0,
        smem=0,
        smem_limit=aot.SMEM_LIMIT[90],
        tc="-",
    )
    assert check_rows([row]) == []
    assert check_rows([dict(row, constexprs="SHARED_C=True NEED_DS=True BLOCK_M=64")])
    assert check_rows([dict(row, constexprs="SHARED_C=True NEED_DS=True BLOCK_M=64", tc="wgmma")]) == []
    assert check_rows([dict(row, kernel="cflora_partial_sum", constexprs="BLOCK=512")]) == []
    assert check_rows([dict(row, kernel="cflora_partial_sum", constexprs="BLOCK=512", spill_st=4)])


def test_gate_fails_loudly_without_native_specialize_impl(monkeypatch):
    """#23: with a triton that lacks native_specialize_impl the gate skipped silently; it must fail, naming why."""
    import triton.runtime.jit as jit

    monkeypatch.delattr(jit, "native_specialize_impl")
    with pytest.raises(RuntimeError, match=r"needs triton.runtime.jit.native_specialize_impl .* has none"):
        aot.native_specializer()
    launch = capture_case(
        "bf16",
        16,
        dict(c_kind="none", dropout_p=0.0, grads=LORA_GRADS, n_samples=2, tokens=16, d_in=64, d_out=64),
    )[0]
    with pytest.raises(RuntimeError, match="native_specialize_impl"):
        aot.specialise(launch, None)


def int32_offset_problems(ttir: str):
    """Lines of Triton IR where a pointer offset is int32: a tt.addptr with an i32 tensor offset, or an i32
    tensor multiplication neither of whose operands is a constant (constants: the dropout hash's uint32
    multipliers; anything else is an index times a stride, which must be int64)."""
    import re

    defs = {}
    for line in ttir.splitlines():
        m = re.match(r"\s*(%[\w.#]+) = (.*)", line)
        if m:
            defs[m.group(1)] = m.group(2)
    bad = []
    for line in ttir.splitlines():
        if "tt.addptr" in line and re.search(r"tensor<[^>]*xi32>", line):
            bad.append(line.strip())
        m = re.match(r"\s*%[\w.#]+ = arith.muli (%[\w.#]+), (%[\w.#]+) : tensor<[^>]*xi32>", line)
        if m and not any(defs.get(op, "").startswith("arith.constant") for op in m.groups()):
            bad.append(line.strip())
    return bad


def test_int64_pointer_offsets():
    """Every tensor pointer offset in the cflora kernels is int64 (issue: ks * stride_wk overflowed int32
    once d_out * d_in >= 2^31). Checked on the Triton IR of real launches, and the checker itself is shown
    to flag an int32 index times stride."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    launches = [
        la
        for cap in (90, 80)  # sm_90 launches the TMA GEMMs, sm_80 the pointer ones
        for la in cflora_launches(
            "bf16",
            16,
            "per_sample",
            0.1,
            ALL_GRADS,
            d_in=64,
            d_out=192,
            n_samples=4,
            tokens=64,
            capability=cap,
        )
    ]  # M = 256, d_out = 192: dB fused, three column splits, the finish kernel runs
    seen = set()
    for launch in launches:
        if launch.name in seen:
            continue
        seen.add(launch.name)
        signature, constexprs, attrs, _ = aot.specialise(launch, backend)
        ttir = triton.compile(ASTSource(launch.fn, signature, constexprs, attrs), target=target).asm["ttir"]
        bad = int32_offset_problems(ttir)
        assert not bad, f"{launch.name}: int32 pointer offsets:\n" + "\n".join(bad[:5])
    assert seen == {fn.__name__ for fn in _cflora_kernels(_cflora())}

    flagged = int32_offset_problems(
        "%c = arith.constant dense<3> : tensor<64xi32>\n"
        "%ks = tt.make_range {end = 64 : i32, start = 0 : i32} : tensor<64xi32>\n"
        "%st = tt.splat %arg3 : i32 -> tensor<64xi32>\n"
        "%h = arith.muli %ks, %c : tensor<64xi32>\n"  # a hash-style constant multiply: allowed
        "%off = arith.muli %ks, %st : tensor<64xi32>\n"  # index * stride in int32: flagged
        "%p = tt.addptr %base, %off : tensor<64x!tt.ptr<bf16>>, tensor<64xi32>\n"
    )  # flagged
    assert len(flagged) == 2
    assert flagged[0].startswith("%off = arith.muli") and flagged[1].startswith("%p = tt.addptr")


if __name__ == "__main__":
    # the table: PYTHONPATH=tests:tests/ops .venv/bin/python tests/ops/test_triton_compile_gate.py [--headline]
    # --headline: only the GPU script's shapes, e.g. under the GPU image's triton 3.6 (Makefile: triton36-gate)
    import sys

    headline = "--headline" in sys.argv[1:]
    rows, n_cases, n_launches, n_unique = run_gate(items=headline_matrix() if headline else None)
    path = aot.write_table(rows, gate_dir() / ("table_headline.md" if headline else "table.md"))
    print(
        f"triton {triton.__version__}: {n_cases} launcher calls, {n_launches} launches, {n_unique} distinct; "
        f"{len(rows)} compiles -> {path}"
    )
    failures = check_rows(rows)
    for f in failures:
        print("FAIL", f)
    sys.exit(1 if failures else 0)
