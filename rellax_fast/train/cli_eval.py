"""``rellax-fast eval``: score a saved ReLLaX run on a split of its dataset, or on a JSONL file of samples.

The run folder (from ``rellax-fast train`` or ``demo``) holds ``rellax.json`` and ``trainable.safetensors``;
the backbone is reloaded from the path recorded there and the frozen DIN from the run's CTR folder. Paths
in ``rellax.json`` are relative to the run folder, so a moved or copied ``--out`` evaluates with its own
DIN; the DIN and the SUBR embeddings are checked against the fingerprints the run recorded, and a mismatch
(a retrained DIN, another pipeline's files) is an error. Eval writes only into its output folder.

JSONL input: one sample per line, ``{"user_id": 1, "item_id": 50, "history": [12, 7, ...],
"history_ratings": [4, 5, ...], "label": 1}`` (history oldest first; ``history_timestamps`` and
``label`` optional). Output: ``metrics.json`` (when labels are known) and ``predictions.jsonl`` in
``--out`` (default ``<run>/eval-<split>`` or ``<run>/eval-jsonl``), plus a Markdown line on stdout.
"""

from __future__ import annotations

import argparse


class RunDependencyError(ValueError):
    """A run's DIN folder or SUBR embeddings are missing, or are not the ones it was trained with."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="a run folder written by `rellax-fast train` or `demo`")
    parser.add_argument("--split", default="test", choices=["train", "valid", "test"])
    parser.add_argument("--n", type=int, default=None, help="samples to score (default: the run's --n-test; 0: all)")
    parser.add_argument("--jsonl", default=None, help="score the samples of this JSONL file instead of a split")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(out=None, dataset=None)


def load_run(run_dir, data=None, log=print):
    """Rebuild the trained model of ``run_dir``. Returns (model, tokenizer, kind, meta, cfg, spec, data, ctr)."""
    import json
    from pathlib import Path

    import torch
    from safetensors.torch import load_file

    from ..spa.ctr import din_fingerprint, load_ctr
    from .pipeline import (
        PipelineConfig,
        VariantSpec,
        build_rellax,
        load_tokenizer_and_backbone,
        resolve_dependency,
    )
    from .trainer import TrainConfig

    run_dir = Path(run_dir)
    if not (run_dir / "rellax.json").exists():
        raise FileNotFoundError(f"{run_dir}: no rellax.json; is this a finished run folder?")
    meta = json.loads((run_dir / "rellax.json").read_text())
    pc = dict(meta["pipeline"])
    pc["train"] = TrainConfig(**pc["train"])
    pc["model"] = meta["model"]
    cfg = PipelineConfig(**pc)
    spec = VariantSpec(**meta["variant"])
    ctr_dir = resolve_dependency(run_dir, meta, "ctr_dir")
    if ctr_dir is None or not (ctr_dir / "din.json").exists():
        raise RunDependencyError(
            f"{run_dir / 'rellax.json'}: its DIN folder {ctr_dir} (ctr_dir {meta.get('ctr_dir')!r}"
            f"{', relative to the run folder' if meta.get('paths_relative_to') == 'run' else ''}) has no din.json; "
            f"a run needs the ctr/ folder of its pipeline: move or copy the whole --out folder, not the run alone"
        )
    try:
        din, vocab, _ = load_ctr(ctr_dir)
    except ValueError as exc:
        raise RunDependencyError(str(exc)) from exc
    if meta.get("din_fingerprint") and din_fingerprint(din, vocab) != meta["din_fingerprint"]:
        raise RunDependencyError(
            f"{ctr_dir}: this DIN is not the one the run {run_dir} was trained with (retrained since, or another "
            f"pipeline's ctr/); scores would be meaningless: retrain the run (`rellax-fast train`) against this DIN"
        )
    tokenizer, backbone, kind = load_tokenizer_and_backbone(cfg.model, meta["kind"])
    saved = load_file(str(run_dir / "trainable.safetensors"))
    # the condition statistics are buffers: rebuild with placeholders, then load every saved tensor
    model = build_rellax(backbone, kind, tokenizer, spec, cfg, din, vocab,
                         (torch.zeros(din.config.h_dim), torch.ones(din.config.h_dim)))  # fmt: skip
    extra = load_file(str(run_dir / "buffers.safetensors")) if (run_dir / "buffers.safetensors").exists() else {}
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    with torch.no_grad():
        for k, v in saved.items():
            if k not in params:
                raise KeyError(f"{run_dir}: saved tensor {k} does not exist in the rebuilt model")
            params[k].copy_(v)
        for k, v in extra.items():
            buffers[k].copy_(v)
    model.eval()
    return model, tokenizer, kind, meta, cfg, spec, din, vocab


def jsonl_split(path, data):
    """A CTRData-like view and CTRSplit over the samples of a JSONL file (one pseudo-user per line)."""
    import json
    from copy import copy

    import numpy as np

    from rellax_fast.data.ctr import CTRSplit, UserSequences

    rows = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
    if not rows:
        raise ValueError(f"{path}: no samples")
    items, ratings, stamps, offsets, users, has_label, labels = [], [], [], [0], [], True, []
    for n, r in enumerate(rows, 1):
        for key in ("user_id", "item_id", "history"):
            if key not in r:
                raise ValueError(f"{path}: line {n}: missing {key!r} (need user_id, item_id, history)")
        hist = [int(i) for i in r["history"]]
        hr = r.get("history_ratings") or [0.0] * len(hist)
        if len(hr) != len(hist):
            raise ValueError(f"{path}: line {n}: history_ratings has {len(hr)} values for {len(hist)} history items")
        ts = r.get("history_timestamps") or list(range(len(hist)))
        items += hist + [int(r["item_id"])]
        ratings += [float(x) for x in hr] + [0.0]
        stamps += [int(t) for t in ts] + [int(ts[-1]) + 1 if ts else 0]
        offsets.append(len(items))
        users.append(int(r["user_id"]))
        has_label = has_label and "label" in r
        labels.append(int(r.get("label", 0)))
    seq = UserSequences(np.array(users, np.int64), np.array(offsets, np.int64), np.array(items, np.int64),
                        np.array(ratings, np.float32), np.array(stamps, np.int64))  # fmt: skip
    n = len(rows)
    pos = np.diff(seq.offsets) - 1
    flat = seq.offsets[:-1] + pos
    split = CTRSplit(seq, np.arange(n, dtype=np.int64), pos, seq.user_ids, seq.items[flat], seq.ratings[flat],
                     np.array(labels, np.int8), seq.timestamps[flat])  # fmt: skip
    view = copy(data)
    view.sequences = seq
    view.splits = {"jsonl": split}
    return view, split, has_label


def subr_embeddings_for(run_dir, meta, data, cache_dir=None, progress: bool = True, log=print):
    """The SUBR item embeddings the run was trained with, checked against its recorded fingerprint; when the
    saved file is gone, recomputed with the default encoder into ``cache_dir`` (a temporary folder if None)."""
    import tempfile
    from pathlib import Path

    from .pipeline import embeddings_fingerprint, item_embeddings, load_subr_embeddings, resolve_dependency

    path = resolve_dependency(run_dir, meta, "subr_embeddings")
    if path is None and meta.get("paths_relative_to") != "run" and meta.get("ctr_dir"):
        path = Path(meta["ctr_dir"]).parent / "subr_embeddings.npz"  # older runs: next to the DIN folder
    saved = load_subr_embeddings(path=path) if path is not None else None
    expected = meta.get("subr_fingerprint")
    if saved is not None:
        if expected and embeddings_fingerprint(*saved) != expected:
            raise RunDependencyError(f"{path}: these SUBR embeddings are not the ones the run {run_dir} was trained with "
                             f"(rebuilt since, or another pipeline's); retrain the run against them")  # fmt: skip
        return saved
    log(f"the run's SUBR embeddings ({path}) are gone: recomputing them with the default encoder")
    if cache_dir is None:
        with tempfile.TemporaryDirectory() as tmp:
            emb, ids = item_embeddings(data, tmp, progress=progress)
    else:
        emb, ids = item_embeddings(data, cache_dir, progress=progress)
    if expected and embeddings_fingerprint(emb, ids) != expected:
        log("warning: the recomputed SUBR embeddings differ from the run's (other encoder files or machine); "
            "retrieval may differ slightly from training")  # fmt: skip
    return emb, ids


def score(run_dir, data, split_name: str = "test", n=None, jsonl=None, batch_size: int = 64, progress: bool = True,
          cache_dir=None):  # fmt: skip
    """Score a saved run on ``data``'s split (the run's seeded test subsample by default) or a JSONL file.

    ``cache_dir``: where SUBR embeddings are cached if they must be recomputed (default: a temporary folder;
    eval never writes outside its output folder). Returns (split, probs, has_label, spec).
    """
    from pathlib import Path

    import numpy as np
    import torch

    from rellax_fast.data.collate import PromptCollator

    from ..spa.ctr import split_arrays
    from ..spa.din import predict
    from .pipeline import make_samples, shown_positions_for, subsample
    from .trainer import PromptDataset, predict_proba

    run_dir = Path(run_dir)
    model, tokenizer, kind, meta, cfg, spec, din, vocab = load_run(run_dir)
    if jsonl:
        view, split, has_label = jsonl_split(jsonl, data)
        arrays = split_arrays(view, "jsonl", vocab, din.config.max_history)
        # DIN's user embedding: the user's row in the dataset's sequences (unknown users: row 0)
        known = np.clip(np.searchsorted(data.sequences.user_ids, split.user_id), 0, len(data.sequences.user_ids) - 1)
        arrays.user = torch.from_numpy(np.where(data.sequences.user_ids[known] == split.user_id, known, 0))
    else:
        has_label = True
        full = data.splits[split_name]
        n = cfg.n_test if n is None else n
        index = subsample(len(full), n, cfg.seed + 1) if split_name == "test" else subsample(len(full), n, cfg.seed + 2)
        split = full.subset(index)
        view = _with_split(data, split_name, split)
        arrays = split_arrays(view, split_name, vocab, din.config.max_history)
    _, h = predict(din, arrays, with_h=True)
    emb = ids = None
    if spec.subr:
        emb, ids = subr_embeddings_for(run_dir, meta, data, cache_dir, progress)
    positions = shown_positions_for(view, split, cfg.k, spec.subr, cfg.subr_mode, emb, ids, progress)
    collator = PromptCollator(tokenizer, kind=kind, max_length=cfg.max_length, placeholder=cfg.placeholder if spec.spa else None,
                              chat=cfg.chat)
    ds = PromptDataset(make_samples(view, split, positions), collator, h)
    # the run's own precision (a --mixed-precision fast/bf16 run is scored under the same autocast as in training)
    probs = predict_proba(model, ds, batch_size, progress=progress, mixed_precision=cfg.train.mixed_precision)
    return split, probs, has_label, spec


def run(args: argparse.Namespace) -> int:
    import json
    import sys
    from pathlib import Path

    from rellax_fast.data import load_dataset, prepare_ctr

    from .._io import atomic_write_text
    from .metrics import ctr_metrics, markdown_table, write_metrics_json

    if args.n is not None and args.n < 0:
        print(f"error: --n must be >= 0 (0: all); got {args.n}", file=sys.stderr)
        return 2
    if args.batch_size < 1:
        print(f"error: --batch-size must be >= 1; got {args.batch_size}", file=sys.stderr)
        return 2
    run_dir = Path(args.run)
    meta = json.loads((run_dir / "rellax.json").read_text()) if (run_dir / "rellax.json").exists() else None
    if meta is None:
        raise SystemExit(f"error: {run_dir} has no rellax.json (not a finished run folder)")
    dataset = args.dataset or meta["dataset"]
    data = prepare_ctr(load_dataset(dataset, data_dir=args.data_dir), seed=meta["pipeline"]["seed"])
    out = Path(args.out) if args.out else run_dir / ("eval-jsonl" if args.jsonl else f"eval-{args.split}")
    try:
        split, probs, has_label, spec = score(run_dir, data, args.split, args.n, args.jsonl, args.batch_size,
                                              not args.no_progress, cache_dir=out / "emb_cache")  # fmt: skip
    except RunDependencyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    from rellax_fast.distributed import is_main

    if not is_main():  # under torchrun / accelerate launch: every rank scored a shard (gathered); rank 0 writes
        return 0
    out.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"user_id": int(u), "item_id": int(i), "p_click": float(p)}) for u, i, p in zip(split.user_id, split.item_id, probs)]
    atomic_write_text(out / "predictions.jsonl", "\n".join(lines) + "\n")
    if has_label:
        m = ctr_metrics(split.label, probs)
        write_metrics_json(out / "metrics.json", m, {"run": str(run_dir), "variant": spec.name, "source": args.jsonl or args.split})
        print(markdown_table([{"variant": spec.name, **m}]))
    print(f"wrote {out / 'predictions.jsonl'}" + (f" and {out / 'metrics.json'}" if has_label else ""))
    return 0


def _with_split(data, name, split):
    from copy import copy

    view = copy(data)
    view.splits = dict(data.splits)
    view.splits[name] = split
    return view
