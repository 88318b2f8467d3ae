"""Smoke run of the pytest-benchmark suite in benchmarks/: at the tiny size with one timed round it runs
every case of every benchmark (about 20 s on 2 cores), so a refactor that breaks one fails ``make test``
(issue #22: ``test_train_step[PEFT LoRA + apply_cflora]`` broke unseen), and checks the documented
``extra_info``. No timing is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from rellax_testing import REPO

EXTRA_KEYS = {
    "device",
    "dtype",
    "shape",
    "backend",
    "baseline",
    "baseline_median_ms",
    "median_ms",
    "ratio_to_baseline",
}


def test_benchmark_suite_runs_and_records_extra_info(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "benchmarks",
        "--benchmark-only",
        "--bench-size",
        "tiny",
        "--bench-device",
        "cpu",
        "--bench-rounds",
        "1",
        "-p",
        "no:cacheprovider",
        "-q",
        f"--benchmark-json={out}",
        f"--benchmark-storage=file://{tmp_path / 'storage'}",
    ]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    data = json.loads(out.read_text())
    names = [b["name"] for b in data["benchmarks"]]
    assert any(n.startswith("test_cflora_linear[") for n in names), names
    assert any(n.startswith("test_semantic_topk[") for n in names), names
    # the patched-PEFT provider raised KeyError before #22; every provider of the suite runs now
    from rellax_fast.bench.e2e import PATCHED_PROVIDER, TRAIN_BASELINE

    assert {f"test_train_step[{PATCHED_PROVIDER}]", f"test_train_step[{TRAIN_BASELINE}]"} <= set(names), names
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        assert EXTRA_KEYS <= set(info), (bench["name"], sorted(info))
        assert info["dtype"] == "float32" and info["shape"], bench["name"]
        assert info["baseline_median_ms"] > 0 and info["median_ms"] > 0
        assert abs(info["ratio_to_baseline"] - info["median_ms"] / info["baseline_median_ms"]) < 1e-9
        # the fixture's own statistics agree with the median recorded in extra_info
        assert abs(bench["stats"]["median"] * 1e3 - info["median_ms"]) < 1e-6 * max(1.0, info["median_ms"])
