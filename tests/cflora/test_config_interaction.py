"""CFLoRAConfig validation and JSON round-trip; each interaction generator's structure and init."""

from __future__ import annotations

import pytest
import torch

from rellax_fast.cflora import (
    CFLoRAConfig,
    FullInteraction,
    MoEInteraction,
    RecRank1Interaction,
    StaticInteraction,
    build_interaction,
)


def test_config_json_round_trip(tmp_path):
    cfg = CFLoRAConfig(
        r=6,
        alpha=3.0,
        dropout=0.1,
        target_modules=["q_proj", "v_proj"],
        interaction="moe",
        cond_dim=11,
        n_experts=3,
        generator_hidden=17,
        generator_init_std=0.01,
        init_lora="gaussian",
        train_lora=False,
        train_interaction=True,
        backend="reference",
    )
    assert CFLoRAConfig.from_json(cfg.to_json()) == cfg
    cfg.save(tmp_path / "c.json")
    assert CFLoRAConfig.load(tmp_path / "c.json") == cfg
    assert cfg.scale == 0.5 and cfg.hidden == 17
    assert CFLoRAConfig(r=4).hidden == 32  # default 2 r²
    regex = CFLoRAConfig(target_modules=r".*\.(q|v)_proj")
    assert CFLoRAConfig.from_json(regex.to_json()) == regex


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"r": 0}, "r must be a positive int"),
        ({"alpha": -1}, "alpha"),
        ({"dropout": 1.0}, "dropout"),
        ({"target_modules": []}, "target_modules"),
        ({"interaction": "dense"}, "interaction must be one of"),
        ({"interaction": "full"}, "cond_dim"),
        ({"interaction": "moe", "cond_dim": 4, "r": 6, "n_experts": 4}, "n_experts to divide r"),
        ({"init_lora": "zeros"}, "init_lora"),
        ({"backend": "gpu"}, "backend"),
        # issue #26.5: finite and in range, of the right type
        ({"alpha": float("inf")}, r"alpha must be a finite number > 0; got inf"),
        ({"alpha": float("nan")}, r"alpha must be a finite number > 0; got nan"),
        ({"alpha": True}, "alpha must be a finite number"),
        ({"alpha": "16"}, "alpha must be a finite number"),
        ({"alpha": 10**400}, "alpha must be a finite number"),
        ({"alpha": 5e-324, "r": 4}, r"the scale alpha/r = 5e-324/4 = 0.0 must be finite and > 0"),
        ({"dropout": float("nan")}, r"dropout must be a number in \[0, 1\); got nan"),
        ({"dropout": -0.1}, "dropout must be a number in"),
        ({"dropout": "0.1"}, "dropout must be a number in"),
        (
            {"alpha_pattern": {"q_proj": float("inf")}},
            "alpha_pattern maps module-name patterns to a finite number",
        ),
        ({"generator_init_std": float("inf")}, "generator_init_std must be a finite number >= 0"),
        ({"train_lora": "no"}, r"train_lora must be a bool \(true/false\); got 'no'"),
        ({"train_interaction": 1}, "train_interaction must be a bool"),
        ({"cond_dim": True}, "cond_dim must be a positive int or None"),
        ({"n_experts": 0}, "n_experts must be a positive int"),
    ],
)
def test_config_rejects_bad_values(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        CFLoRAConfig(**kwargs)


def test_peft_style_fields_round_trip_and_validate(tmp_path):
    cfg = CFLoRAConfig(
        r=4,
        alpha=16.0,
        target_modules="all-linear",
        exclude_modules=["lm_head", "k_proj"],
        rank_pattern={"v_proj": 2, r"layers\.1\..*": 8},
        alpha_pattern={"q_proj": 3.5},
        modules_to_save=["score"],
    )
    cfg.save(tmp_path / "c.json")
    assert CFLoRAConfig.load(tmp_path / "c.json") == cfg
    # PEFT's rank_pattern semantics: a suffix match after a dot (or the whole name), first pattern wins
    assert cfg.rank_and_alpha("model.layers.0.self_attn.v_proj") == (2, 16.0)
    assert cfg.rank_and_alpha("model.layers.1.self_attn.v_proj") == (2, 16.0)
    assert cfg.rank_and_alpha("model.layers.1.mlp.up_proj") == (8, 16.0)
    assert cfg.rank_and_alpha("model.layers.0.self_attn.q_proj") == (4, 3.5)
    assert cfg.rank_and_alpha("model.layers.0.self_attn.xv_proj") == (4, 16.0)  # not a dotted suffix
    for kwargs, fragment in [
        ({"exclude_modules": []}, "exclude_modules"),
        ({"modules_to_save": [""]}, "modules_to_save"),
        ({"rank_pattern": ["q_proj"]}, "rank_pattern must be a dict"),
        ({"alpha_pattern": {"q": -1}}, "alpha_pattern maps"),
    ]:
        with pytest.raises(ValueError, match=fragment):
            CFLoRAConfig(**kwargs)


def test_peft_names_are_aliases_and_the_default_scale_is_peft_s():
    """Issue #25.6: LoraConfig's names map to ours in one place; the config keeps its own names."""
    from peft import LoraConfig

    cfg = CFLoRAConfig(
        r=4, lora_alpha=8, lora_dropout=0.1, init_lora_weights="gaussian", target_modules=["q_proj"]
    )
    assert cfg == CFLoRAConfig(r=4, alpha=8, dropout=0.1, init_lora="gaussian", target_modules=["q_proj"])
    assert "lora_alpha" not in cfg.to_dict() and CFLoRAConfig.from_json(cfg.to_json()) == cfg
    assert CFLoRAConfig(init_lora_weights=True).init_lora == "kaiming"
    assert CFLoRAConfig(init_lora_weights=False).init_lora == "random"
    assert CFLoRAConfig(alpha=8, lora_alpha=8).alpha == 8  # the same value twice is fine
    with pytest.raises(
        TypeError, match="lora_alpha=4 and alpha=32 disagree; lora_alpha is PEFT's name for alpha"
    ):
        CFLoRAConfig(alpha=32, lora_alpha=4)
    with pytest.raises(
        ValueError,
        match="init_lora_weights .PEFT's name for init_lora. must be one of True, "
        "'gaussian', False; got 'pissa'",
    ):
        CFLoRAConfig(init_lora_weights="pissa")
    with pytest.raises(ValueError, match="lora_dropout|dropout must be a number"):
        CFLoRAConfig(lora_dropout=1.5)
    # the defaults give PEFT's scale: lora_alpha / r at PEFT's default r and lora_alpha
    peft = LoraConfig()
    assert CFLoRAConfig().scale == peft.lora_alpha / peft.r == 1.0
    assert CFLoRAConfig(r=16).scale == LoraConfig(r=16).lora_alpha / 16


@pytest.mark.parametrize("tag", ["rellax-fast-cflora/99", "rellax-fast-cflora/", "other/1", 2])
def test_config_rejects_unknown_format_versions(tag):
    from rellax_fast.cflora.config import AdapterFileError

    with pytest.raises(
        AdapterFileError, match="this rellax-fast reads rellax-fast-cflora/1, rellax-fast-cflora/2"
    ):
        CFLoRAConfig.from_dict({"format": tag, "r": 4})
    assert CFLoRAConfig.from_dict({"format": "rellax-fast-cflora/1", "r": 4}).r == 4


def test_truncated_config_file_names_the_file(tmp_path):
    from rellax_fast.cflora.config import AdapterFileError

    path = tmp_path / "c.json"
    path.write_text(CFLoRAConfig(r=4).to_json()[:40])
    with pytest.raises(AdapterFileError, match=f"{path} is not valid JSON"):
        CFLoRAConfig.load(path)


def test_config_rejects_unknown_json_keys():
    with pytest.raises(ValueError, match="unknown keys"):
        CFLoRAConfig.from_dict({"r": 4, "rank": 4})


def _randomise(module):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.5)


R, COND, N = 8, 5, 4


def test_identity_has_no_generator():
    assert build_interaction(CFLoRAConfig(r=R, interaction="identity")) is None


def test_static_is_one_shared_matrix_starting_at_identity():
    gen = build_interaction(CFLoRAConfig(r=R, interaction="static"))
    assert isinstance(gen, StaticInteraction) and gen.mergeable and not gen.needs_cond
    assert torch.equal(gen(), torch.eye(R))
    _randomise(gen)
    assert gen().shape == (R, R) and gen(torch.randn(3, COND)).shape == (R, R)


def test_full_starts_exactly_at_identity_and_is_dense_per_sample():
    gen = build_interaction(CFLoRAConfig(r=R, interaction="full", cond_dim=COND))
    assert isinstance(gen, FullInteraction) and gen.needs_cond and not gen.mergeable
    assert gen.fc1.out_features == 2 * R * R and gen.fc2.out_features == R * R
    cond = torch.randn(3, COND) * 10
    assert torch.equal(gen(cond), torch.eye(R).expand(3, R, R))
    _randomise(gen)
    c = gen(cond)
    assert c.shape == (3, R, R)
    assert not torch.allclose(c[0], c[1])  # per sample
    assert (c.abs() > 1e-6).float().mean() > 0.95  # dense: no structural zeros
    # matches the documented architecture LayerNorm -> Linear -> GELU -> Linear
    expected = gen.fc2(torch.nn.functional.gelu(gen.fc1(gen.norm(cond)))).view(3, R, R)
    torch.testing.assert_close(c, expected)


def test_moe_is_block_diagonal_scaled_gates():
    gen = build_interaction(CFLoRAConfig(r=R, interaction="moe", cond_dim=COND, n_experts=N))
    assert isinstance(gen, MoEInteraction)
    cond = torch.randn(5, COND)
    assert torch.equal(gen(cond), torch.eye(R).expand(5, R, R))  # uniform gates give I
    _randomise(gen)
    c = gen(cond)
    g = torch.softmax(gen.gate(gen.norm(cond)), dim=-1)
    k = R // N
    expected = torch.stack([torch.kron(torch.diag(N * g[b]), torch.eye(k)) for b in range(5)])
    torch.testing.assert_close(c, expected)
    # block e is g_e·I: off-block and off-diagonal entries are exactly 0
    assert torch.equal(c * (1 - torch.eye(R)), torch.zeros_like(c))
    torch.testing.assert_close(c.diagonal(dim1=1, dim2=2).sum(-1) / k, torch.full((5,), float(N)))
    assert not torch.allclose(c[0], c[1])


def test_recrank1_is_outer_product_kron_identity():
    gen = build_interaction(CFLoRAConfig(r=R, interaction="recrank1", cond_dim=COND, n_experts=N))
    assert isinstance(gen, RecRank1Interaction)
    cond = torch.randn(4, COND)
    k = R // N
    # uniform weights: the averaging projector (1/n) 11ᵀ ⊗ I_k
    projector = torch.kron(torch.full((N, N), 1.0 / N), torch.eye(k))
    torch.testing.assert_close(gen(cond), projector.expand(4, R, R))
    _randomise(gen)
    c = gen(cond)
    w = torch.softmax(gen.gate(gen.norm(cond)), dim=-1)
    assert torch.all(w > 0) and torch.allclose(w.sum(-1), torch.ones(4))
    expected = torch.stack([torch.kron(N * torch.outer(w[b], w[b]), torch.eye(k)) for b in range(4)])
    torch.testing.assert_close(c, expected)
    assert all(int(torch.linalg.matrix_rank(c[b])) == k for b in range(4))


@pytest.mark.parametrize("kind", ["full", "moe", "recrank1"])
def test_conditioned_generators_reject_missing_or_bad_cond(kind):
    gen = build_interaction(CFLoRAConfig(r=R, interaction=kind, cond_dim=COND, n_experts=N))
    with pytest.raises(RuntimeError, match="needs a conditioning vector"):
        gen(None)
    with pytest.raises(ValueError, match=r"cond must have shape \(batch, 5\)"):
        gen(torch.randn(3, COND + 1))


def test_importing_the_cflora_api_stays_light():
    import subprocess
    import sys

    code = (
        "import sys, rellax_fast\n"
        "from rellax_fast import CFLoRAConfig, inject_cflora, cflora_condition, load_peft_lora\n"
        "from rellax_fast import (get_cflora_config, cflora_checkpoint_context_fn, AdapterFileError,\n"
        "                         set_cflora_enabled, cflora_layers)\n"
        "heavy = [m for m in ('transformers', 'peft', 'triton', 'rellax_fast._C') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_cflora_name_is_importable_from_rellax_fast():
    """Issue #25.8: the README says the adapter API is importable from ``rellax_fast``; every public name of
    ``rellax_fast.cflora`` resolves there (lazily) to the same object."""
    import rellax_fast
    import rellax_fast.cflora as cflora

    missing = [name for name in cflora.__all__ if name not in rellax_fast.__all__]
    assert not missing, f"not exported by rellax_fast: {missing}"
    for name in cflora.__all__:
        assert getattr(rellax_fast, name) is getattr(cflora, name), name
    assert "get_cflora_config" in dir(rellax_fast)
