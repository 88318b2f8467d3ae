"""`rellax-fast embed` / `retrieve` on the synthetic dataset with a tiny HF LM saved to disk (fast)."""

import json

import numpy as np
import pytest


def _run_cli(argv):
    from rellax_fast.cli import main

    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def tiny_lm_dir(tmp_path_factory):
    """A tiny random BertModel with the MiniLM tokenizer, saved like any Hugging Face checkpoint."""
    from rellax_testing import save_tiny_bert

    path = tmp_path_factory.mktemp("tiny_lm")
    save_tiny_bert(path, layers=1, max_positions=64, seed=0)
    return path


def test_command_modules_import_nothing_heavy():
    import subprocess
    import sys

    code = (
        "import sys, rellax_fast.subr.cli_embed, rellax_fast.subr.cli_retrieve; "
        "print([m for m in ('torch', 'numpy', 'transformers', 'sentence_transformers', 'faiss', 'sklearn') "
        "if m in sys.modules])"
    )
    assert (
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout.strip()
        == "[]"
    )


def test_embed_builds_hits_and_rebuilds_on_option_change(tiny_lm_dir, tmp_path, capsys):
    common = ["--dataset", "synthetic", "--out", tmp_path, "--encoder", tiny_lm_dir, "--device", "cpu"]
    assert _run_cli(["embed", *common, "--pca", 8, "--batch-size", 256]) == 0
    out = capsys.readouterr().out
    assert "cache     built" in out and "1700 x 8 float32" in out and "[hf-lm]" in out
    assert _run_cli(["embed", *common, "--pca", 8]) == 0
    assert "cache     hit" in capsys.readouterr().out
    assert _run_cli(["embed", *common, "--pca", 4]) == 0
    out = capsys.readouterr().out
    assert "cache     built" in out and "1700 x 4" in out  # other options: an entry of their own
    assert _run_cli(["embed", *common, "--pca", 8]) == 0  # the --pca 8 entry was kept
    assert "cache     hit" in capsys.readouterr().out
    metas = [json.loads(p.read_text()) for p in (tmp_path / "embeddings").glob("synthetic__*.json")]
    assert sorted(m["shape"][1] for m in metas) == [4, 8] and all(
        m["key"]["encoder"]["kind"] == "hf-lm" for m in metas
    )
    assert _run_cli(["embed", *common, "--pca", 5000]) == 2  # clear error, no traceback
    assert "pca_dims must be in [1, n_items=1700]" in capsys.readouterr().err


def test_retrieve_on_prepared_synthetic(tiny_lm_dir, tmp_path, capsys):
    common = ["--dataset", "synthetic", "--out", tmp_path]
    assert _run_cli(["prepare", *common]) == 0  # writes meta.json: retrieve reads the prepared splits
    enc = ["--encoder", tiny_lm_dir, "--device", "cpu"]
    for mode in ("low", "recent"):
        assert (
            _run_cli(
                ["retrieve", *common, *enc, "--k", 3, "--mode", mode, "--limit", 150, "--method", "global"]
            )
            == 0
        )
        summary = json.loads((tmp_path / "retrieval" / "summary.json").read_text())
        assert summary["mode"] == mode and set(summary["splits"]) == {"train", "valid", "test"}
        for split in ("train", "valid", "test"):
            npz = np.load(tmp_path / "retrieval" / f"{split}.npz")
            assert npz["shown_pos"].shape == (150, 3)
            assert summary["splits"][split]["samples"] == 150
            if mode == "low":  # ascending similarity
                sc = npz["shown_score"]
                assert (np.diff(np.where(np.isfinite(sc), sc, np.inf), axis=1) >= -1e-6).all()
    out = capsys.readouterr().out
    assert "samples/s" in out and "wrote train.npz, valid.npz, test.npz" in out
    assert not list((tmp_path / "retrieval").glob("*.tmp"))
    assert _run_cli(["retrieve", "--dataset", "ml-100k", "--out", tmp_path, "--prepared", tmp_path]) == 2
