"""Smoke test of ``rellax-fast bench cflora`` at the tiny size: rows, ratios and the report files."""

from __future__ import annotations

import argparse
import csv

from rellax_fast.bench import cli


def test_bench_cflora_tiny_writes_reports(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(
        [
            "cflora",
            "--size",
            "tiny",
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--warmup",
            "0",
            "--repeat",
            "1",
        ]
    )
    args.out = str(tmp_path)
    assert cli.run(args) == 0
    rows = list(csv.DictReader(open(tmp_path / "cflora.csv")))
    methods = {r["method"] for r in rows}
    assert {"floor", "unfused", "unfused+compile", "cflora[cpp]", "cflora[reference]"} <= methods
    assert {r["C"] for r in rows} == {"per-sample", "none"}
    for r in rows:
        if r["method"] == "unfused+compile":
            assert "skipped" in r["note"]
            continue
        assert float(r["fwd_ms"]) > 0 and float(r["bwd_ms"]) > 0 and float(r["fwd_bwd_ms"]) > 0, r
        assert float(r["fwd_bwd_tflops"]) > 0
        if r["method"] == "floor":
            assert float(r["fwd_bwd_vs_floor"]) == 1.0
    assert (tmp_path / "cflora.md").read_text().count("cflora[cpp]") == 2
    assert (tmp_path / "cflora.png").stat().st_size > 1000
    assert "bench cflora" in capsys.readouterr().out


def test_a_failing_method_becomes_a_one_line_note_and_the_suite_goes_on(tmp_path, monkeypatch):
    from rellax_fast.bench import cflora

    def broken(*_):
        raise RuntimeError("boom\n  second line")

    monkeypatch.setattr(cflora, "_unfused", broken)
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(
        [
            "cflora",
            "--size",
            "tiny",
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--warmup",
            "0",
            "--repeat",
            "1",
        ]
    )
    args.out = str(tmp_path)
    assert cli.run(args) == 0
    rows = list(csv.DictReader(open(tmp_path / "cflora.csv")))
    failed = [r for r in rows if r["method"] == "unfused"]
    assert len(failed) == 2 and all(r["note"] == "failed: RuntimeError: boom second line" for r in failed)
    assert all(not r["fwd_ms"] for r in failed)
    assert all(float(r["fwd_ms"]) > 0 for r in rows if r["method"] == "floor")
