"""Exit rotations: fitting, applying at every entry point (encode, ONNX, server engine), saving, exporting
to sentence-transformers, and the ``m2d rotate`` command."""

from __future__ import annotations

import itertools
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from conftest import FAMILIES, SENTENCES, WORDS
from safetensors.torch import save_file

from matryoshka2d import EmbeddingModel, InvalidInputError, InvalidLayersError
from matryoshka2d.cli import main
from matryoshka2d.errors import ModelLoadError
from matryoshka2d.exit_rotations import fit_exit_rotations, principal_rotation
from matryoshka2d.persistence import EXIT_ROTATIONS_FILE

# 60 distinct training sentences (the tiny models are 32 wide: a fit needs at least 32).
TRAIN = [" ".join(words) for words in itertools.islice(itertools.permutations(WORDS[:12], 4), 0, 6000, 100)]


@pytest.fixture
def rotated(tiny_model):
    tiny_model.set_exit_rotations(fit_exit_rotations(tiny_model, TRAIN))
    return tiny_model


def energy(embeddings: np.ndarray, d: int) -> float:
    """Mean squared norm of the first d coordinates of unit-length rows."""
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    return float((unit[:, :d] ** 2).sum(axis=1).mean())


def test_principal_rotation_is_orthogonal_ordered_and_deterministic():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 6)) * np.array([0.1, 3.0, 0.2, 1.0, 0.05, 0.5])
    r = principal_rotation(x).double()
    assert torch.allclose(r @ r.T, torch.eye(6, dtype=torch.float64), atol=1e-6)
    assert abs(r[0, 1]) > 0.99 and abs(r[1, 3]) > 0.95  # largest spread first, then the next
    assert r[0, 1] > 0  # sign convention: the largest entry of each row is positive
    assert torch.equal(principal_rotation(x), principal_rotation(x.copy()))
    with pytest.raises(InvalidInputError, match="non-empty"):
        principal_rotation(np.zeros((0, 6)))


def test_fit_rotates_prior_exits_keeps_full_cosines_and_concentrates_small_dims(tiny_model):
    before = tiny_model.encode_layers(TRAIN)
    rotations = fit_exit_rotations(tiny_model, TRAIN)
    assert sorted(rotations) == [1, 2, 3]  # every exit but the last (4)
    tiny_model.set_exit_rotations(rotations)
    after = tiny_model.encode_layers(TRAIN)
    for k in (1, 2, 3):
        # a rotation: full-size cosines unchanged
        full_before = tiny_model_cosines(before[k])
        assert np.abs(full_before - tiny_model_cosines(after[k])).max() < 1e-5
        # the first 4 of 32 dims hold at least as much of each unit vector as the unrotated prefix, and more
        assert energy(after[k], 4) > energy(before[k], 4) + 0.01
    assert np.array_equal(after[4], before[4])  # the last exit is untouched


def tiny_model_cosines(embeddings: np.ndarray) -> np.ndarray:
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    return unit @ unit.T


def test_refitting_a_rotated_model_gives_the_same_rotation(rotated):
    again = fit_exit_rotations(rotated, TRAIN)
    for k, matrix in rotated.exit_rotations.items():
        # the leading directions (the ones small dims keep); the trailing ones have near-equal eigenvalues
        # in a random tiny model and are only defined up to a rotation among themselves
        assert torch.allclose(again[k][:8], matrix[:8], atol=1e-3)
        assert torch.allclose(again[k] @ again[k].T, torch.eye(32), atol=1e-4)


def test_fit_refuses_bad_input(tiny_model):
    with pytest.raises(InvalidInputError, match="at least 32 distinct texts"):
        fit_exit_rotations(tiny_model, SENTENCES * 10)  # 12 distinct
    with pytest.raises(InvalidLayersError):
        fit_exit_rotations(tiny_model, TRAIN, layers=[0])
    with pytest.raises(InvalidLayersError):
        fit_exit_rotations(tiny_model, TRAIN, layers=[5])
    assert sorted(fit_exit_rotations(tiny_model, TRAIN, layers=[4, 2])) == [2, 4]  # the last one on request


def test_set_exit_rotations_refuses_bad_matrices(tiny_model):
    eye = torch.eye(32)
    with pytest.raises(InvalidInputError, match="not an orthogonal matrix"):
        tiny_model.set_exit_rotations({1: 2 * eye})
    with pytest.raises(InvalidInputError, match=r"expected a float \(32, 32\)"):
        tiny_model.set_exit_rotations({1: torch.eye(16)})
    with pytest.raises(InvalidInputError, match="layers 1..4"):
        tiny_model.set_exit_rotations({5: eye})
    with pytest.raises(InvalidInputError, match="must be a dict"):
        tiny_model.set_exit_rotations([eye])
    nan = eye.clone()
    nan[0, 0] = float("nan")
    with pytest.raises(InvalidInputError, match="not an orthogonal"):
        tiny_model.set_exit_rotations({1: nan})
    assert tiny_model.exit_rotations == {}  # a refused call changes nothing
    tiny_model.set_exit_rotations({2: eye})
    tiny_model.set_exit_rotations({})
    assert tiny_model.exit_rotations == {}


def test_rotations_are_saved_and_loaded(rotated, tmp_path):
    out = rotated.save(tmp_path / "rotated")
    assert (out / EXIT_ROTATIONS_FILE).is_file()
    assert not (out / "2_Dense").exists()  # the last exit is not rotated: no Dense module
    loaded = EmbeddingModel.load(out)
    assert sorted(loaded.exit_rotations) == [1, 2, 3]
    for k in range(1, 5):
        for d in (32, 8, 4):
            expected = rotated.encode(SENTENCES, layers=k, dim=d)
            assert np.abs(loaded.encode(SENTENCES, layers=k, dim=d) - expected).max() < 1e-6


def test_rotation_changes_small_dims_only_where_fitted(tiny_model, rotated_copy):
    for k in (1, 2, 3):
        plain = tiny_model.encode(SENTENCES, layers=k, dim=4)
        assert np.abs(rotated_copy.encode(SENTENCES, layers=k, dim=4) - plain).max() > 1e-3
    assert np.abs(rotated_copy.encode(SENTENCES, dim=4) - tiny_model.encode(SENTENCES, dim=4)).max() == 0


@pytest.fixture
def rotated_copy(tiny_model_dir):
    model = EmbeddingModel.load(tiny_model_dir)
    model.set_exit_rotations(fit_exit_rotations(model, TRAIN))
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_exports_rotations_to_sentence_transformers(tiny_model_dirs, tmp_path, family):
    from sentence_transformers import SentenceTransformer

    model = EmbeddingModel.load(tiny_model_dirs[family])
    model.set_exit_rotations(fit_exit_rotations(model, TRAIN))
    out = model.truncate(layers=3, dim=16).save(tmp_path / family)
    theirs = SentenceTransformer(str(out), device="cpu").encode(SENTENCES)
    assert np.abs(theirs - model.encode(SENTENCES, layers=3, dim=16)).max() <= 1e-5


@pytest.mark.parametrize("dim", [8, 32])
def test_truncated_rotated_model_gives_our_embeddings_in_sentence_transformers(rotated, tmp_path, dim):
    from sentence_transformers import SentenceTransformer

    out = rotated.truncate(layers=2, dim=dim).save(tmp_path / "small")
    weight_file = out / "2_Dense" / "model.safetensors"
    assert weight_file.is_file()  # exit 2's rotation (its first dim rows) as a Dense module
    ours = rotated.encode(SENTENCES, layers=2, dim=dim)
    theirs = SentenceTransformer(str(out), device="cpu").encode(SENTENCES)
    assert np.abs(theirs - ours).max() <= 1e-5
    reloaded = EmbeddingModel.load(out)  # our loader reads the rotating Dense back (completed to square)
    assert reloaded.num_layers == 2 and reloaded.dim == dim
    assert sorted(reloaded.exit_rotations) == [1, 2]
    assert np.abs(reloaded.encode(SENTENCES) - ours).max() <= 1e-5
    assert (
        np.abs(reloaded.encode(SENTENCES, layers=1, dim=4) - rotated.encode(SENTENCES, layers=1, dim=4)).max()
        <= 1e-5
    )


def test_onnx_backend_and_export_apply_the_rotations(rotated, tmp_path):
    from test_export import st_onnx_encode

    from matryoshka2d.backends.onnx import OnnxEncoder
    from matryoshka2d.export import export_model

    folder = rotated.save(tmp_path / "rotated")
    onnx = OnnxEncoder(folder, cache_dir=tmp_path / "cache")
    for k in (1, 3, 4):
        expected = rotated.encode(SENTENCES, layers=k, dim=8)
        assert np.abs(onnx.encode(SENTENCES, layers=k, dim=8) - expected).max() <= 1e-4
    out = export_model(rotated, tmp_path / "onnx-export", layers=3, dim=16, format="onnx")
    expected = rotated.encode(SENTENCES, layers=3, dim=16)
    assert np.abs(st_onnx_encode(out, SENTENCES) - expected).max() <= 1e-4
    # our ONNX backend on the exported folder (its own onnx/model.onnx, the rotation in its Dense module)
    exported_onnx = OnnxEncoder(out, cache_dir=tmp_path / "cache")
    assert np.abs(exported_onnx.encode(SENTENCES) - expected).max() <= 1e-4
    assert (
        np.abs(
            exported_onnx.encode(SENTENCES, layers=1, dim=4) - rotated.encode(SENTENCES, layers=1, dim=4)
        ).max()
        <= 1e-4
    )


def test_server_engine_applies_the_rotations(rotated):
    from matryoshka2d.serving import BatchingEngine

    engine = BatchingEngine(rotated, max_batch_tokens=64, max_batch_size=4).start()
    try:
        for k, d in ((1, 4), (2, 8), (4, 32)):
            expected = rotated.encode(SENTENCES, layers=k, dim=d)
            assert np.abs(engine.encode(SENTENCES, k, d) - expected).max() <= 1e-5
    finally:
        engine.stop()


def test_rotated_model_is_thread_safe(rotated):
    cells = [(k, d) for k in (1, 2, 3, 4) for d in (4, 16)]
    expected = {cell: rotated.encode(SENTENCES, layers=cell[0], dim=cell[1]) for cell in cells}
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda c: (c, rotated.encode(SENTENCES, layers=c[0], dim=c[1])), cells * 6))
    for cell, emb in results:
        assert np.abs(emb - expected[cell]).max() <= 1e-6


def test_load_refuses_bad_rotation_files(rotated, tmp_path):
    out = rotated.save(tmp_path / "rotated")
    save_file({"layers_1": 2 * torch.eye(32)}, str(out / EXIT_ROTATIONS_FILE))
    with pytest.raises(ModelLoadError, match="not an orthogonal"):
        EmbeddingModel.load(out)
    save_file({"layer-one": torch.eye(32)}, str(out / EXIT_ROTATIONS_FILE))
    with pytest.raises(ModelLoadError, match="unexpected entry 'layer-one'"):
        EmbeddingModel.load(out)
    (out / EXIT_ROTATIONS_FILE).write_bytes(b"not safetensors")
    with pytest.raises(ModelLoadError, match="cannot read the exit rotations"):
        EmbeddingModel.load(out)
    # a Dense module whose rows are not orthonormal is still refused
    small = rotated.truncate(layers=2, dim=8).save(tmp_path / "small")
    save_file({"linear.weight": torch.ones(8, 32)}, str(small / "2_Dense" / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="Dense modules that project embeddings are not supported"):
        EmbeddingModel.load(small)
    # the last exit rotated twice (Dense module and rotation file)
    small = rotated.truncate(layers=2, dim=8).save(tmp_path / "small2")
    save_file({"layers_2": torch.eye(32)}, str(small / EXIT_ROTATIONS_FILE))
    with pytest.raises(ModelLoadError, match="rotated twice"):
        EmbeddingModel.load(small)


def test_cli_rotate(tiny_model_dir, tmp_path, capsys):
    texts = tmp_path / "train.tsv"
    texts.write_text(
        "anchor\tpositive\n" + "".join(f"{a}\t{a} outside\n" for a in TRAIN[:20]), encoding="utf-8"
    )
    out = tmp_path / "rotated"
    argv = [
        "rotate",
        str(tiny_model_dir),
        "--texts",
        str(texts),
        "--column",
        "anchor",
        "--column",
        "positive",
    ]
    assert main([*argv, "--layers", "1,2", "--out", str(out)]) == 0
    assert "rotated layer exits 1, 2 (fitted on 40 texts)" in capsys.readouterr().out
    model = EmbeddingModel.load(out)
    assert sorted(model.exit_rotations) == [1, 2]
    assert json.loads((out / "matryoshka2d.json").read_text())["exit_rotations"]["texts"] == 40
    # one column only: 20 texts, fewer than the 32 dims: a one-line error, nothing written
    bad = tmp_path / "bad"
    assert (
        main(["rotate", str(tiny_model_dir), "--texts", str(texts), "--column", "anchor", "--out", str(bad)])
        == 2
    )
    assert "at least 32 distinct texts" in capsys.readouterr().err
    assert not bad.exists()
    # the output folder is checked before any work: the model folder itself is refused
    assert main([*argv, "--out", str(tiny_model_dir)]) == 2
    assert "error" in capsys.readouterr().err.lower()
    # --max-texts caps the fit (a fixed sample)
    assert main([*argv, "--max-texts", "10", "--out", str(tmp_path / "few")]) == 2
    assert "got 10" in capsys.readouterr().err


def test_refitting_composes_with_the_existing_rotation(tiny_model):
    """A second fit (other texts) acts on the already rotated output: the result is R_new @ R_old."""
    tiny_model.set_exit_rotations(fit_exit_rotations(tiny_model, TRAIN[:40], layers=[2]))
    rotated_once = tiny_model.encode_layers(SENTENCES, [2])[2]
    second_fit = principal_rotation(tiny_model.encode_layers(TRAIN[20:], [2])[2]).numpy()
    tiny_model.set_exit_rotations(fit_exit_rotations(tiny_model, TRAIN[20:], layers=2))  # an int is accepted
    assert np.abs(tiny_model.encode_layers(SENTENCES, [2])[2] - rotated_once @ second_fit.T).max() <= 1e-5


def test_rotations_stay_float32_when_the_layers_are_cast(rotated, tmp_path):
    reference = {k: rotated.encode(SENTENCES, layers=k, dim=8) for k in (1, 3)}
    folder = rotated.save(tmp_path / "rotated")
    bf16 = EmbeddingModel.load(folder, dtype="bfloat16")
    assert all(r.dtype == torch.float32 for r in bf16.exit_rotations.values())
    rotated.to(torch.bfloat16)  # cast in place, as a user might
    assert all(r.dtype == torch.float32 for r in rotated.exit_rotations.values())
    for model in (bf16, rotated):
        for k, expected in reference.items():
            cosines = (model.encode(SENTENCES, layers=k, dim=8) * expected).sum(axis=1)
            assert cosines.min() > 0.98  # bf16 layers, the same rotation
    # a cast model still truncates, saves and reloads (its rotations are still orthogonal float32)
    with pytest.warns(UserWarning, match="saving bfloat16 weights"):
        small = rotated.truncate(layers=3, dim=8).save(tmp_path / "small")
    assert sorted(EmbeddingModel.load(small).exit_rotations) == [1, 2, 3]


def test_training_starts_without_the_rotations(rotated, tmp_path):
    from matryoshka2d.training.trainer import TrainConfig, Trainer

    folder = rotated.save(tmp_path / "rotated")
    data = tmp_path / "triplets.tsv"
    data.write_text(
        "anchor\tpositive\tnegative\n" + "".join(f"{a}\t{a} outside\t{b}\n" for a, b in zip(TRAIN, TRAIN[7:]))
    )
    config = TrainConfig.from_dict(
        dict(
            model=str(folder),
            train_data=[str(data)],
            output_dir=str(tmp_path / "out"),
            batch_size=4,
            steps=2,
            save_steps=0,
            progress=False,
        )
    )
    with pytest.warns(UserWarning, match=r"layer exits \[1, 2, 3\] are rotated.*fit new ones"):
        Trainer(config).train()
    assert EmbeddingModel.load(tmp_path / "out").exit_rotations == {}


def test_search_index_rechecks_a_model_whose_rotations_changed(tiny_model):
    from matryoshka2d.search.fingerprint import ModelMismatchError
    from matryoshka2d.search.index import SearchIndex

    index = SearchIndex.from_model(tiny_model, SENTENCES, layers=2, shortlist_dim=8, show_progress=False)
    assert index.search_texts(tiny_model, SENTENCES[2], k=1).ids == [["2"]]
    tiny_model.set_exit_rotations(fit_exit_rotations(tiny_model, TRAIN, layers=[2]))
    with pytest.raises(ModelMismatchError):  # its layer-2 vectors changed: not the model that built the index
        index.search_texts(tiny_model, SENTENCES[2], k=1)


def test_bad_rotation_arguments_are_clear_errors(tiny_model):
    with pytest.raises(InvalidInputError, match=r"expected a float \(32, 32\) rotation matrix, got NoneType"):
        tiny_model.set_exit_rotations({1: None})
    with pytest.raises(InvalidInputError, match="got str"):
        tiny_model.set_exit_rotations({1: "identity"})
    with pytest.raises(InvalidLayersError, match="a layer count or a list"):
        fit_exit_rotations(tiny_model, TRAIN, layers="2")
