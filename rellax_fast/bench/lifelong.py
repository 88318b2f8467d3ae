"""``rellax-fast bench lifelong`` (``make lifelong``): AUC and LogLoss against the history length K, the paper's
own question ("lifelong sequential behavior incomprehension", issue #18). A long benchmark, not a CI test.

(Named ``bench lifelong``: ``bench topk --lifelong`` is a flag of the retrieval-speed suite, not a suite name.)

For every K of ``--ks`` (default 5,10,20,30) and every method of ``--methods``, one point is trained through
the quality bench's pipeline (``train.pipeline.run_variant``) and scored on the same test samples:

* ``text-recent``: the text-only LM (identity C, no SPA) with the K most recent behaviours;
* ``text-subr``: the same with SUBR (semantic retrieval of K behaviours);
* ``full-recent`` / ``full-subr``: full ReLLaX (SPA + CFLoRA) with recent / SUBR behaviours;
* DIN alone, trained once to convergence and shared by every point, as a flat reference line.

Every point uses the same training prompts (the same seeded training sample, its K behaviours shown) and the
same test samples. The token budget (``max_length``) grows with K: it is measured, per K, on the training
prompts of every method at that K rendered in full with the real tokenizer (quantile ``--budget-quantile``
of their token counts, plus ``--budget-margin`` tokens, rounded up to a multiple of 8, capped at the
backbone's position limit). Batches are padded to their longest row, so the budget is only a cap: it does
not cost compute. Prompts longer than the budget lose their oldest history items (the collator re-renders
with fewer items; it never cuts an item in half), and each point reports how many train and test prompts
were cut and how many items they lost in total.

Outputs, written atomically under ``<out>/lifelong/``: ``lifelong.md`` (a K x method AUC table and a per
point table), ``lifelong.json`` (``points``: one dict per (method, K) with the columns of
:data:`POINT_COLUMNS`; ``din``; ``budgets``; ``meta``), ``lifelong.png`` (AUC and LogLoss against K, one line
per method with 95% bootstrap intervals, DIN's value and interval as a band), and per point
``points/<method>-k<K>.json`` (a finished point is skipped on a rerun with the same inputs).

``--estimate-steps N`` instead trains every point for N steps only (random batches of its real prompts) and
scores one evaluation batch, then extrapolates the full run's time from the measured seconds per step and per
scored sample at each K (``estimate.md`` / ``estimate.json``): how the presets were sized.

Presets (``--preset``, default ``auto``: gpu when CUDA is visible): ``cpu`` = K in {5,10,20,30}, the offline
MiniLM, 1,536 training prompts and 1,000 test samples per point, sized for under 2 hours on an idle 2-core
machine (an estimate: see ``PRESETS``); ``gpu`` = K in {5,10,20,30,50}, 8,192 training prompts, the whole test split,
bf16, for a 1B+ causal backbone given with ``--model`` (required). A preset sets only the options left at
their defaults; flags given explicitly win.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from dataclasses import asdict, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List

import numpy as np

from .budget import BUDGET_MARGIN, BUDGET_QUANTILE, PromptSet, position_limit, prompt_tokenizer, token_budget

DIN_NAME = "DIN alone (converged)"

# method key -> (VariantSpec fields)
METHODS = {
    "text-recent": {"name": "text-only LM, recent K", "subr": False, "spa": False, "interaction": "identity"},
    "text-subr": {"name": "text-only LM, SUBR", "subr": True, "spa": False, "interaction": "identity"},
    "full-recent": {"name": "ReLLaX, recent K", "subr": False},
    "full-subr": {"name": "ReLLaX, SUBR", "subr": True},
}

# the columns of every entry of lifelong.json's "points" (documented; checked by the smoke test)
POINT_COLUMNS = (
    "method",
    "name",
    "k",
    "max_length",
    "auc",
    "auc_lo",
    "auc_hi",
    "logloss",
    "logloss_lo",
    "logloss_hi",
    "d_auc_vs_din",
    "p_auc_vs_din",
    "d_auc_vs_first_k",
    "p_auc_vs_first_k",
    "d_auc_vs_prev_k",
    "p_auc_vs_prev_k",
    "n_train",
    "n_test",
    "n_truncated_train",
    "n_truncated_test",
    "items_dropped_train",
    "items_dropped_test",
    "mean_tokens_train",
    "train_tokens",
    "tokens_per_s",
    "train_seconds",
    "score_seconds",
    "wall_seconds",
)

PRESETS = {
    # sized from `--estimate-steps 3` on the 2-core machine (ml-100k, MiniLM): the fastest rates measured there,
    # ~2,300 (K=5), ~2,000 (K=10), ~1,270 (K=20) and ~970 (K=30) training tokens/s at mean prompt lengths of
    # ~130/195/315/420 tokens, and ~0.02-0.08 s per scored sample, give ~24 min per method, ~100 min in all
    # (an estimate; contention with other work measured up to 2x slower)
    # n_valid 0: no model selection on valid (one epoch per point; the quality bench's --n-valid default is for it)
    "cpu": {
        "ks": "5,10,20,30",
        "methods": ",".join(METHODS),
        "n_train": 1536,
        "n_test": 1000,
        "batch_size": 16,
        "n_valid": 0,
    },
    "gpu": {
        "ks": "5,10,20,30,50",
        "methods": ",".join(METHODS),
        "n_train": 8192,
        "n_test": 0,
        "batch_size": 16,
        "mixed_precision": "bf16",
        "n_valid": 0,
    },
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The lifelong bench's own options (the model/DIN options and --n-boot, --fresh are the quality bench's)."""
    from .._argtypes import number

    g = parser.add_argument_group("bench lifelong")
    g.add_argument(
        "--ks", default=None, help="comma-separated history lengths K (preset default: 5,10,20,30)"
    )
    g.add_argument(
        "--methods",
        default=None,
        help=f"comma-separated methods (default: all of {','.join(METHODS)}); DIN is always the reference",
    )
    g.add_argument(
        "--preset",
        default="auto",
        choices=("auto", "cpu", "gpu", "none"),
        help="bench lifelong sizes (auto: gpu when CUDA is visible, else cpu; none: the flags as given)",
    )
    g.add_argument(
        "--budget-quantile",
        type=number(0, 1, low_open=True),
        default=BUDGET_QUANTILE,
        help="bench lifelong: token budget per K = this quantile of the training prompts' token counts ...",
    )
    g.add_argument(
        "--budget-margin",
        type=int,
        default=BUDGET_MARGIN,
        help="... plus this many tokens (then rounded up to 8)",
    )
    g.add_argument(
        "--estimate-steps",
        type=int,
        default=0,
        help="bench lifelong: train every point for only N steps and extrapolate the full run's time",
    )


def parse_ks(text) -> List[int]:
    try:
        ks = [int(s) for s in str(text).split(",") if s.strip()]
    except ValueError:
        raise ValueError(
            f"--ks: expected comma-separated integers such as 5,10,20,30, got {text!r}"
        ) from None
    if not ks or len(set(ks)) != len(ks) or min(ks) < 1:
        raise ValueError(f"--ks: expected distinct integers >= 1 such as 5,10,20,30, got {text!r}")
    return sorted(ks)


def parse_methods(text) -> List[str]:
    keys = [k.strip() for k in str(text).split(",") if k.strip()]
    unknown = [k for k in keys if k not in METHODS]
    if unknown or not keys:
        raise ValueError(f"--methods: unknown {unknown or text!r}; choose from {', '.join(METHODS)}")
    return keys


def _parser_defaults() -> Dict:
    """The defaults of the quality, data and lifelong bench options, every option a preset sets (to tell a flag
    given explicitly from one left at its default). Built from the suites' ``add_arguments``, as `bench` adds
    them, without importing the command module."""
    from . import data, quality

    p = argparse.ArgumentParser()
    quality.add_arguments(p)
    data.add_arguments(p)
    add_arguments(p)
    return {a.dest: a.default for a in p._actions}


def apply_preset(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` with the preset's values filled in where the flag was left at its default."""
    import torch

    args = copy.copy(args)
    preset = args.preset
    if preset == "auto":
        preset = "gpu" if torch.cuda.is_available() else "cpu"
    args.preset = preset
    values = dict(PRESETS.get(preset, {}))
    defaults = _parser_defaults()
    for name, value in values.items():
        if getattr(args, name, None) == defaults.get(name):
            setattr(args, name, value)
    if args.ks is None:
        args.ks = PRESETS["cpu"]["ks"]
    if args.methods is None:
        args.methods = ",".join(METHODS)
    if preset == "gpu" and not args.model:
        raise ValueError(
            "--preset gpu: pass a local 1B+ causal backbone with --model (e.g. a Llama-3.2-1B or "
            "Qwen2.5-1.5B folder); the offline MiniLM is the cpu preset's backbone"
        )
    return args


# ------------------------------------------------------------------------------------------ the bench


def run(args: argparse.Namespace, log=print) -> int:
    import sys

    try:
        args = apply_preset(args)
        ks, methods = parse_ks(args.ks), parse_methods(args.methods)
        if args.n_boot < 10:
            raise ValueError(f"--n-boot must be >= 10; got {args.n_boot}")
        if not 0 < args.budget_quantile <= 1 or args.budget_margin < 0 or args.estimate_steps < 0:
            raise ValueError(
                f"--budget-quantile must be in (0, 1], --budget-margin and --estimate-steps >= 0; got "
                f"{args.budget_quantile}, {args.budget_margin}, {args.estimate_steps}"
            )
        from .quality import bench_pipeline_config

        cfg = bench_pipeline_config(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return run_bench(args, cfg, ks, methods, log=log)


def run_bench(args, cfg, ks: List[int], methods: List[str], log=print) -> int:
    """The bench in three steps: plan (the shared context, every point's prompts and every K's token budget),
    run (each point trained and scored, or read back when done before under the same key) and report (the
    table, Markdown, JSON and plot; with ``--estimate-steps``, the time estimate instead)."""
    from tqdm.auto import tqdm

    plan = plan_points(args, cfg, ks, methods, log)
    jobs = [(m, k) for m in methods for k in ks]
    points = {
        (m, k): run_point(plan, args, cfg, m, k, log)
        for m, k in tqdm(jobs, desc="lifelong points", disable=not cfg.train.progress)
    }
    if plan.estimate:
        return _write_estimate(
            plan.ldir,
            points,
            plan.budgets,
            ks,
            methods,
            args,
            cfg,
            plan.context_seconds,
            plan.prep_seconds,
            log,
        )
    return report(plan, points, args, cfg, ks, methods)


def plan_points(args, cfg, ks: List[int], methods: List[str], log=print) -> SimpleNamespace:
    """What every point shares: the context (data, DIN, SUBR embeddings, samples), the tokenizer, every point's
    train and test prompts, the token budget of every K (measured on the training prompts of all methods) and
    the key every point's own key extends."""
    from ..ctr.store import din_fingerprint
    from ..train.context import build_shared_context
    from ..train.pipeline import make_samples, shown_positions_for
    from .quality import _sha

    plan = SimpleNamespace(
        start=time.perf_counter(), estimate=args.estimate_steps > 0, ldir=Path(args.out) / "lifelong"
    )
    (plan.ldir / "points").mkdir(parents=True, exist_ok=True)
    shared = copy.copy(args)
    shared.out = str(plan.ldir)
    log(
        f"[lifelong] dataset {args.dataset} ({args.data_dir or 'default location'}); backbone "
        f"{cfg.model or 'all-MiniLM-L6-v2 (offline)'}; preset {args.preset}; K {ks}; methods {methods}; "
        f"{cfg.n_train or 'all'} training prompts, test {cfg.n_test or 'whole split'}"
        + (f"; ESTIMATE: {args.estimate_steps} steps per point" if plan.estimate else "")
    )
    t0 = time.perf_counter()
    ctx = plan.ctx = build_shared_context(shared, cfg, log=log)
    plan.context_seconds = time.perf_counter() - t0
    data = ctx.data
    tok, plan.kind, model_path = prompt_tokenizer(cfg)
    cap = plan.cap = position_limit(model_path)
    plan.labels = data.splits["test"].label[ctx.test_index].astype(np.float64)
    tr = data.splits["train"].subset(ctx.train_index)
    te = data.splits["test"].subset(ctx.test_index)

    t0 = time.perf_counter()
    prompts, budgets = plan.prompts, plan.budgets = {}, {}
    for k in ks:
        for m in methods:
            spec = METHODS[m]
            ph = cfg.placeholder if spec.get("spa", True) else None
            sets = {}
            for split_name, split in (("train", tr), ("test", te)):
                pos = shown_positions_for(
                    data, split, k, spec["subr"], cfg.subr_mode, ctx.item_emb, ctx.item_ids, False
                )
                sets[split_name] = PromptSet(make_samples(data, split, pos), tok, plan.kind, ph, cfg.chat)
            prompts[(m, k)] = sets
        lengths = np.concatenate([prompts[(m, k)]["train"].lengths for m in methods])
        budget = token_budget(lengths, args.budget_quantile, args.budget_margin, cap)
        budgets[k] = {
            "max_length": budget,
            "train_len_median": float(np.median(lengths)),
            "train_len_quantile": float(np.quantile(lengths, args.budget_quantile)),
            "train_len_max": int(lengths.max()),
            "position_limit": cap,
        }
        log(
            f"[lifelong] K={k}: training prompts {np.median(lengths):.0f} tokens (median), {lengths.max()} (max); "
            f"max_length {budget}"
            + (f" (capped at the backbone's {cap} positions)" if cap and budget == cap else "")
        )
    plan.prep_seconds = time.perf_counter() - t0
    plan.base_key = {
        "din": din_fingerprint(ctx.din, ctx.vocab),
        "test_index": _sha(ctx.test_index.tolist()),
        "pipeline": {**asdict(cfg), "train": {**asdict(cfg.train), "progress": None}},
    }
    return plan


def run_point(plan: SimpleNamespace, args, cfg, m: str, k: int, log=print) -> Dict:
    """Method ``m`` at history length ``k``: trained and scored (its row written to ``points/``), read back when
    done before under the same key, or (``--estimate-steps``) estimated."""
    from .._io import atomic_write_text
    from ..train.pipeline import VariantSpec, run_inputs, run_variant
    from .quality import _load_row, _sha

    ctx, ldir = plan.ctx, plan.ldir
    spec = VariantSpec(**{"name": METHODS[m]["name"], **{f: v for f, v in METHODS[m].items() if f != "name"}})
    budget = plan.budgets[k]["max_length"]
    cfg_k = replace(cfg, k=k, max_length=budget)
    name = f"{m}-k{k}"
    ps = plan.prompts[(m, k)]
    cut_tr, cut_te = ps["train"].truncation(budget), ps["test"].truncation(budget)
    trunc = {
        "n_truncated_train": cut_tr["n_truncated"],
        "n_truncated_test": cut_te["n_truncated"],
        "items_dropped_train": cut_tr["items_dropped"],
        "items_dropped_test": cut_te["items_dropped"],
        "mean_tokens_train": float(cut_tr["tokens"].mean()),
    }
    if plan.estimate:
        point = _estimate_point(ctx, spec, cfg_k, ldir / "estimate" / name, cut_tr["tokens"], args, log)
        point.update(trunc)
        return point
    key = _sha(
        {**plan.base_key, "inputs": run_inputs(ctx, spec), "spec": asdict(spec), "k": k, "max_length": budget}
    )
    path = ldir / "points" / f"{name}.json"
    done = _load_row(path, key, args.fresh)
    if done is not None:
        log(f"[lifelong] {spec.name}, K={k}: done before, skipped ({path})")
    else:
        log(
            f"[lifelong] {spec.name}, K={k}, max_length {budget}: {trunc['n_truncated_train']} training and "
            f"{trunc['n_truncated_test']} test prompts cut ({time.perf_counter() - plan.start:.0f} s so far)"
        )
        t0 = time.perf_counter()
        run_dir = ldir / "runs" / name
        marker = run_dir / "point_key.txt"
        resume = not args.fresh and marker.exists() and marker.read_text().strip() == key
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(marker, key)
        res = run_variant(ctx, spec, cfg_k, run_dir, resume=resume, log=log)
        train_tokens = int(cut_tr["tokens"].sum()) * cfg.train.epochs
        done = {
            "key": key,
            "method": m,
            "name": spec.name,
            "k": k,
            "max_length": budget,
            **trunc,
            "predictions": str(run_dir / "predictions.npy"),
            "metrics": res["metrics"],
            "train_tokens": train_tokens,
            "train_seconds": res["seconds"]["train"],
            "score_seconds": res["seconds"]["score"],
            "wall_seconds": time.perf_counter() - t0,
            "tokens_per_s": train_tokens / max(res["seconds"]["train"], 1e-9),
        }
        atomic_write_text(path, json.dumps(done, indent=2))
        del res
    done = dict(done)
    done["probs"] = np.load(done["predictions"]).astype(np.float64)
    return done


def report(plan: SimpleNamespace, points: Dict, args, cfg, ks: List[int], methods: List[str]) -> int:
    """The table against K (intervals, DeLong tests), written as lifelong.md, lifelong.json and lifelong.png."""
    from .._io import atomic_write_text
    from ..metrics import json_default

    ctx, ldir, labels, budgets = plan.ctx, plan.ldir, plan.labels, plan.budgets
    table, din = summarise(
        points,
        ks,
        methods,
        labels,
        np.asarray(ctx.din_test_probs, np.float64),
        args.n_boot,
        len(ctx.train_index),
    )
    wall = time.perf_counter() - plan.start
    meta = {
        "dataset": args.dataset,
        "preset": args.preset,
        "model": cfg.model or "all-MiniLM-L6-v2 (offline)",
        "kind": plan.kind,
        "ks": ks,
        "methods": methods,
        "n_train": int(len(ctx.train_index)),
        "n_test": int(labels.size),
        "epochs": cfg.train.epochs,
        "batch_size": cfg.train.batch_size,
        "n_boot": args.n_boot,
        "budget_rule": {
            "quantile": args.budget_quantile,
            "margin": args.budget_margin,
            "round_to": 8,
            "cap": plan.cap,
        },
        "din_best_epoch": ctx.din_report.best_epoch,
        "context_seconds": plan.context_seconds,
        "prompt_seconds": plan.prep_seconds,
        "wall_seconds": wall,
        "cpu_count": os.cpu_count(),
        # each point's own wall time, summed (points finished by an earlier, resumed invocation included)
        "points_wall_seconds": float(sum(r["wall_seconds"] for r in table)),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "config": {
            k: v
            for k, v in vars(args).items()
            if not k.startswith("_") and isinstance(v, (int, float, str, list, type(None)))
        },
    }
    md = markdown(table, din, budgets, meta)
    atomic_write_text(ldir / "lifelong.md", md)
    atomic_write_text(
        ldir / "lifelong.json",
        json.dumps(
            {"points": table, "din": din, "budgets": {str(k): v for k, v in budgets.items()}, "meta": meta},
            indent=2,
            default=json_default,
        ),
    )
    plot_lifelong(
        ldir / "lifelong.png",
        table,
        din,
        title=f"AUC and LogLoss against K ({args.dataset}, n={labels.size})",
    )
    print()
    print(md)
    print(
        f"[lifelong] done in {wall:.0f} s; wrote {ldir / 'lifelong.md'}, {ldir / 'lifelong.json'}, {ldir / 'lifelong.png'}"
    )
    return 0


def summarise(
    points: Dict,
    ks: List[int],
    methods: List[str],
    labels: np.ndarray,
    din_probs: np.ndarray,
    n_boot: int,
    n_train: int,
):
    """(rows with :data:`POINT_COLUMNS`, DIN's dict): bootstrap intervals (shared resamples), DeLong's test of
    each point against DIN, against the same method at the smallest K and at the previous K (does it keep
    improving?), all on the same test samples."""
    from ..train import stats

    din_st = stats.row_statistics(labels, din_probs, None, n_boot=n_boot, seed=0)
    din = {"name": DIN_NAME, **_ci_columns(din_st)}
    rows = []
    for m in methods:
        first = points[(m, ks[0])]["probs"]
        for i, k in enumerate(ks):
            p = points[(m, k)]
            refs = (
                {"DIN": din_probs}
                if i == 0
                else {"DIN": din_probs, "first": first, "prev": points[(m, ks[i - 1])]["probs"]}
            )
            st = stats.row_statistics(labels, p["probs"], refs, n_boot=n_boot, seed=0)
            vs_first, vs_prev = st["vs"].get("first"), st["vs"].get("prev")
            rows.append(
                {
                    "method": m,
                    "name": p["name"],
                    "k": k,
                    "max_length": p["max_length"],
                    **_ci_columns(st),
                    "d_auc_vs_din": st["vs"]["DIN"]["d_auc"],
                    "p_auc_vs_din": st["vs"]["DIN"]["p_auc"],
                    "d_auc_vs_first_k": vs_first["d_auc"] if vs_first else 0.0,
                    "p_auc_vs_first_k": vs_first["p_auc"] if vs_first else 1.0,
                    "d_auc_vs_prev_k": vs_prev["d_auc"] if vs_prev else 0.0,
                    "p_auc_vs_prev_k": vs_prev["p_auc"] if vs_prev else 1.0,
                    "n_train": n_train,
                    "n_test": int(labels.size),
                    **{
                        c: p.get(c)
                        for c in (
                            "n_truncated_train",
                            "n_truncated_test",
                            "items_dropped_train",
                            "items_dropped_test",
                            "mean_tokens_train",
                            "train_tokens",
                            "tokens_per_s",
                            "train_seconds",
                            "score_seconds",
                            "wall_seconds",
                        )
                    },
                }
            )
    return rows, din


def _ci_columns(st: Dict) -> Dict:
    a, ll = st["auc_ci"], st["logloss_ci"]
    return {
        "auc": a["value"],
        "auc_lo": a["lo"],
        "auc_hi": a["hi"],
        "logloss": ll["value"],
        "logloss_lo": ll["lo"],
        "logloss_hi": ll["hi"],
    }


def _p(p: float) -> str:
    return f"{p:.2g}" + (" ≈" if p >= 0.05 else "")


def markdown(rows: List[Dict], din: Dict, budgets: Dict, meta: Dict) -> str:
    ks = meta["ks"]
    head = "| method | " + " | ".join(f"K={k}" for k in ks) + " |"
    lines = [head, "|" + "---|" * (len(ks) + 1)]
    for m in meta["methods"]:
        cells = {r["k"]: r for r in rows if r["method"] == m}
        lines.append(
            f"| {METHODS[m]['name']} | "
            + " | ".join(
                f"{cells[k]['auc']:.4f} [{cells[k]['auc_lo']:.4f}, {cells[k]['auc_hi']:.4f}]" for k in ks
            )
            + " |"
        )
    lines.append(
        f"| {DIN_NAME} (no K) | "
        + " | ".join(f"{din['auc']:.4f} [{din['auc_lo']:.4f}, {din['auc_hi']:.4f}]" for _ in ks)
        + " |"
    )
    lines.append(
        "| max_length (token budget) | " + " | ".join(str(budgets[k]["max_length"]) for k in ks) + " |"
    )
    detail = [
        "| method | K | max_length | AUC | LogLoss [95% CI] | ΔAUC vs DIN (p) | ΔAUC vs K="
        + str(ks[0])
        + " (p) "
        "| ΔAUC vs previous K (p) | train / test prompts cut (items lost) | mean tokens | tokens/s | train s | wall s |",
        "|" + "---|" * 13,
    ]
    for r in rows:
        detail.append(
            "| "
            + " | ".join(
                [
                    r["name"],
                    str(r["k"]),
                    str(r["max_length"]),
                    f"{r['auc']:.4f}",
                    f"{r['logloss']:.4f} [{r['logloss_lo']:.4f}, {r['logloss_hi']:.4f}]",
                    f"{r['d_auc_vs_din']:+.4f} ({_p(r['p_auc_vs_din'])})",
                    "–" if r["k"] == ks[0] else f"{r['d_auc_vs_first_k']:+.4f} ({_p(r['p_auc_vs_first_k'])})",
                    "–" if r["k"] == ks[0] else f"{r['d_auc_vs_prev_k']:+.4f} ({_p(r['p_auc_vs_prev_k'])})",
                    f"{r['n_truncated_train']} / {r['n_truncated_test']} ({r['items_dropped_train']} / {r['items_dropped_test']})",
                    f"{r['mean_tokens_train']:.0f}",
                    f"{r['tokens_per_s']:.0f}",
                    f"{r['train_seconds']:.1f}",
                    f"{r['wall_seconds']:.1f}",
                ]
            )
            + " |"
        )
    rule = meta["budget_rule"]
    return (
        f"# AUC against history length K on {meta['dataset']}\n\n"
        f"Backbone {meta['model']} ({meta['kind']}); {meta['n_train']} training prompts per point (the same sample "
        f"at every K), {meta['n_test']} test samples (the same for every point), {meta['epochs']} epoch(s), batch "
        f"{meta['batch_size']}; preset {meta['preset']}; wall time {meta['wall_seconds'] / 60:.1f} min for this "
        f"invocation, {meta.get('points_wall_seconds', 0.0) / 60:.1f} min summed over the points' own wall times "
        f"(points finished by earlier invocations included) ({os.cpu_count()} CPUs).\n\n"
        "Test AUC [95% bootstrap interval]:\n\n" + "\n".join(lines) + "\n\n" + "\n".join(detail) + "\n\n"
        f"Token budget per K: the {rule['quantile']:g} quantile of the training prompts' token counts (all methods "
        f"at that K, rendered in full) + {rule['margin']} tokens, rounded up to 8"
        + (f", at most the backbone's {rule['cap']} positions" if rule["cap"] else "")
        + ". A prompt over budget loses "
        "its oldest history items (never part of an item); 'prompts cut' counts them, 'items lost' sums the items "
        f"removed. Intervals: percentile bootstrap ({meta['n_boot']} resamples, shared by all rows); p: DeLong's "
        "test on the same test samples; ≈: within noise (p ≥ 0.05). tokens/s: non-padding training tokens per "
        "second of training (forward + backward + optimizer).\n"
    )


def plot_lifelong(path, rows: List[Dict], din: Dict, title: str = "") -> Path:
    """PNG: AUC (left) and LogLoss (right) against K, one line per method with 95% bootstrap intervals as
    error bars; DIN's value as a dashed line with its interval as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .._io import atomic_write_png

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for ax, metric in zip(axes, ("auc", "logloss")):
        for j, m in enumerate(methods):
            pts = sorted((r for r in rows if r["method"] == m), key=lambda r: r["k"])
            ks = np.array([r["k"] for r in pts], dtype=float) * (1 + 0.01 * (j - len(methods) / 2))  # dodge
            v = np.array([r[metric] for r in pts])
            err = [
                v - np.array([r[f"{metric}_lo"] for r in pts]),
                np.array([r[f"{metric}_hi"] for r in pts]) - v,
            ]
            ax.errorbar(ks, v, yerr=err, marker="o", capsize=3, label=pts[0]["name"])
        ax.axhline(din[metric], color="tab:gray", ls="--", lw=1, label=DIN_NAME)
        ax.axhspan(din[f"{metric}_lo"], din[f"{metric}_hi"], color="tab:gray", alpha=0.15)
        all_k = sorted({r["k"] for r in rows})
        ax.set_xticks(all_k, [str(k) for k in all_k])
        ax.set_xlabel("history length K (behaviours shown)")
        ax.set_ylabel(f"test {'AUC' if metric == 'auc' else 'LogLoss'} (95% bootstrap interval)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return atomic_write_png(path, fig, dpi=110)


# ------------------------------------------------------------------------------------------ time estimate


def _estimate_point(ctx, spec, cfg_k, run_dir, train_tokens: np.ndarray, args, log) -> Dict:
    """Train ``--estimate-steps`` steps on random batches of the point's real training prompts and score one
    evaluation batch of its test prompts; the measured seconds per step and per scored sample, extrapolated."""
    import shutil

    from ..train.pipeline import run_variant

    steps, bs = args.estimate_steps, cfg_k.train.batch_size
    rng = np.random.default_rng(cfg_k.seed + 7)
    n_tr = min(steps * bs, len(ctx.train_index))
    sel = np.sort(rng.choice(len(ctx.train_index), size=n_tr, replace=False))
    n_te = min(cfg_k.train.eval_batch_size, len(ctx.test_index))
    tsel = np.sort(rng.choice(len(ctx.test_index), size=n_te, replace=False))
    small = replace(
        ctx,
        train_index=ctx.train_index[sel],
        cond_train=ctx.cond_train[sel],
        test_index=ctx.test_index[tsel],
        cond_test=ctx.cond_test[tsel],
        din_test_probs=np.asarray(ctx.din_test_probs)[tsel],
    )
    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.perf_counter()
    res = run_variant(
        small, spec, replace(cfg_k, train=replace(cfg_k.train, save_every_steps=10**9)), run_dir, log=log
    )
    wall = time.perf_counter() - t0
    measured_steps = math.ceil(n_tr / bs)
    s_step = res["seconds"]["train"] / measured_steps
    s_sample = res["seconds"]["score"] / n_te
    overhead = wall - res["seconds"]["train"] - res["seconds"]["score"]
    full_steps = math.ceil(len(ctx.train_index) / bs) * cfg_k.train.epochs
    est = full_steps * s_step + len(ctx.test_index) * s_sample + overhead
    toks = float(train_tokens[sel].sum())
    log(
        f"[lifelong] estimate {spec.name}, K={cfg_k.k}: {s_step:.2f} s/step, {toks / res['seconds']['train']:.0f} "
        f"tokens/s -> {est / 60:.1f} min for the point"
    )
    return {
        "name": spec.name,
        "k": cfg_k.k,
        "max_length": cfg_k.max_length,
        "measured_steps": measured_steps,
        "s_per_step": s_step,
        "steps_per_s": 1 / s_step,
        "s_per_scored_sample": s_sample,
        "overhead_s": overhead,
        "tokens_per_s": toks / res["seconds"]["train"],
        "full_steps": full_steps,
        "estimated_seconds": est,
    }


def _write_estimate(ldir, points, budgets, ks, methods, args, cfg, context_seconds, prep_seconds, log) -> int:
    from .._io import atomic_write_text
    from ..metrics import json_default

    rows = [{"method": m, **points[(m, k)]} for m in methods for k in ks]
    total = sum(r["estimated_seconds"] for r in rows)
    load = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    meta = {
        "dataset": args.dataset,
        "preset": args.preset,
        "n_train": cfg.n_train,
        "n_test": cfg.n_test,
        "estimate_steps": args.estimate_steps,
        "context_seconds": context_seconds,
        "prompt_seconds": prep_seconds,
        "points_seconds": total,
        "total_seconds": total + context_seconds + prep_seconds,
        "load_average": load,
        "cpu_count": os.cpu_count(),
    }
    lines = [
        "| method | K | max_length | s/step | steps/s | tokens/s | s per scored sample | estimated min |",
        "|" + "---|" * 8,
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['k']} | {r['max_length']} | {r['s_per_step']:.2f} | {r['steps_per_s']:.3f} | "
            f"{r['tokens_per_s']:.0f} | {r['s_per_scored_sample']:.3f} | {r['estimated_seconds'] / 60:.1f} |"
        )
    md = (
        f"# bench lifelong: time estimate ({args.dataset}, preset {args.preset})\n\n"
        f"An ESTIMATE, extrapolated from {args.estimate_steps} training steps per point (random batches of its "
        f"real prompts, the first step included) and one scored batch: {cfg.n_train or 'all'} training prompts "
        f"and {cfg.n_test or 'all'} test samples per point. Shared context (data, DIN, SUBR embeddings) took "
        f"{context_seconds:.0f} s here, prompt rendering and token counting {prep_seconds:.0f} s. Load average at "
        f"the end: {load}.\n\n" + "\n".join(lines) + "\n\n"
        f"Estimated total: {meta['total_seconds'] / 60:.0f} min (points {total / 60:.0f} min).\n"
    )
    atomic_write_text(ldir / "estimate.md", md)
    atomic_write_text(
        ldir / "estimate.json",
        json.dumps(
            {"points": rows, "budgets": {str(k): v for k, v in budgets.items()}, "meta": meta},
            indent=2,
            default=json_default,
        ),
    )
    print()
    print(md)
    return 0
