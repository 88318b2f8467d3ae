"""SPA tests: tiny tensors, so one intra-op thread (faster than two on a shared 2-core machine)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
