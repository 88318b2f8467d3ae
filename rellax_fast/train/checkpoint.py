"""Training checkpoints: written atomically, resumed exactly (mid-epoch included).

A checkpoint is a folder ``<run>/checkpoints/step-XXXXXXXX`` holding

* ``trainable.safetensors``: every trainable tensor of the ReLLaX wrapper (CFLoRA A/B and generators,
  SPA projector, verbaliser bias), by parameter name;
* ``optimizer.pt`` / ``scheduler.pt``: their state dicts;
* ``rng.pt``: the torch (CPU and every CUDA device), numpy and Python RNG states;
* ``state.json``: the sample cursor (epoch, step within the epoch, global step) and the loss history.

It is written into a temporary sibling folder, fsynced, renamed into place with ``os.replace`` and only
then published by atomically rewriting ``<run>/checkpoints/latest``; a run killed at any point leaves
either the previous or the new checkpoint, never a torn one. Older checkpoints beyond ``keep`` are removed.

We do not use ``accelerate.Accelerator.save_state`` because it writes in place (a kill mid-write leaves a
torn folder) and does not record the position inside the epoch; the states it would save are the same.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch

LATEST = "latest"


def rng_state() -> Dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(run_dir, model, optimizer, scheduler, state: Dict, keep: int = 2) -> Path:
    """Write a checkpoint of ``model``'s trainable tensors + optimizer/scheduler/RNG + ``state``; publish it."""
    from safetensors.torch import save_file

    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{int(state['global_step']):08d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}.", suffix=".tmp"))
    try:
        tensors = {k: v.detach().contiguous().cpu() for k, v in model.trainable_state().items()}
        save_file(tensors, str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict() if scheduler is not None else {}, tmp / "scheduler.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps(state))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        final = root / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fd, ptr = tempfile.mkstemp(dir=root, prefix=".latest.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(name)
        f.flush()
        os.fsync(f.fileno())
    os.replace(ptr, root / LATEST)
    _fsync_dir(root)
    done = sorted(p for p in root.glob("step-*") if p.is_dir() and p.name != name)
    for old in done[: max(0, len(done) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir) -> Optional[Path]:
    root = Path(run_dir) / "checkpoints"
    ptr = root / LATEST
    if not ptr.exists():
        return None
    path = root / ptr.read_text().strip()
    if not (path / "state.json").exists():
        raise FileNotFoundError(f"{ptr} points to {path}, which is not a complete checkpoint")
    return path


def load_checkpoint(path, model, optimizer=None, scheduler=None, restore_rng: bool = True) -> Dict:
    """Load a checkpoint written by :func:`save_checkpoint` into ``model`` (and optimizer, scheduler, RNG)."""
    from safetensors.torch import load_file

    path = Path(path)
    tensors = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [k for k in tensors if k not in params]
    if missing:
        raise KeyError(f"{path}: checkpoint tensors not in the model: {missing[:5]} (different model options?)")
    with torch.no_grad():
        for k, v in tensors.items():
            if params[k].shape != v.shape:
                raise ValueError(f"{path}: {k} has shape {tuple(v.shape)}, the model expects {tuple(params[k].shape)}")
            params[k].copy_(v)
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
    if scheduler is not None:
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    if restore_rng:
        set_rng_state(torch.load(path / "rng.pt", weights_only=False))
    return json.loads((path / "state.json").read_text())
