"""Where the time of a training step and of a decode step goes, per provider of ``bench e2e --size smollm2``
(issue #24 item 4): torch.profiler's self CPU time per operator, summed over a few steps, as a share of the
provider's profiled time, with each layer's C generator (its forward, a labelled region) shown apart.

The providers and steps are the benchmark's own (``bench.e2e_train.train_model`` / ``train_step`` and
``bench.e2e_infer._inference_model`` / ``_decode_call``: bf16 autocast, batch 8 x 168, one conditioning block
per generation), so the profile explains the benchmark's ratios. A profile, not a timing: the profiler adds
its own cost per operator, which weighs most on the small ones; speed is claimed from ``bench e2e`` alone.

    python scripts/profile_e2e.py [--size smollm2] [--targets q/v,all-linear] [--steps 3] [--top 10] [--out F]
"""

from __future__ import annotations

import argparse
import contextlib
import json
from typing import Dict, List

import torch

from rellax_fast.bench import e2e, e2e_infer, e2e_train
from rellax_fast.bench.e2e_models import build_base_model

GENERATOR_REGION = "CFLoRA C generator (forward)"


def _label_generators(model) -> List:
    """Forward hooks that wrap every CFLoRA layer's interaction forward in a profiler region."""
    from rellax_fast.cflora import cflora_layers

    handles = []
    for _, layer in cflora_layers(model):
        gen = layer.interaction
        if gen is None or not gen.needs_cond:
            continue
        regions: List = []

        def enter(module, args, regions=regions):
            regions.append(torch.autograd.profiler.record_function(GENERATOR_REGION))
            regions[-1].__enter__()

        def leave(module, args, out, regions=regions):
            regions.pop().__exit__(None, None, None)

        handles += [gen.register_forward_pre_hook(enter), gen.register_forward_hook(leave)]
    return handles


def profile_calls(call, steps: int, top: int) -> Dict[str, object]:
    """One warm-up call, then ``steps`` profiled calls: total profiled ms per call, the ``top`` operators by
    self CPU time (ms per call and share) and the generator region's inclusive ms per call."""
    call()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            call()
    events = prof.key_averages()
    ops = [e for e in events if e.key != GENERATOR_REGION]
    total = sum(e.self_cpu_time_total for e in ops) / 1e3 / steps
    region = sum(e.cpu_time_total for e in events if e.key == GENERATOR_REGION) / 1e3 / steps
    ranked = sorted(ops, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return {
        "ms_per_call": round(total, 2),
        "generator_ms": round(region, 2),
        "generator_share": round(region / total, 3) if total else 0.0,
        "top": [
            {
                "op": e.key,
                "ms": round(e.self_cpu_time_total / 1e3 / steps, 2),
                "share": round(e.self_cpu_time_total / 1e3 / steps / total, 3),
                "calls": e.count // steps,
            }
            for e in ranked
        ],
    }


def profile_training(base, spec, targets, steps: int, top: int) -> Dict[str, Dict]:
    """{provider: profile} of one training step per provider of ``PRETRAINED_TRAIN_PROVIDERS``."""
    cpu = torch.device("cpu")
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, spec.vocab, (spec.train_batch, spec.seq), generator=gen)
    cond = torch.randn(spec.train_batch, spec.cond_dim, generator=gen)
    out = {}
    for name, kind in e2e_train.PRETRAINED_TRAIN_PROVIDERS:
        model, condition, _ = e2e_train.train_model(kind, None, base, spec, cpu, torch.float32, cond, targets)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-5)
        handles = _label_generators(model)
        out[name] = profile_calls(
            e2e_train.train_step(model, condition, optimizer, ids, [], spec, cpu), steps, top
        )
        for h in handles:
            h.remove()
    return out


def profile_decode(base, spec, targets, batch: int, steps: int, top: int) -> Dict[str, Dict]:
    """{provider: profile} of one decode token per provider of ``PRETRAINED_INFER_PROVIDERS`` at ``batch``."""
    from rellax_fast.cflora import cflora_condition

    cpu = torch.device("cpu")
    gen = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, spec.vocab, (batch, spec.prompt), generator=gen)
    cond = torch.randn(batch, spec.cond_dim, generator=gen)
    out = {}
    for name in e2e_infer.PRETRAINED_INFER_PROVIDERS:
        model, needs_cond, _ = e2e_infer._inference_model(name, base, spec, cpu, torch.float32, targets)
        model.eval()
        condition = (lambda m=model: cflora_condition(m, cond)) if needs_cond else contextlib.nullcontext
        handles = _label_generators(model)
        with contextlib.ExitStack() as stack:
            out[name] = profile_calls(
                e2e_infer._decode_call(model, prompt, condition, spec, cpu, stack), steps, top
            )
        for h in handles:
            h.remove()
    return out


def markdown(results: Dict[str, Dict]) -> str:
    lines = []
    for phase, providers in results.items():
        for name, prof in providers.items():
            lines.append(
                f"\n### {phase}: {name}: {prof['ms_per_call']} ms profiled per call; C generator forward "
                f"{prof['generator_ms']} ms ({100 * prof['generator_share']:.1f}%)\n"
            )
            lines += ["| op | ms per call | share | calls per call |", "|---|---|---|---|"]
            lines += [
                f"| `{t['op']}` | {t['ms']} | {100 * t['share']:.1f}% | {t['calls']} |" for t in prof["top"]
            ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="smollm2", help="a bench e2e size with a pretrained backbone")
    parser.add_argument(
        "--targets", default="q/v,all-linear", help="target sets of the size, comma-separated"
    )
    parser.add_argument(
        "--steps", type=int, default=3, help="profiled calls per provider (after one warm-up)"
    )
    parser.add_argument("--top", type=int, default=10, help="operators listed per provider")
    parser.add_argument("--decode-batch", type=int, default=8)
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    spec = e2e.SIZES[args.size]
    sets = dict(spec.target_sets)
    unknown = [t for t in args.targets.split(",") if t not in sets]
    if unknown or args.steps < 1 or args.top < 1:
        parser.error(f"--targets must name {', '.join(sets)} and --steps/--top be >= 1; got {args.targets!r}")
    base = build_base_model(spec, torch.device("cpu"), torch.float32)
    results = {}
    for label in args.targets.split(","):
        results[f"train [{label}]"] = profile_training(base, spec, sets[label], args.steps, args.top)
        results[f"decode b{args.decode_batch} [{label}]"] = profile_decode(
            base, spec, sets[label], args.decode_batch, args.steps, args.top
        )
    print(markdown(results), flush=True)
    if args.out:
        from rellax_fast._io import atomic_write_text

        atomic_write_text(args.out, json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
