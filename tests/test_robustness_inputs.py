"""Issue 13 §3: no silent partial or misaligned input.

Rules (matryoshka2d.data): row i of an output comes from line i of a .txt file (data row i of a table); a
blank line before the last text is an error naming the line; a tsv/csv quoting problem names the line and
the cause; options that do not apply are errors; unordered collections (set, dict) are refused.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import SENTENCES

from matryoshka2d import EmbeddingModel
from matryoshka2d.cli import main
from matryoshka2d.data import load_sts, read_corpus, read_rows, read_texts
from matryoshka2d.errors import DataFileError, InvalidInputError
from matryoshka2d.search import SearchIndex


def run(argv: list, capsys) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if code != 0:
        assert len(err.strip().splitlines()) == 1, err  # one line, never a traceback
    return code, err


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------ row alignment
def test_encode_output_row_i_is_input_line_i(tiny_model_dir, tmp_path, capsys):
    texts = ["first line", "  second, with spaces  ", "third \u2028 has a line separator", "fourth"]
    source = write(tmp_path / "t.txt", "\n".join(texts) + "\n\n\n")  # blank lines at the end: ignored
    out = tmp_path / "e.npy"
    assert run(["encode", tiny_model_dir, "--input", source, "--out", out], capsys)[0] == 0
    expected = EmbeddingModel.load(tiny_model_dir).encode(texts)
    np.testing.assert_allclose(np.load(out), expected, atol=1e-6)


@pytest.mark.parametrize("blank", ["", "   ", "\t", "\r"])
def test_a_blank_line_inside_an_encode_input_stops_with_its_line_number(
    blank, tiny_model_dir, tmp_path, capsys
):
    source = write(tmp_path / "t.txt", f"one\ntwo\n{blank}\nfour\n")
    out = tmp_path / "e.npy"
    code, err = run(["encode", tiny_model_dir, "--input", source, "--out", out], capsys)
    assert code == 2 and "t.txt, line 3: blank line" in err and "output row i is input line i" in err
    assert not out.exists()


@pytest.mark.parametrize("suffix", [".tsv", ".csv", ".jsonl"])
def test_a_blank_line_inside_a_table_is_an_error_too(suffix, tmp_path):
    body = {
        ".tsv": "text\tid\na\t1\n\nb\t2\n",
        ".csv": "text,id\na,1\n\nb,2\n",
        ".jsonl": '{"text": "a"}\n\n{"text": "b"}\n',
    }[suffix]
    with pytest.raises(DataFileError, match=r"line \d: blank line"):
        read_rows(write(tmp_path / f"x{suffix}", body))


def test_corpus_and_queries_files_follow_the_same_rule(tiny_model_dir, tmp_path, capsys):
    corpus = write(tmp_path / "c.txt", "doc one\n\ndoc three\n")
    code, err = run(["index", "build", tiny_model_dir, "--corpus", corpus, "--out", tmp_path / "ix"], capsys)
    assert code == 2 and "c.txt, line 2: blank line" in err and not (tmp_path / "ix").exists()


# ------------------------------------------------------------------------------------ quoting
def test_an_unclosed_quote_is_reported_with_the_line_and_the_cause(tiny_model_dir, tmp_path, capsys):
    lines = ["sentence1\tsentence2\tscore"] + [f"s{i}\tt{i}\t{i % 5}" for i in range(12)]
    lines[3] = '"an unclosed quote\tt2\t2'  # would swallow every following line into one field
    data = write(tmp_path / "bad.tsv", "\n".join(lines) + "\n")
    code, err = run(["eval-sts", tiny_model_dir, "--data", data], capsys)
    assert code == 2 and "bad.tsv, line 4" in err
    assert "unclosed quote" in err or "must end with one" in err


def test_a_quoted_field_spanning_lines_is_refused(tmp_path):
    data = write(tmp_path / "q.csv", 'text,id\n"starts here\nand goes on",1\nnext,2\n')
    with pytest.raises(DataFileError, match=r"q.csv, line 2: a quoted field runs over lines 2-3"):
        read_rows(data)


def test_a_character_after_a_closing_quote_is_refused(tmp_path):
    data = write(tmp_path / "q.tsv", 'text\tid\n"quoted" then more\t1\n')
    with pytest.raises(DataFileError, match=r"q.tsv, line 2: malformed tsv"):
        read_rows(data)


def test_properly_quoted_fields_still_read(tmp_path):
    data = write(tmp_path / "ok.tsv", 'text\tid\n"says ""no diving""."\t1\nplain "inner" quote\t2\n')
    assert read_texts(data) == ['says "no diving".', 'plain "inner" quote']


def test_a_field_count_mismatch_names_its_line(tmp_path):
    data = write(tmp_path / "f.tsv", "sentence1\tsentence2\tscore\na\tb\t1\nc\td\n")
    with pytest.raises(DataFileError, match=r"f.tsv, line 3: 2 field\(s\), but the header has 3"):
        load_sts(data)


def test_a_repeated_column_name_is_refused(tmp_path):
    with pytest.raises(DataFileError, match=r"repeated column name\(s\) \['text'\]"):
        read_rows(write(tmp_path / "d.csv", "text,text\na,b\n"))


# ----------------------------------------------------------------------------- options that do not apply
@pytest.mark.parametrize(
    "argv,message",
    [
        (["encode", "{model}", "--input", "{txt}", "--column", "text", "--out", "{tmp}/e.npy"], "no columns"),
        (
            ["index", "build", "{model}", "--corpus", "{txt}", "--column", "text", "--out", "{tmp}/i"],
            "no columns",
        ),
        (
            ["index", "build", "{model}", "--corpus", "{txt}", "--id-column", "id", "--out", "{tmp}/i"],
            "no columns",
        ),
        (["search", "{tmp}/i", "--queries", "{txt}", "--column", "q"], "no columns"),
        (["search", "{tmp}/i", "--query", "a cat", "--column", "q"], "applies to a --queries table file"),
    ],
)
def test_options_that_do_not_apply_are_errors(argv, message, tiny_model_dir, tmp_path, capsys):
    txt = write(tmp_path / "t.txt", "\n".join(SENTENCES) + "\n")
    if argv[0] == "search":
        SearchIndex.from_embeddings(np.eye(4, 8, dtype=np.float32), shortlist_dim=4).save(tmp_path / "i")
    argv = [a.format(model=tiny_model_dir, txt=txt, tmp=tmp_path) for a in argv]
    code, err = run(argv, capsys)
    assert code == 2 and message in err


def test_read_corpus_refuses_columns_of_a_txt_file(tmp_path):
    txt = write(tmp_path / "t.txt", "a\nb\n")
    for kwargs in ({"column": "text"}, {"id_column": "id"}):
        with pytest.raises(DataFileError, match="a .txt file has no columns"):
            read_corpus(txt, **kwargs)


# ----------------------------------------------------------------------------- folders and missing files
@pytest.mark.parametrize(
    "argv,what",
    [
        (["encode", "{model}", "--input", "{path}", "--out", "{tmp}/e.npy"], "input file"),
        (["eval-sts", "{model}", "--data", "{path}"], "data file"),
        (["eval-retrieval", "{model}", "--data", "{path}"], "data file"),
        (["index", "build", "{model}", "--corpus", "{path}", "--out", "{tmp}/new"], "file"),
        (["search", "{tmp}/i", "--queries", "{path}"], "input file"),
        (["report", "{path}", "--out", "{tmp}/r"], "results file"),
        (["train", "--config", "{path}"], "config file"),
    ],
)
def test_a_folder_is_a_folder_and_a_missing_file_is_not_found(argv, what, tiny_model_dir, tmp_path, capsys):
    SearchIndex.from_embeddings(np.eye(4, 8, dtype=np.float32), shortlist_dim=4).save(tmp_path / "i")
    folder = tmp_path / "folder.tsv"
    folder.mkdir()
    for path, expected in ((folder, "is a folder, not a"), (tmp_path / "missing.tsv", "not found")):
        code, err = run([a.format(model=tiny_model_dir, path=path, tmp=tmp_path) for a in argv], capsys)
        assert code == 2 and expected in err and str(path) in err, err
        if expected == "not found":
            assert "is a folder" not in err


def test_an_index_path_that_is_a_file_says_so(tmp_path, capsys):
    afile = write(tmp_path / "index.json", "{}")
    code, err = run(["search", afile, "--query", "a"], capsys)
    assert code == 2 and "is a file, not a search index folder" in err


# ------------------------------------------------------------------------------------ unordered collections
@pytest.mark.parametrize(
    "texts", [set(SENTENCES[:3]), dict.fromkeys(SENTENCES[:3], 1), frozenset(SENTENCES[:2])]
)
def test_the_api_refuses_unordered_collections(texts, tiny_model):
    with pytest.raises(InvalidInputError, match="no row order"):
        tiny_model.encode(texts)
    with pytest.raises(InvalidInputError, match="no row order"):
        SearchIndex.from_model(tiny_model, texts, shortlist_dim=8)
    index = SearchIndex.from_model(tiny_model, SENTENCES[:4], shortlist_dim=8)
    with pytest.raises(InvalidInputError, match="no row order"):
        index.add_texts(tiny_model, texts)
    with pytest.raises(InvalidInputError, match="no row order"):
        index.search_texts(tiny_model, texts, k=2)
    assert len(index) == 4


def test_ids_and_stored_texts_must_be_ordered_too(tiny_model):
    vectors = np.eye(3, 8, dtype=np.float32)
    with pytest.raises(InvalidInputError, match="ids is a set, which has no row order"):
        SearchIndex.from_embeddings(vectors, ids={"a", "b", "c"}, shortlist_dim=4)
    with pytest.raises(InvalidInputError, match="texts is a set, which has no row order"):
        SearchIndex.from_embeddings(vectors, texts={"x", "y", "z"}, shortlist_dim=4)
    with pytest.raises(InvalidInputError, match="ids is a dict"):
        SearchIndex.from_model(tiny_model, ["a", "b"], ids={"1": 0, "2": 1}, shortlist_dim=8)


def test_min_score_on_an_snli_style_file_is_an_error(tiny_model_dir, tmp_path, capsys):
    snli = write(tmp_path / "snli.tsv", "premise\thypothesis\tlabel\na cat\ta pet\t0\na dog\ta car\t2\n")
    code, err = run(["eval-retrieval", tiny_model_dir, "--data", snli, "--min-score", "3"], capsys)
    assert code == 2 and "--min-score applies to STS-style files" in err


def test_the_qdrant_backend_refuses_unordered_ids_and_texts():
    from matryoshka2d.search.qdrant import QdrantIndex

    vectors = np.eye(3, 16, dtype=np.float32)
    with QdrantIndex.create("c", dim=16, shortlist_dim=8, path=":memory:") as index:
        with pytest.raises(InvalidInputError, match="ids is a set, which has no row order"):
            index.upload(vectors, ids={"a", "b", "c"}, show_progress=False)
        with pytest.raises(InvalidInputError, match="texts is a set, which has no row order"):
            index.upload(vectors, texts={"x", "y", "z"}, show_progress=False)
        assert len(index) == 0
