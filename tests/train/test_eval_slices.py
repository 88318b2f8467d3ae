"""``rellax-fast eval`` writes sliced metrics (issue #27): ``metrics.json`` gets ``slices`` (per band AUC / LogLoss,
intervals and the paired tests against the run's frozen DIN on the same samples) and the membership is stored in
``slices.json``, equal to a recomputation from the train split."""

import json
import shutil

import numpy as np
import pytest

from rellax_fast.cli import main

pytestmark = pytest.mark.slow  # one tiny `train` and `eval` through the CLI on 60 MovieLens users: ~30-60 s


def _corpus(ml100k, folder):
    """ml-100k's files with u.data cut to its first 60 users (the same format, read by --data-dir)."""
    folder.mkdir()
    for name in ("u.item", "u.user", "u.genre"):
        shutil.copy(ml100k / name, folder / name)
    rows = [r for r in (ml100k / "u.data").read_text().splitlines() if int(r.split("\t")[0]) <= 60]
    (folder / "u.data").write_text("\n".join(rows) + "\n")
    return folder


def test_eval_metrics_json_has_slices_against_the_runs_din(ml100k, tiny_bert_dir, tmp_path, monkeypatch):
    import rellax_fast.train.pipeline as pipeline
    from rellax_fast.ctr.din import predict
    from rellax_fast.ctr.store import load_ctr, split_arrays
    from rellax_fast.data import load_dataset, prepare_ctr
    from rellax_fast.train import slices, stats

    def seeded(data, cache_dir, progress=True):
        ids = list(data.dataset.items.index)
        return np.random.default_rng(0).standard_normal((len(ids), 12)).astype(np.float32), ids

    monkeypatch.setattr(pipeline, "item_embeddings", seeded)
    raw = _corpus(ml100k, tmp_path / "raw")
    out = tmp_path / "out"
    assert (
        main(
            [
                "train",
                "--dataset",
                "ml-100k",
                "--data-dir",
                str(raw),
                "--out",
                str(out),
                "--model",
                tiny_bert_dir,
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
                "--din-epochs",
                "1",
                "--din-hidden",
                "8",
                "--din-embed-dim",
                "4",
                "--din-max-history",
                "5",
            ]
        )
        == 0
    )
    ev = tmp_path / "ev"
    assert (
        main(
            [
                "eval",
                "--run",
                str(out / "rellax-full"),
                "--dataset",
                "ml-100k",
                "--data-dir",
                str(raw),
                "--out",
                str(ev),
                "--no-progress",
            ]
        )
        == 0
    )
    m = json.loads((ev / "metrics.json").read_text())
    assert {"auc", "logloss", "accuracy", "n"} <= set(m) and m["slices"]["membership"] == "slices.json"
    data = prepare_ctr(load_dataset("ml-100k", data_dir=raw, download=False), seed=0)
    test, train = data.splits["test"], data.splits["train"]
    assert m["n"] == len(test)
    # the stored membership, recomputed by hand from the train split
    stored = json.loads((ev / "slices.json").read_text())
    counts = [int((train.item_id == i).sum()) for i in test.item_id]
    assert stored["codes"]["item_train_count"] == [
        0 if c == 0 else 1 if c <= 5 else 2 if c <= 20 else 3 for c in counts
    ]
    assert stored["codes"]["user_in_train"] == [
        int(u in set(train.user_id.tolist())) for u in test.user_id.tolist()
    ]
    # per band: the model's AUC and the DIN reference's difference (DeLong) on that band's samples
    p = np.array([json.loads(x)["p_click"] for x in (ev / "predictions.jsonl").read_text().splitlines()])
    din, vocab, _ = load_ctr(out / "ctr")
    p_din = predict(din, split_arrays(data, "test", vocab, din.config.max_history)).numpy()
    y = test.label.astype(float)
    tested = 0
    for slicing, bands in slices.SLICINGS.items():
        codes = np.asarray(stored["codes"][slicing])
        assert sum(m["slices"][slicing][b]["n"] for b in bands) == len(test)
        for i, band in enumerate(bands):
            got, mask = m["slices"][slicing][band], codes == i
            assert got["n"] == int(mask.sum()) and got["n_pos"] == int(y[mask].sum())
            if got["status"] is None:
                tested += 1
                assert got["auc"] == pytest.approx(stats.auc(y[mask], p[mask]), abs=1e-6)
                dl = stats.delong_test(y[mask], p[mask], p_din[mask])
                assert got["vs_ref"]["d_auc"] == pytest.approx(dl["diff"], abs=1e-6)
                assert got["vs_ref"]["p_auc"] == pytest.approx(dl["p"], rel=1e-4, abs=1e-9)
            else:
                assert "vs_ref" not in got
    assert tested >= 2
