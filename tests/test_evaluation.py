"""STS grid evaluation: one pass, equal to per-cell evaluation, defaults and errors."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr

from matryoshka2d import InvalidDimError, InvalidLayersError
from matryoshka2d.data import load_sts
from matryoshka2d.evaluation.sts import GridResult, evaluate_sts


def test_grid_equals_cell_by_cell_encoding(tiny_model, sts_file):
    data = load_sts(sts_file)
    result = evaluate_sts(tiny_model, data, layers=[1, 3, 4], dims=[8, 32])
    assert result.layers == [1, 3, 4] and result.dims == [32, 8]
    for i, k in enumerate(result.layers):
        for j, d in enumerate(result.dims):
            a = tiny_model.encode(data.sentence1, layers=k, dim=d)
            b = tiny_model.encode(data.sentence2, layers=k, dim=d)
            expected = spearmanr((a * b).sum(1), data.scores).statistic * 100
            assert result.spearman[i][j] == pytest.approx(expected, abs=1e-3)


def test_grid_is_one_pass(tiny_model, sts_file):
    data = load_sts(sts_file)
    unique = len(set(data.sentence1 + data.sentence2))
    batches = []
    hook = tiny_model.transformer.embeddings.register_forward_hook(lambda m, i, o: batches.append(o.shape[0]))
    try:
        evaluate_sts(tiny_model, data, layers=[1, 2, 3, 4], dims=[32, 16, 8], batch_size=5)
    finally:
        hook.remove()
    # every distinct sentence goes through the embedding layer exactly once, for all 4 x 3 cells
    assert sum(batches) == unique and len(batches) == -(-unique // 5)


def test_defaults_and_result_helpers(tiny_model, sts_file):
    result = evaluate_sts(tiny_model, sts_file)
    assert result.layers == [1, 2, 3, 4] and result.dims == [32]
    again = GridResult.from_dict(result.to_dict())
    assert again == result and again.cell(2, 32) == result.spearman[1][0]
    assert result.mean() == pytest.approx(np.mean(result.spearman))
    assert result.mean(max_layers=1) == pytest.approx(result.spearman[0][0])
    assert result.table().splitlines()[0].split()[-1] == "32"


def test_bad_grid(tiny_model, sts_file):
    with pytest.raises(InvalidLayersError, match="out of range"):
        evaluate_sts(tiny_model, sts_file, layers=[1, 9])
    with pytest.raises(InvalidDimError, match="out of range"):
        evaluate_sts(tiny_model, sts_file, dims=[64])
    with pytest.raises(InvalidDimError, match="empty"):
        evaluate_sts(tiny_model, sts_file, dims=[])
