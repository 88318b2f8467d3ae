"""Runs under ``torchrun`` / ``accelerate launch``: the rank and world, contiguous shards, and shard files
written by every rank and merged by rank 0.

Used by `rellax-fast embed` and `retrieve` (each rank encodes an item range / retrieves a user range, writes
its shard atomically, and rank 0 merges after a ``torch.distributed`` barrier: the encoding side is
:func:`rellax_fast.subr.embed.sharded_cached_embeddings`) and by the trainer (rank-0 writes). Generic: it
imports nothing of ``rellax_fast`` but ``_io``. In a single process (no launcher) every helper is a no-op: rank 0 of a world of 1.

The process group comes from accelerate's :class:`~accelerate.PartialState` (gloo on CPU, NCCL on GPUs;
``cpu=True`` where there is no CUDA, without which accelerate 1.15 treats a CPU torchrun as one process),
which reads the launcher's environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``); nothing
here starts processes of its own. Nothing heavy is imported at module level.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, List, Sequence, Tuple


def launched() -> bool:
    """True when the launcher started more than one process (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def state():
    """accelerate's PartialState (initialises the process group under a launcher); None in one process, so
    that single-process commands never import accelerate."""
    if not launched():
        return None
    import torch
    from accelerate import PartialState

    # cpu=True on a machine without CUDA: otherwise accelerate sees no distributed setup there (one process)
    return PartialState(cpu=not torch.cuda.is_available())


def rank_world() -> Tuple[int, int]:
    s = state()
    return (0, 1) if s is None else (s.process_index, s.num_processes)


def is_main() -> bool:
    return rank_world()[0] == 0


def barrier() -> None:
    s = state()
    if s is not None:
        s.wait_for_everyone()


def broadcast_object(obj: Any = None) -> Any:
    """Rank 0's ``obj`` on every rank (``torch.distributed.broadcast_object_list``)."""
    if not launched():
        return obj
    import torch.distributed as dist

    state()
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard_bounds(weights: Sequence[float], world: int) -> List[int]:
    """``world + 1`` cut points splitting ``len(weights)`` consecutive units into contiguous ranges of about
    equal total weight (e.g. units = users, weight = their samples' candidates). Deterministic."""
    import numpy as np

    w = np.asarray(weights, dtype=np.float64)
    n = len(w)
    if world < 1:
        raise ValueError(f"world must be >= 1; got {world}")
    total = float(w.sum())
    if n == 0 or total <= 0:
        return [round(n * r / world) for r in range(world + 1)]
    cum = np.concatenate([[0.0], np.cumsum(w)])
    cuts = [0] + [int(np.searchsorted(cum, total * r / world, side="left")) for r in range(1, world)] + [n]
    return [min(max(c, 0), n) for c in np.maximum.accumulate(cuts)]


def shard_folder(base, tag: str) -> Path:
    """The folder where the ranks of one sharded job leave their shards (a hidden sibling of ``base``)."""
    base = Path(base)
    return base.parent / f".{base.name}.{tag}.shards"


def write_shard(folder, rank: int, world: int, arrays: dict) -> Path:
    """Write this rank's shard (``np.savez`` of ``arrays``) atomically; returns its path."""
    import io

    import numpy as np

    from ._io import atomic_write_bytes

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"rank-{rank:05d}-of-{world:05d}.npz"
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def read_shards(folder, world: int) -> List[dict]:
    """Every rank's shard, in rank order (rank 0, after the barrier that follows the writes)."""
    import numpy as np

    out = []
    for r in range(world):
        path = Path(folder) / f"rank-{r:05d}-of-{world:05d}.npz"
        if not path.exists():
            raise RuntimeError(f"{path}: rank {r}'s shard is missing after the barrier")
        with np.load(path, allow_pickle=False) as f:
            out.append({k: f[k] for k in f.files})
    return out


def remove_shards(folder) -> None:
    import shutil

    shutil.rmtree(folder, ignore_errors=True)


def shutdown(ok: bool = True) -> None:
    """Tear the process group down before the interpreter exits (the CLI calls this after every command).

    Without it a gloo rank can die at exit with ``terminate called without an active exception`` (SIGABRT):
    its worker threads still hold work objects while the interpreter is finalised (pytorch/pytorch#190489).
    ``ok``: the command succeeded on this rank, so a last barrier keeps one rank from tearing down while
    another is still in a collective; after a failure there is no barrier (the others may never reach it).
    A no-op in one process, and when ``torch.distributed`` was never imported or initialised.
    """
    import sys

    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return
    try:
        if ok:
            dist.barrier()
    finally:
        dist.destroy_process_group()


def sharded_rows(n: int, rank: int, world: int) -> Tuple[int, int]:
    """[lo, hi) of ``n`` rows for ``rank`` (contiguous, sizes differ by at most one)."""
    return n * rank // world, n * (rank + 1) // world


def main_first():
    """A context manager: rank 0 runs the block first (e.g. a download or a cache build), then the others."""
    s = state()
    if s is None:
        import contextlib

        return contextlib.nullcontext()
    return s.main_process_first()
