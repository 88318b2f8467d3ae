"""The PEFT-style adapter API: print_trainable_parameters, disable_adapter (and HF's disable_adapters),
unload / merge_and_unload (plain modules, clean state_dict, save_pretrained round trip), the tied-weight
guard, gradient checkpointing with several conditioned forwards per backward, and the PEFT config options
all-linear / exclude_modules / rank_pattern / alpha_pattern / modules_to_save (checked against PEFT itself)."""

from __future__ import annotations

import pytest
import torch
from cflora_models import VOCAB, logits_of, model_inputs, randomise_adapter, tiny_gpt2, tiny_llama
from transformers.pytorch_utils import Conv1D

import rellax_fast.cflora.conditioning as cflora_conditioning
from rellax_fast.cflora import (
    CFLoRAConfig,
    CFLoRALinear,
    cflora_condition,
    cflora_layers,
    cflora_trainable_parameters,
    disable_adapter,
    export_peft_lora,
    inject_cflora,
    load_cflora,
    load_peft_lora,
    merge_and_unload,
    merge_cflora,
    print_trainable_parameters,
    save_cflora,
    unload,
    unmerge_cflora,
)

COND = 5


def _base_logits(factory, inputs):
    with torch.no_grad():
        return logits_of(factory(), inputs)


# ----------------------------------------------------------------------------------- trainable parameters
def test_print_trainable_parameters(capsys):
    model = tiny_llama()
    inject_cflora(model, CFLoRAConfig(r=4, target_modules=["q_proj"]), verbose=True)
    trainable, total = cflora_trainable_parameters(model)
    assert trainable == 2 * (4 * 32 + 32 * 4)
    line = f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
    assert capsys.readouterr().out.strip() == line  # printed at injection with verbose=True
    print_trainable_parameters(model)
    assert capsys.readouterr().out.strip() == line
    inject_cflora(tiny_llama(), CFLoRAConfig(r=4, target_modules=["q_proj"]))
    assert capsys.readouterr().out == ""  # quiet by default (logged at INFO)


# ----------------------------------------------------------------------------------------------- disable
@pytest.mark.parametrize(
    "factory, targets", [(tiny_llama, ["q_proj", "down_proj"]), (tiny_gpt2, ["c_attn", "c_fc"])]
)
def test_disable_adapter_gives_the_base_outputs_exactly(factory, targets):
    inputs = model_inputs()
    base = _base_logits(factory, inputs)
    model = inject_cflora(
        factory(), CFLoRAConfig(r=4, alpha=8, target_modules=targets, interaction="full", cond_dim=COND)
    )
    randomise_adapter(model)
    cond = torch.randn(3, COND)
    with torch.no_grad():
        with cflora_condition(model, cond):
            adapted = logits_of(model, inputs)
        assert not torch.allclose(adapted, base, atol=1e-3)
        with disable_adapter(model):  # no cond needed: the conditioned layers are off
            assert torch.equal(logits_of(model, inputs), base)
        with cflora_condition(model, cond):
            assert torch.equal(logits_of(model, inputs), adapted)
        # transformers' own PeftAdapterMixin methods act on the CFLoRA adapter too
        model.disable_adapters()
        assert torch.equal(logits_of(model, inputs), base)
        model.enable_adapters()
        with cflora_condition(model, cond):
            assert torch.equal(logits_of(model, inputs), adapted)


def test_disable_adapter_takes_the_adapter_out_of_the_graph_and_refuses_merged():
    model = inject_cflora(
        tiny_llama(), CFLoRAConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora="random")
    )
    inputs = model_inputs()
    with disable_adapter(model):
        loss = model(**inputs, labels=inputs["input_ids"]).loss
    assert not loss.requires_grad  # the (trainable) adapter took no part; the base is frozen
    with cflora_condition(model, torch.randn(3, COND)):
        assert model(**inputs, labels=inputs["input_ids"]).loss.requires_grad
    merge_cflora(model)
    with pytest.raises(RuntimeError, match="merged into W.*unmerge_cflora"):
        with disable_adapter(model):
            pass
    assert not any(layer.disabled for _, layer in cflora_layers(model))


# ------------------------------------------------------------------------------------- unload / merge
@pytest.mark.parametrize(
    "factory, targets", [(tiny_llama, ["q_proj", "v_proj", "down_proj"]), (tiny_gpt2, ["c_attn", "c_proj"])]
)
def test_unload_gives_back_the_plain_modules(factory, targets):
    inputs = model_inputs()
    base_model = factory()
    base_keys = list(base_model.state_dict())
    base = _base_logits(factory, inputs)
    model = factory()
    originals = {n: m for n, m in model.named_modules()}
    inject_cflora(model, CFLoRAConfig(r=4, target_modules=targets, init_lora="random"))
    assert unload(model) is model
    assert not cflora_layers(model)
    for name, module in model.named_modules():
        assert module is originals[name], name  # the very same nn.Linear / Conv1D objects
    assert list(model.state_dict()) == base_keys
    with torch.no_grad():
        assert torch.equal(logits_of(model, inputs), base)
    assert "disable_adapters" not in model.__dict__  # transformers' own method again


@pytest.mark.parametrize(
    "factory, targets, plain",
    [
        (tiny_llama, ["q_proj", "v_proj", "down_proj"], torch.nn.Linear),
        (tiny_gpt2, ["c_attn", "c_fc"], Conv1D),
    ],
)
@pytest.mark.parametrize("interaction", ["identity", "static"])
def test_merge_and_unload_then_save_pretrained_round_trips(tmp_path, factory, targets, plain, interaction):
    model = inject_cflora(
        factory(), CFLoRAConfig(r=4, alpha=8, target_modules=targets, interaction=interaction)
    )
    randomise_adapter(model)
    inputs = model_inputs()
    with torch.no_grad():
        adapted = logits_of(model, inputs)
    merge_and_unload(model)
    assert not cflora_layers(model)
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in targets:
            assert type(module) is plain, name
    assert list(model.state_dict()) == list(factory().state_dict())
    with torch.no_grad():
        torch.testing.assert_close(logits_of(model, inputs), adapted, rtol=1e-4, atol=1e-4)
    model.save_pretrained(tmp_path / "merged")
    reloaded, info = type(model).from_pretrained(tmp_path / "merged", output_loading_info=True)
    assert info["unexpected_keys"] in ([], set()) and info["missing_keys"] in ([], set()), info
    with torch.no_grad():
        torch.testing.assert_close(logits_of(reloaded.eval(), inputs), adapted, rtol=1e-4, atol=1e-4)


def test_unload_refuses_a_merged_model_and_per_sample_adapters_do_not_merge():
    model = inject_cflora(tiny_llama(), CFLoRAConfig(r=4, target_modules=["q_proj"]))
    merge_cflora(model)
    with pytest.raises(RuntimeError, match="merge_and_unload"):
        unload(model)
    unmerge_cflora(model)
    conditioned = inject_cflora(
        tiny_llama(),
        CFLoRAConfig(r=4, target_modules=["q_proj"], interaction="moe", cond_dim=COND, n_experts=2),
    )
    with pytest.raises(RuntimeError, match="per sample"):
        merge_and_unload(conditioned)
    assert len(cflora_layers(conditioned)) == 2  # untouched


# ------------------------------------------------------------------------------------------ tied weights
def test_tied_lm_head_warns_at_injection_and_merges_only_when_untied(tmp_path):
    model = tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    with pytest.warns(UserWarning, match=r"lm_head is tied to transformer\.wte\.weight"):
        inject_cflora(model, CFLoRAConfig(r=4, alpha=8, target_modules=["lm_head", "c_attn"]))
    randomise_adapter(model)
    inputs = model_inputs()
    wte = model.transformer.wte.weight.detach().clone()
    with torch.no_grad():
        adapted = logits_of(model, inputs)
    with pytest.raises(RuntimeError, match=r"lm_head is tied to transformer\.wte\.weight.*untie=True"):
        merge_cflora(model)
    assert not any(layer.merged for _, layer in cflora_layers(model))  # refused before touching anything
    merge_and_unload(model, untie=True)
    assert model.lm_head.weight is not model.transformer.wte.weight
    assert torch.equal(model.transformer.wte.weight, wte)  # the input embeddings did not move
    assert model.config.tie_word_embeddings is False
    with torch.no_grad():
        torch.testing.assert_close(logits_of(model, inputs), adapted, rtol=1e-4, atol=1e-4)
    model.save_pretrained(tmp_path / "merged")
    reloaded, info = type(model).from_pretrained(tmp_path / "merged", output_loading_info=True)
    assert not info["unexpected_keys"] and not info["missing_keys"], info
    assert reloaded.lm_head.weight is not reloaded.transformer.wte.weight
    with torch.no_grad():
        torch.testing.assert_close(logits_of(reloaded.eval(), inputs), adapted, rtol=1e-4, atol=1e-4)


def test_untied_targets_do_not_warn():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inject_cflora(tiny_gpt2(), CFLoRAConfig(r=4, target_modules="all-linear"))


# ------------------------------------------------------------------------------ gradient checkpointing
def tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=64,
        attn_implementation="eager",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertModel(cfg)


def _loss(model, inputs):
    out = model(**inputs)
    if getattr(out, "logits", None) is not None:
        return torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), inputs["input_ids"].flatten())
    h = out.last_hidden_state
    return (h * torch.linspace(-1, 1, h.shape[-1])).pow(2).mean()


def _enable_checkpointing(model, reentrant):
    kwargs = {"use_reentrant": reentrant}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.enable_input_require_grads()


def _two_forwards_one_backward(model, batches, conds):
    model.zero_grad(set_to_none=True)
    total = 0
    for inputs, cond in zip(batches, conds):
        with cflora_condition(model, cond):
            total = total + _loss(model, inputs)
    total.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    "factory, targets",
    [(tiny_llama, ["q_proj", "v_proj", "down_proj"]), (tiny_bert, ["query", "value", "intermediate.dense"])],
)
@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_with_two_forwards_per_backward(factory, targets, reentrant, monkeypatch):
    model = inject_cflora(
        factory(),
        CFLoRAConfig(
            r=4,
            alpha=8,
            target_modules=targets,
            interaction="full",
            cond_dim=COND,
            init_lora="random",
            generator_init_std=0.3,
        ),
    )
    model.train()
    batches = [model_inputs(seed=1), model_inputs(seed=2)]
    conds = [torch.randn(3, COND), torch.randn(3, COND)]
    ref = _two_forwards_one_backward(model, batches, conds)
    _enable_checkpointing(model, reentrant)
    layer = cflora_layers(model)[0][1]
    calls = []
    handle = layer.register_forward_hook(lambda *a: calls.append(1))
    got = _two_forwards_one_backward(model, batches, conds)  # no context_fn: correct by default
    handle.remove()
    assert len(calls) == 4, "the checkpointed layers were not recomputed"
    assert got.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-6, msg=name)
    if not reentrant and factory is tiny_llama:
        # control: without the cond replay, the first forward would be recomputed with the second cond; the
        # layers notice and raise instead of returning wrong gradients
        monkeypatch.setattr(cflora_conditioning, "_install_checkpoint_replay", lambda root: None)
        fresh = inject_cflora(
            factory(),
            CFLoRAConfig(
                r=4,
                alpha=8,
                target_modules=targets,
                interaction="full",
                cond_dim=COND,
                init_lora="random",
                generator_init_std=0.3,
            ),
        )
        fresh.load_state_dict(model.state_dict())
        fresh.train()
        _enable_checkpointing(fresh, reentrant)
        with pytest.raises(
            RuntimeError, match="several cflora_condition blocks still wait for their backward"
        ):
            _two_forwards_one_backward(fresh, batches, conds)


# --------------------------------------------------------------------------------------- config options
def _peft_lora_names(model):
    from peft.tuners.lora import LoraLayer

    return sorted(
        n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, LoraLayer)
    )


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("exclude", [None, ["k_proj", "c_fc"], r".*\.1\..*"])
def test_all_linear_and_exclude_modules_match_peft(factory, exclude):
    from peft import LoraConfig, get_peft_model

    ours = inject_cflora(factory(), CFLoRAConfig(r=4, target_modules="all-linear", exclude_modules=exclude))
    peft_model = get_peft_model(
        factory(), LoraConfig(r=4, target_modules="all-linear", exclude_modules=exclude)
    )
    names = [n for n, _ in cflora_layers(ours)]
    assert names == _peft_lora_names(peft_model) or sorted(names) == _peft_lora_names(peft_model)
    assert "lm_head" not in names and names
    if exclude is not None:
        assert len(names) < len(
            cflora_layers(inject_cflora(factory(), CFLoRAConfig(r=4, target_modules="all-linear")))
        )


def _bert_classifier(seed=0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=64,
        num_labels=2,
    )
    return BertForSequenceClassification(cfg).eval()


@pytest.mark.parametrize("r", [4, 64])
def test_all_linear_on_a_bert_classifier_follows_peft(tmp_path, r):
    """Issue #25.3: "all-linear" leaves out the 32 -> 2 classification head (PEFT's rule for a model without
    output embeddings) and accepts a rank above a layer's dimensions (r=64 > 32), as PEFT does: the same
    layers and shapes as PEFT's, and PEFT's outputs after loading its adapter."""
    from peft import LoraConfig, get_peft_model

    ours = inject_cflora(_bert_classifier(), CFLoRAConfig(r=r, alpha=r, target_modules="all-linear"))
    peft_cls = get_peft_model(
        _bert_classifier(), LoraConfig(r=r, target_modules="all-linear", task_type="SEQ_CLS")
    )
    names = sorted(n for n, _ in cflora_layers(ours))
    assert names == _peft_lora_names(peft_cls) and "classifier" not in names and "bert.pooler.dense" in names
    # the same layers, without the head, as a plain PEFT adapter whose weights load into ours
    peft_model = get_peft_model(
        _bert_classifier(), LoraConfig(r=r, lora_alpha=r, target_modules=names, init_lora_weights=False)
    )
    for name, layer in cflora_layers(ours):
        peft_layer = peft_model.get_submodule(f"base_model.model.{name}")
        assert layer.lora_A.shape == peft_layer.lora_A["default"].weight.shape == (r, layer.in_features)
        assert layer.lora_B.shape == peft_layer.lora_B["default"].weight.shape == (layer.out_features, r)
    peft_model.save_pretrained(tmp_path)
    load_peft_lora(ours, tmp_path)
    inputs = model_inputs()
    with torch.no_grad():
        expected = peft_model(**inputs).logits
        assert not torch.allclose(
            expected, _bert_classifier()(**inputs).logits, atol=1e-4
        )  # the adapter matters
        torch.testing.assert_close(ours(**inputs).logits, expected, rtol=1e-4, atol=1e-5)


def test_rank_and_alpha_patterns_match_peft(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    rank_pattern = {"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 6}
    alpha_pattern = {"down_proj": 3.0}
    targets = ["q_proj", "v_proj", "down_proj"]
    ours = inject_cflora(
        tiny_llama(),
        CFLoRAConfig(
            r=4,
            alpha=8,
            target_modules=targets,
            rank_pattern=rank_pattern,
            alpha_pattern=alpha_pattern,
            init_lora="random",
        ),
    )
    peft_model = get_peft_model(
        tiny_llama(),
        LoraConfig(
            r=4, lora_alpha=8, target_modules=targets, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern
        ),
    )
    peft_layers = {
        n.removeprefix("base_model.model."): m
        for n, m in peft_model.named_modules()
        if n.endswith(tuple(targets))
    }
    ranks = {}
    for name, layer in cflora_layers(ours):
        assert (layer.r, layer.scale) == (
            peft_layers[name].r["default"],
            peft_layers[name].scaling["default"],
        ), name
        assert layer.lora_A.shape == (layer.r, layer.in_features)
        ranks[name] = layer.r
    assert ranks["model.layers.1.self_attn.q_proj"] == 6 and ranks["model.layers.0.self_attn.q_proj"] == 4
    assert ranks["model.layers.0.self_attn.v_proj"] == 2
    # export to PEFT and back, and save/load: the same outputs
    randomise_adapter(ours)
    inputs = model_inputs()
    with torch.no_grad():
        expected = logits_of(ours, inputs)
    export_peft_lora(ours, tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(
            logits_of(PeftModel.from_pretrained(tiny_llama(), tmp_path / "peft").eval(), inputs),
            expected,
            rtol=2e-4,
            atol=2e-4,
        )
    back = inject_cflora(
        tiny_llama(),
        CFLoRAConfig(
            r=4, alpha=8, target_modules=targets, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern
        ),
    )
    load_peft_lora(back, tmp_path / "peft")
    save_cflora(ours, tmp_path / "ours")
    fresh = load_cflora(tiny_llama(), tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(logits_of(back, inputs), expected, rtol=2e-4, atol=2e-4)
        assert torch.equal(logits_of(fresh, inputs), expected)


def test_rank_pattern_errors_name_the_layer():
    with pytest.raises(ValueError, match=r"rank_pattern maps module-name patterns to a positive int"):
        CFLoRAConfig(rank_pattern={"q_proj": 0})
    with pytest.raises(ValueError, match="not a valid regex"):
        CFLoRAConfig(alpha_pattern={"(": 2.0})
    with pytest.raises(ValueError, match=r"layers\.0\.self_attn\.q_proj \(r=3.*n_experts to divide r"):
        inject_cflora(
            tiny_llama(),
            CFLoRAConfig(
                r=4,
                target_modules=["q_proj"],
                interaction="moe",
                cond_dim=COND,
                n_experts=2,
                rank_pattern={"q_proj": 3},
            ),
        )


def _classifier(seed=0):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        num_labels=3,
        pad_token_id=0,
        attn_implementation="eager",
    )
    return LlamaForSequenceClassification(cfg).eval()


def test_modules_to_save_trains_saves_and_disables_the_head(tmp_path):
    config = CFLoRAConfig(
        r=4,
        alpha=8,
        target_modules=["q_proj", "v_proj"],
        interaction="full",
        cond_dim=COND,
        modules_to_save=["score"],
        init_lora="random",
    )
    model = inject_cflora(_classifier(), config)
    assert not isinstance(model.score, CFLoRALinear) and model.score.weight.requires_grad
    # the head keeps its state-dict names (no PEFT-style "modules_to_save.default." prefix)
    assert [k for k in model.state_dict() if "lora_" not in k and ".interaction." not in k] == list(
        _classifier().state_dict()
    )
    inputs, cond = model_inputs(), torch.randn(3, COND)
    base = _base_logits(_classifier, inputs)
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        opt.zero_grad()
        with cflora_condition(model, cond):
            loss = model(**inputs, labels=torch.tensor([0, 1, 2])).loss
        loss.backward()
        assert model.score.weight.grad is not None and model.score.weight.grad.abs().sum() > 0
        opt.step()
    model.eval()
    with torch.no_grad():
        with cflora_condition(model, cond):
            trained = logits_of(model, inputs)
        with disable_adapter(model):  # the original head and no adapter: the base model exactly
            assert torch.equal(logits_of(model, inputs), base)
        assert not torch.equal(model.score.weight, _classifier().score.weight)
    save_cflora(model, tmp_path / "a")
    fresh = load_cflora(_classifier(), tmp_path / "a")
    assert fresh.score.weight.requires_grad
    with torch.no_grad(), cflora_condition(fresh, cond):
        assert torch.equal(logits_of(fresh, inputs), trained)
    with pytest.raises(ValueError, match="modules_to_save=.*matches no module"):
        inject_cflora(_classifier(), CFLoRAConfig(r=4, target_modules=["q_proj"], modules_to_save=["head"]))


class _Blocks(torch.nn.Module):
    """Two MLP blocks run under torch.utils.checkpoint directly (not transformers' checkpointing)."""

    def __init__(self, context_fn=None):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.GELU(), torch.nn.Linear(16, 12))
            for _ in range(2)
        )
        self.checkpointing = False
        self.context_fn = context_fn

    def forward(self, x):
        for block in self.blocks:
            if self.checkpointing:
                kw = {"context_fn": self.context_fn} if self.context_fn is not None else {}
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False, **kw)
            else:
                x = block(x)
        return x.pow(2).mean()


def test_direct_checkpoint_with_two_forwards_raises_or_replays_with_context_fn():
    from rellax_fast.cflora import cflora_checkpoint_context_fn

    model = inject_cflora(
        _Blocks(),
        CFLoRAConfig(
            r=4,
            target_modules=r"blocks\.\d\.[02]",
            interaction="full",
            cond_dim=COND,
            init_lora="random",
            generator_init_std=0.3,
        ),
    )
    xs = [torch.randn(3, 5, 12), torch.randn(3, 5, 12)]
    conds = [torch.randn(3, COND), torch.randn(3, COND)]

    def grads(n_forwards=2):
        model.zero_grad(set_to_none=True)
        total = 0
        for x, cond in list(zip(xs, conds))[:n_forwards]:
            with cflora_condition(model, cond):
                total = total + model(x)
        total.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    ref, ref_one = grads(), grads(1)
    model.checkpointing = True
    for name, g in grads(1).items():  # one forward per backward: the kept cond is the right one
        torch.testing.assert_close(g, ref_one[name], rtol=1e-5, atol=1e-6, msg=name)
    with pytest.raises(RuntimeError, match="several cflora_condition blocks still wait for their backward"):
        grads()
    model.context_fn = cflora_checkpoint_context_fn(model)
    for name, g in grads().items():
        torch.testing.assert_close(g, ref[name], rtol=1e-5, atol=1e-6, msg=name)
