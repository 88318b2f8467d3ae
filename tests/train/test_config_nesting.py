"""One adapter config travels (issue #16, item 4): the CLI's adapter flags build one CFLoRAConfig
(PipelineConfig.cflora), each variant's model uses it with the variant's interaction and the DIN's cond_dim, and
rellax.json records it once, nested in CFLoRAConfig's own dict form. Runs written before (a flat "pipeline" dict
with r / alpha / dropout / n_experts / cflora_backend) are converted when read (runs.nest_flat_adapter_keys) and
score the same. The flat keywords (ReLLaXOptions(r=...), PipelineConfig(cflora_backend=...)) are gone (#29)."""

import argparse
import json
from dataclasses import replace

import numpy as np
import pytest

from rellax_fast.cflora import CFLoRAConfig, cflora_layers
from rellax_fast.train.args import add_model_arguments, pipeline_config
from rellax_fast.train.model import PER_ARCHITECTURE, ReLLaXModel, ReLLaXOptions
from rellax_fast.train.pipeline import (
    PipelineConfig,
    VariantSpec,
    pipeline_cflora_config,
    variant_cflora_config,
)
from rellax_fast.train.runs import nest_flat_adapter_keys, pipeline_config_from_dict, variant_from_meta
from rellax_fast.train.trainer import TrainConfig

ADAPTER_FLAGS = [
    "--r",
    "4",
    "--alpha",
    "6",
    "--lora-dropout",
    "0.1",
    "--n-experts",
    "2",
    "--generator-hidden",
    "11",
    "--generator-init-std",
    "0.02",
    "--cflora-backend",
    "reference",
]


def _args(*argv):
    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    return parser.parse_args(list(argv))


def test_cli_adapter_flags_build_the_pipeline_cflora_config():
    cfg = pipeline_config(_args(*ADAPTER_FLAGS))
    assert cfg.cflora == CFLoRAConfig(
        r=4,
        alpha=6.0,
        dropout=0.1,
        n_experts=2,
        generator_hidden=11,
        generator_init_std=0.02,
        backend="reference",
        target_modules=PER_ARCHITECTURE,
    )
    # the flags' defaults and the dataclass's are the same config
    assert pipeline_config(_args()).cflora == PipelineConfig().cflora == pipeline_cflora_config()
    assert PipelineConfig().cflora.generator_hidden is None and PipelineConfig().cflora.dropout == 0.05


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--generator-hidden", "0"], "argument --generator-hidden: must be an integer >= 1; got '0'"),
        (
            ["--generator-init-std", "-0.1"],
            "argument --generator-init-std: must be a finite number >= 0; got '-0.1'",
        ),
        (
            ["--generator-init-std", "nan"],
            "argument --generator-init-std: must be a finite number >= 0; got 'nan'",
        ),
        (["--alpha", "0"], "argument --alpha: must be a finite number > 0; got '0'"),
        (["--alpha", "inf"], "argument --alpha: must be a finite number > 0; got 'inf'"),
    ],
)
def test_bad_adapter_flags_are_refused_naming_the_flag(argv, message, capsys):
    """Checked when parsed (#26): argparse's one line names the flag, exit code 2."""
    with pytest.raises(SystemExit) as exc:
        _args(*argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_generator_flags_reach_the_model(tiny_bert_dir):
    from rellax_fast.train.model import load_backbone

    cfg = pipeline_config(_args(*ADAPTER_FLAGS))
    backbone, kind = load_backbone(tiny_bert_dir)
    options = ReLLaXOptions(
        cflora=variant_cflora_config(cfg, VariantSpec("x", interaction="full"), 5), use_spa=False
    )
    model = ReLLaXModel(backbone, kind, (1, 2), options, cond_dim=5)
    layers = cflora_layers(model.backbone)
    assert [name.rsplit(".", 1)[-1] for name, _ in layers] == [
        "query",
        "value",
    ] * 2  # BERT's, per architecture
    for _, layer in layers:
        gen = layer.interaction
        assert gen.fc1.out_features == 11 and gen.fc2.in_features == 11 and gen.cond_dim == 5
        assert (
            0.005 < float(gen.fc2.weight.detach().std()) < 0.05
        )  # --generator-init-std 0.02, not the default 0
    assert model.cflora_config == replace(
        cfg.cflora, interaction="full", cond_dim=5, target_modules=["query", "value"]
    )
    # the pipeline builds the variant's config once, targets resolved; the model takes that object as it is
    once = variant_cflora_config(cfg, VariantSpec("x", interaction="full"), 5, backbone.config.model_type)
    assert once == model.cflora_config
    assert ReLLaXOptions(cflora=once, use_spa=False).cflora_config("bert", 5) is once


def test_rellax_options_dict_and_config_forms_agree():
    legacy = ReLLaXOptions(
        cflora={"interaction": "moe", "dropout": 0.0, "backend": "reference", "n_experts": 2}
    )
    explicit = ReLLaXOptions(
        cflora=CFLoRAConfig(
            r=8,
            alpha=16.0,
            dropout=0.0,
            interaction="moe",
            cond_dim=7,
            n_experts=2,
            backend="reference",
            target_modules=PER_ARCHITECTURE,
        )
    )
    want = CFLoRAConfig(
        r=8,
        alpha=16.0,
        dropout=0.0,
        interaction="moe",
        cond_dim=7,
        n_experts=2,
        backend="reference",
        target_modules=["query", "value"],
    )
    assert legacy.cflora_config("bert", 7) == explicit.cflora_config("bert", 7) == want
    assert replace(legacy, use_spa=False).cflora_config("bert", 7) == want  # replace keeps the dict settings
    assert ReLLaXOptions().cflora_config("llama", 3) == CFLoRAConfig(
        r=8, alpha=16.0, dropout=0.05, interaction="full", cond_dim=3, target_modules=["q_proj", "v_proj"]
    )
    # an unconditioned kind drops cond_dim; explicit target modules are kept
    plain = ReLLaXOptions(cflora={"interaction": "identity", "target_modules": ["key"]}).cflora_config(
        "bert", 7
    )
    assert plain.cond_dim is None and plain.target_modules == ["key"]


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda: ReLLaXOptions(r=4), TypeError, "unexpected keyword argument 'r'"),
        (
            lambda: ReLLaXOptions(cflora=42),
            TypeError,
            "must be a CFLoRAConfig, a dict of its fields or None; got int",
        ),
        (
            lambda: ReLLaXOptions(cflora={"rank": 4}).cflora_config("bert", 3),
            ValueError,
            r"unknown keys \['rank'\]",
        ),
        (
            lambda: ReLLaXOptions(cflora=CFLoRAConfig(interaction="full", cond_dim=4)).cflora_config(
                "bert", 3
            ),
            ValueError,
            "cflora.cond_dim is 4 but the model's cond_dim",
        ),
        (
            lambda: ReLLaXOptions(cflora={"interaction": "full"}).cflora_config("bert", None),
            ValueError,
            "'full' needs cond_dim",
        ),
    ],
)
def test_rellax_options_refuse_bad_adapter_settings(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_pipeline_config_round_trips_and_converts_the_flat_form():
    cfg = PipelineConfig(
        model="m",
        k=3,
        n_valid=4,
        seed=7,
        train=TrainConfig(lr=3e-3, lr_groups={"lora": 1e-2}),
        cflora=pipeline_cflora_config(
            r=4, alpha=6.0, n_experts=2, generator_hidden=9, generator_init_std=0.01, backend="reference"
        ),
    )
    nested = json.loads(json.dumps(cfg.to_dict()))
    assert nested["cflora"] == cfg.cflora.to_dict() and not {"r", "alpha", "cflora_backend"} & set(nested)
    assert pipeline_config_from_dict(nested) == cfg
    assert pipeline_config_from_dict(nested, model="other").model == "other"
    # the flat keywords are gone: the adapter is set in one place
    with pytest.raises(TypeError, match="unexpected keyword argument 'cflora_backend'"):
        PipelineConfig(cflora_backend="reference")
    assert not hasattr(PipelineConfig(), "r")


def test_the_flat_form_of_older_runs_is_converted_once():
    nested = PipelineConfig(
        seed=7, cflora=pipeline_cflora_config(r=4, alpha=6.0, backend="reference")
    ).to_dict()
    nested = json.loads(json.dumps(nested))
    assert nest_flat_adapter_keys(nested) == nested  # the current form: unchanged
    # a run written before the nested config: the flat keys, ReLLaX's defaults for what it did not record
    flat = {k: v for k, v in nested.items() if k != "cflora"}
    flat.update(r=4, alpha=6.0, n_experts=2, cflora_backend="reference")
    converted = nest_flat_adapter_keys(flat)
    assert not {"r", "alpha", "n_experts", "cflora_backend"} & set(converted)
    assert (
        converted["cflora"]
        == pipeline_cflora_config(r=4, alpha=6.0, n_experts=2, backend="reference").to_dict()
    )
    assert {k: v for k, v in converted.items() if k != "cflora"} == {
        k: v for k, v in nested.items() if k != "cflora"
    }
    old = pipeline_config_from_dict(flat)
    assert old.cflora == pipeline_cflora_config(r=4, alpha=6.0, n_experts=2, backend="reference")
    assert old == replace(pipeline_config_from_dict(nested), cflora=old.cflora)
    with pytest.raises(
        ValueError, match=r"both a nested 'cflora' and the flat keys \['cflora_backend', 'r'\]"
    ):
        nest_flat_adapter_keys({**nested, "r": 4, "cflora_backend": "reference"})


def test_the_variant_reads_its_interaction_from_the_adapter_config():
    cfg = PipelineConfig(cflora=pipeline_cflora_config(interaction="moe", cond_dim=4))
    assert variant_from_meta({"name": "v", "spa": False}, cfg) == VariantSpec(
        "v", spa=False, interaction="moe"
    )
    # a run written before: its variant's own interaction (the pipeline's was a placeholder then)
    old = variant_from_meta({"name": "v", "interaction": "static"}, PipelineConfig())
    assert old == VariantSpec("v", interaction="static")


def _train(data, din, vocab, report, ctr_dir, model_dir, run_dir, spec, **cflora):
    from rellax_fast.train.pipeline import build_context, run_variant

    cfg = PipelineConfig(
        model=model_dir,
        k=3,
        n_train=24,
        n_test=40,
        max_length=160,
        cflora=pipeline_cflora_config(backend="reference", **cflora),
        train=TrainConfig(batch_size=8, lr=3e-2, save_every_steps=0, progress=False),
    )
    ctx = build_context(data, din, vocab, report, cfg)
    ctx.ctr_dir = str(ctr_dir)
    return run_variant(ctx, spec, cfg, run_dir)


def test_runs_record_the_config_once_and_old_flat_runs_still_score_the_same(
    ml100k_slice, tiny_bert_dir, tmp_path
):
    from rellax_fast.ctr.din import DINTrainConfig
    from rellax_fast.ctr.store import fit_din, save_ctr
    from rellax_fast.train.runs import load_run, score

    data = ml100k_slice
    din, report, vocab = fit_din(
        data,
        {"embed_dim": 8, "mlp_hidden": (16, 8), "max_history": 20, "attention_hidden": 8},
        DINTrainConfig(epochs=1, progress=False),
    )
    ctr_dir = save_ctr(din, vocab, report, tmp_path / "ctr", extra={"dataset": data.dataset.name})
    args = (data, din, vocab, report, ctr_dir, tiny_bert_dir)

    # a new run with non-default generator settings: recorded (nested, once) and rebuilt from the record
    run = tmp_path / "full"
    res = _train(
        *args, run, VariantSpec("full", subr=False), r=4, generator_hidden=5, generator_init_std=0.05
    )
    meta = json.loads((run / "rellax.json").read_text())
    recorded = CFLoRAConfig.from_dict(meta["pipeline"]["cflora"])
    assert recorded == res["model"].cflora_config
    assert (recorded.interaction, recorded.cond_dim, recorded.target_modules, recorded.generator_hidden) == (
        "full",
        din.config.h_dim,
        ["query", "value"],
        5,
    )
    assert not {"r", "alpha", "dropout", "n_experts", "cflora_backend"} & set(meta["pipeline"])
    assert "interaction" not in meta["variant"]  # recorded once, in the adapter config
    _, probs, _, _ = score(run, data, progress=False)
    np.testing.assert_allclose(probs, np.load(run / "predictions.npy"), rtol=1e-5, atol=1e-6)

    # a run as the code before the nested config wrote it: moe (n_experts matters), r and alpha off their defaults
    run = tmp_path / "moe"
    _train(*args, run, VariantSpec("moe", subr=False, interaction="moe"), r=4, alpha=12.0, n_experts=2)
    reference = np.load(run / "predictions.npy")
    meta = json.loads((run / "rellax.json").read_text())
    adapter = meta["pipeline"].pop("cflora")
    meta["pipeline"].update(
        r=adapter["r"],
        alpha=adapter["alpha"],
        dropout=adapter["dropout"],
        n_experts=adapter["n_experts"],
        cflora_backend=adapter["backend"],
    )
    meta["variant"]["interaction"] = "moe"  # that code recorded the interaction in the variant
    (run / "rellax.json").write_text(json.dumps(meta, indent=2))
    model, *_, cfg, spec, _, _ = load_run(run, log=lambda *a: None)
    assert spec.interaction == "moe"
    assert (cfg.cflora.r, cfg.cflora.alpha, cfg.cflora.n_experts, cfg.cflora.target_modules) == (
        4,
        12.0,
        2,
        PER_ARCHITECTURE,
    )
    assert model.cflora_config == CFLoRAConfig.from_dict(adapter)
    _, probs, _, _ = score(run, data, progress=False)
    np.testing.assert_allclose(probs, reference, rtol=1e-5, atol=1e-6)
    # the flat keys are really read: the same run recorded with another alpha scores differently
    meta["pipeline"]["alpha"] = 24.0
    (run / "rellax.json").write_text(json.dumps(meta, indent=2))
    _, probs, _, _ = score(run, data, progress=False)
    assert np.abs(probs - reference).max() > 1e-4
