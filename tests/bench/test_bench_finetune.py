"""``rellax-fast bench finetune`` at a tiny size on the embedded synthetic data (a tiny BERT, seeded item
embeddings): one row per trainer configuration, measured in one run, with the baseline's ratio of 1, the
same prompts trained in each, the padding that length grouping removes, and a valid AUC per row."""

import json

import pytest


@pytest.mark.slow  # ~15-25 s: a DIN epoch on the synthetic data and four short fine-tunings
def test_bench_finetune_tiny(tiny_bert, seeded_embeddings, tmp_path, monkeypatch):
    from rellax_fast.bench import finetune
    from rellax_fast.cli import main

    monkeypatch.setattr(finetune, "cpu_has_native_bf16", lambda: False, raising=False)
    import rellax_fast.train.trainer as trainer

    monkeypatch.setattr(trainer, "cpu_has_native_bf16", lambda: False)  # the bf16 row's skip path, on any CPU
    argv = [
        "bench",
        "finetune",
        "--dataset",
        "synthetic",
        "--out",
        str(tmp_path),
        "--model",
        tiny_bert,
        "--n-train",
        "40",
        "--n-valid",
        "30",
        "--batch-size",
        "4",
        "--k",
        "3",
        "--max-length",
        "96",
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
        "--no-progress",
        "--warmup",
        "1",
    ]
    assert main(argv) == 0
    res = json.loads((tmp_path / "finetune" / "finetune.json").read_text())
    rows = {r["config"]: r for r in res["rows"]}
    assert list(rows) == [
        "baseline",
        "+ token cache",
        "+ length groups",
        "+ bf16 autocast",
        "+ torch.compile",
    ]
    assert "no native bf16" in rows["+ torch.compile"]["note"]
    assert "no native bf16" in rows["+ bf16 autocast"]["note"]
    timed = [rows[k] for k in ("baseline", "+ token cache", "+ length groups")]
    assert timed[0]["speedup"] == 1.0
    for r in timed:
        assert r["steps"] == 10 and r["seconds"] > 0 and r["samples_per_s"] > 0 and 0 <= r["valid_auc"] <= 1
        assert r["speedup"] == pytest.approx(
            r["samples_per_s"] / timed[0]["samples_per_s"], rel=0.02, abs=0.001
        )
    # the same prompts: the same real tokens per second ratio as samples per second, and grouping pads less
    assert timed[2]["padding_share"] < timed[1]["padding_share"]
    assert timed[0]["padding_share"] == timed[1]["padding_share"]
    md = (tmp_path / "finetune" / "finetune.md").read_text()
    assert "| config |" in md and "+ length groups" in md


def test_bench_finetune_rejects_an_empty_training_set(tmp_path, capsys):
    from rellax_fast.cli import main

    assert (
        main(["bench", "finetune", "--dataset", "synthetic", "--out", str(tmp_path), "--n-train", "0"]) == 2
    )
    assert "--n-train must be >= 1" in capsys.readouterr().err


@pytest.mark.slow  # ~15 s: a DIN epoch and three short fine-tunings
def test_bench_finetune_causal_options(tiny_bert, seeded_embeddings, tmp_path):
    """--configs picks the rows (the first is the speedup's reference); the top-layers row adapts only the
    top --adapter-layers layers and the checkpointing row trains with gradient checkpointing."""
    from rellax_fast.bench import finetune
    from rellax_fast.cli import main

    seen = []
    real_fresh = finetune.fresh_model

    def spy(plan, cfg=None):
        model, collator = real_fresh(plan, cfg)
        cfg = cfg or plan.cfg
        seen.append(
            (cfg.adapter_layers, cfg.train.gradient_checkpointing, model.cflora_config.layers_to_transform)
        )
        return model, collator

    finetune.fresh_model = spy
    try:
        argv = ["bench", "finetune", "--dataset", "synthetic", "--out", str(tmp_path), "--model", tiny_bert]
        argv += ["--n-train", "24", "--n-valid", "20", "--batch-size", "4", "--k", "3", "--max-length", "96"]
        argv += ["--din-epochs", "1", "--din-embed-dim", "4", "--din-hidden", "8", "--din-max-history", "5"]
        argv += ["--no-progress", "--warmup", "1", "--configs", "groups,checkpointing,top-layers"]
        assert main([*argv, "--adapter-layers", "1"]) == 0
    finally:
        finetune.fresh_model = real_fresh
    rows = json.loads((tmp_path / "finetune" / "finetune.json").read_text())["rows"]
    names = [r["config"] for r in rows]
    assert names == ["+ length groups", "+ gradient checkpointing", "+ adapters in the top 1 layers only"]
    assert rows[0]["speedup"] == 1.0 and all(r["steps"] == 6 and 0 <= r["valid_auc"] <= 1 for r in rows)
    # the warm-up model, then one per row: only the last adapts one layer (the tiny BERT has 2: layer 1)
    assert seen[-3:] == [(0, False, None), (0, True, None), (1, False, [1])]


def test_bench_finetune_configs_are_checked(tmp_path, capsys):
    from rellax_fast.cli import main

    base = ["bench", "finetune", "--dataset", "synthetic", "--out", str(tmp_path)]
    assert main([*base, "--configs", "bf16,nope"]) == 2
    assert "--configs: unknown ['nope']" in capsys.readouterr().err
    assert main([*base, "--configs", "top-layers"]) == 2
    assert "needs --adapter-layers N >= 1" in capsys.readouterr().err
