"""What every variant of one ``--out`` folder shares: the prepared data, the frozen DIN (trained once per
``--out`` and reused), the SUBR item embeddings and the sampled train/valid/test sets with DIN's outputs
(:class:`rellax_fast.train.pipeline.Context`): :func:`shared_context` from prepared data and options, and
:func:`build_shared_context` from the command-line options (``train``, ``demo`` and the quality benchmarks)."""

from __future__ import annotations


def din_options_of(args) -> dict:
    """DIN's model options from the ``--din-*`` flags (``train.args.add_model_arguments``)."""
    return {
        "embed_dim": args.din_embed_dim,
        "mlp_hidden": tuple(args.din_hidden),
        "max_history": args.din_max_history,
    }


def din_train_config_of(args):
    """DIN's training options from the ``--din-epochs`` / ``--din-patience`` / ``--seed`` / ``--no-progress``
    flags (one home for ``build_shared_context`` and ``bench quality``)."""
    from ..ctr.din import DINTrainConfig

    return DINTrainConfig(
        epochs=args.din_epochs, patience=args.din_patience, seed=args.seed, progress=not args.no_progress
    )


def shared_context(data, out, cfg, din_options=None, din_train_config=None, progress: bool = True, log=print):
    """The :class:`Context` of the variants trained into ``out`` on ``data`` (a prepared ``CTRData``).

    The frozen DIN is trained into ``<out>/ctr``, or reused from there when it was trained on the same data with
    the same ``din_options`` / ``din_train_config`` (:func:`rellax_fast.ctr.store.train_or_load_ctr`); the SUBR
    item embeddings are cached in ``<out>/emb_cache`` and saved to ``<out>/subr_embeddings.npz``; ``cfg`` (a
    :class:`PipelineConfig`) chooses the train/valid/test samples. Under a launcher rank 0 trains and fills the
    caches first."""
    from pathlib import Path

    from rellax_fast.distributed import is_main, main_first

    from ..ctr.din import DINTrainConfig
    from ..ctr.store import train_or_load_ctr
    from .pipeline import build_context, item_embeddings, save_subr_embeddings

    out = Path(out)
    din_train_config = din_train_config or DINTrainConfig(progress=progress)
    # under a launcher rank 0 trains the DIN and fills the caches, the others then load them
    with main_first():
        din, vocab, report = train_or_load_ctr(data, out / "ctr", din_options, din_train_config, log=log)
        emb, ids = item_embeddings(data, out / "emb_cache", progress=progress)
    subr_path = save_subr_embeddings(out, emb, ids) if is_main() else out / "subr_embeddings.npz"
    ctx = build_context(data, din, vocab, report, cfg, emb, ids)
    # recorded in each run's rellax.json relative to the run folder (with fingerprints), so --out can move
    ctx.ctr_dir, ctx.subr_path = str(out / "ctr"), str(subr_path)
    return ctx


def build_shared_context(args, cfg, log=print):
    """:func:`shared_context` from the command-line options: ``args`` is any object with the attributes of the
    pipeline options (``train.args.add_model_arguments``) and ``dataset``, ``data_dir``, ``out``; ``cfg`` the
    :class:`PipelineConfig` (``train.args.pipeline_config``)."""
    from rellax_fast.data import load_dataset, prepare_ctr

    data = prepare_ctr(load_dataset(args.dataset, data_dir=args.data_dir), seed=getattr(args, "seed", 0))
    return shared_context(
        data,
        args.out,
        cfg,
        din_options_of(args),
        din_train_config_of(args),
        progress=not args.no_progress,
        log=log,
    )
