"""Run folders survive being moved and copied, and eval writes only into its --out (issue #13, item 6).

One tiny pipeline through the CLI (a ml-100k-format corpus of 8 users, a 2-layer BERT): `train`, then
`eval` of the original, of the moved --out, of a copy whose original DIN was retrained, of a run folder
copied alone, and with tampered or missing SUBR embeddings.
"""

import json
import os
import shutil

import numpy as np
import pytest
import torch

from rellax_fast.cli import main

pytestmark = pytest.mark.slow  # one tiny `train` through the CLI (MiniLM item embeddings included): ~15-30 s


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    from rellax_testing import save_tiny_bert

    return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


DIN = ["--din-epochs", "1", "--din-hidden", "8", "--din-embed-dim", "4", "--din-max-history", "5"]


def train_argv(raw, out, model, *extra):
    return [
        "train",
        "--dataset",
        "ml-100k",
        "--data-dir",
        str(raw),
        "--out",
        str(out),
        "--model",
        model,
        "--n-train",
        "16",
        "--n-test",
        "0",
        "--k",
        "3",
        "--batch-size",
        "8",
        "--max-length",
        "96",
        "--cflora-backend",
        "reference",
        "--no-progress",
        *DIN,
        *extra,
    ]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_bert):
    from corpus import write_clean  # ml-100k format, 8 users x 12 ratings: 7 test samples

    root = tmp_path_factory.mktemp("relocate")
    raw = write_clean(root / "raw")
    out = root / "out"
    assert main(train_argv(raw, out, tiny_bert)) == 0
    run = out / "rellax-full"
    meta = json.loads((run / "rellax.json").read_text())
    assert meta["paths_relative_to"] == "run" and meta["ctr_dir"] == os.path.join("..", "ctr")
    assert (
        meta["subr_embeddings"] == os.path.join("..", "subr_embeddings.npz")
        and len(meta["din_fingerprint"]) == 64
    )
    return raw, out, np.load(run / "predictions.npy")


def evaluate(raw, run, out):
    return main(
        [
            "eval",
            "--run",
            str(run),
            "--dataset",
            "ml-100k",
            "--data-dir",
            str(raw),
            "--out",
            str(out),
            "--no-progress",
        ]
    )


def p_click(folder):
    return np.array(
        [json.loads(x)["p_click"] for x in (folder / "predictions.jsonl").read_text().splitlines()]
    )


def snapshot(root):
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def test_moved_and_copied_runs_evaluate_with_their_own_din(trained, tmp_path, capsys):
    raw, out, reference = trained
    moved = tmp_path / "moved"
    shutil.copytree(out, tmp_path / "staging")
    os.rename(tmp_path / "staging", moved)  # a moved --out (kept the fixture's folder for the other tests)
    before = snapshot(tmp_path)
    assert evaluate(raw, moved / "rellax-full", tmp_path / "ev-moved") == 0
    np.testing.assert_allclose(p_click(tmp_path / "ev-moved"), reference, rtol=1e-5, atol=1e-6)
    after = snapshot(tmp_path)
    changed = {p for p in after if before.get(p) != after[p]}
    assert changed and all(p.startswith(str(tmp_path / "ev-moved")) for p in changed), (
        changed
    )  # only its --out

    copy = tmp_path / "copy"
    shutil.copytree(moved, copy)
    # the original's DIN is retrained: the copy must keep using its own, the original must refuse
    assert (
        main(
            [
                "train-ctr",
                "--dataset",
                "ml-100k",
                "--data-dir",
                str(raw),
                "--out",
                str(moved),
                "--epochs",
                "1",
                "--hidden",
                "8",
                "--embed-dim",
                "6",
                "--max-history",
                "5",
                "--no-progress",
            ]
        )
        == 0
    )
    assert evaluate(raw, copy / "rellax-full", tmp_path / "ev-copy") == 0
    np.testing.assert_allclose(p_click(tmp_path / "ev-copy"), reference, rtol=1e-5, atol=1e-6)
    capsys.readouterr()
    assert evaluate(raw, moved / "rellax-full", tmp_path / "ev-stale") == 2
    err = capsys.readouterr().err
    assert "error:" in err and str(moved / "ctr") in err and "not the one the run" in err  # normalised path
    assert not (tmp_path / "ev-stale" / "predictions.jsonl").exists()


def test_a_run_folder_copied_alone_is_a_clear_error(trained, tmp_path, capsys):
    raw, out, _ = trained
    shutil.copytree(out / "rellax-full", tmp_path / "alone" / "rellax-full")
    assert evaluate(raw, tmp_path / "alone" / "rellax-full", tmp_path / "ev") == 2
    err = capsys.readouterr().err
    assert "has no din.json" in err and "'../ctr'" in err and "copy the whole --out folder" in err


def test_tampered_subr_embeddings_are_refused_and_missing_ones_recomputed_inside_out(
    trained, tmp_path, capsys
):
    raw, out, reference = trained
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    with np.load(copy / "subr_embeddings.npz") as f:
        emb, ids = f["emb"], f["item_ids"]
    np.savez(copy / "subr_embeddings.npz", emb=emb[::-1].copy(), item_ids=ids)
    assert evaluate(raw, copy / "rellax-full", tmp_path / "ev-bad") == 2
    err = capsys.readouterr().err
    assert "subr_embeddings.npz: these SUBR embeddings are not the ones" in err

    (copy / "subr_embeddings.npz").unlink()
    before = snapshot(tmp_path)
    assert evaluate(raw, copy / "rellax-full", tmp_path / "ev") == 0
    assert "recomputing them" in capsys.readouterr().out
    after = snapshot(tmp_path)
    changed = {p for p in after if before.get(p) != after[p]}
    assert all(p.startswith(str(tmp_path / "ev")) for p in changed), changed  # the cache went into --out
    assert any("emb_cache" in p for p in changed)
    assert p_click(tmp_path / "ev").shape == reference.shape


def test_resume_refuses_a_crafted_checkpoint_and_changed_inputs(trained, tiny_bert, tmp_path, capsys):
    raw, out, _ = trained
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    ckpts = copy / "rellax-full" / "checkpoints"
    latest = ckpts / (ckpts / "latest").read_text()
    marker = tmp_path / "PAYLOAD_RAN"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"state": {}, "param_groups": [Payload()]}, latest / "optimizer.pt")
    capsys.readouterr()
    assert main(train_argv(raw, copy, tiny_bert, "--resume")) == 2
    err = capsys.readouterr().err
    assert f"{latest / 'optimizer.pt'}: refusing to load" in err and not marker.exists()

    # a retrained DIN (other --din-embed-dim) under a run that is resumed: refused, the run is not continued
    copy2 = tmp_path / "copy2"
    shutil.copytree(out, copy2)
    argv = train_argv(raw, copy2, tiny_bert, "--resume")
    argv[argv.index("--din-embed-dim") + 1] = "6"
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "inputs.json: cannot resume" in err and "din_fingerprint changed" in err
