"""On-disk cache of item embeddings: keyed, atomic, self-checking.

One cache entry is two files in the cache folder, named after the dataset and the encoder:

- ``<dataset>__<encoder>.npy``: the (n_items, d) float32 array (``np.save``);
- ``<dataset>__<encoder>.json``: metadata: the full key, shape, dtype, the sha256 and size of the array
  file, and the item ids (row i of the array embeds item ``item_ids[i]``).

The key holds the dataset, the encoder identity (kind, name/path, config hash from
:mod:`rellax_fast.subr.encoders`), the options (PCA dims, normalisation), the text template version and
hashes of the item set and of the item texts. Both files are written to a temporary file in the same
folder and moved into place with ``os.replace``, the array first: a crash leaves either the old complete
entry or an entry whose checksum no longer matches, never a half-written file under the real name.

:func:`cached_item_embeddings` loads an entry when it matches, and otherwise (re)builds it, logging why:
``missing``, ``stale`` (the key differs: other options, encoder, templates or items) or ``corrupt``
(unreadable metadata, missing or truncated array, checksum, shape or dtype mismatch, non-finite values).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .._io import atomic_write
from .text import TEMPLATE_VERSION

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1


@dataclass
class CacheResult:
    """What :func:`cached_item_embeddings` returns."""

    embeddings: np.ndarray  # (n_items, d) float32
    item_ids: List[Any]  # row i embeds item_ids[i]
    status: str  # "hit" | "built" | "rebuilt-stale" | "rebuilt-corrupt" | "rebuilt-forced"
    path: Path  # the .npy file
    key: Dict[str, Any] = field(default_factory=dict)
    reason: Optional[str] = None  # why it was rebuilt
    seconds: float = 0.0  # time spent loading or building


def _json_ids(item_ids: Sequence[Any]) -> List[Any]:
    out = []
    for i in item_ids:
        if isinstance(i, (np.integer,)):
            i = int(i)
        elif isinstance(i, (np.str_,)):
            i = str(i)
        if not isinstance(i, (int, str)):
            raise TypeError(f"item ids must be ints or strings; got {type(i).__name__} ({i!r})")
        out.append(i)
    return out


def _sha256_text(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def cache_key(
    dataset: str,
    encoder_identity: Dict[str, Any],
    item_ids: Sequence[Any],
    texts: Sequence[str],
    *,
    pca_dims: Optional[int] = None,
    normalize: bool = True,
    template_version: str = TEMPLATE_VERSION,
) -> Dict[str, Any]:
    """The dict that identifies one cache entry (compared field by field on load)."""
    if len(item_ids) != len(texts):
        raise ValueError(f"item_ids and texts must have the same length; got {len(item_ids)} and {len(texts)}")
    key = {
        "format": CACHE_FORMAT,
        "dataset": str(dataset),
        "encoder": {k: encoder_identity.get(k) for k in ("kind", "name", "path", "config_hash")},
        "pca_dims": None if pca_dims is None else int(pca_dims),
        "normalize": bool(normalize),
        "template_version": str(template_version),
        "n_items": len(item_ids),
        "item_set_hash": _sha256_text(_json_ids(item_ids)),
        "texts_hash": _sha256_text(list(texts)),
    }
    return json.loads(json.dumps(key))  # normalise to what a JSON round trip gives back


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "encoder"


def cache_paths(cache_dir, dataset: str, encoder_identity: Dict[str, Any]) -> Tuple[Path, Path]:
    """(array path, metadata path) of the entry for this dataset and encoder."""
    name = Path(str(encoder_identity.get("name") or "encoder")).name
    kind = {"sentence-transformers": "st", "hf-lm": "lm"}.get(encoder_identity.get("kind"), "enc")
    stem = f"{_slug(dataset)}__{_slug(name)}__{kind}"
    root = Path(cache_dir)
    return root / f"{stem}.npy", root / f"{stem}.json"


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()




def save_entry(array_path: Path, meta_path: Path, key: Dict[str, Any], embeddings: np.ndarray, item_ids) -> Dict:
    """Write one entry atomically (array first, then the metadata that vouches for it); return the metadata."""
    emb = np.ascontiguousarray(embeddings, dtype=np.float32)
    if emb.ndim != 2 or emb.shape[0] != len(item_ids):
        raise ValueError(f"embeddings must be (n_items={len(item_ids)}, d); got shape {emb.shape}")
    atomic_write(Path(array_path), lambda fh: np.save(fh, emb, allow_pickle=False))
    meta = {
        "key": key,
        "file": Path(array_path).name,
        "shape": list(emb.shape),
        "dtype": str(emb.dtype),
        "sha256": _file_sha256(Path(array_path)),
        "bytes": Path(array_path).stat().st_size,
        "item_ids": _json_ids(item_ids),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    payload = json.dumps(meta, indent=1, ensure_ascii=False).encode()
    atomic_write(Path(meta_path), lambda fh: fh.write(payload))
    return meta


def check_entry(
    array_path: Path, meta_path: Path, key: Dict[str, Any]
) -> Tuple[str, Optional[str], Optional[np.ndarray], Optional[Dict]]:
    """Validate an entry against ``key``: (state, reason, array, metadata).

    state is "hit", "missing", "stale" or "corrupt"; array and metadata are set only on a hit.
    """
    array_path, meta_path = Path(array_path), Path(meta_path)
    if not meta_path.exists() and not array_path.exists():
        return "missing", "no cache entry", None, None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        stored_key = meta["key"]
        shape, dtype, sha, size = tuple(meta["shape"]), meta["dtype"], meta["sha256"], meta["bytes"]
        stored_ids = meta["item_ids"]
    except FileNotFoundError:
        return "corrupt", f"metadata file {meta_path.name} is missing", None, None
    except (ValueError, KeyError, TypeError) as exc:
        return "corrupt", f"metadata file {meta_path.name} is unreadable ({type(exc).__name__}: {exc})", None, None
    if stored_key != key:
        changed = sorted(k for k in set(key) | set(stored_key) if key.get(k) != stored_key.get(k))
        return "stale", f"key differs in {', '.join(changed)}", None, None
    if not array_path.exists():
        return "corrupt", f"array file {array_path.name} is missing", None, None
    actual_size = array_path.stat().st_size
    if actual_size != size:
        return "corrupt", f"array file has {actual_size} bytes, metadata says {size} (truncated?)", None, None
    actual_sha = _file_sha256(array_path)
    if actual_sha != sha:
        return "corrupt", "array file checksum does not match its metadata", None, None
    try:
        emb = np.load(array_path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        return "corrupt", f"array file is unreadable ({exc})", None, None
    if emb.shape != shape or str(emb.dtype) != dtype or len(stored_ids) != shape[0]:
        return (
            "corrupt",
            f"array is {emb.shape} {emb.dtype}, metadata says {shape} {dtype} with {len(stored_ids)} items",
            None,
            None,
        )
    if not np.isfinite(emb).all():
        return "corrupt", "array holds NaN or Inf values", None, None
    return "hit", None, emb, meta


def cached_item_embeddings(
    cache_dir,
    dataset: str,
    item_ids: Sequence[Any],
    texts: Sequence[str],
    *,
    encoder=None,
    encoder_factory: Optional[Callable[[], Any]] = None,
    identity: Optional[Dict[str, Any]] = None,
    pca_dims: Optional[int] = None,
    normalize: bool = True,
    rebuild: bool = False,
    show_progress: Optional[bool] = None,
) -> CacheResult:
    """Item embeddings from the cache, or encoded (and cached) when the entry is missing, stale or corrupt.

    Give ``encoder`` (anything with ``encode``/``identity``), or ``encoder_factory`` plus ``identity``
    (e.g. :func:`rellax_fast.subr.encoders.identity_for`) so that a cache hit never loads the model.
    """
    from .encoders import encode_texts

    if encoder is None and encoder_factory is None:
        raise ValueError("give encoder or encoder_factory")
    if identity is None:
        if encoder is None:
            encoder = encoder_factory()
        identity = encoder.identity()
    item_ids, texts = list(item_ids), list(texts)
    if pca_dims is not None and not 1 <= pca_dims <= len(item_ids):
        # checked before encoding (postprocess checks the full bound, min(n_items, d), afterwards)
        raise ValueError(f"pca_dims must be in [1, n_items={len(item_ids)}]; got {pca_dims}")
    key = cache_key(dataset, identity, item_ids, texts, pca_dims=pca_dims, normalize=normalize)
    array_path, meta_path = cache_paths(cache_dir, dataset, identity)

    start = time.perf_counter()
    if rebuild:
        state, reason = "forced", "rebuild requested"
    else:
        state, reason, emb, _meta = check_entry(array_path, meta_path, key)
        if state == "hit":
            logger.info("embedding cache hit: %s (%d x %d)", array_path, *emb.shape)
            return CacheResult(emb, item_ids, "hit", array_path, key, None, time.perf_counter() - start)
    if state in ("stale", "corrupt"):
        logger.warning("embedding cache %s is %s (%s): rebuilding it", array_path, state, reason)
    else:
        logger.info("embedding cache %s: %s; encoding %d items", array_path, reason, len(texts))
    if encoder is None:
        encoder = encoder_factory()
    emb = encode_texts(encoder, texts, pca_dims=pca_dims, normalize=normalize, show_progress=show_progress)
    save_entry(array_path, meta_path, key, emb, item_ids)
    status = {"missing": "built", "stale": "rebuilt-stale", "corrupt": "rebuilt-corrupt", "forced": "rebuilt-forced"}
    return CacheResult(emb, item_ids, status[state], array_path, key, reason, time.perf_counter() - start)


def load_entry(array_path) -> Tuple[np.ndarray, List[Any], Dict[str, Any]]:
    """Load an entry by its array path, checking it against its own metadata (not against a fresh key)."""
    array_path = Path(array_path)
    meta_path = array_path.with_suffix(".json")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"embedding cache metadata {meta_path} is missing or unreadable: {exc}") from exc
    state, reason, emb, meta = check_entry(array_path, meta_path, meta.get("key", {}))
    if state != "hit":
        raise ValueError(f"embedding cache {array_path} is {state}: {reason}")
    return emb, meta["item_ids"], meta
