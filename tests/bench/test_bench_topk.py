"""Smoke test of `rellax-fast bench topk` at the tiny size: every row present, reports written, results agree."""

from __future__ import annotations

import argparse

import torch

from rellax_fast.bench import cli, topk


def test_synthetic_histories_look_like_ml1m():
    items, offsets, users, pos = topk.synthetic_histories(2000, seed=1)
    lengths = (offsets[1:] - offsets[:-1]).double()
    assert lengths.min() >= topk.ML1M_MIN and lengths.max() <= topk.ML1M_MAX
    assert 130 < float(lengths.mean()) < 200 and 80 < float(lengths.median()) < 115
    assert users.numel() == int(offsets[-1]) and bool((pos < lengths.long()[users]).all())


def test_baselines_agree_with_the_op():
    from rellax_fast.ops import semantic_topk

    items, offsets, users, pos = topk.synthetic_histories(5, n_items=50, seed=2, max_len=60)
    emb = torch.randn(50, 16)
    p_ref, s_ref = semantic_topk(emb, items, offsets, users, pos, 4, backend="reference")
    for fn in (topk.torch_padded_topk, topk.faiss_per_user_topk):
        p, s = fn(emb, items, offsets, 4, True)
        torch.testing.assert_close(s, s_ref, atol=1e-5, rtol=0)
        assert torch.equal(p == -1, p_ref == -1)


def test_bench_topk_tiny_writes_reports(tmp_path):
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["topk", "--size", "tiny", "--device", "cpu", "--warmup", "0", "--repeat", "1"])
    args.out = str(tmp_path)
    assert cli.run(args) == 0
    md = (tmp_path / "topk.md").read_text()
    csv = (tmp_path / "topk.csv").read_text()
    for name in ("torch-padded", "faiss-per-user", "prefilter-bf16"):
        assert name in md and name in csv
    rows = csv.strip().splitlines()[1:]
    assert len(rows) >= 3
    header = csv.splitlines()[0].split(",")
    gap = header.index("max_score_gap")
    assert all(float(r.split(",")[gap]) < 1e-4 for r in rows), "backends disagree on the top-k scores"
    assert (tmp_path / "topk.png").exists()
