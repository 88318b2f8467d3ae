"""rellax_fast.bench.report's Markdown table (a wrapper of train.metrics.markdown_table) and the failure note
every bench suite writes into a row (bench.e2e_common.error_note)."""

from __future__ import annotations

from rellax_fast.bench import report
from rellax_fast.bench.e2e_common import error_note


def test_bench_markdown_table_uses_first_row_keys_and_significant_digits():
    rows = [
        {"op": "topk", "ms": 1234.5678, "speedup": 0.000123456, "note": None},
        {"op": "cflora", "ms": 2.0},
    ]
    lines = report.markdown_table(rows).splitlines()
    assert lines == [
        "| op | ms | speedup | note |",
        "|---|---|---|---|",
        "| topk | 1235 | 0.0001235 |  |",
        "| cflora | 2 |  |  |",
    ]
    assert report.markdown_table(rows, ["ms"]).splitlines() == ["| ms |", "|---|", "| 1235 |", "| 2 |"]
    assert report.markdown_table([]) == "(no rows)\n"
    assert report.markdown_table([], ["ms"]) == "(no rows)\n"


def test_write_reports_table_has_every_column(tmp_path):
    rows = [{"a": 1.0}, {"a": 2.5, "b": "x"}]
    paths = report.write_reports(rows, str(tmp_path), "t", "# t")
    md = (tmp_path / "t.md").read_text()
    assert paths["md"] == str(tmp_path / "t.md")
    assert md == "# t\n\n| a | b |\n|---|---|\n| 1 |  |\n| 2.5 | x |\n"


def test_error_note_is_one_line_and_bounded():
    note = error_note(RuntimeError("CUDA out of memory.\n  Tried to allocate 2.00 GiB\t(" + "x" * 400 + ")"))
    assert note.startswith("failed: RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB (xxx")
    assert "\n" not in note and "\t" not in note and "  " not in note
    assert len(note) == len("failed: RuntimeError: ") + 300
    assert error_note(ValueError("")) == "failed: ValueError: "


def test_time_ms_runs_the_setup_untimed_before_every_call_and_returns_the_median(monkeypatch):
    from types import SimpleNamespace

    import torch

    calls, setups = [], iter(range(100))
    ticks = iter([0.0, 0.004, 1.0, 1.001, 2.0, 2.010])  # perf_counter around the 3 timed calls: 4, 1, 10 ms
    monkeypatch.setattr(report, "time", SimpleNamespace(perf_counter=lambda: next(ticks)))
    ms = report.time_ms(calls.append, torch.device("cpu"), warmup=2, repeat=3, before=lambda: next(setups))
    assert calls == [0, 1, 2, 3, 4]  # fn(before()) for the 2 warm-up and the 3 timed calls, in order
    assert abs(ms - 4.0) < 1e-9  # the median of 4, 1 and 10 ms
    monkeypatch.undo()
    plain = []
    assert report.time_ms(lambda: plain.append(1), torch.device("cpu"), warmup=1, repeat=2) >= 0
    assert len(plain) == 3
