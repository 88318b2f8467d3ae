"""``rellax-fast train``: fine-tune one ReLLaX variant (full model or an ablation chosen by flags).

Trains (or reuses) the DIN in ``<out>/ctr``, builds SUBR prompts with SPA placeholders, fine-tunes the
backbone's CFLoRA adapter, projector and read-out, scores the test subsample, and writes the run to
``<out>/<name>`` (metrics.json, loss.json, trainable.safetensors, adapter/, checkpoints/)."""

from __future__ import annotations

import argparse

from .args import add_model_arguments, interaction_kind, pipeline_config, slug
from .context import build_shared_context


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    g = parser.add_argument_group("variant")
    g.add_argument("--name", default=None, help="run folder name under --out (default: from the flags)")
    g.add_argument("--no-subr", action="store_true", help="show the K most recent behaviours instead of SUBR")
    g.add_argument("--no-spa", action="store_true", help="no soft prompts")
    g.add_argument(
        "--interaction",
        default="full",
        type=interaction_kind,
        metavar="KIND",
        help="the C constraint: a kind registered in rellax_fast.cflora.INTERACTIONS (`rellax-fast info` lists "
        "them)",
    )
    g.add_argument(
        "--recipe",
        default="joint",
        choices=["joint", "two-stage"],
        help="joint: train everything together; two-stage: plain LoRA first on a mix of recent and retrieved "
        "prompts, then the interaction",
    )
    g.add_argument(
        "--readout",
        default="paper",
        choices=["paper", "residual"],
        help="paper: softmax over the [No, Yes] logits; residual (beyond the paper): p = sigmoid((Yes - No) "
        "+ lambda * the frozen DIN's logit), the LM learns a correction to DIN",
    )
    g.add_argument(
        "--readout-lambda",
        default="learned",
        choices=["learned", "fixed"],
        help="residual read-out: lambda learned (init 1) or fixed at 1",
    )
    g.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")


def run(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    from .pipeline import VariantSpec, run_variant

    try:
        cfg = pipeline_config(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    spec = VariantSpec(
        name=args.name or "rellax",
        subr=not args.no_subr,
        spa=not args.no_spa,
        interaction=args.interaction,
        recipe=args.recipe,
        readout=args.readout,
        readout_lambda=args.readout_lambda,
    )
    if args.name is None:
        parts = (
            ["rellax", args.interaction]
            + (["no-subr"] if args.no_subr else [])
            + (["no-spa"] if args.no_spa else [])
        )
        spec.name = "-".join(
            parts
            + ([args.recipe] if args.recipe != "joint" else [])
            + ([f"residual-{args.readout_lambda}"] if args.readout == "residual" else [])
        )
    from .pipeline import check_model_option

    # other errors (bad data, --model, --max-length, a diverging loss, a --resume that is refused, ...) are
    # ValueErrors naming the file or the flag, raised before anything is half-written; rellax_fast.cli prints them
    # as one error line and exits 2
    check_model_option(args.model)  # before the DIN and the embeddings are built
    ctx = build_shared_context(args, cfg)
    run_dir = Path(args.out) / slug(spec.name)
    res = run_variant(ctx, spec, cfg, run_dir, resume=args.resume)  # a refused --resume: a ValueError
    m = res["metrics"]
    print(
        f"{spec.name}: test AUC {m['auc']:.4f}  LogLoss {m['logloss']:.4f}  accuracy {m['accuracy']:.4f}  (n={m['n']})"
    )
    print(f"wrote {run_dir}")
    return 0
