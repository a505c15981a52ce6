"""matryoshka2d.backends: load_encoder and the ONNX Runtime backend (same results as torch, k layers only)."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import SENTENCES

from matryoshka2d import (
    EmbeddingModel,
    InvalidDimError,
    InvalidInputError,
    InvalidLayersError,
    ModelLoadError,
)
from matryoshka2d.backends import BACKENDS, load_encoder
from matryoshka2d.backends.onnx import OnnxEncoder, onnx_cache_dir
from matryoshka2d.cli import main
from matryoshka2d.export import ONNX_FILE, export_model, int8_file_name


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path, monkeypatch):
    """Graphs built without an explicit cache_dir (the CLI) go to the test's folder, not ~/.cache."""
    monkeypatch.setenv("M2D_CACHE_DIR", str(tmp_path / "m2d-cache"))


@pytest.fixture
def onnx_encoder(tiny_model_dir, tmp_path):
    return OnnxEncoder(tiny_model_dir, cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("threads", ["4", 2.5, 0, -1, True])
def test_onnx_threads_checked_before_any_work(tiny_model_dir, tmp_path, threads):
    with pytest.raises(InvalidInputError, match="threads"):
        OnnxEncoder(tiny_model_dir, threads=threads, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()  # nothing exported


def test_layers_as_one_int_or_any_iterable(onnx_encoder, tiny_model):
    for encoder in (onnx_encoder, tiny_model):
        one = encoder.encode_layers(SENTENCES, 3)
        assert list(one) == [3]
        assert np.abs(one[3] - encoder.encode_layers(SENTENCES, [3])[3]).max() == 0
        assert list(encoder.encode_layers(SENTENCES, {1, 2})) == [1, 2]
        assert list(encoder.encode_layers(SENTENCES, (k for k in (4, 1)))) == [1, 4]
    assert onnx_encoder.warm_up(2) is onnx_encoder


def test_onnx_equals_torch_at_every_cell(onnx_encoder, tiny_model):
    assert (onnx_encoder.num_layers, onnx_encoder.dim) == (tiny_model.num_layers, tiny_model.dim)
    assert (onnx_encoder.backend, onnx_encoder.precision) == ("onnx", "float32")
    for k in range(1, 5):
        for d in (32, 8):
            ours = onnx_encoder.encode(SENTENCES, layers=k, dim=d, batch_size=5)
            np.testing.assert_allclose(ours, tiny_model.encode(SENTENCES, layers=k, dim=d), atol=1e-5)
    raw = onnx_encoder.encode_layers(SENTENCES, [1, 3])
    ref = tiny_model.encode_layers(SENTENCES, [1, 3])
    assert all(np.abs(raw[k] - ref[k]).max() <= 1e-5 for k in (1, 3))
    cells = [b for b in onnx_encoder.iter_encode(SENTENCES, layers=[2, 4], dims=[16, 4], chunk_size=5)]
    assert [b.start for b in cells] == [0, 5, 10]
    joined = np.concatenate([b[(2, 4)] for b in cells])
    np.testing.assert_allclose(joined, tiny_model.encode(SENTENCES, layers=2, dim=4), atol=1e-5)


def test_layers_k_runs_a_graph_of_k_layers(onnx_encoder):
    import onnx

    onnx_encoder.encode(SENTENCES, layers=1)
    onnx_encoder.encode_layers(SENTENCES, [2, 3])  # several exits: one pass of the deepest graph
    assert sorted(onnx_encoder._sessions) == [1, 3]
    matmuls = {
        k: sum(n.op_type == "MatMul" for n in onnx.load(str(onnx_encoder.graph_path(k))).graph.node)
        for k in (1, 3)
    }
    assert matmuls[3] == 3 * matmuls[1] > 0
    assert onnx_encoder._torch_model is None  # the torch weights are dropped once the graph exists


def test_cached_graphs_are_reused(tiny_model_dir, tmp_path, monkeypatch):
    first = OnnxEncoder(tiny_model_dir, cache_dir=tmp_path / "cache").warm_up([2])
    path = first.graph_path(2)
    stamp = path.stat().st_mtime_ns
    from matryoshka2d.backends import onnx as onnx_backend

    def no_export(*args, **kwargs):
        raise AssertionError("the cached graph should have been used")

    monkeypatch.setattr(onnx_backend, "export_onnx", no_export)
    monkeypatch.setattr(onnx_backend, "extract_exits", no_export)
    second = OnnxEncoder(tiny_model_dir, cache_dir=tmp_path / "cache")
    assert second.graph_path(2) == path
    np.testing.assert_array_equal(second.encode(SENTENCES, layers=2), first.encode(SENTENCES, layers=2))
    assert path.stat().st_mtime_ns == stamp
    assert not [p for p in path.parent.iterdir() if ".tmp-" in p.name]  # atomic writes leave nothing


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("M2D_CACHE_DIR", str(tmp_path / "m2d"))
    assert onnx_cache_dir() == tmp_path / "m2d" / "onnx"
    monkeypatch.delenv("M2D_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert onnx_cache_dir() == tmp_path / "xdg" / "matryoshka2d" / "onnx"


def test_exported_folder_uses_its_own_graph(tiny_model, tmp_path, monkeypatch):
    out = export_model(tiny_model, tmp_path / "small", layers=3, dim=16, format="onnx", quantize="int8")
    from matryoshka2d.backends import onnx as onnx_backend

    def no_export(*args, **kwargs):
        raise AssertionError("the folder's own onnx/model.onnx should have been used")

    monkeypatch.setattr(onnx_backend, "export_onnx", no_export)
    monkeypatch.setattr(onnx_backend, "quantize_int8", no_export)
    fp32 = OnnxEncoder(out, cache_dir=tmp_path / "cache")
    assert fp32._fp32_graph == out / ONNX_FILE and fp32._torch_model is None
    np.testing.assert_allclose(
        fp32.encode(SENTENCES, layers=2), tiny_model.encode(SENTENCES, layers=2, dim=16), atol=1e-5
    )
    int8 = OnnxEncoder(out, quantize="int8", cache_dir=tmp_path / "cache")
    emb = int8.encode(SENTENCES)
    assert (int8.backend, int8.precision) == ("onnx-int8", "int8")
    assert (emb * fp32.encode(SENTENCES)).sum(axis=1).min() > 0.95
    # The cache holds each graph of all layers once (its weights in a data file) and the cut graphs.
    assert {p.name for p in fp32.cache.iterdir() if not p.name.startswith(".")} == {
        "model.onnx",
        "model.onnx_data",
        "layers-2.onnx",
        "layers-3.onnx",
    }
    full = int8_file_name(int8.preset)
    assert {p.name for p in int8.cache.iterdir() if not p.name.startswith(".")} == {
        full,
        f"{full}_data",
        int8.graph_path(3).name,
    }


def test_cut_graphs_refer_to_the_weights_of_the_graph_of_all_layers(tiny_model_dir, tmp_path, tiny_model):
    """The cache holds the weights once: every cut graph refers to the data file of the graph of all
    layers (and runs on its own, as any ONNX Runtime session would load it)."""
    import onnx
    import onnxruntime as ort

    encoder = OnnxEncoder(tiny_model_dir, cache_dir=tmp_path / "cache").warm_up()
    names = {p.name for p in encoder.cache.iterdir() if not p.name.startswith(".")}
    assert names == {"model.onnx", "model.onnx_data"} | {f"layers-{k}.onnx" for k in range(1, 5)}
    features = tiny_model.tokenize(SENTENCES)
    mask = features["attention_mask"].numpy()
    for k in range(1, 5):
        graph = onnx.load(str(encoder.graph_path(k)), load_external_data=False)
        locations = {
            entry.value
            for t in graph.graph.initializer
            for entry in t.external_data
            if entry.key == "location"
        }
        assert locations == {"model.onnx_data"}
        session = ort.InferenceSession(str(encoder.graph_path(k)), providers=["CPUExecutionProvider"])
        hidden = session.run([f"exit_{k}"], {i.name: features[i.name].numpy() for i in session.get_inputs()})
        pooled = (hidden[0] * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
        ref = tiny_model.encode_layers(SENTENCES, [k])[k]
        assert np.abs(pooled - ref).max() <= 1e-5


def test_a_folder_past_the_file_limit_runs_with_external_data(tiny_model, tmp_path, monkeypatch):
    """A folder exported past 2 GiB of weights (here: past 1,000 bytes) has onnx/model.onnx_data."""
    import matryoshka2d.export.onnx as onnx_export

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 1000)
    out = export_model(tiny_model, tmp_path / "big", format="onnx", quantize="int8")
    assert (out / "onnx" / "model.onnx_data").is_file()
    for quantize in (None, "int8"):
        encoder = OnnxEncoder(out, quantize=quantize, cache_dir=tmp_path / "cache")
        assert encoder._fp32_graph == out / ONNX_FILE  # the folder's own graph
        for k in (1, 4):
            ours = encoder.encode(SENTENCES, layers=k, dim=8)
            theirs = tiny_model.encode(SENTENCES, layers=k, dim=8)
            if quantize:
                assert (ours * theirs).sum(axis=1).min() > 0.95
            else:
                np.testing.assert_allclose(ours, theirs, atol=1e-5)


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads Linux's /proc/self/maps")
def test_sessions_of_every_layer_count_map_the_one_data_file(tiny_model_dir, tmp_path):
    """Every new session maps the cached data file (its pages shared with the sessions before it); the
    cut graphs hold no weights of their own, so the file is where every session's weights come from
    (ONNX Runtime's pre-packed matrix copies aside)."""
    encoder = OnnxEncoder(tiny_model_dir, cache_dir=tmp_path / "cache")
    data = str(encoder.cache / "model.onnx_data")

    def mappings() -> int:
        return sum(line.endswith(data) for line in Path("/proc/self/maps").read_text().splitlines())

    counts = [mappings()]
    for k in range(1, encoder.num_layers + 1):
        encoder.session(k)
        counts.append(mappings())
    assert all(after > before for before, after in zip(counts, counts[1:])), counts


def test_damaged_cache_is_rebuilt(tiny_model_dir, tmp_path, tiny_model):
    """A lost or cut-short data file (a crash, a full disk) rebuilds the graph of all layers and drops the
    cut graphs that referred to it; temporary folders a killed builder left are removed."""
    encoder = OnnxEncoder(tiny_model_dir, cache_dir=tmp_path / "cache").warm_up([2, 3])
    data = encoder.cache / "model.onnx_data"
    expected = tiny_model.encode(SENTENCES, layers=2)
    for damage in ("lost", "cut short"):
        if damage == "lost":
            data.unlink()
        else:
            data.write_bytes(data.read_bytes()[:1000])
        leftover = encoder.cache / ".model.onnx.tmp-4194305-killed00"  # a pid past Linux's pid_max
        leftover.mkdir()
        again = OnnxEncoder(tiny_model_dir, cache_dir=tmp_path / "cache")
        np.testing.assert_allclose(again.encode(SENTENCES, layers=2), expected, atol=1e-5)
        assert data.stat().st_size > 1000 and not again.graph_path(3).exists(), damage
        assert not leftover.exists()
        again.warm_up([3])


def test_a_damaged_cut_graph_or_graph_of_all_layers_is_built_again(tiny_model_dir, tmp_path, tiny_model):
    """A cached graph ONNX Runtime cannot parse (a disk error, an edit) was a traceback on every run."""
    OnnxEncoder(tiny_model_dir, cache_dir=tmp_path / "cache").warm_up([2])
    expected = tiny_model.encode(SENTENCES, layers=2)
    again = OnnxEncoder(tiny_model_dir, cache_dir=tmp_path / "cache")
    (again.cache / "layers-2.onnx").write_bytes(b"not a graph")
    with pytest.warns(UserWarning, match="cannot be loaded .* building it again"):
        np.testing.assert_allclose(again.encode(SENTENCES, layers=2), expected, atol=1e-5)
    again = OnnxEncoder(tiny_model_dir, cache_dir=tmp_path / "cache")
    (again.cache / "model.onnx").write_bytes(
        b"not a graph"
    )  # rebuilt with its cut graphs, as a lost data file
    np.testing.assert_allclose(again.encode(SENTENCES, layers=2), expected, atol=1e-5)


@pytest.mark.parametrize("damage", ["graph", "data"])
def test_a_damaged_graph_in_the_model_folder_is_one_clear_error(tiny_model, tmp_path, monkeypatch, damage):
    import matryoshka2d.export.onnx as onnx_export
    from matryoshka2d.errors import ModelLoadError

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 1000)  # weights in model.onnx_data
    out = export_model(tiny_model, tmp_path / "big", format="onnx")
    file = out / "onnx" / ("model.onnx" if damage == "graph" else "model.onnx_data")
    file.write_bytes(file.read_bytes()[:100])
    message = "not a readable ONNX graph" if damage == "graph" else "onnx_data is missing or cut short"
    with pytest.raises(ModelLoadError, match=message):
        OnnxEncoder(out, cache_dir=tmp_path / "cache")


def test_calibration_pads_like_encoding(tiny_model_dir, tmp_path):
    """A tokenizer without a pad token cannot pad itself: int8 calibration used to ask it to (a traceback
    from transformers), where encoding pads the rows itself."""

    model = EmbeddingModel.load(tiny_model_dir)
    model.tokenizer.pad_token = None
    int8 = OnnxEncoder(model.save(tmp_path / "nopad"), quantize="int8", cache_dir=tmp_path / "cache")
    assert int8.tokenizer.pad_token is None
    assert (int8.encode(SENTENCES, layers=2) * model.encode(SENTENCES, layers=2)).sum(1).min() > 0.95


def test_two_encoders_of_different_caches_build_at_once(tiny_model_dir, tmp_path, tiny_model):
    """torch's TorchScript exporter keeps process-wide state: two exports at once used to fail
    (GLOBALS.in_onnx_export must be True)."""
    encoders = [OnnxEncoder(tiny_model_dir, cache_dir=tmp_path / f"cache{i}") for i in range(2)]
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda e: e.encode(SENTENCES, layers=2), encoders))
    for got in results:
        np.testing.assert_allclose(got, tiny_model.encode(SENTENCES, layers=2), atol=1e-5)


def test_int8_from_a_warm_cache_frees_the_torch_weights(tiny_model_dir, tmp_path):
    OnnxEncoder(tiny_model_dir, quantize="int8", cache_dir=tmp_path / "cache").warm_up([1])
    again = OnnxEncoder(tiny_model_dir, quantize="int8", cache_dir=tmp_path / "cache")
    again.encode(SENTENCES, layers=1)
    assert again._torch_model is None


def test_a_shipped_data_file_behind_a_symbolic_link(tiny_model, tmp_path, monkeypatch):
    """Hub snapshots (and git-annex, DVC) hold files as symbolic links: onnx refuses external data read
    through one, so the backend copies the files as bytes."""
    import matryoshka2d.export.onnx as onnx_export

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 1000)
    out = export_model(tiny_model, tmp_path / "big", format="onnx", quantize="int8")
    for name in ("model.onnx_data", f"{int8_file_name()}_data"):
        blob = tmp_path / "blobs" / name
        blob.parent.mkdir(exist_ok=True)
        (out / "onnx" / name).rename(blob)
        (out / "onnx" / name).symlink_to(blob)
    expected = tiny_model.encode(SENTENCES, layers=2)
    fp32 = OnnxEncoder(out, cache_dir=tmp_path / "cache")
    np.testing.assert_allclose(fp32.encode(SENTENCES, layers=2), expected, atol=1e-5)
    int8 = OnnxEncoder(out, quantize="int8", cache_dir=tmp_path / "cache")
    assert (int8.encode(SENTENCES, layers=2) * expected).sum(axis=1).min() > 0.95


def test_two_encoders_build_one_cache_at_once(tiny_model_dir, tmp_path, tiny_model):
    """Two encoders (as two processes would: separate objects, one cache folder) build every graph at the
    same time; the cache lock makes one build and the other reuse, both give the right embeddings."""
    encoders = [OnnxEncoder(tiny_model_dir, cache_dir=tmp_path / "cache") for _ in range(2)]
    errors = []

    def build(encoder):
        try:
            encoder.warm_up()
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=build, args=(e,)) for e in encoders]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for encoder in encoders:
        for k in (1, 4):
            expected = tiny_model.encode(SENTENCES, layers=k)
            np.testing.assert_allclose(encoder.encode(SENTENCES, layers=k), expected, atol=1e-5)


def test_concurrent_mixed_calls_equal_sequential(tiny_model_dir, tmp_path):
    calls = [(k, d) for k in (1, 2, 3, 4) for d in (32, 16, 8, 4, 2)]  # 20 mixed calls
    sequential = OnnxEncoder(tiny_model_dir, cache_dir=tmp_path / "a")
    expected = [sequential.encode(SENTENCES, layers=k, dim=d) for k, d in calls]
    shared = OnnxEncoder(tiny_model_dir, cache_dir=tmp_path / "b")  # graphs are built during the race
    results: dict[tuple[int, int], list[np.ndarray]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def worker(t: int) -> None:
        try:
            start.wait()
            order = calls[t * 5 :] + calls[: t * 5]  # each thread starts elsewhere
            for k, d in order:
                results.setdefault((t, k, d), []).append(shared.encode(SENTENCES, layers=k, dim=d))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for t in range(4):
        for (k, d), want in zip(calls, expected):
            np.testing.assert_array_equal(results[(t, k, d)][0], want)


def test_onnx_bad_input_is_refused_like_torch(onnx_encoder):
    with pytest.raises(InvalidLayersError, match="layers"):
        onnx_encoder.encode(SENTENCES, layers=5)
    with pytest.raises(InvalidDimError, match="dim"):
        onnx_encoder.encode(SENTENCES, dim=33)
    with pytest.raises(InvalidInputError):
        onnx_encoder.encode(["ok", 3])


def test_onnx_forward_takes_one_layer_count_like_torch(onnx_encoder, tiny_model):
    features = onnx_encoder.pad(onnx_encoder.tokenize(SENTENCES[:3], padding=False), [0, 1, 2])
    one = onnx_encoder.forward(features, 3)
    assert list(one) == [3]
    np.testing.assert_array_equal(one[3], onnx_encoder.forward(features, [3])[3])
    assert list(onnx_encoder.forward(features)) == [onnx_encoder.num_layers]
    assert list(
        tiny_model.forward(tiny_model.pad(tiny_model.tokenize(SENTENCES[:3], padding=False), [0, 1, 2]), 3)
    ) == [3]


def test_onnx_max_seq_length_is_checked_when_set(onnx_encoder):
    with pytest.raises(InvalidInputError, match="has 64 position embeddings, so 1..64"):
        onnx_encoder.max_seq_length = 1000
    onnx_encoder.max_seq_length = 8
    np.testing.assert_allclose(np.linalg.norm(onnx_encoder.encode(SENTENCES[:2]), axis=1), 1.0, rtol=1e-5)


def test_an_unwritable_cache_folder_is_one_clear_error(tiny_model_dir, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder would go")
    with pytest.raises(ModelLoadError, match="cannot build ONNX graphs in .*M2D_CACHE_DIR"):
        OnnxEncoder(tiny_model_dir, cache_dir=blocker).encode(SENTENCES[:2])


def test_load_encoder_picks_the_backend(tiny_model_dir):
    assert BACKENDS == ("torch", "onnx", "onnx-int8")
    torch_model = load_encoder(tiny_model_dir, dtype="bfloat16")
    assert isinstance(torch_model, EmbeddingModel) and torch_model.precision == "bfloat16"
    assert isinstance(load_encoder(tiny_model_dir, "onnx-int8", dtype="auto"), OnnxEncoder)
    with pytest.raises(InvalidInputError, match="'tensorrt'"):
        load_encoder(tiny_model_dir, "tensorrt")
    with pytest.raises(InvalidInputError, match="'bfloat16' is for the torch backend"):
        load_encoder(tiny_model_dir, "onnx", dtype="bfloat16")
    with pytest.raises(InvalidInputError, match="runs on the CPU"):
        load_encoder(tiny_model_dir, "onnx", device="cuda")


def test_cli_runtime_choices_match_the_library():
    from matryoshka2d.cli.common import DTYPES, RUNTIMES
    from matryoshka2d.model import DTYPES as MODEL_DTYPES

    assert RUNTIMES == BACKENDS and DTYPES == MODEL_DTYPES


def test_grid_evaluation_and_search_accept_the_onnx_backend(onnx_encoder, tiny_model, sts_file):
    from matryoshka2d.data import load_sts
    from matryoshka2d.evaluation import evaluate_sts
    from matryoshka2d.search import SearchIndex

    data = load_sts(sts_file)
    ours = evaluate_sts(onnx_encoder, data, [1, 4], [32, 8]).to_dict()["spearman"]
    ref = evaluate_sts(tiny_model, data, [1, 4], [32, 8]).to_dict()["spearman"]
    np.testing.assert_allclose(ours, ref, atol=1e-6)
    index = SearchIndex.from_model(onnx_encoder, SENTENCES, shortlist_dim=8)
    hits = index.search_texts(tiny_model, SENTENCES[:3], k=1)
    assert [str(row[0]) for row in hits.ids] == ["0", "1", "2"]


def test_cli_runtime_and_dtype(tiny_model_dir, sts_file, tmp_path, capsys):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(SENTENCES) + "\n")
    out = tmp_path / "e.npy"
    argv = ["encode", str(tiny_model_dir), "--input", str(texts), "--layers", "2", "--out", str(out)]
    assert main([*argv, "--runtime", "onnx"]) == 0
    assert "embeddings to" in (printed := capsys.readouterr().out) and "(onnx float32)" in printed
    np.testing.assert_allclose(
        np.load(out), EmbeddingModel.load(tiny_model_dir).encode(SENTENCES, layers=2), atol=1e-5
    )
    grid = tmp_path / "grid.json"
    argv = ["eval-sts", str(tiny_model_dir), "--data", str(sts_file), "--json", str(grid)]
    assert main([*argv, "--dtype", "bfloat16"]) == 0
    assert "torch bfloat16" in capsys.readouterr().out
    record = json.loads(grid.read_text())
    assert (record["backend"], record["dtype"]) == ("torch", "bfloat16")
    assert main([*argv, "--runtime", "onnx", "--dtype", "float16", "--overwrite"]) == 2
    assert "'float16' is for the torch backend" in capsys.readouterr().err


def test_cli_compile(tiny_model_dir, tmp_path, capsys):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(SENTENCES) + "\n")
    out = tmp_path / "e.npy"
    argv = ["encode", str(tiny_model_dir), "--input", str(texts), "--layers", "2", "--out", str(out)]
    assert main([*argv, "--compile"]) == 0
    assert "(torch float32 compiled)" in capsys.readouterr().out
    np.testing.assert_allclose(
        np.load(out), EmbeddingModel.load(tiny_model_dir).encode(SENTENCES, layers=2), atol=1e-5
    )
    assert main([*argv, "--runtime", "onnx", "--compile", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "compile is for the torch backend" in err and len(err.strip().splitlines()) == 1
    assert load_encoder(tiny_model_dir, compile=True).compiled
    assert not load_encoder(tiny_model_dir).compiled


def test_onnx_applies_the_folders_default_prompt(tiny_model_dir, tmp_path):
    from test_model import prompted_copy

    folder = prompted_copy(tiny_model_dir, tmp_path / "prompted", {"query": "query: "}, "query")
    torch_model = load_encoder(folder)
    onnx = OnnxEncoder(folder, cache_dir=tmp_path / "cache")
    assert onnx.prompt == "query: "
    assert np.abs(onnx.encode(SENTENCES, layers=2) - torch_model.encode(SENTENCES, layers=2)).max() <= 1e-5


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_workers_give_the_embeddings_of_one_worker(tiny_model_dir, tmp_path, backend):
    """Parts of a chunk encoded at once on 2-3 threads (one runtime thread each): the same embeddings in
    input order, at every requested cell, with a prompt too."""
    import torch

    if backend == "torch":
        encoder = EmbeddingModel.load(tiny_model_dir)
    else:
        encoder = OnnxEncoder(tiny_model_dir, cache_dir=tmp_path / "cache", threads=1)
    texts = [f"{s} {i}" for i, s in enumerate(SENTENCES * 3)]
    expected = encoder.encode_layers(texts, layers=[1, 4], batch_size=4)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for workers in (2, 3):
            got = encoder.encode_layers(texts, layers=[1, 4], batch_size=4, workers=workers)
            for k in (1, 4):
                np.testing.assert_allclose(got[k], expected[k], atol=1e-5)
            np.testing.assert_allclose(
                encoder.encode(texts, layers=2, dim=8, prompt="query: ", workers=workers),
                encoder.encode(texts, layers=2, dim=8, prompt="query: "),
                atol=1e-5,
            )
    finally:
        torch.set_num_threads(threads)
