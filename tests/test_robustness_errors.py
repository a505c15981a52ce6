"""Issue 13 §4: one line, never a traceback.

Corrupt model folders and bad API arguments raise the project's error type naming the value; Ctrl-C prints
"interrupted", exits 130 and leaves no partial output.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import SENTENCES

from matryoshka2d import EmbeddingModel, Matryoshka2dError, ModelLoadError
from matryoshka2d.cli import main


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


def set_max_seq_length(folder: Path, value) -> None:
    config = folder / "sentence_bert_config.json"
    data = json.loads(config.read_text())
    data["max_seq_length"] = value
    config.write_text(json.dumps(data))


# ----------------------------------------------------------------------------- corrupt model folders
@pytest.mark.parametrize(
    "value,message",
    [
        (-5, "max_seq_length=-5 is out of range: it must be a positive number of tokens"),
        (0, "max_seq_length=0 is out of range"),
        ("128", "max_seq_length must be an integer, got '128'"),
        (1.5, "max_seq_length must be an integer, got 1.5"),
        (True, "max_seq_length must be an integer, got True"),
        (10_000, "max_seq_length=10000 is out of range: .* has 64 position embeddings, so 1..64"),
    ],
)
def test_a_bad_max_seq_length_is_a_model_load_error(value, message, model_copy, sts_file, capsys):
    set_max_seq_length(model_copy, value)
    with pytest.raises(ModelLoadError, match=message):
        EmbeddingModel.load(model_copy)
    assert main(["eval-sts", str(model_copy), "--data", str(sts_file)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "max_seq_length" in err and "Traceback" not in err


def test_max_seq_length_at_the_limit_loads(model_copy):
    set_max_seq_length(model_copy, 64)
    assert EmbeddingModel.load(model_copy).max_seq_length == 64


def test_a_corrupt_sentence_bert_config_is_a_model_load_error(model_copy):
    (model_copy / "sentence_bert_config.json").write_text("[1, 2]")
    with pytest.raises(ModelLoadError, match="expected a JSON object"):
        EmbeddingModel.load(model_copy)
    (model_copy / "sentence_bert_config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="cannot read"):
        EmbeddingModel.load(model_copy)


@pytest.mark.parametrize("value", [None, 123, "", "   ", ["a"], b"bytes"])
def test_load_with_a_non_path_raises_the_projects_error(value):
    with pytest.raises(Matryoshka2dError, match="model"):
        EmbeddingModel.load(value)


# ------------------------------------------------------------------------------------ Ctrl-C
def test_ctrl_c_during_encode_exits_130_and_writes_nothing(tiny_model_dir, tmp_path, capsys, monkeypatch):
    source = tmp_path / "t.txt"
    source.write_text("\n".join(SENTENCES) + "\n")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(EmbeddingModel, "encode", interrupted)
    code = main(["encode", str(tiny_model_dir), "--input", str(source), "--out", str(tmp_path / "e.npy")])
    err = capsys.readouterr().err
    assert code == 130 and "m2d encode: interrupted" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.txt"]


def test_ctrl_c_during_a_save_leaves_no_partial_folder(tiny_model_dir, tmp_path, capsys, monkeypatch):
    def interrupted(folder, *args, **kwargs):
        (folder / "model.safetensors").write_bytes(b"half written")
        raise KeyboardInterrupt

    monkeypatch.setattr("matryoshka2d.model.write_folder", interrupted)
    code = main(["truncate", str(tiny_model_dir), "--layers", "2", "--out", str(tmp_path / "small")])
    assert code == 130 and "m2d truncate: interrupted" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # neither the target nor a temporary folder


def test_ctrl_c_during_a_file_write_leaves_no_partial_file(tmp_path, monkeypatch):
    from matryoshka2d.persistence import atomic_write

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "grid.json", "{}", "eval-sts JSON")
    assert list(tmp_path.iterdir()) == []


SIGINT_SCRIPT = textwrap.dedent(
    """
    import signal, sys, time
    from matryoshka2d import EmbeddingModel
    from matryoshka2d.cli import main

    # Ctrl-C as in a terminal, even when the test suite itself runs as a background job (a shell starts
    # those with SIGINT ignored, and a child process inherits that)
    signal.signal(signal.SIGINT, signal.default_int_handler)

    def slow_encode(self, *args, **kwargs):
        print("encoding", flush=True)
        time.sleep(60)

    EmbeddingModel.encode = slow_encode
    sys.exit(main(sys.argv[1:]))
    """
)


def test_sigint_to_a_running_command_prints_interrupted_and_exits_130(tiny_model_dir, tmp_path):
    source = tmp_path / "t.txt"
    source.write_text("\n".join(SENTENCES) + "\n")
    out = tmp_path / "e.npy"
    argv = ["encode", str(tiny_model_dir), "--input", str(source), "--out", str(out)]
    proc = subprocess.Popen(
        [sys.executable, "-c", SIGINT_SCRIPT, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "encoding"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert err.strip() == "m2d encode: interrupted; no partial output was written"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.txt"]


# ------------------------------------------------------------------------------------ every command
@pytest.mark.parametrize(
    "argv",
    [
        ["encode", "{model}", "--input", "{txt}", "--out", "{tmp}/e.npy", "--layers", "9"],
        ["encode", "{model}", "--input", "{txt}", "--out", "{tmp}/e.npy", "--dim", "-1"],
        ["encode", "{missing}", "--input", "{txt}", "--out", "{tmp}/e.npy"],
        ["eval-sts", "{model}", "--data", "{txt}"],
        ["eval-sts", "{model}", "--data", "{sts}", "--dims", "0"],
        ["truncate", "{txt}", "--out", "{tmp}/x"],
        ["truncate", "{model}", "--out", ""],
        ["index", "build", "{model}", "--corpus", "{txt}", "--out", "{tmp}/i", "--shortlist-dim", "999"],
        ["index", "add", "{tmp}", "--corpus", "{txt}"],
        ["search", "{tmp}/nothing", "--query", "a"],
        ["search", "{tmp}", "--query", "a", "-k", "0"],
        ["eval-retrieval", "{model}", "--data", "{txt}"],
        ["report", "{txt}", "--out", "{tmp}/r"],
        ["demo", "--out", "{tmp}", "--work", "{tmp}/w"],
        ["train", "--model", "{model}", "--train-data", "{sts}", "--output-dir", "{model}", "--steps", "1"],
        ["serve", "{missing}"],
    ],
)
def test_every_command_gives_one_line_for_bad_input(argv, tiny_model_dir, sts_file, tmp_path, capsys):
    txt = tmp_path / "t.txt"
    txt.write_text("\n".join(SENTENCES) + "\n")
    (tmp_path / "keep.me").write_text("user data")
    argv = [
        a.format(model=tiny_model_dir, txt=txt, sts=sts_file, tmp=tmp_path, missing=tmp_path / "missing")
        for a in argv
    ]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own usage errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert (tmp_path / "keep.me").read_text() == "user data"
    assert not (tmp_path / "e.npy").exists()
