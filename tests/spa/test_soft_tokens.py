"""SPA: the projector and the insertion of soft tokens into inputs_embeds."""

import pytest
import torch

from rellax_fast.spa.projector import SPAProjector
from rellax_fast.spa.soft_tokens import insert_soft_tokens


def _setup(B=3, T=11, d=16, e=5, n_items=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(n_items, e, generator=g)
    proj = SPAProjector(table, d)
    embeds = torch.randn(B, T, d, generator=g)
    mask = torch.zeros(B, T, dtype=torch.bool)
    ids = torch.full((B, 4), -1, dtype=torch.long)
    # row 0: 3 placeholders, row 1: none, row 2: 4 placeholders (one at the last position)
    mask[0, [1, 4, 7]] = True
    ids[0, :3] = torch.tensor([2, 0, 8])
    mask[2, [0, 3, 5, T - 1]] = True
    ids[2, :4] = torch.tensor([1, 1, 7, 3])
    return proj, embeds, mask, ids


def test_soft_tokens_replace_exactly_the_placeholder_positions():
    proj, embeds, mask, ids = _setup()
    before = embeds.clone()
    out = insert_soft_tokens(embeds, mask, ids, proj)
    assert torch.equal(embeds, before), "the input must not be modified in place"
    # every other position is bit-identical
    assert torch.equal(out[~mask], before[~mask])
    # each placeholder position holds the projection of its item, in text order
    for b in range(3):
        positions = torch.nonzero(mask[b]).flatten().tolist()
        items = ids[b][ids[b] >= 0].tolist()
        assert len(positions) == len(items)
        for p, item in zip(positions, items):
            expected = proj.net(proj.item_table[item])
            torch.testing.assert_close(out[b, p], expected, rtol=1e-6, atol=1e-6)
            assert not torch.allclose(out[b, p], before[b, p])


def test_projector_is_linear_gelu_linear_and_gets_gradients_only_through_placeholders():
    proj, embeds, mask, ids = _setup()
    assert isinstance(proj.net[0], torch.nn.Linear) and isinstance(proj.net[1], torch.nn.GELU)
    assert proj.net[0].in_features == 5 and proj.net[2].out_features == 16
    x = embeds.clone().requires_grad_(True)
    out = insert_soft_tokens(x, mask, ids, proj)
    out.sum().backward()
    assert proj.net[2].weight.grad is not None and proj.net[2].weight.grad.abs().sum() > 0
    # gradient w.r.t. the original embeddings is 1 off the placeholders and 0 on them
    assert torch.equal(x.grad[~mask], torch.ones_like(x.grad[~mask]))
    assert torch.equal(x.grad[mask], torch.zeros_like(x.grad[mask]))


def test_mismatched_placeholder_count_raises():
    proj, embeds, mask, ids = _setup()
    ids[0, 2] = -1  # row 0 now has 3 placeholder tokens but 2 ids
    with pytest.raises(ValueError, match="row 0 has 3 placeholder tokens but 2"):
        insert_soft_tokens(embeds, mask, ids, proj)


def test_bad_shapes_and_ids_raise():
    proj, embeds, mask, ids = _setup()
    with pytest.raises(ValueError, match="inputs_embeds must be"):
        insert_soft_tokens(embeds[0], mask, ids, proj)
    with pytest.raises(ValueError, match="placeholder_mask must be"):
        insert_soft_tokens(embeds, mask[:, :-1], ids, proj)
    with pytest.raises(ValueError, match="item indices in"):
        proj(torch.tensor([0, 9]))
    with pytest.raises(ValueError, match="item_table must be"):
        SPAProjector(torch.zeros(3), 4)


def test_no_placeholders_returns_input_unchanged():
    proj, embeds, _, _ = _setup()
    out = insert_soft_tokens(embeds, torch.zeros(3, 11, dtype=torch.bool), torch.full((3, 0), -1), proj)
    assert torch.equal(out, embeds)
