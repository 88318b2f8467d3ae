"""Resuming never executes code stored in a checkpoint (issue #13, item 1).

The optimizer/scheduler ``.pt`` files are read with ``torch.load(weights_only=True)`` and the RNG state is
safetensors + JSON; a crafted pickle in any of them is refused with an error naming the file, and its
payload (creating a marker file) never runs.
"""

import os
import random

import numpy as np
import pytest
import torch

from rellax_fast.train.checkpoint import (
    UnsafeCheckpointError,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)


class Payload:
    """Pickles to a call of os.system that would create ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class TinyModel(torch.nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(torch.randn(5, 3, generator=g))
        self.b = torch.nn.Parameter(torch.randn(5, generator=g))

    def trainable_state(self):
        return {k: v for k, v in self.named_parameters()}


def _trained(seed=0):
    model = TinyModel(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
    for _ in range(3):
        loss = (model.w.sum(0) ** 2).sum() + model.b.pow(2).sum()
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return model, opt, sched


def _save(tmp_path):
    model, opt, sched = _trained()
    torch.manual_seed(123)
    np.random.seed(5)
    random.seed(7)
    np.random.standard_normal()  # leaves a cached Gaussian in numpy's legacy state
    save_checkpoint(tmp_path, model, opt, sched, {"global_step": 3, "epoch": 0, "step_in_epoch": 3})
    return latest_checkpoint(tmp_path), model, opt, sched


def test_roundtrip_restores_weights_optimizer_scheduler_and_every_rng(tmp_path):
    ckpt, model, opt, sched = _save(tmp_path)
    assert not list(ckpt.glob("rng.pt")), "the RNG state must not be a pickle"
    expect = (torch.rand(4), np.random.standard_normal(3), random.random())
    torch.manual_seed(0), np.random.seed(0), random.seed(0)

    fresh, fresh_opt, fresh_sched = _trained(seed=1)
    state = load_checkpoint(ckpt, fresh, fresh_opt, fresh_sched)
    assert state["global_step"] == 3
    got = (torch.rand(4), np.random.standard_normal(3), random.random())
    assert torch.equal(got[0], expect[0]) and np.array_equal(got[1], expect[1]) and got[2] == expect[2]
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    for pid, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            assert torch.equal(fresh_opt.state_dict()["state"][pid][k], v), k
    assert fresh_sched.state_dict()["last_epoch"] == sched.state_dict()["last_epoch"] == 3


@pytest.mark.parametrize("victim", ["optimizer.pt", "scheduler.pt", "rng.pt"])
def test_crafted_pickle_is_refused_and_never_runs(tmp_path, victim):
    ckpt, *_ = _save(tmp_path / "run")
    marker = tmp_path / "PAYLOAD_RAN"
    if victim == "rng.pt":  # a legacy checkpoint (RNG state as a pickle) carrying the payload
        (ckpt / "rng.safetensors").unlink()
        (ckpt / "rng.json").unlink()
        torch.save({"torch": Payload(marker), "numpy": None, "python": None}, ckpt / victim)
    else:
        torch.save({"state": {}, "param_groups": [Payload(marker)]}, ckpt / victim)
    model, opt, sched = _trained(seed=1)
    with pytest.raises(UnsafeCheckpointError, match=rf"{victim}: refusing to load") as info:
        load_checkpoint(ckpt, model, opt, sched)
    assert str(ckpt / victim) in str(info.value) and "system" in str(info.value)
    assert not marker.exists(), "the pickled payload ran"
    assert isinstance(info.value, ValueError)


def test_legacy_rng_pickle_of_plain_states_still_resumes(tmp_path):
    ckpt, *_ = _save(tmp_path)
    expect = (torch.rand(2), np.random.standard_normal(2), random.random())
    torch.manual_seed(123), np.random.seed(5), random.seed(7)
    np.random.standard_normal()
    from rellax_fast.train.checkpoint import rng_state

    torch.save(rng_state(), ckpt / "rng.pt")  # what older versions wrote
    (ckpt / "rng.safetensors").unlink()
    (ckpt / "rng.json").unlink()
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    load_checkpoint(ckpt, TinyModel(1))
    got = (torch.rand(2), np.random.standard_normal(2), random.random())
    assert torch.equal(got[0], expect[0]) and np.array_equal(got[1], expect[1]) and got[2] == expect[2]


def test_truncated_rng_json_is_a_clear_error(tmp_path):
    ckpt, *_ = _save(tmp_path)
    (ckpt / "rng.json").write_text('{"numpy": ')
    with pytest.raises(ValueError, match="rng.safetensors / rng.json are unreadable"):
        load_checkpoint(ckpt, TinyModel(1))


def test_checkpoint_folder_and_files_get_the_umask_mode(tmp_path):
    old = os.umask(0o027)
    try:
        ckpt, *_ = _save(tmp_path)
    finally:
        os.umask(old)
    assert ckpt.stat().st_mode & 0o777 == 0o750
    assert {p.stat().st_mode & 0o777 for p in ckpt.iterdir()} == {0o640}
    assert (tmp_path / "checkpoints" / "latest").stat().st_mode & 0o777 == 0o640
