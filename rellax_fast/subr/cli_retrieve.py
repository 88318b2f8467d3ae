"""`rellax-fast retrieve`: SUBR for every sample of each split, written per split with a summary.

Steps: the CTR splits (``<prepared>`` or ``<out>`` if `rellax-fast prepare` wrote them there, else built in
memory), the item embeddings (from the cache, see `rellax-fast embed`), then for each split the top-K
retrieval (``--method op``: ``ops.semantic_topk``; ``--method global``: the faiss item-to-item ranking) and
the K positions shown to the LM in ``--mode`` order.

Output: ``<out>/retrieval/<split>.npz`` (atomic) with ``user_index``, ``pos``, ``item_id`` (the target),
``retrieved_pos`` / ``retrieved_score`` (S, K; score order; -1 / -inf padding), ``shown_pos`` /
``shown_item`` / ``shown_score`` (S, K; prompt order for the mode), and ``<out>/retrieval/summary.json``.
``--max-history W`` restricts the candidates to the W most recent behaviours before each target. Under
``torchrun`` / ``accelerate launch`` each process retrieves a contiguous user range and writes it as a shard;
rank 0 merges the shards and writes the outputs (:func:`rellax_fast.subr.retrieval.retrieve_sharded`).
Every split is computed and written to a temporary file first; the files are renamed into place only when
all splits succeeded, and an empty split or an invalid ``--limit`` is an error: earlier results are never
replaced by empty or partial ones.
``--dataset``, ``--data-dir`` and ``--out`` are added by :mod:`rellax_fast.cli`. Nothing heavy is imported at
module level.
"""

from __future__ import annotations

import argparse
import os
from typing import Optional

from ..ops._backend import BACKENDS, PREFILTERS
from .embed import add_encoder_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--k", type=int, default=5, help="behaviours shown per sample (default 5)")
    parser.add_argument(
        "--mode",
        default="sequential",
        choices=("recent", "sequential", "high", "low"),
        help="prompt order: recent (no SUBR), sequential (top-K in time order; default), "
        "high / low (by similarity)",
    )
    parser.add_argument(
        "--method",
        default="op",
        choices=("op", "global"),
        help="op: per-sample fused top-k (default); global: faiss item-to-item ranking",
    )
    parser.add_argument(
        "--backend",
        default=None,
        choices=BACKENDS,
        help="force a semantic_topk backend (default: the fastest available)",
    )
    parser.add_argument(
        "--prefilter",
        default=None,
        choices=PREFILTERS,
        help="bf16: score in bfloat16 and rescore in float64 only what a certified error bound keeps (the "
        "exact float64 result; takes no --backend)",
    )
    parser.add_argument(
        "--metric",
        default="cosine",
        choices=("cosine", "dot"),
        help="similarity of the target's and the history's item embeddings",
    )
    parser.add_argument(
        "--max-history",
        type=int,
        default=None,
        metavar="W",
        help="only the W most recent behaviours before each target are candidates (lifelong "
        "histories; --method op; default: the whole history)",
    )
    parser.add_argument("--splits", default="train,valid,test", help="comma-separated splits (default: all)")
    parser.add_argument(
        "--limit", type=int, default=None, help="only the first N (>= 1) samples of each split"
    )
    parser.add_argument(
        "--prepared",
        default=None,
        help="folder written by `rellax-fast prepare` (default: --out if it holds meta.json)",
    )
    parser.add_argument(
        "--seed", type=int, default=42, help="split seed when preparing in memory (default 42)"
    )
    add_encoder_arguments(parser)


def _shown_scores(emb, rows, offsets, split, shown, metric):
    """Similarity of each shown behaviour to its target (float32, -inf at padding), without a Python loop."""
    import numpy as np

    from .encoders import normalize_rows

    e = emb.astype(np.float32, copy=False)
    if metric == "cosine":
        e = normalize_rows(e)
    start = offsets[split.user_index]
    target = rows[start + split.pos]
    flat = np.where(shown >= 0, start[:, None] + shown, 0)
    scores = np.einsum("skd,sd->sk", e[rows[flat]], e[target])
    return np.where(shown >= 0, scores, -np.inf).astype(np.float32)


def run(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    from rellax_fast.distributed import is_main

    from .encoders import resolve_device
    from .retrieval import item_rows

    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    error = _option_error(args, splits)
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    out = Path(args.out)
    loaded = _load_inputs(args, out, splits)
    if isinstance(loaded, int):
        return loaded
    data, emb_result = loaded
    rows = item_rows(data.sequences.items, emb_result.item_ids)
    device = resolve_device(args.device)
    dest = out / "retrieval"
    summary = {
        "dataset": args.dataset,
        "k": args.k,
        "mode": args.mode,
        "method": args.method,
        "metric": args.metric,
        "backend": args.backend or "auto",
        "prefilter": args.prefilter,
        "embeddings": str(emb_result.path),
        "splits": {},
        "max_history": getattr(args, "max_history", None),
    }
    try:
        kept = kept_splits(dest, summary, splits)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    dest.mkdir(parents=True, exist_ok=True)
    emb = emb_result.embeddings
    print(
        f"embeddings {emb.shape[0]:,} x {emb.shape[1]} ({emb_result.status}); k={args.k} mode={args.mode} "
        f"method={args.method}"
    )
    header = f"{'split':<6} {'samples':>9} {'seconds':>8} {'samples/s':>11} {'padded':>7} {'mean score':>11} {'shown sim':>10}"
    lines = [header]
    status = _retrieve_and_publish(args, data, splits, emb_result, rows, device, dest, summary, lines)
    if status or not is_main():  # an error; or, under a launcher, a rank whose shards rank 0 has merged
        return status
    _write_summary(dest, summary, kept, splits, lines)
    return 0


def _option_error(args: argparse.Namespace, splits) -> Optional[str]:
    """The first problem with the options that no data is needed to see, or None."""
    if args.k < 1:
        return f"--k must be >= 1; got {args.k}"
    if args.limit is not None and args.limit < 1:
        return f"--limit must be >= 1 (leave it out for every sample); got {args.limit}"
    max_history = getattr(args, "max_history", None)
    if max_history is not None and (max_history < 1 or args.method != "op"):
        return (
            f"--max-history must be >= 1 and needs --method op; got {max_history} with --method {args.method}"
        )
    if args.prefilter is not None and (args.backend is not None or args.method != "op"):
        return (
            f"--prefilter {args.prefilter} needs --method op and no --backend (it runs on torch GEMMs); got "
            f"--method {args.method} --backend {args.backend}"
        )
    if not splits:
        return f"--splits: no split named in {args.splits!r}"
    return None


def _load_inputs(args: argparse.Namespace, out, splits):
    """(the CTR data, the item embeddings' CacheResult), or the exit code after an ``error:`` line. The data are
    ``--prepared``, else ``out`` when `prepare` wrote there, else prepared in memory."""
    import sys
    from pathlib import Path

    from rellax_fast.data import load_prepared, prepare_ctr
    from rellax_fast.data.prepared import DATA_FILES

    from .embed import embed_items, load_raw_dataset

    # a folder with prepared files but no meta.json is an interrupted `prepare`: load_prepared says so
    written = (out / "meta.json").exists() or any((out / f).exists() for f in DATA_FILES[:3])
    prepared = Path(args.prepared) if args.prepared else (out if written else None)
    if prepared is not None:
        data = load_prepared(prepared)
        if data.dataset.name != args.dataset:
            print(
                f"error: {prepared} holds {data.dataset.name!r}, not --dataset {args.dataset!r}",
                file=sys.stderr,
            )
            return 2
        dataset = data.dataset
    else:
        dataset = load_raw_dataset(args)
        data = prepare_ctr(dataset, seed=args.seed)
    unknown = [s for s in splits if s not in data.splits]
    if unknown:
        print(f"error: --splits: unknown {unknown}; available {list(data.splits)}", file=sys.stderr)
        return 2
    empty = [s for s in splits if len(data.splits[s]) == 0]
    if empty:
        print(f"error: split(s) {empty} hold no samples; nothing written", file=sys.stderr)
        return 2
    return data, embed_items(args, dataset)


def _retrieve_and_publish(args, data, splits, emb_result, rows, device, dest, summary, lines) -> int:
    """Retrieve every split into a temporary file, then (rank 0) rename them all into place: 0, or an exit code
    with nothing published."""
    from rellax_fast.distributed import is_main

    pending = {}  # split -> temp file, renamed into place once every split succeeded
    try:
        status = _retrieve_splits(args, data, splits, emb_result, rows, device, dest, summary, lines, pending)
        if status or not is_main():  # under a launcher: this rank's shards are written, rank 0 merges
            return status
        for name, tmp in pending.items():
            os.replace(tmp, dest / f"{name}.npz")
        pending.clear()
    finally:
        for tmp in pending.values():
            tmp.unlink(missing_ok=True)
    return 0


def _write_summary(dest, summary: dict, kept: dict, splits, lines) -> None:
    """summary.json (every split on disk, all retrieved with these settings) and the printed table."""
    import json

    from .._io import atomic_write

    summary["splits"] = {**kept, **summary["splits"]}
    payload = (json.dumps(summary, indent=2) + "\n").encode()
    atomic_write(dest / "summary.json", lambda fh: fh.write(payload))
    print("\n".join(lines))
    print(
        "padded: share of the K shown slots left empty (short histories); mean score: retrieved top-K "
        "similarity (recent: of the shown items); shown sim: similarity of shown items to the target"
    )
    print(f"wrote {', '.join(f'{s}.npz' for s in splits)} and summary.json to {dest}")


# what the files of one retrieval folder must share: a split retrieved with other settings contradicts the rest
SHARED_SETTINGS = ("dataset", "k", "mode", "method", "metric", "max_history", "embeddings")


def kept_splits(dest, summary: dict, splits) -> dict:
    """The entries of ``dest/summary.json`` for the splits this run does not rewrite (their files stay), so that
    the new summary describes every split on disk. A partial rerun (``--splits train``) into a folder whose
    other splits were retrieved with other settings (``--k``, ``--mode``, the encoder, ...) would leave it
    contradicting itself: refused with a ValueError naming each setting."""
    import json
    from pathlib import Path

    path = Path(dest) / "summary.json"
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
        entries = old["splits"]
    except (OSError, ValueError, KeyError, TypeError):  # no summary yet (or unreadable): nothing to keep
        return {}
    others = [s for s in entries if s not in splits and (Path(dest) / f"{s}.npz").exists()]
    if not others:
        return {}
    differ = [f"{k} {old.get(k)!r} -> {summary[k]!r}" for k in SHARED_SETTINGS if old.get(k) != summary[k]]
    if differ:
        raise ValueError(
            f"--splits {','.join(splits)}: {dest} also holds {', '.join(others)}, retrieved with other settings "
            f"({'; '.join(differ)}); a partial rerun would leave the folder contradicting itself: retrieve every "
            f"split (--splits {','.join([*splits, *others])}) or write to another --out"
        )
    return {s: entries[s] for s in others}


def _retrieve_splits(args, data, splits, emb_result, rows, device, dest, summary, lines, pending):
    """Retrieve every split into a temporary ``.npz`` in ``dest`` (recorded in ``pending``); 0, or an exit code."""
    import sys
    import time

    import numpy as np

    from rellax_fast.distributed import is_main, shard_folder
    from rellax_fast.ops import BackendUnavailableError

    from .retrieval import shown_positions

    emb = emb_result.embeddings
    offsets = data.sequences.offsets.astype(np.int64)
    for name in splits:
        split = data.splits[name]
        if args.limit is not None:
            split = split.subset(np.arange(min(args.limit, len(split))))
        if len(split) == 0:  # never replace earlier results with an empty file
            print(f"error: {name}: no samples to retrieve; nothing written", file=sys.stderr)
            return 2
        start = time.perf_counter()
        try:
            retrieved = _top_k(
                args, data, split, emb, emb_result, device, shard_folder(dest / name, "retrieve")
            )
        except (
            BackendUnavailableError,
            ValueError,
        ) as exc:  # a forced backend, k, the embeddings: the user's
            raise ValueError(f"{name}: {exc}") from exc  # rellax_fast.cli prints it as one line, exit 2
        if retrieved is None or not is_main():  # under a launcher only rank 0 goes on
            continue
        retrieved_pos, retrieved_score = retrieved
        shown = shown_positions(data.sequences, split, args.k, args.mode, retrieved_pos, retrieved_score)
        shown_score = _shown_scores(emb, rows, offsets, split, shown, args.metric)
        seconds = time.perf_counter() - start  # retrieval + ordering + scoring of the shown items
        flat = np.where(shown >= 0, offsets[split.user_index][:, None] + shown, 0)
        arrays = dict(
            user_index=split.user_index,
            pos=split.pos,
            item_id=split.item_id,
            shown_pos=shown,
            shown_item=np.where(shown >= 0, data.sequences.items[flat], -1),
            shown_score=shown_score,
        )
        if retrieved_pos is not None:
            arrays.update(retrieved_pos=retrieved_pos, retrieved_score=retrieved_score)
        pending[name] = _write_temp_npz(dest / f"{name}.npz", arrays)
        ref_scores = retrieved_score if retrieved_score is not None else shown_score
        stats = _split_stats(len(split), seconds, shown, shown_score, ref_scores, dest / f"{name}.npz")
        summary["splits"][name] = stats
        fmt = lambda v: "-" if v is None else f"{v:.4f}"
        lines.append(
            f"{name:<6} {len(split):>9,} {seconds:>8.2f} {stats['samples_per_s']:>11,.0f} "
            f"{stats['fraction_padded']:>7.3f} {fmt(stats['mean_score']):>11} "
            f"{fmt(stats['mean_shown_similarity']):>10}"
        )
    return 0


def _top_k(args, data, split, emb, emb_result, device, shard_dir):
    """The split's retrieved (pos, score) as numpy arrays ((None, None) for ``--mode recent``); None on a rank
    other than 0 under a launcher (``--method op`` retrieves a user range there, merged on rank 0)."""
    import torch

    from rellax_fast.distributed import is_main

    from .retrieval import retrieve_global, retrieve_sharded

    if args.mode == "recent":
        return None, None
    if args.method == "op":
        result = retrieve_sharded(
            torch.from_numpy(emb),
            data.sequences,
            split,
            args.k,
            metric=args.metric,
            backend=args.backend,
            prefilter=args.prefilter,
            item_ids=emb_result.item_ids,
            device=device,
            max_history=getattr(args, "max_history", None),
            shard_dir=shard_dir,
        )
        if result is None:  # not rank 0
            return None
    elif not is_main():
        return None
    else:
        result = retrieve_global(
            emb, data.sequences, split, args.k, metric=args.metric, item_ids=emb_result.item_ids
        )
    return result[0].numpy(), result[1].numpy()


def _write_temp_npz(path, arrays: dict):
    """``arrays`` as an ``.npz`` in a fresh temporary sibling of ``path`` (recognisable, so a killed run's is
    removed by the next write; the umask's mode; fsynced); returns the temporary path."""
    import io

    import numpy as np

    from .._io import temp_path_for

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    tmp = temp_path_for(path)
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as fh:
        fh.write(buffer.getvalue())
        fh.flush()
        os.fsync(fh.fileno())
    return tmp


def _split_stats(n, seconds, shown, shown_score, ref_scores, path) -> dict:
    """One split's entry of summary.json."""
    import numpy as np

    valid = shown >= 0
    finite = np.isfinite(ref_scores)
    return {
        "samples": n,
        "seconds": seconds,
        "samples_per_s": n / seconds if seconds > 0 else float("inf"),
        "fraction_padded": float(1 - valid.mean()) if shown.size else 0.0,
        "mean_score": float(ref_scores[finite].mean()) if finite.any() else None,
        "mean_shown_similarity": float(shown_score[valid].mean()) if valid.any() else None,
        "file": str(path),
    }
