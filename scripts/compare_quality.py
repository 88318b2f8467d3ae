"""Compare the same rows of two ``rellax-fast bench quality`` runs on the same test samples, paired: e.g. the
SmolLM2-135M backbone (``--model smollm2-135m``) against the offline MiniLM at the same budget (issue #24's
goals). ``bench quality`` puts one backbone in one table; its rows' test predictions are saved, so two runs
with the same dataset, test subsample and seed are compared sample by sample here: AUC of each, the difference
with DeLong's paired test, and the LogLoss difference with a paired bootstrap (``train.stats``).

    python scripts/compare_quality.py RUN_A RUN_B [--data-dir DIR] [--n-boot 1000]

RUN_A / RUN_B: the ``--out`` folders of the two runs (each holds ``quality/quality.json``). Rows are matched by
name; a row of only one run is listed as such. The test labels are rebuilt from the dataset (the same seeded
split and subsample as the bench), and each run's recorded test size is checked against them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, List

import numpy as np

from rellax_fast.train import stats

SAME = ("dataset", "n_test", "seed", "ctr_train_samples")


def _run(folder: str) -> Dict:
    path = Path(folder) / "quality" / "quality.json"
    if not path.is_file():
        raise SystemExit(f"error: {path} not found (not the --out folder of a bench quality run)")
    doc = json.loads(path.read_text())
    cfg = doc["meta"]["config"]
    rows = {}
    for row_file in sorted((path.parent / "rows").glob("*-s0.json")):
        row = json.loads(row_file.read_text())
        rows[row["name"]] = np.load(row["predictions"])
    return {"folder": folder, "config": cfg, "meta": doc["meta"], "rows": rows}


def test_labels(cfg: Dict, data_dir: str) -> np.ndarray:
    """The bench's test labels: the prepared split (seed ``cfg['seed']``) and its seeded subsample."""
    from rellax_fast.data import load_dataset, prepare_ctr
    from rellax_fast.train.pipeline import subsample

    data = prepare_ctr(load_dataset(cfg["dataset"], data_dir=data_dir), seed=cfg["seed"])
    test = data.splits["test"]
    index = subsample(len(test), cfg["n_test"], cfg["seed"] + 1)
    return np.asarray(test.subset(index).label, dtype=np.int64)


def compare(a: Dict, b: Dict, labels: np.ndarray, n_boot: int) -> List[Dict]:
    out = []
    for name in sorted(set(a["rows"]) | set(b["rows"])):
        pa, pb = a["rows"].get(name), b["rows"].get(name)
        if pa is None or pb is None:
            out.append({"row": name, "note": f"only in {'B' if pa is None else 'A'}"})
            continue
        if not (len(pa) == len(pb) == len(labels)):
            raise SystemExit(
                f"error: row {name!r}: {len(pa)} / {len(pb)} predictions for {len(labels)} labels"
            )
        test = stats.delong_test(labels, pb, pa)
        ll = stats.paired_bootstrap(labels, pb, pa, "logloss", n_boot=n_boot)
        out.append(
            {
                "row": name,
                "auc_a": round(stats.auc(labels, pa), 4),
                "auc_b": round(stats.auc(labels, pb), 4),
                "delta_auc": round(test["diff"], 4),
                "p_auc": float(f"{test['p']:.2g}"),
                "logloss_a": round(stats.logloss(labels, pa), 4),
                "logloss_b": round(stats.logloss(labels, pb), 4),
                "delta_logloss": round(ll["diff"], 4),
                "p_logloss": float(f"{ll['p']:.2g}"),
            }
        )
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_a")
    parser.add_argument("run_b")
    parser.add_argument(
        "--data-dir", default=None, help="raw dataset folder (default: as the bench: ../shared/data)"
    )
    parser.add_argument("--n-boot", type=int, default=1000)
    args = parser.parse_args(argv)
    a, b = _run(args.run_a), _run(args.run_b)
    differ = {
        k: (a["config"].get(k), b["config"].get(k)) for k in SAME if a["config"].get(k) != b["config"].get(k)
    }
    if differ:
        raise SystemExit(f"error: the runs differ in {differ}: not the same test samples")
    from rellax_fast.bench.quality import default_data_dir

    data_dir = args.data_dir or a["config"].get("data_dir") or default_data_dir(a["config"]["dataset"])
    labels = test_labels(a["config"], data_dir)
    rows = compare(a, b, labels, args.n_boot)
    print(
        f"A: {args.run_a} (model {a['config'].get('model') or 'MiniLM'}); B: {args.run_b} (model "
        f"{b['config'].get('model') or 'MiniLM'}); {len(labels)} test samples; Δ = B − A, paired"
    )
    print("| row | AUC A | AUC B | ΔAUC (DeLong p) | LogLoss A | LogLoss B | ΔLogLoss (bootstrap p) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "note" in r:
            print(f"| {r['row']} | {r['note']} | | | | | |")
            continue
        print(
            f"| {r['row']} | {r['auc_a']} | {r['auc_b']} | {r['delta_auc']:+.4f} (p={r['p_auc']}) | "
            f"{r['logloss_a']} | {r['logloss_b']} | {r['delta_logloss']:+.4f} (p={r['p_logloss']}) |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
