"""scripts/check_cuda_build.py's resource parsing (the `make cuda-check` spill gate), on recorded tool output."""

from __future__ import annotations

import importlib.util
import sys

from rellax_testing import REPO

PTXAS_LOG = """\
[3/7] /usr/local/cuda/bin/nvcc ... -c csrc/topk_cuda.cu
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_ZN6rellax9topk_cuda20semantic_topk_kernelEv' for 'sm_80'
ptxas info    : Function properties for _ZN6rellax9topk_cuda20semantic_topk_kernelEv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 22784 bytes smem, 456 bytes cmem[0]
ptxas info    : Compiling entry function '_ZN6rellax9topk_cuda20semantic_topk_kernelEv' for 'sm_90a'
ptxas info    : Function properties for _ZN6rellax9topk_cuda20semantic_topk_kernelEv
    8 bytes stack frame, 12 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 22784 bytes smem, 456 bytes cmem[0]
"""

CUOBJDUMP = """\
Fatbin elf code:
================
arch = sm_90a
code version = [1,8]

Resource usage:
 Common:
  GLOBAL:0
 Function _ZN6rellax3fooEv:
  REG:32 STACK:0 SHARED:1024 LOCAL:0 CONSTANT[0]:400 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _ZN6rellax3barEv:
  REG:255 STACK:16 SHARED:0 LOCAL:0 CONSTANT[0]:400 TEXTURE:0 SURFACE:0 SAMPLER:0
"""


def _module():
    spec = importlib.util.spec_from_file_location(
        "check_cuda_build", REPO / "scripts" / "check_cuda_build.py"
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_ptxas_log_parsed_per_arch_and_spills_fail(capsys):
    mod = _module()
    usage = {(u.arch): u for u in mod.parse_ptxas_log(PTXAS_LOG)}
    assert set(usage) == {"sm_80", "sm_90a"}
    assert (usage["sm_80"].registers, usage["sm_80"].smem, usage["sm_80"].spills) == (40, 22784, False)
    assert (usage["sm_90a"].spill_stores, usage["sm_90a"].spill_loads, usage["sm_90a"].stack) == (12, 4, 8)
    assert mod.resource_report(list(usage.values())) == 1
    assert "SPILLS" in capsys.readouterr().out


def test_cuobjdump_usage_counts_stack_as_spill():
    mod = _module()
    usage = {u.name: u for u in mod.parse_cuobjdump_usage(CUOBJDUMP)}
    assert usage["_ZN6rellax3fooEv"].registers == 32 and not usage["_ZN6rellax3fooEv"].spills
    assert usage["_ZN6rellax3barEv"].spills


def test_check_resources_fails_without_any_source(tmp_path, monkeypatch):
    mod = _module()
    monkeypatch.setattr(mod, "find_cuobjdump", lambda: None)
    log = tmp_path / "build.log"
    log.write_text("no ptxas lines here\n")
    assert mod.check_resources(str(tmp_path / "missing.so"), str(log)) == 1
    log.write_text(
        PTXAS_LOG.replace(
            "12 bytes spill stores, 4 bytes spill loads", "0 bytes spill stores, 0 bytes spill loads"
        )
    )
    assert mod.check_resources(str(tmp_path / "missing.so"), str(log)) == 0
