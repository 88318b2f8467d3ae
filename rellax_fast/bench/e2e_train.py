"""The training half of ``rellax-fast bench e2e``: one timed step (forward + causal-LM loss + backward +
AdamW over the adapter parameters) per provider of :data:`TRAIN_PROVIDERS`, and their ratios against
``PEFT LoRA`` (the baseline) and ``PEFT LoRA + torch.compile``."""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .e2e_common import allocated_mb, error_note, free_memory, ratio, row
from .e2e_models import E2ESize, cflora_model, peft_model, resolved_backend

TRAIN_BASELINE = "PEFT LoRA"
COMPILED_PROVIDER = "PEFT LoRA + torch.compile"
PATCHED_PROVIDER = "PEFT LoRA + apply_cflora"

# name -> (interaction, backend) for CFLoRA providers; "peft" / "peft-compile" for the baselines
TRAIN_PROVIDERS: Tuple[Tuple[str, str, Optional[str]], ...] = (
    ("rellax-fast full (auto)", "full", None),
    ("rellax-fast full (reference)", "full", "reference"),
    ("rellax-fast identity (auto)", "identity", None),
    (TRAIN_BASELINE, "peft", None),
    (PATCHED_PROVIDER, "peft-apply", None),
    (COMPILED_PROVIDER, "peft-compile", None),
)


def train_model(kind: str, backend: Optional[str], base, spec: E2ESize, device, dtype, cond):
    """The model of one training provider ``kind`` (a :data:`TRAIN_PROVIDERS` kind) on a copy of ``base``,
    in train mode, with the context manager that conditions its forward and the notes that describe it.
    One home for ``bench e2e`` and the pytest-benchmark suite (``benchmarks/test_bench_train_step.py``)."""
    note: List[str] = []
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
    return model, condition, note


def _train_provider(name: str, kind: str, backend: Optional[str], base, spec: E2ESize, device, dtype,
                    ids, cond, warmup: int, repeat: int, compile_backend: str) -> Dict[str, object]:
    import torch

    from . import report

    alloc0 = allocated_mb(device)
    model, condition, note = train_model(kind, backend, base, spec, device, dtype, cond)
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
    resident = allocated_mb(device)
    peak = report.peak_memory_mb(step, device)
    first_loss = float(losses[0])
    if not all(bool(torch.isfinite(v)) for v in losses):
        raise FloatingPointError(f"{name}: non-finite training loss {[float(v) for v in losses]}")
    tokens = ids.numel()
    return row("train", name, ids.shape[0], ids.shape[1], ms=ms, tokens_per_s=tokens / (ms / 1e3),
               peak_mem_mb=peak, resident_mb=None if alloc0 is None else resident - alloc0,
               total_peak_mb=None if alloc0 is None else resident - alloc0 + peak,
               loss=first_loss, note="; ".join(note))  # the model and optimizer die with this frame


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
            result = _train_provider(name, kind, backend, base, spec, device, dtype, ids, cond, warmup, repeat,
                                     compile_backend)
        except Exception as exc:  # one provider's failure must not hide the others: record it
            result = row("train", name, spec.train_batch, spec.seq, note=error_note(exc))
        if kind == "peft-compile":
            torch._dynamo.reset()
        free_memory(device)
        rows.append(result)
        progress(list(done) + rows)
    return rows


def add_training_ratios(rows: List[Dict[str, object]]) -> None:
    """Fill ``baseline``, ``speed_vs_baseline``, ``mem_vs_baseline`` and ``speed_vs_compiled`` of train rows."""
    by_name = {r["provider"]: r for r in rows}
    base_row, compiled_row = by_name.get(TRAIN_BASELINE), by_name.get(COMPILED_PROVIDER)
    for r in rows:
        r["baseline"] = TRAIN_BASELINE
        if base_row is not None:
            r["speed_vs_baseline"] = ratio(base_row["ms"], r["ms"])
            # the whole footprint where it is known (CUDA), else the step's peak above the resident state
            key = "total_peak_mb" if base_row["total_peak_mb"] is not None else "peak_mem_mb"
            r["mem_vs_baseline"] = ratio(r[key], base_row[key])
        if compiled_row is not None:
            r["speed_vs_compiled"] = ratio(compiled_row["ms"], r["ms"])
