"""embed_corpus with the local engine (matryoshka2d.corpus.job / .shards) and ``m2d embed-corpus``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import WORDS, prompted_copy

from matryoshka2d import EmbeddingModel
from matryoshka2d.cli import main
from matryoshka2d.corpus import CorpusOutputError, embed_corpus, read_cell, read_manifest
from matryoshka2d.corpus.shards import list_temporaries
from matryoshka2d.errors import InvalidDimError, InvalidInputError, InvalidLayersError
from matryoshka2d.search.fingerprint import ModelFingerprint

LAYERS, DIMS = [1, 3], [32, 8]


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models run fastest on one thread (and far faster than two when other jobs load the CPUs)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def texts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(1, 16))) for _ in range(n)]


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "in" / "corpus.txt"
    path.parent.mkdir()
    path.write_text("\n".join(texts(230)) + "\n", encoding="utf-8")
    return path


def run(model_dir, corpus, out, **kwargs):
    options = dict(layers=LAYERS, dims=DIMS, shard_rows=50, batch_size=16, show_progress=False)
    return embed_corpus(model_dir, corpus, out, **{**options, **kwargs})


def output_files(out: Path) -> dict[str, bytes]:
    """Every shard file and commit record of an output folder, by relative path."""
    return {
        str(p.relative_to(out)): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and (p.suffix == ".parquet" or p.parent.name == "_shards")
    }


def test_writes_every_cell_with_ids_and_vectors_equal_to_encode(tiny_model_dir, corpus, tmp_path):
    out = tmp_path / "out"
    result = run(tiny_model_dir, corpus, out)
    assert result.complete and result.rows == 230 and result.shards == 5 and result.encoded_shards == 5
    manifest = read_manifest(out)
    assert manifest["status"] == "complete" and manifest["rows"] == 230
    assert [(c["layers"], c["dim"]) for c in manifest["cells"]] == [(1, 32), (1, 8), (3, 32), (3, 8)]
    assert [s["rows"] for s in manifest["shards"]] == [50, 50, 50, 50, 30]
    model = EmbeddingModel.load(tiny_model_dir)
    lines = corpus.read_text(encoding="utf-8").splitlines()
    for k in LAYERS:
        for d in DIMS:
            ids, emb = read_cell(out, k, d)
            assert ids.dtype == np.int64 and ids.tolist() == list(range(230))
            assert emb.dtype == np.float32 and emb.shape == (230, d)
            np.testing.assert_allclose(emb, model.encode(lines, layers=k, dim=d), atol=1e-5)
            np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    for shard in manifest["shards"]:
        assert set(shard["files"]) == {
            f"{c['folder']}/part-{shard['index']:05d}.parquet" for c in manifest["cells"]
        }
    assert not list_temporaries(out)


def test_string_ids_from_an_id_column(tiny_model_dir, tmp_path):
    path = tmp_path / "docs.jsonl"
    rows = [{"doc": f"d{i}", "text": t} for i, t in enumerate(texts(12))]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    run(tiny_model_dir, path, tmp_path / "out", id_column="doc", shard_rows=5)
    ids, emb = read_cell(tmp_path / "out", 3, 8)
    assert ids.tolist() == [r["doc"] for r in rows] and emb.shape == (12, 8)
    assert read_manifest(tmp_path / "out")["id_type"] == "string"


def test_rerun_of_a_finished_job_encodes_nothing_and_changes_nothing(tiny_model_dir, corpus, tmp_path):
    out = tmp_path / "out"
    run(tiny_model_dir, corpus, out)
    before = output_files(out)
    again = run(tiny_model_dir, corpus, out)
    assert again.complete and again.encoded_shards == 0 and again.skipped_shards == 5
    assert output_files(out) == before


def test_stopped_job_resumes_to_exactly_the_uninterrupted_result(tiny_model_dir, corpus, tmp_path):
    whole = tmp_path / "whole"
    run(tiny_model_dir, corpus, whole)
    part = tmp_path / "part"
    first = run(tiny_model_dir, corpus, part, max_shards=2)
    assert not first.complete and first.encoded_shards == 2
    assert read_manifest(part)["status"] == "running"
    with pytest.raises(CorpusOutputError, match="not finished"):
        read_cell(part, 1, 8)
    second = run(tiny_model_dir, corpus, part)
    assert second.complete and second.skipped_shards == 2 and second.encoded_shards == 3
    assert output_files(part) == output_files(whole)
    assert read_manifest(part) == read_manifest(whole)


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete-file", "delete-record", "bad-record"])
def test_a_damaged_shard_is_detected_and_redone(tiny_model_dir, corpus, tmp_path, damage):
    out = tmp_path / "out"
    run(tiny_model_dir, corpus, out)
    before = output_files(out)
    target = out / "layers1-dim8" / "part-00003.parquet"
    record = out / "_shards" / "00003.json"
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:-100])
    elif damage == "flip":  # same size, one byte changed: only the checksum can tell
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "delete-file":
        target.unlink()
    elif damage == "delete-record":
        record.unlink()
    else:
        record.write_text("{not json", encoding="utf-8")
    again = run(tiny_model_dir, corpus, out)
    assert again.encoded_shards == 1 and again.skipped_shards == 4
    assert output_files(out) == before


def test_temporaries_of_a_killed_write_are_removed(tiny_model_dir, corpus, tmp_path):
    out = tmp_path / "out"
    run(tiny_model_dir, corpus, out, max_shards=1)
    stale = out / "layers1-dim8" / ".part-00001.parquet.tmp-abc123"
    stale.write_bytes(b"half a shard")
    run(tiny_model_dir, corpus, out)
    assert not stale.exists() and not list_temporaries(out)


def test_killed_process_loses_only_shards_in_flight(tiny_model_dir, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(texts(400, seed=3)) + "\n", encoding="utf-8")
    args = [str(tiny_model_dir), "--input", str(corpus), "--layers", "1,3", "--dims", "32,8"]
    args += ["--shard-rows", "10", "--batch-size", "8"]
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert main(["embed-corpus", *args, "--out", str(whole)]) == 0
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    code = "import sys; from matryoshka2d.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "embed-corpus", *args, "--out", str(part)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while len(list((part / "_shards").glob("*.json"))) < 3 and proc.poll() is None:
            assert time.monotonic() < deadline, "the job did not start"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert read_manifest(part)["status"] == "running"
    done = len(list((part / "_shards").glob("*.json")))
    assert 3 <= done < 40
    resumed = run(tiny_model_dir, corpus, part, shard_rows=10, batch_size=8)
    assert resumed.complete and resumed.skipped_shards >= done - 1  # at most the shard in flight is lost
    assert resumed.encoded_shards + resumed.skipped_shards == 40
    assert output_files(part) == output_files(whole)
    for k, d in [(1, 8), (3, 32)]:
        a, b = read_cell(part, k, d), read_cell(whole, k, d)
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_another_jobs_folder_is_refused_naming_the_difference(tiny_model_dir, corpus, tmp_path):
    out = tmp_path / "out"
    run(tiny_model_dir, corpus, out, max_shards=1)
    with pytest.raises(
        CorpusOutputError, match=r"another embed-corpus job \(layers: \[1, 3\] there, \[3\] now"
    ):
        run(tiny_model_dir, corpus, out, layers=[3])
    with pytest.raises(CorpusOutputError, match="shard_rows: 50 there, 60 now"):
        run(tiny_model_dir, corpus, out, shard_rows=60)
    corpus.write_text(corpus.read_text(encoding="utf-8") + "one more line\n", encoding="utf-8")
    with pytest.raises(CorpusOutputError, match="inputs"):
        run(tiny_model_dir, corpus, out)


def test_a_prompt_is_part_of_the_job(tiny_model_dir, corpus, tmp_path):
    folder = prompted_copy(tiny_model_dir, tmp_path / "prompted")
    out = tmp_path / "out"
    assert not run(folder, corpus, out, prompt_name="document", max_shards=2).complete
    with pytest.raises(CorpusOutputError, match="prompt: 'passage: ' there, 'query: ' now"):
        run(folder, corpus, out, prompt_name="query")
    with pytest.raises(CorpusOutputError, match="prompt: 'passage: ' there, None now"):
        run(folder, corpus, out)  # the model's default prompt (none): another job
    result = run(folder, corpus, out, prompt="passage: ")  # the same prompt, given as text: resumed
    assert result.complete and result.skipped_shards == 2
    assert read_manifest(out)["job"]["prompt"] == "passage: "
    lines = corpus.read_text(encoding="utf-8").splitlines()
    model = EmbeddingModel.load(folder)
    ids, emb = read_cell(out, 3, 8)
    np.testing.assert_allclose(emb, model.encode(lines, layers=3, dim=8, prompt_name="document"), atol=1e-5)
    assert np.abs(emb - model.encode(lines, layers=3, dim=8)).max() > 1e-3
    with pytest.raises(InvalidInputError, match="prompt_name 'doc' is not one of the model's prompts"):
        run(folder, corpus, tmp_path / "other", prompt_name="doc")
    assert not (tmp_path / "other").exists()


def test_output_folders_that_must_not_be_written_are_refused(tiny_model_dir, corpus, tmp_path):
    with pytest.raises(CorpusOutputError, match="would hold the input"):
        run(tiny_model_dir, corpus, corpus.parent)
    with pytest.raises(CorpusOutputError, match="would hold the input"):
        run(tiny_model_dir, corpus, corpus)
    with pytest.raises(CorpusOutputError, match="would hold the input"):
        run(tiny_model_dir, corpus, tmp_path)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(CorpusOutputError, match="not empty and has no manifest.json"):
        run(tiny_model_dir, corpus, busy)
    other = tmp_path / "other"
    other.mkdir()
    (other / "manifest.json").write_text('{"format": "something else"}', encoding="utf-8")
    with pytest.raises(CorpusOutputError, match="not an embed-corpus manifest"):
        run(tiny_model_dir, corpus, other)
    assert (busy / "notes.txt").read_text(encoding="utf-8") == "mine"
    assert sorted(p.name for p in busy.iterdir()) == ["notes.txt"]  # not even a lock file left in it
    assert corpus.read_text(encoding="utf-8").count("\n") == 230


def test_out_inside_the_model_folder_is_refused(tiny_model_dir, corpus):
    """The shards would change the model's fingerprint: the job could never be resumed."""
    with pytest.raises(CorpusOutputError, match="inside \\(or holds\\) the model folder"):
        run(tiny_model_dir, corpus, tiny_model_dir / "emb")
    assert not (tiny_model_dir / "emb").exists()


def test_a_recursive_glob_does_not_read_the_jobs_own_shards(tiny_model_dir, tmp_path):
    data = tmp_path / "data"
    (data / "a").mkdir(parents=True)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": texts(20)}), data / "a" / "x.parquet")
    pattern = str(data / "**" / "*.parquet")
    first = run(tiny_model_dir, pattern, data / "emb", max_shards=1, shard_rows=5)
    assert not first.complete and list((data / "emb").rglob("*.parquet"))  # shards now match the glob
    second = run(tiny_model_dir, pattern, data / "emb", shard_rows=5)  # the same job: resumed, not refused
    assert second.complete and second.rows == 20 and second.skipped_shards == 1


def test_a_run_killed_while_writing_its_first_manifest_resumes(tiny_model_dir, corpus, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".lock").touch()
    (out / ".manifest.json.tmp-j39n3cbm").write_text('{"half', encoding="utf-8")  # what the kill left
    result = run(tiny_model_dir, corpus, out)
    assert result.complete and not list_temporaries(out)


def test_a_second_job_on_the_same_folder_is_refused_while_one_runs(tiny_model_dir, corpus, tmp_path):
    from matryoshka2d.corpus.shards import locked

    out = tmp_path / "out"
    with locked(out):
        with pytest.raises(CorpusOutputError, match="another embed-corpus job is running"):
            run(tiny_model_dir, corpus, out)


def test_bad_settings_name_the_value(tiny_model_dir, corpus, tmp_path):
    with pytest.raises(InvalidLayersError, match="9"):
        run(tiny_model_dir, corpus, tmp_path / "a", layers=[2, 9])
    with pytest.raises(InvalidDimError, match="64"):
        run(tiny_model_dir, corpus, tmp_path / "b", dims=[64])
    with pytest.raises(Exception, match="engine 'spark'"):
        run(tiny_model_dir, corpus, tmp_path / "c", engine="spark")
    with pytest.raises(Exception, match="shard_rows"):
        run(tiny_model_dir, corpus, tmp_path / "d", shard_rows=0)
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_cli_writes_and_resumes(tiny_model_dir, corpus, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["embed-corpus", str(tiny_model_dir), "--input", str(corpus), "--out", str(out)]
    argv += ["--layers", "1,3", "--dims", "8", "--shard-rows", "100", "--max-shards", "1"]
    assert main(argv) == 0
    assert "stopped early" in capsys.readouterr().out
    assert main(argv[:-2]) == 0
    printed = capsys.readouterr().out
    assert "finished: 230 rows in 3 shards" in printed and "kept 1 finished shard" in printed
    assert read_cell(out, 3, 8)[1].shape == (230, 8)


def test_cli_errors_are_one_line(tiny_model_dir, corpus, tmp_path, capsys):
    assert (
        main(["embed-corpus", str(tiny_model_dir), "--input", str(tmp_path / "nope*.txt"), "--out", "x"]) == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no file matches" in err
    assert (
        main(["embed-corpus", str(tiny_model_dir), "--input", str(corpus), "--out", str(corpus.parent)]) == 2
    )
    assert "would hold the input" in capsys.readouterr().err


@pytest.mark.integration
def test_minilm_two_layer_counts_from_one_pass_equal_encode(tmp_path):
    from conftest import data_path, packaged_minilm

    from matryoshka2d.data import load_sts

    sentences = load_sts(data_path("stsb", "test.tsv")).sentence1[:120]
    path = tmp_path / "stsb.txt"
    path.write_text("\n".join(sentences) + "\n", encoding="utf-8")
    embed_corpus(
        packaged_minilm(),
        path,
        tmp_path / "out",
        layers=[3, 6],
        dims=[64, 384],
        shard_rows=50,
        show_progress=False,
    )
    model = EmbeddingModel.load(packaged_minilm())
    for k, d in [(3, 64), (6, 384)]:
        np.testing.assert_allclose(
            read_cell(tmp_path / "out", k, d)[1], model.encode(sentences, k, d), atol=1e-5
        )


def test_the_runtime_and_dtype_are_part_of_the_job(tiny_model_dir, corpus, tmp_path, monkeypatch):
    """ONNX Runtime's vectors equal torch's; a job started with one runtime or dtype is not resumed with
    another (the vectors differ slightly), and "auto" is recorded as what it chose."""
    monkeypatch.setenv("M2D_CACHE_DIR", str(tmp_path / "cache"))
    lines = corpus.read_text(encoding="utf-8").splitlines()
    expected = EmbeddingModel.load(tiny_model_dir).encode(lines, layers=3, dim=8)
    out = tmp_path / "onnx"
    assert not run(tiny_model_dir, corpus, out, runtime="onnx", max_shards=1).complete
    with pytest.raises(CorpusOutputError, match="runtime: 'onnx' there, None now"):
        run(tiny_model_dir, corpus, out)  # torch float32: another job
    result = run(tiny_model_dir, corpus, out, runtime="onnx", dtype="auto")  # resumed
    assert result.complete and result.skipped_shards == 1
    manifest = read_manifest(out)
    assert manifest["job"]["runtime"] == "onnx" and manifest["model"]["precision"] == "float32"
    np.testing.assert_allclose(read_cell(out, 3, 8)[1], expected, atol=1e-5)

    bf16 = tmp_path / "bf16"
    run(tiny_model_dir, corpus, bf16, dtype="bfloat16")
    assert read_manifest(bf16)["job"]["precision"] == "bfloat16"
    vectors = read_cell(bf16, 3, 8)[1]
    assert 1e-6 < np.abs(vectors - expected).max() < 0.05
    with pytest.raises(CorpusOutputError, match="precision: 'bfloat16' there, 'float32' now"):
        run(tiny_model_dir, corpus, bf16, runtime="onnx")
    assert "runtime" not in read_manifest(run(tiny_model_dir, corpus, tmp_path / "fp32").out)["job"]


def test_local_workers_write_the_vectors_of_one(tiny_model_dir, corpus, tmp_path):
    """workers=2 on the local engine: the same batches on two threads, each with half of torch's threads
    for the run only; the same job (a run with one worker resumes it)."""
    import torch

    torch.set_num_threads(2)
    one = run(tiny_model_dir, corpus, tmp_path / "one")
    out = tmp_path / "two"
    assert not run(tiny_model_dir, corpus, out, workers=2, max_shards=2).complete
    assert torch.get_num_threads() == 2
    result = run(tiny_model_dir, corpus, out, workers=1)
    assert (
        result.complete and result.skipped_shards == 2 and result.manifest["job_id"] == one.manifest["job_id"]
    )
    for k, d in ((1, 32), (3, 8)):
        np.testing.assert_allclose(read_cell(out, k, d)[1], read_cell(one.out, k, d)[1], atol=1e-6)


def test_cli_runtime_and_local_workers(tiny_model_dir, corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("M2D_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "out"
    argv = ["embed-corpus", str(tiny_model_dir), "--input", str(corpus), "--out", str(out)]
    assert main(argv + ["--dims", "8", "--runtime", "onnx-int8", "--workers", "2"]) == 0
    assert "engine local, onnx-int8 int8" in capsys.readouterr().out
    assert read_manifest(out)["job"]["runtime"] == "onnx-int8"
    assert main(argv + ["--dims", "8", "--runtime", "onnx", "--dtype", "bfloat16"]) == 2
    assert "dtype 'bfloat16' is for the torch backend" in capsys.readouterr().err


def test_compile_is_part_of_the_job_and_applied_after_the_fingerprints(
    tiny_model_dir, corpus, tmp_path, monkeypatch
):
    """Compiled float32 differs from eager in the last bits: another job. The model is compiled once, after
    the fingerprints (which run every layer count), not before (a graph per layer count for nothing)."""
    calls = []
    real_of = ModelFingerprint.of

    def spy_compile(self, *args, **kwargs):
        calls.append("compile")
        return self  # the compiling itself is tested in test_model.py

    def spy_fingerprint(model, layers=None, *args, **kwargs):
        calls.append(f"fingerprint {layers}")
        return real_of(model, layers, *args, **kwargs)

    monkeypatch.setattr(EmbeddingModel, "compile_for_inference", spy_compile)
    monkeypatch.setattr(ModelFingerprint, "of", spy_fingerprint)
    out = tmp_path / "out"
    result = run(tiny_model_dir, corpus, out, compile=True, max_shards=1)
    assert calls == ["fingerprint 1", "fingerprint 3", "compile"]
    assert result.manifest["job"]["compiled"] is True and result.manifest["model"]["compiled"] is True
    with pytest.raises(CorpusOutputError, match="compiled: True there, None now"):
        run(tiny_model_dir, corpus, out)
    with pytest.raises(InvalidInputError, match="compile is for the torch backend"):
        run(tiny_model_dir, corpus, tmp_path / "onnx", runtime="onnx", compile=True)
    assert not (tmp_path / "onnx").exists()
