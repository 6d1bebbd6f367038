"""Massive-activation positions are dropped by a norm rule shared by harvest and eval."""

import torch

from saelab.data.windows import drop_norm_outliers


def test_drops_only_positions_far_above_the_median():
    acts = torch.randn(2, 6, 8)
    acts[0, 2] *= 50  # a massive activation
    acts[1, 4] *= 3  # large but ordinary
    keep = torch.ones(2, 6, dtype=torch.bool)
    keep[1, 0] = False
    out = drop_norm_outliers(acts, keep, factor=10.0)
    expected = keep.clone()
    expected[0, 2] = False
    assert torch.equal(out, expected)


def test_factor_zero_disables_and_masked_rows_do_not_set_the_median():
    acts = torch.ones(1, 4, 3)
    acts[0, 0] = 1e6  # excluded already (e.g. the BOS sink): must not inflate the median
    acts[0, 3] = 100.0
    keep = torch.tensor([[False, True, True, True]])
    assert torch.equal(drop_norm_outliers(acts, keep, 0.0), keep)
    assert drop_norm_outliers(acts, keep, 10.0).tolist() == [[False, True, True, False]]
