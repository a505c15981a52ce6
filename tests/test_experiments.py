"""The figures experiments/mpnet_grid.py reports (retention, seed means, cell-by-cell comparisons)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from matryoshka2d.evaluation.grid import GridResult

_PATH = Path(__file__).resolve().parents[1] / "experiments" / "mpnet_grid.py"


@pytest.fixture(scope="module")
def mpnet_grid():
    spec = importlib.util.spec_from_file_location("mpnet_grid", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _table(offset: float = 0.0) -> list[list[float]]:
    """12 layers x 6 dims: row i (i+1 layers) is 50 + 3 i, each smaller dim 1 lower."""
    return [[50 + 3 * i - j + offset for j in range(6)] for i in range(12)]


def _grid(table: list[list[float]], name: str = "m") -> GridResult:
    return GridResult(name, list(range(1, 13)), [768, 512, 256, 128, 64, 48], {"spearman": table})


def test_summarize_reads_the_cells_the_issue_names(mpnet_grid):
    table = _table()
    summary = mpnet_grid.summarize(_grid(table))
    full = table[11][0]
    assert summary["full"] == full == 83
    assert summary["reduced_layer_mean"] == pytest.approx(np.mean(table[:11]))
    retention = summary["retention_percent"]
    assert retention["half_layers"] == pytest.approx(100 * table[5][0] / full)  # 6 of 12 layers
    assert retention["one_layer"] == pytest.approx(100 * table[0][0] / full)
    assert retention["dims_64"] == pytest.approx(100 * table[11][4] / full)  # DIMS[4] == 64
    assert retention["dims_48"] == pytest.approx(100 * table[11][5] / full)


def test_seed_means_average_each_name_over_its_seeds_only(mpnet_grid):
    grids = {
        "recipe@42/test": _grid(_table(0.0)),
        "recipe@43/test": _grid(_table(2.0)),
        "untouched/test": _grid(_table(-10.0)),
    }
    means = mpnet_grid.seed_means(grids)
    assert list(means) == ["recipe/test"]
    assert means["recipe/test"].info["seeds"] == ["recipe@42", "recipe@43"]
    np.testing.assert_allclose(means["recipe/test"].spearman, _table(1.0))
    assert mpnet_grid.summarize(means["recipe/test"])["full"] == pytest.approx(84.0)


def test_compare_counts_reduced_layer_cells_only(mpnet_grid):
    a, b = _table(0.5), _table()
    a[0][0] = b[0][0] - 2.0  # one reduced cell below
    a[11] = [0.0] * 6  # the full-depth row never counts
    result = mpnet_grid.compare(_grid(a), _grid(b))
    assert result["cells"] == 66
    assert result["cells_a_above_b"] == 65
    assert result["min"] == pytest.approx(-2.0)
    assert result["max"] == pytest.approx(0.5)
    assert result["mean"] == pytest.approx((65 * 0.5 - 2.0) / 66)
