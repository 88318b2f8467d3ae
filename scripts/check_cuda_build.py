"""Proves a CUDA build of rellax_fast._C links, registers CUDA kernels and keeps every kernel spill-free, without a GPU.

Usage: python scripts/check_cuda_build.py BUILD_LIB_DIR [BUILD_LOG]
- Loads BUILD_LIB_DIR/rellax_fast/_C*.so into the CUDA torch of this interpreter, lists every rellax_fast::
  operator with the dispatch keys it has kernels for, and fails if the build reports no CUDA or if no
  operator has a CUDA kernel.
- Resource usage of every .cu kernel, per SASS target: registers, shared memory, stack frame and spill
  bytes, read from the ``ptxas info`` lines that ``-Xptxas -v`` wrote into BUILD_LOG (``make cuda-check``
  recompiles the .cu files with NVCC_APPEND_FLAGS="-Xptxas -v" and keeps the log). Fails on any spill
  store or load. Without those lines (a log from a build without -v) it falls back to
  ``cuobjdump --dump-resource-usage`` on the library, which has no separate spill count: there any
  STACK or LOCAL bytes count as a failure (spills live in local memory).
- Lists the SASS targets embedded in the library (cuobjdump; the CUDA toolkit's, else the one that the
  triton wheel ships in triton/backends/nvidia/bin).
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

_ENTRY = re.compile(r"ptxas info\s*: Compiling entry function '([^']+)' for '([^']+)'")
_PROPS = re.compile(r"ptxas info\s*: Function properties for (\S+)")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"ptxas info\s*: Used (\d+) registers(.*)")
_SMEM = re.compile(r"(\d+) bytes smem")


@dataclass
class KernelUsage:
    name: str
    arch: str
    registers: int = -1
    smem: int = 0
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    source: str = "ptxas"

    @property
    def spills(self) -> bool:
        if self.source == "cuobjdump":  # no separate spill count there: any local memory is suspect
            return self.stack > 0 or self.spill_stores > 0
        return self.spill_stores > 0 or self.spill_loads > 0


def parse_ptxas_log(text: str) -> List[KernelUsage]:
    """Kernels from ``ptxas -v`` output: one entry per (function, arch); device functions that were not
    inlined are listed too (their spills count as well)."""
    found: Dict[Tuple[str, str], KernelUsage] = {}
    arch = "?"
    current: Optional[KernelUsage] = None
    pending_props: Optional[str] = None
    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            arch = m.group(2)
            current = found.setdefault((m.group(1), arch), KernelUsage(m.group(1), arch))
            continue
        m = _PROPS.search(line)
        if m:
            pending_props = m.group(1)
            continue
        m = _SPILL.search(line)
        if m and pending_props is not None:
            entry = found.setdefault((pending_props, arch), KernelUsage(pending_props, arch))
            entry.stack, entry.spill_stores, entry.spill_loads = (int(g) for g in m.groups())
            pending_props = None
            continue
        m = _USED.search(line)
        if m and current is not None:
            current.registers = int(m.group(1))
            s = _SMEM.search(m.group(2))
            current.smem = int(s.group(1)) if s else 0
            current = None
    return list(found.values())


def find_cuobjdump() -> Optional[str]:
    candidates = [shutil.which("cuobjdump"), "/usr/local/cuda/bin/cuobjdump"]
    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.submodule_search_locations:
        candidates.append(
            os.path.join(list(spec.submodule_search_locations)[0], "backends", "nvidia", "bin", "cuobjdump")
        )
    for c in candidates:
        if c and os.path.exists(c) and os.access(c, os.X_OK):
            return c
    return None


def parse_cuobjdump_usage(text: str) -> List[KernelUsage]:
    """Kernels from ``cuobjdump --dump-resource-usage``: REG, SHARED, STACK (+LOCAL) per function and arch."""
    out: List[KernelUsage] = []
    arch = "?"
    name: Optional[str] = None
    for line in text.splitlines():
        m = re.match(r"\s*arch = (\S+)", line)
        if m:
            arch = m.group(1)
            continue
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            name = m.group(1)
            continue
        if name is not None and "REG:" in line:
            fields = dict(re.findall(r"([A-Z]+(?:\[\d+\])?):(\d+)", line))
            out.append(
                KernelUsage(
                    name,
                    arch,
                    registers=int(fields.get("REG", -1)),
                    smem=int(fields.get("SHARED", 0)),
                    stack=int(fields.get("STACK", 0)),
                    spill_stores=int(fields.get("LOCAL", 0)),
                    source="cuobjdump",
                )
            )
            name = None
    return out


def demangle(names: List[str]) -> Dict[str, str]:
    filt = shutil.which("c++filt")
    if not filt or not names:
        return {n: n for n in names}
    res = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True)
    lines = res.stdout.splitlines()
    return {n: (lines[i] if i < len(lines) and res.returncode == 0 else n) for i, n in enumerate(names)}


def short_name(pretty: str, width: int = 70) -> str:
    s = pretty.replace("(anonymous namespace)::", "").replace("rellax::", "")
    s = re.sub(r"^void ", "", s)
    s = re.sub(r"\(.*\)$", "", s)  # drop the parameter list
    s = s.replace("c10::BFloat16", "bf16").replace("c10::Half", "fp16")
    return s if len(s) <= width else s[: width - 3] + "..."


def resource_report(usage: List[KernelUsage]) -> int:
    """Print the table; return the number of kernels that spill."""
    names = demangle(sorted({u.name for u in usage}))
    print(f"cuda-check: resource usage of {len(usage)} kernel builds ({usage[0].source}):")
    print(f"  {'kernel':<70} {'arch':<8} {'regs':>4} {'smem B':>7} {'stack B':>7} {'spill st/ld B':>14}")
    for u in sorted(usage, key=lambda u: (names[u.name], u.arch)):
        spill = f"{u.spill_stores}/{u.spill_loads}" if u.source == "ptxas" else f"local {u.spill_stores}"
        flag = "  <-- SPILLS" if u.spills else ""
        print(
            f"  {short_name(names[u.name]):<70} {u.arch:<8} {u.registers:>4} {u.smem:>7} {u.stack:>7} {spill:>14}{flag}"
        )
    return sum(u.spills for u in usage)


def check_resources(lib_path: str, log_path: Optional[str]) -> int:
    usage: List[KernelUsage] = []
    if log_path and os.path.exists(log_path):
        with open(log_path, encoding="utf-8", errors="replace") as f:
            usage = parse_ptxas_log(f.read())
        if not usage:
            print(
                f"cuda-check: no ptxas -v lines in {log_path} (built without NVCC_APPEND_FLAGS='-Xptxas -v', "
                "or the .cu objects were not recompiled); trying cuobjdump"
            )
    if not usage:
        tool = find_cuobjdump()
        if tool is None:
            print(
                "cuda-check: no ptxas -v log and no cuobjdump: cannot report registers and spills",
                file=sys.stderr,
            )
            return 1
        res = subprocess.run([tool, "--dump-resource-usage", lib_path], capture_output=True, text=True)
        usage = parse_cuobjdump_usage(res.stdout)
        if not usage:
            print(f"cuda-check: cuobjdump listed no kernels ({res.stderr.strip()[:200]})", file=sys.stderr)
            return 1
    spilling = resource_report(usage)
    if spilling:
        print(
            f"cuda-check: FAIL, {spilling} kernel build(s) spill registers to local memory", file=sys.stderr
        )
        return 1
    print("cuda-check: no kernel spills")
    return 0


def main(lib_dir: str, log_path: Optional[str] = None) -> int:
    paths = glob.glob(os.path.join(lib_dir, "rellax_fast", "_C*.so"))
    if not paths:
        print(f"cuda-check: no rellax_fast/_C*.so under {lib_dir}", file=sys.stderr)
        return 1
    spec = importlib.util.spec_from_file_location("rellax_fast._C", paths[0])
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    print(f"cuda-check: loaded {paths[0]} into torch {torch.__version__} (CUDA {torch.version.cuda})")
    if not mod.with_cuda():
        print("cuda-check: the library was built without CUDA", file=sys.stderr)
        return 1
    print(f"cuda-check: archs {mod.cuda_archs()}")
    ops = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("rellax_fast::"))
    with_cuda = []
    for op in ops:
        keys = [k for k in ("CPU", "CUDA") if torch._C._dispatch_has_kernel_for_dispatch_key(op, k)]
        print(f"  {op:<40} kernels: {', '.join(keys) or 'none'}")
        if "CUDA" in keys:
            with_cuda.append(op)
    if not with_cuda:
        print("cuda-check: no operator has a CUDA kernel", file=sys.stderr)
        return 1
    cuobjdump = find_cuobjdump()
    if cuobjdump:
        out = subprocess.run([cuobjdump, "--list-elf", paths[0]], capture_output=True, text=True).stdout
        archs = sorted({line.split(".")[-2] for line in out.splitlines() if ".sm_" in line})
        print(f"cuda-check: SASS in the library: {', '.join(archs) or 'none listed'}")
    else:
        print(
            "cuda-check: cuobjdump not found; SASS targets not listed (the build used TORCH_CUDA_ARCH_LIST)"
        )
    if check_resources(paths[0], log_path):
        return 1
    print(f"cuda-check: OK, {len(with_cuda)} of {len(ops)} operators have CUDA kernels, no kernel spills")
    return 0


if __name__ == "__main__":
    sys.exit(
        main(
            sys.argv[1] if len(sys.argv) > 1 else "build/cuda-check/lib",
            sys.argv[2] if len(sys.argv) > 2 else None,
        )
    )
