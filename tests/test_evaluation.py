"""The grid engine and STS grid evaluation: one pass, equal to per-cell evaluation, the result type,
undefined (NaN) cells, defaults and errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import SENTENCES
from scipy.stats import spearmanr

from matryoshka2d import InvalidDimError, InvalidLayersError
from matryoshka2d.data import StsData, load_sts
from matryoshka2d.errors import DataFileError, InvalidInputError
from matryoshka2d.evaluation import GridResult, UndefinedMetricWarning, evaluate_grid
from matryoshka2d.evaluation.sts import evaluate_sts, spearman_x100


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


def test_numpy_arrays_of_layers_and_dims(tiny_model, sts_file):
    result = evaluate_sts(tiny_model, sts_file, layers=np.array([1, 2]), dims=np.array([16, 8]))
    assert result.layers == [1, 2] and result.dims == [16, 8]


def test_bad_grid(tiny_model, sts_file):
    with pytest.raises(InvalidLayersError, match="out of range"):
        evaluate_sts(tiny_model, sts_file, layers=[1, 9])
    with pytest.raises(InvalidDimError, match="out of range"):
        evaluate_sts(tiny_model, sts_file, dims=[64])
    with pytest.raises(InvalidDimError, match="empty"):
        evaluate_sts(tiny_model, sts_file, dims=[])


def old_sts_grid(model, data, layers, dims, batch_size=32):
    """The STS grid as it was computed before the grid engine (encode_layers, slice, normalise, einsum)."""
    from matryoshka2d.truncation import truncate_dims

    unique = list(dict.fromkeys(data.sentence1 + data.sentence2))
    position = {text: i for i, text in enumerate(unique)}
    idx1 = np.array([position[t] for t in data.sentence1])
    idx2 = np.array([position[t] for t in data.sentence2])
    by_layer = model.encode_layers(unique, layers, batch_size=batch_size)
    grid = []
    for k in layers:
        row = []
        for d in dims:
            emb = truncate_dims(by_layer[k], d, normalize=True)
            sims = np.einsum("ij,ij->i", emb[idx1], emb[idx2])
            row.append(float(spearmanr(sims, np.asarray(data.scores, dtype=np.float64)).statistic * 100))
        grid.append(row)
    return grid


def test_grid_engine_gives_exactly_the_numbers_of_the_old_per_layer_code(tiny_model, sts_file):
    data = load_sts(sts_file)
    for batch_size in (32, 5):
        result = evaluate_sts(tiny_model, data, layers=[1, 2, 4], dims=[32, 16, 8], batch_size=batch_size)
        assert result.spearman == old_sts_grid(tiny_model, data, [1, 2, 4], [32, 16, 8], batch_size)


class DelegatingEncoder:
    """Not an EmbeddingModel: only the encoder interface the grid engine needs (like the ONNX encoders)."""

    def __init__(self, model):
        self.model, self.num_layers, self.dim, self.name_or_path = model, model.num_layers, model.dim, "other"
        self.calls = 0

    def iter_encode(self, texts, **options):
        self.calls += 1
        return self.model.iter_encode(texts, **options)


def test_any_encoder_with_iter_encode_works(tiny_model, sts_file):
    encoder = DelegatingEncoder(tiny_model)
    result = evaluate_sts(encoder, sts_file, layers=[2, 4], dims=[16])
    assert encoder.calls == 1 and result.model == "other"
    assert result.spearman == evaluate_sts(tiny_model, sts_file, layers=[2, 4], dims=[16]).spearman


def test_evaluate_grid_with_several_metrics_and_info(tiny_model):
    texts = SENTENCES[:6]

    def score(emb):
        assert emb.dtype == np.float32 and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
        return {"width": float(emb.shape[1]), "first": float(emb[0, 0])}

    result = evaluate_grid(tiny_model, texts, score, layers=[1, 3], dims=[8, 32], info={"n": 6})
    assert result.primary == "width" and result.cell(3, 8) == 8.0 and result.table().count("\n") == 2
    for k in (1, 3):
        for d in (8, 32):
            assert result.cell(k, d, "first") == tiny_model.encode(texts, layers=k, dim=d)[0, 0]
    data = result.to_dict()
    assert data["n"] == 6 and set(data["metrics"]) == {"width", "first"} and data["primary"] == "width"
    assert GridResult.from_dict(json.loads(json.dumps(data))) == result
    with pytest.raises(InvalidInputError, match="unknown metric 'nope'"):
        result.cell(1, 8, "nope")
    with pytest.raises(InvalidInputError, match="no cell at layers=2"):
        result.cell(2, 8)


def test_the_sts_json_format_is_unchanged(tiny_model, sts_file):
    data = evaluate_sts(tiny_model, sts_file, layers=[1, 2], dims=[32, 8]).to_dict()
    assert list(data) == ["model", "layers", "dims", "spearman"]
    assert np.array(data["spearman"]).shape == (2, 2)
    with pytest.raises(DataFileError, match="at least one metric table"):
        GridResult.from_dict({"layers": [1], "dims": [8]})
    with pytest.raises(DataFileError, match="row 0 does not hold 2 numbers"):
        GridResult.from_dict({"layers": [1], "dims": [8, 4], "spearman": [[1.0]]})


@pytest.fixture
def constant_sts_file(tmp_path):
    """Every pair is one sentence with itself: the cosine similarities are all 1 (up to rounding)."""
    path = tmp_path / "same.tsv"
    rows = ["sentence1\tsentence2\tscore"] + [f"{s}\t{s}\t{i % 5}" for i, s in enumerate(SENTENCES)]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def test_constant_similarities_are_undefined_not_zero(tiny_model, constant_sts_file, tmp_path):
    with pytest.warns(UndefinedMetricWarning) as caught:
        result = evaluate_sts(tiny_model, constant_sts_file, layers=[1, 2], dims=[32, 8])
    assert all(math.isnan(v) for row in result.spearman for v in row)
    message = str(caught[0].message)
    assert "spearman is undefined (reported as NaN) at 4 cells" in message
    assert "layers=1 dim=32" in message and "cosine similarities are all equal" in message
    assert len(caught) == 1  # one warning per reason, naming every cell
    assert result.undefined_cells() == [(1, 32), (1, 8), (2, 32), (2, 8)]
    assert "nan" in result.table() and "0.00" not in result.table()
    assert math.isnan(result.mean())
    text = json.dumps(result.to_dict())
    assert "NaN" in text
    again = GridResult.from_dict(json.loads(text))
    assert math.isnan(again.cell(2, 8)) and again.layers == [1, 2]


def test_constant_gold_scores_are_undefined(tiny_model, sts_file):
    data = load_sts(sts_file)  # a file with equal scores is refused by load_sts; StsData is not checked
    flat = StsData(data.sentence1, data.sentence2, [3.0] * len(data))
    with pytest.warns(
        UndefinedMetricWarning, match=r"at 1 cell \(layers=2 dim=16\): the gold scores are all"
    ):
        result = evaluate_sts(tiny_model, flat, layers=[2], dims=[16])
    assert math.isnan(result.cell(2, 16))


def test_some_cells_undefined_others_defined(tiny_model, sts_file):
    """dim=1: every normalised 1-dim embedding is +1 or -1, so the similarities may be constant."""

    def score(emb):
        return {"spearman": spearman_x100(emb[:, 0] * emb[::-1, 0], np.arange(len(emb), dtype=float))}

    with pytest.warns(UndefinedMetricWarning, match="the computation gave NaN"):
        result = evaluate_grid(tiny_model, ["a", "a", "a"], score, layers=[1], dims=[4, 1])
    assert math.isnan(result.cell(1, 1))
    assert spearman_x100(np.array([0.5, 0.5 + 1e-8, 0.5]), np.array([1.0, 2.0, 3.0])) != 0
    assert math.isnan(spearman_x100(np.array([0.5, 0.5 + 1e-8, 0.5]), np.array([1.0, 2.0, 3.0])))
    assert spearman_x100(np.array([0.1, 0.2, 0.3]), np.array([1.0, 2.0, 3.0])) == pytest.approx(100)


def test_grid_mean_and_reading_refuse_what_has_no_answer():
    grid = GridResult.from_dict({"layers": [2, 3], "dims": [8], "spearman": [[1.0], [2.0]]})
    assert grid.mean(max_layers=2) == 1.0
    with pytest.raises(InvalidLayersError, match="no row of the grid has at most 1 layers"):
        grid.mean(max_layers=1)
    with pytest.raises(DataFileError, match="'layers' must be positive integers"):
        GridResult.from_dict({"layers": [1, "x"], "dims": [8], "spearman": [[1.0], [2.0]]})
