"""What every variant of one ``--out`` folder shares: the prepared data, the frozen DIN (trained once per
``--out`` and reused), the SUBR item embeddings and the sampled train/valid/test sets with DIN's outputs
(:class:`rellax_fast.train.pipeline.Context`). ``train``, ``demo`` and the quality benchmarks build it here."""

from __future__ import annotations


def din_options_of(args) -> dict:
    """DIN's model options from the ``--din-*`` flags (``train.args.add_model_arguments``)."""
    return {"embed_dim": args.din_embed_dim, "mlp_hidden": tuple(args.din_hidden), "max_history": args.din_max_history}


def build_shared_context(args, cfg, log=print):
    """Data, the frozen DIN (trained once per --out), SUBR embeddings and the sampled train/test sets.

    ``args``: any object with the attributes of the pipeline options (``train.args.add_model_arguments``) and
    ``dataset``, ``data_dir``, ``out``; ``cfg``: the :class:`PipelineConfig` (``train.args.pipeline_config``)."""
    from pathlib import Path

    from rellax_fast.data import load_dataset, prepare_ctr
    from rellax_fast.distributed import is_main, main_first

    from ..ctr.din import DINTrainConfig
    from ..ctr.store import train_or_load_ctr
    from .pipeline import build_context, item_embeddings, save_subr_embeddings

    out = Path(args.out)
    data = prepare_ctr(load_dataset(args.dataset, data_dir=args.data_dir), seed=getattr(args, "seed", 0))
    with main_first():  # under a launcher rank 0 trains the DIN and fills the caches, the others then load them
        din, vocab, report = train_or_load_ctr(data, out / "ctr", din_options_of(args),
                                               DINTrainConfig(epochs=args.din_epochs, patience=args.din_patience,
                                                              seed=args.seed, progress=not args.no_progress),
                                               log=log)  # fmt: skip
        emb, ids = item_embeddings(data, out / "emb_cache", progress=not args.no_progress)
    subr_path = save_subr_embeddings(out, emb, ids) if is_main() else out / "subr_embeddings.npz"
    ctx = build_context(data, din, vocab, report, cfg, emb, ids)
    # recorded in each run's rellax.json relative to the run folder (with fingerprints), so --out can move
    ctx.ctr_dir, ctx.subr_path = str(out / "ctr"), str(subr_path)
    return ctx
