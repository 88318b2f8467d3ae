"""The demo's ablation table: the variants (:func:`selected_variants`, keys of ``pipeline.ABLATIONS``), every
variant trained and scored on one shared context with "DIN alone" beside them (:func:`run_ablation`), each row's
AUC interval and paired differences from full ReLLaX and from DIN (:func:`add_noise_columns`, ``train.stats``),
the Markdown table (:func:`noise_table`) and the files (:func:`write_ablation`: ``ablation.md``, ``ablation.json``,
``ablation.png``). ``rellax-fast demo`` parses its options and calls these."""

from __future__ import annotations

import time
from pathlib import Path


def selected_variants(text: str):
    """The VariantSpecs named by ``text``: comma-separated keys of ``pipeline.ABLATIONS`` or ``two-stage``, or
    ``all`` (every ablation but two-stage). Unknown keys raise ValueError naming them and the choices."""
    from .pipeline import ABLATIONS, VariantSpec

    table = dict(ABLATIONS)
    table["two-stage"] = VariantSpec("ReLLaX two-stage", recipe="two-stage")
    keys = list(ABLATIONS) if text == "all" else [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in keys if k not in table]
    if unknown:
        raise ValueError(f"--variants: unknown {unknown}; choose from {', '.join(table)}")
    return [table[k] for k in keys]


def run_ablation(ctx, specs, cfg, out, resume: bool = False, n_boot: int = 1000, log=print):
    """Train and score each of ``specs`` into ``<out>/<slug of its name>`` on the shared context ``ctx``
    (``train.context``); returns {"rows", "table" (Markdown with its noise footnote), "curves", "aucs"}. The
    first row is DIN alone on the same test samples."""
    import numpy as np

    from ..metrics import ctr_metrics
    from .args import slug
    from .pipeline import run_variant

    start = time.perf_counter()
    out = Path(out)
    labels = ctx.data.splits["test"].label[ctx.test_index]
    rows = [{"variant": "DIN alone", **ctr_metrics(labels, ctx.din_test_probs)}]
    probs = {"DIN alone": np.asarray(ctx.din_test_probs, np.float64)}
    curves, aucs = {}, {}
    for i, spec in enumerate(specs, 1):
        log(f"[demo] variant {i}/{len(specs)}: {spec.name}  ({time.perf_counter() - start:.0f} s so far)")
        res = run_variant(ctx, spec, cfg, out / slug(spec.name), resume=resume)
        rows.append({"variant": spec.name, **res["metrics"]})
        probs[spec.name] = np.load(Path(res["run_dir"]) / "predictions.npy").astype(np.float64)
        curves[spec.name] = res["losses"]
        aucs[spec.name] = res["metrics"]["auc"]
        del res
    aucs["DIN alone"] = rows[0]["auc"]
    noise = add_noise_columns(rows, labels, probs, n_boot)
    return {"rows": rows, "table": noise_table(rows) + noise, "curves": curves, "aucs": aucs}


def write_ablation(out, dataset: str, result, config=None):
    """``ablation.md``, ``ablation.json`` (rows and ``config``) and ``ablation.png`` (loss curves, AUCs) of a
    :func:`run_ablation` result under ``out``; returns their paths."""
    import json

    from .._io import atomic_write_text
    from .metrics import plot_runs

    out = Path(out)
    paths = [out / "ablation.md", out / "ablation.json", out / "ablation.png"]
    atomic_write_text(paths[0], f"# ReLLaX ablation on {dataset}\n\n{result['table']}")
    atomic_write_text(paths[1], json.dumps({"rows": result["rows"], "config": {"dataset": dataset, **(config or {})}}, indent=2))
    plot_runs(paths[2], result["curves"], result["aucs"], title=f"ReLLaX ablation ({dataset})")
    return paths


FULL = "ReLLaX (full)"


def add_noise_columns(rows, labels, probs, n_boot: int = 1000) -> str:
    """Adds to each row its AUC's 95% bootstrap interval and its paired AUC/LogLoss differences from full
    ReLLaX and from DIN (``train.stats.row_statistics``: DeLong, paired bootstrap); returns the table's
    footnote saying which differences are within noise."""
    from . import stats

    refs = {"DIN": probs["DIN alone"]}
    if FULL in probs:
        refs["full"] = probs[FULL]
    for row in rows:
        st = stats.row_statistics(labels, probs[row["variant"]], refs, n_boot=n_boot, seed=0)
        row.update(auc_lo=st["auc_ci"]["lo"], auc_hi=st["auc_ci"]["hi"], vs=st["vs"])
    within = [r["variant"] for r in rows if r["variant"] != FULL and "full" in r["vs"] and stats.within_noise(r["vs"]["full"]["p_auc"])]
    note = (f"\n{len(labels)} test samples, the same for every row. 95% CI: percentile bootstrap ({n_boot} resamples). "
            "Δ: row − reference on the same samples; p: DeLong's test; ≈: within noise (p ≥ 0.05).\n")  # fmt: skip
    if "full" in refs:
        note += (f"Within noise of full ReLLaX in AUC: {', '.join(within)}.\n" if within else
                 "Every AUC difference from full ReLLaX is outside noise (p < 0.05).\n")  # fmt: skip
    return note


def noise_table(rows) -> str:
    from .stats import format_delta

    lines = ["| variant | AUC | AUC 95% CI | LogLoss | accuracy | ΔAUC vs full | ΔAUC vs DIN |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['auc']:.4f} | [{r['auc_lo']:.4f}, {r['auc_hi']:.4f}] | {r['logloss']:.4f} | "
                     f"{r['accuracy']:.4f} | {format_delta(r['vs'].get('full'))} | {format_delta(r['vs'].get('DIN'))} |")  # fmt: skip
    return "\n".join(lines) + "\n"
