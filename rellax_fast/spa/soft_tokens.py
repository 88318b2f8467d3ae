"""Soft-token insertion: put SPA vectors into ``inputs_embeds`` exactly at the placeholder positions."""

from __future__ import annotations

import torch


def insert_soft_tokens(
    inputs_embeds: torch.Tensor, placeholder_mask: torch.Tensor, placeholder_item_ids: torch.Tensor, projector
) -> torch.Tensor:
    """Return a copy of ``inputs_embeds`` (B, T, d) whose placeholder positions hold ``projector(item)``.

    ``placeholder_mask`` (B, T) bool marks the placeholder tokens; ``placeholder_item_ids`` (B, P) holds, per
    row, the item index behind each placeholder in text order, padded with -1. Row b must have exactly as
    many placeholders as non-negative ids, otherwise this raises (a silent misalignment would feed the LM
    the wrong items). Every other position is returned unchanged (bit for bit).
    """
    if inputs_embeds.ndim != 3:
        raise ValueError(f"inputs_embeds must be (B, T, d), got shape {tuple(inputs_embeds.shape)}")
    if placeholder_mask.shape != inputs_embeds.shape[:2]:
        raise ValueError(
            f"placeholder_mask must be {tuple(inputs_embeds.shape[:2])}, got {tuple(placeholder_mask.shape)}"
        )
    if placeholder_item_ids.ndim != 2 or placeholder_item_ids.shape[0] != inputs_embeds.shape[0]:
        raise ValueError(
            f"placeholder_item_ids must be (B={inputs_embeds.shape[0]}, P), got {tuple(placeholder_item_ids.shape)}"
        )
    mask = placeholder_mask.to(torch.bool)
    ids_valid = placeholder_item_ids >= 0
    per_row_slots, per_row_ids = mask.sum(1), ids_valid.sum(1)
    if not torch.equal(per_row_slots, per_row_ids):
        bad = int(torch.nonzero(per_row_slots != per_row_ids)[0, 0])
        raise ValueError(
            f"row {bad} has {int(per_row_slots[bad])} placeholder tokens but {int(per_row_ids[bad])} placeholder item ids"
        )
    if not bool(mask.any()):
        return inputs_embeds
    # ids are left-packed per row in text order; the mask's True positions are in text order too.
    ids = placeholder_item_ids[ids_valid]  # row-major: row 0's ids, then row 1's, ...
    soft = projector(ids).to(inputs_embeds.dtype)
    out = inputs_embeds.clone()
    out[mask] = soft
    return out
