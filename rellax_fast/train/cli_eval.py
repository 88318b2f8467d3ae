"""``rellax-fast eval``: score a saved ReLLaX run on a split of its dataset, or on a JSONL file of samples.

The run folder (from ``rellax-fast train`` or ``demo``) holds ``rellax.json`` and ``trainable.safetensors``;
the backbone is reloaded from the path recorded there and the frozen DIN from the run's CTR folder. Paths
in ``rellax.json`` are relative to the run folder, so a moved or copied ``--out`` evaluates with its own
DIN; the DIN and the SUBR embeddings are checked against the fingerprints the run recorded, and a mismatch
(a retrained DIN, another pipeline's files) is an error. Eval writes only into its output folder, and only after
everything was checked and scored: the data must be the ones the run was trained on (its recorded data
fingerprint; never downloaded), the run's files whole (``rellax.json`` readable, every saved tensor known, of the
model's shape and finite; the paths it records inside its ``--out``), every JSONL line valid (a bad one is an
error naming the line), and every probability finite.

JSONL input: one sample per line, ``{"user_id": 1, "item_id": 50, "history": [12, 7, ...],
"history_ratings": [4, 5, ...], "label": 1}`` (history oldest first; ``history_timestamps`` and
``label`` optional). Output: ``metrics.json`` (when labels are known) and ``predictions.jsonl`` in
``--out`` (default ``<run>/eval-<split>`` or ``<run>/eval-jsonl``), plus a Markdown line on stdout. With labels,
``metrics.json`` also carries ``slices``: AUC / LogLoss per slice (target item's train interactions, user seen in
train, history length; ``train.slices``) with intervals and paired tests against the run's frozen DIN on the same
samples; the membership is stored once in ``slices.json`` next to it.
"""

from __future__ import annotations

import argparse

from .runs import score

# the defaults of the shared --out and --dataset here, in words (rellax_fast.cli.describe_defaults)
DEFAULTS_IN_WORDS = {
    "out": "<run>/eval-<split>, or <run>/eval-jsonl with --jsonl",
    "dataset": "the run's dataset",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="a run folder written by `rellax-fast train` or `demo`")
    parser.add_argument(
        "--split", default="test", choices=["train", "valid", "test"], help="the split scored"
    )
    parser.add_argument(
        "--n", type=int, default=None, help="samples to score (default: the run's --n-test; 0: all)"
    )
    parser.add_argument(
        "--jsonl", default=None, help="score the samples of this JSONL file instead of a split"
    )
    parser.add_argument("--batch-size", type=int, default=64, help="prompts per scoring batch")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(out=None, dataset=None)


def run(args: argparse.Namespace) -> int:
    import json
    import sys
    from pathlib import Path

    from rellax_fast.data import load_dataset, prepare_ctr

    from .._io import atomic_write_text
    from ..metrics import ctr_metrics
    from .metrics import markdown_table, write_metrics_json
    from .runs import read_run_meta
    from .slices import sliced_report

    if args.n is not None and args.n < 0:
        print(f"error: --n must be >= 0 (0: all); got {args.n}", file=sys.stderr)
        return 2
    if args.batch_size < 1:
        print(f"error: --batch-size must be >= 1; got {args.batch_size}", file=sys.stderr)
        return 2
    run_dir = Path(args.run)
    out = Path(args.out) if args.out else run_dir / ("eval-jsonl" if args.jsonl else f"eval-{args.split}")
    # the run, the data and the JSONL lines are checked before anything is scored or written: the run's own files
    # (RunFileError), what it depends on (RunDependencyError), other data (RunDataMismatchError), a bad JSONL line
    # (DataFormatError), a path outside --out (PathOutsideFolderError) are ValueErrors, which rellax_fast.cli prints
    # as one error line (exit 2)
    meta = read_run_meta(run_dir)
    dataset = args.dataset or meta["dataset"]
    # eval never downloads: a missing dataset is an error naming where it was looked for, and nothing is created
    data = prepare_ctr(
        load_dataset(dataset, data_dir=args.data_dir, download=False), seed=meta["pipeline"]["seed"]
    )
    details: dict = {}
    split, probs, has_label, spec = score(
        run_dir,
        data,
        args.split,
        args.n,
        args.jsonl,
        args.batch_size,
        not args.no_progress,
        cache_dir=out / "emb_cache",
        details=details,
    )
    from rellax_fast.distributed import is_main

    # under torchrun / accelerate launch: every rank scored a shard (gathered); rank 0 writes
    if not is_main():
        return 0
    out.mkdir(parents=True, exist_ok=True)
    lines = [
        json.dumps({"user_id": int(u), "item_id": int(i), "p_click": float(p)})
        for u, i, p in zip(split.user_id, split.item_id, probs)
    ]
    atomic_write_text(out / "predictions.jsonl", "\n".join(lines) + "\n")
    if has_label:
        m = ctr_metrics(split.label, probs)
        sliced = sliced_report(
            data, split, probs, details["din_probs"], out / "slices.json", args.jsonl or args.split
        )
        write_metrics_json(
            out / "metrics.json",
            m,
            {"run": str(run_dir), "variant": spec.name, "source": args.jsonl or args.split, "slices": sliced},
        )
        print(markdown_table([{"variant": spec.name, **m}]))
    print(f"wrote {out / 'predictions.jsonl'}" + (f" and {out / 'metrics.json'}" if has_label else ""))
    return 0
