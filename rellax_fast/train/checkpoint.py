"""Training checkpoints: written atomically, resumed exactly (mid-epoch included).

A checkpoint is a folder ``<run>/checkpoints/step-XXXXXXXX`` holding

* ``trainable.safetensors``: every trainable tensor of the ReLLaX wrapper (CFLoRA A/B and generators,
  SPA projector, verbaliser bias), by parameter name;
* ``optimizer.pt`` / ``scheduler.pt``: their state dicts (tensors, numbers, strings and plain containers);
* ``rng.safetensors`` + ``rng.json``: the torch (CPU and every CUDA device), numpy and Python RNG states;
* ``state.json``: the sample cursor (epoch, step within the epoch, global step) and the loss history.

Loading never runs code from the files: safetensors and JSON hold only data, and the two ``.pt`` files are
read with ``torch.load(weights_only=True)``, which refuses any pickled object other than tensors, numbers,
strings and plain containers (a crafted file raises :class:`UnsafeCheckpointError` naming it). A legacy
``rng.pt`` (older checkpoints) is read the same way, with only numpy's ndarray/uint32 dtype allowed besides.

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
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch

from .._io import PathOutsideFolderError, atomic_write_text, fsync_dir, make_temp_dir, path_inside

LATEST = "latest"


class UnsafeCheckpointError(ValueError):
    """A checkpoint file holds something other than plain data (tampered with, or not written by us)."""


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


def _save_rng(folder: Path, state: Dict) -> None:
    """The RNG states as data only: byte tensors in ``rng.safetensors``, numbers in ``rng.json``."""
    from safetensors.torch import save

    kind, key, pos, has_gauss, cached_gaussian = state["numpy"]
    version, mt, gauss_next = state["python"]
    tensors = {"torch": state["torch"].contiguous(), "numpy_key": torch.from_numpy(np.asarray(key, np.int64))}
    for i, s in enumerate(state.get("cuda", [])):
        tensors[f"cuda.{i}"] = s.cpu().contiguous()
    (folder / "rng.safetensors").write_bytes(save(tensors))
    numbers = {
        "numpy": {
            "kind": kind,
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": {"version": version, "state": list(mt), "gauss_next": gauss_next},
        "n_cuda": len(state.get("cuda", [])),
    }
    (folder / "rng.json").write_text(json.dumps(numbers))


def _load_rng(folder: Path) -> Dict:
    from safetensors.torch import load_file

    tensors_path, numbers_path = folder / "rng.safetensors", folder / "rng.json"
    try:
        tensors = load_file(str(tensors_path))
        numbers = json.loads(numbers_path.read_text())
        n, p = numbers["numpy"], numbers["python"]
        state = {
            "torch": tensors["torch"],
            "numpy": (
                n["kind"],
                tensors["numpy_key"].numpy().astype(np.uint32),
                n["pos"],
                n["has_gauss"],
                n["cached_gaussian"],
            ),
            "python": (p["version"], tuple(int(x) for x in p["state"]), p["gauss_next"]),
        }
        if numbers.get("n_cuda"):
            state["cuda"] = [tensors[f"cuda.{i}"] for i in range(numbers["n_cuda"])]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(
            f"{folder}: rng.safetensors / rng.json are unreadable or incomplete ({type(exc).__name__}: {exc})"
        ) from exc
    return state


def _safe_torch_load(path: Path, extra_globals=()):
    """``torch.load(weights_only=True)``: plain data only; anything else is refused with the file named."""
    import pickle

    try:
        if extra_globals:
            with torch.serialization.safe_globals(list(extra_globals)):
                return torch.load(path, weights_only=True, map_location="cpu")
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        lines = [x.strip() for x in str(exc).splitlines() if "GLOBAL" in x or "Unsupported" in x]
        why = lines[0] if lines else type(exc).__name__
        raise UnsafeCheckpointError(
            f"{path}: refusing to load: it holds Python objects other than tensors, numbers and plain containers "
            f"({why}). The checkpoint was not written by rellax-fast or was "
            f"tampered with; delete {path.parent} or train without --resume."
        ) from None


def _legacy_numpy_globals():
    """What a legacy ``rng.pt`` needs besides plain data: numpy's uint32 ndarray (no arbitrary callables)."""
    from numpy.core.multiarray import _reconstruct

    return [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def save_checkpoint(
    run_dir, model, optimizer, scheduler, state: Dict, keep: int = 2, best_tensors=None
) -> Path:
    """Write a checkpoint of ``model``'s trainable tensors + optimizer/scheduler/RNG + ``state``; publish it.
    ``best_tensors``: the trainable tensors of the best valid score so far (``best.safetensors``), if any."""
    from safetensors.torch import save

    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{int(state['global_step']):08d}"
    tmp = make_temp_dir(root / name)  # umask permissions; a killed writer's one is removed by the next save
    try:
        tensors = {k: v.detach().contiguous().cpu() for k, v in model.trainable_state().items()}
        (tmp / "trainable.safetensors").write_bytes(save(tensors))  # save_file would make it 0600
        if best_tensors is not None:
            (tmp / "best.safetensors").write_bytes(
                save({k: v.detach().contiguous().cpu() for k, v in best_tensors.items()})
            )
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict() if scheduler is not None else {}, tmp / "scheduler.pt")
        _save_rng(tmp, rng_state())
        (tmp / "state.json").write_text(json.dumps(state))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        final = root / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(root / LATEST, name)  # fsynced, renamed, folder fsynced
    done = sorted(p for p in root.glob("step-*") if p.is_dir() and p.name != name)
    for old in done[: max(0, len(done) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_best_tensors(path) -> Optional[Dict[str, torch.Tensor]]:
    """The best-on-valid trainable tensors a checkpoint holds (``best.safetensors``), or None."""
    from safetensors.torch import load_file

    best = Path(path) / "best.safetensors"
    return load_file(str(best)) if best.exists() else None


def latest_checkpoint(run_dir) -> Optional[Path]:
    """The checkpoint ``<run>/checkpoints/latest`` names, or None. The pointer must name a ``step-*`` folder
    directly inside ``checkpoints/`` (``../x`` or an absolute path raises :class:`PathOutsideFolderError`
    without touching the target)."""
    root = Path(run_dir) / "checkpoints"
    ptr = root / LATEST
    if not ptr.exists():
        return None
    name = ptr.read_text().strip()
    # the pointer names a checkpoint of this run: checked on its text before anything it names is opened
    path = path_inside(root, name, f"{ptr}: the latest-checkpoint pointer")
    if path.parent != root or not name.startswith("step-"):
        raise PathOutsideFolderError(
            f"{ptr}: names {name!r}, not a checkpoint folder step-XXXXXXXX of {root}; "
            "refusing to resume from it (delete the pointer, or train without --resume)"
        )
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
        raise KeyError(
            f"{path}: checkpoint tensors not in the model: {missing[:5]} (different model options?)"
        )
    with torch.no_grad():
        for k, v in tensors.items():
            if params[k].shape != v.shape:
                raise ValueError(
                    f"{path}: {k} has shape {tuple(v.shape)}, the model expects {tuple(params[k].shape)}"
                )
            params[k].copy_(v)
    if optimizer is not None:
        optimizer.load_state_dict(_safe_torch_load(path / "optimizer.pt"))
    if scheduler is not None:
        scheduler.load_state_dict(_safe_torch_load(path / "scheduler.pt"))
    if restore_rng:
        if (path / "rng.safetensors").exists():
            set_rng_state(_load_rng(path))
        else:  # a checkpoint written before rng.safetensors existed
            set_rng_state(_safe_torch_load(path / "rng.pt", _legacy_numpy_globals()))
    return json.loads((path / "state.json").read_text())
