"""SPA's projector: the frozen CTR model's item embeddings -> soft tokens in the LM's embedding space."""

from __future__ import annotations

import torch
from torch import nn


class SPAProjector(nn.Module):
    """Linear(e -> d), GELU, Linear(d -> d), as in ReLLaX's soft prompt augmentation.

    ``forward(item_ids)`` looks ids up in the frozen item table (a buffer, index = item index) and projects
    them; ``project(vectors)`` projects given CTR vectors.
    """

    def __init__(self, item_table: torch.Tensor, lm_dim: int):
        super().__init__()
        if item_table.ndim != 2:
            raise ValueError(f"item_table must be (n_items, e), got shape {tuple(item_table.shape)}")
        self.register_buffer("item_table", item_table.detach().clone().float(), persistent=True)
        e = item_table.shape[1]
        self.net = nn.Sequential(nn.Linear(e, lm_dim), nn.GELU(), nn.Linear(lm_dim, lm_dim))

    @property
    def n_items(self) -> int:
        return int(self.item_table.shape[0])

    def project(self, vectors: torch.Tensor) -> torch.Tensor:
        w = self.net[0].weight
        return self.net(vectors.to(device=w.device, dtype=w.dtype))

    def forward(self, item_ids: torch.Tensor) -> torch.Tensor:
        if item_ids.numel() and (int(item_ids.min()) < 0 or int(item_ids.max()) >= self.n_items):
            raise ValueError(
                f"item_ids must be item indices in [0, {self.n_items}), got range [{int(item_ids.min())}, {int(item_ids.max())}]"
            )
        return self.project(self.item_table[item_ids])
