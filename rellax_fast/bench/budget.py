"""Token budgets from the prompts themselves (bench lifelong, bench quality's ``--auto-max-length``).

A budget is the ``quantile`` of the training prompts' full token counts plus a margin, rounded up to a
multiple of 8 and capped at the backbone's position limit; :class:`PromptSet` counts exactly which prompts a
budget cuts and how many history items they lose (a prompt over budget loses its oldest items, never part
of one: ``PromptCollator.render_fitting``).
"""

from __future__ import annotations

import math
import re
from typing import Dict, Optional

import numpy as np

# the rule's defaults (bench lifelong's --budget-quantile / --budget-margin; bench quality reads the same options)
BUDGET_QUANTILE = 0.99
BUDGET_MARGIN = 16


def position_limit(model_path: str) -> Optional[int]:
    """The backbone's longest input in tokens (``max_position_embeddings`` / ``n_positions``), None: unknown."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def token_budget(lengths: np.ndarray, quantile: float, margin: int, cap: Optional[int]) -> int:
    """max_length for one K: the ``quantile`` of the prompts' full token counts + ``margin``, rounded up to a
    multiple of 8, at most ``cap``."""
    q = float(np.quantile(np.asarray(lengths, np.float64), quantile))
    budget = int(math.ceil((q + margin) / 8.0) * 8)
    return min(budget, cap) if cap else budget


_ITEM_LINE = re.compile(r"^\d+\. ", re.M)


def _items_in(text: str) -> int:
    """History items in a rendered prompt (its numbered lines "n. title (r stars)")."""
    return len(_ITEM_LINE.findall(text))


class PromptSet:
    """The prompts of one (method, K) on one split: their samples, full token counts and the truncation a
    budget causes (counted exactly: a prompt is cut iff its full encoding is longer than the budget)."""

    def __init__(self, samples, tokenizer, kind: str, placeholder: Optional[str], chat: bool):
        from ..data.collate import PromptCollator

        self.samples = samples
        self.make = lambda n: PromptCollator(
            tokenizer, kind=kind, max_length=n, placeholder=placeholder, chat=chat
        )
        full = self.make(10**9)
        self.lengths = np.array([len(full.encode(s)["input_ids"]) for s in samples], dtype=np.int64)

    def truncation(self, budget: int) -> Dict:
        cut = np.flatnonzero(self.lengths > budget)
        collator, dropped, kept_tokens = self.make(budget), 0, self.lengths.copy()
        for i in cut:
            s = self.samples[int(i)]
            prompt, ids = collator.render_fitting(s)
            dropped += len(s.shown) - _items_in(prompt.text)
            kept_tokens[i] = len(collator.encode(s)["input_ids"])
        return {"n_truncated": int(cut.size), "items_dropped": int(dropped), "tokens": kept_tokens}


def prompt_tokenizer(cfg):
    """(tokenizer, kind, model path) of ``cfg``'s backbone, for measuring full prompts (no length warning)."""
    from transformers import AutoTokenizer

    from ..train.model import backbone_kind
    from ..train.pipeline import backbone_folder

    path = backbone_folder(cfg.model)
    tok = AutoTokenizer.from_pretrained(path)
    if cfg.kind == "auto":
        from transformers import AutoConfig

        kind = backbone_kind(AutoConfig.from_pretrained(path))
    else:
        kind = cfg.kind
    if kind == "causal" and tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    # this tokenizer only measures full prompts (longer than the model's limit at large K, on purpose): no warning
    tok.model_max_length = int(1e30)
    return tok, kind, path
