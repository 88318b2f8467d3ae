"""CTR (DIN) tests: tiny tensors, so one intra-op thread (faster than two on a shared 2-core machine)."""

from rellax_testing import single_thread  # noqa: F401  (autouse fixture)
