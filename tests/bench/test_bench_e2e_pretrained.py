"""The pretrained-backbone suite of ``rellax-fast bench e2e`` (``--size smollm2``): per adapter target set,
training steps of PEFT LoRA / CFLoRA identity / CFLoRA full and decode of per-sample CFLoRA against merged
LoRA, timed interleaved under bf16 autocast. Run here on a tiny Llama saved as a local folder and registered
as the size's named backbone (no SmolLM2 file needed); the real size table is checked against the real
checkpoint under the ``smollm2`` marker. No speed claim: the figures come from the benchmark itself."""

from __future__ import annotations

import argparse
import dataclasses
import math

import pytest
import torch

from rellax_fast import backbones
from rellax_fast.bench import e2e, e2e_common, e2e_models

SETS = (("q/v", e2e_models.QV_MODULES), ("all-linear", e2e_models.TARGET_MODULES))


@pytest.fixture
def tiny_pretrained(tmp_path, monkeypatch):
    """SIZES["tiny-pretrained"]: the tiny shape, a saved random Llama as its "pretrained" backbone."""
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = dataclasses.replace(
        e2e.SIZES["tiny"], backbone="tiny-test", autocast=True, target_sets=SETS, infer_batches=(1, 2)
    )
    torch.manual_seed(7)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=spec.vocab,
            hidden_size=spec.hidden,
            num_hidden_layers=spec.layers,
            num_attention_heads=spec.heads,
            num_key_value_heads=spec.kv_heads,
            intermediate_size=spec.intermediate,
            max_position_embeddings=128,
        )
    )
    model.save_pretrained(tmp_path / "backbone")
    monkeypatch.setattr(backbones, "resolve_model_path", lambda name, **_: str(tmp_path / "backbone"))
    monkeypatch.setitem(e2e.SIZES, "tiny-pretrained", spec)
    return spec, model.eval()


@pytest.mark.slow
def test_the_pretrained_suite_times_every_provider_per_target_set(tiny_pretrained, tmp_path):
    spec, model = tiny_pretrained
    args = argparse.Namespace(
        size="tiny-pretrained", device="cpu", dtype="float32", warmup=1, repeat=2, out=str(tmp_path / "out")
    )
    rows, meta = e2e.run_suite(args)
    train = {r["provider"]: r for r in rows if r["phase"] == "train"}
    decode = [r for r in rows if r["phase"] == "decode"]
    assert sorted(train) == sorted(
        f"{n} [{label}]" for label, _ in SETS for n, _ in e2e.PRETRAINED_TRAIN_PROVIDERS
    )
    assert sorted((r["provider"], r["batch"]) for r in decode) == sorted(
        (f"{n} [{label}]", b) for label, _ in SETS for n in e2e.PRETRAINED_INFER_PROVIDERS for b in (1, 2)
    )
    assert len(rows) == len(train) + len(decode)
    for r in rows:
        assert not (r["note"] or "").startswith("failed"), f"{r['provider']}: {r['note']}"
        assert "interleaved" in r["note"] and math.isfinite(r["ms"]) and r["ms"] > 0
        assert r["speed_vs_baseline"] == pytest.approx(
            next(
                b["ms"]
                for b in rows
                if b["provider"] == r["baseline"] and b["phase"] == r["phase"] and b["batch"] == r["batch"]
            )
            / r["ms"]
        )
        assert r["baseline"].endswith(r["provider"][r["provider"].index(" [") :])  # the same target set
    # every adapter starts as a no-op (B = 0, C = I): each provider's first loss is the saved backbone's own loss
    # under bf16 autocast on the same batch, so every row trained that pretrained model
    ids = torch.randint(
        0, spec.vocab, (spec.train_batch, spec.seq), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = float(model(input_ids=ids, labels=ids).loss)
    for r in train.values():
        assert r["loss"] == pytest.approx(expected, rel=1e-6)
    assert (
        "bf16 autocast" in meta["title"]
        and "interleaved" in meta["title"]
        and "q/v: q_proj, v_proj" in meta["title"]
    )


def test_a_backbone_whose_shape_differs_from_the_size_table_is_refused(tiny_pretrained):
    spec, _ = tiny_pretrained
    with pytest.raises(
        ValueError, match=r"tiny-test has .*\(64, 2, 4, 2, 172, 256\); the size table says \(65"
    ):
        e2e_models.build_base_model(dataclasses.replace(spec, hidden=65), torch.device("cpu"), torch.float32)


def test_interleaved_timing_rotates_the_order_every_round():
    order = []
    calls = {n: (lambda n=n: order.append(n)) for n in "abc"}
    ms = e2e_common.interleaved_ms(calls, torch.device("cpu"), warmup=1, repeat=3)
    assert order == list("abcabcbcacab") and set(ms) == set("abc")
    assert all(v >= 0 for v in ms.values())


@pytest.mark.smollm2
def test_the_smollm2_size_matches_the_real_checkpoint():
    spec = e2e.SIZES["smollm2"]
    base = e2e_models.build_base_model(spec, torch.device("cpu"), torch.bfloat16)
    assert base.dtype == torch.float32  # autocast size: fp32 weights whatever the bench dtype
    assert sum(p.numel() for p in base.parameters()) == 134_515_008 and not any(
        p.requires_grad for p in base.parameters()
    )


def test_decode_holds_one_conditioning_block_as_generate_does(tiny_pretrained):
    """The decode rows time tokens inside one conditioning block opened at the prefill (as
    generate(..., cflora_cond=...) holds one per generation): each layer's generator runs once, at the
    prefill, and the decode calls' logits equal those of a block opened per call (C recomputed)."""
    import contextlib

    from rellax_fast.bench import e2e_infer
    from rellax_fast.cflora import cflora_condition, cflora_layers

    spec, model = tiny_pretrained
    cpu = torch.device("cpu")
    full, needs_cond, _ = e2e_infer._inference_model(
        e2e_infer.PRETRAINED_INFER_PROVIDERS[0], model, spec, cpu, torch.float32, e2e_models.QV_MODULES
    )
    assert needs_cond
    for _, layer in cflora_layers(full):  # a non-trivial C, so a stale or missing C would change the logits
        torch.nn.init.normal_(layer.interaction.fc2.weight, std=0.3)
        torch.nn.init.normal_(layer.lora_B, std=0.3)
    full.eval()
    runs = []
    for _, layer in cflora_layers(full):
        layer.interaction.register_forward_hook(lambda *_: runs.append(1))
    prompt = torch.randint(0, spec.vocab, (2, 9), generator=torch.Generator().manual_seed(3))
    cond = torch.randn(2, spec.cond_dim, generator=torch.Generator().manual_seed(4))
    with contextlib.ExitStack() as stack:
        decode = e2e_infer._decode_call(full, prompt, lambda: cflora_condition(full, cond), spec, cpu, stack)
        held = [decode() for _ in range(3)]
    assert len(runs) == len(cflora_layers(full))  # once per layer, at the prefill
    with contextlib.ExitStack() as stack:
        per_call = e2e_infer._decode_call(
            full, prompt, lambda: cflora_condition(full, cond), spec, cpu, stack
        )
    with cflora_condition(full, cond):
        fresh = per_call()
    for logits in held:
        torch.testing.assert_close(logits, fresh, rtol=1e-5, atol=1e-5)


def test_the_profile_script_splits_the_providers_time(tiny_pretrained, tmp_path):
    """scripts/profile_e2e.py on the tiny pretrained size: every provider profiled in both phases, the C
    generator's region found in CFLoRA full's training step only (PEFT and identity have none; at decode C
    was computed at the prefill, outside the profiled tokens), and the listed operators' shares add up to at
    most the whole."""
    import importlib.util
    import json

    from rellax_testing import REPO

    loader = importlib.util.spec_from_file_location("profile_e2e", REPO / "scripts" / "profile_e2e.py")
    mod = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(mod)
    out = tmp_path / "profile.json"
    argv = [
        "--size",
        "tiny-pretrained",
        "--targets",
        "q/v",
        "--steps",
        "1",
        "--top",
        "5",
        "--decode-batch",
        "2",
    ]
    assert mod.main([*argv, "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    train, decode = res["train [q/v]"], res["decode b2 [q/v]"]
    assert sorted(train) == sorted(n for n, _ in e2e.PRETRAINED_TRAIN_PROVIDERS)
    assert sorted(decode) == sorted(e2e.PRETRAINED_INFER_PROVIDERS)
    for name, prof in {**train, **{f"decode {k}": v for k, v in decode.items()}}.items():
        assert prof["ms_per_call"] > 0 and 1 <= len(prof["top"]) <= 5, name
        assert 0 < sum(t["share"] for t in prof["top"]) <= 1.001, name
    assert train["rellax-fast full"]["generator_ms"] > 0
    assert train["PEFT LoRA"]["generator_ms"] == 0 == train["rellax-fast identity"]["generator_ms"]
    assert all(prof["generator_ms"] == 0 for prof in decode.values())
    with pytest.raises(SystemExit):
        mod.main(["--size", "tiny-pretrained", "--targets", "nope"])
