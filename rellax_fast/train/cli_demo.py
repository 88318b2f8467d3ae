"""``rellax-fast demo``: the whole ReLLaX pipeline and its ablations on one dataset (default: the embedded
``synthetic`` one, with the offline MiniLM backbone), sized to finish in under 10 minutes on a 2-core CPU.

It trains DIN once, embeds the items once, then fine-tunes each variant on the same training sample and
scores it on the same test sample: full ReLLaX, w/o SUBR, w/o SPA, w/o CFLoRA (identity), the MoE
(iLoRA-style) and RecLoRA-style interactions; DIN alone is scored on the same test sample. It prints the
ablation table and writes ``ablation.md``, ``ablation.json`` and ``ablation.png`` under ``--out``. After the first
variant it prints an ETA for the rest; ``--resume`` reads finished variants back instead of training them again.
The work is :mod:`rellax_fast.train.ablation`'s (with ``train.context``); this module parses the options and prints.

At the demo's size most differences are within noise, and the table says which: every row has its AUC's 95%
bootstrap interval and its paired difference from full ReLLaX and from DIN on the same test samples
(DeLong's test; ``train.stats``), marked "≈" when p >= 0.05. ``rellax-fast bench quality`` is the budget at
which the method's effects can show.
"""

from __future__ import annotations

import argparse

from .ablation import selected_variants


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .._argtypes import integer
    from .args import add_model_arguments

    add_model_arguments(parser, n_train=512, n_test=500)
    parser.set_defaults(max_length=128, din_epochs=4, din_patience=1, din_max_history=30, lr=2e-3)
    parser.add_argument(
        "--variants",
        default="all",
        help="comma-separated keys of the ablation table (train.pipeline.ablations(): full, no-subr, no-spa, and "
        "one per registered interaction kind with an ablation name; `rellax-fast info` lists the kinds) or "
        "two-stage (default: all but two-stage)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="read back variants finished before under the same options and inputs (their saved metrics, "
        "not scored again) and continue interrupted ones from their checkpoints",
    )
    parser.add_argument(
        "--n-boot", type=integer(1), default=1000, help="bootstrap resamples of each AUC interval"
    )


def run(args: argparse.Namespace) -> int:
    import sys
    import time
    from pathlib import Path

    from .ablation import run_ablation, write_ablation
    from .args import pipeline_config
    from .context import build_shared_context

    start = time.perf_counter()
    out = Path(args.out)
    try:
        specs = selected_variants(args.variants)
        cfg = pipeline_config(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    print(
        f"[demo] dataset {args.dataset}; backbone {args.model or 'all-MiniLM-L6-v2 (offline)'}; "
        f"{cfg.n_train} training prompts, {cfg.n_test} test prompts, K={cfg.k}, max_length={cfg.max_length}"
    )
    ctx = build_shared_context(args, cfg)
    result = run_ablation(ctx, specs, cfg, out, resume=args.resume, n_boot=args.n_boot)
    write_ablation(out, args.dataset, result, vars_json(args))
    print()
    print(result["table"])
    print(
        f"[demo] done in {time.perf_counter() - start:.0f} s. Files: {out / 'ablation.md'}, {out / 'ablation.json'}, "
        f"{out / 'ablation.png'}; runs in {out}/<variant>/ (metrics.json, loss.json, adapter/), DIN in {out / 'ctr'}"
    )
    return 0


def vars_json(args) -> dict:
    return {
        k: v
        for k, v in vars(args).items()
        if not k.startswith("_") and isinstance(v, (int, float, str, list, type(None)))
    }
