"""On-disk cache of item embeddings: keyed, atomic, self-checking.

One cache entry is two files in the cache folder, named after the dataset, the encoder and a short hash of
the options (so entries for other options live side by side instead of overwriting each other):

- ``<dataset>__<encoder>__<kind>__<options>.npy``: the (n_items, d) float32 array (``np.save``);
- ``<dataset>__<encoder>__<kind>__<options>.json``: metadata: the full key, shape, dtype, the sha256 and
  size of the array file, and the item ids (row i of the array embeds item ``item_ids[i]``).

The key holds everything that changes the array: the dataset, the encoder identity (kind, name/path,
config hash of its files and encoding options from :mod:`rellax_fast.subr.encoders`), the post-processing
(PCA dims and how PCA is computed, with the scikit-learn version; normalisation and its epsilon), the text
template version and hashes of the item set and of the item texts. Both files are written to a temporary
file in the same folder and moved into place with ``os.replace``, the array first; the checksum in the
metadata is of the bytes this process wrote, taken before the rename, so metadata never vouches for an
array another process put there. A crash or a concurrent writer leaves either a complete entry or one whose
checksum no longer matches (rebuilt), never a half-written file under the real name. On a hit the array is
read once, and the bytes that are hashed are the bytes that are loaded.

:func:`cached_item_embeddings` loads an entry when it matches, and otherwise (re)builds it, logging why:
``missing``, ``stale`` (the key differs: other options, encoder, templates or items) or ``corrupt``
(unreadable metadata, missing or truncated array, checksum, shape or dtype mismatch, non-finite values).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .._io import atomic_write
from .._kernel_common import NORM_EPS
from .text import TEMPLATE_VERSION

logger = logging.getLogger(__name__)

CACHE_FORMAT = 2  # 2: post-processing descriptor in the key, options hash in the file name

# How :func:`rellax_fast.subr.encoders.postprocess` turns encoder outputs into the cached array; a change
# there must change this (and so every key).
POSTPROCESS = {
    "pca": "sklearn.decomposition.PCA(svd_solver='full', random_state=0)",
    "normalize": f"l2, eps {NORM_EPS:g}",  # "l2, eps 1e-12": encoders.normalize_rows
}


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
    # Not _io.json_sha256: ensure_ascii=False and no default=str give other bytes (non-ASCII titles) and refuse
    # non-JSON values; the value is stored in every cache key, so it keeps its own json.dumps arguments.
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
        raise ValueError(
            f"item_ids and texts must have the same length; got {len(item_ids)} and {len(texts)}"
        )
    postprocess = dict(POSTPROCESS)
    if pca_dims is not None:
        import sklearn

        postprocess["sklearn"] = sklearn.__version__
    key = {
        "format": CACHE_FORMAT,
        "dataset": str(dataset),
        "encoder": {k: encoder_identity.get(k) for k in ("kind", "name", "path", "config_hash")},
        "pca_dims": None if pca_dims is None else int(pca_dims),
        "normalize": bool(normalize),
        "postprocess": postprocess,
        "template_version": str(template_version),
        "n_items": len(item_ids),
        "item_set_hash": _sha256_text(_json_ids(item_ids)),
        "texts_hash": _sha256_text(list(texts)),
    }
    return json.loads(json.dumps(key))  # normalise to what a JSON round trip gives back


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "encoder"


def options_tag(key: Dict[str, Any]) -> str:
    """8 hex digits naming the key's options (everything but the item set and texts, which a rebuild follows)."""
    options = {k: v for k, v in key.items() if k not in ("n_items", "item_set_hash", "texts_hash")}
    return _sha256_text(options)[:8]


def cache_paths(
    cache_dir,
    dataset: str,
    encoder_identity: Dict[str, Any],
    *,
    pca_dims: Optional[int] = None,
    normalize: bool = True,
) -> Tuple[Path, Path]:
    """(array path, metadata path) of the entry for this dataset, encoder and options."""
    name = Path(str(encoder_identity.get("name") or "encoder")).name
    kind = {"sentence-transformers": "st", "hf-lm": "lm"}.get(encoder_identity.get("kind"), "enc")
    tag = options_tag(cache_key(dataset, encoder_identity, [], [], pca_dims=pca_dims, normalize=normalize))
    stem = f"{_slug(dataset)}__{_slug(name)}__{kind}__{tag}"
    root = Path(cache_dir)
    return root / f"{stem}.npy", root / f"{stem}.json"


def save_entry(
    array_path: Path, meta_path: Path, key: Dict[str, Any], embeddings: np.ndarray, item_ids
) -> Dict:
    """Write one entry atomically (array first, then the metadata that vouches for it); return the metadata.

    The checksum and size are of the bytes serialised here, before the rename: never of whatever file sits
    at ``array_path`` afterwards (another process may have replaced it in between).
    """
    emb = np.ascontiguousarray(embeddings, dtype=np.float32)
    if emb.ndim != 2 or emb.shape[0] != len(item_ids):
        raise ValueError(f"embeddings must be (n_items={len(item_ids)}, d); got shape {emb.shape}")
    buffer = io.BytesIO()
    np.save(buffer, emb, allow_pickle=False)
    payload_array = buffer.getvalue()
    atomic_write(Path(array_path), lambda fh: fh.write(payload_array))
    meta = {
        "key": key,
        "file": Path(array_path).name,
        "shape": list(emb.shape),
        "dtype": str(emb.dtype),
        "sha256": hashlib.sha256(payload_array).hexdigest(),
        "bytes": len(payload_array),
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
        return (
            "corrupt",
            f"metadata file {meta_path.name} is unreadable ({type(exc).__name__}: {exc})",
            None,
            None,
        )
    if stored_key != key:
        changed = sorted(k for k in set(key) | set(stored_key) if key.get(k) != stored_key.get(k))
        return "stale", f"key differs in {', '.join(changed)}", None, None
    try:
        raw = array_path.read_bytes()  # read once: the bytes hashed are the bytes loaded
    except FileNotFoundError:
        return "corrupt", f"array file {array_path.name} is missing", None, None
    if len(raw) != size:
        return "corrupt", f"array file has {len(raw)} bytes, metadata says {size} (truncated?)", None, None
    if hashlib.sha256(raw).hexdigest() != sha:
        return "corrupt", "array file checksum does not match its metadata", None, None
    try:
        emb = np.load(io.BytesIO(raw), allow_pickle=False)
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
    array_path, meta_path = cache_paths(cache_dir, dataset, identity, pca_dims=pca_dims, normalize=normalize)

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
        built = {k: encoder.identity().get(k) for k in ("kind", "name", "path", "config_hash")}
        if built != {
            k: identity.get(k) for k in built
        }:  # the identity given for the lookup must describe the encoder that was built
            logger.warning(
                "embedding cache: the encoder built reports identity %s, not the %s it was looked up "
                "by; keying the entry by the encoder's own",
                built,
                identity,
            )
            identity = built
            key = cache_key(dataset, identity, item_ids, texts, pca_dims=pca_dims, normalize=normalize)
            array_path, meta_path = cache_paths(
                cache_dir, dataset, identity, pca_dims=pca_dims, normalize=normalize
            )
    emb = encode_texts(encoder, texts, pca_dims=pca_dims, normalize=normalize, show_progress=show_progress)
    save_entry(array_path, meta_path, key, emb, item_ids)
    status = {
        "missing": "built",
        "stale": "rebuilt-stale",
        "corrupt": "rebuilt-corrupt",
        "forced": "rebuilt-forced",
    }
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
