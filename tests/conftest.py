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


def pytest_collection_modifyitems(config, items):
    # Triton tests use CPU tensors under the interpreter, which must be switched on before any @triton.jit
    # runs: `make test` (and `make test-triton`) run them in their own pass with TRITON_INTERPRET=1.
    import os

    if os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="triton tests run in their own pass: TRITON_INTERPRET=1 pytest -m triton")
    for item in items:
        if "triton" in item.keywords:
            item.add_marker(skip)
