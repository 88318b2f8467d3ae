"""CFLoRA test fixtures. The model builders live in cflora_models.py (a uniquely named module: pytest
imports every conftest.py as `conftest`, so helpers imported `from conftest` would collide)."""

import pytest
import torch
from rellax_testing import *  # noqa: F401,F403  (so `from conftest import ...` sees the shared helpers)


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny models gain nothing from intra-op threads, and on a shared, oversubscribed 2-core box OpenMP
    # barriers make each tiny op take ~30 ms instead of ~0.02 ms; restore the setting afterwards
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
