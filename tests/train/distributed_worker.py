"""One training + scoring run for tests/train/test_distributed.py, in one process or under torchrun:

    python distributed_worker.py MODEL_DIR OUT_DIR LOG_DIR GLOBAL_BATCH [--fsdp]
    torchrun --nproc_per_node 2 distributed_worker.py MODEL_DIR OUT_DIR LOG_DIR GLOBAL_BATCH [--fsdp]

Trains the tiny ReLLaX model of tests/train/test_resume.py (no dropout, so that the runs can agree value by
value) with a per-rank batch of GLOBAL_BATCH / world into OUT_DIR/run, scores every sample with the
(distributed) ``predict_proba`` and has rank 0 save the losses, probabilities and metrics to OUT_DIR/result.pt.
``--fsdp``: the model is sharded with torch's FSDP2 ``fully_shard`` first.
An audit hook records every file-system write each rank makes under OUT_DIR into LOG_DIR/rank-R.json, so the
test can check that only rank 0 writes.
"""

import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

WRITE_EVENTS = (
    "os.rename",
    "os.mkdir",
    "os.remove",
    "os.rmdir",
    "shutil.rmtree",
    "os.truncate",
    "os.link",
    "os.symlink",
)


def audit_writes(out_dir: str) -> list:
    """Start recording every file-system write under ``out_dir`` made by this process; returns the list."""
    writes = []

    def audit(event, args):
        path = None
        if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            mode, flags = (args[1] or ""), (args[2] or 0)
            if any(c in str(mode) for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                path = args[0]
        elif event in WRITE_EVENTS and args and isinstance(args[0], (str, bytes, os.PathLike)):
            path = args[0]
        if path is not None and os.path.abspath(os.fsdecode(path)).startswith(out_dir):
            writes.append([event, os.fsdecode(path)])

    sys.addaudithook(audit)
    return writes


def main(argv):
    model_dir, out_dir, log_dir, global_batch = argv[0], os.path.abspath(argv[1]), argv[2], int(argv[3])
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    writes = audit_writes(out_dir)
    torch.set_num_threads(1)
    from test_resume import H, _dataset

    from rellax_fast.metrics import ctr_metrics
    from rellax_fast.train.model import ReLLaXModel, ReLLaXOptions, load_backbone
    from rellax_fast.train.trainer import TrainConfig, predict_proba, train_model

    data, collator = _dataset(model_dir, n=37)  # 37: the last global batch does not divide evenly
    torch.manual_seed(0)
    backbone, kind = load_backbone(model_dir)
    model = ReLLaXModel(
        backbone,
        kind,
        (collator.no_token_id, collator.yes_token_id),
        ReLLaXOptions(cflora={"interaction": "full", "backend": "reference", "dropout": 0.0}),
        item_table=torch.randn(20, 3, generator=torch.Generator().manual_seed(5)),
        item_ids=torch.arange(20),
        cond_dim=H,
    )
    if "--fsdp" in argv:
        from torch.distributed.fsdp import fully_shard

        from rellax_fast.distributed import state

        state()  # the gloo process group from the launcher's environment
        fully_shard(model)
    config = TrainConfig(
        epochs=2, batch_size=global_batch // world, lr=5e-3, progress=False, seed=3, save_every_steps=3
    )
    res = train_model(model, data, config, os.path.join(out_dir, "run"), log=lambda *_: None)
    probs = predict_proba(res["model"], data, batch_size=5, progress=False)
    metrics = ctr_metrics(data.labels(), probs)
    if rank == 0:
        from rellax_fast._io import atomic_path

        with atomic_path(os.path.join(out_dir, "result.pt")) as tmp:
            torch.save(
                {
                    "losses": res["losses"],
                    "probs": torch.from_numpy(np.asarray(probs)),
                    "metrics": metrics,
                    "world": world,
                },
                tmp,
            )
    os.makedirs(log_dir, exist_ok=True)
    with open(os.path.join(log_dir, f"rank-{rank}.json"), "w") as fh:
        json.dump({"rank": rank, "world": world, "writes": writes, "n_probs": len(probs)}, fh)


if __name__ == "__main__":
    from rellax_fast.distributed import shutdown

    main(sys.argv[1:])
    shutdown()  # destroy the gloo group before exit, as the CLI does (a live group can SIGABRT at exit)
