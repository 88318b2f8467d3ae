"""A run folder read back (:func:`rellax_fast.train.pipeline.save_run` writes it: the model's trainable tensors,
buffers, CFLoRA adapter and ``rellax.json``, at the end of ``run_variant``): :func:`load_run`
(rebuild the trained model) and :func:`score` (score it on a split of its dataset or on a JSONL file of
samples): what ``rellax-fast eval`` does, for Python callers.

The backbone is reloaded from the path recorded in ``rellax.json`` and the frozen DIN from the run's CTR
folder. Paths in ``rellax.json`` are relative to the run folder, so a moved or copied ``--out`` evaluates
with its own DIN; the DIN and the SUBR embeddings are checked against the fingerprints the run recorded, and
a mismatch (a retrained DIN, another pipeline's files) raises :class:`RunDependencyError`.

``rellax.json`` records the adapter as one nested CFLoRAConfig dict; the flat ``r`` / ``alpha`` / ``dropout`` /
``n_experts`` / ``cflora_backend`` keys of older runs are converted to it when read (:func:`nest_flat_adapter_keys`).

The writer stays in ``pipeline`` beside ``run_variant``: this module imports the pipeline's builders to read a
run back, so ``pipeline`` importing it would close an import cycle.
"""

from __future__ import annotations

# {key of the flat "pipeline" dict that runs wrote before the nested "cflora": CFLoRAConfig field}
FLAT_ADAPTER_KEYS = {
    "r": "r",
    "alpha": "alpha",
    "dropout": "dropout",
    "n_experts": "n_experts",
    "cflora_backend": "backend",
}


def nest_flat_adapter_keys(data: dict) -> dict:
    """``rellax.json``'s ``"pipeline"`` in the current form: a run written before the nested ``"cflora"`` dict
    recorded ``r``, ``alpha``, ``dropout``, ``n_experts`` and ``cflora_backend`` beside the other keys (the
    per-architecture target modules implied); they become ``"cflora"``, ReLLaX's defaults updated with them. The
    current form comes back unchanged; both forms at once is a ValueError."""
    from .pipeline import pipeline_cflora_config

    flat = {field: data[key] for key, field in FLAT_ADAPTER_KEYS.items() if key in data}
    if "cflora" in data:
        if flat:
            raise ValueError(
                f"rellax.json: 'pipeline' has both a nested 'cflora' and the flat keys "
                f"{sorted(k for k in FLAT_ADAPTER_KEYS if k in data)}"
            )
        return data
    rest = {k: v for k, v in data.items() if k not in FLAT_ADAPTER_KEYS}
    return {**rest, "cflora": pipeline_cflora_config(**flat).to_dict()}


def pipeline_config_from_dict(data: dict, model=None):
    """The :class:`~rellax_fast.train.pipeline.PipelineConfig` recorded in ``rellax.json`` (``"pipeline"``; an
    older run's flat form converted by :func:`nest_flat_adapter_keys`). ``model``, when given, replaces the
    recorded backbone path."""
    from ..cflora.config import CFLoRAConfig
    from .pipeline import PipelineConfig
    from .trainer import TrainConfig

    pc = nest_flat_adapter_keys(dict(data))
    pc = {**pc, "train": TrainConfig(**pc["train"]), "cflora": CFLoRAConfig.from_dict(pc["cflora"])}
    if model is not None:
        pc["model"] = model
    return PipelineConfig(**pc)


def variant_from_meta(variant: dict, cfg):
    """The run's :class:`~rellax_fast.train.pipeline.VariantSpec` from ``rellax.json``'s ``"variant"``: its
    interaction is the one of the adapter config (``cfg.cflora``, recorded once); runs written before recorded it in
    ``"variant"`` too, and that is read as it is."""
    from .pipeline import VariantSpec

    return VariantSpec(**{"interaction": cfg.cflora.interaction, **variant})


class RunDependencyError(ValueError):
    """A run's DIN folder or SUBR embeddings are missing, or are not the ones it was trained with."""


class RunFileError(ValueError):
    """A run folder's own files are damaged: ``rellax.json`` unreadable or incomplete, a saved tensor unknown to the
    model, of another shape or not finite; or the model it holds scores non-finite probabilities."""


class RunDataMismatchError(ValueError):
    """The data given to score a run are not the data it was trained on (another dataset, other item ids, another
    version of the same dataset): the run records their fingerprint (``data_fingerprint``)."""


def read_run_meta(run_dir) -> dict:
    """``rellax.json`` of ``run_dir``, checked to hold what a run needs; :class:`RunFileError` naming the file
    otherwise (truncated, not an object, a key missing)."""
    import json
    from pathlib import Path

    path = Path(run_dir) / "rellax.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: not found; is {run_dir} a finished run folder (written by `rellax-fast train`)?"
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise RunFileError(
            f"{path}: unreadable or truncated ({exc}); the run folder is damaged: retrain it"
        ) from None
    missing = [
        k
        for k in ("variant", "pipeline", "model", "kind", "dataset")
        if not isinstance(meta, dict) or k not in meta
    ]
    if missing:
        raise RunFileError(f"{path}: missing {missing}; the run folder is damaged or not a run: retrain it")
    if not isinstance(meta["pipeline"], dict) or not isinstance(meta["variant"], dict):
        raise RunFileError(
            f"{path}: 'pipeline' and 'variant' must be objects; the run folder is damaged: retrain it"
        )
    return meta


def check_run_data(run_dir, meta: dict, data) -> None:
    """Refuse ``data`` (a ``CTRData``) that is not what the run was trained on: another dataset name, or (runs
    that record it) another ``data_fingerprint`` (:func:`rellax_fast.data.ctr.ctr_fingerprint`)."""
    from ..data.ctr import ctr_fingerprint

    if data.dataset.name != meta["dataset"]:
        raise RunDataMismatchError(
            f"{run_dir}: the run was trained on {meta['dataset']!r}, not {data.dataset.name!r}; "
            f"evaluate it on its own dataset (--dataset {meta['dataset']})"
        )
    expected = meta.get("data_fingerprint")
    if expected and ctr_fingerprint(data) != expected:
        raise RunDataMismatchError(
            f"{run_dir}: these {data.dataset.name} data are not the ones the run was trained on (other ratings, users "
            f"or item ids: its rellax.json records data_fingerprint {expected[:12]}..., these give "
            f"{ctr_fingerprint(data)[:12]}...); evaluate it with the --data-dir it was trained on"
        )


def _load_tensors(path, targets: dict, what: str) -> dict:
    """Read ``path`` (safetensors) and check every tensor against ``targets`` ({name: tensor of the rebuilt model})
    before anything is copied: known name, same shape, finite values. Returns {name: tensor}."""
    import torch
    from safetensors.torch import load_file

    try:
        saved = load_file(str(path))
    except Exception as exc:  # safetensors' own error type (a truncated or non-safetensors file), OSError
        raise RunFileError(
            f"{path}: unreadable ({type(exc).__name__}: {exc}); the run folder is damaged"
        ) from None
    for k, v in saved.items():
        if k not in targets:
            raise RunFileError(
                f"{path}: holds {what} {k!r}, which the rebuilt model does not have (another model's "
                "file, or edited)"
            )
        if tuple(v.shape) != tuple(targets[k].shape):
            raise RunFileError(
                f"{path}: {what} {k!r} has shape {tuple(v.shape)}, the model expects "
                f"{tuple(targets[k].shape)}"
            )
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            bad = int((~torch.isfinite(v)).sum())
            raise RunFileError(
                f"{path}: {what} {k!r} holds {bad} non-finite value(s) (NaN or Inf); the run diverged "
                "or the file was damaged: retrain it"
            )
    return saved


def load_run(run_dir, data=None, log=print):
    """Rebuild the trained model of ``run_dir``. Returns (model, tokenizer, kind, meta, cfg, spec, data, ctr).

    The run's files are validated first: a damaged ``rellax.json``, or a saved tensor that is unknown, of another
    shape or not finite, raises :class:`RunFileError` naming the file (and tensor) before anything is scored."""
    from pathlib import Path

    import torch

    from ..ctr.store import din_fingerprint, load_ctr
    from .pipeline import build_rellax, load_tokenizer_and_backbone, resolve_dependency

    run_dir = Path(run_dir)
    meta = read_run_meta(run_dir)
    try:
        cfg = pipeline_config_from_dict(meta["pipeline"], model=meta["model"])
        spec = variant_from_meta(meta["variant"], cfg)
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise RunFileError(
            f"{run_dir / 'rellax.json'}: its pipeline or variant is not valid ({exc})"
        ) from None
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
    # the condition statistics are buffers: rebuild with placeholders, then load every saved tensor
    model = build_rellax(
        backbone,
        kind,
        tokenizer,
        spec,
        cfg,
        din,
        vocab,
        (torch.zeros(din.config.h_dim), torch.ones(din.config.h_dim)),
    )
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    # every saved tensor is checked (name, shape, finite) before any is copied
    saved = _load_tensors(run_dir / "trainable.safetensors", params, "tensor")
    extra = (
        _load_tensors(run_dir / "buffers.safetensors", buffers, "buffer")
        if (run_dir / "buffers.safetensors").exists()
        else {}
    )
    with torch.no_grad():
        for k, v in saved.items():
            params[k].copy_(v)
        if "readout_gate" in params and "readout_gate" not in saved:
            # a residual run from before the gate existed added the LM's margin ungated: gate 1 is that model
            params["readout_gate"].fill_(1.0)
        for k, v in extra.items():
            buffers[k].copy_(v)
    model.eval()
    return model, tokenizer, kind, meta, cfg, spec, din, vocab


def _jsonl_ints(path, n: int, row: dict, key: str, length=None) -> list:
    """``row[key]`` as a list of ints (``length`` of them when given); DataFormatError naming the line otherwise."""
    from rellax_fast.data.parsing import DataFormatError

    value = row[key]
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise DataFormatError(
            f"{path}: line {n}: {key} must be a list of integers, got {json_snippet(value)}"
        )
    if length is not None and len(value) != length:
        raise DataFormatError(f"{path}: line {n}: {key} has {len(value)} values for {length} history items")
    return value


def json_snippet(value, limit: int = 60) -> str:
    import json

    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _jsonl_row(path, n: int, line: str, known_items) -> dict:
    """One checked JSONL sample: a JSON object with integer user_id / item_id, a list of known item ids as history,
    optional finite history_ratings and time-ordered history_timestamps of the same length, label 0 or 1."""
    import json
    import math

    from rellax_fast.data.parsing import DataFormatError

    try:
        row = json.loads(line)
    except ValueError as exc:
        raise DataFormatError(f"{path}: line {n}: not valid JSON ({exc})") from None
    if not isinstance(row, dict):
        raise DataFormatError(
            f'{path}: line {n}: expected a JSON object like {{"user_id": 1, "item_id": 50, '
            f'"history": [12, 7]}}, got a {type(row).__name__}'
        )
    for key in ("user_id", "item_id", "history"):
        if key not in row:
            raise DataFormatError(f"{path}: line {n}: missing {key!r} (need user_id, item_id, history)")
    for key in ("user_id", "item_id"):
        if not isinstance(row[key], int) or isinstance(row[key], bool):
            raise DataFormatError(f"{path}: line {n}: {key} must be an integer, got {json_snippet(row[key])}")
    hist = _jsonl_ints(path, n, row, "history")
    unknown = [i for i in [*hist, row["item_id"]] if i not in known_items]
    if unknown:
        raise DataFormatError(
            f"{path}: line {n}: item id(s) {unknown[:5]} are not items of the run's dataset"
        )
    ratings = row.get("history_ratings")
    if ratings is None:
        ratings = [0.0] * len(hist)
    elif not isinstance(ratings, list) or not all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in ratings
    ):
        raise DataFormatError(
            f"{path}: line {n}: history_ratings must be a list of finite numbers, got {json_snippet(ratings)}"
        )
    elif len(ratings) != len(hist):
        raise DataFormatError(
            f"{path}: line {n}: history_ratings has {len(ratings)} values for {len(hist)} history items"
        )
    stamps = list(range(len(hist)))
    if row.get("history_timestamps") is not None:
        stamps = _jsonl_ints(path, n, row, "history_timestamps", len(hist))
        if any(b < a for a, b in zip(stamps, stamps[1:])):
            raise DataFormatError(
                f"{path}: line {n}: history_timestamps are not in time order (history is oldest first)"
            )
    if "label" in row and (row["label"] not in (0, 1) or isinstance(row["label"], float)):
        raise DataFormatError(f"{path}: line {n}: label must be 0 or 1, got {json_snippet(row['label'])}")
    return {
        "user_id": row["user_id"],
        "item_id": row["item_id"],
        "history": hist,
        "ratings": [float(x) for x in ratings],
        "stamps": stamps,
        "label": row.get("label"),
    }


def jsonl_split(path, data):
    """A CTRData-like view and CTRSplit over the samples of a JSONL file (one pseudo-user per line).

    Every line is checked before anything is scored; a bad one raises
    :class:`~rellax_fast.data.parsing.DataFormatError` naming the file and the line (bad JSON, not an object, a
    missing or mistyped field, an item id the dataset does not have, a label other than 0/1, histories whose
    ratings or timestamps do not match). A missing, unreadable or empty file is one too."""
    from copy import copy
    from pathlib import Path

    import numpy as np

    from rellax_fast.data.ctr import CTRSplit, UserSequences
    from rellax_fast.data.parsing import DataFormatError

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataFormatError(f"{path}: cannot read the --jsonl file ({type(exc).__name__}: {exc})") from None
    known = set(np.asarray(data.dataset.items.index, np.int64).tolist())
    rows = [_jsonl_row(path, n, line, known) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not rows:
        raise DataFormatError(f"{path}: no samples (the file is empty; one JSON object per line)")
    items, ratings, stamps, offsets = [], [], [], [0]
    for r in rows:
        items += r["history"] + [r["item_id"]]
        ratings += r["ratings"] + [0.0]
        stamps += r["stamps"] + [r["stamps"][-1] + 1 if r["stamps"] else 0]
        offsets.append(len(items))
    has_label = all(r["label"] is not None for r in rows)
    seq = UserSequences(
        np.array([r["user_id"] for r in rows], np.int64),
        np.array(offsets, np.int64),
        np.array(items, np.int64),
        np.array(ratings, np.float32),
        np.array(stamps, np.int64),
    )
    n = len(rows)
    pos = np.diff(seq.offsets) - 1
    flat = seq.offsets[:-1] + pos
    labels = np.array([r["label"] or 0 for r in rows], np.int8)
    split = CTRSplit(
        seq,
        np.arange(n, dtype=np.int64),
        pos,
        seq.user_ids,
        seq.items[flat],
        seq.ratings[flat],
        labels,
        seq.timestamps[flat],
    )
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
            raise RunDependencyError(
                f"{path}: these SUBR embeddings are not the ones the run {run_dir} was trained with "
                f"(rebuilt since, or another pipeline's); retrain the run against them"
            )
        return saved
    log(f"the run's SUBR embeddings ({path}) are gone: recomputing them with the default encoder")
    if cache_dir is None:
        with tempfile.TemporaryDirectory() as tmp:
            emb, ids = item_embeddings(data, tmp, progress=progress)
    else:
        emb, ids = item_embeddings(data, cache_dir, progress=progress)
    if expected and embeddings_fingerprint(emb, ids) != expected:
        log(
            "warning: the recomputed SUBR embeddings differ from the run's (other encoder files or machine); "
            "retrieval may differ slightly from training"
        )
    return emb, ids


def score(
    run_dir,
    data,
    split_name: str = "test",
    n=None,
    jsonl=None,
    batch_size: int = 64,
    progress: bool = True,
    cache_dir=None,
    details=None,
):
    """Score a saved run on ``data``'s split (the run's seeded test subsample by default) or a JSONL file.

    ``cache_dir``: where SUBR embeddings are cached if they must be recomputed (default: a temporary folder;
    eval never writes outside its output folder). ``details``: a dict that receives ``din_probs``, the run's frozen
    DIN's p(click) of the same samples (eval's sliced-metrics reference). Returns (split, probs, has_label, spec).
    Other data than the run was trained on raise :class:`RunDataMismatchError`, damaged run files or non-finite scores
    :class:`RunFileError`, a bad JSONL line a ``DataFormatError``: all before anything is returned.
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
    check_run_data(run_dir, read_run_meta(run_dir), data)  # before the model is built
    model, tokenizer, kind, meta, cfg, spec, din, vocab = load_run(run_dir)
    if jsonl:
        view, split, has_label = jsonl_split(jsonl, data)
        arrays = split_arrays(view, "jsonl", vocab, din.config.max_history)
        # DIN's user embedding: the user's row in the dataset's sequences (unknown users: row 0)
        known = np.clip(
            np.searchsorted(data.sequences.user_ids, split.user_id), 0, len(data.sequences.user_ids) - 1
        )
        arrays.user = torch.from_numpy(np.where(data.sequences.user_ids[known] == split.user_id, known, 0))
    else:
        has_label = True
        full = data.splits[split_name]
        n = cfg.n_test if n is None else n
        index = (
            subsample(len(full), n, cfg.seed + 1)
            if split_name == "test"
            else subsample(len(full), n, cfg.seed + 2)
        )
        view = subset_view(data, split_name, index)
        split = view.splits[split_name]
        arrays = split_arrays(view, split_name, vocab, din.config.max_history)
    din_probs, h = predict(din, arrays, with_h=True)
    if details is not None:
        details["din_probs"] = din_probs.numpy().astype(np.float64)
    emb = ids = None
    if spec.subr:
        emb, ids = subr_embeddings_for(run_dir, meta, data, cache_dir, progress)
    positions = shown_positions_for(view, split, cfg.k, spec.subr, cfg.subr_mode, emb, ids, progress)
    collator = PromptCollator(
        tokenizer,
        kind=kind,
        max_length=cfg.max_length,
        placeholder=cfg.placeholder if spec.spa else None,
        chat=cfg.chat,
    )
    ds = PromptDataset(make_samples(view, split, positions), collator, h)
    # the run's own precision (a --mixed-precision fast/bf16 run is scored under the same autocast as in training)
    probs = predict_proba(model, ds, batch_size, progress=progress, mixed_precision=cfg.train.mixed_precision)
    bad = ~np.isfinite(probs)
    if bad.any():  # never handed on (and never written as predictions)
        raise RunFileError(
            f"{run_dir}: the model scores non-finite probabilities for {int(bad.sum())} of {len(probs)} "
            "samples; the run's tensors are damaged or it diverged: retrain it"
        )
    return split, probs, has_label, spec
