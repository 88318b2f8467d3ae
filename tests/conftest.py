"""Shared fixtures. Helpers live in rellax_testing.py; they are re-exported here so that the older
`from conftest import ...` keeps working."""

from pathlib import Path

import pytest
import torch
from rellax_testing import REPO, TOLERANCES, assert_close, ml100k_dir, tol  # noqa: F401


@pytest.fixture
def ml100k() -> Path:
    return ml100k_dir()


@pytest.fixture
def one_rank_gloo(monkeypatch):
    """A one-rank gloo process group in this process, destroyed afterwards (unless the test did it).

    Built so that it cannot hang: an in-memory HashStore instead of a FileStore (whose world-of-one teardown
    can spin on its file, pytorch#31467), the loopback device (no lookup of the host's name) and a 60 s
    collective timeout. A CI run once hung for over an hour in a file-store DDP test."""
    import datetime
    import sys

    import torch.distributed as dist

    if sys.platform.startswith("linux"):
        monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    assert not dist.is_initialized(), "a process group leaked from an earlier test"
    timeout = datetime.timedelta(seconds=60)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    try:
        yield dist
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


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
