"""pytest-benchmark case for one training step of a CFLoRA-injected tiny Llama (``bench e2e``'s shapes),
next to PEFT LoRA on the same model timed in the same test."""

from __future__ import annotations

import pytest
import torch
from _bench_util import WARMUP, median_ms, record, run_benchmark

from rellax_fast.bench import e2e, e2e_train


@pytest.fixture(scope="module")
def e2e_setup(bench_size, bench_device):
    spec_name = e2e.resolve_size(bench_size)
    spec = e2e.SIZES[spec_name]
    dtype = torch.bfloat16 if bench_device.type == "cuda" else torch.float32
    base = e2e.build_base_model(spec, bench_device, dtype)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, spec.vocab, (spec.train_batch, spec.seq), generator=gen).to(bench_device)
    cond = torch.randn(spec.train_batch, spec.cond_dim, generator=gen).to(device=bench_device, dtype=dtype)
    return spec_name, spec, dtype, base, ids, cond


def _step(kind: str, backend, base, spec, device, dtype, ids, cond):
    model, condition, _ = e2e_train.train_model(kind, backend, base, spec, device, dtype, cond)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)

    def step(_=None):
        with condition():
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in params)


def test_train_step(benchmark, train_provider, e2e_setup, bench_device, bench_rounds, bench_size):
    name, kind, backend = train_provider
    spec_name, spec, dtype, base, ids, cond = e2e_setup
    warmup = WARMUP[bench_size]
    baseline_step, _ = _step("peft", None, base, spec, bench_device, dtype, ids, cond)
    baseline_ms = median_ms(baseline_step, bench_device, bench_rounds, warmup)
    step, trainable = _step(kind, backend, base, spec, bench_device, dtype, ids, cond)
    median = run_benchmark(benchmark, step, bench_device, bench_rounds, warmup)
    record(
        benchmark,
        device=bench_device,
        dtype=dtype,
        shape={
            "model": f"llama-{spec_name}",
            "batch": spec.train_batch,
            "seq": spec.seq,
            "r": spec.r,
            "hidden": spec.hidden,
            "layers": spec.layers,
        },
        backend=e2e.resolved_backend(bench_device, backend) if kind != "peft" else "peft",
        median=median,
        baseline=e2e.TRAIN_BASELINE,
        baseline_ms=baseline_ms,
        provider=name,
        trainable_params=trainable,
        tokens_per_s=None if median is None else ids.numel() / (median / 1e3),
    )
