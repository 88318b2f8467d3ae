"""One `run_variant` (the `rellax-fast train` pipeline after its shared context) for
tests/train/test_distributed.py, in one process or under torchrun:

    [torchrun --nproc_per_node 2] pipeline_worker.py MODEL_DIR ML100K_DIR CTR_DIR EMB_NPZ RUN_DIR LOG_DIR

The data (MovieLens 100K's first 120 users), the frozen DIN (CTR_DIR) and the SUBR embeddings (EMB_NPZ) are
prepared once by the test; the variant is trained with a global batch of 8 (8 / world per rank), scored on
the test subsample (distributed under the launcher) and written by rank 0. An audit hook records every
file-system write each rank makes under RUN_DIR into LOG_DIR/rank-R.json.
"""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from distributed_worker import audit_writes  # noqa: E402


def main(argv):
    model_dir, ml100k, ctr_dir, emb_npz, run_dir, log_dir = argv[:6]
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    writes = audit_writes(os.path.abspath(run_dir))
    torch.set_num_threads(1)
    from rellax_fast.ctr.store import load_ctr
    from rellax_fast.data import load_dataset, prepare_ctr
    from rellax_fast.data.datasets import RecDataset
    from rellax_fast.train.pipeline import (
        PipelineConfig,
        VariantSpec,
        build_context,
        load_subr_embeddings,
        pipeline_cflora_config,
        run_variant,
    )
    from rellax_fast.train.trainer import TrainConfig

    ds = load_dataset("ml-100k", data_dir=ml100k, download=False)
    data = prepare_ctr(
        RecDataset(ds.name, ds.domain, ds.ratings[ds.ratings.user_id <= 120], ds.items, ds.users), seed=0
    )
    din, vocab, meta = load_ctr(ctr_dir)
    emb, ids = load_subr_embeddings(path=emb_npz)
    cfg = PipelineConfig(
        model=model_dir,
        k=3,
        n_train=37,
        n_test=45,
        max_length=160,
        cflora=pipeline_cflora_config(backend="reference", dropout=0.0),
        train=TrainConfig(
            batch_size=8 // world, lr=3e-3, save_every_steps=2, progress=False, eval_batch_size=4
        ),
    )
    ctx = build_context(data, din, vocab, meta.get("report"), cfg, emb, ids)
    ctx.ctr_dir, ctx.subr_path = ctr_dir, emb_npz
    res = run_variant(ctx, VariantSpec("ReLLaX (full)"), cfg, run_dir, log=lambda *_: None)
    os.makedirs(log_dir, exist_ok=True)
    with open(os.path.join(log_dir, f"rank-{rank}.json"), "w") as fh:
        json.dump({"rank": rank, "world": world, "writes": writes, "metrics": res["metrics"]}, fh)


if __name__ == "__main__":
    from rellax_fast.distributed import shutdown

    main(sys.argv[1:])
    shutdown()  # destroy the gloo group before exit, as the CLI does (a live group can SIGABRT at exit)
