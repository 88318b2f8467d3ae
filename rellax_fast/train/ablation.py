"""The demo's ablation table: the variants (:func:`selected_variants`, keys of ``pipeline.ablations()``), every
variant trained and scored on one shared context with "DIN alone" beside them (:func:`run_ablation`), each row's
AUC interval and paired differences from full ReLLaX and from DIN (:func:`add_noise_columns`, ``train.stats``),
the Markdown table (:func:`noise_table`) and the files (:func:`write_ablation`: ``ablation.md``, ``ablation.json``,
``ablation.png``). ``rellax-fast demo`` parses its options and calls these."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional


def selected_variants(text: str):
    """The VariantSpecs named by ``text``: comma-separated keys of ``pipeline.ablations()`` or ``two-stage``, or
    ``all`` (every ablation but two-stage). Unknown keys raise ValueError naming them and the choices."""
    from .pipeline import VariantSpec, ablations

    table = ablations()
    keys = list(table) if text == "all" else [k.strip() for k in text.split(",") if k.strip()]
    table["two-stage"] = VariantSpec("ReLLaX two-stage", recipe="two-stage")
    unknown = [k for k in keys if k not in table]
    if unknown:
        raise ValueError(f"--variants: unknown {unknown}; choose from {', '.join(table)}")
    return [table[k] for k in keys]


ROW_FILE = "ablation_row.json"  # in a variant's run folder: the key of the inputs its saved metrics belong to


def variant_key(ctx, spec, cfg) -> str:
    """What a finished variant's saved metrics depend on: the pipeline options (progress bars aside), the variant,
    the run's inputs (``pipeline.run_inputs``: data, training sample, DIN, SUBR) and the test sample. ``demo
    --resume`` reuses a variant's ``metrics.json`` only under the same key, as ``bench quality`` does its rows."""
    from dataclasses import asdict

    import numpy as np

    from .._io import json_sha256
    from .pipeline import run_inputs

    options = cfg.to_dict()
    options["train"] = {**options["train"], "progress": None}
    test = json_sha256(np.asarray(ctx.test_index).tolist())
    return json_sha256(
        {"pipeline": options, "spec": asdict(spec), "inputs": run_inputs(ctx, spec), "test_index": test}
    )


def finished_variant(run_dir, key: str):
    """The saved result of a variant finished under ``key`` in ``run_dir`` ({"metrics", "losses", "run_dir"}), or
    None (not finished, other inputs, or a file missing)."""
    import json

    run_dir = Path(run_dir)
    files = [run_dir / n for n in (ROW_FILE, "metrics.json", "loss.json", "predictions.npy")]
    if not all(f.is_file() for f in files):
        return None
    try:
        if json.loads(files[0].read_text()).get("key") != key:
            return None
        saved = json.loads(files[1].read_text())
        metrics = {k: saved[k] for k in ("auc", "logloss", "accuracy", "n")}
        losses = json.loads(files[2].read_text())["losses"]
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    return {"metrics": metrics, "losses": losses, "run_dir": str(run_dir)}


def variant_cost(spec, cfg) -> float:
    """Training steps of ``spec`` relative to a joint variant's (two-stage adds its stage-1 share), for the ETA."""
    return 1.0 + (cfg.stage1_fraction if spec.recipe == "two-stage" else 0.0)


def eta_text(seconds: float, now: Optional[float] = None) -> str:
    """ "about 12 min (done around 16:42)": a duration and the wall-clock time it ends, from ``now`` (epoch s)."""
    end = time.localtime((time.time() if now is None else now) + seconds)
    size = f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"
    return f"about {size} (done around {time.strftime('%H:%M', end)})"


def run_ablation(ctx, specs, cfg, out, resume: bool = False, n_boot: int = 1000, log=print):
    """Train and score each of ``specs`` into ``<out>/<slug of its name>`` on the shared context ``ctx``
    (``train.context``); returns {"rows", "table" (Markdown with its noise footnote), "curves", "aucs"}. The
    first row is DIN alone on the same test samples. With ``resume``, a variant finished before under the same
    inputs (:func:`variant_key`) is read back from its files instead of trained and scored again, and an
    interrupted one continues from its checkpoints. After the first variant it trains, the log gives an ETA for
    the rest from that variant's measured time."""
    import json

    import numpy as np

    from rellax_fast.distributed import is_main

    from .._io import atomic_write_text
    from ..metrics import ctr_metrics
    from .args import slug
    from .pipeline import run_variant

    start = time.perf_counter()
    out = Path(out)
    labels = ctx.data.splits["test"].label[ctx.test_index]
    rows = [{"variant": "DIN alone", **ctr_metrics(labels, ctx.din_test_probs)}]
    probs = {"DIN alone": np.asarray(ctx.din_test_probs, np.float64)}
    curves, aucs = {}, {}
    keys = {spec.name: variant_key(ctx, spec, cfg) for spec in specs}
    done = {s.name: finished_variant(out / slug(s.name), keys[s.name]) if resume else None for s in specs}
    rate = None  # seconds per unit of variant_cost, measured on the first variant trained here
    for i, spec in enumerate(specs, 1):
        run_dir = out / slug(spec.name)
        res = done[spec.name]
        if res is not None:
            log(
                f"[demo] variant {i}/{len(specs)}: {spec.name}: finished before, read from {run_dir / 'metrics.json'}"
            )
        else:
            # a row file marks a finished run: under other options or inputs there is nothing to continue, train anew
            stale = resume and (run_dir / ROW_FILE).is_file()
            again = "; finished before under other options or inputs: trained again" if stale else ""
            log(
                f"[demo] variant {i}/{len(specs)}: {spec.name}  ({time.perf_counter() - start:.0f} s so far{again})"
            )
            if is_main():
                (run_dir / ROW_FILE).unlink(missing_ok=True)  # written again once this run has finished
            t0 = time.perf_counter()
            res = run_variant(ctx, spec, cfg, run_dir, resume=resume and not stale)
            if is_main():  # under a launcher only rank 0 writes
                atomic_write_text(
                    run_dir / ROW_FILE, json.dumps({"key": keys[spec.name], "variant": spec.name})
                )
            todo = [s for s in specs[i:] if done[s.name] is None]
            if rate is None and todo:
                rate = (time.perf_counter() - t0) / variant_cost(spec, cfg)
                left = rate * sum(variant_cost(s, cfg) for s in todo)
                log(
                    f"[demo] ETA: {len(todo)} more variant(s), {eta_text(left)}, from this variant's "
                    f"{time.perf_counter() - t0:.0f} s"
                )
        rows.append({"variant": spec.name, **res["metrics"]})
        probs[spec.name] = np.load(Path(res["run_dir"]) / "predictions.npy").astype(np.float64)
        curves[spec.name] = res["losses"]
        aucs[spec.name] = res["metrics"]["auc"]
        del res
    aucs["DIN alone"] = rows[0]["auc"]
    noise = add_noise_columns(rows, labels, probs, n_boot)
    return {"rows": rows, "table": noise_table(rows) + noise, "curves": curves, "aucs": aucs}


def write_ablation(out, dataset: str, result, config=None):
    """``ablation.md``, ``ablation.json`` (rows and ``config``) and ``ablation.png`` (loss curves, AUCs with their 95%
    intervals when the rows have them) of a :func:`run_ablation` result under ``out``; returns their paths."""
    import json

    from .._io import atomic_write_text
    from .metrics import plot_runs

    out = Path(out)
    paths = [out / "ablation.md", out / "ablation.json", out / "ablation.png"]
    atomic_write_text(paths[0], f"# ReLLaX ablation on {dataset}\n\n{result['table']}")
    atomic_write_text(
        paths[1],
        json.dumps({"rows": result["rows"], "config": {"dataset": dataset, **(config or {})}}, indent=2),
    )
    intervals = {r["variant"]: (r["auc_lo"], r["auc_hi"]) for r in result["rows"] if "auc_lo" in r}
    plot_runs(
        paths[2], result["curves"], result["aucs"], title=f"ReLLaX ablation ({dataset})", auc_ci=intervals
    )
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
    within = [
        r["variant"]
        for r in rows
        if r["variant"] != FULL and "full" in r["vs"] and stats.within_noise(r["vs"]["full"]["p_auc"])
    ]
    note = (
        f"\n{len(labels)} test samples, the same for every row. 95% CI: percentile bootstrap ({n_boot} resamples). "
        "Δ: row − reference on the same samples; p: DeLong's test; ≈: within noise (p ≥ 0.05).\n"
    )
    if "full" in refs:
        note += (
            f"Within noise of full ReLLaX in AUC: {', '.join(within)}.\n"
            if within
            else "Every AUC difference from full ReLLaX is outside noise (p < 0.05).\n"
        )
    return note


def noise_table(rows) -> str:
    from .stats import format_delta

    lines = [
        "| variant | AUC | AUC 95% CI | LogLoss | accuracy | ΔAUC vs full | ΔAUC vs DIN |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['auc']:.4f} | [{r['auc_lo']:.4f}, {r['auc_hi']:.4f}] | {r['logloss']:.4f} | "
            f"{r['accuracy']:.4f} | {format_delta(r['vs'].get('full'))} | {format_delta(r['vs'].get('DIN'))} |"
        )
    return "\n".join(lines) + "\n"
