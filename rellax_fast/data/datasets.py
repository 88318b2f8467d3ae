"""Dataset loading: ``load_dataset(name)`` -> :class:`RecDataset`, the registry of supported names
(:data:`DATASETS`) and where their raw files live (:func:`default_data_dir`).

Each dataset is read from its own published file format by a reader module:

- :mod:`.movielens`: ml-100k, ml-1m, and the CSV releases ml-20m, ml-25m, ml-latest-small;
- :mod:`.bookcrossing`: bookcrossing;
- :mod:`.synthetic`: synthetic (generated in memory).

Both file readers parse through :mod:`.parsing`, which owns the corruption checks (a bad file raises
:class:`DataFormatError` naming the file and line; something fixed or suspicious is a :class:`DataWarning`)
and the dropping of repeated ratings. Missing raw files are fetched by :mod:`.download`. The
:class:`RecDataset` record (and each domain's :class:`~rellax_fast.data.domains.Domain`) lives in
:mod:`rellax_fast.data.domains`, which the readers and the synthetic generator both import.

The readers' names (``load_ml100k``, ``load_ml1m``, ``load_movielens_csv``, ``load_bookcrossing``,
``ML100K_GENRES``, ``ML1M_OCCUPATIONS``) are re-exported here.
"""

from __future__ import annotations

import os
from pathlib import Path

from .bookcrossing import load_bookcrossing
from .domains import RecDataset
from .movielens import ML1M_OCCUPATIONS, ML100K_GENRES, load_ml1m, load_ml100k, load_movielens_csv
from .names import DATASETS
from .parsing import DataFormatError, DataWarning

__all__ = [
    "RecDataset",
    "DataFormatError",
    "DataWarning",
    "load_dataset",
    "DATASETS",
    "default_data_dir",
    "ML100K_GENRES",
    "ML1M_OCCUPATIONS",
    "load_ml100k",
    "load_ml1m",
    "load_movielens_csv",
    "load_bookcrossing",
]


def default_data_dir(name: str) -> Path:
    """``$RELLAX_DATA_DIR/<name>`` if the variable is set, else ``./data/<name>``."""
    root = os.environ.get("RELLAX_DATA_DIR")
    return Path(root) / name if root else Path("data") / name


def load_dataset(name: str, data_dir=None, download: bool = True, **kwargs) -> RecDataset:
    """Load dataset ``name`` (one of DATASETS) from ``data_dir`` (default :func:`default_data_dir`).

    Missing raw files are downloaded from the official source and checksum-verified when ``download``;
    otherwise (or offline) a :class:`~rellax_fast.data.download.DatasetNotFoundError` says where to put
    which files. ``synthetic`` is generated in memory (``kwargs`` go to its generator, e.g. ``seed``).
    """
    if name not in DATASETS:
        raise ValueError(f"name: unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    if name == "synthetic":
        from .synthetic import make_synthetic

        return make_synthetic(**kwargs)
    from .download import ensure_files

    data_dir = Path(data_dir) if data_dir is not None else default_data_dir(name)
    # Accept a parent folder that holds <name>/ (like RELLAX_DATA_DIR) as well as the folder itself.
    if (data_dir / name).is_dir() and not (data_dir / "u.data").exists():
        data_dir = data_dir / name
    ensure_files(name, data_dir, download=download)
    if name == "ml-100k":
        return load_ml100k(data_dir)
    if name == "ml-1m":
        return load_ml1m(data_dir)
    if name == "bookcrossing":
        return load_bookcrossing(data_dir)
    return load_movielens_csv(data_dir, name)
