"""Pooling modes and pooling config parsing."""

from __future__ import annotations

import pytest
import torch

from matryoshka2d.errors import ModelLoadError
from matryoshka2d.pooling import POOLING_MODES, pool, pooling_config, pooling_mode_from_config

TOKENS = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]], [[5.0, 6.0], [7.0, 8.0], [9.0, 10.0]]])
MASK = torch.tensor([[1, 1, 0], [1, 1, 1]])


def test_padding_is_ignored():
    assert torch.allclose(pool(TOKENS, MASK, "mean")[0], torch.tensor([2.0, 3.0]))
    assert torch.allclose(pool(TOKENS, MASK, "max")[0], torch.tensor([3.0, 4.0]))
    assert torch.allclose(pool(TOKENS, MASK, "lasttoken"), torch.tensor([[3.0, 4.0], [9.0, 10.0]]))
    assert torch.allclose(pool(TOKENS, MASK, "cls"), TOKENS[:, 0])
    weighted = (1 * TOKENS[0, 0] + 2 * TOKENS[0, 1]) / 3
    assert torch.allclose(pool(TOKENS, MASK, "weightedmean")[0], weighted)


@pytest.mark.parametrize("mode", POOLING_MODES)
def test_config_round_trip(mode):
    assert pooling_mode_from_config(pooling_config(mode, 8), "x") == mode


def test_bad_configs():
    with pytest.raises(ModelLoadError, match="exactly one pooling mode"):
        pooling_mode_from_config({"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": True}, "x")
    with pytest.raises(ModelLoadError, match="unsupported pooling mode"):
        pooling_mode_from_config({"pooling_mode": "attention"}, "x")
