"""The item embeddings of a dataset under the encoder options that ``embed`` and ``retrieve`` share: the
options (:func:`add_encoder_arguments`), the dataset with its loader warnings (:func:`load_raw_dataset`) and the
cached, under a launcher sharded, embedding step (:func:`embed_items`). Not a command: both command modules
import it, so that neither imports the other. Nothing heavy is imported at module level.
"""

from __future__ import annotations

import argparse


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
    from rellax_fast.distributed import main_first

    with data_warnings_to_stderr(), main_first():  # under a launcher rank 0 downloads first
        dataset = load_dataset(args.dataset, args.data_dir, download=not args.no_download)
    return dataset


def embed_items(args: argparse.Namespace, dataset):
    """Item embeddings of ``dataset`` under the options in ``args`` (via the cache): a CacheResult."""
    from pathlib import Path

    from .._io import check_out_dir
    from .cache import cached_item_embeddings
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

    from rellax_fast.distributed import sharded_cached_embeddings

    # under torchrun / accelerate launch each rank encodes an item range (shards merged by rank 0)
    return sharded_cached_embeddings(
        cached_item_embeddings,
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
