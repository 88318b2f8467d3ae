"""`rellax-fast prepare`: load a dataset, build the paper's CTR splits, write parquet + meta.json, summarise.

The split files reference the packed sequences (user_index, pos); ``--history-column`` adds the optional flat
``history`` list (off by default: at ML-20M/25M scale its full form does not fit in memory or on disk).

``--dataset``, ``--data-dir`` and ``--out`` are added by :mod:`rellax_fast.cli`. Nothing heavy is imported
at module level.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--seed", type=int, default=42, help="seed for BookCrossing targets/splits (default 42)"
    )
    parser.add_argument(
        "--min-history",
        type=int,
        default=5,
        help="MovieLens: drop samples with fewer earlier ratings (default 5)",
    )
    parser.add_argument(
        "--repeat-window",
        type=int,
        default=60,
        metavar="SECONDS",  # = data.ctr.REPEAT_WINDOW_S
        help="drop a rating that the same user gives the same item again within this many seconds, "
        "keeping the later one (a near-duplicate would show the target's own item and rating "
        "in its history); 0 keeps them",
    )
    parser.add_argument(
        "--synthetic-seed", type=int, default=0, help="generator seed of the synthetic dataset (default 0)"
    )
    parser.add_argument(
        "--no-download", action="store_true", help="never download; fail if the raw files are missing"
    )
    parser.add_argument(
        "--history-column",
        default="none",
        choices=("none", "capped", "full"),
        help="also write a flat per-sample `history` list column: none (default; every rellax-fast "
        "command reads the packed sequences), capped (the last --max-history items), full "
        "(every earlier rating: grows with the square of history length, small data only)",
    )
    parser.add_argument(
        "--max-history", type=int, default=50, help="length cap of --history-column capped (default 50)"
    )


def run(args: argparse.Namespace) -> int:
    import sys

    from tqdm.auto import tqdm

    from .._io import check_out_dir
    from .ctr import prepare_ctr
    from .datasets import load_dataset
    from .leakage import check_no_leakage
    from .parsing import data_warnings_to_stderr
    from .prepared import save_prepared

    history_column = getattr(args, "history_column", "none")
    if getattr(args, "repeat_window", 0) < 0:
        print(
            f"error: --repeat-window must be >= 0 (0 keeps near-repeats); got {args.repeat_window}",
            file=sys.stderr,
        )
        return 2
    if history_column == "capped" and args.max_history < 1:
        print(f"error: --max-history must be >= 1; got {args.max_history}", file=sys.stderr)
        return 2
    try:
        out = check_out_dir(args.out)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    steps = tqdm(total=3, desc=f"prepare {args.dataset}", unit="step")
    try:
        with data_warnings_to_stderr():  # what the loader fixed or found suspicious, one line each
            steps.set_postfix_str("load")
            kwargs = {"seed": args.synthetic_seed} if args.dataset == "synthetic" else {}
            ds = load_dataset(args.dataset, args.data_dir, download=not args.no_download, **kwargs)
            steps.update()
            steps.set_postfix_str("split")
            data = prepare_ctr(
                ds,
                seed=args.seed,
                min_history=args.min_history,
                repeat_window=getattr(args, "repeat_window", 60),
            )
        check_no_leakage(data)  # no history holds its own target or a later event
        steps.update()
        steps.set_postfix_str("write")
        save_prepared(
            data, out, history_column=history_column, max_history=getattr(args, "max_history", None)
        )
        steps.update()
    finally:  # a missing dataset, a bad row or a checksum mismatch goes on to rellax_fast.cli: one line, exit 2
        steps.close()
    m = data.meta
    print(f"{ds!r}")
    print(f"rules: {m['rules']}")
    print(f"{'split':<6} {'samples':>9} {'positive':>9} {'mean history':>13}")
    for name, s in m["splits"].items():
        print(f"{name:<6} {s['n']:>9,} {s['positive_rate']:>9.3f} {s['mean_history']:>13.1f}")
    print(f"wrote {', '.join(f'{k}.parquet' for k in m['splits'])} and meta.json to {out}")
    return 0
