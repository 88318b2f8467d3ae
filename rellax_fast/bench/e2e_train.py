"""The training half of ``rellax-fast bench e2e``: one timed step (forward + causal-LM loss + backward +
AdamW over the adapter parameters) per provider of :data:`TRAIN_PROVIDERS`, and their ratios against
``PEFT LoRA`` (the baseline) and ``PEFT LoRA + torch.compile``. For a pretrained size (``smollm2``),
:func:`bench_training_interleaved`: :data:`PRETRAINED_TRAIN_PROVIDERS` per adapter target set, timed
interleaved, against PEFT LoRA on the same targets."""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .e2e_common import allocated_mb, error_note, free_memory, interleaved_ms, ratio, row
from .e2e_models import TARGET_MODULES, E2ESize, autocast_context, cflora_model, peft_model, resolved_backend

TRAIN_BASELINE = "PEFT LoRA"
COMPILED_PROVIDER = "PEFT LoRA + torch.compile"
PATCHED_PROVIDER = "PEFT LoRA + apply_cflora"

COMPILE_SUFFIX = "-compile"  # a provider kind ending in it trains its model under torch.compile

# name -> (kind, backend): the kind is an interaction for CFLoRA providers, "peft" / "peft-apply" for the
# baselines, with COMPILE_SUFFIX for the compiled rows. Compiled CFLoRA is the answer to the per-call host
# cost that sets eager step times at real model sizes (BENCHMARKS, the H200 e2e run): the op's Python
# wrapper (validation, backend choice) runs at trace time only.
TRAIN_PROVIDERS: Tuple[Tuple[str, str, Optional[str]], ...] = (
    ("rellax-fast full (auto)", "full", None),
    ("rellax-fast full (reference)", "full", "reference"),
    ("rellax-fast identity (auto)", "identity", None),
    (TRAIN_BASELINE, "peft", None),
    (PATCHED_PROVIDER, "peft-apply", None),
    (COMPILED_PROVIDER, "peft" + COMPILE_SUFFIX, None),
    ("rellax-fast full (auto) + torch.compile", "full" + COMPILE_SUFFIX, None),
    ("rellax-fast identity (auto) + torch.compile", "identity" + COMPILE_SUFFIX, None),
)


def is_compiled(kind: str) -> bool:
    """Whether a :data:`TRAIN_PROVIDERS` kind trains under torch.compile."""
    return kind.endswith(COMPILE_SUFFIX)


# name -> kind of the pretrained suite (automatic backend), timed interleaved per target set
PRETRAINED_TRAIN_PROVIDERS: Tuple[Tuple[str, str], ...] = (
    (TRAIN_BASELINE, "peft"),
    ("rellax-fast identity", "identity"),
    ("rellax-fast full", "full"),
)


def train_model(
    kind: str,
    backend: Optional[str],
    base,
    spec: E2ESize,
    device,
    dtype,
    cond,
    targets: Tuple[str, ...] = TARGET_MODULES,
):
    """The model of one training provider ``kind`` (a :data:`TRAIN_PROVIDERS` kind without
    :data:`COMPILE_SUFFIX`) on a copy of ``base``,
    in train mode, with the context manager that conditions its forward and the notes that describe it.
    One home for ``bench e2e`` and the pytest-benchmark suite (``benchmarks/test_bench_train_step.py``)."""
    note: List[str] = []
    if kind in ("peft", "peft-apply"):
        model = peft_model(base, spec, device, dtype, patched=kind == "peft-apply", targets=targets)
        condition = contextlib.nullcontext
        if kind == "peft-apply":
            note.append(f"apply_cflora, backend {resolved_backend(device, None)}")
    else:
        from rellax_fast.cflora import cflora_condition

        model = cflora_model(base, spec, kind, backend, device, dtype, targets=targets)
        note.append(f"backend {resolved_backend(device, backend)}")
        condition = (lambda: cflora_condition(model, cond)) if kind != "identity" else contextlib.nullcontext
    model.train()
    return model, condition, note


def _train_provider(
    name: str,
    kind: str,
    backend: Optional[str],
    base,
    spec: E2ESize,
    device,
    dtype,
    ids,
    cond,
    warmup: int,
    repeat: int,
    compile_backend: str,
) -> Dict[str, object]:
    import torch

    from . import report

    alloc0 = allocated_mb(device)
    compiled = is_compiled(kind)
    model, condition, note = train_model(
        kind.removesuffix(COMPILE_SUFFIX), backend, base, spec, device, dtype, cond
    )
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    note.append(f"{n_trainable / 1e6:.2f}M trainable")
    forward = torch.compile(model, backend=compile_backend) if compiled else model
    losses: List[float] = []
    step = train_step(forward, condition, torch.optim.AdamW(params, lr=1e-5), ids, losses, spec, device)
    if compiled:  # the first call compiles: time it separately, then warm up as usual
        t0 = time.perf_counter()
        step()
        report.sync(device)
        note.append(f"torch.compile backend={compile_backend}, first call {time.perf_counter() - t0:.1f} s")
    ms = report.time_ms(step, device, warmup=warmup, repeat=repeat)
    resident = allocated_mb(device)
    peak = report.peak_memory_mb(step, device)
    first_loss = _check_losses(name, losses)
    tokens = ids.numel()
    return row(
        "train",
        name,
        ids.shape[0],
        ids.shape[1],
        ms=ms,
        tokens_per_s=tokens / (ms / 1e3),
        peak_mem_mb=peak,
        resident_mb=None if alloc0 is None else resident - alloc0,
        total_peak_mb=None if alloc0 is None else resident - alloc0 + peak,
        loss=first_loss,
        note="; ".join(note),
    )  # the model and optimizer die with this frame


def train_step(forward, condition, optimizer, ids, losses: list, spec: E2ESize, device) -> Callable[[], None]:
    """One training step of ``forward`` on ``ids`` (loss appended to ``losses``), under ``spec``'s autocast."""

    def step() -> None:
        with condition():
            with autocast_context(spec, device):  # the backward runs outside autocast, as recommended
                loss = forward(input_ids=ids, labels=ids).loss
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    return step


def _check_losses(name: str, losses) -> float:
    import torch

    if not all(bool(torch.isfinite(v)) for v in losses):
        raise FloatingPointError(f"{name}: non-finite training loss {[float(v) for v in losses]}")
    return float(losses[0])


def bench_training_interleaved(
    base,
    spec: E2ESize,
    device,
    dtype,
    warmup: int,
    repeat: int,
    progress: Callable[[List[Dict[str, object]]], None],
) -> List[Dict[str, object]]:
    """Rows ``<provider> [<targets>]`` for every target set of ``spec`` and provider of
    :data:`PRETRAINED_TRAIN_PROVIDERS`: the providers of one target set live together and are timed
    interleaved (:func:`e2e_common.interleaved_ms`); ``speed_vs_baseline`` is against PEFT LoRA on the same
    targets. A failing target set becomes rows with the error in ``note``."""
    import torch

    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, spec.vocab, (spec.train_batch, spec.seq), generator=gen).to(device)
    cond = torch.randn(spec.train_batch, spec.cond_dim, generator=gen).to(device)
    rows: List[Dict[str, object]] = []
    for label, targets in spec.target_sets:
        names = {name: f"{name} [{label}]" for name, _ in PRETRAINED_TRAIN_PROVIDERS}
        print(f"  train ({label}): {', '.join(names)} interleaved ...", flush=True)
        try:
            steps, losses, notes = {}, {}, {}
            for name, kind in PRETRAINED_TRAIN_PROVIDERS:
                model, condition, note = train_model(
                    kind, None, base, spec, device, dtype, cond, targets=targets
                )
                params = [p for p in model.parameters() if p.requires_grad]
                notes[name] = "; ".join(
                    [*note, f"{sum(p.numel() for p in params) / 1e6:.2f}M trainable", "interleaved"]
                )
                losses[name] = []
                steps[name] = train_step(
                    model, condition, torch.optim.AdamW(params, lr=1e-5), ids, losses[name], spec, device
                )
            ms = interleaved_ms(steps, device, warmup, repeat)
            for name in steps:
                rows.append(
                    row(
                        "train",
                        names[name],
                        ids.shape[0],
                        ids.shape[1],
                        ms=ms[name],
                        tokens_per_s=ids.numel() / (ms[name] / 1e3),
                        loss=_check_losses(name, losses[name]),
                        baseline=names[TRAIN_BASELINE],
                        speed_vs_baseline=ratio(ms[TRAIN_BASELINE], ms[name]),
                        note=notes[name],
                    )
                )
        except Exception as exc:  # one target set's failure must not hide the other's
            rows += [
                row("train", n, spec.train_batch, spec.seq, note=error_note(exc)) for n in names.values()
            ]
        steps = model = None  # the models and optimizers of this target set go before the next is built
        free_memory(device)
        progress(rows)
    return rows


def bench_training(
    base,
    spec: E2ESize,
    device,
    dtype,
    warmup: int,
    repeat: int,
    compile_backend: str,
    progress: Callable[[List[Dict[str, object]]], None],
    providers=TRAIN_PROVIDERS,
    done: Sequence[Dict[str, object]] = (),
) -> List[Dict[str, object]]:
    """One row per training provider in ``providers`` (a failure becomes a row with the error in ``note``)."""
    import torch

    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, spec.vocab, (spec.train_batch, spec.seq), generator=gen).to(device)
    cond = torch.randn(spec.train_batch, spec.cond_dim, generator=gen).to(device=device, dtype=dtype)
    rows: List[Dict[str, object]] = []
    for name, kind, backend in providers:
        print(f"  train: {name} ...", flush=True)
        try:
            result = _train_provider(
                name, kind, backend, base, spec, device, dtype, ids, cond, warmup, repeat, compile_backend
            )
        except Exception as exc:  # one provider's failure must not hide the others: record it
            result = row("train", name, spec.train_batch, spec.seq, note=error_note(exc))
        if is_compiled(kind):
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
