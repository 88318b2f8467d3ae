"""``rellax-fast demo``: the whole ReLLaX pipeline and its ablations on one dataset (default: the embedded
``synthetic`` one, with the offline MiniLM backbone), sized to finish in under 10 minutes on a 2-core CPU.

It trains DIN once, embeds the items once, then fine-tunes each variant on the same training sample and
scores it on the same test sample: full ReLLaX, w/o SUBR, w/o SPA, w/o CFLoRA (identity), the MoE
(iLoRA-style) and RecLoRA-style interactions; DIN alone is scored on the same test sample. It prints the
ablation table and writes ``ablation.md``, ``ablation.json`` and ``ablation.png`` under ``--out``.

At the demo's size most differences are within noise, and the table says which: every row has its AUC's 95%
bootstrap interval and its paired difference from full ReLLaX and from DIN on the same test samples
(DeLong's test; ``train.stats``), marked "≈" when p >= 0.05. ``rellax-fast bench quality`` is the budget at
which the method's effects can show.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .args import add_model_arguments

    add_model_arguments(parser, n_train=512, n_test=500)
    parser.set_defaults(max_length=128, din_epochs=4, din_patience=1, din_max_history=30, lr=2e-3)
    parser.add_argument("--variants", default="all",
                        help="comma-separated keys of pipeline.ABLATIONS (built in: full,no-subr,no-spa,identity,moe,"
                             "recrank1; a registered interaction kind with an ablation name adds its own) or two-stage "
                             "(default: all but two-stage)")  # fmt: skip
    parser.add_argument("--resume", action="store_true", help="resume interrupted variants from their checkpoints")
    parser.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples of each AUC interval")


def selected_variants(text: str):
    from .pipeline import ABLATIONS, VariantSpec

    table = dict(ABLATIONS)
    table["two-stage"] = VariantSpec("ReLLaX two-stage", recipe="two-stage")
    keys = list(ABLATIONS) if text == "all" else [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in keys if k not in table]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; choose from {', '.join(table)}")
    return [table[k] for k in keys]


def run(args: argparse.Namespace) -> int:
    import json
    import time
    from pathlib import Path

    import numpy as np

    from .._io import atomic_write_text
    from ..metrics import ctr_metrics
    from .args import pipeline_config, slug
    from .context import build_shared_context
    from .metrics import plot_runs
    from .pipeline import run_variant

    start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    specs = selected_variants(args.variants)
    cfg = pipeline_config(args)
    print(f"[demo] dataset {args.dataset}; backbone {args.model or 'all-MiniLM-L6-v2 (offline)'}; "
          f"{cfg.n_train} training prompts, {cfg.n_test} test prompts, K={cfg.k}, max_length={cfg.max_length}")  # fmt: skip
    ctx = build_shared_context(args, cfg)
    labels = ctx.data.splits["test"].label[ctx.test_index]
    rows = [{"variant": "DIN alone", **ctr_metrics(labels, ctx.din_test_probs)}]
    probs = {"DIN alone": np.asarray(ctx.din_test_probs, np.float64)}
    curves, aucs = {}, {}
    for i, spec in enumerate(specs, 1):
        print(f"[demo] variant {i}/{len(specs)}: {spec.name}  ({time.perf_counter() - start:.0f} s so far)")
        res = run_variant(ctx, spec, cfg, out / slug(spec.name), resume=args.resume)
        rows.append({"variant": spec.name, **res["metrics"]})
        probs[spec.name] = np.load(Path(res["run_dir"]) / "predictions.npy").astype(np.float64)
        curves[spec.name] = res["losses"]
        aucs[spec.name] = res["metrics"]["auc"]
        del res
    aucs["DIN alone"] = rows[0]["auc"]
    noise = add_noise_columns(rows, labels, probs, args.n_boot)
    table = noise_table(rows) + noise
    atomic_write_text(out / "ablation.md", f"# ReLLaX ablation on {args.dataset}\n\n{table}")
    atomic_write_text(out / "ablation.json", json.dumps({"rows": rows, "config": {"dataset": args.dataset, **vars_json(args)}}, indent=2))
    plot_runs(out / "ablation.png", curves, aucs, title=f"ReLLaX ablation ({args.dataset})")
    print()
    print(table)
    print(f"[demo] done in {time.perf_counter() - start:.0f} s. Files: {out / 'ablation.md'}, {out / 'ablation.json'}, "
          f"{out / 'ablation.png'}; runs in {out}/<variant>/ (metrics.json, loss.json, adapter/), DIN in {out / 'ctr'}")  # fmt: skip
    return 0


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


def vars_json(args) -> dict:
    return {k: v for k, v in vars(args).items() if not k.startswith("_") and isinstance(v, (int, float, str, list, type(None)))}
