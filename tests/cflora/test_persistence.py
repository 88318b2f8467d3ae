"""save/load (bit-exact, atomic, wrong-shape errors, corrupted files refused), merge/unmerge, and PEFT interop: a PEFT LoRA adapter
loaded into identity CFLoRA gives PEFT's logits (tiny Llama / Qwen2 / GPT-2 and the real MiniLM), and
identity/static adapters export to PEFT."""

from __future__ import annotations

import json
import os

import pytest
import torch
from cflora_models import MODELS, logits_of, minilm, model_inputs, randomise_adapter, tiny_gpt2, tiny_llama

from rellax_fast.cflora import (
    AdapterFileError,
    CFLoRAConfig,
    cflora_condition,
    cflora_layers,
    export_peft_lora,
    get_cflora_config,
    inject_cflora,
    load_cflora,
    load_peft_lora,
    merge_cflora,
    save_cflora,
    unmerge_cflora,
)

COND = 5


def _cfg(interaction="full", **kw):
    args = {
        "r": 4,
        "alpha": 8,
        "target_modules": ["q_proj", "v_proj", "gate_proj"],
        "interaction": interaction,
        "cond_dim": COND,
        "n_experts": 2,
        **kw,
    }
    return CFLoRAConfig(**args)


@pytest.mark.parametrize("interaction", ["static", "full", "moe", "recrank1"])
def test_save_load_round_trip_is_bit_exact(tmp_path, interaction):
    model = inject_cflora(tiny_llama(), _cfg(interaction))
    randomise_adapter(model)
    save_cflora(model, tmp_path / "adapter")
    assert sorted(os.listdir(tmp_path / "adapter")) == ["cflora_adapter.safetensors", "cflora_config.json"]
    inputs, cond = model_inputs(), torch.randn(3, COND)
    with torch.no_grad(), cflora_condition(model, cond):
        expected = logits_of(model, inputs)

    fresh = tiny_llama()  # not injected: load_cflora injects from the saved config
    load_cflora(fresh, tmp_path / "adapter")
    assert get_cflora_config(fresh).interaction == interaction
    injected = inject_cflora(tiny_llama(), _cfg(interaction))  # already injected with the same config
    load_cflora(injected, tmp_path / "adapter")
    for other in (fresh, injected):
        for (name, a), (_, b) in zip(cflora_layers(model), cflora_layers(other)):
            for (ka, ta), (kb, tb) in zip(a.state_dict().items(), b.state_dict().items()):
                assert ka == kb and torch.equal(ta, tb), f"{name}.{ka}"
        with torch.no_grad(), cflora_condition(other, cond):
            assert torch.equal(logits_of(other, inputs), expected)


def test_load_errors(tmp_path):
    model = inject_cflora(tiny_llama(), _cfg())
    save_cflora(model, tmp_path / "a")
    with pytest.raises(ValueError, match=r"r: saved 4 vs model 8"):
        load_cflora(inject_cflora(tiny_llama(), CFLoRAConfig(**{**_cfg().to_dict(), "r": 8})), tmp_path / "a")
    wider = tiny_llama(hidden_size=48, intermediate_size=64)
    with pytest.raises(
        ValueError, match=r"model.layers.0.self_attn.q_proj.lora_A has shape \(4, 32\).*\(4, 48\)"
    ):
        load_cflora(wider, tmp_path / "a")
    with pytest.raises(ValueError, match="missing in the file"):
        load_cflora(
            inject_cflora(tiny_llama(), _cfg(target_modules=["q_proj", "v_proj", "up_proj"])), tmp_path / "a"
        )
    with pytest.raises(FileNotFoundError, match="save_cflora"):
        load_cflora(tiny_llama(), tmp_path / "nothing")
    # an adapter whose targets the model lacks: load_cflora says it, with the injection's reason
    with pytest.raises(
        ValueError, match=r"load_cflora: the adapter in .*a does not fit this model: .*matches no"
    ):
        load_cflora(torch.nn.Sequential(torch.nn.Linear(32, 32)), tmp_path / "a")


def test_save_and_load_name_a_bad_model_or_path(tmp_path):
    model = inject_cflora(tiny_llama(), _cfg())
    (tmp_path / "file").write_text("x")
    with pytest.raises(
        ValueError, match=r"save_cflora: path '.*file' is a file; an adapter is saved into a folder"
    ):
        save_cflora(model, tmp_path / "file")
    with pytest.raises(
        TypeError, match=r"save_cflora: path must be a str or os.PathLike naming a folder; got int"
    ):
        save_cflora(model, 5)
    save_cflora(model, str(tmp_path / "a"))
    with pytest.raises(TypeError, match=r"load_cflora: path must be a str or os.PathLike .*; got NoneType"):
        load_cflora(tiny_llama(), None)
    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module .*; got NoneType"):
        load_cflora(None, tmp_path / "a")
    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module .*; got str"):
        save_cflora("gpt2", tmp_path / "b")


def test_save_is_atomic_and_overwrites(tmp_path, monkeypatch):
    model = inject_cflora(tiny_llama(), _cfg())
    save_cflora(model, tmp_path / "a")
    before = (tmp_path / "a" / "cflora_adapter.safetensors").read_bytes()
    randomise_adapter(model)

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        save_cflora(model, tmp_path / "a")
    monkeypatch.undo()
    # the old file is intact and no temp file is left behind
    assert (tmp_path / "a" / "cflora_adapter.safetensors").read_bytes() == before
    assert sorted(os.listdir(tmp_path / "a")) == ["cflora_adapter.safetensors", "cflora_config.json"]
    save_cflora(model, tmp_path / "a")
    assert (tmp_path / "a" / "cflora_adapter.safetensors").read_bytes() != before


@pytest.mark.parametrize(
    "factory, targets", [(tiny_llama, ["q_proj", "down_proj"]), (tiny_gpt2, ["c_attn", "c_fc"])]
)
@pytest.mark.parametrize("interaction", ["identity", "static"])
def test_merge_unmerge_round_trip(factory, targets, interaction):
    model = inject_cflora(
        factory(), CFLoRAConfig(r=4, alpha=8, target_modules=targets, interaction=interaction)
    )
    randomise_adapter(model)
    weights = {n: layer.weight.detach().clone() for n, layer in cflora_layers(model)}
    inputs = model_inputs()
    with torch.no_grad():
        expected = logits_of(model, inputs)
        merge_cflora(model)
        assert all(not torch.equal(layer.weight, weights[n]) for n, layer in cflora_layers(model))
        torch.testing.assert_close(logits_of(model, inputs), expected, rtol=1e-4, atol=1e-4)
        with pytest.raises(RuntimeError, match="already merged"):
            merge_cflora(model)
        unmerge_cflora(model)
        for n, layer in cflora_layers(model):
            torch.testing.assert_close(layer.weight, weights[n], rtol=0, atol=1e-6)
        torch.testing.assert_close(logits_of(model, inputs), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="not merged"):
        unmerge_cflora(model)


def test_loading_into_a_merged_model_is_refused(tmp_path):
    model = inject_cflora(tiny_llama(), CFLoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    save_cflora(model, tmp_path / "a")
    _peft_adapter(tiny_llama, ["q_proj", "v_proj"], tmp_path / "peft")
    merge_cflora(model)
    with pytest.raises(RuntimeError, match="unmerge_cflora"):
        load_cflora(model, tmp_path / "a")
    with pytest.raises(RuntimeError, match="unmerge_cflora"):
        load_peft_lora(model, tmp_path / "peft")


@pytest.mark.parametrize("interaction", ["full", "moe", "recrank1"])
def test_per_sample_interactions_refuse_to_merge_or_export(tmp_path, interaction):
    model = inject_cflora(tiny_llama(), _cfg(interaction))
    with pytest.raises(RuntimeError, match="per sample.*only 'identity' and 'static'"):
        merge_cflora(model)
    assert not any(layer.merged for _, layer in cflora_layers(model))
    with pytest.raises(RuntimeError, match="only 'identity' and 'static' adapters export"):
        export_peft_lora(model, tmp_path / "peft")


# ------------------------------------------------------------------------------------------ PEFT interop
PEFT_CASES = {
    **{name: (factory, targets) for name, (factory, targets) in MODELS.items()},
    "minilm": (minilm, ["query", "value"]),
}


def _peft_adapter(factory, targets, out_dir, r=4, alpha=8):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(123)
    peft_model = get_peft_model(
        factory(),
        LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False, lora_dropout=0.0),
    ).eval()
    peft_model.save_pretrained(out_dir)
    return peft_model


@pytest.mark.parametrize("name", sorted(PEFT_CASES))
def test_peft_lora_in_identity_cflora_gives_peft_logits(tmp_path, name):
    factory, targets = PEFT_CASES[name]
    peft_model = _peft_adapter(factory, targets, tmp_path / "peft")
    inputs = model_inputs(batch=2, seq=9)
    if name == "minilm":
        inputs["input_ids"] = inputs["input_ids"] + 1000  # real word pieces
    ours = inject_cflora(factory(), CFLoRAConfig(r=4, alpha=8, target_modules=targets))
    load_peft_lora(ours, tmp_path / "peft")
    with torch.no_grad():
        expected = logits_of(peft_model, inputs)
        got = logits_of(ours.eval(), inputs)
        base = logits_of(factory(), inputs)
    assert not torch.allclose(expected, base, atol=1e-3)  # B != 0: the adapter changes the outputs
    torch.testing.assert_close(got, expected, rtol=2e-4, atol=2e-4)


def test_load_peft_lora_checks_rank_scale_and_coverage(tmp_path):
    _peft_adapter(tiny_llama, ["q_proj", "v_proj"], tmp_path / "peft")
    with pytest.raises(ValueError, match="adapter has r=4.*r=8"):
        load_peft_lora(
            inject_cflora(tiny_llama(), CFLoRAConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"])),
            tmp_path / "peft",
        )
    with pytest.raises(ValueError, match="scale is 2.*alpha=8"):
        load_peft_lora(
            inject_cflora(tiny_llama(), CFLoRAConfig(r=4, alpha=4, target_modules=["q_proj", "v_proj"])),
            tmp_path / "peft",
        )
    with pytest.raises(ValueError, match="not CFLoRA layers"):
        load_peft_lora(
            inject_cflora(tiny_llama(), CFLoRAConfig(r=4, alpha=8, target_modules=["q_proj"])),
            tmp_path / "peft",
        )
    wide = inject_cflora(
        tiny_llama(), CFLoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "o_proj"])
    )
    with pytest.raises(ValueError, match="o_proj.*no weights in the adapter"):
        load_peft_lora(wide, tmp_path / "peft")
    load_peft_lora(wide, tmp_path / "peft", strict=False)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_peft_lora(wide, tmp_path)


def test_load_peft_lora_injects_a_model_without_cflora_layers(tmp_path):
    """Issue #25.8: like load_cflora, load_peft_lora injects for you: an identity adapter on exactly the adapter's
    modules with PEFT's per-module rank and scale (rank_pattern, alpha_pattern, rsLoRA), giving PEFT's outputs."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    peft_model = get_peft_model(
        tiny_llama(),
        LoraConfig(
            r=4,
            lora_alpha=8,
            lora_dropout=0.1,
            use_rslora=True,
            target_modules=["q_proj", "v_proj", "down_proj"],
            rank_pattern={"v_proj": 2},
            alpha_pattern={"down_proj": 3.0},
            init_lora_weights=False,
        ),
    ).eval()
    peft_model.save_pretrained(tmp_path / "peft")
    model = load_peft_lora(tiny_llama(), tmp_path / "peft")
    layers = dict(cflora_layers(model))
    peft_layers = {
        n.removeprefix("base_model.model."): m
        for n, m in peft_model.named_modules()
        if isinstance(getattr(m, "scaling", None), dict) and "default" in m.scaling
    }
    assert sorted(layers) == sorted(peft_layers)
    for name, layer in layers.items():
        assert layer.r == peft_layers[name].r["default"], name
        assert layer.scale == pytest.approx(peft_layers[name].scaling["default"], rel=1e-12), name
        assert layer.dropout_p == 0.1 and layer.interaction is None
    inputs = model_inputs()
    with torch.no_grad():
        expected = logits_of(peft_model, inputs)
        assert not torch.allclose(expected, logits_of(tiny_llama(), inputs), atol=1e-3)
        torch.testing.assert_close(logits_of(model.eval(), inputs), expected, rtol=2e-4, atol=2e-4)


def test_two_stage_recipe_starts_from_the_lora_and_trains_only_the_generator(tmp_path):
    peft_model = _peft_adapter(tiny_llama, ["q_proj", "v_proj"], tmp_path / "peft")
    model = inject_cflora(
        tiny_llama(),
        CFLoRAConfig(
            r=4,
            alpha=8,
            target_modules=["q_proj", "v_proj"],
            interaction="full",
            cond_dim=COND,
            train_lora=False,
        ),
    )
    load_peft_lora(model, tmp_path / "peft")
    inputs = model_inputs()
    with torch.no_grad(), cflora_condition(model, torch.randn(3, COND)):
        got = logits_of(model, inputs)  # fresh generator: C = I, so stage 2 starts at stage 1's model
    torch.testing.assert_close(got, logits_of(peft_model, inputs).detach(), rtol=2e-4, atol=2e-4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".interaction." in n for n in trainable)


@pytest.mark.parametrize("factory, targets", [(tiny_llama, ["q_proj", "v_proj"]), (tiny_gpt2, ["c_attn"])])
@pytest.mark.parametrize("interaction", ["identity", "static"])
def test_export_to_peft_round_trip(tmp_path, factory, targets, interaction):
    from peft import PeftModel

    model = inject_cflora(
        factory(), CFLoRAConfig(r=4, alpha=8, target_modules=targets, interaction=interaction)
    )
    randomise_adapter(model)
    export_peft_lora(model, tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    peft_model = PeftModel.from_pretrained(factory(), tmp_path / "peft").eval()
    inputs = model_inputs()
    with torch.no_grad():
        torch.testing.assert_close(
            logits_of(peft_model, inputs), logits_of(model.eval(), inputs), rtol=2e-4, atol=2e-4
        )
    # and back: the exported adapter loads into a fresh identity model with the same outputs
    back = inject_cflora(factory(), CFLoRAConfig(r=4, alpha=8, target_modules=targets))
    load_peft_lora(back, tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(
            logits_of(back.eval(), inputs), logits_of(model, inputs), rtol=2e-4, atol=2e-4
        )


# ------------------------------------------------------------------------------- corrupted adapters (#13.8)
def _saved_adapter(tmp_path, interaction="full"):
    model = inject_cflora(tiny_llama(), _cfg(interaction))
    randomise_adapter(model)
    save_cflora(model, tmp_path / "a")
    return model, tmp_path / "a"


def _rewrite_tensors(path, edit):
    """Change the saved tensors behind save_cflora's back (the config and its hash stay)."""
    from safetensors.torch import load_file, save_file

    file = path / "cflora_adapter.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def _assert_refused(path, match):
    fresh = tiny_llama()
    with pytest.raises(AdapterFileError, match=match):
        load_cflora(fresh, path)
    assert not cflora_layers(fresh)  # verified before the model is touched


def test_saved_config_carries_format_and_content_hash(tmp_path):
    _, path = _saved_adapter(tmp_path)
    data = json.loads((path / "cflora_config.json").read_text())
    assert data["format"] == "rellax-fast-cflora/2"
    assert len(data["content_sha256"]) == 64
    int(data["content_sha256"], 16)


def test_flipped_byte_is_refused(tmp_path):
    _, path = _saved_adapter(tmp_path)
    file = path / "cflora_adapter.safetensors"
    raw = bytearray(file.read_bytes())
    raw[-7] ^= 0x10  # inside the last tensor's data
    file.write_bytes(bytes(raw))
    _assert_refused(path, "fails its content check")


def test_tensors_swapped_between_layers_are_refused(tmp_path):
    _, path = _saved_adapter(tmp_path)

    def swap(t):
        a, b = "model.layers.0.self_attn.q_proj.lora_B", "model.layers.1.self_attn.q_proj.lora_B"
        assert t[a].shape == t[b].shape
        t[a], t[b] = t[b], t[a]

    _rewrite_tensors(path, swap)
    _assert_refused(path, "fails its content check")


def test_edited_config_is_refused(tmp_path):
    _, path = _saved_adapter(tmp_path)
    file = path / "cflora_config.json"
    data = json.loads(file.read_text())
    data["alpha"] = 16.0  # same shapes, different outputs
    file.write_text(json.dumps(data))
    _assert_refused(path, "fails its content check")


def test_nan_adapter_is_refused(tmp_path):
    model = inject_cflora(tiny_llama(), _cfg("full"))
    with torch.no_grad():
        layer = cflora_layers(model)[1][1]
        layer.lora_A[0, 3] = float("nan")
        layer.interaction.fc1.weight[2, 1] = float("inf")
    save_cflora(model, tmp_path / "a")  # a diverged run's adapter: the hash is valid, the values are not
    _assert_refused(
        tmp_path / "a",
        r"cflora_adapter.safetensors holds non-finite values \(NaN/Inf\) in 2 tensor\(s\): "
        r"model.layers.0.self_attn.v_proj.interaction.fc1.weight \(1 of 160\), "
        r"model.layers.0.self_attn.v_proj.lora_A \(1 of 128\)",
    )


def test_unknown_format_version_is_refused(tmp_path):
    _, path = _saved_adapter(tmp_path)
    file = path / "cflora_config.json"
    data = json.loads(file.read_text())
    data["format"] = "rellax-fast-cflora/99"
    file.write_text(json.dumps(data))
    _assert_refused(path, r"cflora_config.json has format 'rellax-fast-cflora/99'; this rellax-fast reads")
    with pytest.raises(AdapterFileError, match="99"):
        CFLoRAConfig.load(file)


@pytest.mark.parametrize("name", ["cflora_adapter.safetensors", "cflora_config.json"])
def test_truncated_files_raise_an_error_naming_the_file(tmp_path, name):
    _, path = _saved_adapter(tmp_path)
    file = path / name
    raw = file.read_bytes()
    file.write_bytes(raw[: len(raw) // 2])
    _assert_refused(path, f"{path / name}.*(truncated or corrupted)")


def _edit_config(path, edit):
    file = path / "cflora_config.json"
    data = json.loads(file.read_text())
    edit(data)
    file.write_text(json.dumps(data))


def _flip_a_byte(path):
    file = path / "cflora_adapter.safetensors"
    raw = bytearray(file.read_bytes())
    raw[-7] ^= 0x10  # inside the last tensor's data
    file.write_bytes(bytes(raw))


def _relabel_to_format_1(data, strip_format_2_fields):
    data["format"] = "rellax-fast-cflora/1"
    data.pop("content_sha256")
    if strip_format_2_fields:
        for key in ("exclude_modules", "rank_pattern", "alpha_pattern", "modules_to_save"):
            data.pop(key)


@pytest.mark.parametrize("strip", [False, True])
def test_adapter_relabelled_to_format_1_with_a_flipped_byte_is_refused(tmp_path, strip):
    """Issue #26.6: format 1 carries no hash, so a format-2 adapter relabelled to format 1 with its hash removed
    (and even its format-2 fields) must not load its flipped byte by default."""
    _, path = _saved_adapter(tmp_path)
    _flip_a_byte(path)
    _edit_config(path, lambda data: _relabel_to_format_1(data, strip))
    if strip:  # indistinguishable from a genuine format-1 file: unverifiable, so refused unless asked for
        _assert_refused(
            path,
            r"cflora_config.json has format rellax-fast-cflora/1, which carries no content hash.*"
            r"allow_unverified=True",
        )
    else:
        _assert_refused(
            path,
            r"says format rellax-fast-cflora/1 but holds exclude_modules, rank_pattern, "
            r"alpha_pattern, modules_to_save, which no format-1 file has",
        )
        with pytest.raises(AdapterFileError, match="relabelled"):  # even when unverified files are allowed
            load_cflora(tiny_llama(), path, allow_unverified=True)


def test_format_2_without_its_hash_or_format_1_with_one_is_refused(tmp_path):
    _, path = _saved_adapter(tmp_path)
    _edit_config(path, lambda data: data.pop("content_sha256"))
    _assert_refused(path, r"\(format rellax-fast-cflora/2\) has no content_sha256")
    _, path = _saved_adapter(tmp_path / "b")
    _edit_config(path, lambda data: data.update({"format": "rellax-fast-cflora/1"}))
    _assert_refused(path, "but holds content_sha256")


def test_format_1_adapter_loads_only_when_unverified_files_are_allowed(tmp_path):
    model, path = _saved_adapter(tmp_path)
    _edit_config(path, lambda data: _relabel_to_format_1(data, True))  # a file as format 1 wrote it
    _assert_refused(path, "carries no content hash")
    with pytest.warns(UserWarning, match="rellax-fast-cflora/1 .no content hash.: loaded unverified"):
        fresh = load_cflora(tiny_llama(), path, allow_unverified=True)
    inputs, cond = model_inputs(), torch.randn(3, COND)
    with torch.no_grad():
        with cflora_condition(model, cond):
            expected = logits_of(model, inputs)
        with cflora_condition(fresh, cond):
            assert torch.equal(logits_of(fresh, inputs), expected)
    save_cflora(fresh, tmp_path / "resaved")  # saved again: format 2, verified, loads by default
    assert (
        json.loads((tmp_path / "resaved" / "cflora_config.json").read_text())["format"]
        == "rellax-fast-cflora/2"
    )
    load_cflora(tiny_llama(), tmp_path / "resaved")


@pytest.mark.parametrize(
    "key, value",
    [
        ("train_lora", "no"),
        ("alpha", float("inf")),
        ("dropout", float("nan")),
        ("alpha_pattern", {"q_proj": -1.0}),
    ],
)
def test_saved_config_with_a_bad_value_names_the_file_and_the_key(tmp_path, key, value):
    """Issue #26.5: a saved config's values are validated as the constructor's, before anything else, and the
    error names the file and the key (was: a raw TypeError for "train_lora": "no", NaN outputs for Infinity)."""
    _, path = _saved_adapter(tmp_path)
    _edit_config(path, lambda data: data.update({key: value}))
    _assert_refused(path, rf"{path / 'cflora_config.json'} holds an invalid config: CFLoRAConfig.{key}")
