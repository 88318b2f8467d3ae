"""pytest-benchmark suite for the kernels and one training step (issue: microbenchmarks in the
ecosystem's harness).

Collected only when asked -- ``pytest benchmarks --benchmark-only`` -- never by ``make test`` (pytest's
``testpaths`` is ``tests``). The shapes come from the size tables of ``rellax-fast bench``
(:data:`rellax_fast.bench.cflora.SIZES`, :data:`rellax_fast.bench.topk.SIZES`,
:data:`rellax_fast.bench.e2e.SIZES`), so the two harnesses measure the same things:

- ``--bench-size tiny|cpu|gpu`` (default: ``gpu`` on a CUDA device, else ``cpu``);
- ``--bench-device cpu|cuda`` (default: ``cuda`` when available);
- ``--bench-rounds N`` timed rounds per benchmark (default 3 / 10 / 30 for tiny / cpu / gpu);
- ``--bench-threads N`` sets ``torch.set_num_threads`` for the session (default: torch's own). On a shared
  or busy CPU, ``--bench-threads 1`` keeps one preempted worker thread from stalling every op, which is
  what makes medians of small CPU shapes jump by orders of magnitude between runs.

``rellax-fast bench`` stays the tool for same-run ratio tables (its interleaved medians); this suite is for
saved baselines and regression comparison (``make bench-save`` / ``make bench-compare``, README).
"""

from __future__ import annotations

import pytest
import torch
from _bench_util import ROUNDS, cflora_cases, topk_cases, train_providers


def pytest_addoption(parser):
    group = parser.getgroup("rellax-fast benchmarks")
    group.addoption(
        "--bench-size",
        choices=("tiny", "cpu", "gpu"),
        default=None,
        help="shape table of `rellax-fast bench` (default: gpu on a CUDA device, else cpu)",
    )
    group.addoption("--bench-device", default=None, help="cpu or cuda (default: cuda when available)")
    group.addoption(
        "--bench-rounds",
        type=int,
        default=None,
        help="timed rounds per benchmark (default 3 / 10 / 30 for tiny / cpu / gpu)",
    )
    group.addoption(
        "--bench-threads",
        type=int,
        default=None,
        help="torch.set_num_threads for the session (default: torch's own; 1 on a busy CPU)",
    )


def pytest_configure(config):
    threads = config.getoption("--bench-threads", default=None)
    if threads is not None:
        if threads < 1:
            raise pytest.UsageError(f"--bench-threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)


def _device(config) -> torch.device:
    name = config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError(
            f"--bench-device {name}: no CUDA device is visible (torch {torch.__version__})"
        )
    return device


def _size(config) -> str:
    return config.getoption("--bench-size") or ("gpu" if _device(config).type == "cuda" else "cpu")


def pytest_generate_tests(metafunc):
    config = metafunc.config
    device, size = _device(config), _size(config)
    if "cflora_case" in metafunc.fixturenames:
        cases = cflora_cases(size, device)
        metafunc.parametrize("cflora_case", cases, ids=[c.id for c in cases])
    if "topk_case" in metafunc.fixturenames:
        cases = topk_cases(size, device)
        metafunc.parametrize("topk_case", cases, ids=[c.id for c in cases])
    if "train_provider" in metafunc.fixturenames:
        providers = train_providers(device)
        metafunc.parametrize("train_provider", providers, ids=[p[0] for p in providers])


@pytest.fixture(scope="session")
def bench_device(pytestconfig) -> torch.device:
    return _device(pytestconfig)


@pytest.fixture(scope="session")
def bench_size(pytestconfig) -> str:
    return _size(pytestconfig)


@pytest.fixture(scope="session")
def bench_rounds(pytestconfig, bench_size) -> int:
    return pytestconfig.getoption("--bench-rounds") or ROUNDS[bench_size]
