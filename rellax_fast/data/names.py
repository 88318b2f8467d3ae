"""The names of the supported datasets: a leaf (standard library only), so that the command line can offer
them as choices without importing a reader. :func:`rellax_fast.data.datasets.load_dataset` maps each name
to its reader; ``tests/test_layers.py`` checks that this tuple has no second home."""

from __future__ import annotations

DATASETS = ("ml-100k", "ml-1m", "ml-20m", "ml-25m", "ml-latest-small", "bookcrossing", "synthetic")
