"""Issue 13 §1: outputs never destroy what is not ours.

One rule for every writer (matryoshka2d.persistence): a target is replaced only if it is empty or holds a
previous matryoshka2d output of the same kind, and then only with --overwrite / overwrite=True; never an
input, a folder containing an input, a path inside an input folder, or the current folder.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import SENTENCES

from matryoshka2d import EmbeddingModel
from matryoshka2d.cli import main
from matryoshka2d.errors import OutputPathError
from matryoshka2d.persistence import (
    OUTPUT_MARKER,
    atomic_directory,
    atomic_write,
    check_output_file,
    check_output_folder,
    is_npy_file,
    mark_output_folder,
    output_kind,
    remove_stale_temporaries,
)
from matryoshka2d.search import SearchIndex


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes (to show that nothing changed)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path) -> Path:
    """A private copy of the tiny model (tests may point outputs at it)."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "models" / "base"))


@pytest.fixture
def texts_file(tmp_path) -> Path:
    path = tmp_path / "texts.txt"
    path.write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def user_folder(tmp_path) -> Path:
    folder = tmp_path / "mine"
    (folder / "sub").mkdir(parents=True)
    (folder / "notes.txt").write_text("my notes")
    (folder / "sub" / "data.csv").write_text("a,b\n1,2\n")
    return folder


def run(argv: list[str], capsys) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def fail_if_loaded(monkeypatch):
    """Make loading a model fail the test: refusals must come before any work."""

    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded before the output path was checked")

    monkeypatch.setattr(EmbeddingModel, "load", classmethod(loaded))


# ------------------------------------------------------------------------------------ folder outputs
def folder_writers(model: Path, corpus: Path, out: Path) -> dict[str, list]:
    return {
        "truncate": ["truncate", model, "--layers", "2", "--out", out],
        "index build": ["index", "build", model, "--corpus", corpus, "--out", out, "--shortlist-dim", "8"],
    }


@pytest.mark.parametrize("writer", ["truncate", "index build"])
def test_a_folder_holding_other_files_is_never_replaced(
    writer, model_copy, texts_file, user_folder, capsys, monkeypatch
):
    before = snapshot(user_folder)
    fail_if_loaded(monkeypatch)
    for extra in ([], ["--overwrite"]):
        code, err = run(folder_writers(model_copy, texts_file, user_folder)[writer] + extra, capsys)
        assert code == 2
        assert "holding 2 entries (notes.txt, sub/) not written by matryoshka2d" in err
        assert "new or empty folder" in err and len(err.strip().splitlines()) == 1
    assert snapshot(user_folder) == before


@pytest.mark.parametrize("writer", ["truncate", "index build"])
@pytest.mark.parametrize("where", ["model itself", "folder containing the model", "inside the model"])
def test_never_over_into_or_above_an_input(writer, where, model_copy, texts_file, capsys, monkeypatch):
    out = {
        "model itself": model_copy,
        "folder containing the model": model_copy.parent,
        "inside the model": model_copy / "export",
    }[where]
    before = snapshot(model_copy.parent)
    fail_if_loaded(monkeypatch)
    code, err = run(folder_writers(model_copy, texts_file, out)[writer] + ["--overwrite"], capsys)
    assert code == 2
    expected = {
        "model itself": "an input of this command",
        "folder containing the model": "contains",
        "inside the model": "lies inside",
    }[where]
    assert expected in err and str(model_copy) in err
    assert snapshot(model_copy.parent) == before


def test_index_build_never_replaces_the_folder_holding_its_corpus(model_copy, tmp_path, capsys):
    folder = tmp_path / "work"
    folder.mkdir()
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(SENTENCES) + "\n")
    code, err = run(folder_writers(model_copy, corpus, folder)["index build"] + ["--overwrite"], capsys)
    assert code == 2 and "contains" in err and corpus.read_text().startswith(SENTENCES[0])


@pytest.mark.parametrize("target", [".", "..", "{cwd}"])
def test_never_the_current_folder_or_its_ancestors(target, model_copy, tmp_path, capsys, monkeypatch):
    cwd = tmp_path / "here"
    cwd.mkdir()
    (cwd / "keep.txt").write_text("keep")
    monkeypatch.chdir(cwd)
    out = target.format(cwd=cwd)
    code, err = run(["truncate", model_copy, "--layers", "2", "--out", out, "--overwrite"], capsys)
    assert code == 2 and "current folder" in err
    assert (cwd / "keep.txt").read_text() == "keep"


def test_the_current_folder_is_refused_even_when_empty(model_copy, tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    with pytest.raises(OutputPathError, match="is the current folder"):
        EmbeddingModel.load(model_copy).save(".")
    assert not any(empty.iterdir())


def test_a_symbolic_link_to_an_input_is_caught(model_copy, tmp_path, capsys):
    link = tmp_path / "link"
    link.symlink_to(model_copy, target_is_directory=True)
    before = snapshot(model_copy)
    code, err = run(["truncate", model_copy, "--layers", "2", "--out", link, "--overwrite"], capsys)
    assert code == 2 and "an input of this command" in err
    assert snapshot(model_copy) == before


def test_a_previous_output_is_replaced_only_with_overwrite(model_copy, tmp_path, capsys):
    out = tmp_path / "small"
    assert run(["truncate", model_copy, "--layers", "2", "--out", out], capsys)[0] == 0
    assert output_kind(out) == "model"
    code, err = run(["truncate", model_copy, "--layers", "3", "--out", out], capsys)
    assert code == 2 and "already holds a model written by matryoshka2d: pass --overwrite" in err
    assert EmbeddingModel.load(out).num_layers == 2
    assert run(["truncate", model_copy, "--layers", "3", "--out", out, "--overwrite"], capsys)[0] == 0
    assert EmbeddingModel.load(out).num_layers == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models", "small"]  # no temporaries left


def test_an_output_of_another_kind_is_never_replaced(model_copy, texts_file, tmp_path, capsys):
    model_out = tmp_path / "small"
    assert run(["truncate", model_copy, "--layers", "2", "--out", model_out], capsys)[0] == 0
    argv = folder_writers(model_copy, texts_file, model_out)["index build"] + ["--overwrite"]
    code, err = run(argv, capsys)
    assert code == 2 and "holds a matryoshka2d model, not a search-index" in err
    assert EmbeddingModel.load(model_out).num_layers == 2


def test_an_empty_folder_is_written(model_copy, tmp_path, capsys):
    out = tmp_path / "empty"
    out.mkdir()
    assert run(["truncate", model_copy, "--layers", "2", "--out", out], capsys)[0] == 0
    assert EmbeddingModel.load(out).num_layers == 2


def test_outputs_written_before_markers_are_recognised(model_copy, tmp_path):
    legacy = Path(shutil.copytree(model_copy, tmp_path / "legacy"))
    (legacy / OUTPUT_MARKER).unlink()
    assert output_kind(legacy) == "model"  # modules.json + matryoshka2d.json
    with pytest.raises(OutputPathError, match="pass --overwrite"):
        check_output_folder(legacy, "model")
    assert check_output_folder(legacy, "model", overwrite=True) == legacy
    with pytest.raises(OutputPathError, match="not a search-index"):
        check_output_folder(legacy, "search-index", overwrite=True)


def test_index_add_updates_its_own_index_in_place(model_copy, texts_file, tmp_path, capsys):
    out = tmp_path / "index"
    argv = folder_writers(model_copy, texts_file, out)["index build"]
    assert run(argv, capsys)[0] == 0
    more = tmp_path / "more.txt"
    more.write_text("another text\n")
    assert run(["index", "add", out, "--corpus", more], capsys)[0] == 0
    assert len(SearchIndex.load(out)) == len(SENTENCES) + 1


# ------------------------------------------------------------------------------------ the Python API
def test_api_model_save_follows_the_rule(tiny_model, model_copy, tmp_path, user_folder):
    before = snapshot(user_folder)
    with pytest.raises(OutputPathError, match="not written by matryoshka2d"):
        tiny_model.save(user_folder, overwrite=True)
    assert snapshot(user_folder) == before
    loaded = EmbeddingModel.load(model_copy)
    for target in (model_copy, model_copy.parent, model_copy / "sub"):  # the folder its weights came from
        with pytest.raises(OutputPathError, match="input"):
            loaded.save(target, overwrite=True)
    out = loaded.truncate(layers=2).save(tmp_path / "small")
    with pytest.raises(OutputPathError, match="overwrite=True"):
        loaded.save(out)
    loaded.save(out, overwrite=True)
    data = tmp_path / "train.tsv"
    data.write_text("a\tb\n")
    with pytest.raises(OutputPathError, match="contains"):
        loaded.save(tmp_path, overwrite=True, inputs=[data])


def test_api_search_index_save_follows_the_rule(tmp_path, user_folder, model_copy):
    vectors = np.random.default_rng(0).standard_normal((20, 16)).astype(np.float32)
    index = SearchIndex.from_embeddings(vectors, shortlist_dim=8)
    with pytest.raises(OutputPathError, match="not written by matryoshka2d"):
        index.save(user_folder, overwrite=True)
    with pytest.raises(OutputPathError, match="holds a matryoshka2d model, not a search-index"):
        index.save(model_copy, overwrite=True)
    index.save(tmp_path / "ix")
    with pytest.raises(OutputPathError, match="overwrite=True"):
        index.save(tmp_path / "ix")
    index.save(tmp_path / "ix", overwrite=True)
    assert len(SearchIndex.load(tmp_path / "ix")) == 20


def test_a_folder_written_into_over_time_is_marked(tmp_path, user_folder):
    work = mark_output_folder(tmp_path / "work", "demo-work")
    assert output_kind(work) == "demo-work"
    (work / "cache.json").write_text("{}")
    assert mark_output_folder(work, "demo-work") == work and (work / "cache.json").exists()
    with pytest.raises(OutputPathError, match="not written by matryoshka2d"):
        mark_output_folder(user_folder, "demo-work")
    with pytest.raises(OutputPathError, match="not a checkpoints"):
        mark_output_folder(work, "checkpoints")


def test_demo_refuses_bad_folders_before_any_work(tmp_path, user_folder, capsys, monkeypatch):
    import matryoshka2d.demo.experiment as experiment

    def no_work(*args, **kwargs):
        raise AssertionError("the demo started working before checking its folders")

    monkeypatch.setattr(experiment, "load_sts", no_work)
    code, err = run(["demo", "--out", user_folder, "--work", tmp_path / "w"], capsys)
    assert code == 2 and "not written by matryoshka2d" in err
    (tmp_path / "w").mkdir()
    code, err = run(["demo", "--out", tmp_path / "w" / "report", "--work", tmp_path / "w"], capsys)
    assert code == 2 and "lies inside" in err  # the report is never written into the work folder
    code, err = run(["demo", "--out", tmp_path / "r", "--work", user_folder], capsys)
    assert code == 2 and "not written by matryoshka2d" in err
    work = mark_output_folder(tmp_path / "w2", "demo-work")
    code, err = run(["demo", "--out", work.parent, "--work", work], capsys)
    assert code == 2 and "contains" in err  # replacing the report folder would delete the work folder


def test_report_writes_a_new_folder_and_never_over_its_results(tmp_path, capsys):
    from test_report import fake_results

    folder = tmp_path / "demo"
    folder.mkdir()
    results = folder / "results.json"
    results.write_text(json.dumps(fake_results()))
    code, err = run(["report", results, "--out", folder, "--overwrite"], capsys)
    assert code == 2 and "contains" in err and json.loads(results.read_text()) == fake_results()
    out = tmp_path / "redrawn"
    assert run(["report", results, "--out", out], capsys)[0] == 0
    assert (out / "REPORT.md").is_file() and output_kind(out) == "report"
    code, err = run(["report", results, "--out", out], capsys)
    assert code == 2 and "pass --overwrite" in err
    assert run(["report", results, "--out", out, "--overwrite"], capsys)[0] == 0


# ------------------------------------------------------------------------------------ file outputs
def test_encode_never_writes_over_its_input(model_copy, texts_file, capsys, monkeypatch):
    before = texts_file.read_bytes()
    fail_if_loaded(monkeypatch)
    code, err = run(["encode", model_copy, "--input", texts_file, "--out", texts_file, "--overwrite"], capsys)
    assert code == 2 and "an input of this command" in err
    assert texts_file.read_bytes() == before


def test_eval_sts_never_writes_its_json_over_the_data(model_copy, sts_file, capsys, monkeypatch):
    before = sts_file.read_bytes()
    fail_if_loaded(monkeypatch)
    code, err = run(["eval-sts", model_copy, "--data", sts_file, "--json", sts_file, "--overwrite"], capsys)
    assert code == 2 and "an input of this command" in err
    assert sts_file.read_bytes() == before


@pytest.mark.parametrize(
    "argv",
    [
        ["encode", "{model}", "--input", "{texts}", "--out", "{model}/emb.npy"],
        ["eval-sts", "{model}", "--data", "{sts}", "--json", "{model}/grid.json"],
    ],
)
def test_no_file_is_written_into_an_input_folder(argv, model_copy, texts_file, sts_file, capsys, monkeypatch):
    fail_if_loaded(monkeypatch)
    code, err = run([a.format(model=model_copy, texts=texts_file, sts=sts_file) for a in argv], capsys)
    assert code == 2 and "lies inside" in err


@pytest.mark.parametrize(
    "argv",
    [
        ["encode", "{model}", "--input", "{texts}", "--out", "{folder}"],
        ["eval-sts", "{model}", "--data", "{sts}", "--json", "{folder}"],
        ["eval-sts", "{model}", "--data", "{sts}", "--json", "{tmp}/new-folder/"],
        ["search", "{tmp}/index", "--query", "a cat", "--json", "{folder}"],
        ["eval-retrieval", "{model}", "--data", "{sts}", "--json", "{folder}"],
    ],
)
def test_a_folder_as_a_file_output_is_refused_before_the_work(
    argv, model_copy, texts_file, sts_file, tmp_path, user_folder, capsys, monkeypatch
):
    fail_if_loaded(monkeypatch)
    argv = [
        a.format(model=model_copy, texts=texts_file, sts=sts_file, folder=user_folder, tmp=tmp_path)
        for a in argv
    ]
    code, err = run(argv, capsys)
    assert code == 2 and "is a folder: give the path of the" in err
    assert not (tmp_path / "new-folder").exists()


def test_existing_files_need_overwrite_and_must_be_ours(model_copy, texts_file, tmp_path, capsys):
    out = tmp_path / "emb.npy"
    assert run(["encode", model_copy, "--input", texts_file, "--out", out], capsys)[0] == 0
    first = out.read_bytes()
    code, err = run(["encode", model_copy, "--input", texts_file, "--out", out, "--layers", "1"], capsys)
    assert code == 2 and "already exists" in err and "--overwrite" in err and out.read_bytes() == first
    assert (
        run(
            ["encode", model_copy, "--input", texts_file, "--out", out, "--layers", "1", "--overwrite"],
            capsys,
        )[0]
        == 0
    )
    assert out.read_bytes() != first
    precious = tmp_path / "thesis.npy"
    precious.write_text("not an array: my thesis")
    code, err = run(["encode", model_copy, "--input", texts_file, "--out", precious, "--overwrite"], capsys)
    assert code == 2 and "does not look like a matryoshka2d embeddings output" in err
    assert precious.read_text() == "not an array: my thesis"
    empty = tmp_path / "empty.npy"
    empty.touch()
    assert run(["encode", model_copy, "--input", texts_file, "--out", empty], capsys)[0] == 0
    assert np.load(empty).shape == (len(SENTENCES), 32)


def test_eval_sts_json_is_replaced_only_if_it_is_a_grid(model_copy, sts_file, tmp_path, capsys):
    out = tmp_path / "grid.json"
    args = ["eval-sts", model_copy, "--data", sts_file, "--layers", "1", "--dims", "8", "--json", out]
    assert run(args, capsys)[0] == 0
    assert run(args, capsys)[0] == 2
    assert run(args + ["--overwrite"], capsys)[0] == 0
    other = tmp_path / "settings.json"
    other.write_text('{"theme": "dark"}')
    code, err = run(args[:-1] + [other, "--overwrite"], capsys)
    assert (
        code == 2 and "left alone even with --overwrite" in err and other.read_text() == '{"theme": "dark"}'
    )


def test_file_rule_api(tmp_path):
    target = tmp_path / "a.npy"
    atomic_write(target, b"\x93NUMPY rest", "embeddings")
    with pytest.raises(OutputPathError, match="already exists"):
        atomic_write(target, b"x", "embeddings")
    atomic_write(target, b"\x93NUMPY new", "embeddings", overwrite=True, recognize=is_npy_file)
    assert target.read_bytes() == b"\x93NUMPY new"
    with pytest.raises(OutputPathError, match="not a regular file"):
        check_output_file("/dev/null", "embeddings", overwrite=True)


# ------------------------------------------------------------------------------------ temporaries
def test_stale_temporaries_of_a_killed_save_are_removed_by_the_next_save(tiny_model, tmp_path):
    dead_pid = 2**22 + 12345  # above Linux's pid_max: certainly not running
    stale = [
        tmp_path / f".small.tmp-{dead_pid}-abcd1234",  # a killed save (folder)
        tmp_path / ".small.old-k2j4h5g6",  # from a version that did not record the pid
        tmp_path / f".small.tmp-{dead_pid}-zz_99xyz",
    ]
    for path in stale[:2]:
        (path / "model").mkdir(parents=True)
    stale[2].write_bytes(b"half a file")
    live = tmp_path / f".small.tmp-{os.getppid()}-abcd1234"  # a save still running elsewhere
    live.mkdir()
    others = [tmp_path / f".smaller.tmp-{dead_pid}-abcd1234", tmp_path / ".small.tmp-notours"]
    for path in others:
        path.mkdir()
    tiny_model.save(tmp_path / "small")
    assert not any(p.exists() for p in stale)
    assert live.exists() and all(p.exists() for p in others)
    assert remove_stale_temporaries(tmp_path / "small") == []


def test_stale_temporary_files_are_removed_by_the_next_write(tmp_path):
    stale = tmp_path / f".grid.json.tmp-{2**22 + 7}-qwer7890"
    stale.write_text("{")
    atomic_write(tmp_path / "grid.json", "{}", "eval-sts JSON")
    assert not stale.exists() and (tmp_path / "grid.json").read_text() == "{}"


@pytest.mark.parametrize("exc", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_an_interrupted_save_leaves_nothing_and_keeps_the_previous_output(
    exc, tiny_model, tmp_path, monkeypatch
):
    out = tiny_model.save(tmp_path / "m")
    before = snapshot(out)

    def broken(folder, *args, **kwargs):
        (folder / "partial.bin").write_bytes(b"half")
        raise exc

    monkeypatch.setattr("matryoshka2d.model.write_folder", broken)
    with pytest.raises(type(exc)):
        tiny_model.save(out, overwrite=True)
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_atomic_directory_marks_its_kind(tmp_path):
    with atomic_directory(tmp_path / "x", "checkpoint") as tmp:
        (tmp / "state.json").write_text("{}")
    marker = json.loads((tmp_path / "x" / OUTPUT_MARKER).read_text())
    assert marker["kind"] == "checkpoint" and marker["written_by"] == "matryoshka2d"


def test_a_save_killed_between_its_two_renames_loses_nothing(tmp_path):
    """atomic_directory moves the previous folder into .NAME.old-<pid>-* before renaming the new one into
    place; killed in between, NAME is missing and the previous folder is the only copy: it is put back,
    so the next save without overwrite is refused instead of deleting it as a stale temporary."""
    dead_pid = 2**22 + 4321  # above Linux's pid_max: certainly not running
    with atomic_directory(tmp_path / "idx", "search-index") as tmp:
        (tmp / "vectors").write_text("the only copy")
    aside = tmp_path / f".idx.old-{dead_pid}-abcd1234"
    aside.mkdir()
    os.replace(tmp_path / "idx", aside / "idx")  # the state the kill left
    (tmp_path / f".idx.tmp-{dead_pid}-efgh5678").mkdir()  # the new folder, never renamed into place

    with pytest.raises(OutputPathError, match="already holds a search-index"):
        check_output_folder(tmp_path / "idx", "search-index")
    assert (tmp_path / "idx" / "vectors").read_text() == "the only copy"
    with pytest.raises(OutputPathError, match="already holds a search-index"):
        with atomic_directory(tmp_path / "idx", "search-index"):
            pass
    with atomic_directory(tmp_path / "idx", "search-index", overwrite=True) as tmp:
        (tmp / "vectors").write_text("new")
    assert (tmp_path / "idx" / "vectors").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]


@pytest.mark.parametrize("dangling", [True, False])
def test_a_symbolic_link_as_a_file_output_is_refused_and_kept(
    model_copy, texts_file, tmp_path, capsys, dangling
):
    target = tmp_path / "elsewhere" / "target.npy"
    target.parent.mkdir()
    if not dangling:
        np.save(target, np.zeros(3))
    link = tmp_path / "link.npy"
    link.symlink_to(target)
    before = target.read_bytes() if not dangling else None
    code, err = run(["encode", model_copy, "--input", texts_file, "--out", link, "--overwrite"], capsys)
    assert code == 2 and "is a symbolic link" in err
    assert link.is_symlink() and os.readlink(link) == str(target)  # the user's link is still a link
    assert (target.read_bytes() if not dangling else target.exists()) == (before if not dangling else False)


def test_an_unwritable_output_folder_is_refused_before_any_work(
    model_copy, texts_file, tmp_path, capsys, monkeypatch
):
    """Root writes into a chmod 555 folder, so the refusal of the write probe is simulated: what matters is
    that the command stops at the output check, before loading the model or encoding."""
    import tempfile

    read_only = tmp_path / "read-only"
    read_only.mkdir()
    real_mkstemp = tempfile.mkstemp

    def refusing_mkstemp(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == read_only:
            raise PermissionError(13, "Permission denied")
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", refusing_mkstemp)
    fail_if_loaded(monkeypatch)
    for argv in (
        ["encode", model_copy, "--input", texts_file, "--out", read_only / "x.npy"],
        ["eval-sts", model_copy, "--data", texts_file, "--json", read_only / "grid.json"],
        ["index", "build", model_copy, "--corpus", texts_file, "--out", read_only / "index"],
    ):
        code, err = run(argv, capsys)
        assert code == 2 and "is not writable (Permission denied)" in err, argv
    assert not any(read_only.iterdir())
    with pytest.raises(OutputPathError, match="is not writable"):
        check_output_folder(read_only / "new" / "index", "search-index")
    assert check_output_file(tmp_path / "fine.npy", "embeddings") == tmp_path / "fine.npy"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".m2d")) == []  # probes removed
