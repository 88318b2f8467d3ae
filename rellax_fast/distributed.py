"""Runs under ``torchrun`` / ``accelerate launch``: the rank and world, contiguous shards, and shard files
written by every rank and merged by rank 0.

Used by `rellax-fast embed` and `retrieve` (each rank encodes an item range / retrieves a user range, writes
its shard atomically, and rank 0 merges after a ``torch.distributed`` barrier) and by the trainer (rank-0
writes). In a single process (no launcher) every helper is a no-op: rank 0 of a world of 1.

The process group comes from accelerate's :class:`~accelerate.PartialState` (gloo on CPU, NCCL on GPUs;
``cpu=True`` where there is no CUDA, without which accelerate 1.15 treats a CPU torchrun as one process),
which reads the launcher's environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``); nothing
here starts processes of its own. Nothing heavy is imported at module level.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple


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


class ShardedEncoder:
    """An encoder wrapper for `embed` under a launcher (on rank 0): ``encode(texts)`` tells the other ranks
    to encode, encodes rank 0's contiguous slice of ``texts``, writes it as a shard, waits for every rank's
    shard (barrier) and returns the merged array. The other ranks take part in
    :func:`sharded_cached_embeddings`."""

    def __init__(self, encoder, folder):
        self.encoder, self.folder = encoder, Path(folder)

    def identity(self):
        return self.encoder.identity()

    def encode(self, texts: Sequence[str], show_progress: Optional[bool] = None):
        import numpy as np

        rank, world = rank_world()
        broadcast_object(("encode", len(texts)))  # wake the other ranks
        return np.concatenate(_encode_my_slice(self.encoder, texts, self.folder, rank, world, show_progress))


def _encode_my_slice(encoder, texts, folder, rank, world, show_progress=None):
    import numpy as np

    lo, hi = sharded_rows(len(texts), rank, world)
    emb = np.asarray(encoder.encode(list(texts[lo:hi]), show_progress=show_progress), dtype=np.float32)
    write_shard(folder, rank, world, {"emb": emb, "lo": np.int64(lo), "hi": np.int64(hi)})
    barrier()  # every shard is written
    if rank != 0:
        return None
    shards = read_shards(folder, world)
    remove_shards(folder)
    if [(int(s["lo"]), int(s["hi"])) for s in shards] != [
        sharded_rows(len(texts), r, world) for r in range(world)
    ]:
        raise RuntimeError(f"{folder}: the shards do not tile the {len(texts)} texts")
    return [s["emb"] for s in shards]


def sharded_cached_embeddings(
    cache_fn, cache_dir, dataset: str, item_ids, texts, *, encoder_factory, **kwargs
):
    """``cache_fn`` (:func:`rellax_fast.subr.cache.cached_item_embeddings`) under a launcher.

    Rank 0 looks the entry up; on a miss the texts are encoded in contiguous slices by every rank (each
    writes its shard atomically under ``cache_dir``), rank 0 merges them after a barrier, post-processes and
    writes the cache entry, and the other ranks then load that entry. In one process: ``cache_fn`` itself.
    """
    if not launched():
        return cache_fn(cache_dir, dataset, item_ids, texts, encoder_factory=encoder_factory, **kwargs)
    rank, world = rank_world()
    folder = Path(cache_dir) / f".{dataset}.encode.shards"
    if rank == 0:
        try:
            result = cache_fn(
                cache_dir,
                dataset,
                item_ids,
                texts,
                encoder_factory=lambda: ShardedEncoder(encoder_factory(), folder),
                **kwargs,
            )
        except BaseException as exc:
            broadcast_object(("error", f"{type(exc).__name__}: {exc}"))
            raise
        broadcast_object(("done", str(result.path), result.status, result.reason))
        return result
    message = broadcast_object(None)
    while message[0] == "encode":
        _encode_my_slice(encoder_factory(), list(texts), folder, rank, world, show_progress=False)
        message = broadcast_object(None)
    if message[0] == "error":
        raise RuntimeError(f"rank 0 failed: {message[1]}")
    from .subr.cache import CacheResult, load_entry

    emb, ids, meta = load_entry(message[1])
    return CacheResult(emb, ids, message[2], Path(message[1]), meta.get("key", {}), message[3])
