"""matryoshka2d.export: torch and ONNX exports of the first K layers / D dims, per-exit graphs, int8.

sentence-transformers' own ONNX backend (optimum-onnx) cannot be installed next to transformers 5, so
the ONNX folder is checked the way that backend runs it: ONNX Runtime computes ``last_hidden_state`` from
``onnx/model.onnx`` and the folder's own sentence-transformers modules (Pooling, Dense, Normalize, loaded
by ``SentenceTransformer(folder)``) turn it into embeddings.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import FAMILIES, SENTENCES, packaged_minilm

from matryoshka2d import EmbeddingModel, InvalidDimError, InvalidInputError, InvalidLayersError
from matryoshka2d.cli import main
from matryoshka2d.export import (
    ONNX_FILE,
    OnnxExportError,
    export_model,
    extract_exits,
    int8_file_name,
    int8_preset,
    read_exits,
)


def st_onnx_encode(folder, texts, file_name=ONNX_FILE):
    """What SentenceTransformer(folder, backend="onnx") computes: ONNX Runtime + the folder's ST modules."""
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(folder), device="cpu")
    session = ort.InferenceSession(str(folder / file_name), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    features = st.tokenize(texts)
    (hidden,) = session.run(["last_hidden_state"], {n: features[n].numpy() for n in names})
    out = {"token_embeddings": torch.from_numpy(hidden), "attention_mask": features["attention_mask"]}
    for module in list(st)[1:]:  # Pooling, Dense (dim), Normalize
        out = module(out)
    return out["sentence_embedding"].detach().numpy()


def exported(folder, model, layers, dim, **kwargs):
    return export_model(model, folder, layers=layers, dim=dim, **kwargs)


@pytest.mark.parametrize("family", FAMILIES)
def test_onnx_folder_gives_our_embeddings_in_sentence_transformers(tiny_model_dirs, tmp_path, family):
    model = EmbeddingModel.load(tiny_model_dirs[family])
    out = exported(tmp_path / "small", model, 2, 16, format="onnx")
    ours = model.encode(SENTENCES, layers=2, dim=16)
    assert np.abs(st_onnx_encode(out, SENTENCES) - ours).max() <= 1e-4
    config = json.loads((out / "config.json").read_text())
    assert config.get("num_hidden_layers", config.get("n_layers")) == 2
    assert read_exits(out / ONNX_FILE) == {1: "hidden_state_1", 2: "last_hidden_state"}


def test_torch_export_loads_in_sentence_transformers(tiny_model, tmp_path):
    from sentence_transformers import SentenceTransformer

    out = exported(tmp_path / "small", tiny_model, 3, 8)
    assert not (out / "onnx").exists()
    theirs = SentenceTransformer(str(out), device="cpu").encode(SENTENCES)
    assert np.abs(theirs - tiny_model.encode(SENTENCES, layers=3, dim=8)).max() <= 1e-5


def test_export_onnx_leaves_the_callers_model_in_its_mode(tiny_model, tmp_path):
    """A training loop that exports part-way must go on with dropout (export_onnx set the modules it
    shares with the model to eval mode)."""
    from matryoshka2d.export.onnx import export_onnx

    tiny_model.train()
    export_onnx(tiny_model, tmp_path / "a.onnx", layers=2)
    assert all(m.training for m in tiny_model.modules())
    tiny_model.eval()
    export_onnx(tiny_model, tmp_path / "b.onnx")
    assert not any(m.training for m in tiny_model.modules())


def test_a_torch_export_of_an_onnx_folder_does_not_name_its_graphs(tiny_model, tmp_path):
    onnx_folder = export_model(tiny_model, tmp_path / "onnx", format="onnx")
    again = export_model(EmbeddingModel.load(onnx_folder), tmp_path / "torch", layers=2, format="torch")
    assert "onnx" not in json.loads((again / "matryoshka2d.json").read_text())


def test_int8_export_is_close_to_float32(tiny_model, tmp_path):
    out = exported(tmp_path / "small", tiny_model, 3, 16, format="onnx", quantize="int8")
    name = f"onnx/{int8_file_name()}"
    meta = json.loads((out / "matryoshka2d.json").read_text())
    assert meta["onnx"] == {"file": ONNX_FILE, "int8_file": name, "int8_preset": int8_preset()}
    fp32 = st_onnx_encode(out, SENTENCES)
    int8 = st_onnx_encode(out, SENTENCES, file_name=name)
    assert not np.array_equal(int8, fp32)
    assert (int8 * fp32).sum(axis=1).min() > 0.95  # cosine (random tiny weights: a loose bound)
    assert read_exits(out / name) == read_exits(out / ONNX_FILE)  # the exits survive quantisation
    assert (out / name).stat().st_size < (out / ONNX_FILE).stat().st_size


@pytest.fixture
def external_past_1kb(monkeypatch):
    """Every graph past 1,000 bytes of weights is written as a model past 2 GiB is: weights in a data file."""
    import matryoshka2d.export.onnx as onnx_export

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 1000)


def run_graph(path, features):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: features[i.name].numpy() for i in session.get_inputs()})


def test_a_graph_past_the_file_limit_keeps_its_weights_in_one_data_file(tiny_model, tmp_path, monkeypatch):
    """Models past protobuf's 2 GiB (bge-m3, multilingual-e5-large in float32) are exported, cut and
    quantised with their weights in ``<graph>_data`` beside the graph, and compute what one file does."""
    import matryoshka2d.export.onnx as onnx_export

    one_file = onnx_export.export_onnx(tiny_model, tmp_path / "one" / "model.onnx")
    cut_one = extract_exits(one_file, 2, tmp_path / "one" / "l2.onnx")
    int8_one = onnx_export.quantize_int8(one_file, tmp_path / "one" / "int8.onnx")
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 1000)
    big = tmp_path / "big"
    graph = onnx_export.export_onnx(tiny_model, big / "model.onnx")
    cut = extract_exits(graph, 2, big / "l2.onnx")
    int8 = onnx_export.quantize_int8(graph, big / "int8.onnx")
    elsewhere = extract_exits(graph, 2, tmp_path / "elsewhere" / "l2.onnx")
    # A cut graph in the same folder refers to its source's data file; one in another folder has its own.
    names = ["model.onnx", "model.onnx_data", "l2.onnx", "int8.onnx", "int8.onnx_data"]
    assert sorted(p.name for p in big.iterdir()) == sorted(names)  # and no temporary files left
    assert sorted(p.name for p in elsewhere.parent.iterdir()) == ["l2.onnx", "l2.onnx_data"]
    assert cut.stat().st_size < 0.5 * cut_one.stat().st_size
    for external, inside in ((graph, one_file), (elsewhere, cut_one), (int8, int8_one)):  # weights moved out
        data = onnx_export.external_data_path(external).stat().st_size
        assert inside.stat().st_size - external.stat().st_size > 0.9 * data
    assert read_exits(graph) == read_exits(int8) == read_exits(one_file)
    features = tiny_model.tokenize(SENTENCES)
    for external, inside in ((graph, one_file), (cut, cut_one), (elsewhere, cut_one), (int8, int8_one)):
        for a, b in zip(run_graph(external, features), run_graph(inside, features), strict=True):
            assert np.array_equal(a, b)
    with pytest.raises(OnnxExportError, match="write over its source"):
        extract_exits(graph, 2, graph)
    # Written again below the limit (a smaller model at the same path): the stale data file goes.
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 2**31)
    onnx_export.export_onnx(tiny_model, graph, layers=1)
    assert not onnx_export.external_data_path(graph).exists()
    assert read_exits(graph) == {1: "last_hidden_state"}


def test_onnx_folder_with_external_data_loads_in_sentence_transformers(
    tiny_model, tmp_path, external_past_1kb
):
    out = exported(tmp_path / "small", tiny_model, 3, 16, format="onnx", quantize="int8")
    int8 = f"onnx/{int8_file_name()}"
    assert (out / "onnx" / "model.onnx_data").is_file() and (out / f"{int8}_data").is_file()
    ours = tiny_model.encode(SENTENCES, layers=3, dim=16)
    assert np.abs(st_onnx_encode(out, SENTENCES) - ours).max() <= 1e-4
    assert (st_onnx_encode(out, SENTENCES, file_name=int8) * ours).sum(axis=1).min() > 0.95


def test_cli_export_says_where_external_weights_are(tiny_model_dir, tmp_path, capsys, external_past_1kb):
    out = tmp_path / "big"
    assert main(["export", str(tiny_model_dir), "--format", "onnx", "--out", str(out)]) == 0
    assert "weights of onnx/model.onnx in onnx/model.onnx_data" in capsys.readouterr().out


def test_int8_quantisation_writes_nothing_beside_its_source(tiny_model, tmp_path, monkeypatch):
    """The source may be a read-only model folder (or another process may be quantising it too): ONNX
    Runtime's shape-inferred copy of it must not be written there."""
    import onnx

    from matryoshka2d.export.onnx import export_onnx, quantize_int8

    source = export_onnx(tiny_model, tmp_path / "model" / "model.onnx", layers=2)
    written = []
    infer = onnx.shape_inference.infer_shapes_path

    def recording(path, output_path="", *args, **kwargs):
        written.append(Path(output_path or path).resolve())
        return infer(path, output_path, *args, **kwargs)

    monkeypatch.setattr(onnx.shape_inference, "infer_shapes_path", recording)
    quantize_int8(source, tmp_path / "out" / "int8.onnx")
    assert written and all(source.parent.resolve() not in p.parents for p in written)
    assert sorted(p.name for p in source.parent.iterdir()) == ["model.onnx"]


def test_int8_quantisation_leaves_the_root_logger_alone(tiny_model, tmp_path, caplog, monkeypatch):
    """Its hint is dropped, but what other threads log while it runs is not (the root logger's level is
    not touched), and the root logger is left as it was."""
    import logging

    import onnxruntime.quantization as ortq

    from matryoshka2d.export.onnx import export_onnx, quantize_int8

    original = ortq.quantize_dynamic

    def quantize_beside_another_thread(*args, **kwargs):
        logging.getLogger("another.module").warning("logged while quantising")
        return original(*args, **kwargs)

    monkeypatch.setattr(ortq, "quantize_dynamic", quantize_beside_another_thread)
    root = logging.getLogger()
    level, filters = root.level, list(root.filters)
    graph = export_onnx(tiny_model, tmp_path / "model.onnx", layers=2)
    with caplog.at_level(logging.INFO):
        quantize_int8(graph, tmp_path / "int8.onnx")
    assert (root.level, root.filters) == (level, filters)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [
        "logged while quantising"
    ]


def test_k_layer_graph_holds_only_k_layers(tiny_model, tmp_path):
    sizes = {k: exported(tmp_path / f"k{k}", tiny_model, k, None, format="onnx") for k in (1, 4)}
    onnx_size = {k: (out / ONNX_FILE).stat().st_size for k, out in sizes.items()}
    weights = {k: (out / "model.safetensors").stat().st_size for k, out in sizes.items()}
    assert onnx_size[1] < onnx_size[4] and weights[1] < weights[4]


def test_extract_exits_runs_only_the_first_layers(tiny_model, tmp_path):
    import onnx

    full = exported(tmp_path / "full", tiny_model, None, None, format="onnx") / ONNX_FILE
    by_layer = tiny_model.encode_layers(SENTENCES, [1, 2, 4])
    features = tiny_model.tokenize(SENTENCES)
    mask = features["attention_mask"]
    matmuls = {}
    for k in (1, 2, 4):
        graph = extract_exits(full, k, tmp_path / f"l{k}.onnx")
        session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
        outputs = session.run(None, {i.name: features[i.name].numpy() for i in session.get_inputs()})
        assert [o.name for o in session.get_outputs()] == [f"exit_{i}" for i in range(1, k + 1)]
        pooled = (torch.from_numpy(outputs[-1]) * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        assert np.abs(pooled.numpy() - by_layer[k]).max() <= 1e-5
        matmuls[k] = sum(n.op_type == "MatMul" for n in onnx.load(str(graph)).graph.node)
    assert matmuls[2] == 2 * matmuls[1] and matmuls[4] == 4 * matmuls[1]  # 6 MatMuls per layer
    with pytest.raises(OnnxExportError, match="no exit after layer 5"):
        extract_exits(full, 5, tmp_path / "l5.onnx")


def test_export_refuses_bad_options(tiny_model, tiny_model_dir, tmp_path):
    with pytest.raises(InvalidInputError, match="needs --format onnx"):
        export_model(tiny_model, tmp_path / "a", format="torch", quantize="int8")
    with pytest.raises(InvalidInputError, match="'tflite'"):
        export_model(tiny_model, tmp_path / "a", format="tflite")
    with pytest.raises(InvalidInputError, match="'int4'"):
        export_model(tiny_model, tmp_path / "a", format="onnx", quantize="int4")
    with pytest.raises(InvalidLayersError):
        export_model(tiny_model, tmp_path / "a", layers=9, format="onnx")
    with pytest.raises(InvalidDimError):
        export_model(tiny_model, tmp_path / "a", dim=99, format="onnx")
    with pytest.raises(OnnxExportError, match="float32"):
        export_model(EmbeddingModel.load(tiny_model_dir, dtype="bfloat16"), tmp_path / "a", format="onnx")
    assert not (tmp_path / "a").exists()


def test_cli_export_and_truncate_alias(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "small"
    argv = ["export", str(tiny_model_dir), "--layers", "2", "--dim", "16", "--format", "onnx"]
    assert main([*argv, "--quantize", "int8", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "saved 2 layers x 16 dims" in printed and int8_file_name() in printed
    assert (out / ONNX_FILE).is_file() and (out / "onnx" / int8_file_name()).is_file()
    assert main([*argv, "--out", str(out)]) == 2  # an existing model needs --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert main([*argv, "--out", str(out), "--overwrite"]) == 0
    assert not (out / "onnx" / int8_file_name()).exists()  # replaced as a whole
    assert main(["truncate", str(tiny_model_dir), "--layers", "1", "--out", str(tmp_path / "t")]) == 0
    assert EmbeddingModel.load(tmp_path / "t").num_layers == 1
    code = main(["truncate", str(tiny_model_dir), "--quantize", "int8", "--out", str(tmp_path / "q")])
    assert code == 2 and "needs --format onnx" in capsys.readouterr().err


@pytest.mark.integration
def test_minilm_onnx_export_matches_encode(tmp_path):
    model = EmbeddingModel.load(packaged_minilm())
    out = exported(tmp_path / "minilm-3x128", model, 3, 128, format="onnx", quantize="int8")
    texts = SENTENCES * 4
    ours = model.encode(texts, layers=3, dim=128)
    assert np.abs(st_onnx_encode(out, texts) - ours).max() <= 1e-4
    int8 = st_onnx_encode(out, texts, file_name=f"onnx/{int8_file_name()}")
    assert (int8 * ours).sum(axis=1).min() > 0.95
