"""scripts/gpu_lean.py, the headline-first GPU script, tested on the CPU so that it cannot rot between GPU windows.

The end-to-end test runs ``--simulate`` (every step's plumbing at tiny shapes: the Triton interpreter for
"triton", the C++ CPU backend for "cuda", a stand-in build) with one step made to hang, and checks the hard
cap, the incremental results file, the summary printed last and its rebuild from the results alone. It runs
in the normal (non-TRITON_INTERPRET) pass: the script sets TRITON_INTERPRET=1 for its own worker. The other
tests cover interpreter detection, the budget and a results file torn by a kill, without importing torch in
a subprocess.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
from rellax_testing import REPO

SCRIPT = REPO / "scripts" / "gpu_lean.py"


@pytest.fixture(scope="module")
def lean():
    spec = importlib.util.spec_from_file_location("gpu_lean", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _run(*args, timeout=240):
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


def _records(path, kind):
    return [
        json.loads(line) for line in path.read_text().splitlines() if json.loads(line).get("kind") == kind
    ]


@pytest.mark.slow
def test_simulate_runs_every_step_caps_a_hang_and_rebuilds_the_summary(tmp_path, lean):
    out = tmp_path / "lean"
    proc = _run(
        "--simulate",
        "--out",
        str(out),
        "--python",
        sys.executable,
        "--hang",
        "triton-profile",
        "--cap",
        "triton-profile=3",
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 1, log  # the hung step is a failure; the run still went on to the end
    results = out / "results.jsonl"
    steps = {}
    for r in _records(results, "step"):
        steps.setdefault(r["step"], []).append(r["status"])
    assert steps["triton-profile"] == ["timeout (3s)"], steps
    assert steps.pop("e2e")[0].startswith("skipped (simulate"), steps
    steps.pop("triton-profile")
    assert set(steps) == {
        "interpreter",
        "worker-start",
        "env",
        "triton-correctness",
        "triton-timing",
        "calibrate",
        "build",
        "build-wait",
        "cuda-correctness",
        "cuda-timing",
        "cuda-profile",
        "topk",
        "tests",
    }, steps
    assert all(s == ["pass"] for name, s in steps.items() if name != "worker-start"), steps
    assert steps["worker-start"] == ["pass", "pass"]  # the triton phase, then a fresh one after the build

    shapes = set(lean.SIM_SHAPES)
    corr = _records(results, "correctness")
    assert {(r["backend"], r["shape"]) for r in corr} == {(b, s) for b in ("triton", "cuda") for s in shapes}
    assert {r["tensor"] for r in corr} == {"y", "dx", "dA", "dB", "dC"}
    assert all(r["ok"] and r["max_rel_err"] < r["tolerance"] for r in corr), corr
    timing = {(r["shape"], r["dropout"], r["method"]) for r in _records(results, "timing")}
    for shape, spec in lean.SIM_SHAPES.items():
        for p in spec[6]:
            for method in (
                "frozen-linear",
                "unfused-peft",
                "cflora[triton]",
                "cflora[triton,no-tma]",
                "cflora[cuda]",
            ):
                assert (shape, p, method) in timing
    assert {r["dtype"] for r in _records(results, "calibration")} == {"bfloat16", "float32+tf32"}
    assert {r["backend"] for r in _records(results, "kernel")} == {"cuda"}  # triton's profile was the hang
    topk = _records(results, "topk")
    assert {(r["setting"], r["method"]) for r in topk} == {
        (s, m) for s in lean.SIM_TOPK for m in ("triton", "cuda", "torch")
    }
    assert all(r["agree"] for r in topk), topk

    # the summary is printed last, written to summary.md, and rebuilt from the results file alone
    summary = (out / "summary.md").read_text()
    assert proc.stdout.rstrip().split("\n\nresults:")[0].endswith(summary.rstrip())
    rebuilt = _run("--summary", str(results), timeout=60)
    assert rebuilt.returncode == 0 and rebuilt.stdout == summary
    for title in (
        "## steps",
        "## correctness",
        "## forward+backward",
        "## cuBLAS calibration",
        "## per-kernel breakdown",
        "## semantic_topk",
    ):
        assert title in summary


def test_summary_survives_a_results_file_torn_by_a_kill(tmp_path, lean):
    path = tmp_path / "results.jsonl"
    lean.append_record(path, dict(kind="step", step="triton-correctness", status="pass", seconds=1.0))
    lean.append_record(
        path,
        dict(
            kind="timing",
            backend="triton",
            shape="headline",
            dropout=0.0,
            method="frozen-linear",
            median_ms=2.0,
            host_ms=0.05,
            graph_ms=1.6,
            repeats=20,
        ),
    )
    lean.append_record(
        path,
        dict(
            kind="timing",
            backend="triton",
            shape="headline",
            dropout=0.0,
            method="cflora[triton]",
            median_ms=2.5,
            host_ms=0.3,
            graph_ms=2.0,
            repeats=20,
        ),
    )
    with open(path, "a") as f:
        f.write('{"kind": "timing", "backend": "cu')  # the write a kill cut short
    records = lean.read_records(path)
    assert len(records) == 3
    text = lean.summarize(records)
    # ms, x frozen, host ms, graph ms, graph x frozen (2.0 / 1.6), repeats
    assert "| headline | 0.0 | cflora[triton] | 2.5 | 1.250 | 0.3 | 2 | 1.250 | 20 |" in text
    assert "| triton-correctness | pass | 1.0 |" in text


def _fake_python(path, body):
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return str(path)


def test_interpreter_is_the_one_that_imports_a_cuda_torch(tmp_path, lean):
    broken = _fake_python(tmp_path / "py_broken", "echo 'No module named torch' >&2; exit 1")
    cpu = _fake_python(
        tmp_path / "py_cpu", """echo '{"python": "cpu", "torch": "2.11.0+cpu", "cuda": null, "gpu": false}'"""
    )
    gpu = _fake_python(
        tmp_path / "py_gpu",
        """echo '{"python": "gpu", "torch": "2.11.0+cu130", "cuda": "13.0", "gpu": true}'""",
    )
    py, info, notes = lean.pick_interpreter([broken, cpu, gpu], need_cuda=True, timeout=10)
    assert py == gpu and info["cuda"] == "13.0"
    assert "no torch" in notes[0] and "without a usable CUDA GPU" in notes[1]
    assert lean.pick_interpreter([broken, cpu, gpu], need_cuda=False, timeout=10)[0] == cpu  # --simulate
    assert lean.pick_interpreter([broken, cpu], need_cuda=True, timeout=10)[0] is None


def test_fixed_caps_fit_the_budget(lean):
    """The issue's first finding: caps that add up to more than the budget starve the benchmarks."""
    assert set(lean.FIXED_STEPS) <= set(lean.CAPS)
    assert sum(lean.CAPS[s] for s in lean.FIXED_STEPS) <= lean.BUDGET_S
    assert lean.CAPS["tests"] is None and lean.CAPS["e2e"] is None  # they take what is left


def test_spent_budget_skips_every_step_and_still_prints_the_summary(tmp_path):
    out = tmp_path / "lean"
    proc = _run("--out", str(out), "--budget", "0", timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr  # nothing ran, nothing failed
    assert "| interpreter | skipped (budget) |" in proc.stdout
    assert (out / "summary.md").read_text() in proc.stdout


def test_bad_cap_is_a_clear_error(tmp_path):
    proc = _run("--out", str(tmp_path), "--cap", "nosuchstep=3", timeout=60)
    assert proc.returncode == 2 and "--cap takes STEP=SECONDS with STEP in" in proc.stderr
