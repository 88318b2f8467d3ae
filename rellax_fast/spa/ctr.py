"""Moved to :mod:`rellax_fast.ctr.store` (issue #16: the CTR model has its own package). This module re-exports
its names so that older imports keep working; code inside ``rellax_fast`` imports ``rellax_fast.ctr.store``."""

from rellax_fast.ctr.store import (  # noqa: F401
    din_fingerprint,
    din_outputs,
    din_reuse_key,
    fit_din,
    item_vocab,
    load_ctr,
    save_ctr,
    split_arrays,
    to_index,
    train_or_load_ctr,
    vocab_sha256,
    weights_sha256,
)
