"""Pooling modes and pooling config parsing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from matryoshka2d.errors import ModelLoadError
from matryoshka2d.pooling import POOLING_MODES, pool, pool_numpy, pooling_config, pooling_mode_from_config

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
def test_left_padding_pools_the_same_as_right_padding(mode):
    """A tokenizer that pads on the left (Llama-style) gets the same embedding as without padding: cls is
    the first real token and weightedmean counts positions from it, as in sentence-transformers 6."""
    row = TOKENS[1:, :2]  # two real tokens
    left = torch.cat([torch.full((1, 1, 2), 100.0), row], dim=1)
    alone = pool(row, torch.tensor([[1, 1]]), mode)
    assert torch.allclose(pool(left, torch.tensor([[0, 1, 1]]), mode), alone)
    assert np.allclose(pool_numpy(left.numpy(), np.array([[0, 1, 1]]), mode), alone.numpy())


@pytest.mark.parametrize("mode", POOLING_MODES)
@pytest.mark.parametrize("left_padding", [False, True])
def test_numpy_pooling_equals_torch_pooling(mode, left_padding):
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(4, 7, 5)).astype(np.float32)
    lengths = [7, 5, 1, 3]
    mask = np.zeros((4, 7), dtype=np.int64)
    for row, n in enumerate(lengths):
        if left_padding:
            mask[row, 7 - n :] = 1
        else:
            mask[row, :n] = 1
    ours = pool_numpy(hidden, mask, mode)
    theirs = pool(torch.from_numpy(hidden), torch.from_numpy(mask), mode).numpy()
    assert ours.dtype == np.float32 and ours.shape == (4, 5)
    assert np.abs(ours - theirs).max() <= 1e-6
    with pytest.raises(ValueError, match="unknown pooling mode"):
        pool_numpy(hidden, mask, "median")


@pytest.mark.parametrize("mode", POOLING_MODES)
def test_config_round_trip(mode):
    assert pooling_mode_from_config(pooling_config(mode, 8), "x") == mode


def test_bad_configs():
    with pytest.raises(ModelLoadError, match="exactly one pooling mode"):
        pooling_mode_from_config({"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": True}, "x")
    with pytest.raises(ModelLoadError, match="unsupported pooling mode"):
        pooling_mode_from_config({"pooling_mode": "attention"}, "x")
    with pytest.raises(ModelLoadError, match="expected a JSON object, got list"):
        pooling_mode_from_config(["mean"], "x")


def test_config_without_a_mode_means_mean():
    """sentence-transformers reads a pooling config that names no mode as mean pooling."""
    assert pooling_mode_from_config({"word_embedding_dimension": 384}, "x") == "mean"
    assert pooling_mode_from_config({"pooling_mode_cls_token": False}, "x") == "mean"
