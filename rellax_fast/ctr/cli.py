"""``rellax-fast train-ctr``: train the conventional CTR model (DIN) on the train split, early-stop on
valid, freeze it, and write it with its validation/test AUC and LogLoss to ``<out>/ctr``.

A DIN already in ``<out>/ctr`` is reused (by this command and by ``train``/``demo``) only when it was trained
on the same data (content fingerprint of the CTR splits) with the same model and training options; any
difference retrains it there, and the log names what changed. Runs record the fingerprint of the DIN they
used, so ``eval`` refuses a run whose DIN has been retrained since. The work is
:func:`rellax_fast.ctr.store.train_or_load_ctr`; this module only parses and checks the options."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .._argtypes import number

    g = parser.add_argument_group("DIN")
    g.add_argument("--epochs", type=int, default=12, help="maximum epochs (early stopping on valid AUC)")
    g.add_argument("--patience", type=int, default=2, help="epochs without valid-AUC gain before stopping")
    g.add_argument("--batch-size", type=int, default=1024, help="samples per training step")
    g.add_argument("--lr", type=number(0, low_open=True), default=2e-3, help="learning rate (Adam)")
    g.add_argument("--embed-dim", type=int, default=32, help="item embedding size (the SPA input)")
    g.add_argument(
        "--hidden", type=int, nargs="+", default=[128, 64], help="MLP widths; the last is the size of h"
    )
    g.add_argument("--max-history", type=int, default=50, help="most recent behaviours DIN attends over")
    g.add_argument("--seed", type=int, default=0, help="seed of the initialisation and the batch order")
    g.add_argument("--no-progress", action="store_true", help="no progress bars or per-epoch lines")


def din_options(args) -> dict:
    return {"embed_dim": args.embed_dim, "mlp_hidden": tuple(args.hidden), "max_history": args.max_history}


def din_train_config(args):
    from .din import DINTrainConfig

    return DINTrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        patience=args.patience,
        seed=args.seed,
        progress=not args.no_progress,
    )


def load_ctr_data(args):
    """Load ``--dataset`` from ``--data-dir`` and build the paper's CTR splits."""
    from rellax_fast.data import load_dataset, prepare_ctr

    ds = load_dataset(args.dataset, data_dir=args.data_dir)
    return prepare_ctr(ds, seed=getattr(args, "seed", 0))


def run(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    for flag, value, low in (
        ("--epochs", args.epochs, 1),
        ("--patience", args.patience, 0),
        ("--batch-size", args.batch_size, 1),
        ("--embed-dim", args.embed_dim, 1),
        ("--max-history", args.max_history, 1),
        ("--hidden", min(args.hidden), 1),
    ):
        if value < low:
            print(f"error: {flag} must be >= {low}; got {value}", file=sys.stderr)
            return 2
    from .store import train_or_load_ctr

    # bad data (DataFormatError naming the file and line), a one-class split or a diverging run raise before
    # anything is written; rellax_fast.cli prints them as one error line
    data = load_ctr_data(args)
    out = Path(args.out) / "ctr"
    model, vocab, report = train_or_load_ctr(data, out, din_options(args), din_train_config(args))
    print(
        f"DIN (best epoch {report.best_epoch}): valid AUC {report.valid['auc']:.4f} LogLoss {report.valid['logloss']:.4f}; "
        f"test AUC {report.test['auc']:.4f} LogLoss {report.test['logloss']:.4f}"
    )
    print(f"wrote {out}/din.safetensors, din.json, item_ids.npy, metrics.json")
    return 0
