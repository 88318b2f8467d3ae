"""``rellax-fast bench quality`` (``make quality``): the ReLLaX ablation table at a budget where the method's
effects can show, with the uncertainty of every number (issue #14). A benchmark, not a CI test.

What one run does, on one dataset (default ml-100k from ``--data-dir``, ``$RELLAX_DATA_DIR`` or
``../shared/data``), all rows scored on the same test samples (default: the whole test split):

* baselines: DIN trained to convergence (``train-ctr``'s defaults: up to 12 epochs, early stopping on the
  valid split's AUC), with its valid and test metrics; a logistic regression on the ID features (user and
  item one-hot plus their smoothed train-split positive rates; C and the smoothing chosen on valid);
* LM rows, fine-tuned through the demo/train pipeline (``train.pipeline.run_variant``, >= 8,192 training
  prompts): every demo variant (full ReLLaX, w/o SUBR, w/o SPA, identity C, MoE C, RecLoRA C), the residual
  read-out (``--readout residual``, beyond the paper), and the text-only LM (no SPA, identity C: no DIN
  signal at all);
* the control for the residual read-out: DIN's and the text-only LM's logits mixed post hoc, the mixing
  weights fit on a valid subsample (a logistic regression on the two logits), so that a residual gain is not
  just ensembling.

Each row reports AUC and LogLoss with 95% bootstrap intervals and paired tests against DIN and against full
ReLLaX on the same samples (DeLong for AUC, paired bootstrap for LogLoss; ``train.stats``); ``--seeds 0,1,2``
repeats the fine-tuning (DIN and the samples fixed) and adds mean ± sd. Outputs, written atomically under
``<out>/quality/``: ``quality.md``, ``quality.json``, ``quality.png`` (AUCs with their intervals), and per row
``rows/<row>-s<seed>.json`` (a finished row is skipped on a rerun with the same inputs) next to the runs.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

DIN_ROW = "DIN alone (converged)"
LR_ROW = "LogReg (IDs + positive rates)"
FULL_ROW = "ReLLaX (full)"
TEXT_ROW = "text-only LM (no SPA, identity C)"
ENSEMBLE_ROW = "DIN + text-only LM, post-hoc mix (fit on valid)"



def lm_rows():
    """{row key: VariantSpec} of the LM rows: the demo's variants (``pipeline.ABLATIONS``: full, no-subr,
    no-spa and one per registered interaction kind with an ablation name), then the rows beyond the demo."""
    from ..train.pipeline import ABLATIONS, VariantSpec

    rows = dict(ABLATIONS)
    rows.update({
        "residual": VariantSpec("ReLLaX, residual read-out (lambda learned)", readout="residual"),
        "residual-fixed": VariantSpec("ReLLaX, residual read-out (lambda = 1)", readout="residual", readout_lambda="fixed"),
        "text-only": VariantSpec(TEXT_ROW, spa=False, interaction="identity"),
        "two-stage": VariantSpec("ReLLaX two-stage", recipe="two-stage"),
    })  # fmt: skip
    return rows


DEFAULT_ROWS = ("full", "no-subr", "no-spa", "identity", "moe", "recrank1", "residual", "text-only")
CONTROL_ROWS = ("din", "logreg", "ensemble")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The quality bench's options (the ReLLaX/DIN options come from ``train``'s ``add_model_arguments``)."""
    from ..train.args import add_model_arguments

    add_model_arguments(parser, n_train=8192, n_test=0)
    # The post-hoc mix is fit on, and every LM row selects its model on, the same valid subsample, scored every
    # 128 steps (4 times in the default 512-step epoch: model selection on valid, test scored once). Trainer
    # speed-ups measured by `bench finetune` at equal valid AUC: bf16 autocast where the CPU has native bf16
    # ("fast"; fp32 elsewhere) and length-grouped batches.
    parser.set_defaults(max_length=128, n_valid=2000, eval_every=128, mixed_precision="fast", group_by_length=True)
    g = parser.add_argument_group("bench quality")
    g.add_argument("--seeds", default="0", help="comma-separated fine-tuning seeds (e.g. 0,1,2): mean ± sd per row")
    g.add_argument("--rows", default="default",
                   help=f"comma-separated LM rows (default: {','.join(DEFAULT_ROWS)}; also: residual-fixed, two-stage); "
                        "DIN, the logistic regression and the post-hoc mix are always in the table (the mix needs "
                        "text-only)")  # fmt: skip
    g.add_argument("--auto-max-length", action="store_true",
                   help="derive max_length from the training prompts instead of --max-length (bench lifelong's rule: "
                        "the --budget-quantile of every row's full token counts + --budget-margin, rounded up to 8, "
                        "capped at the backbone's positions); either way the table reports the prompts cut")  # fmt: skip
    g.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples per interval and paired test")
    g.add_argument("--fresh", action="store_true", help="recompute every row (default: skip rows already done)")


def parse_seeds(text: str) -> List[int]:
    try:
        seeds = [int(s) for s in str(text).split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds: expected comma-separated integers such as 0,1,2, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ValueError(f"--seeds: expected distinct non-negative integers such as 0,1,2, got {text!r}")
    return seeds


def parse_rows(text: str) -> List[str]:
    keys = list(DEFAULT_ROWS) if text == "default" else [k.strip() for k in text.split(",") if k.strip()]
    table = lm_rows()
    unknown = [k for k in keys if k not in table]
    if unknown or not keys:
        raise ValueError(f"--rows: unknown {unknown or text!r}; choose from {', '.join(table)}")
    return keys


def default_data_dir(dataset: str) -> Optional[str]:
    """``$RELLAX_DATA_DIR``, else ``./data``, else ``../shared/data`` (the first holding ``dataset``); None: the
    loader's default (and its download)."""
    candidates = [os.environ.get("RELLAX_DATA_DIR"), "data", os.path.join("..", "shared", "data")]
    for c in candidates:
        if c and (Path(c) / dataset).is_dir():
            return str(Path(c))
    return None


# ------------------------------------------------------------------------------------------ baselines


def _positive_rates(keys_train, labels_train, keys, smoothing: float, prior: float, leave_one_out: bool):
    """Smoothed positive rate of each key among the train samples: (pos + a * prior) / (count + a); for train
    rows themselves (``leave_one_out``) without their own label, so the feature does not see the target."""
    import pandas as pd

    stats = pd.DataFrame({"k": keys_train, "y": labels_train}).groupby("k")["y"].agg(["sum", "count"])
    pos = stats["sum"].reindex(keys).fillna(0).to_numpy(np.float64)
    cnt = stats["count"].reindex(keys).fillna(0).to_numpy(np.float64)
    if leave_one_out:
        pos, cnt = pos - labels_train, cnt - 1
    return (pos + smoothing * prior) / (cnt + smoothing)


def _id_features(train, s, smoothing: float, encoder, is_train: bool = False):
    """Sparse features of the samples of split ``s`` (a CTRSplit): user/item one-hot, the smoothed positive
    rates of the user and the item among the samples of ``train`` (leave-one-out when ``s`` is ``train``
    itself) and their logits."""
    import scipy.sparse as sp

    y_tr = train.label.astype(np.float64)
    prior = float(y_tr.mean())
    loo = is_train
    tr = train
    ur = _positive_rates(tr.user_id, y_tr, s.user_id, smoothing, prior, loo)
    ir = _positive_rates(tr.item_id, y_tr, s.item_id, smoothing, prior, loo)
    dense = np.stack([ur, ir, np.log(ur / (1 - ur + 1e-9) + 1e-9), np.log(ir / (1 - ir + 1e-9) + 1e-9)], axis=1)
    onehot = encoder.transform(np.stack([s.user_id, s.item_id], axis=1))
    return sp.hstack([onehot, sp.csr_matrix(dense)]).tocsr()


def concat_splits(a, b):
    """The samples of two CTRSplits of the same sequences, as one."""
    from ..data.ctr import CTRSplit

    names = ("user_index", "pos", "user_id", "item_id", "rating", "label", "timestamp")
    return CTRSplit(a.sequences, *(np.concatenate([getattr(a, n), getattr(b, n)]) for n in names))


def fit_id_logreg(data, grid_c=(0.01, 0.1, 1.0), grid_smoothing=(2.0, 20.0), log=print) -> Dict:
    """Logistic regression on user/item one-hot + smoothed positive rates of the user and the item (and their
    logits), fit on the train split (rates leave-one-out there); the L2 strength C and the rate smoothing are
    chosen on the valid split's AUC (rates from train). Returns {"params", "valid_auc", "predict": (CTRSplit,
    rate source CTRSplit or None: train) -> p(click)}; for test samples pass train+valid as the rate source
    (``concat_splits``): in the temporal split those labels are known at test time, as DIN's histories are."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.preprocessing import OneHotEncoder

    tr = data.splits["train"]
    enc = OneHotEncoder(handle_unknown="ignore").fit(np.stack([tr.user_id, tr.item_id], axis=1))
    y_tr, y_va = tr.label.astype(int), data.splits["valid"].label.astype(int)
    best = None
    for a in grid_smoothing:
        x_tr, x_va = _id_features(tr, tr, a, enc, is_train=True), _id_features(tr, data.splits["valid"], a, enc)
        for c in grid_c:
            model = LogisticRegression(C=c, solver="liblinear", max_iter=2000).fit(x_tr, y_tr)
            auc = roc_auc_score(y_va, model.predict_proba(x_va)[:, 1])
            if best is None or auc > best[0]:
                best = (auc, a, c, model)
    auc, a, c, model = best
    log(f"[quality] logistic regression on IDs: C={c}, smoothing={a} (valid AUC {auc:.4f})")

    def predict(split, rate_source=None) -> np.ndarray:
        return model.predict_proba(_id_features(tr if rate_source is None else rate_source, split, a, enc))[:, 1]

    return {"params": {"C": c, "smoothing": a}, "valid_auc": float(auc), "predict": predict}


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), 1e-7, 1 - 1e-7)
    return np.log(p) - np.log1p(-p)


def fit_posthoc_mix(labels_valid, din_valid, lm_valid) -> Dict:
    """p = sigmoid(w_din * DIN_logit + w_lm * LM_logit + c), fit on valid samples (an unpenalised logistic
    regression on the two logits: the post-hoc average with its weights and scale fit, a superset of a convex
    average). Returns {"w_din", "w_lm", "c", "predict": (din_probs, lm_probs) -> probs}."""
    from sklearn.linear_model import LogisticRegression

    x = np.stack([_logit(din_valid), _logit(lm_valid)], axis=1)
    model = LogisticRegression(C=1e6, max_iter=1000).fit(x, np.asarray(labels_valid).astype(int))
    w_din, w_lm = (float(v) for v in model.coef_[0])

    def predict(din_probs, lm_probs):
        return model.predict_proba(np.stack([_logit(din_probs), _logit(lm_probs)], axis=1))[:, 1]

    return {"w_din": w_din, "w_lm": w_lm, "c": float(model.intercept_[0]), "predict": predict}


# ------------------------------------------------------------------------------------------ LM rows


def score_split(model, ctx, spec, cfg, split: str, index: np.ndarray, desc: str) -> np.ndarray:
    """p(click) of a trained ReLLaX ``model`` on the ``index`` samples of ``split`` (its own prompts and DIN h)."""
    from transformers import AutoTokenizer

    from ..ctr.store import din_outputs
    from ..data.collate import PromptCollator
    from ..train.pipeline import backbone_folder, make_samples, shown_positions_for, subset_view
    from ..train.trainer import PromptDataset, predict_proba

    data = ctx.data
    _, h = din_outputs(ctx.din, subset_view(data, split, index), ctx.vocab, split)
    sub = data.splits[split].subset(index)
    pos = shown_positions_for(data, sub, cfg.k, spec.subr, cfg.subr_mode, ctx.item_emb, ctx.item_ids, cfg.train.progress)
    tok = AutoTokenizer.from_pretrained(backbone_folder(cfg.model))
    if model.kind == "causal" and tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    collator = PromptCollator(tok, kind=model.kind, max_length=cfg.max_length, placeholder=cfg.placeholder if spec.spa else None,
                              chat=cfg.chat)  # fmt: skip
    ds = PromptDataset(make_samples(data, sub, pos), collator, h)
    return predict_proba(model, ds, cfg.train.eval_batch_size, progress=cfg.train.progress, desc=desc,
                         mixed_precision=cfg.train.mixed_precision)  # fmt: skip


def prompt_budget(ctx, cfg, specs, args, log=print) -> Dict:
    """The token budget of the bench and what it cuts: the full token counts of every row's training prompts
    (one count per distinct SUBR / SPA setting), the budget (``--max-length``, or with ``--auto-max-length``
    bench lifelong's rule over all of them), and per setting how many training prompts exceed it (they lose
    their oldest history items, never part of one)."""
    from ..train.pipeline import make_samples, shown_positions_for
    from .budget import (
        BUDGET_MARGIN,
        BUDGET_QUANTILE,
        PromptSet,
        position_limit,
        prompt_tokenizer,
        token_budget,
    )

    tok, kind, model_path = prompt_tokenizer(cfg)
    data = ctx.data
    tr = data.splits["train"].subset(ctx.train_index)
    lengths = {}
    for spec in specs:
        setting = f"{'SUBR' if spec.subr else 'recent'}{', SPA' if spec.spa else ''}"
        if setting not in lengths:
            pos = shown_positions_for(data, tr, cfg.k, spec.subr, cfg.subr_mode, ctx.item_emb, ctx.item_ids, False)
            ph = cfg.placeholder if spec.spa else None
            lengths[setting] = PromptSet(make_samples(data, tr, pos), tok, kind, ph, cfg.chat).lengths
    cap = position_limit(model_path)
    quantile, margin = getattr(args, "budget_quantile", BUDGET_QUANTILE), getattr(args, "budget_margin", BUDGET_MARGIN)
    auto = bool(getattr(args, "auto_max_length", False))
    budget = token_budget(np.concatenate(list(lengths.values())), quantile, margin, cap) if auto else int(cfg.max_length)
    cut = {s: {"n_cut": int((n > budget).sum()), "n": int(n.size), "median_tokens": float(np.median(n))}
           for s, n in lengths.items()}  # fmt: skip
    log(f"[quality] max_length {budget} ({'derived from the prompts' if auto else '--max-length'}): training prompts cut "
        + "; ".join(f"{s} {c['n_cut']}/{c['n']} (median {c['median_tokens']:.0f} tokens)" for s, c in cut.items()))  # fmt: skip
    return {"max_length": budget, "auto": auto, "quantile": quantile if auto else None, "margin": margin if auto else None,
            "position_limit": cap, "train_prompts_cut": cut}  # fmt: skip


def _sha(obj) -> str:
    from .._io import json_sha256  # the one canonical-JSON hash (same json.dumps arguments, same keys)

    return json_sha256(obj)


def _load_row(path: Path, key: str, fresh: bool) -> Optional[Dict]:
    if fresh or not path.exists():
        return None
    row = json.loads(path.read_text())
    if row.get("key") != key:
        return None
    preds = Path(row["predictions"])
    if not preds.exists() or (row.get("valid_predictions") and not Path(row["valid_predictions"]).exists()):
        return None
    return row


def _save_npy(path: Path, arr: np.ndarray) -> str:
    from .._io import atomic_write_npy

    atomic_write_npy(path, np.asarray(arr, np.float64))
    return str(path)


# ------------------------------------------------------------------------------------------ the bench


def bench_pipeline_config(args: argparse.Namespace):
    """The pipeline config of a quality-style bench: ``--dataset`` defaults to ml-100k, read from
    :func:`default_data_dir` unless ``--data-dir`` is given (sets both on ``args``)."""
    from ..train.args import pipeline_config

    args.dataset = args.dataset or "ml-100k"
    if args.data_dir is None and args.dataset != "synthetic":
        args.data_dir = default_data_dir(args.dataset)
    return pipeline_config(args)


def run(args: argparse.Namespace, log=print) -> int:
    import sys

    try:
        seeds, row_keys = parse_seeds(args.seeds), parse_rows(args.rows)
        if args.n_boot < 10 or args.n_valid < 1:
            raise ValueError(f"--n-boot must be >= 10 and --n-valid >= 1 (the post-hoc mix is fit on valid samples); "
                             f"got {args.n_boot}, {args.n_valid}")  # fmt: skip
        args = copy.copy(args)
        cfg = bench_pipeline_config(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return run_bench(args, cfg, seeds, row_keys, log=log)


def run_bench(args, cfg, seeds: List[int], row_keys: List[str], log=print) -> int:
    from tqdm.auto import tqdm

    from .._io import atomic_write_text
    from ..ctr.store import din_fingerprint, din_outputs
    from ..metrics import json_default
    from ..train.args import slug
    from ..train.context import build_shared_context
    from ..train.pipeline import run_inputs, run_variant, subset_view

    start = time.perf_counter()
    table = lm_rows()
    qdir = Path(args.out) / "quality"
    qdir.mkdir(parents=True, exist_ok=True)
    (qdir / "rows").mkdir(exist_ok=True)
    shared = copy.copy(args)
    shared.out = str(qdir)
    log(f"[quality] dataset {args.dataset} ({args.data_dir or 'default location'}); backbone "
        f"{cfg.model or 'all-MiniLM-L6-v2 (offline)'}; {cfg.n_train or 'all'} training prompts, test "
        f"{cfg.n_test or 'whole split'}, K={cfg.k}, max_length="
        f"{'auto' if getattr(args, 'auto_max_length', False) else cfg.max_length}; seeds {seeds}; LM rows {row_keys}")  # fmt: skip
    ctx = build_shared_context(shared, cfg, log=log)
    data = ctx.data
    budget = prompt_budget(ctx, cfg, [table[k] for k in row_keys], args, log=log)
    cfg = replace(cfg, max_length=budget["max_length"])
    labels = data.splits["test"].label[ctx.test_index].astype(np.float64)
    valid_index = ctx.valid_index  # pipeline.valid_subsample: also what every LM row selects its model on
    labels_valid = data.splits["valid"].label[valid_index].astype(np.float64)
    din_valid, _ = din_outputs(ctx.din, subset_view(data, "valid", valid_index), ctx.vocab, "valid")
    # what a finished row depends on (besides its own inputs, run_inputs: data, training sample, DIN, SUBR)
    base_key = {"din": din_fingerprint(ctx.din, ctx.vocab), "test_index": _sha(ctx.test_index.tolist()),
                "pipeline": {**asdict(cfg), "train": {**asdict(cfg.train), "progress": None}}}  # fmt: skip

    # baselines (deterministic: computed once)
    rows: Dict[str, Dict] = {}
    rows[DIN_ROW] = {"kind": "baseline", "seeds": {None: {"probs": np.asarray(ctx.din_test_probs, np.float64)}},
                     "valid": dict(ctx.din_report.valid), "note": f"best epoch {ctx.din_report.best_epoch}"}  # fmt: skip
    t0 = time.perf_counter()
    lr = fit_id_logreg(data, log=log)
    lr_valid = lr["predict"](data.splits["valid"])
    from ..metrics import ctr_metrics

    rows[LR_ROW] = {"kind": "baseline", "seeds": {None: {"probs": lr["predict"](data.splits["test"].subset(ctx.test_index),
                                                                          concat_splits(data.splits["train"], data.splits["valid"]))}},
                    "valid": ctr_metrics(data.splits["valid"].label, lr_valid), "note": f"C={lr['params']['C']}, "
                    f"smoothing={lr['params']['smoothing']}", "seconds": time.perf_counter() - t0}  # fmt: skip

    # LM rows, per seed; resumable per row
    jobs = [(k, s) for s in seeds for k in row_keys]
    for key, seed in tqdm(jobs, desc="quality rows", disable=not cfg.train.progress):
        spec = table[key]
        cfg_s = replace(cfg, seed=seed, train=replace(cfg.train, seed=seed))
        name = f"{slug(spec.name)}-s{seed}"
        # residual rows since the zero-initialised gate (model.ReLLaXOptions.readout_gate) carry it in their key,
        # so rows finished by the ungated read-out are recomputed; other rows keep their keys
        gate = {"readout_gate": True} if spec.readout == "residual" else {}
        row_key = _sha({**base_key, "inputs": run_inputs(ctx, spec), "spec": asdict(spec), "seed": seed, **gate,
                        "valid_index": _sha(valid_index.tolist()) if key == "text-only" else None})  # fmt: skip
        path = qdir / "rows" / f"{name}.json"
        done = _load_row(path, row_key, args.fresh)
        entry = rows.setdefault(spec.name, {"kind": "lm", "seeds": {}, "spec": asdict(spec)})
        if done is not None:
            log(f"[quality] {spec.name} (seed {seed}): done before, skipped ({path})")
        else:
            t0 = time.perf_counter()
            log(f"[quality] {spec.name} (seed {seed})  ({time.perf_counter() - start:.0f} s so far)")
            # an interrupted row resumes from its checkpoints only when they were made for this very row
            marker = qdir / "runs" / name / "row_key.txt"
            resume = not args.fresh and marker.exists() and marker.read_text().strip() == row_key
            marker.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(marker, row_key)
            res = run_variant(ctx, spec, cfg_s, qdir / "runs" / name, resume=resume, log=log)
            done = {"key": row_key, "name": spec.name, "seed": seed, "metrics": res["metrics"],
                    "predictions": str(Path(res["run_dir"]) / "predictions.npy"), "best_valid": res["best"]}  # fmt: skip
            if key == "text-only":  # the post-hoc mix is fit on this model's valid scores
                pv = res["valid_probs"]  # scored by the model selection on the same valid samples
                if pv is None:  # selected before a resume: score them again
                    pv = score_split(res["model"], ctx, spec, cfg_s, "valid", valid_index, desc=f"valid {spec.name}")
                done["valid_predictions"] = _save_npy(qdir / "runs" / name / "valid_predictions.npy", pv)
            done["seconds"] = time.perf_counter() - t0
            atomic_write_text(path, json.dumps(done, indent=2))
            del res
        got = {"probs": np.load(done["predictions"]).astype(np.float64), "seconds": done.get("seconds"),
               "best_valid": done.get("best_valid")}  # fmt: skip
        if done.get("valid_predictions"):
            got["valid_probs"] = np.load(done["valid_predictions"]).astype(np.float64)
        entry["seeds"][seed] = got

    # LM rows' valid column: the selected step's metrics on the selection subsample (mean over seeds)
    for entry in rows.values():
        picked = [g.get("best_valid") for g in entry["seeds"].values()] if entry["kind"] == "lm" else []
        if picked and all(b is not None for b in picked):
            entry["valid"] = {m: float(np.mean([b[m] for b in picked])) for m in ("auc", "logloss")}
            entry["valid"]["steps"] = [int(b["step"]) for b in picked]

    # the control: post-hoc mix of DIN's and the text-only LM's logits, weights fit on valid
    if TEXT_ROW in rows:
        mix = {"kind": "control", "seeds": {}}
        for seed, got in rows[TEXT_ROW]["seeds"].items():
            fit = fit_posthoc_mix(labels_valid, din_valid.numpy(), got["valid_probs"])
            mix["seeds"][seed] = {"probs": fit["predict"](ctx.din_test_probs, got["probs"]),
                                  "weights": {k: fit[k] for k in ("w_din", "w_lm", "c")}}  # fmt: skip
            rows[TEXT_ROW].setdefault("valid_by_seed", {})[seed] = ctr_metrics(labels_valid, got["valid_probs"])
        first = mix["seeds"][seeds[0]]["weights"]
        mix["note"] = f"w_DIN={first['w_din']:.3f}, w_LM={first['w_lm']:.3f}"
        rows[ENSEMBLE_ROW] = mix
    else:
        log("[quality] no text-only row: the post-hoc mix control is left out (add text-only to --rows)")

    table = summarise(rows, labels, seeds, args.n_boot, log=log)
    wall = time.perf_counter() - start
    meta = {"dataset": args.dataset, "n_test": int(labels.size), "n_train": int(len(ctx.train_index)),
            "n_valid_mix": int(valid_index.size), "din_valid_subset": ctr_metrics(labels_valid, din_valid.numpy()),
            "token_budget": budget,
            "seeds": seeds, "n_boot": args.n_boot, "wall_seconds": wall,
            "din_report": {"best_epoch": ctx.din_report.best_epoch, "valid": ctx.din_report.valid},
            "config": {k: v for k, v in vars(args).items()
                       if not k.startswith("_") and isinstance(v, (int, float, str, list, type(None)))}}  # fmt: skip
    md = markdown(table, meta)
    atomic_write_text(qdir / "quality.md", md)
    atomic_write_text(qdir / "quality.json", json.dumps({"rows": table, "meta": meta}, indent=2, default=json_default))
    plot_quality(qdir / "quality.png", table, title=f"ReLLaX quality bench ({args.dataset}, n={labels.size})")
    print()
    print(md)
    print(f"[quality] done in {wall:.0f} s; wrote {qdir / 'quality.md'}, {qdir / 'quality.json'}, {qdir / 'quality.png'}")
    return 0


def summarise(rows: Dict[str, Dict], labels: np.ndarray, seeds: List[int], n_boot: int, log=print) -> List[Dict]:
    """One dict per row: metrics per seed, mean ± sd, bootstrap CIs and paired tests (first seed) vs DIN and
    vs full ReLLaX."""
    from ..metrics import ctr_metrics
    from ..train import stats

    def first_probs(entry):
        s = entry["seeds"]
        return s[seeds[0]]["probs"] if seeds[0] in s else next(iter(s.values()))["probs"]

    refs = {"DIN": first_probs(rows[DIN_ROW])}
    if FULL_ROW in rows:
        refs["full"] = first_probs(rows[FULL_ROW])
    out = []
    for name, entry in rows.items():
        per_seed = {str(s): ctr_metrics(labels, e["probs"]) for s, e in entry["seeds"].items()}
        aucs = np.array([m["auc"] for m in per_seed.values()])
        lls = np.array([m["logloss"] for m in per_seed.values()])
        st = stats.row_statistics(labels, first_probs(entry), {k: v for k, v in refs.items()}, n_boot=n_boot, seed=0)
        out.append({
            "row": name, "kind": entry["kind"], "note": entry.get("note", ""), "valid": entry.get("valid"),
            "valid_by_seed": {str(s): m for s, m in entry.get("valid_by_seed", {}).items()} or None,
            "per_seed": per_seed, "n_seeds": len(per_seed),
            "auc_mean": float(aucs.mean()), "auc_sd": float(aucs.std(ddof=1)) if aucs.size > 1 else None,
            "logloss_mean": float(lls.mean()), "logloss_sd": float(lls.std(ddof=1)) if lls.size > 1 else None,
            "weights": {str(s): e["weights"] for s, e in entry["seeds"].items() if "weights" in e} or None,
            "seconds": {str(s): e.get("seconds") for s, e in entry["seeds"].items() if e.get("seconds")} or None,
            **st,
        })  # fmt: skip
    return out


def _mean(m: float, sd: Optional[float]) -> str:
    return f"{m:.4f}" if sd is None else f"{m:.4f} ± {sd:.4f}"


def markdown(table: List[Dict], meta: Dict) -> str:
    from ..train import stats

    head = ("| row | valid AUC | test AUC | AUC 95% CI | test LogLoss | LogLoss 95% CI | ΔAUC vs DIN | ΔLogLoss vs DIN "
            "| ΔAUC vs full | ΔLogLoss vs full | note |")  # fmt: skip
    lines = [head, "|" + "---|" * 11]
    for r in table:
        valid = r.get("valid") or {}
        lines.append("| " + " | ".join([
            r["row"], f"{valid['auc']:.4f}" if valid.get("auc") is not None else "–",
            _mean(r["auc_mean"], r["auc_sd"]), f"[{r['auc_ci']['lo']:.4f}, {r['auc_ci']['hi']:.4f}]",
            _mean(r["logloss_mean"], r["logloss_sd"]), f"[{r['logloss_ci']['lo']:.4f}, {r['logloss_ci']['hi']:.4f}]",
            stats.format_delta(r["vs"].get("DIN"), "auc"), stats.format_delta(r["vs"].get("DIN"), "logloss"),
            stats.format_delta(r["vs"].get("full"), "auc"), stats.format_delta(r["vs"].get("full"), "logloss"), r.get("note") or "",
        ]) + " |")  # fmt: skip
    seeds = meta["seeds"]
    tb = meta.get("token_budget")
    budget = "" if not tb else (
        f"max_length {tb['max_length']} ({'derived from the training prompts' if tb['auto'] else 'given'}); training "
        "prompts over it (they lose their oldest history items): "
        + "; ".join(f"{s} {c['n_cut']} of {c['n']} (median {c['median_tokens']:.0f} tokens)" for s, c in tb["train_prompts_cut"].items())
        + ".\n\n")  # fmt: skip
    return (
        f"# ReLLaX quality bench on {meta['dataset']}\n\n"
        f"{meta['n_train']} training prompts, {meta['n_test']} test samples (every row scores the same ones), "
        f"seeds {seeds}; wall time {meta['wall_seconds'] / 60:.1f} min.\n\n" + budget + "\n".join(lines) + "\n\n"
        f"AUC/LogLoss: {'mean ± sd over the seeds' if len(seeds) > 1 else 'on the test samples'}; 95% CIs: percentile "
        f"bootstrap ({meta['n_boot']} resamples) of seed {seeds[0]}'s predictions. Δ = row − reference on the same "
        f"samples (seed {seeds[0]}); p: DeLong's test for AUC, paired bootstrap for LogLoss; ≈ marks a difference "
        "within noise (p ≥ 0.05). DIN: trained to convergence (early stopping on valid); its valid AUC is on the "
        f"whole valid split. LM rows: valid AUC of the step kept by model selection, on the {meta['n_valid_mix']} "
        f"valid samples every row selects on (DIN scores {meta['din_valid_subset']['auc']:.4f} there); the post-hoc "
        "mix is fit on the same samples.\n"
    )


def plot_quality(path, table: List[Dict], title: str = "") -> Path:
    """PNG: each row's test AUC with its 95% bootstrap interval; DIN's AUC as a vertical line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .._io import atomic_write_png

    names = [r["row"] for r in table][::-1]
    vals = np.array([r["auc_ci"]["value"] for r in table][::-1])
    lo = vals - np.array([r["auc_ci"]["lo"] for r in table][::-1])
    hi = np.array([r["auc_ci"]["hi"] for r in table][::-1]) - vals
    colors = ["tab:gray" if r["kind"] == "baseline" else "tab:orange" if r["kind"] == "control" else "tab:blue"
              for r in table][::-1]  # fmt: skip
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(names) + 1.5))
    ax.errorbar(vals, np.arange(len(names)), xerr=[lo, hi], fmt="none", ecolor="black", capsize=3)
    ax.scatter(vals, np.arange(len(names)), c=colors, zorder=3)
    din = [r for r in table if r["row"] == DIN_ROW]
    if din:
        ax.axvline(din[0]["auc_ci"]["value"], color="tab:gray", ls="--", lw=1)
    ax.set_yticks(np.arange(len(names)), names, fontsize=8)
    ax.set_xlabel("test AUC (95% bootstrap interval)")
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return atomic_write_png(path, fig, dpi=110)
