"""matryoshka2d.export.int8_outliers: outlier activation channels kept in float32 by the int8 quantisation.

A tiny random model has no outlier channels of its own, so one is made the way BERT-family models have
them: one feed-forward channel (3) whose activation is ~50 for every token where the others stay near 1
(a large bias before the GELU), with small weights after it, so it sets the int8 scale of the feed-forward
output MatMul without dominating the embedding.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import SENTENCES, build_tiny_model

from matryoshka2d import EmbeddingModel
from matryoshka2d.export import export_model, int8_file_name
from matryoshka2d.export.int8_outliers import (
    OUTLIER_RATIO,
    OUTLIERS_KEY,
    calibration_feeds,
    outlier_channels,
    split_outlier_channels,
)
from matryoshka2d.export.onnx import export_onnx, graph_input_names, quantize_int8, read_exits


@pytest.fixture(scope="module")
def outlier_model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("outliers")
    model = build_tiny_model(root / "build", "bert")
    with torch.no_grad():
        for layer in model.transformer.encoder.layer:
            layer.intermediate.dense.bias[3] = 50.0
            layer.output.dense.weight[:, 3] *= 0.02
    return model.save(root / "model")


@pytest.fixture
def outlier_model(outlier_model_dir):
    return EmbeddingModel.load(outlier_model_dir)


def run(path, model, output="last_hidden_state"):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (feed,) = calibration_feeds(model, graph_input_names(model), SENTENCES)
    return session.run([output], feed)[0], feed["attention_mask"]


def pooled(path, model):
    hidden, mask = run(path, model)
    mask = mask[..., None].astype(np.float32)
    emb = (hidden * mask).sum(1) / mask.sum(1)
    return emb / np.linalg.norm(emb, axis=1, keepdims=True)


def test_outlier_channels_are_those_past_the_ratio_largest_first_at_most_a_32nd():
    ranges = np.ones(64, dtype=np.float32)
    ranges[[5, 40]] = [9.0, 20.0]
    assert outlier_channels(ranges, ratio=8).tolist() == [40, 5]
    assert outlier_channels(ranges, ratio=10).tolist() == [40]
    assert outlier_channels(ranges, ratio=30).tolist() == []
    ranges[7] = 15.0  # three outliers in 64 channels: the two largest
    assert outlier_channels(ranges, ratio=8).tolist() == [40, 7]


def test_the_split_graph_computes_what_its_source_does(outlier_model, tmp_path):
    source = export_onnx(outlier_model, tmp_path / "model.onnx")
    feeds = calibration_feeds(outlier_model, graph_input_names(outlier_model))
    added = split_outlier_channels(source, tmp_path / "split.onnx", feeds)
    assert added, "the 50x feed-forward channel was not found"
    graph = onnx.load(str(tmp_path / "split.onnx"))
    record = json.loads({e.key: e.value for e in graph.metadata_props}[OUTLIERS_KEY])
    assert record["ratio"] == OUTLIER_RATIO and record["tensors"] == 4 and record["channels"] == 4
    onnx.checker.check_model(graph)
    expected, _ = run(source, outlier_model)
    got, _ = run(tmp_path / "split.onnx", outlier_model)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_int8_with_calibration_is_closer_to_float32_and_keeps_the_side_products_float(
    outlier_model, tmp_path
):
    source = export_onnx(outlier_model, tmp_path / "model.onnx")
    feeds = calibration_feeds(outlier_model, graph_input_names(outlier_model))
    plain = quantize_int8(source, tmp_path / "plain.onnx")
    split = quantize_int8(source, tmp_path / "split.onnx", calibration=feeds)
    reference = pooled(source, outlier_model)
    plain_cos = (pooled(plain, outlier_model) * reference).sum(1)
    split_cos = (pooled(split, outlier_model) * reference).sum(1)
    assert split_cos.min() > 0.99
    assert split_cos.min() > plain_cos.min() and (1 - split_cos).mean() < 0.5 * (1 - plain_cos).mean()
    graph = onnx.load(str(split))
    side = [n for n in graph.graph.node if n.name.startswith("m2d_outliers/") and "/side_" in n.name]
    assert side and {n.op_type for n in side} == {"MatMul"}  # not MatMulInteger
    assert any(n.op_type == "MatMulInteger" for n in graph.graph.node)  # the rest is int8
    keys = {e.key for e in graph.metadata_props}
    assert OUTLIERS_KEY in keys and read_exits(split) == read_exits(source)
    assert OUTLIERS_KEY not in {e.key for e in onnx.load(str(plain)).metadata_props}


def test_export_and_the_onnx_backend_quantise_with_the_outliers_in_float32(
    outlier_model, outlier_model_dir, tmp_path, monkeypatch
):
    from matryoshka2d.backends.onnx import OnnxEncoder

    out = export_model(outlier_model, tmp_path / "export", layers=3, format="onnx", quantize="int8")
    exported = onnx.load(str(out / "onnx" / int8_file_name()), load_external_data=False)
    assert OUTLIERS_KEY in {e.key for e in exported.metadata_props}
    # what SentenceTransformer(out, backend="onnx", model_kwargs={"file_name": ...}) runs: ONNX Runtime on it
    cos = (
        pooled(out / "onnx" / int8_file_name(), outlier_model)
        * pooled(out / "onnx" / "model.onnx", outlier_model)
    ).sum(1)
    assert (1 - cos).mean() < 1e-4
    monkeypatch.setenv("M2D_CACHE_DIR", str(tmp_path / "cache"))
    encoder = OnnxEncoder(outlier_model_dir, quantize="int8")
    ours = encoder.encode(SENTENCES, layers=2)
    cached = onnx.load(str(encoder.cache / int8_file_name(encoder.preset)), load_external_data=False)
    assert OUTLIERS_KEY in {e.key for e in cached.metadata_props}
    reference = outlier_model.encode(SENTENCES, layers=2)
    assert (1 - (ours * reference).sum(1)).mean() < 1e-4  # plain int8 of this model: ~3e-4 at full depth
