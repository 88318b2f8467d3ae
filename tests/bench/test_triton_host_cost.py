"""scripts/triton_host_cost.py (the Triton launchers' own host cost, BENCHMARKS.md) and the integer helpers it
motivated: the launchers' cdiv / next_power_of_2 agree with Triton's, the script plans the headline's launches with
every kernel's run captured, and it restores them."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from rellax_testing import REPO

from rellax_fast._kernel_common import cdiv, next_power_of_2

triton = pytest.importorskip("triton")

SCRIPT = REPO / "scripts" / "triton_host_cost.py"
# the plan of one forward+backward at the script's shape on an sm_90 card (per-sample C, dA/dB/dC/dx)
PLAN = {
    "_cflora_shrink_kernel": 1,
    "_cflora_interact_fwd_kernel": 1,
    "_cflora_fwd_gemm_tma_kernel": 1,
    "_cflora_dy_pass_kernel": 1,
    "_cflora_interact_bwd_kernel": 1,
    "_cflora_rank_grad_kernel": 2,
    "_cflora_partial_sum_kernel": 2,
    "_cflora_dx_tma_kernel": 1,
}


@pytest.mark.parametrize("b", [1, 2, 3, 16, 64, 127, 128, 4096])
def test_cdiv_is_tritons(b):
    for a in [*range(0, 600), 4095, 4096, 4097, 16384, 10**9 + 7]:
        assert cdiv(a, b) == triton.cdiv(a, b), (a, b)


def test_next_power_of_2_is_tritons():
    for n in [*range(1, 2100), 4095, 4096, 4097, 2**31 - 1, 2**31]:
        assert next_power_of_2(n) == triton.next_power_of_2(n), n


def _script():
    spec = importlib.util.spec_from_file_location("triton_host_cost", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_capture_counts_the_plan_and_restores_the_kernels(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    from rellax_fast.kernels import cflora as K

    result = _script().measure(rounds=1, calls=2)
    assert result["launches"] == PLAN
    assert all(v > 0 for v in result["us"].values()) and set(result["us"]) == {"forward", "backward"}
    assert all("run" not in getattr(K, name).__dict__ for name in PLAN)  # Triton's own run is back
    assert isinstance(K._cflora_dx_tma_kernel, triton.runtime.jit.JITFunction)


def test_the_script_prints_one_json_line_and_refuses_the_interpreter():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(SCRIPT), "--rounds", "1", "--calls", "2", "--dropout", "0.1"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["dropout"] == 0.1 and result["launches"] == PLAN
    bad = subprocess.run(cmd, capture_output=True, text=True, env={**env, "TRITON_INTERPRET": "1"})
    assert bad.returncode != 0 and "unset TRITON_INTERPRET" in bad.stderr
