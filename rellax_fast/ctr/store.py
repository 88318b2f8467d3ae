"""Glue between the prepared CTR data (``rellax_fast.data``) and DIN: the item vocabulary, the per-split
DIN inputs, fitting, the frozen DIN's outputs (p(click) and h per sample) that ReLLaX consumes, the saved
CTR folder, and :func:`train_or_load_ctr` (reuse a saved DIN only when it was trained on the same data with
the same options, else retrain it: what ``train-ctr``, ``train`` and ``demo`` do).

A saved CTR model is a folder with ``din.safetensors``, ``din.json`` (config, metrics, what it was trained on
and with, and content hashes), ``item_ids.npy`` (row i of the item table is item id ``item_ids[i]``) and
``metrics.json`` (test metrics). :func:`load_ctr` checks the loaded weights and vocabulary against the hashes
in ``din.json``, so a folder mixed from two trainings, or modified, is refused; :func:`din_fingerprint` names
one trained DIN (runs record it, ``eval`` checks it).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, fields
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from .din import (
    DIN,
    DINConfig,
    DINReport,
    DINTrainConfig,
    PackedCTRArrays,
    load_din,
    predict,
    save_din,
    train_din,
)


def item_vocab(data) -> np.ndarray:
    """Sorted item ids of the dataset (catalogue plus everything rated)."""
    ids = np.asarray(data.dataset.items.index, dtype=np.int64)
    return np.union1d(ids, np.asarray(data.sequences.items, dtype=np.int64))


def to_index(vocab: np.ndarray, ids) -> np.ndarray:
    """Map item ids to rows of the item table; raises on ids not in the vocabulary."""
    ids = np.asarray(ids, dtype=np.int64)
    idx = np.searchsorted(vocab, ids)
    idx_c = np.clip(idx, 0, len(vocab) - 1)
    bad = vocab[idx_c] != ids
    if np.any(bad):
        raise KeyError(
            f"{int(bad.sum())} item ids are not in the CTR model's vocabulary, e.g. {ids[bad][:5].tolist()}"
        )
    return idx_c


def split_arrays(data, split: str, vocab: np.ndarray, max_len: int) -> PackedCTRArrays:
    """DIN's inputs for one split in the packed form (linear in ratings + samples); batches gather the last
    ``max_len`` behaviours on demand. The sequences' item indices are mapped once per ``data``/``vocab``."""
    s = data.splits[split]
    seq = data.sequences
    cached = getattr(
        seq, "_din_item_index", None
    )  # (vocab, seq.items, index): splits of one dataset share it
    if cached is None or cached[0] is not vocab or cached[1] is not seq.items:
        cached = (vocab, seq.items, to_index(vocab, seq.items))
        try:
            seq._din_item_index = cached
        except AttributeError:
            pass
    return PackedCTRArrays(
        seq.offsets, cached[2], seq.ratings, s.user_index, s.pos, to_index(vocab, s.item_id), s.label, max_len
    )


def fit_din(
    data, config: Optional[dict] = None, train_config: Optional[DINTrainConfig] = None
) -> Tuple[DIN, DINReport, np.ndarray]:
    """Train DIN on ``data``'s train split (early stopping on valid), evaluate on test; return it frozen."""
    vocab = item_vocab(data)
    from rellax_fast.data.domains import get_domain

    # an untimed domain (book) is split by user, so its test users are unseen in train: no user embedding
    use_users = get_domain(data.dataset.domain).timed
    cfg = DINConfig(n_items=len(vocab), n_users=len(data.sequences) if use_users else 0, **(config or {}))
    arrays = {k: split_arrays(data, k, vocab, cfg.max_history) for k in ("train", "valid", "test")}
    model, report = train_din(cfg, arrays["train"], arrays["valid"], arrays["test"], train_config)
    return model, report, vocab


def din_outputs(model: DIN, data, vocab: np.ndarray, split: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """(p(click) (S,), h (S, h_dim)) of the frozen DIN for every sample of ``split``."""
    return predict(model, split_arrays(data, split, vocab, model.config.max_history), with_h=True)


def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 of a model's state (names, dtypes, shapes and bytes of every tensor, in name order)."""
    digest = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def vocab_sha256(vocab: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(vocab, dtype="<i8").tobytes()).hexdigest()


def din_fingerprint(model: DIN, vocab: np.ndarray) -> str:
    """Names one trained DIN: its weights and its item vocabulary."""
    return hashlib.sha256(f"{weights_sha256(model)}:{vocab_sha256(vocab)}".encode()).hexdigest()


def din_reuse_key(data, options: Optional[dict], train_config: Optional[DINTrainConfig]) -> dict:
    """What a trained DIN depends on: the data (``ctr_fingerprint``), every model option (defaults filled in)
    and every training option but the progress bar. A DIN is reused only when this key matches."""
    from rellax_fast.data.ctr import ctr_fingerprint

    options = dict(options or {})
    model_opts = {}
    for f in fields(DINConfig):
        if f.name in ("n_items", "n_users"):
            continue
        v = options.pop(f.name, f.default)
        model_opts[f.name] = list(v) if f.name == "mlp_hidden" else v
    if options:
        raise ValueError(f"options: unknown DIN options {sorted(options)}")
    train = asdict(train_config or DINTrainConfig())
    train.pop("progress", None)
    key = {
        "dataset": data.dataset.name,
        "data_fingerprint": ctr_fingerprint(data),
        "options": model_opts,
        "train": train,
    }
    return json.loads(json.dumps(key))  # what a JSON round trip gives back


def save_ctr(
    model: DIN, vocab: np.ndarray, report: Optional[DINReport], path, extra: Optional[dict] = None
) -> Path:
    """Write the DIN folder: ``item_ids.npy``, ``din.safetensors``, then ``din.json`` with the content hashes."""
    from rellax_fast._io import atomic_write_npy

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab = np.asarray(vocab, dtype=np.int64)
    atomic_write_npy(path / "item_ids.npy", vocab)
    hashes = {"weights_sha256": weights_sha256(model), "item_ids_sha256": vocab_sha256(vocab)}
    save_din(
        model,
        path,
        extra={"report": asdict(report) if report is not None else None, **(extra or {}), **hashes},
    )
    return path


def load_ctr(path) -> Tuple[DIN, np.ndarray, Dict]:
    """Load a DIN folder; raises ValueError naming the file when its content does not match ``din.json``."""
    path = Path(path)
    model, meta = load_din(path)
    vocab = np.load(path / "item_ids.npy", allow_pickle=False)
    if len(vocab) != model.config.n_items:
        raise ValueError(
            f"{path}: item_ids.npy has {len(vocab)} ids but the DIN table has {model.config.n_items} rows"
        )
    if "weights_sha256" in meta and weights_sha256(model) != meta["weights_sha256"]:
        raise ValueError(
            f"{path / 'din.safetensors'}: weights do not match the hash in {path / 'din.json'} (a mixed or "
            f"modified CTR folder); retrain with `rellax-fast train-ctr`"
        )
    if "item_ids_sha256" in meta and vocab_sha256(vocab) != meta["item_ids_sha256"]:
        raise ValueError(
            f"{path / 'item_ids.npy'}: ids do not match the hash in {path / 'din.json'} (a mixed or "
            f"modified CTR folder); retrain with `rellax-fast train-ctr`"
        )
    return model, vocab, meta


def _key_changes(old: dict, new: dict, prefix: str = "") -> list:
    """The dotted names whose values differ between two reuse keys, e.g. ['options.embed_dim']."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _key_changes(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}" if k == "data_fingerprint" else f"{prefix}{k} {a!r} -> {b!r}")
    return out


def train_or_load_ctr(
    data, ctr_dir, options: Optional[dict], train_config: Optional[DINTrainConfig], log=print
):
    """Reuse the DIN in ``ctr_dir`` only if it was trained on the same data (content fingerprint) with the same
    model and training options; otherwise (re)train it there, saying why. Returns (model, vocab, report)."""
    from rellax_fast._io import atomic_write_text
    from rellax_fast.metrics import metrics_json

    ctr_dir = Path(ctr_dir)
    key = din_reuse_key(data, options, train_config)
    if (ctr_dir / "din.json").exists():
        try:
            meta = json.loads((ctr_dir / "din.json").read_text(encoding="utf-8"))
            stored = meta.get("reuse_key") if isinstance(meta, dict) else None
        except (ValueError, UnicodeDecodeError) as exc:  # truncated or damaged: not reusable
            meta = stored = None
            log(f"retraining the DIN in {ctr_dir}: {ctr_dir / 'din.json'} is unreadable ({exc})")
        if meta is None:
            pass
        elif stored == key:
            try:
                model, vocab, meta = load_ctr(ctr_dir)
            except (ValueError, FileNotFoundError, KeyError) as exc:
                log(f"retraining the DIN in {ctr_dir}: the saved one does not load ({exc})")
            else:
                log(
                    f"using the trained DIN in {ctr_dir} (same data and options; test AUC "
                    f"{meta['report']['test'].get('auc', float('nan')):.4f})"
                )
                return model, vocab, DINReport(**meta["report"])
        elif stored is None:
            log(
                f"retraining the DIN in {ctr_dir}: it records no data fingerprint or options (older rellax-fast)"
            )
        else:
            log(
                f"retraining the DIN in {ctr_dir}: it was trained with other data or options "
                f"({'; '.join(_key_changes(stored, key))})"
            )
    model, report, vocab = fit_din(data, options, train_config)
    save_ctr(model, vocab, report, ctr_dir, extra={"dataset": data.dataset.name, "reuse_key": key})
    atomic_write_text(
        ctr_dir / "metrics.json",
        metrics_json(report.test, {"model": "DIN", "split": "test", "valid": report.valid}),
    )
    return model, vocab, report
