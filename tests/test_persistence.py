"""Model folders: sentence-transformers compatibility, truncated export, atomic save, load errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import SENTENCES, build_tiny_model, tiny_transformer, write_vocab

from matryoshka2d import EmbeddingModel, ModelLoadError
from matryoshka2d.errors import OutputPathError
from matryoshka2d.persistence import OUTPUT_MARKER, atomic_directory, atomic_write


def st_encode(folder, texts):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(folder), device="cpu").encode(texts)


def test_saved_folder_loads_in_sentence_transformers_with_same_embeddings(tiny_model, tmp_path):
    out = tiny_model.save(tmp_path / "saved")
    np.testing.assert_allclose(st_encode(out, SENTENCES), tiny_model.encode(SENTENCES), atol=1e-5)
    again = EmbeddingModel.load(out)
    np.testing.assert_allclose(again.encode(SENTENCES), tiny_model.encode(SENTENCES), atol=1e-6)
    assert (again.pooling_mode, again.max_seq_length) == (tiny_model.pooling_mode, tiny_model.max_seq_length)


@pytest.mark.parametrize("layers,dim", [(2, 16), (1, 32), (4, 8)])
def test_truncated_export_matches_encode_in_sentence_transformers(tiny_model, tmp_path, layers, dim):
    full = tiny_model.save(tmp_path / "full")
    out = tiny_model.truncate(layers=layers, dim=dim).save(tmp_path / "small")
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == layers
    expected = tiny_model.encode(SENTENCES, layers=layers, dim=dim)
    theirs = st_encode(out, SENTENCES)
    assert theirs.shape == (len(SENTENCES), dim)
    assert np.abs(theirs - expected).max() <= 1e-5
    reloaded = EmbeddingModel.load(out)
    assert (reloaded.num_layers, reloaded.dim) == (layers, dim)
    assert np.abs(reloaded.encode(SENTENCES) - expected).max() <= 1e-5
    if layers < 4:
        assert (out / "model.safetensors").stat().st_size < (full / "model.safetensors").stat().st_size


def test_folder_without_normalize_round_trips_unchanged(tiny_model, tmp_path):
    out = tiny_model.save(tmp_path / "with")
    modules = json.loads((out / "modules.json").read_text())
    (out / "modules.json").write_text(json.dumps([m for m in modules if not m["type"].endswith("Normalize")]))
    raw = st_encode(out, SENTENCES)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0)
    model = EmbeddingModel.load(out)
    assert model.normalize is False
    np.testing.assert_allclose(model.encode(SENTENCES, normalize=False), raw, atol=1e-5)
    again = model.save(tmp_path / "again")
    assert not any(m["type"].endswith("Normalize") for m in json.loads((again / "modules.json").read_text()))
    np.testing.assert_allclose(st_encode(again, SENTENCES), raw, atol=1e-5)
    small = model.truncate(dim=8).save(tmp_path / "small")  # a dim prefix is re-normalised, as encode() does
    np.testing.assert_allclose(st_encode(small, SENTENCES), model.encode(SENTENCES, dim=8), atol=1e-5)
    # Every truncate() export normalises, as encode() does by default, also at full dim.
    for layers, dim in [(2, None), (None, None)]:
        export = model.truncate(layers=layers, dim=dim).save(tmp_path / f"export-{layers}-{dim}")
        expected = model.encode(SENTENCES, layers=layers, dim=dim)
        assert np.abs(st_encode(export, SENTENCES) - expected).max() <= 1e-5


def test_do_lower_case_round_trips(tmp_path):
    model = build_tiny_model(tmp_path / "b")
    model.do_lower_case = True
    out = model.save(tmp_path / "m")
    assert json.loads((out / "sentence_bert_config.json").read_text())["do_lower_case"] is True
    reloaded = EmbeddingModel.load(out)
    assert reloaded.do_lower_case is True
    np.testing.assert_allclose(reloaded.encode(["A CAT"]), reloaded.encode(["a cat"]), atol=1e-6)


def test_do_lower_case_keeps_special_tokens_as_sentence_transformers_does(tmp_path):
    """sentence-transformers 6 lower-cases in the tokenizer's normaliser, after the special tokens are
    split off; lower-casing the text first turned a literal [MASK] into unknown word pieces."""
    from tokenizers import AddedToken
    from transformers import BertTokenizerFast

    tokenizer = BertTokenizerFast(vocab=str(write_vocab(tmp_path)), model_max_length=48, do_lower_case=False)
    tokenizer.add_tokens([AddedToken("[ENT]", normalized=False)])  # not normalised: kept as it is too
    model = EmbeddingModel(tiny_transformer("bert", len(tokenizer)).eval(), tokenizer, do_lower_case=True)
    texts = ["the [MASK] sat on the mat", "A CAT [SEP] a dog", "A cat sat on the mat", "a [ENT] CAR"]
    tokens = [
        tokenizer.convert_ids_to_tokens(ids) for ids in model.tokenize(texts, padding=False)["input_ids"]
    ]
    assert tokens[0][:3] == ["[CLS]", "the", "[MASK]"]
    assert tokens[1][:5] == ["[CLS]", "a", "cat", "[SEP]", "a"] and tokens[3][1:3] == ["a", "[ENT]"]
    out = model.save(tmp_path / "m")
    np.testing.assert_allclose(st_encode(out, texts), model.encode(texts), atol=1e-5)


def test_do_lower_case_lower_cases_characters_one_by_one_as_sentence_transformers_does(tmp_path):
    """Python's str.lower() turns a final capital sigma into ς; the tokenizers Lowercase normaliser that
    sentence-transformers 6 uses gives σ (another token)."""
    from transformers import BertTokenizerFast

    vocab = write_vocab(tmp_path)
    with open(vocab, "a", encoding="utf-8") as f:
        f.write("οδος\nοδοσ\n")
    tokenizer = BertTokenizerFast(vocab=str(vocab), model_max_length=48, do_lower_case=False)
    vocab_size = max(tokenizer.get_vocab().values()) + 1
    model = EmbeddingModel(tiny_transformer("bert", vocab_size).eval(), tokenizer, do_lower_case=True)
    (ids,) = model.tokenize(["ΟΔΟΣ"], padding=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == ["[CLS]", "οδοσ", "[SEP]"]
    texts = ["ΟΔΟΣ", "the CAT [SEP] sat"]
    out = model.save(tmp_path / "m")
    np.testing.assert_allclose(st_encode(out, texts), model.encode(texts), atol=1e-5)


def test_saving_a_bfloat16_model_warns_that_its_weights_were_rounded(tmp_path):
    model = EmbeddingModel.load(build_tiny_model(tmp_path / "b").save(tmp_path / "f32"), dtype="bfloat16")
    with pytest.warns(UserWarning, match="saving bfloat16 weights"):
        model.truncate(layers=2).save(tmp_path / "bf16")


def test_saved_folder_has_normal_permissions(tiny_model, tmp_path):
    out = tiny_model.save(tmp_path / "m")
    assert out.stat().st_mode & 0o055 == 0o055  # readable by group and others (mkdtemp alone gives 0700)


def test_export_file_size_shrinks_with_layers(tmp_path):
    model = build_tiny_model(tmp_path / "b", num_layers=4)
    sizes = [
        model.truncate(layers=k).save(tmp_path / f"k{k}").joinpath("model.safetensors").stat().st_size
        for k in (1, 2, 4)
    ]
    assert sizes[0] < sizes[1] < sizes[2]


def test_save_is_atomic(tiny_model, tmp_path, monkeypatch):
    target = tiny_model.save(tmp_path / "model")
    before = sorted(p.name for p in target.iterdir())

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("matryoshka2d.model.write_folder", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        tiny_model.save(target, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary folder left behind
    with pytest.raises(RuntimeError):
        tiny_model.save(tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_atomic_directory_replaces_its_own_output_only_with_overwrite(tmp_path):
    with atomic_directory(tmp_path / "d", "thing") as tmp:
        (tmp / "old.txt").write_text("old")
    with pytest.raises(OutputPathError, match="holds a thing written by matryoshka2d: pass --overwrite"):
        with atomic_directory(tmp_path / "d", "thing") as tmp:
            (tmp / "new.txt").write_text("new")
    with atomic_directory(tmp_path / "d", "thing", overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == [OUTPUT_MARKER, "new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["d"]


def _record_fsyncs_and_renames(monkeypatch) -> list[tuple[str, str]]:
    """("fsync", path) and ("replace", source) in the order they happen, process-wide."""
    import os

    events: list[tuple[str, str]] = []
    fsync, replace = os.fsync, os.replace

    def recording_fsync(fd):
        events.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}")))
        return fsync(fd)

    def recording_replace(src, dst, **kwargs):
        events.append(("replace", os.path.realpath(src)))
        return replace(src, dst, **kwargs)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    return events


@pytest.mark.skipif(not __import__("os").path.isdir("/proc/self/fd"), reason="reads fds via /proc (Linux)")
def test_atomic_outputs_are_on_disk_before_their_rename(tmp_path, monkeypatch):
    """A power loss after the rename must not leave a complete-looking name on a short file: every file
    is fsynced before the rename that gives it its name (and the folder after it)."""
    events = _record_fsyncs_and_renames(monkeypatch)
    out = atomic_write(tmp_path / "a.json", '{"x": 1}', "JSON")
    (replaced,) = [i for i, (what, _) in enumerate(events) if what == "replace"]
    tmp = events[replaced][1]
    assert ("fsync", tmp) in events[:replaced] and ("fsync", str(tmp_path)) in events[replaced:]
    assert out.read_text() == '{"x": 1}' and out.stat().st_mode & 0o777 == 0o666 & ~_umask_now()

    events.clear()
    with atomic_directory(tmp_path / "d", "thing") as folder:
        (folder / "sub").mkdir()
        (folder / "sub" / "weights.bin").write_bytes(b"w" * 1000)
        (folder / "config.json").write_text("{}")
        written = {str(p.resolve()) for p in folder.rglob("*") if p.is_file()}
        written |= {str(folder.resolve() / OUTPUT_MARKER), str(folder.resolve())}  # the marker comes later
    renames = [i for i, (what, _) in enumerate(events) if what == "replace"]
    synced = {path for what, path in events[: renames[-1]] if what == "fsync"}
    assert len(written) == 4 and written <= synced


def test_a_dangling_link_among_the_users_files_does_not_break_a_save(tmp_path):
    """Files a user keeps in an output folder are carried over into the new one (see the search index);
    flushing the new folder must not follow a link whose target is gone."""
    import os

    with atomic_directory(tmp_path / "d", "thing") as folder:
        (folder / "a.txt").write_text("a")
        os.symlink(tmp_path / "gone", folder / "notes.txt")
    assert (tmp_path / "d" / "notes.txt").is_symlink() and (tmp_path / "d" / "a.txt").read_text() == "a"


def _umask_now() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_reading_the_umask_leaves_it_alone():
    import os

    from matryoshka2d.persistence import _umask

    before = _umask_now()
    try:
        os.umask(0o027)
        assert _umask() == 0o027 and _umask_now() == 0o027
    finally:
        os.umask(before)


def test_plain_transformers_folder_uses_mean_pooling(tiny_model, tmp_path):
    folder = tmp_path / "plain"
    tiny_model.transformer.save_pretrained(folder)
    tiny_model.tokenizer.save_pretrained(folder)
    model = EmbeddingModel.load(folder)
    assert model.pooling_mode == "mean"
    np.testing.assert_allclose(model.encode(SENTENCES), tiny_model.encode(SENTENCES), atol=1e-6)


def test_new_style_pooling_config_and_cls(tiny_model, tmp_path):
    out = tiny_model.save(tmp_path / "m")
    (out / "1_Pooling" / "config.json").write_text(
        json.dumps({"embedding_dimension": 32, "pooling_mode": "cls"})
    )
    model = EmbeddingModel.load(out)
    assert model.pooling_mode == "cls"
    np.testing.assert_allclose(model.encode(SENTENCES), st_encode(out, SENTENCES), atol=1e-5)


@pytest.mark.parametrize("mode", ["max", "mean_sqrt_len_tokens", "weightedmean", "lasttoken", "cls"])
def test_pooling_modes_match_sentence_transformers(tmp_path, mode):
    model = build_tiny_model(tmp_path / "b", pooling_mode=mode)
    out = model.save(tmp_path / "m")
    assert EmbeddingModel.load(out).pooling_mode == mode
    np.testing.assert_allclose(model.encode(SENTENCES), st_encode(out, SENTENCES), atol=1e-5)


def test_projecting_dense_module_is_refused(tiny_model, tmp_path):
    import torch
    from safetensors.torch import save_file

    out = tiny_model.truncate(dim=16).save(tmp_path / "m")
    save_file({"linear.weight": torch.randn(16, 32)}, str(out / "2_Dense" / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="Dense"):
        EmbeddingModel.load(out)


def test_load_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        EmbeddingModel.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="not a model folder"):
        EmbeddingModel.load(tmp_path / "empty")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ModelLoadError, match="not a model folder"):
        EmbeddingModel.load(tmp_path / "file.txt")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "modules.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="modules.json"):
        EmbeddingModel.load(tmp_path / "broken")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ModelLoadError, match="noweights"):
        EmbeddingModel.load(tmp_path / "noweights")


def test_missing_tokenizer_and_corrupt_weights(tiny_model, tmp_path):
    out = tiny_model.save(tmp_path / "notok")
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (out / name).unlink(missing_ok=True)
    with pytest.raises(ModelLoadError, match="tokenizer"):
        EmbeddingModel.load(out)
    out = tiny_model.save(tmp_path / "corrupt")
    (out / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match="cannot load the transformer"):
        EmbeddingModel.load(out)


def test_hub_id_offline_gives_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="hub"):
        EmbeddingModel.load("nobody-here/no-such-model-xyz")


def test_hub_id_downloads_only_the_pytorch_files(tiny_model_dir, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(tiny_model_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model = EmbeddingModel.load("someone/tiny-model")
    assert model.num_layers == 4
    (repo_id, kwargs), *_ = calls
    assert repo_id == "someone/tiny-model"
    assert {"onnx/*", "openvino/*", "tf_model*"} <= set(kwargs["ignore_patterns"])


def test_loads_and_saves_from_many_threads_leave_the_process_settings_alone(tiny_model_dir, tmp_path):
    """transformers' verbosity and the warnings filters are the process's: saves and loads that change
    them for a while run under one lock, so overlapping ones cannot leave them changed."""
    import warnings
    from concurrent.futures import ThreadPoolExecutor

    from transformers.utils import logging as hf_logging

    verbosity, filters = hf_logging.get_verbosity(), list(warnings.filters)

    def work(i):
        for j in range(3):
            EmbeddingModel.load(tiny_model_dir).save(tmp_path / f"m{i}-{j}")

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(work, range(4)))  # re-raises a worker's error
    assert hf_logging.get_verbosity() == verbosity and list(warnings.filters) == filters
