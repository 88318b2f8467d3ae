"""`rellax-fast embed` and `retrieve` under ``torchrun --nproc_per_node 2`` (CPU, gloo) give the outputs of a
single-process run: each rank encodes an item range / retrieves a user range and writes its shard, rank 0
merges them and writes the results; no shard is left behind.

Embeddings: the sharded run encodes in other batches (other padding lengths), so its array matches to float
tolerance. Retrieval is then run by both on the same cached embeddings and must give identical files.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(argv):
    from rellax_fast.cli import main

    return main([str(a) for a in argv])


def _torchrun(argv, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if sys.platform.startswith("linux"):
        env.setdefault(
            "GLOO_SOCKET_IFNAME", "lo"
        )  # gloo on the loopback device: no hostname resolution needed
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    bin_dir = Path(sys.executable).parent
    cmd = [
        str(bin_dir / "torchrun"),
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        str(bin_dir / "rellax-fast"),
        *map(str, argv),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc.stdout


@pytest.fixture(scope="module")
def tiny_lm_dir(tmp_path_factory):
    from rellax_testing import save_tiny_bert

    path = tmp_path_factory.mktemp("tiny_lm")
    save_tiny_bert(path, layers=1, max_positions=64, seed=0)
    return path


def _hidden_leftovers(folder: Path):
    return sorted(p.name for p in folder.rglob(".*"))


def test_embed_and_retrieve_two_processes_match_one(tiny_lm_dir, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["--dataset", "synthetic", "--encoder", tiny_lm_dir, "--device", "cpu", "--batch-size", 96]
    assert _cli(["embed", "--out", one, *common]) == 0
    out = _torchrun(["embed", "--out", two, *common])
    assert out.count("cache     built") == 1  # rank 0 reports
    (a,) = (one / "embeddings").glob("*.npy")
    (b,) = (two / "embeddings").glob("*.npy")
    assert a.name == b.name
    ea, eb = np.load(a), np.load(b)
    assert ea.shape == eb.shape == (1700, 32)
    np.testing.assert_allclose(eb, ea, rtol=1e-4, atol=1e-5)
    assert a.with_suffix(".json").read_text().count('"item_ids"') == 1
    assert _hidden_leftovers(two) == []  # shards merged and removed, no temporaries

    # retrieval on the same cached embeddings (one's cache): identical outputs
    retrieve = [
        "retrieve",
        *common,
        "--cache-dir",
        one / "embeddings",
        "--k",
        4,
        "--splits",
        "valid,test",
        "--max-history",
        40,
    ]
    assert _cli([*retrieve, "--out", one]) == 0
    out = _torchrun([*retrieve, "--out", two])
    assert out.count("wrote valid.npz") == 1  # rank 0 merged and wrote; rank 1 only its shards
    for split in ("valid", "test"):
        with (
            np.load(one / "retrieval" / f"{split}.npz") as fa,
            np.load(two / "retrieval" / f"{split}.npz") as fb,
        ):
            assert sorted(fa.files) == sorted(fb.files)
            for key in fa.files:
                np.testing.assert_array_equal(fb[key], fa[key], err_msg=f"{split}.{key}")
            assert (fa["retrieved_pos"] >= 0).any() and (fa["pos"] > 40).any()  # long histories were windowed
    assert _hidden_leftovers(two) == []
