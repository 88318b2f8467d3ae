"""``rellax-fast bench finetune``: training throughput of the ReLLaX fine-tuning step (issue #14, item 3).

The full ReLLaX variant (SUBR prompts, SPA soft tokens, CFLoRA with a full C generator) on the offline
MiniLM backbone (or ``--model``), trained through the pipeline's own ``train_model`` on the same seeded
prompts, once per configuration, all in one run so that the ratios compare like with like:

* ``baseline``: the trainer as it was before this bench existed: fp32, every batch re-rendered and
  re-tokenised (a truncated prompt takes several tokeniser calls to fit), seeded random batches;
* ``+ token cache``: every prompt tokenised once (``PromptDataset``'s cache);
* ``+ length groups``: plus ``group_by_length`` (batches of similar length: less padding);
* ``+ bf16 autocast``: plus CPU bf16 autocast (``--mixed-precision bf16``), measured only where the CPU has
  native bf16 arithmetic (AVX512-BF16 or AMX): elsewhere emulated bf16 is slower than fp32 and the row says so;
* ``+ torch.compile``: plus ``backbone.compile(dynamic=True)`` (inductor); its compilation is timed apart
  (``compile_seconds``, on warm-up batches whose updates are undone). On the 2-core AVX512-BF16 machine it
  was slower than eager (0.88x of the bf16 row) after 55 s of compiling, so the trainer does not use it.

* ``+ gradient checkpointing`` and ``+ adapters in the top N layers only`` (``--adapter-layers N``), each on
  top of the length groups at the machine's fast precision (bf16 autocast where the CPU computes bf16
  natively, else fp32): the options that make a deep causal LM (SmolLM2-135M, 30 layers) trainable on a CPU
  without changing the method (issue #24 item 3); not in the default ``--configs``.

``--configs`` picks and orders the rows (keys in :data:`CONFIGS`); the first one measured is the reference
of the speedup column. Each row: optimizer steps, wall seconds (tokenisation included, the DIN and
embeddings excluded), samples/s, real and padded tokens per second, the ratio to the first row's samples/s,
and the valid AUC reached (scored on ``--n-valid`` samples after the same number of steps), so a speed-up
that costs accuracy shows. Outputs
under ``<out>/finetune/``: ``finetune.md`` and ``finetune.json``. A benchmark: numbers depend on the machine
and on what else runs on it.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

_GROUPED = {"cache": True, "group_by_length": True}
# --configs key -> (row name, options); the rows are measured in this order and the first one measured is
# the reference of the "speedup" column
CONFIGS = {
    "baseline": ("baseline", {"cache": False, "group_by_length": False, "mixed_precision": "no"}),
    "cache": ("+ token cache", {"cache": True, "group_by_length": False, "mixed_precision": "no"}),
    "groups": ("+ length groups", {**_GROUPED, "mixed_precision": "no"}),
    "bf16": ("+ bf16 autocast", {**_GROUPED, "mixed_precision": "bf16"}),
    "compile": ("+ torch.compile", {**_GROUPED, "mixed_precision": "bf16", "compile": True}),
    # the options of #24 item 3 that make a deep causal LM trainable on a CPU, each on top of the length groups
    # at the machine's fast precision (bf16 autocast where the CPU computes bf16 natively, else fp32):
    "checkpointing": (
        "+ gradient checkpointing",
        {**_GROUPED, "mixed_precision": "fast", "gradient_checkpointing": True},
    ),
    "top-layers": (
        "+ adapters in the top layers only",
        {**_GROUPED, "mixed_precision": "fast", "top_layers": True},
    ),
}
DEFAULT_CONFIGS = "baseline,cache,groups,bf16,compile"


DEFAULT_N_TRAIN = 1024  # prompts per configuration (64 steps of 16) unless --n-train is given


class _NoCache:
    """A collator view without ``encode``/``pad``: ``PromptDataset`` then re-renders every batch (the
    trainer's behaviour before the token cache)."""

    def __init__(self, collator):
        self._collator = collator

    def __call__(self, samples):
        return self._collator(samples)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--configs",
        default=DEFAULT_CONFIGS,
        help=f"comma-separated trainer configurations, measured in this order, the first one the reference of "
        f"the speedup column (default: {DEFAULT_CONFIGS}; all: {','.join(CONFIGS)}; top-layers uses "
        "--adapter-layers N, which the other rows ignore)",
    )


def parse_configs(text: str, adapter_layers: int) -> List[str]:
    keys = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in keys if k not in CONFIGS]
    if unknown or not keys:
        raise ValueError(f"--configs: unknown {unknown or text!r}; choose from {', '.join(CONFIGS)}")
    if "top-layers" in keys and adapter_layers < 1:
        raise ValueError(
            "--configs top-layers needs --adapter-layers N >= 1 (the N top layers adapted); got 0"
        )
    return keys


def run(args: argparse.Namespace, log=print) -> int:
    import sys

    from .quality import bench_pipeline_config

    try:
        args = copy.copy(args)
        from .lifelong import _parser_defaults

        if args.n_train == _parser_defaults().get(
            "n_train"
        ):  # the quality bench's 8,192: too long for 4 configs
            args.n_train = DEFAULT_N_TRAIN
        if args.n_train < 1:
            raise ValueError(
                f"--n-train must be >= 1 for bench finetune (the prompts trained on); got {args.n_train}"
            )
        cfg = bench_pipeline_config(args)
        args.configs = parse_configs(getattr(args, "configs", DEFAULT_CONFIGS), cfg.adapter_layers)
        cfg = replace(cfg, adapter_layers=0)  # only the top-layers row adapts fewer layers
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rows, meta = run_bench(args, cfg, log=log)
    out = Path(args.out) / "finetune"
    from .._io import atomic_write_text
    from .report import markdown_table

    md = f"# bench finetune\n\n{meta['title']}\n\n{meta['environment']}\n\n" + markdown_table(rows) + "\n"
    atomic_write_text(out / "finetune.md", md)
    atomic_write_text(out / "finetune.json", json.dumps({"rows": rows, "meta": meta}, indent=2, default=str))
    log(markdown_table(rows))
    log(f"wrote {out / 'finetune.md'} and finetune.json")
    return 0


@dataclass
class _Plan:
    """What every configuration of one run shares: the context, the variant, the prompts, the folders."""

    cfg: object
    ctx: object
    spec: object
    out: Path
    train_samples: list
    valid_samples: Optional[list]
    n_warm: int
    top_layers: int = 0  # the top-layers row's N (--adapter-layers)


def plan_run(args, cfg, log=print) -> _Plan:
    """The shared context (DIN, SUBR, samples) under ``<out>/finetune`` and the full variant's train and valid
    prompts, built once for every configuration."""
    from ..train.context import build_shared_context
    from ..train.pipeline import VariantSpec, make_samples, shown_positions_for

    out = Path(args.out) / "finetune"
    out.mkdir(parents=True, exist_ok=True)
    shared = copy.copy(args)
    shared.out = str(out)
    ctx = build_shared_context(shared, cfg, log=log)
    data, spec = ctx.data, VariantSpec("ReLLaX (full)")

    def prompts(split: str, index):
        part = data.splits[split].subset(index)
        shown = shown_positions_for(data, part, cfg.k, True, cfg.subr_mode, ctx.item_emb, ctx.item_ids, False)
        return make_samples(data, part, shown)

    train_samples = prompts("train", ctx.train_index)
    valid_samples = None if ctx.valid_index is None else prompts("valid", ctx.valid_index)
    n_warm = min(len(train_samples), max(1, args.warmup) * cfg.train.batch_size)
    return _Plan(cfg, ctx, spec, out, train_samples, valid_samples, n_warm, args.adapter_layers)


def fresh_model(plan: _Plan, cfg=None):
    """(a newly built full ReLLaX model, its prompt collator) under ``cfg`` (default: the plan's)."""
    from ..data.collate import PromptCollator
    from ..train.pipeline import build_rellax, load_tokenizer_and_backbone

    cfg, ctx = cfg or plan.cfg, plan.ctx
    tok, backbone, kind = load_tokenizer_and_backbone(cfg.model, cfg.kind)
    model = build_rellax(backbone, kind, tok, plan.spec, cfg, ctx.din, ctx.vocab, ctx.cond_stats)
    collator = PromptCollator(
        tok, kind=kind, max_length=cfg.max_length, placeholder=cfg.placeholder, chat=cfg.chat
    )
    return model, collator


def warm_up(plan: _Plan, model, collator, precision: str, folder: str) -> None:
    """Train ``model`` untimed on the first ``n_warm`` prompts (one-off costs, compilation)."""
    from ..train.trainer import PromptDataset, train_model

    warm = replace(plan.cfg.train, epochs=1, mixed_precision=precision, save_every_steps=0, progress=False)
    train_model(
        model,
        PromptDataset(plan.train_samples[: plan.n_warm], collator, plan.ctx.cond_train),
        warm,
        plan.out / "runs" / folder,
        log=lambda *_: None,
    )


def compile_backbone(plan: _Plan, model, collator, precision: str) -> float:
    """Compile the backbone in place and pay its compilation on warm-up batches whose updates are then undone;
    returns the compile seconds."""
    import torch

    # nn.Module.compile compiles in place: parameter names (checkpoints, lr groups) are unchanged. The
    # first batches (compilation, one recompile for dynamic lengths) are timed apart from the rate.
    model.backbone.compile(dynamic=True)
    initial = {k: v.detach().clone() for k, v in model.trainable_state().items()}
    t0 = time.perf_counter()
    warm_up(plan, model, collator, precision, "compile-warmup")
    compile_seconds = round(time.perf_counter() - t0, 1)
    with torch.no_grad():  # the timed run starts from the same initial tensors as every other row
        for k, v in model.trainable_state().items():
            v.copy_(initial[k])
    return compile_seconds


def measure_config(plan: _Plan, name: str, opts: Dict, base_rate: Optional[float], log=print):
    """(one configuration's row, its samples/s): a fresh model trained one epoch on the same prompts, timed,
    then scored on the valid prompts; ``base_rate`` (None for the first row) is the baseline's samples/s."""
    import torch

    from ..metrics import ctr_metrics
    from ..train.trainer import PromptDataset, predict_proba, resolve_mixed_precision, train_model

    ctx, train_samples = plan.ctx, plan.train_samples
    cfg = replace(
        plan.cfg,
        adapter_layers=plan.top_layers if opts.get("top_layers") else 0,
        train=replace(plan.cfg.train, gradient_checkpointing=bool(opts.get("gradient_checkpointing"))),
    )
    torch.manual_seed(cfg.seed)
    model, collator = fresh_model(plan, cfg)
    train_set = PromptDataset(
        train_samples, collator if opts["cache"] else _NoCache(collator), ctx.cond_train
    )
    tc = replace(
        cfg.train,
        epochs=1,
        group_by_length=opts["group_by_length"],
        mixed_precision=opts["mixed_precision"],
        save_every_steps=0,
        progress=False,
    )
    model.set_stage("joint")
    compile_seconds = (
        compile_backbone(plan, model, collator, opts["mixed_precision"]) if opts.get("compile") else None
    )
    t0 = time.perf_counter()
    res = train_model(
        model, train_set, tc, plan.out / "runs" / name.strip("+ ").replace(" ", "-"), log=lambda *_: None
    )
    seconds = time.perf_counter() - t0
    tokens, padded = _token_counts(
        train_set if opts["cache"] else PromptDataset(train_samples, collator), tc, tc.batch_size
    )
    rate = len(train_samples) / seconds
    row = {
        "config": name.replace("the top layers", f"the top {cfg.adapter_layers} layers"),
        "precision": resolve_mixed_precision(opts["mixed_precision"]).replace("no", "fp32"),
        "steps": res["global_step"],
        "seconds": round(seconds, 1),
        "samples_per_s": round(rate, 2),
        "tokens_per_s": round(tokens / seconds),
        "padded_tokens_per_s": round(padded / seconds),
        "padding_share": round(1 - tokens / padded, 3),
        "speedup": round(rate / (rate if base_rate is None else base_rate), 3),
        "final_loss": round(float(np.mean(res["losses"][-20:])), 4),
    }
    if compile_seconds is not None:
        row["compile_seconds"] = compile_seconds
    if plan.valid_samples is not None:
        vset = PromptDataset(plan.valid_samples, collator, ctx.cond_valid)
        probs = predict_proba(res["model"], vset, cfg.train.eval_batch_size, progress=False)
        row["valid_auc"] = round(ctr_metrics(vset.labels(), probs)["auc"], 4)
    log(f"[finetune] {json.dumps(row)}")
    return row, rate


def run_bench(args, cfg, log=print):
    """Plan (the shared prompts), warm up, measure every configuration in ``CONFIGS``; returns (rows, meta)."""
    import torch

    from ..train.trainer import cpu_has_native_bf16
    from .report import environment_line

    plan = plan_run(args, cfg, log=log)
    native_bf16 = cpu_has_native_bf16()
    on_cpu = not torch.cuda.is_available()
    # warm-up, untimed: the first steps of a process pay one-off costs (oneDNN kernel selection, allocator
    # growth, lazy imports) that would otherwise be charged to the first configuration
    model, collator = fresh_model(plan)
    for precision in ("no", "bf16") if (native_bf16 or not on_cpu) else ("no",):
        warm_up(plan, model, collator, precision, "warmup")
    del model
    rows: List[Dict[str, object]] = []
    base_rate = None
    for name, opts in (CONFIGS[key] for key in args.configs):
        if opts["mixed_precision"] == "bf16" and on_cpu and not native_bf16:
            rows.append(
                {
                    "config": name,
                    "note": "skipped: this CPU has no native bf16 (AVX512-BF16/AMX); emulated bf16 is slower than fp32",
                }
            )
            continue
        row, rate = measure_config(plan, name, opts, base_rate, log=log)
        rows.append(row)
        base_rate = rate if base_rate is None else base_rate
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ctx = plan.ctx
    meta = {
        "title": (
            f"ReLLaX (full) fine-tuning on {args.dataset}: {len(plan.train_samples)} prompts, batch {cfg.train.batch_size}, "
            f"K={cfg.k}, max_length={cfg.max_length}, backbone {cfg.model or 'all-MiniLM-L6-v2 (offline)'}; "
            f"valid AUC on {0 if ctx.valid_index is None else len(ctx.valid_index)} samples; CPU native bf16: "
            f"{native_bf16}"
        ),
        "environment": environment_line(device),
    }
    return rows, meta


def _token_counts(dataset, config, batch_size: int):
    """(real tokens, padded tokens) over one epoch in ``config``'s batch order."""
    from ..train.trainer import epoch_order

    lengths = dataset.lengths()
    order = epoch_order(dataset, config, 0, batch_size).numpy()
    real = int(lengths.sum())
    padded = sum(
        int(lengths[order[i : i + batch_size]].max()) * len(order[i : i + batch_size])
        for i in range(0, len(order), batch_size)
    )
    return real, padded
