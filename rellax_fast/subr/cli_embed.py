"""`rellax-fast embed`: encode every item's text into (cached) embeddings and summarise.

Writes ``<out>/embeddings/<dataset>__<encoder>__<kind>__<options>.npy`` and its ``.json`` metadata (see
:mod:`rellax_fast.subr.cache`); an up-to-date entry is reused, a stale or corrupt one rebuilt.
Under ``torchrun`` / ``accelerate launch`` each process encodes a contiguous item range and writes it as a
shard; rank 0 merges them and writes the cache entry (:func:`rellax_fast.subr.embed.sharded_cached_embeddings`).
``--dataset``, ``--data-dir`` and ``--out`` are added by :mod:`rellax_fast.cli`. Nothing heavy is
imported at module level.
"""

from __future__ import annotations

import argparse

from .embed import add_encoder_arguments, embed_items, load_raw_dataset


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_encoder_arguments(parser)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    # a missing dataset, a bad row or option: errors rellax_fast.cli prints as one line (exit 2)
    dataset = load_raw_dataset(args)
    result = embed_items(args, dataset)
    from rellax_fast.distributed import is_main

    if not is_main():  # under a launcher rank 0 reports
        return 0
    emb = result.embeddings
    norms = np.linalg.norm(emb, axis=1)
    enc = result.key["encoder"]
    print(f"dataset   {dataset.name} ({dataset.domain}): {emb.shape[0]:,} items")
    print(f"encoder   {enc['name']} [{enc['kind']}], config {enc['config_hash'][:12]}")
    print(
        f"options   pca={result.key['pca_dims']} normalize={result.key['normalize']} "
        f"templates v{result.key['template_version']}"
    )
    print(
        f"cache     {result.status}{' (' + result.reason + ')' if result.reason and result.status != 'built' else ''}"
        f" in {result.seconds:.1f} s"
    )
    print(
        f"array     {emb.shape[0]} x {emb.shape[1]} {emb.dtype}, norm mean {norms.mean():.3f} "
        f"(min {norms.min():.3f}, max {norms.max():.3f})"
    )
    print(f"wrote     {result.path} and {result.path.with_suffix('.json').name}")
    return 0
