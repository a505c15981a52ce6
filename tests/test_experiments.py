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


# ---------------------------------------------------------------------------------------- the MPNet configs
@pytest.mark.parametrize("name", ["plain", "2dmse", "recipe", "recipe-v6"])
def test_mpnet_configs_build_their_loss_for_a_12_layer_model(name):
    from types import SimpleNamespace

    from matryoshka2d.training.config import TrainConfig
    from matryoshka2d.training.loss_factory import build_loss

    cfg = TrainConfig.from_yaml(_PATH.parent / "mpnet" / f"{name}.yaml")
    mpnet = SimpleNamespace(dim=768, num_layers=12)  # the shape of all-mpnet-base-v2
    build_loss(cfg, mpnet).check_model(mpnet)
    for task in cfg.extra_tasks:
        build_loss(cfg.task_config(task), mpnet).check_model(mpnet)
    assert cfg.epochs == 1 and cfg.batch_size == 32  # one schedule for every model of the comparison
    assert cfg.dims in (None, [768, 512, 256, 128, 64])  # 64 = 8.3% of 768, as 32 of 384 on MiniLM


def test_mpnet_recipe_v6_uses_the_recommended_loss_settings():
    from matryoshka2d.demo.experiment import RECOMMENDED_WRAPPER_ARGS
    from matryoshka2d.training.config import TrainConfig

    cfg = TrainConfig.from_yaml(_PATH.parent / "mpnet" / "recipe-v6.yaml")
    v3 = TrainConfig.from_yaml(_PATH.parent / "mpnet" / "recipe.yaml")
    assert cfg.wrapper_args == RECOMMENDED_WRAPPER_ARGS
    # ... and differs from the v3 run only there (and in where it is written)
    same = {k: v for k, v in cfg.to_dict().items() if k not in ("wrapper_args", "output_dir")}
    assert same == {k: v for k, v in v3.to_dict().items() if k not in ("wrapper_args", "output_dir")}
