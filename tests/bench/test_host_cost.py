"""scripts/host_cost.py (the per-call host cost benchmark in BENCHMARKS.md): it runs, times both methods in all
three phases, and its fused method computes the unfused composition's result (so a broken op cannot be timed
as a fast one)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import torch
from rellax_testing import REPO

SCRIPT = REPO / "scripts" / "host_cost.py"


def test_host_cost_methods_agree():
    spec = importlib.util.spec_from_file_location("host_cost", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    methods = mod._methods("cpp", *mod._inputs(16, 24, 3, 16))
    unfused, fused = methods.values()
    torch.testing.assert_close(fused(), unfused(), rtol=1e-4, atol=1e-4)


def test_host_cost_prints_every_phase():
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--d", "24", "--rounds", "2", "--calls", "3"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["d"] == 24
    phases = result["us_per_call"]
    assert set(phases) == {"forward (no_grad)", "forward (grad)", "forward+backward"}
    for times in phases.values():
        assert set(times) == {"unfused", "cflora[cpp]"} and all(t > 0 for t in times.values())
