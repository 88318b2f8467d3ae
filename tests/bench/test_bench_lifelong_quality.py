"""``rellax-fast bench lifelong`` (AUC against history length K, issue #18) at a tiny size on the embedded
synthetic data: a tiny BERT backbone, seeded item embeddings instead of the MiniLM encoder, a small DIN, two K
values, a few training steps. Checks the files and their documented columns, the token budget growing with K,
the truncation counts (against the collator's own count), resumption, and the presets and flag errors."""

import json

import numpy as np
import pytest


def _argv(model, out, *extra):
    return [
        "bench",
        "lifelong",
        "--preset",
        "none",
        "--dataset",
        "synthetic",
        "--out",
        str(out),
        "--model",
        model,
        "--ks",
        "2,8",
        "--n-train",
        "16",
        "--n-test",
        "48",
        "--batch-size",
        "8",
        "--cflora-backend",
        "reference",
        "--din-epochs",
        "1",
        "--din-embed-dim",
        "4",
        "--din-hidden",
        "8",
        "--din-max-history",
        "5",
        "--n-boot",
        "50",
        "--no-progress",
        "--save-every",
        "100",
        *extra,
    ]


@pytest.mark.slow  # ~10 s on an idle 2-core machine (a DIN epoch on the synthetic data, 8 tiny points, a rerun)
def test_bench_lifelong_tiny_end_to_end(tiny_bert, seeded_embeddings, tmp_path, capsys):
    from rellax_fast.bench.lifelong import DIN_NAME, METHODS, POINT_COLUMNS
    from rellax_fast.cli import main

    # a low budget quantile and no margin: some prompts must lose history items, and the counts must say so
    argv = _argv(tiny_bert, tmp_path, "--budget-quantile", "0.3", "--budget-margin", "0")
    assert main(argv) == 0
    d = tmp_path / "lifelong"
    for name in ("lifelong.md", "lifelong.json", "lifelong.png"):
        assert (d / name).stat().st_size > 0, name
    assert (d / "lifelong.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = json.loads((d / "lifelong.json").read_text())
    points = res["points"]
    assert {(p["method"], p["k"]) for p in points} == {(m, k) for m in METHODS for k in (2, 8)}
    for p in points:
        assert set(POINT_COLUMNS) <= set(p), set(POINT_COLUMNS) - set(p)
        assert p["auc_lo"] <= p["auc"] <= p["auc_hi"] and p["logloss_lo"] <= p["logloss"] <= p["logloss_hi"]
        assert p["n_test"] == 48 and p["n_train"] == 16
        assert p["tokens_per_s"] > 0 and p["train_seconds"] > 0 and p["wall_seconds"] >= p["train_seconds"]
        assert 0 <= p["n_truncated_train"] <= 16 and 0 <= p["n_truncated_test"] <= 48
        assert (p["items_dropped_train"] > 0) == (p["n_truncated_train"] > 0)
        assert p["mean_tokens_train"] <= p["max_length"]
        assert 0 < p["p_auc_vs_din"] <= 1
        if p["k"] == 2:
            assert p["d_auc_vs_first_k"] == 0.0 and p["d_auc_vs_prev_k"] == 0.0
    # against the previous K (here the first): the paired difference of the two points' AUCs
    by = {(p["method"], p["k"]): p for p in points}
    for m in METHODS:
        later = by[(m, 8)]
        assert later["d_auc_vs_prev_k"] == pytest.approx(later["auc"] - by[(m, 2)]["auc"], abs=1e-9)
        assert (
            later["p_auc_vs_prev_k"] == pytest.approx(later["p_auc_vs_first_k"])
            and 0 < later["p_auc_vs_prev_k"] <= 1
        )
    # the token budget grows with K and is what every point at that K trained with
    budgets = {int(k): v["max_length"] for k, v in res["budgets"].items()}
    assert budgets[8] > budgets[2]
    assert all(p["max_length"] == budgets[p["k"]] for p in points)
    # at the 0.3 quantile with no margin, the longer K=8 prompts are cut somewhere, and it is reported
    assert sum(p["n_truncated_train"] for p in points if p["k"] == 8) > 0
    assert (
        res["din"]["name"] == DIN_NAME and res["din"]["auc_lo"] <= res["din"]["auc"] <= res["din"]["auc_hi"]
    )
    # the same test samples for every point: same labels, different models
    preds = {(m, k): np.load(d / "runs" / f"{m}-k{k}" / "predictions.npy") for m in METHODS for k in (2, 8)}
    assert all(v.shape == (48,) for v in preds.values())
    assert not np.allclose(preds[("text-recent", 2)], preds[("text-recent", 8)])
    md = (d / "lifelong.md").read_text()
    assert "| method | K=2 | K=8 |" in md and "| max_length (token budget) |" in md and "prompts cut" in md
    assert "tokens/s" in md and "wall time" in md and "| ΔAUC vs previous K (p) |" in md
    assert "AUC against history length K on synthetic" in capsys.readouterr().out

    # a rerun skips every finished point (same inputs) and writes the same numbers
    assert main(argv) == 0
    assert capsys.readouterr().out.count("done before, skipped") == 8
    rerun = json.loads((d / "lifelong.json").read_text())
    again = rerun["points"]
    assert [p["auc"] for p in again] == pytest.approx([p["auc"] for p in points])
    # the skipped points keep their own wall times: the sum still covers all of them
    assert rerun["meta"]["points_wall_seconds"] == pytest.approx(sum(p["wall_seconds"] for p in points))
    assert "summed over the points' own wall times" in (d / "lifelong.md").read_text()


def test_truncation_counts_match_the_collator(tiny_bert):
    """PromptSet's cut prompts and lost items agree with what the collator's encoding keeps (SPA prompts count
    their shown items through the placeholders, an independent count), and the budget rule is as documented."""
    from transformers import AutoTokenizer

    from rellax_fast.bench.lifelong import PromptSet, token_budget
    from rellax_fast.data.collate import PromptCollator, PromptSample

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    rng = np.random.default_rng(3)
    samples = []
    for i in range(12):
        n = int(rng.integers(0, 9))
        shown = [
            (j, f"Movie number {j} " + "word " * int(rng.integers(0, 6)), float(rng.integers(1, 6)))
            for j in range(n)
        ]
        samples.append(PromptSample("movie", None, shown, (99, "Target film"), int(i % 2), i, list(range(n))))
    ps = PromptSet(samples, tok, "encoder", "<spa>", False)
    budget = int(np.median(ps.lengths))
    got = ps.truncation(budget)
    collator = PromptCollator(tok, kind="encoder", max_length=budget, placeholder="<spa>")
    enc = [collator.encode(s) for s in samples]
    lost = [len(s.shown) - e["n_shown"] for s, e in zip(samples, enc)]
    assert got["n_truncated"] == sum(x > 0 for x in lost) > 0
    assert got["items_dropped"] == sum(lost)
    assert list(got["tokens"]) == [len(e["input_ids"]) for e in enc]
    assert token_budget(np.array([10, 20, 30, 40]), 1.0, 5, None) == 48  # 40 + 5, rounded up to 8
    assert token_budget(np.array([10, 20, 30, 40]), 1.0, 5, 44) == 44  # capped at the position limit


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--ks", "5,x"], "--ks"),
        (["--ks", "5,5"], "--ks"),
        (["--methods", "bogus"], "--methods: unknown"),
        (["--budget-quantile", "0"], "--budget-quantile"),
        (["--preset", "gpu"], "--preset gpu"),
    ],
)
def test_bench_lifelong_bad_options_name_the_flag(tmp_path, capsys, extra, match):
    from rellax_fast.cli import main

    assert main(["bench", "lifelong", "--out", str(tmp_path), *extra]) == 2
    assert match in capsys.readouterr().err


def test_presets_fill_only_flags_left_at_their_defaults():
    import argparse

    from rellax_fast.bench import cli, lifelong

    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    a = lifelong.apply_preset(p.parse_args(["lifelong", "--preset", "cpu"]))
    assert (a.ks, a.n_train, a.n_test) == ("5,10,20,30", 1536, 1000)
    b = lifelong.apply_preset(
        p.parse_args(["lifelong", "--preset", "cpu", "--n-train", "512", "--ks", "5,50"])
    )
    assert (b.ks, b.n_train, b.n_test) == ("5,50", 512, 1000)
    g = lifelong.apply_preset(p.parse_args(["lifelong", "--preset", "gpu", "--model", "/some/1b"]))
    assert g.mixed_precision == "bf16" and g.n_test == 0 and "50" in g.ks.split(",")
