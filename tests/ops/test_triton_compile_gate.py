"""Ahead-of-time compile gate for the Triton kernels: no GPU needed, runs in the normal (compiled) CI pass.

Every launcher (kernels/cflora.py cflora_fwd / cflora_bwd, kernels/topk.py semantic_topk_triton) is called
on CPU tensors with each kernel's ``run`` replaced, which records the launch arguments it really chooses
(block sizes, warps, stages, constexprs) without running anything. Each distinct launch is compiled with
``triton.compile`` for sm_90a (H100/H200) and sm_80 (A100), and its resources are read: registers and
spill bytes from ``ptxas -v``, shared memory from the compiled metadata, tensor-core instructions from
the PTX. The table goes to build/triton_compile_gate/table.md (path printed; $RELLAX_GATE_DIR overrides).

The matrix: {bf16, fp16, fp32 (3xTF32), fp32+TF32} x r in {8, 16, 32, 64, 128} x C in {none, shared,
per-sample} x dropout {0, 0.1} x grads {LoRA pattern (W, b frozen), all} at d_in = d_out = 4096 with
64 tokens per sample (M = 16384), plus odd sizes (d_in = 1000, d_out = 1000, r = 12) and decode
(rows_per_sample = 1, M = 64). That is 334 launcher calls and about 2,400 kernel launches, captured in
under a minute. Sampling, so that it compiles in a few minutes on 2 cores: launches are deduplicated by
(kernel, pointer element types, constexprs, num_warps, num_stages) -- the tiles and hence registers,
spills, shared memory and instructions are fixed by those; the launch's scalar divisibility hints only
touch address arithmetic -- and one representative is compiled. In CI (the pytest) BLOCK_R in {16, 64, 128} is compiled for sm_90a
and BLOCK_R = 128 (the largest tiles: worst shared memory, registers, spills) for sm_80, plus the topk
kernel; the script mode (__main__) compiles every distinct launch for sm_90a and rank 128 for sm_80.

Asserted per compiled kernel: shared memory within the target's limit; zero spills at r <= 64 and at
most SPILL_BOUND_R128 (16-bit) / SPILL_BOUND_FP32_R128 (fp32) bytes at r = 128; tensor-core instructions
(wgmma or mma on sm_90a -- wgmma needs 64-row tiles, so the 16-row decode blocks use mma -- and mma on
sm_80) in every cflora kernel, 16-bit, TF32 and 3xTF32 alike.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
import triton_aot as aot
from rellax_testing import REPO

from rellax_fast.ops._backend import triton_interpreting

if triton_interpreting():
    pytest.skip("the compile gate compiles for a real GPU target; it runs in the non-TRITON_INTERPRET pass",
                allow_module_level=True)
triton = pytest.importorskip("triton")
try:
    from triton.runtime.jit import native_specialize_impl  # noqa: F401  (triton >= 3.4)
except ImportError:  # e.g. older triton on a GPU image: the gate is a CI (triton 3.8) check
    pytest.skip(f"triton {triton.__version__} lacks native_specialize_impl", allow_module_level=True)

DTYPES = {"bf16": (torch.bfloat16, False), "fp16": (torch.float16, False), "fp32": (torch.float32, False),
          "fp32+tf32": (torch.float32, True)}
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
# CI compiles BLOCK_R in {16, 64, 128} for sm_90a and the rank-128 tiles (the largest: worst shared
# memory, registers and spills) for sm_80; the script mode compiles every distinct launch for sm_90a.
CI_RANKS_SM90 = (16, 64, 128)
CI_RANKS_SM80 = (128,)

# kernels whose dots are GEMMs that must run on tensor cores (every cflora kernel has at least one dot)
TC_KERNELS = {"_cflora_shrink_kernel", "_cflora_fwd_gemm_kernel", "_cflora_dy_pass_kernel",
              "_cflora_dx_kernel", "_matmul_kernel", "_cflora_rank_grad_kernel", "_cflora_interact_fwd_kernel",
              "_cflora_interact_bwd_kernel"}


def _cflora():
    from rellax_fast.kernels import cflora

    return cflora


def _cflora_kernels(k):
    return [k._cflora_shrink_kernel, k._cflora_interact_fwd_kernel, k._cflora_fwd_gemm_kernel,
            k._cflora_dy_pass_kernel, k._cflora_interact_bwd_kernel, k._cflora_rank_grad_kernel, k._cflora_dx_kernel,
            k._matmul_kernel]


def _empty(*shape, dtype):
    return torch.empty(*shape, dtype=dtype)  # never touched: the launches are captured, not run


def cflora_launches(dtype_name, r, c_kind, dropout_p, grads, d_in=4096, d_out=4096, n_samples=256, tokens=64):
    """The launches cflora_fwd + cflora_bwd choose for one case (captured on CPU tensors)."""
    k = _cflora()
    dtype, tf32 = DTYPES[dtype_name]
    m = n_samples * tokens
    x, w, b = _empty(m, d_in, dtype=dtype), _empty(d_out, d_in, dtype=dtype), _empty(d_out, dtype=dtype)
    a, lb = _empty(r, d_in, dtype=dtype), _empty(d_out, r, dtype=dtype)
    c = {"none": None, "shared": _empty(r, r, dtype=dtype), "per_sample": _empty(n_samples, r, r, dtype=dtype)}[c_kind]
    gy, s, t = _empty(m, d_out, dtype=dtype), _empty(m, r, dtype=dtype), _empty(m, r, dtype=dtype)
    seed = 7 if dropout_p else None
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        def run():
            k.cflora_fwd(x, w, b, a, lb, c, tokens, 0.5, dropout_p, seed)
            k.cflora_bwd(gy, x, w, a, lb, c, s, t, tokens, 0.5, dropout_p, seed, list(grads))

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
    return aot.capture([topk._semantic_topk_kernel],
                       lambda: topk.semantic_topk_triton(emb, seq_items, offsets, sample_user, sample_pos,
                                                         k_top, True))


def all_cases():
    """(label, dtype name, r, launches) for the whole matrix."""
    cases = []
    for dn in DTYPES:
        for r in RANKS:
            for c_kind in C_KINDS:
                for p in (0.0, 0.1):
                    for grads, gname in ((LORA_GRADS, "lora"), (ALL_GRADS, "all")):
                        label = f"{dn} r={r} C={c_kind} p={p} grads={gname}"
                        cases.append((label, dn, r, cflora_launches(dn, r, c_kind, p, grads)))
            # decode: one row per sample with per-sample C
            for grads, gname in ((LORA_GRADS, "lora"), (ALL_GRADS, "all")):
                cases.append((f"{dn} r={r} decode rows_per_sample=1 grads={gname}", dn, r,
                              cflora_launches(dn, r, "per_sample", 0.0, grads, n_samples=64, tokens=1)))
        for c_kind in C_KINDS:  # odd sizes
            for p in (0.0, 0.1):
                for grads, gname in ((LORA_GRADS, "lora"), (ALL_GRADS, "all")):
                    cases.append((f"{dn} r=12 d=1000 C={c_kind} p={p} grads={gname}", dn, 12,
                                  cflora_launches(dn, 12, c_kind, p, grads, d_in=1000, d_out=1000,
                                                  n_samples=37, tokens=29)))
    for dtype, dn in ((torch.float32, "fp32"), (torch.bfloat16, "bf16"), (torch.float16, "fp16")):
        for d, k_top in ((384, 10), (64, 5)):
            cases.append((f"topk {dn} d={d} k={k_top}", dn, 0, topk_launches(dtype, d, k_top)))
    return cases


def resource_key(launch, backend):
    """(kernel, pointer types, constexprs, num_warps, num_stages): what fixes tiles, registers, smem."""
    signature, constexprs, _, options = aot.specialise(launch, backend)
    named = sorted((launch.fn.arg_names[k[0]], repr(v)) for k, v in constexprs.items())
    pointers = tuple(ty for ty in signature.values() if ty.startswith("*"))  # element types (bf16 vs fp16)
    return (launch.name, pointers, tuple(named), tuple(sorted(options.items())))


def _spill_bound(dtype_name, block_r):
    if dtype_name.startswith("fp32"):
        return SPILL_BOUND_FP32_R128 if block_r >= 128 else SPILL_BOUND_FP32
    return SPILL_BOUND_R128 if block_r >= 128 else 0


def gate_dir() -> Path:
    return Path(os.environ.get("RELLAX_GATE_DIR", REPO / "build" / "triton_compile_gate"))


def run_gate(capabilities=(90, 80), sm90_ranks=None, sm80_ranks=(128,), log=print):
    """Capture, dedupe, compile, measure. Returns (rows, n_cases, n_launches, n_unique)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    backend = make_backend(GPUTarget("cuda", 90, 32))
    cases = all_cases()
    unique = {}  # resource key -> (launch, dtype name, block_r, labels)
    n_launches = 0
    for label, dn, r, launches in cases:
        for launch in launches:
            n_launches += 1
            key = resource_key(launch, backend)
            if key not in unique:
                block_r = max(16, triton.next_power_of_2(r)) if r else 0
                unique[key] = (launch, dn, block_r, label)
    rows = []
    t0 = time.perf_counter()
    for cap in capabilities:
        for launch, dn, block_r, label in unique.values():
            ranks = sm90_ranks if cap == 90 else sm80_ranks
            if ranks is not None and launch.name.startswith("_cflora") and block_r not in ranks:
                continue
            _, res = aot.compile_launch(launch, cap)
            rows.append(dict(arch=res.arch, kernel=res.kernel.lstrip("_").removesuffix("_kernel"), dtype=dn,
                             block_r=block_r or "-", warps=res.num_warps, stages=res.num_stages,
                             regs=res.registers, spill_st=res.spill_stores, spill_ld=res.spill_loads,
                             smem=res.shared, smem_limit=res.smem_limit, tc=res.tensor_cores,
                             constexprs=res.constexprs, first_case=label))
            log(f"[{time.perf_counter() - t0:6.1f}s] {res.arch} {res.kernel} {dn} r={block_r} "
                f"regs={res.registers} spill={res.spill_stores} smem={res.shared} tc={res.tensor_cores}")
    return rows, len(cases), n_launches, len(unique)


def check_rows(rows):
    """The gate's assertions, as a list of failure messages."""
    failures = []
    for row in rows:
        what = f"{row['arch']} {row['kernel']} {row['dtype']} r={row['block_r']} ({row['constexprs']})"
        if row["smem"] > row["smem_limit"]:
            failures.append(f"{what}: shared memory {row['smem']} B > {row['smem_limit']} B")
        if row["kernel"] != "semantic_topk":
            bound = _spill_bound(row["dtype"], row["block_r"])
            if row["spill_st"] > bound:
                failures.append(f"{what}: {row['spill_st']} B spill stores > bound {bound} B")
            if "_" + row["kernel"] + "_kernel" in TC_KERNELS:
                want = "wgmma" if row["arch"] == "sm_90a" else "mma"
                if row["tc"] != want and not (want == "wgmma" and row["tc"] == "mma"):
                    failures.append(f"{what}: no tensor-core instructions (found {row['tc']})")
    return failures


@pytest.mark.slow
def test_triton_kernels_compile_within_limits_for_sm90a_and_sm80():
    rows, n_cases, n_launches, n_unique = run_gate(sm90_ranks=CI_RANKS_SM90, sm80_ranks=CI_RANKS_SM80, log=lambda *_: None)
    path = aot.write_table(rows, gate_dir() / "table.md")
    print(f"\ncompile gate: {n_cases} launcher calls, {n_launches} launches, {n_unique} distinct; "
          f"{len(rows)} compiles; table: {path}")
    assert {r["arch"] for r in rows} == {"sm_90a", "sm_80"}
    assert {r["dtype"] for r in rows} >= set(DTYPES)
    assert any(r["kernel"] == "semantic_topk" for r in rows), "topk kernel missing from the gate"
    failures = check_rows(rows)
    assert not failures, "\n".join(failures)


def test_gate_assertions_catch_a_violation():
    """check_rows must flag a kernel over the smem limit, a spilling 16-bit kernel and a GEMM without MMA."""
    base = dict(arch="sm_90a", kernel="cflora_dx", dtype="bf16", block_r=64, constexprs="", spill_st=0,
                smem=1000, smem_limit=aot.SMEM_LIMIT[90], tc="wgmma")
    assert check_rows([base]) == []
    assert check_rows([dict(base, smem=aot.SMEM_LIMIT[90] + 1)])
    assert check_rows([dict(base, spill_st=8)])
    assert check_rows([dict(base, tc="-")])
    assert check_rows([dict(base, arch="sm_80", tc="-", smem_limit=aot.SMEM_LIMIT[80])])


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
    launches = cflora_launches("bf16", 16, "per_sample", 0.1, ALL_GRADS, d_in=64, d_out=48, n_samples=4,
                               tokens=16)
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
        "%p = tt.addptr %base, %off : tensor<64x!tt.ptr<bf16>>, tensor<64xi32>\n")  # flagged
    assert len(flagged) == 2
    assert flagged[0].startswith("%off = arith.muli") and flagged[1].startswith("%p = tt.addptr")


if __name__ == "__main__":  # the table: PYTHONPATH=tests:tests/ops .venv/bin/python tests/ops/test_triton_compile_gate.py
    rows, n_cases, n_launches, n_unique = run_gate()
    path = aot.write_table(rows, gate_dir() / "table.md")
    print(f"{n_cases} launcher calls, {n_launches} launches, {n_unique} distinct; {len(rows)} compiles -> {path}")
    for f in check_rows(rows):
        print("FAIL", f)
