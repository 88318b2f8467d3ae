"""``rellax-fast bench e2e``: whole training steps and inference calls of a Llama model, CFLoRA vs PEFT LoRA.

This suite owns the end-to-end measurements (issue 8) and the helper that appends a GPU run's results to
BENCHMARKS.md (:func:`append_benchmarks_section`, used by ``scripts/gpu_check.sh``).

Model: ``LlamaForCausalLM`` built from a config with random weights (nothing is downloaded), SDPA
attention, the base frozen. Adapters on q, k, v, o, gate, up and down projections, r=16, alpha=32,
LoRA dropout 0.05 (the TALLRec/ReLLa recipe), bf16 on the GPU. Sizes (``--size``; ``cpu`` -> ``tiny``,
``gpu`` -> ``1b``):

- ``tiny``: hidden 64, 2 layers, sequence 64; a CPU/CI smoke test, not a performance figure;
- ``1b``: hidden 2048, 16 layers, 32 heads / 8 KV heads (GQA), intermediate 5632, sequence 512;
- ``7b-layer``: the 7B decoder layer (hidden 4096, 32 heads, intermediate 11008) repeated twice.

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
- ``PEFT LoRA + torch.compile``: the same model under ``torch.compile`` (a failure becomes a row with a
  note; the compile time is in the note).

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
import copy
import dataclasses
import gc
import math
import os
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SIZE_ALIASES = {"cpu": "tiny", "gpu": "1b"}
EVAL_RUN_ENV = "RELLAX_BENCH_EVAL_RUN"
EVAL_N_ENV = "RELLAX_BENCH_EVAL_N"
TRAIN_BASELINE = "PEFT LoRA"
COMPILED_PROVIDER = "PEFT LoRA + torch.compile"
PATCHED_PROVIDER = "PEFT LoRA + apply_cflora"
PATCHED_INFER_PROVIDER = "PEFT LoRA unmerged + apply_cflora"
INFER_BASELINE = "PEFT LoRA merged"


@dataclasses.dataclass(frozen=True)
class E2ESize:
    """Model shape and workload of one ``--size``."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    train_batch: int
    seq: int
    infer_batches: Tuple[int, ...]
    prompt: int
    r: int = 16
    alpha: float = 32.0
    lora_dropout: float = 0.05
    cond_dim: int = 64


SIZES: Dict[str, E2ESize] = {
    "tiny": E2ESize(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=172, vocab=256, train_batch=2,
                    seq=64, infer_batches=(1, 4), prompt=32),
    "1b": E2ESize(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=5632, vocab=32000, train_batch=8,
                  seq=512, infer_batches=(1, 32), prompt=512),
    "7b-layer": E2ESize(hidden=4096, layers=2, heads=32, kv_heads=32, intermediate=11008, vocab=32000,
                        train_batch=8, seq=512, infer_batches=(1, 32), prompt=512),
}

# name -> (interaction, backend) for CFLoRA providers; "peft" / "peft-compile" for the baselines
TRAIN_PROVIDERS: Tuple[Tuple[str, str, Optional[str]], ...] = (
    ("rellax-fast full (auto)", "full", None),
    ("rellax-fast full (reference)", "full", "reference"),
    ("rellax-fast identity (auto)", "identity", None),
    (TRAIN_BASELINE, "peft", None),
    (PATCHED_PROVIDER, "peft-apply", None),
    (COMPILED_PROVIDER, "peft-compile", None),
)
INFER_PROVIDERS: Tuple[str, ...] = (
    "rellax-fast full (per-sample C)",
    "rellax-fast identity merged",
    "PEFT LoRA unmerged",
    PATCHED_INFER_PROVIDER,
    INFER_BASELINE,
)
COLUMNS = ("phase", "provider", "batch", "seq", "ms", "tokens_per_s", "peak_mem_mb", "resident_mb", "total_peak_mb",
           "baseline", "speed_vs_baseline", "mem_vs_baseline", "speed_vs_compiled", "loss", "note")


def resolve_size(size: str) -> str:
    size = SIZE_ALIASES.get(size, size)
    if size not in SIZES:
        raise ValueError(f"bench e2e: --size must be one of tiny, 1b, 7b-layer, cpu, gpu; got {size!r}")
    return size


# --------------------------------------------------------------------------------------------- models


def build_base_model(spec: E2ESize, device, dtype):
    """A frozen random-weight ``LlamaForCausalLM`` of ``spec``'s shape on ``device`` in ``dtype``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=spec.vocab,
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        max_position_embeddings=max(spec.seq, spec.prompt) + 16,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise directly in the bench dtype on the device (no fp32 copy)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.to(device=device, dtype=dtype)
    model.requires_grad_(False)
    return model


def cflora_model(base, spec: E2ESize, interaction: str, backend: Optional[str], device, dtype):
    from rellax_fast.cflora import CFLoRAConfig, inject_cflora
    from rellax_fast.cflora.interaction import INTERACTIONS

    model = copy.deepcopy(base)
    config = CFLoRAConfig(
        r=spec.r, alpha=spec.alpha, dropout=spec.lora_dropout, target_modules=list(TARGET_MODULES),
        interaction=interaction, cond_dim=spec.cond_dim if INTERACTIONS[interaction].needs_cond else None, backend=backend,
    )
    inject_cflora(model, config)
    return model.to(device=device, dtype=dtype)


def peft_model(base, spec: E2ESize, device, dtype, patched: bool = False):
    """PEFT LoRA on a copy of ``base``; ``patched``: with :func:`rellax_fast.cflora.apply_cflora` (fused op)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.lora_dropout,
                        target_modules=list(TARGET_MODULES), bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(copy.deepcopy(base), config, autocast_adapter_dtype=False)
    model = model.to(device=device, dtype=dtype)
    if patched:
        from rellax_fast.cflora import apply_cflora

        apply_cflora(model)
    return model


def resolved_backend(device, backend: Optional[str]) -> str:
    from rellax_fast.ops import resolve

    try:
        return resolve("cflora_linear", device, backend)
    except Exception as exc:  # reported in the row's note, the run itself raises the same error
        return f"unavailable ({exc})"


# --------------------------------------------------------------------------------------------- helpers


def _free(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _allocated_mb(device) -> Optional[float]:
    import torch

    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return torch.cuda.memory_allocated(device) / 2**20


def _error_note(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"failed: {type(exc).__name__}: {text[:300]}"


def _row(phase: str, provider: str, batch: int, seq: int, **values) -> Dict[str, object]:
    row = {c: None for c in COLUMNS}
    row.update(phase=phase, provider=provider, batch=batch, seq=seq)
    row.update(values)
    return row


def _ratio(num: Optional[float], den: Optional[float]) -> Optional[float]:
    if num is None or den is None or not math.isfinite(num) or not math.isfinite(den) or den <= 0:
        return None
    return num / den


# --------------------------------------------------------------------------------------------- training


def _train_provider(name: str, kind: str, backend: Optional[str], base, spec: E2ESize, device, dtype,
                    ids, cond, warmup: int, repeat: int, compile_backend: str) -> Dict[str, object]:
    import torch

    from . import report

    alloc0 = _allocated_mb(device)
    note = []
    if kind in ("peft", "peft-compile", "peft-apply"):
        model = peft_model(base, spec, device, dtype, patched=kind == "peft-apply")
        condition = contextlib.nullcontext
        if kind == "peft-apply":
            note.append(f"apply_cflora, backend {resolved_backend(device, None)}")
    else:
        from rellax_fast.cflora import cflora_condition

        model = cflora_model(base, spec, kind, backend, device, dtype)
        note.append(f"backend {resolved_backend(device, backend)}")
        condition = (lambda: cflora_condition(model, cond)) if kind != "identity" else contextlib.nullcontext
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    note.append(f"{n_trainable / 1e6:.2f}M trainable")
    forward = model
    if kind == "peft-compile":
        forward = torch.compile(model, backend=compile_backend)
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    losses: List[float] = []

    def step() -> None:
        with condition():
            loss = forward(input_ids=ids, labels=ids).loss
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    if kind == "peft-compile":  # the first call compiles: time it separately, then warm up as usual
        t0 = time.perf_counter()
        step()
        report.sync(device)
        note.append(f"torch.compile backend={compile_backend}, first call {time.perf_counter() - t0:.1f} s")
    ms = report.time_ms(step, device, warmup=warmup, repeat=repeat)
    resident = _allocated_mb(device)
    peak = report.peak_memory_mb(step, device)
    first_loss = float(losses[0])
    if not all(bool(torch.isfinite(v)) for v in losses):
        raise FloatingPointError(f"{name}: non-finite training loss {[float(v) for v in losses]}")
    tokens = ids.numel()
    row = _row("train", name, ids.shape[0], ids.shape[1], ms=ms, tokens_per_s=tokens / (ms / 1e3),
               peak_mem_mb=peak, resident_mb=None if alloc0 is None else resident - alloc0,
               total_peak_mb=None if alloc0 is None else resident - alloc0 + peak,
               loss=first_loss, note="; ".join(note))
    return row  # the model and optimizer die with this frame; the caller frees the cache


def bench_training(base, spec: E2ESize, device, dtype, warmup: int, repeat: int, compile_backend: str,
                   progress: Callable[[List[Dict[str, object]]], None], providers=TRAIN_PROVIDERS,
                   done: Sequence[Dict[str, object]] = ()) -> List[Dict[str, object]]:
    """One row per training provider in ``providers`` (a failure becomes a row with the error in ``note``)."""
    import torch

    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, spec.vocab, (spec.train_batch, spec.seq), generator=gen).to(device)
    cond = torch.randn(spec.train_batch, spec.cond_dim, generator=gen).to(device=device, dtype=dtype)
    rows: List[Dict[str, object]] = []
    for name, kind, backend in providers:
        print(f"  train: {name} ...", flush=True)
        try:
            row = _train_provider(name, kind, backend, base, spec, device, dtype, ids, cond, warmup, repeat,
                                  compile_backend)
        except Exception as exc:  # one provider's failure must not hide the others: record it
            row = _row("train", name, spec.train_batch, spec.seq, note=_error_note(exc))
        if kind == "peft-compile":
            torch._dynamo.reset()
        _free(device)
        rows.append(row)
        progress(list(done) + rows)
    return rows


def add_training_ratios(rows: List[Dict[str, object]]) -> None:
    """Fill ``baseline``, ``speed_vs_baseline``, ``mem_vs_baseline`` and ``speed_vs_compiled`` of train rows."""
    by_name = {r["provider"]: r for r in rows}
    base_row, compiled_row = by_name.get(TRAIN_BASELINE), by_name.get(COMPILED_PROVIDER)
    for r in rows:
        r["baseline"] = TRAIN_BASELINE
        if base_row is not None:
            r["speed_vs_baseline"] = _ratio(base_row["ms"], r["ms"])
            # the whole footprint where it is known (CUDA), else the step's peak above the resident state
            key = "total_peak_mb" if base_row["total_peak_mb"] is not None else "peak_mem_mb"
            r["mem_vs_baseline"] = _ratio(r[key], base_row[key])
        if compiled_row is not None:
            r["speed_vs_compiled"] = _ratio(compiled_row["ms"], r["ms"])


# --------------------------------------------------------------------------------------------- inference


def _inference_model(name: str, base, spec: E2ESize, device, dtype):
    """(model, needs_cond, note) for an inference provider."""
    if name == "rellax-fast full (per-sample C)":
        return cflora_model(base, spec, "full", None, device, dtype), True, f"backend {resolved_backend(device, None)}"
    if name == "rellax-fast identity merged":
        from rellax_fast.cflora import merge_cflora

        model = cflora_model(base, spec, "identity", None, device, dtype)
        merge_cflora(model)
        return model, False, "merge_cflora"
    if name == PATCHED_INFER_PROVIDER:
        model = peft_model(base, spec, device, dtype, patched=True)
        return model, False, f"unmerged, apply_cflora, backend {resolved_backend(device, None)}"
    model = peft_model(base, spec, device, dtype)
    if name == INFER_BASELINE:
        return model.merge_and_unload(), False, "merge_and_unload"
    return model, False, "unmerged"


def _cache_kwarg() -> str:
    """The forward keyword of the KV cache: ``cache`` in newer transformers, ``past_key_values`` before."""
    import inspect

    from transformers import LlamaForCausalLM

    return "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


def _output_cache(out):
    cache = out.get("cache") if hasattr(out, "get") else None
    return cache if cache is not None else out.past_key_values


def _infer_provider(name: str, base, spec: E2ESize, device, dtype, prompts, conds, warmup: int,
                    repeat: int) -> List[Dict[str, object]]:
    import torch

    from . import report

    model, needs_cond, note = _inference_model(name, base, spec, device, dtype)
    model.eval()
    if needs_cond:
        from rellax_fast.cflora import cflora_condition
    rows = []
    for batch, prompt in prompts.items():
        cond = conds[batch]
        condition = (lambda c=cond: cflora_condition(model, c)) if needs_cond else contextlib.nullcontext
        with torch.inference_mode():
            def prefill(p=prompt, condition=condition):
                with condition():
                    return model(input_ids=p, use_cache=True)

            out = prefill()
            cache = _output_cache(out)
            next_token = out.logits[:, -1:].argmax(-1)
            if not bool(torch.isfinite(out.logits).all()):
                raise FloatingPointError(f"{name}: non-finite prefill logits at batch {batch}")
            del out

            def decode(tok=next_token, kv=cache, length=prompt.shape[1], condition=condition):
                with condition():
                    logits = model(input_ids=tok, use_cache=True, **{_cache_kwarg(): kv}).logits
                extra = kv.get_seq_length() - length
                if extra > 0:  # back to the prompt's length: every timed call decodes the same position
                    kv.crop(-extra)
                return logits

            phases = (("prefill", prefill, batch * prompt.shape[1]), ("decode", decode, batch))
            for phase, fn, tokens in phases:
                ms = report.time_ms(fn, device, warmup=warmup, repeat=repeat)
                peak = report.peak_memory_mb(fn, device)
                rows.append(_row(phase, name, batch, prompt.shape[1], ms=ms, tokens_per_s=tokens / (ms / 1e3),
                                 peak_mem_mb=peak, note=note))
    return rows  # the model dies with this frame; the caller frees the cache


def bench_inference(base, spec: E2ESize, device, dtype, warmup: int, repeat: int,
                    progress: Callable[[List[Dict[str, object]]], None],
                    done: List[Dict[str, object]]) -> List[Dict[str, object]]:
    import torch

    gen = torch.Generator().manual_seed(2)
    prompts = {b: torch.randint(0, spec.vocab, (b, spec.prompt), generator=gen).to(device)
               for b in spec.infer_batches}
    conds = {b: torch.randn(b, spec.cond_dim, generator=gen).to(device=device, dtype=dtype)
             for b in spec.infer_batches}
    rows: List[Dict[str, object]] = []
    for name in INFER_PROVIDERS:
        print(f"  inference: {name} ...", flush=True)
        try:
            rows += _infer_provider(name, base, spec, device, dtype, prompts, conds, warmup, repeat)
        except Exception as exc:
            note = _error_note(exc)
            rows += [_row(phase, name, b, spec.prompt, note=note)
                     for b in spec.infer_batches for phase in ("prefill", "decode")]
        _free(device)
        progress(done + rows)
    baseline = {(r["phase"], r["batch"]): r for r in rows if r["provider"] == INFER_BASELINE}
    for r in rows:
        r["baseline"] = INFER_BASELINE
        b = baseline.get((r["phase"], r["batch"]))
        if b is not None:
            r["speed_vs_baseline"] = _ratio(b["ms"], r["ms"])
            r["mem_vs_baseline"] = _ratio(r["peak_mem_mb"], b["peak_mem_mb"])
    return rows


# --------------------------------------------------------------------------------------------- CTR scoring


def bench_ctr_scoring(run_dir: str, n: int, batch_size: int, out_dir: str) -> List[Dict[str, object]]:
    """Samples/s of ``rellax-fast eval --run run_dir --n n``: its scoring part and the whole command."""
    import torch

    from rellax_fast.cli import main as cli_main
    from rellax_fast.train import trainer

    from . import report

    timings: List[Tuple[float, int]] = []
    original = trainer.predict_proba

    def timed_predict_proba(model, dataset, *args, **kwargs):
        device = next(model.parameters()).device
        report.sync(device)
        t0 = time.perf_counter()
        probs = original(model, dataset, *args, **kwargs)
        report.sync(device)
        timings.append((time.perf_counter() - t0, len(probs)))
        return probs

    eval_out = os.path.join(out_dir, "e2e_eval")
    trainer.predict_proba = timed_predict_proba  # cli_eval imports it at call time, so it sees the wrapper
    try:
        t0 = time.perf_counter()
        rc = cli_main(["eval", "--run", run_dir, "--n", str(n), "--batch-size", str(batch_size), "--no-progress",
                       "--out", eval_out])
        total_s = time.perf_counter() - t0
    finally:
        trainer.predict_proba = original
    if rc != 0 or not timings:
        raise RuntimeError(f"rellax-fast eval --run {run_dir} failed (exit status {rc})")
    score_s, n_scored = timings[-1]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    note = f"run {run_dir}; {n_scored} samples; {device}"
    return [
        _row("ctr-score", "rellax-fast eval: scoring (predict_proba)", batch_size, None, ms=score_s * 1e3,
             samples_per_s=n_scored / score_s, note=note),
        _row("ctr-score", "rellax-fast eval: whole command", batch_size, None, ms=total_s * 1e3,
             samples_per_s=n_scored / total_s, note=note + "; includes model load, DIN, retrieval, prompts"),
    ]


# --------------------------------------------------------------------------------------------- suite


def _dtype_and_device(args):
    import torch

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
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
        report.bar_chart(train, path, ["provider"], "tokens_per_s", "phase", "training step: tokens/s (higher is better)")
        report.bar_chart(train, f"{stem}_memory.png", ["provider"], "peak_mem_mb", "phase",
                         "training step: peak memory above resident, MiB (lower is better)")
    if infer:
        # speed relative to the merged baseline: prefill and decode latencies differ by orders of magnitude
        report.bar_chart(infer, f"{stem}_inference.png", ["phase", "batch"], "speed_vs_baseline", "provider",
                         f"inference speed vs {INFER_BASELINE} (baseline ms / ms; higher is better)")
    return path


def run_suite(args) -> Tuple[List[Dict[str, object]], Dict[str, object]]:
    """Run the e2e suite for ``args`` (size, device, dtype, warmup, repeat, out; optional
    ``compile_backend``, default inductor) and return ``(rows, meta)``."""
    from . import report

    size = resolve_size(args.size)
    spec = SIZES[size]
    device, dtype = _dtype_and_device(args)
    compile_backend = getattr(args, "compile_backend", None) or os.environ.get("RELLAX_BENCH_COMPILE_BACKEND",
                                                                                "inductor")
    out_dir = getattr(args, "out", None) or "bench_out"
    header = f"# bench e2e (partial: the run has not finished)\n\n{report.environment_line(device)}"

    def progress(rows: List[Dict[str, object]]) -> None:
        # a killed run (timeout) still leaves what it measured
        report.write_reports(rows, out_dir, "e2e_partial", header)

    t0 = time.perf_counter()
    base = build_base_model(spec, device, dtype)
    n_params = sum(p.numel() for p in base.parameters())
    print(f"  model: LlamaForCausalLM {size}, {n_params / 1e6:.2f}M params, {dtype}, built in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    # torch.compile last: if its compile time runs a time-boxed job out, every other row is already saved
    eager = tuple(p for p in TRAIN_PROVIDERS if p[1] != "peft-compile")
    compiled = tuple(p for p in TRAIN_PROVIDERS if p[1] == "peft-compile")
    train = bench_training(base, spec, device, dtype, args.warmup, args.repeat, compile_backend, progress, eager)
    infer = bench_inference(base, spec, device, dtype, args.warmup, args.repeat, progress, train)
    train += bench_training(base, spec, device, dtype, args.warmup, args.repeat, compile_backend, progress,
                            compiled, done=train + infer)
    add_training_ratios(train)
    rows = train + infer
    del base
    _free(device)
    eval_run = getattr(args, "eval_run", None) or os.environ.get(EVAL_RUN_ENV)
    if eval_run:
        print(f"  ctr scoring: rellax-fast eval --run {eval_run} ...", flush=True)
        n_eval = int(os.environ.get(EVAL_N_ENV, "1000"))
        try:
            rows += bench_ctr_scoring(eval_run, n_eval, 64, out_dir)
        except Exception as exc:
            rows.append(_row("ctr-score", "rellax-fast eval", 64, None, note=_error_note(exc)))
    partial = os.path.join(out_dir, "e2e_partial")
    for ext in (".csv", ".md"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(partial + ext)
    title = (
        f"LlamaForCausalLM `{size}` with random weights ({n_params / 1e6:.3g}M params: hidden {spec.hidden}, "
        f"{spec.layers} layers, {spec.heads} heads / {spec.kv_heads} KV heads, intermediate {spec.intermediate}, "
        f"vocab {spec.vocab}), {dtype}, SDPA attention. Adapters on {', '.join(TARGET_MODULES)}, r={spec.r}, "
        f"alpha={spec.alpha:g}, LoRA dropout {spec.lora_dropout}, cond_dim {spec.cond_dim}. "
        f"Training: batch {spec.train_batch} x {spec.seq} tokens, forward+loss+backward+AdamW; baseline "
        f"`{TRAIN_BASELINE}` (speed_vs_compiled: against `{COMPILED_PROVIDER}`, compile backend "
        f"{compile_backend}). Inference: prompt {spec.prompt}, prefill and one decode token on the KV cache; "
        f"baseline `{INFER_BASELINE}`. ms = median of {args.repeat} after {args.warmup} warm-up; "
        "peak_mem_mb = memory above the resident model + optimizer state during one call "
        + ("(CUDA allocator peak); training mem_vs_baseline compares total_peak_mb = resident + peak."
           if device.type == "cuda" else "(CPU: growth of peak RSS, coarse).")
        + (f" ctr-score rows: `rellax-fast eval --run {eval_run}`, samples/s." if eval_run else
           f" CTR scoring through `rellax-fast eval` not measured (set {EVAL_RUN_ENV} to a trained run folder).")
    )
    return rows, {"title": title, "plot": plot}


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
        section = append_benchmarks_section(args.append_to, args.out_dir, args.command, suites, title=args.title)
    else:
        section = benchmarks_section(args.out_dir, args.command, suites, title=args.title)
    atomic_write_text(args.section_file, section)
    print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
