import torch

from rellax_fast.ops import seeded_dropout, seeded_dropout_ref


def test_placeholder_dropout_matches_reference():
    x = torch.randn(3, 5, dtype=torch.float64)
    torch.testing.assert_close(seeded_dropout(x, 0.25, 7), seeded_dropout_ref(x, 0.25, 7))
