"""Shared fixtures. Helpers live in rellax_testing.py; they are re-exported here so that the older
`from conftest import ...` keeps working."""

from pathlib import Path

import pytest
import torch
from rellax_testing import REPO, TOLERANCES, assert_close, ml100k_dir, tol  # noqa: F401


@pytest.fixture
def ml100k() -> Path:
    return ml100k_dir()


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield
