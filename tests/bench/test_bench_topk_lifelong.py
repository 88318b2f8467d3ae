"""`rellax-fast bench topk --lifelong` at the tiny size, and its torch-gemm baseline against the reference op."""

from __future__ import annotations

import argparse
import math

import torch

from rellax_fast.bench import cli, topk


def test_lifelong_histories_shape():
    items, offsets, users, pos = topk.lifelong_histories(257, 3, 101, n_items=50, seed=4)
    assert offsets.tolist() == [0, 257, 514, 771] and items.numel() == 771
    assert users.numel() == pos.numel() == 101
    assert (
        bool((pos >= 1).all())
        and bool((pos < 257).all())
        and bool((users >= 0).all())
        and bool((users < 3).all())
    )
    key = users * 1000 + pos
    assert bool((key[1:] >= key[:-1]).all())  # sorted by user then position
    _, _, users, pos = topk.lifelong_histories(257, 3, 30, n_items=50, seed=4, layout="recent")
    assert users.tolist() == [0] * 10 + [1] * 10 + [2] * 10 and pos.tolist() == list(range(247, 257)) * 3


def test_torch_gemm_baseline_matches_the_reference_op():
    from rellax_fast.ops import semantic_topk

    emb = torch.randn(37, 11, generator=torch.Generator().manual_seed(3))
    for metric, normalize, layout in (("cosine", True, "uniform"), ("dot", False, "recent")):
        items, offsets, users, pos = topk.lifelong_histories(97, 3, 41, n_items=37, seed=1, layout=layout)
        p_ref, s_ref = semantic_topk(emb, items, offsets, users, pos, 6, metric=metric, backend="reference")
        p, s = topk.torch_gemm_topk(
            emb, items, offsets, users, pos, 6, normalize, budget=200
        )  # several chunks
        torch.testing.assert_close(s, s_ref, atol=1e-4, rtol=0)
        assert torch.equal(p == -1, p_ref == -1)


def test_bench_topk_lifelong_tiny_writes_reports(tmp_path):
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(
        ["topk", "--lifelong", "--size", "tiny", "--device", "cpu", "--warmup", "0", "--repeat", "1"]
    )
    args.out = str(tmp_path)
    assert cli.run(args) == 0
    csv = (tmp_path / "topk.csv").read_text().strip().splitlines()
    header = csv[0].split(",")
    rows = [dict(zip(header, r.split(","))) for r in csv[1:]]
    lengths = topk.LIFELONG["tiny"]["lengths"]
    assert {(int(r["L"]), r["layout"]) for r in rows} == {
        (n, lay) for n in lengths for lay in ("uniform", "recent")
    }
    names = {r["backend"] for r in rows}
    assert {"torch-gemm", "prefilter-bf16"} <= names and any("W=" in n for n in names)
    for r in rows:
        gap = float(r["max_score_gap"])
        assert ("W=" in r["backend"] and math.isnan(gap)) or gap < 1e-4, r
        assert float(r["samples_per_s"]) > 0
    assert (tmp_path / "topk.png").exists()
