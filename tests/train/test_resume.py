"""Resume after an interruption mid-epoch gives exactly the run that was never interrupted."""

import json

import numpy as np
import pytest
import torch

from rellax_fast.data.collate import PromptCollator, PromptSample
from rellax_fast.train.checkpoint import latest_checkpoint
from rellax_fast.train.model import ReLLaXModel, ReLLaXOptions, load_backbone
from rellax_fast.train.trainer import PromptDataset, TrainConfig, predict_proba, train_model

H = 4


def _dataset(path, n=36, seed=0):
    from transformers import AutoTokenizer

    rng = np.random.default_rng(seed)
    tok = AutoTokenizer.from_pretrained(path)
    collator = PromptCollator(tok, kind="encoder", max_length=120)
    samples = []
    for i in range(n):
        k = int(rng.integers(1, 4))
        shown = [
            (int(rng.integers(0, 20)), f"Film {int(rng.integers(0, 99))}", float(rng.integers(1, 6)))
            for _ in range(k)
        ]
        samples.append(
            PromptSample(
                "movie", None, shown, (int(rng.integers(0, 20)), "Target"), int(rng.integers(0, 2)), i
            )
        )
    cond = torch.from_numpy(rng.standard_normal((n, H)).astype(np.float32))
    return PromptDataset(samples, collator, cond), collator


def _model(path, collator, init_seed):
    """The frozen parts (backbone, DIN item table) are fixed; the trainable init depends on init_seed."""
    torch.manual_seed(init_seed)
    backbone, kind = load_backbone(path)
    return ReLLaXModel(
        backbone,
        kind,
        (collator.no_token_id, collator.yes_token_id),
        ReLLaXOptions(cflora={"interaction": "full", "backend": "reference", "dropout": 0.05}),
        item_table=torch.randn(20, 3, generator=torch.Generator().manual_seed(5)),
        item_ids=torch.arange(20),
        cond_dim=H,
    )


def _config(**kw):
    kw.setdefault("save_every_steps", 3)
    return TrainConfig(epochs=2, batch_size=8, lr=5e-3, progress=False, seed=3, **kw)


def test_resume_after_interrupt_equals_uninterrupted_run(tiny_bert_dir, tmp_path):
    data, collator = _dataset(tiny_bert_dir)
    steps = 2 * int(np.ceil(len(data) / 8))  # 10 steps over 2 epochs
    # the uninterrupted reference run
    ref = train_model(_model(tiny_bert_dir, collator, 0), data, _config(), tmp_path / "ref")
    assert ref["global_step"] == steps
    ref_state = {k: v.detach().clone() for k, v in ref["model"].trainable_state().items()}
    ref_probs = predict_proba(ref["model"], data, progress=False)

    # the interrupted run: stops after step 7 (mid second epoch; the last checkpoint is step 6)
    with pytest.raises(KeyboardInterrupt):
        train_model(_model(tiny_bert_dir, collator, 0), data, _config(stop_after_steps=7), tmp_path / "run")
    ckpt = latest_checkpoint(tmp_path / "run")
    state = json.loads((ckpt / "state.json").read_text())
    assert ckpt.name == "step-00000006" and state["epoch"] == 1 and state["step_in_epoch"] == 1

    # a fresh process would build the model with another seed: resume must not depend on it
    torch.manual_seed(999)
    res = train_model(
        _model(tiny_bert_dir, collator, 1),
        data,
        _config(),
        tmp_path / "run",
        resume=True,
        log=lambda *_: None,
    )
    assert res["resumed_from"] == 6 and res["global_step"] == steps
    assert len(res["losses"]) == steps
    np.testing.assert_allclose(res["losses"], ref["losses"], rtol=0, atol=0)
    got = res["model"].trainable_state()
    assert set(got) == set(ref_state)
    for k, v in ref_state.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=0, msg=k)
    np.testing.assert_array_equal(predict_proba(res["model"], data, progress=False), ref_probs)


def test_checkpoints_are_published_atomically_and_pruned(tiny_bert_dir, tmp_path):
    data, collator = _dataset(tiny_bert_dir, n=24)
    train_model(_model(tiny_bert_dir, collator, 0), data, _config(), tmp_path)
    root = tmp_path / "checkpoints"
    names = sorted(p.name for p in root.iterdir())
    assert names == ["latest", "step-00000003", "step-00000006"]  # keep=2, no temp leftovers
    assert (root / "latest").read_text() == "step-00000006"
    assert json.loads((root / "step-00000006" / "state.json").read_text())["epoch"] == 2
    # resuming a finished run trains nothing more
    res = train_model(
        _model(tiny_bert_dir, collator, 0), data, _config(), tmp_path, resume=True, log=lambda *_: None
    )
    assert res["resumed_from"] == 6 and res["global_step"] == 6


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_equals_uninterrupted_run(tiny_bert_dir, tmp_path):
    """A real kill: a subprocess trains (checkpoint every step), is SIGKILLed mid-epoch, and is resumed."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    worker = str(Path(__file__).with_name("resume_worker.py"))
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")])),
    )
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    # the uninterrupted reference, in this process (the worker runs exactly this)
    data, collator = _dataset(tiny_bert_dir)
    ref = train_model(_model(tiny_bert_dir, collator, 0), data, _config(save_every_steps=1), tmp_path / "ref")
    ref = {
        "losses": ref["losses"],
        "probs": predict_proba(ref["model"], data, progress=False),
        "state": {k: v.detach().clone() for k, v in ref["model"].trainable_state().items()},
    }
    proc = subprocess.Popen([sys.executable, worker, tiny_bert_dir, str(run_dir), "--slow", "0.4"], env=env)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:  # wait for a checkpoint in the first epoch's second half (step 3 of 5)
            ckpt = latest_checkpoint(run_dir)
            if ckpt is not None and json.loads((ckpt / "state.json").read_text())["global_step"] >= 3:
                break
            assert proc.poll() is None, "the worker ended before it could be killed"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    killed_at = json.loads((latest_checkpoint(run_dir) / "state.json").read_text())["global_step"]
    assert 3 <= killed_at < 10 and not (run_dir / "result.pt").exists()
    subprocess.run(
        [sys.executable, worker, tiny_bert_dir, str(run_dir), "--resume"], check=True, env=env, timeout=300
    )
    res = torch.load(run_dir / "result.pt", weights_only=False)
    assert res["resumed_from"] == killed_at
    np.testing.assert_array_equal(np.asarray(res["losses"]), np.asarray(ref["losses"]))
    for k, v in ref["state"].items():
        torch.testing.assert_close(res["state"][k], v, rtol=0, atol=0, msg=k)
    np.testing.assert_array_equal(res["probs"], ref["probs"])
