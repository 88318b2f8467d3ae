"""Datasets, splits, prompt templates, tokenisation and collation.

- :mod:`.domains`: the records: :class:`RecDataset` (ratings, items, users) and one :class:`Domain` per
  domain (label rule, prompt nouns, item-text template, user features), in ``DOMAINS``.
- :mod:`.datasets`: ``load_dataset(name)`` -> :class:`RecDataset` (ratings, items, users) from each dataset's
  published format, read by :mod:`.movielens` and :mod:`.bookcrossing` through :mod:`.parsing` (the checked
  parsing and corruption reports); :mod:`.download`: official sources, checksums, atomic download;
  :mod:`.synthetic`: the embedded generated dataset.
- :mod:`.ctr`: the paper's labels and splits as columnar :class:`UserSequences` + :class:`CTRSplit`
  (``prepare_ctr``); :mod:`.prepared`: the prepared folder on disk (``save_prepared``, ``load_prepared``).
- :mod:`.prompts`: per-domain prompt templates with SPA placeholders, and the ReiT mixed training set.
- :mod:`.collate`: tokenisation and dynamic-padding collation for causal and encoder backbones.

Names are resolved lazily so that importing this package (e.g. from the CLI) stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "RecDataset": ".domains",
    "Domain": ".domains",
    "DOMAINS": ".domains",
    "get_domain": ".domains",
    "register_domain": ".domains",
    "DataFormatError": ".datasets",
    "load_dataset": ".datasets",
    "default_data_dir": ".datasets",
    "DATASETS": ".datasets",
    "DatasetNotFoundError": ".download",
    "ChecksumError": ".download",
    "make_synthetic": ".synthetic",
    "UserSequences": ".ctr",
    "CTRSplit": ".ctr",
    "CTRData": ".ctr",
    "prepare_ctr": ".ctr",
    "save_prepared": ".prepared",
    "load_prepared": ".prepared",
    "build_sequences": ".ctr",
    "label_of": ".ctr",
    "Prompt": ".prompts",
    "render_prompt": ".prompts",
    "apply_chat": ".prompts",
    "mix_recent_and_retrieved": ".prompts",
    "PromptCollator": ".collate",
    "PromptSample": ".collate",
    "yes_no_token_ids": ".collate",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'rellax_fast.data' has no attribute {name!r}")


def __dir__():
    return __all__
