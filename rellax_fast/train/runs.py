"""A run folder, written and read back: :func:`save_run` (the model's trainable tensors, buffers, CFLoRA
adapter and ``rellax.json``; written by :func:`rellax_fast.train.pipeline.run_variant`), :func:`load_run`
(rebuild the trained model) and :func:`score` (score it on a split of its dataset or on a JSONL file of
samples): what ``rellax-fast eval`` does, for Python callers.

The backbone is reloaded from the path recorded in ``rellax.json`` and the frozen DIN from the run's CTR
folder. Paths in ``rellax.json`` are relative to the run folder, so a moved or copied ``--out`` evaluates
with its own DIN; the DIN and the SUBR embeddings are checked against the fingerprints the run recorded, and
a mismatch (a retrained DIN, another pipeline's files) raises :class:`RunDependencyError`.

``rellax.json`` is read in both of its forms: the adapter as one nested CFLoRAConfig dict (current) and the
flat ``r`` / ``alpha`` / ``dropout`` / ``n_experts`` / ``cflora_backend`` keys of older runs
(:func:`pipeline_config_from_dict`).

``save_run`` is defined in ``pipeline`` (``run_variant`` writes with it) and offered here too, so that the run
folder's writer and readers are one import away without an import cycle (``pipeline`` never imports this
module).
"""

from __future__ import annotations


def save_run(run_dir, model, meta: dict) -> None:
    """Write a run folder: ``trainable.safetensors``, ``buffers.safetensors``, ``adapter/`` and ``rellax.json``
    (:func:`rellax_fast.train.pipeline.save_run`; imported on call, so importing this module stays light)."""
    from pathlib import Path

    from .pipeline import save_run as write

    write(Path(run_dir), model, meta)


def pipeline_config_from_dict(data: dict, model=None):
    """The :class:`~rellax_fast.train.pipeline.PipelineConfig` recorded in ``rellax.json`` (``"pipeline"``).

    Two forms are read: the current one, whose adapter is one nested ``"cflora"`` dict (CFLoRAConfig's own form),
    and the flat one of runs written before it, with ``r``, ``alpha``, ``dropout``, ``n_experts`` and
    ``cflora_backend`` beside the other keys (and the per-architecture target modules implied). ``model``, when
    given, replaces the recorded backbone path."""
    from ..cflora.config import CFLoRAConfig
    from .pipeline import FLAT_CFLORA_KEYS, PipelineConfig, pipeline_cflora_config
    from .trainer import TrainConfig

    pc = dict(data)
    pc["train"] = TrainConfig(**pc["train"])
    flat = {FLAT_CFLORA_KEYS[k]: pc.pop(k) for k in list(pc) if k in FLAT_CFLORA_KEYS}
    if "cflora" in pc:
        if flat:
            raise ValueError(f"rellax.json: 'pipeline' has both a nested 'cflora' and the flat keys {sorted(flat)}")
        pc["cflora"] = CFLoRAConfig.from_dict(pc["cflora"])
    else:  # a run written before the nested config: ReLLaX's defaults then, updated with what it recorded
        pc["cflora"] = pipeline_cflora_config(**flat)
    if model is not None:
        pc["model"] = model
    return PipelineConfig(**pc)


class RunDependencyError(ValueError):
    """A run's DIN folder or SUBR embeddings are missing, or are not the ones it was trained with."""


def load_run(run_dir, data=None, log=print):
    """Rebuild the trained model of ``run_dir``. Returns (model, tokenizer, kind, meta, cfg, spec, data, ctr)."""
    import json
    from pathlib import Path

    import torch
    from safetensors.torch import load_file

    from ..ctr.store import din_fingerprint, load_ctr
    from .pipeline import VariantSpec, build_rellax, load_tokenizer_and_backbone, resolve_dependency

    run_dir = Path(run_dir)
    if not (run_dir / "rellax.json").exists():
        raise FileNotFoundError(f"{run_dir}: no rellax.json; is this a finished run folder?")
    meta = json.loads((run_dir / "rellax.json").read_text())
    cfg = pipeline_config_from_dict(meta["pipeline"], model=meta["model"])
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
        if "readout_gate" in params and "readout_gate" not in saved:
            # a residual run from before the gate existed added the LM's margin ungated: gate 1 is that model
            params["readout_gate"].fill_(1.0)
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

    from ..ctr.din import predict
    from ..ctr.store import split_arrays
    from .pipeline import make_samples, shown_positions_for, subsample, subset_view
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
        view = subset_view(data, split_name, index)
        split = view.splits[split_name]
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

