"""``rellax-fast bench e2e``: whole training steps and inference calls of a Llama model, CFLoRA vs PEFT LoRA.

This module is the suite's entry: :func:`run_suite` (sizes, order of the phases, the partial report a killed
run leaves, the report title), :func:`plot`, and :func:`main`, the ``benchmarks-section`` command with which
``scripts/gpu_check.sh`` appends a GPU run's results to BENCHMARKS.md (the writer itself is
:func:`rellax_fast.bench.report.append_benchmarks_section`). The measurements live one concern per module,
their public names re-exported here:

- :mod:`.e2e_models`: the size table and the base / CFLoRA / PEFT model builders;
- :mod:`.e2e_train`: the training providers, their timed step and ratios;
- :mod:`.e2e_infer`: the inference providers, prefill and decode;
- :mod:`.e2e_scoring`: the optional CTR-scoring rows through ``rellax-fast eval``;
- :mod:`.e2e_common`: the report columns, row and ratio helpers, memory accounting.

Model: ``LlamaForCausalLM`` built from a config with random weights (nothing is downloaded), SDPA
attention, the base frozen. Adapters on q, k, v, o, gate, up and down projections, r=16, alpha=32,
LoRA dropout 0.05 (the TALLRec/ReLLa recipe), bf16 on the GPU. Sizes (``--size``; ``cpu`` -> ``tiny``,
``gpu`` -> ``1b``):

- ``tiny``: hidden 64, 2 layers, sequence 64; a CPU/CI smoke test, not a performance figure;
- ``1b``: hidden 2048, 16 layers, 32 heads / 8 KV heads (GQA), intermediate 5632, sequence 512;
- ``7b-layer``: the 7B decoder layer (hidden 4096, 32 heads, intermediate 11008) repeated twice;
- ``smollm2``: the pretrained SmolLM2-135M-Instruct (the named offline backbone ``smollm2-135m``: 30 layers,
  hidden 576, 9 heads / 3 KV heads), fp32 weights under bf16 autocast, ReLLaX's adapter (r=8, alpha=16,
  dropout 0.05) on q/v and on all-linear, batch 8 x 168. Its suite is the paper-scale comparison: per target
  set, a training step of PEFT LoRA, CFLoRA identity and CFLoRA full, and decode of per-sample CFLoRA against
  merged LoRA at batch 1 and 8 (the tokens inside one conditioning block opened at the prefill, as
  ``generate(..., cflora_cond=...)`` holds one per generation, so each layer's C is computed once), each
  group of providers built together and timed interleaved (round-robin, :func:`.e2e_common.interleaved_ms`)
  so that a drifting machine load hits every provider alike.

Training step = forward + causal-LM loss + backward + AdamW step over the adapter parameters, in the same
run for every provider:

- ``rellax-fast full (auto)``: CFLoRA with a per-sample C ("full" interaction, one cond vector per sample),
  the automatic (fastest) backend of ``ops.cflora_linear``;
- ``rellax-fast full (reference)``: the same model on the PyTorch reference backend;
- ``rellax-fast identity (auto)``: plain LoRA through the fused op (C = I), the like-for-like case of PEFT;
- ``PEFT LoRA``: ``peft.get_peft_model`` with the same targets, r, alpha and dropout (the adapters kept in
  the model dtype, ``autocast_adapter_dtype=False``, so both sides run bf16) - the baseline;
- ``PEFT LoRA + apply_cflora``: the same PEFT model with :func:`rellax_fast.cflora.apply_cflora`, which runs
  every PEFT LoRA Linear through the fused ``ops.cflora_linear`` (C = None) with the state_dict unchanged -
  the Liger-style kernels-only path, next to its PEFT baseline;
- ``PEFT LoRA + torch.compile``, ``rellax-fast full (auto) + torch.compile`` and ``rellax-fast identity
  (auto) + torch.compile``: those models under ``torch.compile``, timed last (a failure becomes a row with a
  note; the first call's compile time is in the note). Compiled, the fused op's Python wrapper
  (validation, backend choice) runs once at trace time, not per call.

Inference (eval mode, ``torch.inference_mode``), prefill of a prompt and decode of one token on a KV cache
of the prompt's length, at batch 1 and 32 (tiny: 1 and 4):

- ``rellax-fast full (per-sample C)``: cannot be merged, runs the fused op;
- ``rellax-fast identity merged``: ``merge_cflora`` folded ΔW into W;
- ``PEFT LoRA unmerged``, ``PEFT LoRA unmerged + apply_cflora`` and ``PEFT LoRA merged``
  (``merge_and_unload``) - the latter is the baseline.

Columns: ``ms`` (median step or call time), ``tokens_per_s``, ``peak_mem_mb`` (memory above the resident
model + optimizer state during one step: CUDA allocator peak; on the CPU the growth of peak RSS, coarse),
``resident_mb`` (CUDA only: the provider's weights, adapters and optimizer state), ``total_peak_mb``
(CUDA only: resident + peak, the provider's whole footprint during a step), ``speed_vs_baseline``
(baseline ms / ms: above 1 is faster), ``mem_vs_baseline`` and, for training, ``speed_vs_compiled``
(against PEFT + torch.compile).

CTR scoring (optional): with ``RELLAX_BENCH_EVAL_RUN=<run folder of rellax-fast train>`` (or
``args.eval_run``), ``rellax-fast eval --run <folder> --n N`` runs in process (N from
``RELLAX_BENCH_EVAL_N``, default 1000) and two ``ctr-score`` rows report samples/s: the scoring part
(``train.trainer.predict_proba``, timed by wrapping it) and the whole command (model load, DIN, retrieval,
prompts, scoring). Without a run folder these rows are left out: the suite does not train a model.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

# The suite's pieces, one module per concern; their public names are re-exported here (tests, benchmarks/
# and scripts import them as ``rellax_fast.bench.e2e.<name>``).
from .e2e_common import COLUMNS, error_note, free_memory, row
from .e2e_infer import (
    INFER_BASELINE,
    INFER_PROVIDERS,
    PATCHED_INFER_PROVIDER,
    PRETRAINED_INFER_PROVIDERS,
    bench_decode_interleaved,
    bench_inference,
)
from .e2e_models import (
    SIZE_ALIASES,
    SIZES,
    TARGET_MODULES,
    E2ESize,
    build_base_model,
    cflora_model,
    peft_model,
    resolve_size,
    resolved_backend,
)
from .e2e_scoring import EVAL_N_ENV, EVAL_RUN_ENV, bench_ctr_scoring
from .e2e_train import (
    COMPILED_PROVIDER,
    PATCHED_PROVIDER,
    PRETRAINED_TRAIN_PROVIDERS,
    TRAIN_BASELINE,
    TRAIN_PROVIDERS,
    add_training_ratios,
    bench_training,
    bench_training_interleaved,
    is_compiled,
)

__all__ = [
    "COLUMNS",
    "COMPILED_PROVIDER",
    "E2ESize",
    "EVAL_N_ENV",
    "EVAL_RUN_ENV",
    "INFER_BASELINE",
    "INFER_PROVIDERS",
    "PATCHED_INFER_PROVIDER",
    "PATCHED_PROVIDER",
    "PRETRAINED_INFER_PROVIDERS",
    "PRETRAINED_TRAIN_PROVIDERS",
    "SIZES",
    "SIZE_ALIASES",
    "TARGET_MODULES",
    "TRAIN_BASELINE",
    "TRAIN_PROVIDERS",
    "add_training_ratios",
    "bench_ctr_scoring",
    "bench_decode_interleaved",
    "bench_inference",
    "bench_training",
    "bench_training_interleaved",
    "build_base_model",
    "cflora_model",
    "is_compiled",
    "main",
    "peft_model",
    "plot",
    "resolve_size",
    "resolved_backend",
    "run_suite",
]


# --------------------------------------------------------------------------------------------- suite


def _dtype_and_device(args):
    import torch

    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    name = args.dtype if args.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    return device, getattr(torch, name)


def plot(rows: Sequence[Dict[str, object]], path: str) -> str:
    """PNG bar charts: ``path`` (training tokens/s per provider), ``*_memory.png`` (training peak memory)
    and ``*_inference.png`` (prefill/decode speed per batch relative to the merged-LoRA baseline)."""
    from . import report

    train = [r for r in rows if r["phase"] == "train" and r.get("ms") is not None]
    infer = [r for r in rows if r["phase"] in ("prefill", "decode") and r.get("ms") is not None]
    stem = path[:-4] if path.endswith(".png") else path
    if train:
        report.bar_chart(
            train, path, ["provider"], "tokens_per_s", "phase", "training step: tokens/s (higher is better)"
        )
        if any(r.get("peak_mem_mb") is not None for r in train):  # the interleaved suite measures no memory
            report.bar_chart(
                train,
                f"{stem}_memory.png",
                ["provider"],
                "peak_mem_mb",
                "phase",
                "training step: peak memory above resident, MiB (lower is better)",
            )
    if infer:
        # speed relative to the merged baseline: prefill and decode latencies differ by orders of magnitude
        report.bar_chart(
            infer,
            f"{stem}_inference.png",
            ["phase", "batch"],
            "speed_vs_baseline",
            "provider",
            f"inference speed vs {INFER_BASELINE} (baseline ms / ms; higher is better)",
        )
    return path


def run_suite(args) -> Tuple[List[Dict[str, object]], Dict[str, object]]:
    """Run the e2e suite for ``args`` (size, device, dtype, warmup, repeat, out; optional
    ``compile_backend``, default inductor) and return ``(rows, meta)``."""
    from . import report

    size = resolve_size(args.size)
    spec = SIZES[size]
    device, dtype = _dtype_and_device(args)
    compile_backend = getattr(args, "compile_backend", None) or os.environ.get(
        "RELLAX_BENCH_COMPILE_BACKEND", "inductor"
    )
    out_dir = getattr(args, "out", None) or "bench_out"
    header = f"# bench e2e (partial: the run has not finished)\n\n{report.environment_line(device)}"

    def progress(rows: List[Dict[str, object]]) -> None:
        # a killed run (timeout) still leaves what it measured
        report.write_reports(rows, out_dir, "e2e_partial", header)

    t0 = time.perf_counter()
    base = build_base_model(spec, device, dtype)
    n_params = sum(p.numel() for p in base.parameters())
    print(
        f"  model: LlamaForCausalLM {size}, {n_params / 1e6:.2f}M params, {dtype}, built in "
        f"{time.perf_counter() - t0:.1f} s",
        flush=True,
    )
    if spec.backbone is not None:
        train = bench_training_interleaved(base, spec, device, dtype, args.warmup, args.repeat, progress)
        rows = train + bench_decode_interleaved(
            base, spec, device, dtype, args.warmup, args.repeat, progress, train
        )
        del base
        free_memory(device)
        _remove_partial(out_dir)
        return rows, {"title": _pretrained_title(size, spec, n_params, args), "plot": plot}
    rows = _random_weight_rows(base, spec, device, dtype, args, compile_backend, progress)
    del base
    free_memory(device)
    eval_run = getattr(args, "eval_run", None) or os.environ.get(EVAL_RUN_ENV)
    if eval_run:
        rows += _ctr_scoring_rows(eval_run, out_dir)
    _remove_partial(out_dir)
    title = _random_title(size, spec, n_params, dtype, device, args, compile_backend, eval_run)
    return rows, {"title": title, "plot": plot}


def _random_weight_rows(
    base, spec, device, dtype, args, compile_backend, progress
) -> List[Dict[str, object]]:
    """The training rows (with their ratios) and the inference rows of a random-weights model."""
    # torch.compile last: if its compile time runs a time-boxed job out, every other row is already saved
    eager = tuple(p for p in TRAIN_PROVIDERS if not is_compiled(p[1]))
    compiled = tuple(p for p in TRAIN_PROVIDERS if is_compiled(p[1]))
    train = bench_training(
        base, spec, device, dtype, args.warmup, args.repeat, compile_backend, progress, eager
    )
    infer = bench_inference(base, spec, device, dtype, args.warmup, args.repeat, progress, train)
    train += bench_training(
        base,
        spec,
        device,
        dtype,
        args.warmup,
        args.repeat,
        compile_backend,
        progress,
        compiled,
        done=train + infer,
    )
    add_training_ratios(train)
    return train + infer


def _ctr_scoring_rows(eval_run: str, out_dir: str) -> List[Dict[str, object]]:
    """``rellax-fast eval --run eval_run`` timed (or one row with the error)."""
    print(f"  ctr scoring: rellax-fast eval --run {eval_run} ...", flush=True)
    n_eval = int(os.environ.get(EVAL_N_ENV, "1000"))
    try:
        return bench_ctr_scoring(eval_run, n_eval, 64, out_dir)
    except Exception as exc:
        return [row("ctr-score", "rellax-fast eval", 64, None, note=error_note(exc))]


def _random_title(size, spec, n_params, dtype, device, args, compile_backend, eval_run) -> str:
    return (
        f"LlamaForCausalLM `{size}` with random weights ({n_params / 1e6:.3g}M params: hidden {spec.hidden}, "
        f"{spec.layers} layers, {spec.heads} heads / {spec.kv_heads} KV heads, intermediate {spec.intermediate}, "
        f"vocab {spec.vocab}), {dtype}, SDPA attention. Adapters on {', '.join(TARGET_MODULES)}, r={spec.r}, "
        f"alpha={spec.alpha:g}, LoRA dropout {spec.lora_dropout}, cond_dim {spec.cond_dim}. "
        f"Training: batch {spec.train_batch} x {spec.seq} tokens, forward+loss+backward+AdamW; baseline "
        f"`{TRAIN_BASELINE}` (speed_vs_compiled: against `{COMPILED_PROVIDER}`, compile backend "
        f"{compile_backend}). Inference: prompt {spec.prompt}, prefill and one decode token on the KV cache; "
        f"baseline `{INFER_BASELINE}`. ms = median of {args.repeat} after {args.warmup} warm-up; "
        "peak_mem_mb = memory above the resident model + optimizer state during one call "
        + (
            "(CUDA allocator peak); training mem_vs_baseline compares total_peak_mb = resident + peak."
            if device.type == "cuda"
            else "(CPU: growth of peak RSS, coarse)."
        )
        + (
            f" ctr-score rows: `rellax-fast eval --run {eval_run}`, samples/s."
            if eval_run
            else f" CTR scoring through `rellax-fast eval` not measured (set {EVAL_RUN_ENV} to a trained run folder)."
        )
    )


def _remove_partial(out_dir: str) -> None:
    partial = os.path.join(out_dir, "e2e_partial")
    for ext in (".csv", ".md"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(partial + ext)


def _pretrained_title(size: str, spec: E2ESize, n_params: int, args) -> str:
    sets = "; ".join(f"{label}: {', '.join(targets)}" for label, targets in spec.target_sets)
    precision = "fp32 weights under bf16 autocast" if spec.autocast else "weights in the bench dtype"
    return (
        f"`{size}`: the pretrained {spec.backbone} (LlamaForCausalLM, {n_params / 1e6:.4g}M params: hidden "
        f"{spec.hidden}, {spec.layers} layers, {spec.heads} heads / {spec.kv_heads} KV heads), {precision}, SDPA "
        f"attention. Adapters r={spec.r}, alpha={spec.alpha:g}, LoRA dropout {spec.lora_dropout}, cond_dim "
        f"{spec.cond_dim}, per target set ({sets}). Training: batch {spec.train_batch} x {spec.seq} random tokens, "
        f"forward+loss+backward+AdamW; providers {', '.join(n for n, _ in PRETRAINED_TRAIN_PROVIDERS)}, baseline "
        f"`{TRAIN_BASELINE}` on the same targets. Decode: one token on the KV cache of a {spec.prompt}-token "
        f"prompt at batch {', '.join(map(str, spec.infer_batches))}; {PRETRAINED_INFER_PROVIDERS[0]} against "
        f"`{INFER_BASELINE}`. Each group of providers (one target set; one target set and batch) is built together "
        f"and timed interleaved, rotating the order: ms = median of {args.repeat} rounds after {args.warmup} "
        "warm-up rounds. No memory columns (the providers share the process)."
    )


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m rellax_fast.bench.e2e benchmarks-section ...`` (used by scripts/gpu_check.sh)."""
    parser = argparse.ArgumentParser(prog="python -m rellax_fast.bench.e2e")
    sub = parser.add_subparsers(dest="action", required=True)
    p = sub.add_parser("benchmarks-section", help="write (and optionally append) a BENCHMARKS.md section")
    p.add_argument("--out-dir", required=True, help="folder holding <suite>.md reports")
    p.add_argument("--command", required=True, help="the exact command that produced them")
    p.add_argument("--suites", default="cflora,topk,e2e")
    p.add_argument("--section-file", required=True, help="where to write the section alone")
    p.add_argument("--append-to", default=None, help="BENCHMARKS.md to append the section to")
    p.add_argument("--title", default="GPU check")
    args = parser.parse_args(argv)
    from .._io import atomic_write_text
    from .report import append_benchmarks_section, benchmarks_section

    suites = [s for s in args.suites.split(",") if s]
    if args.append_to:
        section = append_benchmarks_section(
            args.append_to, args.out_dir, args.command, suites, title=args.title
        )
    else:
        section = benchmarks_section(args.out_dir, args.command, suites, title=args.title)
    atomic_write_text(args.section_file, section)
    print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
