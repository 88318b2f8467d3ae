"""The interaction-kind registry (cflora.interaction.INTERACTIONS): the built-in kinds, register_interaction's
checks, and a toy kind registered in a test that CFLoRAConfig, inject_cflora, cflora_condition, merge and
save/load accept without any other file knowing about it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rellax_fast.cflora.interaction as interaction_module
from rellax_fast.cflora import (
    INTERACTION_KINDS,
    INTERACTIONS,
    CFLoRAConfig,
    InteractionGenerator,
    cflora_condition,
    cflora_layers,
    inject_cflora,
    load_cflora,
    merge_cflora,
    register_interaction,
    save_cflora,
)
from rellax_fast.cflora.interaction import build_interaction
from rellax_fast.ops._backend import BACKENDS

COND = 5


class ToyDiagInteraction(InteractionGenerator):
    """C_b = diag(1 + tanh(Linear(cond_b))): a per-sample diagonal kind that exists only in this test."""

    kind = "toydiag"
    needs_cond = True
    mergeable = False

    def __init__(self, r: int, cond_dim: int, device=None, dtype=None):
        super().__init__(r)
        self.cond_dim = cond_dim
        self.proj = nn.Linear(cond_dim, r, device=device, dtype=dtype)

    @classmethod
    def from_config(cls, config, device=None, dtype=None):
        return cls(config.r, config.cond_dim, device=device, dtype=dtype)

    def forward(self, cond=None):
        u = self._check_cond(cond, self.cond_dim)
        return torch.diag_embed(1.0 + torch.tanh(self.proj(u)))


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(9, 7)
        self.v = nn.Linear(7, 6)

    def forward(self, x):
        return self.v(torch.relu(self.q(x)))


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the registry for the test (register_interaction writes into it; undone afterwards)."""
    copy = dict(INTERACTIONS)
    monkeypatch.setattr(interaction_module, "INTERACTIONS", copy)
    return copy


def test_builtin_kinds_and_their_flags():
    assert INTERACTION_KINDS == ("identity", "static", "full", "moe", "recrank1")
    assert tuple(INTERACTIONS)[: len(INTERACTION_KINDS)] == INTERACTION_KINDS
    flags = {k: (INTERACTIONS[k].needs_cond, INTERACTIONS[k].mergeable) for k in INTERACTION_KINDS}
    assert flags == {
        "identity": (False, True),
        "static": (False, True),
        "full": (True, False),
        "moe": (True, False),
        "recrank1": (True, False),
    }
    for kind, cls in INTERACTIONS.items():
        assert cls.kind == kind and issubclass(cls, InteractionGenerator)
        cfg = CFLoRAConfig(r=4, interaction=kind, cond_dim=3, n_experts=2)
        assert cfg.needs_cond is cls.needs_cond and cfg.mergeable is cls.mergeable
        gen = build_interaction(cfg)
        assert (gen is None) == (kind == "identity")
        if gen is not None:
            assert type(gen) is cls
    # the demo's interaction rows, in registration order
    assert [k for k, c in INTERACTIONS.items() if c.ablation_name] == ["identity", "moe", "recrank1"]


def test_register_interaction_rejects_bad_classes(registry):
    with pytest.raises(TypeError, match="InteractionGenerator subclass"):
        register_interaction(Tiny)
    nameless = type("Nameless", (InteractionGenerator,), {})
    with pytest.raises(ValueError, match="kind must be a non-empty string"):
        register_interaction(nameless)
    impostor = type("Impostor", (InteractionGenerator,), {"kind": "full"})
    with pytest.raises(ValueError, match="'full' is already registered to FullInteraction"):
        register_interaction(impostor)
    assert register_interaction(INTERACTIONS["moe"]) is INTERACTIONS["moe"]  # re-registering itself: no-op
    assert registry["full"].__name__ == "FullInteraction"


def test_unknown_kind_names_the_registered_ones():
    with pytest.raises(
        ValueError, match="interaction must be one of identity, static, full, moe, recrank1; got 'toydiag'"
    ):
        CFLoRAConfig(interaction="toydiag")


def test_backend_choices_come_from_ops_backends():
    for backend in (None, "auto", *BACKENDS):
        assert CFLoRAConfig(backend=backend).backend == backend
    with pytest.raises(ValueError, match="backend must be None or one of auto, " + ", ".join(BACKENDS)):
        CFLoRAConfig(backend="fortran")


def _reference_forward(model, x, cond, scale):
    """float64 y of the injected Tiny, written out from each layer's parameters (ΔW = s·B C_b A)."""
    layers = dict(cflora_layers(model))
    h = x
    for name, act in (("q", torch.relu), ("v", lambda t: t)):
        layer = layers[name]
        c = layer.interaction(cond)  # (B, r, r)
        lora = torch.einsum("btr,bsr->bts", h @ layer.lora_A.t(), c) @ layer.lora_B.t()
        h = act(h @ layer.weight.t() + layer.bias + scale * lora)
    return h


def test_toy_kind_works_end_to_end(registry, tmp_path):
    register_interaction(ToyDiagInteraction)
    with pytest.raises(ValueError, match="cond_dim must be a positive int for interaction='toydiag'"):
        CFLoRAConfig(r=3, interaction="toydiag", target_modules=["q", "v"])
    cfg = CFLoRAConfig(
        r=3,
        alpha=4.5,
        interaction="toydiag",
        cond_dim=COND,
        target_modules=["q", "v"],
        init_lora="random",
        backend="reference",
    )
    assert cfg.needs_cond and not cfg.mergeable

    torch.manual_seed(0)
    model = inject_cflora(Tiny().double(), cfg)
    gens = [layer.interaction for _, layer in cflora_layers(model)]
    assert len(gens) == 2 and all(isinstance(g, ToyDiagInteraction) for g in gens)
    with torch.no_grad():
        for g in gens:
            g.proj.weight.normal_(0, 0.7)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 5, 9, generator=g, dtype=torch.float64)
    cond = torch.randn(4, COND, generator=g, dtype=torch.float64)

    with pytest.raises(RuntimeError, match=r"interaction 'toydiag'\) needs per-sample conditioning"):
        model(x)
    with cflora_condition(model, cond):
        y = model(x)
    want = _reference_forward(model, x, cond, cfg.scale)
    torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-10)
    # gradients reach the toy generator and match the written-out reference
    params = [p for p in model.parameters() if p.requires_grad]
    got = torch.autograd.grad((y * want.detach().cos()).sum(), params)
    ref = torch.autograd.grad(
        (_reference_forward(model, x, cond, cfg.scale) * want.detach().cos()).sum(), params
    )
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    assert all(gr.abs().sum() > 0 for gr in got)
    # per-sample C: a sample's output moves with its own cond only
    cond2 = cond.clone()
    cond2[1] += 1.0
    with cflora_condition(model, cond2):
        y2 = model(x)
    assert not torch.allclose(y2[1], y[1])
    torch.testing.assert_close(y2[[0, 2, 3]], y[[0, 2, 3]], rtol=0, atol=1e-12)

    with pytest.raises(RuntimeError, match="interaction 'toydiag'"):
        merge_cflora(model)

    save_cflora(model, tmp_path / "adapter")
    torch.manual_seed(0)
    fresh = inject_cflora(Tiny().double(), cfg)
    load_cflora(fresh, tmp_path / "adapter")
    with cflora_condition(fresh, cond):
        torch.testing.assert_close(fresh(x), y, rtol=0, atol=1e-12)
