"""Training and scoring under ``torchrun`` with 2 CPU processes (gloo) reproduce the single-process run.

The same global batch (8) and seeds in one process and in two: the per-step losses, the scored
probabilities and the metrics agree to float tolerance, and only rank 0 writes files. The tolerance
(rtol 2e-4, atol 2e-5 after 10 Adam steps) covers the different float summation order of a gradient that is
all-reduced over two halves of the batch instead of summed in one pass; everything else (data order,
weighting of an uneven last batch, clipping, schedule) is the same computation.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

WORKER = Path(__file__).with_name("distributed_worker.py")
GLOBAL_BATCH = 8
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env():
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    if sys.platform.startswith("linux"):
        env.setdefault(
            "GLOO_SOCKET_IFNAME", "lo"
        )  # gloo on the loopback device: no hostname resolution needed
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "ACCELERATE_USE_FSDP"):
        env.pop(key, None)
    return env


def run_worker(model_dir, out, logs, nproc: int, *extra, timeout=240):
    torchrun = Path(sys.executable).with_name("torchrun")
    if nproc == 1:
        cmd = [sys.executable, str(WORKER)]
    else:
        env_port = launch_env()["MASTER_PORT"]
        cmd = [
            str(torchrun),
            "--nproc_per_node",
            str(nproc),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            env_port,
            str(WORKER),
        ]
    proc = subprocess.run(
        [*cmd, str(model_dir), str(out), str(logs), str(GLOBAL_BATCH), *extra],
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    result = torch.load(out / "result.pt", weights_only=False)
    ranks = [json.loads((logs / f"rank-{r}.json").read_text()) for r in range(nproc)]
    return result, ranks, out


@pytest.fixture(scope="module")
def no_dropout_bert_dir(tmp_path_factory):
    """A tiny BERT without dropout (dropout masks follow the local batch layout, so they would differ)."""
    from rellax_testing import save_tiny_bert

    path = tmp_path_factory.mktemp("tiny_bert_nodrop")
    save_tiny_bert(path, dropout=False)
    return path


@pytest.fixture(scope="module")
def single(no_dropout_bert_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    return run_worker(no_dropout_bert_dir, out / "out", out / "logs", 1)


def _check_same_run(single, dist):
    one, two = single[0], dist[0]
    assert two["world"] == 2 and one["world"] == 1
    assert len(one["losses"]) == len(two["losses"]) == 2 * int(np.ceil(37 / GLOBAL_BATCH))
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=2e-4, atol=2e-5)
    assert len(two["probs"]) == len(one["probs"]) == 37  # gather_for_metrics dropped the padding samples
    np.testing.assert_allclose(two["probs"].numpy(), one["probs"].numpy(), rtol=2e-4, atol=2e-5)
    for key in ("auc", "logloss"):
        assert abs(two["metrics"][key] - one["metrics"][key]) < 1e-4, key
    assert two["metrics"]["n"] == one["metrics"]["n"] == 37
    # the training moved the model: a run that ignored the other rank's gradients would not match this
    assert max(one["losses"]) - min(one["losses"]) > 1e-3


def _check_only_rank0_writes(dist, out: Path):
    ranks = dist[1]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["n_probs"] == 37 for r in ranks)
    assert ranks[1]["writes"] == [], ranks[1]["writes"][:5]
    written = [p for _, p in ranks[0]["writes"]]  # rank 0's writes were seen: the hook works
    assert any(Path(p).name.startswith(".result.pt.tmp") for p in written)
    assert any("checkpoints" in Path(p).parts for p in written)
    ckpts = sorted(p.name for p in (out / "run" / "checkpoints").iterdir())
    assert ckpts == ["latest", "step-00000009", "step-00000010"], ckpts  # keep=2; no temporaries left


def test_ddp_two_processes_reproduce_single_process(no_dropout_bert_dir, single, tmp_path):
    dist = run_worker(no_dropout_bert_dir, tmp_path / "out", tmp_path / "logs", 2)
    _check_same_run(single, dist)
    _check_only_rank0_writes(dist, tmp_path / "out")


def test_fsdp2_fully_shard_two_processes_reproduce_single_process(no_dropout_bert_dir, single, tmp_path):
    dist = run_worker(no_dropout_bert_dir, tmp_path / "out", tmp_path / "logs", 2, "--fsdp")
    _check_same_run(single, dist)
    _check_only_rank0_writes(dist, tmp_path / "out")
    from safetensors.torch import load_file

    # the checkpoint holds the gathered full tensors, as a single-process checkpoint does
    name = Path("run", "checkpoints", "step-00000010", "trainable.safetensors")
    full, ref = load_file(str(tmp_path / "out" / name)), load_file(str(single[2] / name))
    assert set(full) == set(ref) and len(ref) > 0
    for key, value in ref.items():
        torch.testing.assert_close(full[key], value, rtol=2e-4, atol=2e-5, msg=key)


PIPELINE_WORKER = Path(__file__).with_name("pipeline_worker.py")


def test_pipeline_variant_two_processes_match_one_and_only_rank0_writes(
    no_dropout_bert_dir, ml100k_slice, ml100k, tmp_path
):
    """`run_variant` (what `rellax-fast train` runs after its shared context) under torchrun: the run folder's
    losses, test predictions and metrics are the single-process ones, and rank 1 writes nothing there."""
    from rellax_fast.ctr.din import DINTrainConfig
    from rellax_fast.ctr.store import fit_din, save_ctr
    from rellax_fast.train.pipeline import save_subr_embeddings

    data = ml100k_slice
    din, report, vocab = fit_din(
        data,
        {"embed_dim": 8, "mlp_hidden": (16, 8), "max_history": 20, "attention_hidden": 8},
        DINTrainConfig(epochs=1, progress=False),
    )
    ctr_dir = save_ctr(din, vocab, report, tmp_path / "ctr", extra={"dataset": data.dataset.name})
    ids = list(data.dataset.items.index)
    emb = np.random.default_rng(0).standard_normal((len(ids), 24)).astype(np.float32)
    npz = save_subr_embeddings(tmp_path, emb, ids)
    runs = {}
    for nproc in (1, 2):
        run, logs = tmp_path / f"run{nproc}", tmp_path / f"logs{nproc}"
        args = [str(no_dropout_bert_dir), str(ml100k), str(ctr_dir), str(npz), str(run), str(logs)]
        if nproc == 1:
            cmd = [sys.executable, str(PIPELINE_WORKER), *args]
        else:
            cmd = [
                str(Path(sys.executable).with_name("torchrun")),
                "--nproc_per_node",
                "2",
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                str(free_port()),
                str(PIPELINE_WORKER),
                *args,
            ]
        proc = subprocess.run(cmd, env=launch_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
        runs[nproc] = (run, [json.loads((logs / f"rank-{r}.json").read_text()) for r in range(nproc)])
    (one, _), (two, ranks) = runs[1], runs[2]
    loss1, loss2 = (json.loads((r / "loss.json").read_text())["losses"] for r in (one, two))
    assert len(loss1) == len(loss2) == 5  # ceil(37 / 8)
    np.testing.assert_allclose(loss2, loss1, rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(
        np.load(two / "predictions.npy"), np.load(one / "predictions.npy"), rtol=2e-4, atol=2e-5
    )
    m1, m2 = (json.loads((r / "metrics.json").read_text()) for r in (one, two))
    assert (
        m1["n"] == m2["n"] == 45
        and abs(m1["auc"] - m2["auc"]) < 1e-4
        and abs(m1["logloss"] - m2["logloss"]) < 1e-4
    )
    assert ranks[1]["metrics"]["n"] == 45  # every rank got the gathered predictions
    assert ranks[1]["writes"] == [], ranks[1]["writes"][:5]
    assert any(Path(p).name.startswith(".metrics.json.tmp") for _, p in ranks[0]["writes"])
    assert sorted(p.name for p in one.iterdir()) == sorted(p.name for p in two.iterdir())


def test_fsdp_resume_is_refused_with_a_clear_error(tiny_bert_dir, tmp_path, one_rank_gloo):
    """One-rank gloo group in this process: a fully_shard model trains and checkpoints (gathered full tensors),
    and resuming it under FSDP is refused rather than loading a full optimizer state into sharded ones."""
    from safetensors.torch import load_file
    from test_resume import _config, _dataset, _model
    from torch.distributed.fsdp import fully_shard

    from rellax_fast.train.trainer import train_model

    data, collator = _dataset(tiny_bert_dir, n=8)
    model = _model(tiny_bert_dir, collator, 0)
    fully_shard(model)
    config = _config(save_every_steps=1)
    train_model(model, data, config, tmp_path / "run", log=lambda *_: None)
    saved = load_file(str(tmp_path / "run" / "checkpoints" / "step-00000002" / "trainable.safetensors"))
    assert saved and all(not hasattr(v, "device_mesh") for v in saved.values())
    with pytest.raises(NotImplementedError, match="resuming under FSDP is not supported"):
        train_model(model, data, config, tmp_path / "run", resume=True, log=lambda *_: None)
