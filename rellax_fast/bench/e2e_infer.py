"""The inference half of ``rellax-fast bench e2e``: eval mode under ``torch.inference_mode``, prefill of a
prompt and decode of one token on a KV cache of the prompt's length, per provider of
:data:`INFER_PROVIDERS` and batch size, with speed and memory against ``PEFT LoRA merged`` (the baseline).
For a pretrained size (``smollm2``), :func:`bench_decode_interleaved`: decode only, per-sample CFLoRA
against merged LoRA per adapter target set and batch, timed interleaved."""

from __future__ import annotations

import contextlib
from typing import Callable, Dict, List, Tuple

from .e2e_common import error_note, free_memory, interleaved_ms, ratio, row
from .e2e_models import TARGET_MODULES, E2ESize, autocast_context, cflora_model, peft_model, resolved_backend

PATCHED_INFER_PROVIDER = "PEFT LoRA unmerged + apply_cflora"
INFER_BASELINE = "PEFT LoRA merged"
INFER_PROVIDERS: Tuple[str, ...] = (
    "rellax-fast full (per-sample C)",
    "rellax-fast identity merged",
    "PEFT LoRA unmerged",
    PATCHED_INFER_PROVIDER,
    INFER_BASELINE,
)
# the pretrained suite's decode providers: the per-sample C that cannot merge, against merged LoRA
PRETRAINED_INFER_PROVIDERS: Tuple[str, ...] = ("rellax-fast full (per-sample C)", INFER_BASELINE)


def _inference_model(
    name: str, base, spec: E2ESize, device, dtype, targets: Tuple[str, ...] = TARGET_MODULES
):
    """(model, needs_cond, note) for an inference provider."""
    if name == "rellax-fast full (per-sample C)":
        model = cflora_model(base, spec, "full", None, device, dtype, targets=targets)
        return model, True, f"backend {resolved_backend(device, None)}"
    if name == "rellax-fast identity merged":
        from rellax_fast.cflora import merge_cflora

        model = cflora_model(base, spec, "identity", None, device, dtype)
        merge_cflora(model)
        return model, False, "merge_cflora"
    if name == PATCHED_INFER_PROVIDER:
        model = peft_model(base, spec, device, dtype, patched=True)
        return model, False, f"unmerged, apply_cflora, backend {resolved_backend(device, None)}"
    model = peft_model(base, spec, device, dtype, targets=targets)
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


def _infer_provider(
    name: str, base, spec: E2ESize, device, dtype, prompts, conds, warmup: int, repeat: int
) -> List[Dict[str, object]]:
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
                rows.append(
                    row(
                        phase,
                        name,
                        batch,
                        prompt.shape[1],
                        ms=ms,
                        tokens_per_s=tokens / (ms / 1e3),
                        peak_mem_mb=peak,
                        note=note,
                    )
                )
    return rows  # the model dies with this frame; the caller frees the cache


def _decode_call(model, prompt, condition, spec: E2ESize, device, stack) -> Callable[[], object]:
    """Prefill ``prompt`` once; the returned call decodes one token on its KV cache (cropped back to the
    prompt's length after each call, so every call decodes the same position), under ``spec``'s autocast.
    The conditioning block is entered once, at the prefill, and stays open on ``stack`` (an ExitStack) for
    every decode call, as ``generate(..., cflora_cond=...)`` holds one block for a whole generation: the
    per-sample C of each layer is computed once per block (``ConditionSlot.interactions``), not per token."""
    import torch

    stack.enter_context(condition())
    with torch.inference_mode(), autocast_context(spec, device):
        out = model(input_ids=prompt, use_cache=True)
    cache, token = _output_cache(out), out.logits[:, -1:].argmax(-1)
    if not bool(torch.isfinite(out.logits).all()):
        raise FloatingPointError(f"non-finite prefill logits at batch {prompt.shape[0]}")
    length, key = prompt.shape[1], _cache_kwarg()

    def decode():
        with torch.inference_mode(), autocast_context(spec, device):
            logits = model(input_ids=token, use_cache=True, **{key: cache}).logits
        extra = cache.get_seq_length() - length
        if extra > 0:
            cache.crop(-extra)
        return logits

    return decode


def bench_decode_interleaved(
    base,
    spec: E2ESize,
    device,
    dtype,
    warmup: int,
    repeat: int,
    progress: Callable[[List[Dict[str, object]]], None],
    done: List[Dict[str, object]],
) -> List[Dict[str, object]]:
    """Decode rows ``<provider> [<targets>]`` for every target set and batch of ``spec`` and provider of
    :data:`PRETRAINED_INFER_PROVIDERS`, the providers of one (target set, batch) timed interleaved, with
    ``speed_vs_baseline`` against merged LoRA on the same targets and batch."""
    import torch

    from rellax_fast.cflora import cflora_condition

    gen = torch.Generator().manual_seed(2)
    prompts = {
        b: torch.randint(0, spec.vocab, (b, spec.prompt), generator=gen).to(device)
        for b in spec.infer_batches
    }
    conds = {b: torch.randn(b, spec.cond_dim, generator=gen).to(device) for b in spec.infer_batches}
    rows: List[Dict[str, object]] = []
    for label, targets in spec.target_sets:
        names = {name: f"{name} [{label}]" for name in PRETRAINED_INFER_PROVIDERS}
        print(f"  decode ({label}): {', '.join(names)} interleaved ...", flush=True)
        try:
            models = {name: _inference_model(name, base, spec, device, dtype, targets) for name in names}
            for batch, prompt in prompts.items():
                calls, stack = {}, contextlib.ExitStack()
                for name, (model, needs_cond, _) in models.items():
                    model.eval()
                    condition = (
                        (lambda m=model, c=conds[batch]: cflora_condition(m, c))
                        if needs_cond
                        else contextlib.nullcontext
                    )
                    calls[name] = _decode_call(model, prompt, condition, spec, device, stack)
                with stack:  # the blocks close after the timing
                    ms = interleaved_ms(calls, device, warmup, repeat)
                rows += [
                    row(
                        "decode",
                        names[n],
                        batch,
                        prompt.shape[1],
                        ms=ms[n],
                        tokens_per_s=batch / (ms[n] / 1e3),
                        baseline=names[INFER_BASELINE],
                        speed_vs_baseline=ratio(ms[INFER_BASELINE], ms[n]),
                        note=f"{models[n][2]}; interleaved",
                    )
                    for n in calls
                ]
                calls = None
        except Exception as exc:
            rows += [
                row("decode", n, b, spec.prompt, note=error_note(exc))
                for n in names.values()
                for b in spec.infer_batches
                if not any(r["provider"] == n and r["batch"] == b for r in rows)
            ]
        models = None
        free_memory(device)
        progress(done + rows)
    return rows


def bench_inference(
    base,
    spec: E2ESize,
    device,
    dtype,
    warmup: int,
    repeat: int,
    progress: Callable[[List[Dict[str, object]]], None],
    done: List[Dict[str, object]],
) -> List[Dict[str, object]]:
    """Prefill and decode rows per provider and batch (a failure becomes rows with the error in ``note``)."""
    import torch

    gen = torch.Generator().manual_seed(2)
    prompts = {
        b: torch.randint(0, spec.vocab, (b, spec.prompt), generator=gen).to(device)
        for b in spec.infer_batches
    }
    conds = {
        b: torch.randn(b, spec.cond_dim, generator=gen).to(device=device, dtype=dtype)
        for b in spec.infer_batches
    }
    rows: List[Dict[str, object]] = []
    for name in INFER_PROVIDERS:
        print(f"  inference: {name} ...", flush=True)
        try:
            rows += _infer_provider(name, base, spec, device, dtype, prompts, conds, warmup, repeat)
        except Exception as exc:
            note = error_note(exc)
            rows += [
                row(phase, name, b, spec.prompt, note=note)
                for b in spec.infer_batches
                for phase in ("prefill", "decode")
            ]
        free_memory(device)
        progress(done + rows)
    baseline = {(r["phase"], r["batch"]): r for r in rows if r["provider"] == INFER_BASELINE}
    for r in rows:
        r["baseline"] = INFER_BASELINE
        b = baseline.get((r["phase"], r["batch"]))
        if b is not None:
            r["speed_vs_baseline"] = ratio(b["ms"], r["ms"])
            r["mem_vs_baseline"] = ratio(r["peak_mem_mb"], b["peak_mem_mb"])
    return rows
