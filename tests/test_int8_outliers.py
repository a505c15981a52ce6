"""matryoshka2d.export.int8_outliers: outlier activation channels kept in float32 by the int8 quantisation.

A tiny random model has no outlier channels of its own, so one is made the way BERT-family models have
them: one feed-forward channel (3) whose activation is ~50 for every token where the others stay near 1
(a large bias before the GELU), with small weights after it, so it sets the int8 scale of the feed-forward
output MatMul without dominating the embedding.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import SENTENCES, build_tiny_model

from matryoshka2d import EmbeddingModel
from matryoshka2d.errors import InvalidInputError
from matryoshka2d.export import export_model, int8_file_name
from matryoshka2d.export.int8_outliers import (
    OUTLIER_RATIO,
    calibration_feeds,
    outlier_channels,
    read_outlier_record,
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


def error_to(reference, path, model):
    """Mean of 1 - cosine between the pooled embeddings of two graphs."""
    return float((1 - (pooled(path, model) * reference).sum(1)).mean())


def test_outlier_channels_are_those_past_the_ratio_largest_first_at_most_a_32nd():
    ranges = np.ones(64, dtype=np.float32)
    ranges[[5, 40]] = [9.0, 20.0]
    assert outlier_channels(ranges, ratio=8).tolist() == [40, 5]
    assert outlier_channels(ranges, ratio=10).tolist() == [40]
    assert outlier_channels(ranges, ratio=30).tolist() == []
    ranges[7] = 15.0  # three outliers in 64 channels: the two largest
    assert outlier_channels(ranges, ratio=8).tolist() == [40, 7]
    mostly_off = np.zeros(64, dtype=np.float32)  # a median of 0 (after a ReLU): nothing to compare with
    mostly_off[:3] = [0.5, 1.0, 2.0]
    assert outlier_channels(mostly_off, ratio=8).tolist() == []


def test_the_split_graph_computes_what_its_source_does(outlier_model, tmp_path):
    """At a low ratio every kind of MatMul input is split, the query / key / value input (three MatMuls
    sharing it) included; the float32 graph must still compute exactly what its source does."""
    source = export_onnx(outlier_model, tmp_path / "model.onnx")
    feeds = calibration_feeds(outlier_model, graph_input_names(outlier_model))
    added, _ = split_outlier_channels(source, tmp_path / "split.onnx", feeds, ratio=1.2)
    assert any(name.endswith("/side_2") for name in added), "no input shared by three MatMuls was split"
    record = read_outlier_record(tmp_path / "split.onnx")
    assert record["ratio"] == 1.2 and record["tensors"] > 4
    onnx.checker.check_model(onnx.load(str(tmp_path / "split.onnx")))
    expected, _ = run(source, outlier_model)
    got, _ = run(tmp_path / "split.onnx", outlier_model)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "split.onnx", "split.onnx_data"]
    with pytest.raises(InvalidInputError, match="outlier ratio"):
        split_outlier_channels(source, tmp_path / "bad.onnx", feeds, ratio=0)


def test_a_graph_without_weight_matmuls_is_written_unchanged(tmp_path):
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(graph), str(tmp_path / "relu.onnx"))
    feeds = [{"x": np.ones((2, 3), dtype=np.float32)}]
    assert split_outlier_channels(tmp_path / "relu.onnx", tmp_path / "out.onnx", feeds)[0] == []
    assert read_outlier_record(tmp_path / "out.onnx") == {"ratio": OUTLIER_RATIO, "tensors": 0, "channels": 0}


def test_int8_with_calibration_is_closer_to_float32_and_keeps_the_side_products_float(
    outlier_model, tmp_path
):
    source = export_onnx(outlier_model, tmp_path / "source" / "model.onnx")
    feeds = calibration_feeds(outlier_model, graph_input_names(outlier_model))
    plain = quantize_int8(source, tmp_path / "out" / "plain.onnx")
    split = quantize_int8(source, tmp_path / "out" / "split.onnx", calibration=feeds)
    reference = pooled(source, outlier_model)
    plain_cos = (pooled(plain, outlier_model) * reference).sum(1)
    split_cos = (pooled(split, outlier_model) * reference).sum(1)
    assert split_cos.min() > 0.99
    assert split_cos.min() > plain_cos.min() and (1 - split_cos).mean() < 0.5 * (1 - plain_cos).mean()
    graph = onnx.load(str(split))
    side = [n for n in graph.graph.node if n.name.startswith("m2d_outliers/") and "/side_" in n.name]
    assert side and {n.op_type for n in side} == {"MatMul"}  # not MatMulInteger
    assert any(n.op_type == "MatMulInteger" for n in graph.graph.node)  # the rest is int8
    assert read_outlier_record(split)["tensors"] == 4 and read_outlier_record(plain) is None
    assert read_exits(split) == read_exits(source)
    # nothing written beside the source or the results (the calibration copies live in a private folder)
    assert sorted(p.name for p in source.parent.iterdir()) == ["model.onnx"]
    assert sorted(p.name for p in plain.parent.iterdir()) == ["plain.onnx", "split.onnx"]


def test_a_model_without_outliers_is_quantised_as_before(tiny_model, tmp_path):
    source = export_onnx(tiny_model, tmp_path / "model.onnx")
    feeds = calibration_feeds(tiny_model, graph_input_names(tiny_model))
    split = quantize_int8(source, tmp_path / "split.onnx", calibration=feeds)
    plain = quantize_int8(source, tmp_path / "plain.onnx")
    assert read_outlier_record(split)["tensors"] == 0
    ops = [[n.op_type for n in onnx.load(str(p)).graph.node] for p in (split, plain)]
    assert ops[0] == ops[1]


def test_export_and_the_onnx_backend_quantise_with_the_outliers_in_float32(
    outlier_model, outlier_model_dir, tmp_path, monkeypatch
):
    from matryoshka2d.backends.onnx import OnnxEncoder

    out = export_model(outlier_model, tmp_path / "export", layers=3, format="onnx", quantize="int8")
    int8 = out / "onnx" / int8_file_name()
    assert read_outlier_record(int8)["tensors"] > 0
    # what SentenceTransformer(out, backend="onnx", model_kwargs={"file_name": ...}) runs: ONNX Runtime on it
    reference = pooled(out / "onnx" / "model.onnx", outlier_model)
    plain = quantize_int8(out / "onnx" / "model.onnx", tmp_path / "plain.onnx")
    assert error_to(reference, int8, outlier_model) < 0.5 * error_to(reference, plain, outlier_model)

    monkeypatch.setenv("M2D_CACHE_DIR", str(tmp_path / "cache"))
    encoder = OnnxEncoder(outlier_model_dir, quantize="int8")
    ours = encoder.encode(SENTENCES)
    assert read_outlier_record(encoder.cache / int8_file_name(encoder.preset))["tensors"] > 0
    plain = quantize_int8(encoder.cache / "model.onnx", tmp_path / "plain-full.onnx")
    full = outlier_model.encode(SENTENCES)
    ours_error = float((1 - (ours * full).sum(1)).mean())
    assert ours_error < 0.5 * error_to(full, plain, outlier_model)


def test_the_backend_quantises_again_an_int8_export_made_without_the_split(
    outlier_model, tmp_path, monkeypatch
):
    """A folder exported before int8 kept its outlier channels float32 ships a plain int8 graph."""
    from matryoshka2d.backends.onnx import OnnxEncoder

    out = export_model(outlier_model, tmp_path / "export", format="onnx", quantize="int8")
    int8 = out / "onnx" / int8_file_name()
    quantize_int8(out / "onnx" / "model.onnx", tmp_path / "plain.onnx")
    for name in ("plain.onnx",):  # the old export: a plain int8 graph under the int8 file name
        int8.write_bytes((tmp_path / name).read_bytes())
    assert read_outlier_record(int8) is None and read_exits(int8)
    monkeypatch.setenv("M2D_CACHE_DIR", str(tmp_path / "cache"))
    encoder = OnnxEncoder(out, quantize="int8")
    encoder.encode(SENTENCES[:2])
    assert read_outlier_record(encoder.cache / int8_file_name(encoder.preset))["tensors"] > 0


def test_cli_export_says_how_many_channels_stay_float32(outlier_model_dir, tiny_model_dir, tmp_path, capsys):
    from matryoshka2d.cli import main

    argv = ["export", "--format", "onnx", "--quantize", "int8"]
    assert main([*argv, str(outlier_model_dir), "--out", str(tmp_path / "a")]) == 0
    record = read_outlier_record(tmp_path / "a" / "onnx" / int8_file_name())
    assert f"{record['channels']} outlier activation channels of {record['tensors']} MatMul inputs" in (
        capsys.readouterr().out
    )
    assert main([*argv, str(tiny_model_dir), "--out", str(tmp_path / "b")]) == 0
    assert "outlier" not in capsys.readouterr().out  # nothing split: nothing said


def test_every_onnx_runtime_session_of_the_int8_backend_uses_its_threads(
    outlier_model_dir, tmp_path, monkeypatch
):
    """threads=1 (e.g. one process per core) holds for the calibration run of the quantisation too."""
    from matryoshka2d.backends.onnx import OnnxEncoder

    threads, real = [], ort.InferenceSession

    def spy(path, options=None, *args, **kwargs):
        threads.append(options.intra_op_num_threads if options is not None else None)
        return real(path, options, *args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", spy)
    monkeypatch.setenv("M2D_CACHE_DIR", str(tmp_path / "cache"))
    encoder = OnnxEncoder(outlier_model_dir, quantize="int8", threads=1)
    encoder.encode(SENTENCES[:2], layers=2)
    assert read_outlier_record(encoder.cache / int8_file_name(encoder.preset))["tensors"] > 0
    assert len(threads) >= 2 and set(threads) == {1}  # the calibration run and the 2-layer graph


def test_a_shipped_int8_graph_is_read_once_to_check_it(outlier_model, tmp_path, monkeypatch):
    """Its exits and its outlier record come from one load (an int8 graph under 2 GiB holds its weights)."""
    from matryoshka2d.backends import onnx as backend

    out = export_model(outlier_model, tmp_path / "export", format="onnx", quantize="int8")
    loads, real = [], backend.load_graph_header
    monkeypatch.setattr(backend, "load_graph_header", lambda path: loads.append(path) or real(path))
    monkeypatch.setenv("M2D_CACHE_DIR", str(tmp_path / "cache"))
    encoder = backend.OnnxEncoder(out, quantize="int8")
    assert sorted(p.name for p in loads) == sorted(["model.onnx", int8_file_name(encoder.preset)])
    assert encoder._int8_graph == out / "onnx" / int8_file_name(encoder.preset)
