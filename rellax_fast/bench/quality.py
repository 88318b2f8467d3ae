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
  just ensembling;
* the text-aware DIN (``--rows din-text``, ``ctr.text_din``): DIN plus the frozen SUBR item-text embedding,
  projected, as an extra item feature, trained to convergence like DIN: the practitioner's alternative to an LLM.

Sliced metrics (issue #27, ``train.slices``): every row's AUC and LogLoss per slice of the test samples (the
target item's train interactions 0 / 1-5 / 6-20 / >20, the user seen or unseen in train, the history-length
band) with intervals and DeLong's paired test against DIN on the slice; the membership is computed once from the
train split and stored in ``slices.json``, and every row is cut by it. Few samples: ``--ctr-train-samples N``
trains the table's DIN, text-aware DIN and ID regression on a seeded N of the train split (the LM rows draw their
prompts from the same N); ``--few-shot 2048,8192,32768,all`` adds the curve of DIN, the text-aware DIN, the
text-only LM and full ReLLaX against N (``few_shot_curve``).

Each row reports AUC and LogLoss with 95% bootstrap intervals and paired tests against DIN and against full
ReLLaX on the same samples (DeLong for AUC, paired bootstrap for LogLoss; ``train.stats``); ``--seeds 0,1,2``
repeats the fine-tuning (DIN and the samples fixed) and adds mean ± sd. Outputs, written atomically under
``<out>/quality/``: ``quality.md``, ``quality.json``, ``quality.png`` (AUCs with their intervals), and per row
``rows/<row>-s<seed>.json`` (a finished row is skipped on a rerun with the same inputs) next to the runs,
``slices.json`` (the slice membership) and ``few-shot/<n...>/`` (the curve's points, reused the same way).
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
TEXT_DIN_ROW = "DIN + item text (converged)"
# CTR rows beyond DIN, chosen with --rows like the LM rows: {key: row name}
CTR_ROWS = {"din-text": TEXT_DIN_ROW}
# the rows of the few-samples curve (--few-shot): DIN and the text-aware DIN trained on N train samples, the
# text-only LM and full ReLLaX on min(N, --n-train) prompts of those N with their DIN trained on the same N
FEW_SHOT_LM_ROWS = ("text-only", "full")
FEW_SHOT_DEFAULT = "2048,8192,32768,all"


def lm_rows():
    """{row key: VariantSpec} of the LM rows: the demo's variants (``pipeline.ablations()``: full, no-subr,
    no-spa and one per registered interaction kind with an ablation name), then the rows beyond the demo."""
    from ..train.pipeline import VariantSpec, ablations

    rows = ablations()
    rows.update(
        {
            "residual": VariantSpec("ReLLaX, residual read-out (lambda learned)", readout="residual"),
            "residual-fixed": VariantSpec(
                "ReLLaX, residual read-out (lambda = 1)", readout="residual", readout_lambda="fixed"
            ),
            "text-only": VariantSpec(TEXT_ROW, spa=False, interaction="identity"),
            "two-stage": VariantSpec("ReLLaX two-stage", recipe="two-stage"),
        }
    )
    return rows


DEFAULT_ROWS = (
    "full",
    "no-subr",
    "no-spa",
    "identity",
    "moe",
    "recrank1",
    "residual",
    "text-only",
    "din-text",
)
CONTROL_ROWS = ("din", "logreg", "ensemble")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The quality bench's options (the ReLLaX/DIN options come from ``train``'s ``add_model_arguments``)."""
    from .._argtypes import integer
    from ..train.args import add_model_arguments

    add_model_arguments(parser, n_train=8192, n_test=0)
    # The post-hoc mix is fit on, and every LM row selects its model on, the same valid subsample, scored every
    # 128 steps (4 times in the default 512-step epoch: model selection on valid, test scored once). Trainer
    # speed-ups measured by `bench finetune` at equal valid AUC: bf16 autocast where the CPU has native bf16
    # ("fast"; fp32 elsewhere) and length-grouped batches.
    parser.set_defaults(
        max_length=128, n_valid=2000, eval_every=128, mixed_precision="fast", group_by_length=True
    )
    g = parser.add_argument_group("bench quality")
    g.add_argument(
        "--seeds", default="0", help="comma-separated fine-tuning seeds (e.g. 0,1,2): mean ± sd per row"
    )
    g.add_argument(
        "--rows",
        default="default",
        help=f"comma-separated LM and CTR rows (default: {','.join(DEFAULT_ROWS)}; also: residual-fixed, "
        "two-stage); din-text is DIN with the frozen SUBR item-text embedding as an extra item feature "
        "(ctr.text_din); DIN, the logistic regression and the post-hoc mix are always in the table (the "
        "mix needs text-only)",
    )
    g.add_argument(
        "--ctr-train-samples",
        type=integer(0, hint=" (0: all)"),
        default=0,
        help="train the table's DIN, text-aware DIN and ID regression on a seeded subset of this many train "
        "samples (the LM rows then draw their --n-train prompts from the same subset); 0: all",
    )
    g.add_argument(
        "--few-shot",
        default="",
        help="also report the few-samples curve at these train-sample counts N (comma-separated, 'all' for "
        f"the whole split; e.g. {FEW_SHOT_DEFAULT}): DIN and the text-aware DIN trained on N, the "
        "text-only LM and full ReLLaX on min(N, --n-train) of those prompts with their DIN trained on "
        "the same N; empty: no curve",
    )
    g.add_argument(
        "--auto-max-length",
        action="store_true",
        help="derive max_length from the training prompts instead of --max-length (bench lifelong's rule: "
        "the --budget-quantile of every row's full token counts + --budget-margin, rounded up to 8, "
        "capped at the backbone's positions); either way the table reports the prompts cut",
    )
    g.add_argument(
        "--n-boot", type=int, default=1000, help="bootstrap resamples per interval and paired test"
    )
    g.add_argument(
        "--fresh", action="store_true", help="recompute every row (default: skip rows already done)"
    )


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
    unknown = [k for k in keys if k not in table and k not in CTR_ROWS]
    if unknown or not keys:
        raise ValueError(f"--rows: unknown {unknown or text!r}; choose from {', '.join([*table, *CTR_ROWS])}")
    return keys


def parse_few_shot(text: str) -> List[int]:
    """The train-sample counts of ``--few-shot``, ascending, 0 standing for 'all' (last); [] for an empty text."""
    sizes = []
    for part in (p.strip() for p in str(text).split(",") if p.strip()):
        if part == "all":
            sizes.append(0)
            continue
        try:
            n = int(part)
        except ValueError:
            n = -1
        if n < 1:
            raise ValueError(
                f"--few-shot: expected comma-separated counts >= 1 or 'all' (e.g. {FEW_SHOT_DEFAULT}), "
                f"got {text!r}"
            )
        sizes.append(n)
    if len(set(sizes)) != len(sizes):
        raise ValueError(f"--few-shot: counts must be distinct, got {text!r}")
    return sorted(sizes, key=lambda n: (n == 0, n))


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
    dense = np.stack(
        [ur, ir, np.log(ur / (1 - ur + 1e-9) + 1e-9), np.log(ir / (1 - ir + 1e-9) + 1e-9)], axis=1
    )
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
        x_tr, x_va = (
            _id_features(tr, tr, a, enc, is_train=True),
            _id_features(tr, data.splits["valid"], a, enc),
        )
        for c in grid_c:
            model = LogisticRegression(C=c, solver="liblinear", max_iter=2000).fit(x_tr, y_tr)
            auc = roc_auc_score(y_va, model.predict_proba(x_va)[:, 1])
            if best is None or auc > best[0]:
                best = (auc, a, c, model)
    auc, a, c, model = best
    log(f"[quality] logistic regression on IDs: C={c}, smoothing={a} (valid AUC {auc:.4f})")

    def predict(split, rate_source=None) -> np.ndarray:
        return model.predict_proba(_id_features(tr if rate_source is None else rate_source, split, a, enc))[
            :, 1
        ]

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
    pos = shown_positions_for(
        data, sub, cfg.k, spec.subr, cfg.subr_mode, ctx.item_emb, ctx.item_ids, cfg.train.progress
    )
    tok = AutoTokenizer.from_pretrained(backbone_folder(cfg.model))
    if model.kind == "causal" and tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    collator = PromptCollator(
        tok,
        kind=model.kind,
        max_length=cfg.max_length,
        placeholder=cfg.placeholder if spec.spa else None,
        chat=cfg.chat,
    )
    ds = PromptDataset(make_samples(data, sub, pos), collator, h)
    return predict_proba(
        model,
        ds,
        cfg.train.eval_batch_size,
        progress=cfg.train.progress,
        desc=desc,
        mixed_precision=cfg.train.mixed_precision,
    )


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
            pos = shown_positions_for(
                data, tr, cfg.k, spec.subr, cfg.subr_mode, ctx.item_emb, ctx.item_ids, False
            )
            ph = cfg.placeholder if spec.spa else None
            lengths[setting] = PromptSet(make_samples(data, tr, pos), tok, kind, ph, cfg.chat).lengths
    cap = position_limit(model_path)
    quantile, margin = (
        getattr(args, "budget_quantile", BUDGET_QUANTILE),
        getattr(args, "budget_margin", BUDGET_MARGIN),
    )
    auto = bool(getattr(args, "auto_max_length", False))
    budget = (
        token_budget(np.concatenate(list(lengths.values())), quantile, margin, cap)
        if auto
        else int(cfg.max_length)
    )
    cut = {
        s: {"n_cut": int((n > budget).sum()), "n": int(n.size), "median_tokens": float(np.median(n))}
        for s, n in lengths.items()
    }
    log(
        f"[quality] max_length {budget} ({'derived from the prompts' if auto else '--max-length'}): training prompts cut "
        + "; ".join(
            f"{s} {c['n_cut']}/{c['n']} (median {c['median_tokens']:.0f} tokens)" for s, c in cut.items()
        )
    )
    return {
        "max_length": budget,
        "auto": auto,
        "quantile": quantile if auto else None,
        "margin": margin if auto else None,
        "position_limit": cap,
        "train_prompts_cut": cut,
    }


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
        few_shot = parse_few_shot(getattr(args, "few_shot", ""))
        if args.n_boot < 10 or args.n_valid < 1:
            raise ValueError(
                f"--n-boot must be >= 10 and --n-valid >= 1 (the post-hoc mix is fit on valid samples); "
                f"got {args.n_boot}, {args.n_valid}"
            )
        args = copy.copy(args)
        cfg = bench_pipeline_config(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return run_bench(args, cfg, seeds, row_keys, log=log, few_shot=few_shot)


def quality_context(args, cfg, out, log=print):
    """(the shared context of the table in ``out``, the whole prepared data): with ``--ctr-train-samples N`` the
    context's train split is a seeded subset of N samples (``ctr.text_din.train_subset_view``, seed ``--seed``),
    so its DIN, the ID regression and the LM rows' prompts all come from those N."""
    from rellax_fast.data import load_dataset, prepare_ctr

    from ..ctr.text_din import train_subset_view
    from ..train.context import din_options_of, din_train_config_of, shared_context

    data = prepare_ctr(load_dataset(args.dataset, data_dir=args.data_dir), seed=getattr(args, "seed", 0))
    view = train_subset_view(data, getattr(args, "ctr_train_samples", 0), args.seed)
    ctx = shared_context(
        view,
        out,
        cfg,
        din_options_of(args),
        din_train_config_of(args),
        progress=not args.no_progress,
        log=log,
    )
    return ctx, data


def text_din_row(ctx, args, out: Path, fresh: bool, log=print) -> Dict:
    """The text-aware DIN baseline (``ctr.text_din``) trained on ``ctx``'s train split with DIN's options and early
    stopping, scored on ``ctx``'s test samples; its predictions are kept under ``out`` (``din-text.json``,
    ``din-text-predictions.npy``) and reused while the data, the SUBR embeddings, the options and the test samples
    are the same. Returns the row entry of the table."""
    from .._io import atomic_write_text
    from ..ctr.din import predict
    from ..ctr.store import din_reuse_key, split_arrays
    from ..ctr.text_din import fit_text_din
    from ..train.context import din_options_of, din_train_config_of
    from ..train.pipeline import embeddings_fingerprint, subset_view

    options, tc = din_options_of(args), din_train_config_of(args)
    key = _sha(
        {
            "din": din_reuse_key(ctx.data, options, tc),
            "model": "text-din-1",
            "test_index": _sha(ctx.test_index.tolist()),
            "subr": embeddings_fingerprint(ctx.item_emb, ctx.item_ids),
        }
    )
    path = out / "din-text.json"
    done = _load_row(path, key, fresh)
    if done is not None:
        log(f"[quality] {TEXT_DIN_ROW}: done before, skipped ({path})")
    else:
        t0 = time.perf_counter()
        log(f"[quality] {TEXT_DIN_ROW}: training on {len(ctx.data.splits['train'])} train samples")
        model, report, vocab = fit_text_din(ctx.data, ctx.item_emb, ctx.item_ids, options, tc)
        view = subset_view(ctx.data, "test", ctx.test_index)
        probs = predict(model, split_arrays(view, "test", vocab, model.config.max_history)).numpy()
        done = {
            "key": key,
            "predictions": _save_npy(out / "din-text-predictions.npy", probs),
            "valid": report.valid,
            "best_epoch": report.best_epoch,
            "seconds": time.perf_counter() - t0,
        }
        atomic_write_text(path, json.dumps(done, indent=2))
    return {
        "kind": "baseline",
        "seeds": {
            None: {"probs": np.load(done["predictions"]).astype(np.float64), "seconds": done.get("seconds")}
        },
        "valid": done["valid"],
        "note": f"best epoch {done['best_epoch']}",
    }


def lm_row(
    ctx, spec, cfg, seed: int, qdir: Path, row_key: str, args, score_valid: bool = False, log=print
) -> Dict:
    """One LM row at one seed, trained into ``<qdir>/runs/<name>`` and recorded in ``<qdir>/rows/<name>.json``, or
    read back from there when that record has ``row_key`` (``--fresh``: always retrained). ``score_valid``: also
    keep the selected model's valid predictions (the post-hoc mix is fit on them). Returns {"probs", "seconds",
    "best_valid"} (+ "valid_probs")."""
    from .._io import atomic_write_text
    from ..train.args import slug
    from ..train.pipeline import run_variant

    cfg_s = replace(cfg, seed=seed, train=replace(cfg.train, seed=seed))
    name = f"{slug(spec.name)}-s{seed}"
    path = qdir / "rows" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    done = _load_row(path, row_key, args.fresh)
    if done is not None:
        log(f"[quality] {spec.name} (seed {seed}): done before, skipped ({path})")
    else:
        t0 = time.perf_counter()
        log(f"[quality] {spec.name} (seed {seed}), {len(ctx.train_index)} training prompts")
        # an interrupted row resumes from its checkpoints only when they were made for this very row
        marker = qdir / "runs" / name / "row_key.txt"
        resume = not args.fresh and marker.exists() and marker.read_text().strip() == row_key
        marker.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(marker, row_key)
        res = run_variant(ctx, spec, cfg_s, qdir / "runs" / name, resume=resume, log=log)
        done = {
            "key": row_key,
            "name": spec.name,
            "seed": seed,
            "metrics": res["metrics"],
            "predictions": str(Path(res["run_dir"]) / "predictions.npy"),
            "best_valid": res["best"],
        }
        if score_valid:  # the post-hoc mix is fit on this model's valid scores
            pv = res["valid_probs"]  # scored by the model selection on the same valid samples
            if pv is None:  # selected before a resume: score them again
                pv = score_split(
                    res["model"], ctx, spec, cfg_s, "valid", ctx.valid_index, desc=f"valid {spec.name}"
                )
            done["valid_predictions"] = _save_npy(qdir / "runs" / name / "valid_predictions.npy", pv)
        done["seconds"] = time.perf_counter() - t0
        atomic_write_text(path, json.dumps(done, indent=2))
        del res
    got = {
        "probs": np.load(done["predictions"]).astype(np.float64),
        "seconds": done.get("seconds"),
        "best_valid": done.get("best_valid"),
    }
    if done.get("valid_predictions"):
        got["valid_probs"] = np.load(done["valid_predictions"]).astype(np.float64)
    return got


def lm_row_key(base_key: Dict, ctx, spec, key: str, seed: int) -> str:
    """What a finished LM row depends on: the bench's ``base_key`` (DIN, test samples, pipeline options), the run's
    inputs (``run_inputs``: data, training sample, DIN, SUBR), the variant and the seed."""
    from ..train.pipeline import run_inputs

    # residual rows since the zero-initialised gate (model.ReLLaXOptions.readout_gate) carry it in their key,
    # so rows finished by the ungated read-out are recomputed; other rows keep their keys
    gate = {"readout_gate": True} if spec.readout == "residual" else {}
    return _sha(
        {
            **base_key,
            "inputs": run_inputs(ctx, spec),
            "spec": asdict(spec),
            "seed": seed,
            **gate,
            "valid_index": _sha(ctx.valid_index.tolist()) if key == "text-only" else None,
        }
    )


def bench_base_key(ctx, cfg) -> Dict:
    """What every finished row of one table depends on besides its own inputs: the DIN, the test samples and the
    pipeline options."""
    from ..ctr.store import din_fingerprint

    return {
        "din": din_fingerprint(ctx.din, ctx.vocab),
        "test_index": _sha(ctx.test_index.tolist()),
        "pipeline": {**asdict(cfg), "train": {**asdict(cfg.train), "progress": None}},
    }


def _announce(args, cfg, seeds: List[int], row_keys: List[str], log=print) -> None:
    log(
        f"[quality] dataset {args.dataset} ({args.data_dir or 'default location'}); backbone "
        f"{cfg.model or 'all-MiniLM-L6-v2 (offline)'}; {cfg.n_train or 'all'} training prompts, test "
        f"{cfg.n_test or 'whole split'}, K={cfg.k}, max_length="
        f"{'auto' if getattr(args, 'auto_max_length', False) else cfg.max_length}; seeds {seeds}; rows {row_keys}"
        + (
            f"; DIN on {args.ctr_train_samples} train samples"
            if getattr(args, "ctr_train_samples", 0)
            else ""
        )
    )


def baseline_rows(ctx, args, row_keys: List[str], qdir: Path, log=print) -> Dict[str, Dict]:
    """The deterministic rows, computed once: DIN, the ID logistic regression and (``din-text`` in ``row_keys``)
    the text-aware DIN."""
    from ..metrics import ctr_metrics

    data = ctx.data
    rows: Dict[str, Dict] = {}
    rows[DIN_ROW] = {
        "kind": "baseline",
        "seeds": {None: {"probs": np.asarray(ctx.din_test_probs, np.float64)}},
        "valid": dict(ctx.din_report.valid),
        "note": f"best epoch {ctx.din_report.best_epoch}",
    }
    t0 = time.perf_counter()
    lr = fit_id_logreg(data, log=log)
    lr_valid = lr["predict"](data.splits["valid"])
    rows[LR_ROW] = {
        "kind": "baseline",
        "seeds": {
            None: {
                "probs": lr["predict"](
                    data.splits["test"].subset(ctx.test_index),
                    concat_splits(data.splits["train"], data.splits["valid"]),
                )
            }
        },
        "valid": ctr_metrics(data.splits["valid"].label, lr_valid),
        "note": f"C={lr['params']['C']}, smoothing={lr['params']['smoothing']}",
        "seconds": time.perf_counter() - t0,
    }
    if "din-text" in row_keys:
        rows[TEXT_DIN_ROW] = text_din_row(ctx, args, qdir / "rows", args.fresh, log=log)
    return rows


def run_lm_rows(
    rows: Dict[str, Dict],
    ctx,
    cfg,
    lm_keys: List[str],
    seeds: List[int],
    qdir: Path,
    args,
    start: float,
    log=print,
) -> None:
    """Every LM row at every seed into ``rows`` (resumable per row), then each LM row's valid column: the selected
    step's metrics on the selection subsample (mean over seeds)."""
    from tqdm.auto import tqdm

    table = lm_rows()
    base_key = bench_base_key(ctx, cfg)
    jobs = [(k, s) for s in seeds for k in lm_keys]
    for key, seed in tqdm(jobs, desc="quality rows", disable=not cfg.train.progress):
        spec = table[key]
        log(f"[quality] ({time.perf_counter() - start:.0f} s so far)")
        got = lm_row(
            ctx,
            spec,
            cfg,
            seed,
            qdir,
            lm_row_key(base_key, ctx, spec, key, seed),
            args,
            score_valid=key == "text-only",
            log=log,
        )
        rows.setdefault(spec.name, {"kind": "lm", "seeds": {}, "spec": asdict(spec)})["seeds"][seed] = got
    for entry in rows.values():
        picked = [g.get("best_valid") for g in entry["seeds"].values()] if entry["kind"] == "lm" else []
        if picked and all(b is not None for b in picked):
            entry["valid"] = {m: float(np.mean([b[m] for b in picked])) for m in ("auc", "logloss")}
            entry["valid"]["steps"] = [int(b["step"]) for b in picked]


def add_mix_control(rows: Dict[str, Dict], ctx, labels_valid, din_valid, seeds: List[int], log=print) -> None:
    """The control row: a post-hoc mix of DIN's and the text-only LM's logits, weights fit on valid (left out
    without a text-only row)."""
    from ..metrics import ctr_metrics

    if TEXT_ROW not in rows:
        log("[quality] no text-only row: the post-hoc mix control is left out (add text-only to --rows)")
        return
    mix = {"kind": "control", "seeds": {}}
    for seed, got in rows[TEXT_ROW]["seeds"].items():
        fit = fit_posthoc_mix(labels_valid, din_valid.numpy(), got["valid_probs"])
        mix["seeds"][seed] = {
            "probs": fit["predict"](ctx.din_test_probs, got["probs"]),
            "weights": {k: fit[k] for k in ("w_din", "w_lm", "c")},
        }
        rows[TEXT_ROW].setdefault("valid_by_seed", {})[seed] = ctr_metrics(labels_valid, got["valid_probs"])
    first = mix["seeds"][seeds[0]]["weights"]
    mix["note"] = f"w_DIN={first['w_din']:.3f}, w_LM={first['w_lm']:.3f}"
    rows[ENSEMBLE_ROW] = mix


def write_report(qdir: Path, args, summary, sliced, curve, meta: Dict, n_test: int) -> None:
    """``quality.md``, ``quality.json``, ``quality.png`` (and ``few-shot.png``) under ``qdir``; prints the table."""
    from .._io import atomic_write_text
    from ..metrics import json_default

    md = markdown(summary, meta) + sliced_markdown(sliced) + (few_shot_markdown(curve) if curve else "")
    atomic_write_text(qdir / "quality.md", md)
    atomic_write_text(
        qdir / "quality.json",
        json.dumps(
            {"rows": summary, "slices": sliced, "few_shot": curve, "meta": meta},
            indent=2,
            default=json_default,
        ),
    )
    plot_quality(qdir / "quality.png", summary, title=f"ReLLaX quality bench ({args.dataset}, n={n_test})")
    if curve:
        plot_few_shot(
            qdir / "few-shot.png", curve, title=f"AUC against train samples ({args.dataset}, n={n_test})"
        )
    print()
    print(md)
    print(
        f"[quality] done in {meta['wall_seconds']:.0f} s; wrote {qdir / 'quality.md'}, {qdir / 'quality.json'}, "
        f"{qdir / 'quality.png'}" + (f", {qdir / 'few-shot.png'}" if curve else "")
    )


def run_bench(
    args, cfg, seeds: List[int], row_keys: List[str], log=print, few_shot: Optional[List[int]] = None
) -> int:
    """Plan (context, token budget, valid subsample), run (baselines, LM rows, the mix control), report."""
    from ..ctr.store import din_outputs
    from ..metrics import ctr_metrics
    from ..train.pipeline import subset_view

    start = time.perf_counter()
    table = lm_rows()
    lm_keys = [k for k in row_keys if k in table]
    qdir = Path(args.out) / "quality"
    qdir.mkdir(parents=True, exist_ok=True)
    (qdir / "rows").mkdir(exist_ok=True)
    _announce(args, cfg, seeds, row_keys, log=log)
    ctx, full_data = quality_context(args, cfg, qdir, log=log)
    data = ctx.data
    budget = prompt_budget(ctx, cfg, [table[k] for k in lm_keys], args, log=log)
    cfg = replace(cfg, max_length=budget["max_length"])
    labels = data.splits["test"].label[ctx.test_index].astype(np.float64)
    valid_index = ctx.valid_index  # pipeline.valid_subsample: also what every LM row selects its model on
    labels_valid = data.splits["valid"].label[valid_index].astype(np.float64)
    din_valid, _ = din_outputs(ctx.din, subset_view(data, "valid", valid_index), ctx.vocab, "valid")

    rows = baseline_rows(ctx, args, row_keys, qdir, log=log)
    run_lm_rows(rows, ctx, cfg, lm_keys, seeds, qdir, args, start, log=log)
    add_mix_control(rows, ctx, labels_valid, din_valid, seeds, log=log)

    summary = summarise(rows, labels, seeds, args.n_boot, log=log)
    sliced = sliced_rows(rows, labels, seeds, data, ctx.test_index, qdir / "slices.json", args.n_boot)
    curve = (
        few_shot_curve(args, cfg, ctx, full_data, few_shot, qdir / "few-shot", log=log) if few_shot else None
    )
    meta = {
        "dataset": args.dataset,
        "n_test": int(labels.size),
        "n_train": int(len(ctx.train_index)),
        "n_valid_mix": int(valid_index.size),
        "din_valid_subset": ctr_metrics(labels_valid, din_valid.numpy()),
        "token_budget": budget,
        "ctr_train_samples": int(len(data.splits["train"])),
        "seeds": seeds,
        "n_boot": args.n_boot,
        "wall_seconds": time.perf_counter() - start,
        "din_report": {"best_epoch": ctx.din_report.best_epoch, "valid": ctx.din_report.valid},
        "config": {
            k: v
            for k, v in vars(args).items()
            if not k.startswith("_") and isinstance(v, (int, float, str, list, type(None)))
        },
    }
    write_report(qdir, args, summary, sliced, curve, meta, int(labels.size))
    return 0


def _first_probs(entry: Dict, seeds: List[int]) -> np.ndarray:
    s = entry["seeds"]
    return s[seeds[0]]["probs"] if seeds[0] in s else next(iter(s.values()))["probs"]


def sliced_rows(
    rows: Dict[str, Dict], labels: np.ndarray, seeds: List[int], data, test_index, path: Path, n_boot: int
) -> Dict:
    """Every row's sliced metrics (``train.slices``; first seed) against DIN on the same samples. The membership
    of the test samples is computed from ``data``'s train split, written to ``path`` once and read back, and
    every row is cut by that one stored membership (checked)."""
    from ..train import slices

    slices.save_slices(path, slices.compute_slices(data, data.splits["test"].subset(test_index), "test"))
    membership = slices.load_slices(path)
    din = _first_probs(rows[DIN_ROW], seeds)
    out = {
        name: slices.slice_statistics(
            labels, _first_probs(entry, seeds), membership, reference=din, n_boot=n_boot
        )
        for name, entry in rows.items()
    }
    slices.check_same_membership(out)
    return {"membership": str(path), "source": membership.source, "rows": out}


def sliced_markdown(sliced: Dict) -> str:
    from ..train import slices

    return (
        "\n## Sliced metrics\n\nTest AUC and LogLoss per slice (95% bootstrap interval; vs DIN: the difference on "
        "the slice's samples, DeLong's paired test for AUC, the paired bootstrap for LogLoss; first seed), every row "
        f"cut by one stored membership ({sliced['membership']}), computed from the train split "
        f"({sliced['source']['train_samples']} samples). Bands under {slices.MIN_SLICE_N} samples or "
        f"{slices.MIN_SLICE_CLASS} of either label are not tested.\n\n"
        + slices.slices_markdown(sliced["rows"])
        + "\n"
        + slices.slices_markdown(sliced["rows"], metric="logloss")
    )


# ------------------------------------------------------------------------------------------ few samples


def few_shot_context(ctx, full_data, cfg, args, n: int, out: Path, log=print):
    """(context, pipeline config) of one point of the few-samples curve: ``full_data``'s train split cut to a
    seeded subset of ``n`` samples (0: all; seed ``--seed``), the DIN trained on those in ``<out>/ctr`` (reused
    while the same), the LM rows' prompts min(n, ``--n-train``) of them; the test and valid samples and the SUBR
    embeddings are ``ctx``'s. The table's own context when it is the same."""
    from ..ctr.store import train_or_load_ctr
    from ..ctr.text_din import train_subset_view
    from ..train.context import din_options_of, din_train_config_of
    from ..train.pipeline import build_context

    view = train_subset_view(full_data, n, args.seed)
    cfg_n = replace(cfg, n_train=cfg.n_train if n == 0 else (n if cfg.n_train == 0 else min(cfg.n_train, n)))
    if len(view.splits["train"]) == len(ctx.data.splits["train"]) and cfg_n.n_train == cfg.n_train:
        return ctx, cfg
    din, vocab, report = train_or_load_ctr(
        view, out / "ctr", din_options_of(args), din_train_config_of(args), log=log
    )
    point = build_context(view, din, vocab, report, cfg_n, ctx.item_emb, ctx.item_ids)
    point.ctr_dir, point.subr_path = str(out / "ctr"), ctx.subr_path
    if not (
        np.array_equal(point.test_index, ctx.test_index)
        and np.array_equal(point.valid_index, ctx.valid_index)
    ):
        raise RuntimeError(
            "few-shot point: its test or valid samples differ from the table's (they must be shared)"
        )
    return point, cfg_n


def few_shot_curve(args, cfg, ctx, full_data, sizes: List[int], out: Path, log=print) -> Dict:
    """AUC against the number of train samples N (``--few-shot``): per N, DIN and the text-aware DIN trained on a
    seeded N of the train split, the text-only LM and full ReLLaX on min(N, ``--n-train``) prompts of those N
    with their DIN trained on the same N (first seed); every point scored on the table's test samples, each row
    with its bootstrap interval and DeLong's paired test against the DIN of the same N. Points are kept under
    ``out/<n...>/`` and reused like the table's rows."""
    from ..train import stats

    table = lm_rows()
    labels = ctx.data.splits["test"].label[ctx.test_index].astype(np.float64)
    seed = parse_seeds(args.seeds)[0]
    points = []
    for n in sizes:
        pdir = out / (f"n{n}" if n else "all")
        pdir.mkdir(parents=True, exist_ok=True)
        log(f"[quality] few-shot point N={n or 'all'}")
        point, cfg_n = few_shot_context(ctx, full_data, cfg, args, n, pdir, log=log)
        home = out.parent if point is ctx else pdir  # the table's own point: its rows are the table's
        probs = {
            DIN_ROW: np.asarray(point.din_test_probs, np.float64),
            TEXT_DIN_ROW: text_din_row(point, args, home / "rows", args.fresh, log=log)["seeds"][None][
                "probs"
            ],
        }
        base_key = bench_base_key(point, cfg_n)
        for key in FEW_SHOT_LM_ROWS:
            spec = table[key]
            row_key = lm_row_key(base_key, point, spec, key, seed)
            probs[spec.name] = lm_row(point, spec, cfg_n, seed, home, row_key, args, log=log)["probs"]
        rows = {}
        for name, p in probs.items():
            ci = stats.bootstrap_ci(labels, p, "auc", args.n_boot, seed=0)
            rows[name] = {
                "auc": ci["value"],
                "auc_lo": ci["lo"],
                "auc_hi": ci["hi"],
                "vs_din": stats.row_statistics(labels, p, {"DIN": probs[DIN_ROW]}, args.n_boot)["vs"]["DIN"],
            }
        points.append(
            {
                "n": n,
                "label": f"N={n}" if n else "all",
                "train_samples": int(len(point.data.splits["train"])),
                "lm_prompts": int(len(point.train_index)),
                "rows": rows,
            }
        )
    return {"sizes": sizes, "seed": seed, "n_test": int(labels.size), "points": points}


def few_shot_markdown(curve: Dict) -> str:
    """The curve as a Markdown table: a line per row, a column per N (AUC, interval, ΔAUC vs DIN at that N)."""
    from ..train import stats

    pts = curve["points"]
    head = [f"{p['label']} ({p['train_samples']} samples, {p['lm_prompts']} prompts)" for p in pts]
    lines = ["| row | " + " | ".join(head) + " |", "|---|" + "---|" * len(pts)]
    for name in pts[0]["rows"]:
        cells = [
            f"{r['auc']:.4f} [{r['auc_lo']:.4f}, {r['auc_hi']:.4f}]; {stats.format_delta(r['vs_din'], 'auc')}"
            for r in (p["rows"][name] for p in pts)
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return (
        "\n## Few samples\n\nTest AUC against the number of train samples N (seeded subsets of the train split; "
        f"seed {curve['seed']}'s fine-tuning; the same {curve['n_test']} test samples), 95% bootstrap interval, then "
        "ΔAUC vs the DIN trained on the same N (DeLong). DIN and the text-aware DIN train on the N samples; the LM "
        "rows on min(N, --n-train) prompts drawn from them, with their DIN trained on the same N.\n\n"
        + "\n".join(lines)
        + "\n"
    )


def summarise(
    rows: Dict[str, Dict], labels: np.ndarray, seeds: List[int], n_boot: int, log=print
) -> List[Dict]:
    """One dict per row: metrics per seed, mean ± sd, bootstrap CIs and paired tests (first seed) vs DIN and
    vs full ReLLaX."""
    from ..metrics import ctr_metrics
    from ..train import stats

    def first_probs(entry):
        return _first_probs(entry, seeds)

    refs = {"DIN": first_probs(rows[DIN_ROW])}
    if FULL_ROW in rows:
        refs["full"] = first_probs(rows[FULL_ROW])
    out = []
    for name, entry in rows.items():
        per_seed = {str(s): ctr_metrics(labels, e["probs"]) for s, e in entry["seeds"].items()}
        aucs = np.array([m["auc"] for m in per_seed.values()])
        lls = np.array([m["logloss"] for m in per_seed.values()])
        st = stats.row_statistics(
            labels, first_probs(entry), {k: v for k, v in refs.items()}, n_boot=n_boot, seed=0
        )
        out.append(
            {
                "row": name,
                "kind": entry["kind"],
                "note": entry.get("note", ""),
                "valid": entry.get("valid"),
                "valid_by_seed": {str(s): m for s, m in entry.get("valid_by_seed", {}).items()} or None,
                "per_seed": per_seed,
                "n_seeds": len(per_seed),
                "auc_mean": float(aucs.mean()),
                "auc_sd": float(aucs.std(ddof=1)) if aucs.size > 1 else None,
                "logloss_mean": float(lls.mean()),
                "logloss_sd": float(lls.std(ddof=1)) if lls.size > 1 else None,
                "weights": {str(s): e["weights"] for s, e in entry["seeds"].items() if "weights" in e}
                or None,
                "seconds": {str(s): e.get("seconds") for s, e in entry["seeds"].items() if e.get("seconds")}
                or None,
                **st,
            }
        )
    return out


def _mean(m: float, sd: Optional[float]) -> str:
    return f"{m:.4f}" if sd is None else f"{m:.4f} ± {sd:.4f}"


def markdown(table: List[Dict], meta: Dict) -> str:
    from ..train import stats

    head = (
        "| row | valid AUC | test AUC | AUC 95% CI | test LogLoss | LogLoss 95% CI | ΔAUC vs DIN | ΔLogLoss vs DIN "
        "| ΔAUC vs full | ΔLogLoss vs full | note |"
    )
    lines = [head, "|" + "---|" * 11]
    for r in table:
        valid = r.get("valid") or {}
        lines.append(
            "| "
            + " | ".join(
                [
                    r["row"],
                    f"{valid['auc']:.4f}" if valid.get("auc") is not None else "–",
                    _mean(r["auc_mean"], r["auc_sd"]),
                    f"[{r['auc_ci']['lo']:.4f}, {r['auc_ci']['hi']:.4f}]",
                    _mean(r["logloss_mean"], r["logloss_sd"]),
                    f"[{r['logloss_ci']['lo']:.4f}, {r['logloss_ci']['hi']:.4f}]",
                    stats.format_delta(r["vs"].get("DIN"), "auc"),
                    stats.format_delta(r["vs"].get("DIN"), "logloss"),
                    stats.format_delta(r["vs"].get("full"), "auc"),
                    stats.format_delta(r["vs"].get("full"), "logloss"),
                    r.get("note") or "",
                ]
            )
            + " |"
        )
    seeds = meta["seeds"]
    tb = meta.get("token_budget")
    budget = (
        ""
        if not tb
        else (
            f"max_length {tb['max_length']} ({'derived from the training prompts' if tb['auto'] else 'given'}); training "
            "prompts over it (they lose their oldest history items): "
            + "; ".join(
                f"{s} {c['n_cut']} of {c['n']} (median {c['median_tokens']:.0f} tokens)"
                for s, c in tb["train_prompts_cut"].items()
            )
            + ".\n\n"
        )
    )
    return (
        f"# ReLLaX quality bench on {meta['dataset']}\n\n"
        f"{meta['n_train']} training prompts, {meta['n_test']} test samples (every row scores the same ones), "
        f"seeds {seeds}; wall time {meta['wall_seconds'] / 60:.1f} min.\n\n"
        + budget
        + "\n".join(lines)
        + "\n\n"
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
    colors = [
        "tab:gray" if r["kind"] == "baseline" else "tab:orange" if r["kind"] == "control" else "tab:blue"
        for r in table
    ][::-1]
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


def plot_few_shot(path, curve: Dict, title: str = "") -> Path:
    """PNG: each row's test AUC (95% bootstrap interval) against the train samples N of the few-samples curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .._io import atomic_write_png

    pts = curve["points"]
    x = np.array([p["train_samples"] for p in pts], np.float64)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in pts[0]["rows"]:
        r = [p["rows"][name] for p in pts]
        y = np.array([v["auc"] for v in r])
        err = [y - np.array([v["auc_lo"] for v in r]), np.array([v["auc_hi"] for v in r]) - y]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=name)
    ax.set_xscale("log")
    ax.set_xlabel("train samples N (log scale)")
    ax.set_ylabel("test AUC (95% bootstrap interval)")
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return atomic_write_png(path, fig, dpi=110)
