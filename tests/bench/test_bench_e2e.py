"""Tests of ``rellax-fast bench e2e`` (tiny size, CPU), its BENCHMARKS.md section writer, and
scripts/gpu_check.sh (syntax and dry run) / scripts/sanitizer_smoke.py (CPU dry run on the cpp backend).

These check that every provider produces a finite measurement and that the reports are written; they
make no speed claim (speed figures come from the benchmark itself, on the GPU).
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import subprocess
import sys

import pytest
import torch
from rellax_testing import REPO

from rellax_fast.bench import e2e, e2e_infer, e2e_train, report

NUMERIC = ("ms", "tokens_per_s", "peak_mem_mb")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One CLI run of the suite at the tiny size: 1 warm-up, 1 repeat; torch.compile on its ``eager``
    backend (dynamo capture without inductor's minute-long CPU code generation)."""
    from rellax_fast.cli import main

    out = tmp_path_factory.mktemp("e2e")
    old = os.environ.get("RELLAX_BENCH_COMPILE_BACKEND")
    os.environ["RELLAX_BENCH_COMPILE_BACKEND"] = "eager"
    try:
        rc = main(
            [
                "bench",
                "e2e",
                "--size",
                "tiny",
                "--device",
                "cpu",
                "--warmup",
                "1",
                "--repeat",
                "1",
                "--out",
                str(out),
            ]
        )
    finally:
        if old is None:
            os.environ.pop("RELLAX_BENCH_COMPILE_BACKEND", None)
        else:
            os.environ["RELLAX_BENCH_COMPILE_BACKEND"] = old
    with open(out / "e2e.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    return rc, out, rows


@pytest.mark.slow
def test_every_provider_has_a_finite_row(tiny_run):
    rc, _, rows = tiny_run
    assert rc == 0
    spec = e2e.SIZES["tiny"]
    train = [r for r in rows if r["phase"] == "train"]
    assert [r["provider"] for r in train] == [p[0] for p in e2e.TRAIN_PROVIDERS]
    expected_infer = {
        (name, phase, str(b))
        for name in e2e.INFER_PROVIDERS
        for phase in ("prefill", "decode")
        for b in spec.infer_batches
    }
    got_infer = {(r["provider"], r["phase"], r["batch"]) for r in rows if r["phase"] != "train"}
    assert got_infer == expected_infer
    assert len(rows) == len(train) + len(expected_infer)
    for r in rows:
        assert not r["note"].startswith("failed"), f"{r['provider']} {r['phase']}: {r['note']}"
        for key in NUMERIC:
            assert r[key] != "", f"{r['provider']} {r['phase']}: {key} missing"
            assert math.isfinite(float(r[key])), f"{r['provider']} {r['phase']}: {key}={r[key]}"
        assert float(r["ms"]) > 0 and float(r["tokens_per_s"]) > 0
        assert float(r["speed_vs_baseline"]) > 0


@pytest.mark.slow
def test_training_rows_are_consistent(tiny_run):
    _, _, rows = tiny_run
    spec = e2e.SIZES["tiny"]
    train = {r["provider"]: r for r in rows if r["phase"] == "train"}
    for r in train.values():
        assert int(r["batch"]) == spec.train_batch and int(r["seq"]) == spec.seq
        # tokens/s is batch*seq over the step time
        assert float(r["tokens_per_s"]) == pytest.approx(
            spec.train_batch * spec.seq / (float(r["ms"]) / 1e3), rel=1e-6
        )
        assert r["baseline"] == e2e.TRAIN_BASELINE
    assert float(train[e2e.TRAIN_BASELINE]["speed_vs_baseline"]) == pytest.approx(1.0)
    assert float(train[e2e.COMPILED_PROVIDER]["speed_vs_compiled"]) == pytest.approx(1.0)
    compiled = [name for name, kind, _ in e2e.TRAIN_PROVIDERS if e2e.is_compiled(kind)]
    assert e2e.COMPILED_PROVIDER in compiled and len(compiled) == 3  # PEFT's, and CFLoRA full and identity
    for name in compiled:  # each really went through torch.compile (its first-call note)
        assert "torch.compile backend=eager" in train[name]["note"], name
    for name in ("rellax-fast full (auto)", "rellax-fast identity (auto)"):
        assert "torch.compile" not in train[name]["note"]
        assert train[f"{name} + torch.compile"]["note"].startswith(train[name]["note"].split(";")[0])
    assert "backend reference" in train["rellax-fast full (reference)"]["note"]
    # every adapter starts as an exact no-op (B = 0, C = I), so the first step's loss is the base model's
    # loss for every provider: the providers really ran the same model on the same batch
    losses = [float(r["loss"]) for r in train.values()]
    assert losses[0] == pytest.approx(math.log(spec.vocab), rel=0.2)  # random weights: near-uniform output
    for loss in losses[1:]:
        assert loss == pytest.approx(losses[0], rel=1e-4)


@pytest.mark.slow
def test_inference_rows_and_ratios(tiny_run):
    _, _, rows = tiny_run
    spec = e2e.SIZES["tiny"]
    infer = [r for r in rows if r["phase"] != "train"]
    for r in infer:
        n_tokens = int(r["batch"]) * (spec.prompt if r["phase"] == "prefill" else 1)
        assert int(r["seq"]) == spec.prompt
        assert float(r["tokens_per_s"]) == pytest.approx(n_tokens / (float(r["ms"]) / 1e3), rel=1e-6)
        assert r["baseline"] == e2e.INFER_BASELINE
        base = next(
            b
            for b in infer
            if b["provider"] == e2e.INFER_BASELINE and b["phase"] == r["phase"] and b["batch"] == r["batch"]
        )
        assert float(r["speed_vs_baseline"]) == pytest.approx(float(base["ms"]) / float(r["ms"]), rel=1e-6)


@pytest.mark.slow
def test_reports_and_plots_written(tiny_run):
    _, out, rows = tiny_run
    for name in ("e2e.csv", "e2e.md", "e2e.png", "e2e_memory.png", "e2e_inference.png"):
        path = out / name
        assert path.exists() and path.stat().st_size > 0, name
    for name in ("e2e.png", "e2e_memory.png", "e2e_inference.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "e2e_partial.csv").exists()  # the partial report is removed after a finished run
    md = (out / "e2e.md").read_text()
    assert "LlamaForCausalLM `tiny`" in md and "torch " in md
    assert md.count("\n| train |") == len(e2e.TRAIN_PROVIDERS)
    assert not list(out.glob("*.tmp*"))


def test_size_aliases_and_shapes():
    assert e2e.resolve_size("cpu") == "tiny" and e2e.resolve_size("gpu") == "1b"
    assert e2e.resolve_size("7b-layer") == "7b-layer"
    with pytest.raises(ValueError, match="--size must be one of"):
        e2e.resolve_size("70b")
    one_b, seven = e2e.SIZES["1b"], e2e.SIZES["7b-layer"]
    assert (one_b.hidden, one_b.layers, one_b.heads, one_b.kv_heads, one_b.intermediate) == (
        2048,
        16,
        32,
        8,
        5632,
    )
    assert (seven.hidden, seven.heads, seven.intermediate) == (4096, 32, 11008)
    for spec in e2e.SIZES.values():
        # random-weight sizes: the TALLRec/ReLLa r=16; the pretrained smollm2: ReLLaX's own r=8
        assert (
            spec.r == (8 if spec.backbone else 16)
            and spec.hidden % spec.heads == 0
            and spec.heads % spec.kv_heads == 0
        )
    assert one_b.seq == 512 and one_b.infer_batches == (1, 32)


@pytest.mark.parametrize(
    "size, n_params, kv_out", [("1b", 852_559_872, 512), ("7b-layer", 666_914_816, 4096)]
)
def test_gpu_sizes_build_the_stated_llama(size, n_params, kv_out):
    """The GPU sizes' models, built on the meta device (no memory): parameter count, GQA shapes, dtype."""
    spec = e2e.SIZES[size]
    model = e2e.build_base_model(spec, torch.device("meta"), torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == n_params
    attn = model.model.layers[0].self_attn
    assert tuple(attn.k_proj.weight.shape) == (kv_out, spec.hidden)
    assert tuple(model.model.layers[0].mlp.gate_proj.weight.shape) == (spec.intermediate, spec.hidden)
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in model.parameters())


def test_failing_provider_becomes_a_row(monkeypatch):
    """A provider that raises is recorded (note "failed: ...") and the next provider still runs."""
    spec = e2e.E2ESize(
        hidden=32,
        layers=1,
        heads=2,
        kv_heads=1,
        intermediate=64,
        vocab=64,
        train_batch=1,
        seq=8,
        infer_batches=(1,),
        prompt=8,
        cond_dim=4,
    )
    base = e2e.build_base_model(spec, torch.device("cpu"), torch.float32)

    def broken(*args, **kwargs):
        raise RuntimeError("simulated kernel failure")

    monkeypatch.setattr(e2e_train, "cflora_model", broken)
    seen = []
    rows = e2e.bench_training(
        base,
        spec,
        torch.device("cpu"),
        torch.float32,
        0,
        1,
        "eager",
        seen.append,
        providers=(("rellax-fast full (auto)", "full", None), (e2e.TRAIN_BASELINE, "peft", None)),
    )
    e2e.add_training_ratios(rows)
    assert rows[0]["note"] == "failed: RuntimeError: simulated kernel failure" and rows[0]["ms"] is None
    assert rows[0]["speed_vs_baseline"] is None
    assert rows[1]["ms"] > 0 and rows[1]["speed_vs_baseline"] == pytest.approx(1.0)
    assert len(seen) == 2  # the partial report was refreshed after each provider


def test_apply_cflora_rows_run_the_fused_op_next_to_peft(monkeypatch):
    """The "PEFT LoRA + apply_cflora" training and inference rows: measured, same first loss as PEFT LoRA
    (the same model: B = 0 at init), and the patched layers really call ops.cflora_linear."""
    from rellax_fast.cflora import patch

    spec = e2e.E2ESize(
        hidden=32,
        layers=1,
        heads=2,
        kv_heads=1,
        intermediate=64,
        vocab=64,
        train_batch=2,
        seq=8,
        infer_batches=(1,),
        prompt=8,
        r=4,
        cond_dim=4,
    )
    base = e2e.build_base_model(spec, torch.device("cpu"), torch.float32)
    calls = []
    real = patch.cflora_linear
    monkeypatch.setattr(patch, "cflora_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    providers = ((e2e.TRAIN_BASELINE, "peft", None), (e2e.PATCHED_PROVIDER, "peft-apply", None))
    rows = e2e.bench_training(
        base, spec, torch.device("cpu"), torch.float32, 0, 1, "eager", lambda rows: None, providers=providers
    )
    e2e.add_training_ratios(rows)
    peft_row, patched_row = rows
    assert patched_row["provider"] == e2e.PATCHED_PROVIDER and "apply_cflora" in patched_row["note"]
    assert not patched_row["note"].startswith("failed"), patched_row["note"]
    assert patched_row["ms"] > 0 and patched_row["speed_vs_baseline"] > 0
    assert patched_row["loss"] == pytest.approx(peft_row["loss"], rel=1e-5)
    n_layers = spec.layers * len(e2e.TARGET_MODULES)
    assert len(calls) >= 2 * n_layers and len(calls) % n_layers == 0  # warm-up, timed and memory steps
    assert (e2e.PATCHED_PROVIDER, "peft-apply", None) in e2e.TRAIN_PROVIDERS
    assert e2e.PATCHED_INFER_PROVIDER in e2e.INFER_PROVIDERS
    calls.clear()
    model, needs_cond, note = e2e_infer._inference_model(
        e2e.PATCHED_INFER_PROVIDER, base, spec, torch.device("cpu"), torch.float32
    )
    with torch.no_grad():
        model(input_ids=torch.zeros(1, 4, dtype=torch.long))
    assert not needs_cond and "apply_cflora" in note and len(calls) == n_layers


def test_benchmarks_section_appends_atomically(tmp_path):
    out = tmp_path / "bench"
    out.mkdir()
    (out / "cflora.md").write_text("# bench cflora\n\nshapes...\n\n| a | b |\n|---|---|\n| 1 | 2 |\n")
    (out / "e2e_partial.md").write_text(
        "# bench e2e (partial)\n\n| provider | ms |\n|---|---|\n| PEFT LoRA | 3 |\n"
    )
    bench_md = tmp_path / "BENCHMARKS.md"
    bench_md.write_text("# Benchmarks\n\nearlier results\n")
    command = "bash scripts/gpu_check.sh (rellax-fast bench e2e --size 1b)"
    section = report.append_benchmarks_section(
        str(bench_md), str(out), command, device="cpu", title="GPU check"
    )
    text = bench_md.read_text()
    assert text.startswith("# Benchmarks\n\nearlier results\n")  # existing content kept
    assert text.endswith(section)
    assert f"- Command: `{command}`" in section
    assert "torch " + torch.__version__ in section and "triton" in section and "CUDA" in section
    assert "### bench cflora" in section and "| 1 | 2 |" in section and "\n# bench cflora" not in section
    assert "### bench topk" in section and "Not produced" in section
    assert "Run did not finish" in section and "| PEFT LoRA | 3 |" in section
    assert not list(tmp_path.glob("*.tmp*"))
    # the module's command-line entry used by gpu_check.sh
    section_file = tmp_path / "section.md"
    assert (
        e2e.main(
            [
                "benchmarks-section",
                "--out-dir",
                str(out),
                "--command",
                command,
                "--suites",
                "cflora",
                "--section-file",
                str(section_file),
            ]
        )
        == 0
    )
    assert "### bench cflora" in section_file.read_text() and "### bench e2e" not in section_file.read_text()
    assert bench_md.read_text() == text  # no --append-to: BENCHMARKS.md untouched


# ------------------------------------------------------------------------------------------ scripts

GPU_CHECK = REPO / "scripts" / "gpu_check.sh"
STEP_NAMES = (
    "env",
    "build",
    "info",
    "test-cuda",
    "test-triton",
    "sanitizer",
    "bench-cflora",
    "bench-topk",
    "bench-e2e",
    "benchmarks",
)


def test_gpu_check_syntax():
    subprocess.run(["bash", "-n", str(GPU_CHECK)], check=True)


def test_gpu_check_dry_run_lists_every_step(tmp_path):
    env = dict(os.environ, DRY_RUN="1", OUT=str(tmp_path), PYTHON=sys.executable)
    res = subprocess.run(["bash", str(GPU_CHECK)], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    for step in STEP_NAMES:
        assert f"[dry-run] {step}" in res.stdout, step
    assert "TORCH_CUDA_ARCH_LIST=9.0a RELLAX_BUILD_CUDA=1" in res.stdout and "MAX_JOBS=16" in res.stdout
    assert "compute-sanitizer --tool memcheck" in res.stdout
    assert "bench e2e --size 1b" in res.stdout and "bench cflora --size gpu" in res.stdout
    assert "pytest -m cuda" in res.stdout
    summary = (tmp_path / "summary.md").read_text()
    for step in STEP_NAMES:
        assert f"| {step} | dry-run |" in summary


def test_gpu_check_records_failures_and_continues(tmp_path):
    """A real (non-dry) run of two steps on this CPU machine: `info` fails its CUDA check, the next step
    still runs, and the summary and exit status say so."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the info step would pass")
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable, STEPS="info,benchmarks", BUDGET_S="120")
    res = subprocess.run(["bash", str(GPU_CHECK)], env=env, capture_output=True, text=True, timeout=180)
    summary = (tmp_path / "summary.md").read_text()
    assert res.returncode == 1
    assert "| info | fail (rc 1) |" in summary
    assert "| benchmarks | pass |" in summary
    assert "built without CUDA" in (tmp_path / "logs" / "info.log").read_text()
    assert (tmp_path / "BENCHMARKS_section.md").exists()


def test_sanitizer_smoke_runs_on_cpu_backend():
    """The sanitizer script's cases, run against the cpp backend on the CPU (its GPU run is gpu_check's)."""
    from rellax_fast.ops import all_ops, availability

    all_ops()
    res = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "sanitizer_smoke.py"), "--backend", "cpp"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    ops = ["seeded_dropout", "cflora_linear", "semantic_topk"]
    for op in ops:
        if availability(op)["cpp"] is None:
            assert f"sanitizer_smoke: {op}: ok" in res.stdout, res.stdout + res.stderr
    if all(availability(op)["cpp"] is None for op in ops):
        assert res.returncode == 0


def test_parser_accepts_e2e_sizes():
    from rellax_fast.bench import cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    for size in ("tiny", "1b", "7b-layer", "cpu", "gpu"):
        assert parser.parse_args(["e2e", "--size", size]).size == size


def test_ctr_scoring_rows_time_predict_proba(monkeypatch, tmp_path):
    """The CTR-scoring piece wraps train.trainer.predict_proba around an in-process `rellax-fast eval`
    (here a stand-in command that scores 10 samples), reports samples/s, and restores the original."""
    import numpy as np

    import rellax_fast.cli
    from rellax_fast.train import trainer

    def scorer(model, dataset, batch_size=64, progress=True, desc="score"):
        return np.full(len(dataset), 0.5)

    monkeypatch.setattr(trainer, "predict_proba", scorer)
    calls = []

    def fake_eval(argv):
        calls.append(argv)
        from rellax_fast.train.trainer import predict_proba  # what cli_eval.run does, at call time

        assert predict_proba is not scorer  # the benchmark's timing wrapper is in place
        predict_proba(torch.nn.Linear(2, 2), list(range(10)), 4, progress=False)
        return 0

    monkeypatch.setattr(rellax_fast.cli, "main", fake_eval)
    rows = e2e.bench_ctr_scoring("some/run", 10, 4, str(tmp_path))
    assert calls[0][:3] == ["eval", "--run", "some/run"] and "--n" in calls[0]
    assert trainer.predict_proba is scorer
    assert [r["phase"] for r in rows] == ["ctr-score", "ctr-score"]
    for r in rows:
        assert r["samples_per_s"] > 0 and math.isfinite(r["samples_per_s"]) and r["ms"] > 0
        assert "10 samples" in r["note"]
    monkeypatch.setattr(rellax_fast.cli, "main", lambda argv: 1)
    with pytest.raises(RuntimeError, match="exit status 1"):
        e2e.bench_ctr_scoring("some/run", 10, 4, str(tmp_path))
