"""CFLoRA test fixtures. The model builders live in cflora_models.py (a uniquely named module: pytest
imports every conftest.py as `conftest`, so helpers imported `from conftest` would collide)."""

from cflora_models import tiny_model_name  # noqa: F401  (parametrised fixture over the tiny models)
from rellax_testing import single_thread  # noqa: F401  (autouse: one intra-op thread)
