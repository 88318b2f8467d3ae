"""The optional CTR-scoring rows of ``rellax-fast bench e2e``: samples/s of ``rellax-fast eval`` on a trained
run folder (``RELLAX_BENCH_EVAL_RUN``), its scoring part and the whole command, run in process.

This is the one bench module that calls the command line (``rellax_fast.cli.main``): what it measures is
the command a user runs.
"""

from __future__ import annotations

import os
import time
from typing import Dict, List, Tuple

from .e2e_common import row

EVAL_RUN_ENV = "RELLAX_BENCH_EVAL_RUN"
EVAL_N_ENV = "RELLAX_BENCH_EVAL_N"


def bench_ctr_scoring(run_dir: str, n: int, batch_size: int, out_dir: str) -> List[Dict[str, object]]:
    """Samples/s of ``rellax-fast eval --run run_dir --n n``: its scoring part and the whole command."""
    import torch

    from rellax_fast.cli import main as cli_main
    from rellax_fast.train import trainer

    from . import report

    timings: List[Tuple[float, int]] = []
    original = trainer.predict_proba

    def timed_predict_proba(model, dataset, *args, **kwargs):
        device = next(model.parameters()).device
        report.sync(device)
        t0 = time.perf_counter()
        probs = original(model, dataset, *args, **kwargs)
        report.sync(device)
        timings.append((time.perf_counter() - t0, len(probs)))
        return probs

    eval_out = os.path.join(out_dir, "e2e_eval")
    trainer.predict_proba = timed_predict_proba  # cli_eval imports it at call time, so it sees the wrapper
    try:
        t0 = time.perf_counter()
        rc = cli_main(
            [
                "eval",
                "--run",
                run_dir,
                "--n",
                str(n),
                "--batch-size",
                str(batch_size),
                "--no-progress",
                "--out",
                eval_out,
            ]
        )
        total_s = time.perf_counter() - t0
    finally:
        trainer.predict_proba = original
    if rc != 0 or not timings:
        raise RuntimeError(f"rellax-fast eval --run {run_dir} failed (exit status {rc})")
    score_s, n_scored = timings[-1]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    note = f"run {run_dir}; {n_scored} samples; {device}"
    return [
        row(
            "ctr-score",
            "rellax-fast eval: scoring (predict_proba)",
            batch_size,
            None,
            ms=score_s * 1e3,
            samples_per_s=n_scored / score_s,
            note=note,
        ),
        row(
            "ctr-score",
            "rellax-fast eval: whole command",
            batch_size,
            None,
            ms=total_s * 1e3,
            samples_per_s=n_scored / total_s,
            note=note + "; includes model load, DIN, retrieval, prompts",
        ),
    ]
