"""The item embeddings of a dataset under the encoder options that ``embed`` and ``retrieve`` share: the
options (:func:`add_encoder_arguments`), the dataset with its loader warnings (:func:`load_raw_dataset`) and the
cached, under a launcher sharded, embedding step (:func:`embed_items`, on :func:`sharded_cached_embeddings`).
Not a command: both command modules import it, so that neither imports the other. Nothing heavy is imported
at module level.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

from rellax_fast.distributed import (
    barrier,
    broadcast_object,
    launched,
    main_first,
    rank_world,
    read_shards,
    remove_shards,
    sharded_rows,
    write_shard,
)


def add_encoder_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by `embed` and `retrieve` (which embeds, or reuses the cache, first)."""
    parser.add_argument(
        "--encoder",
        default="default",
        help="sentence-transformers model folder, Hugging Face LM folder/name, or 'default' "
        "(offline all-MiniLM-L6-v2)",
    )
    parser.add_argument(
        "--encoder-kind",
        default="auto",
        choices=("auto", "sentence-transformers", "hf-lm"),
        help="how to load --encoder (auto: sentence-transformers folders as such, else an LM)",
    )
    parser.add_argument(
        "--pca", type=int, default=None, metavar="N", help="reduce to N dims with PCA (default: off)"
    )
    parser.add_argument("--no-normalize", action="store_true", help="skip L2 normalisation of the embeddings")
    parser.add_argument("--batch-size", type=int, default=64, help="texts per encoder forward (default 64)")
    parser.add_argument(
        "--max-length", type=int, default=None, help="token limit per text (default: encoder's)"
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument(
        "--cache-dir", default=None, help="embedding cache folder (default: <out>/embeddings)"
    )
    parser.add_argument("--rebuild", action="store_true", help="re-encode even when the cache is up to date")
    parser.add_argument("--no-download", action="store_true", help="never download the dataset")


def load_raw_dataset(args: argparse.Namespace):
    """The dataset named by the options; what the loader fixed (e.g. repeated ratings) is printed as one
    ``warning:`` line each on stderr."""
    from rellax_fast.data import load_dataset
    from rellax_fast.data.parsing import data_warnings_to_stderr

    with data_warnings_to_stderr(), main_first():  # under a launcher rank 0 downloads first
        dataset = load_dataset(args.dataset, args.data_dir, download=not args.no_download)
    return dataset


def embed_items(args: argparse.Namespace, dataset):
    """Item embeddings of ``dataset`` under the options in ``args`` (via the cache): a CacheResult."""
    from .._io import check_out_dir
    from .encoders import build_encoder, check_encoder_name, identity_for, resolve_device
    from .text import dataset_item_texts

    # the options are checked before anything is loaded or encoded (ValueError naming the option)
    resolve_device(args.device, "--device")
    check_encoder_name(args.encoder, "--encoder")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1; got {args.batch_size}")
    cache_dir = (
        check_out_dir(args.cache_dir, "--cache-dir") if args.cache_dir else Path(args.out) / "embeddings"
    )
    item_ids, texts = dataset_item_texts(dataset)
    kwargs = dict(kind=args.encoder_kind, device=args.device, max_length=args.max_length)
    local = args.encoder in (None, "", "default") or Path(args.encoder).exists()

    def load_encoder():
        try:
            return build_encoder(args.encoder, batch_size=args.batch_size, **kwargs)
        except OSError as exc:  # transformers/hub: not a model folder, or not found offline
            raise ValueError(f"--encoder {args.encoder!r}: cannot be loaded: {exc}") from exc

    # under torchrun / accelerate launch each rank encodes an item range (shards merged by rank 0)
    return sharded_cached_embeddings(
        cache_dir,
        dataset.name,
        item_ids,
        texts,
        encoder_factory=load_encoder,
        # a local model is identified from its files, so a cache hit never loads it
        identity=identity_for(args.encoder, **kwargs) if local else None,
        pca_dims=args.pca,
        normalize=not args.no_normalize,
        rebuild=args.rebuild,
    )


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
    """Encode this rank's contiguous slice of ``texts`` into its shard; after the barrier rank 0 reads, checks
    and removes every shard and returns their arrays in rank order (the other ranks: None)."""
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


def sharded_cached_embeddings(cache_dir, dataset: str, item_ids, texts, *, encoder_factory, **kwargs):
    """:func:`rellax_fast.subr.cache.cached_item_embeddings` under a launcher (``kwargs`` are its options).

    Rank 0 looks the entry up; on a miss the texts are encoded in contiguous slices by every rank (each
    writes its shard atomically under ``cache_dir``), rank 0 merges them after a barrier, post-processes and
    writes the cache entry, and the other ranks then load that entry. In one process:
    ``cached_item_embeddings`` itself.
    """
    from .cache import CacheResult, cached_item_embeddings, load_entry

    if not launched():
        return cached_item_embeddings(
            cache_dir, dataset, item_ids, texts, encoder_factory=encoder_factory, **kwargs
        )
    rank, world = rank_world()
    folder = Path(cache_dir) / f".{dataset}.encode.shards"
    if rank == 0:
        try:
            result = cached_item_embeddings(
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
    emb, ids, meta = load_entry(message[1])
    return CacheResult(emb, ids, message[2], Path(message[1]), meta.get("key", {}), message[3])
