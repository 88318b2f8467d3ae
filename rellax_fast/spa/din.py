"""Moved to :mod:`rellax_fast.ctr.din` (issue #16: the CTR model has its own package). This module re-exports
its names so that older imports keep working; code inside ``rellax_fast`` imports ``rellax_fast.ctr.din``."""

from rellax_fast.ctr.din import (  # noqa: F401
    DIN,
    N_RATING_BUCKETS,
    ActivationUnit,
    CTRArrays,
    DINConfig,
    DINReport,
    DINTrainConfig,
    PackedCTRArrays,
    freeze,
    history_arrays,
    load_din,
    make_arrays,
    predict,
    save_din,
    train_din,
)
