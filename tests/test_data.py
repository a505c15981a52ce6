"""Data files: formats and the errors for bad files."""

from __future__ import annotations

import json

import pytest

from matryoshka2d.data import load_sts, read_corpus, read_rows, read_texts
from matryoshka2d.errors import DataFileError


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_formats_agree(tmp_path):
    rows = [
        {"sentence1": 'a "quoted" cat', "sentence2": "b", "score": "1.5"},
        {"sentence1": "c", "sentence2": "d", "score": "4"},
    ]
    tsv = write(
        tmp_path / "d.tsv",
        "sentence1\tsentence2\tscore\n"
        + "".join(f"{r['sentence1']}\t{r['sentence2']}\t{r['score']}\n" for r in rows),
    )
    csv = write(tmp_path / "d.csv", 'sentence1,sentence2,score\n"a ""quoted"" cat",b,1.5\nc,d,4\n')
    jsonl = write(
        tmp_path / "d.jsonl", "\n".join(json.dumps({**r, "score": float(r["score"])}) for r in rows) + "\n"
    )
    for path in (tsv, csv, jsonl):
        data = load_sts(path)
        assert data.sentence1 == ['a "quoted" cat', "c"] and data.scores == [1.5, 4.0]


def test_tsv_with_csv_quoting_as_in_the_shared_files(tmp_path):
    path = write(
        tmp_path / "q.tsv", 'sentence1\tsentence2\tscore\n"A pool that says ""no diving""."\tb\t1\nc\td\t2\n'
    )
    assert load_sts(path).sentence1 == ['A pool that says "no diving".', "c"]


def test_parquet(tmp_path):
    import pyarrow as pa  # a dev dependency: never skipped
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table({"sentence1": ["a", "b"], "sentence2": ["c", "d"], "score": [0.0, 1.0]}),
        tmp_path / "d.parquet",
    )
    assert load_sts(tmp_path / "d.parquet").scores == [0.0, 1.0]


@pytest.mark.parametrize(
    "content,message",
    [
        ("", "empty file"),
        ("sentence1\tsentence2\tscore\n", "no data rows"),
        ("sentence1\tscore\na\t1\n", r"missing column\(s\) \['sentence2'\]"),
        ("sentence1\tsentence2\tscore\na\tb\tnan\nc\td\t2\n", "not a finite number"),
        (
            "sentence1\tsentence2\tscore\na\tb\thigh\nc\td\t2\n",
            "row 1: column 'score' is 'high', not a number",
        ),
        ("sentence1\tsentence2\tscore\na\tb\t2\nc\td\t2\n", "every score is 2.0"),
        ("sentence1\tsentence2\tscore\na\tb\t2\n  \td\t3\n", "row 2: column 'sentence1' is only whitespace"),
        ("sentence1\tsentence2\tscore\na\t\t2\nc\td\t3\n", "row 1: column 'sentence2' is empty"),
    ],
)
def test_bad_sts_files(tmp_path, content, message):
    with pytest.raises(DataFileError, match=message):
        load_sts(write(tmp_path / "bad.tsv", content))


def test_a_corpus_to_encode_may_hold_an_empty_text(tmp_path):
    """Only training and evaluation data refuse empty texts; a corpus row keeps its place."""
    texts, ids = read_corpus(write(tmp_path / "c.csv", "text,id\nhello,a\n,b\nbye,c\n"), None, "id")
    assert texts == ["hello", "", "bye"] and ids == ["a", "b", "c"]


def test_sts_data_of_unequal_lengths_is_refused_at_once():
    from matryoshka2d.data import StsData
    from matryoshka2d.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="as many sentence1, sentence2 and scores, got 1, 2 and 1"):
        StsData(["a"], ["b", "c"], [1.0])


def test_json_booleans_are_not_scores(tmp_path):
    rows = [
        {"sentence1": "a", "sentence2": "b", "score": True},
        {"sentence1": "c", "sentence2": "d", "score": 2},
    ]
    path = write(tmp_path / "s.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(DataFileError, match="row 1: column 'score' is True, not a number"):
        load_sts(path)


def test_a_tsv_field_past_the_csv_modules_default_limit(tmp_path):
    long = "word " * 40_000  # 200,000 characters: csv's default limit is 131,072
    texts = read_texts(write(tmp_path / "big.tsv", f"text\n{long}\nshort\n"))
    assert texts == [long, "short"]


def test_missing_file_and_unknown_type(tmp_path):
    with pytest.raises(DataFileError, match="not found"):
        read_rows(tmp_path / "nope.tsv")
    with pytest.raises(DataFileError, match="unknown data file type"):
        read_rows(write(tmp_path / "x.xml", "<a/>"))
    with pytest.raises(DataFileError, match="line 2: not valid JSON"):
        read_rows(write(tmp_path / "x.jsonl", '{"a": 1}\n{oops\n'))


def test_read_texts(tmp_path):
    assert read_texts(write(tmp_path / "t.txt", "one\ntwo\n\n \n")) == [
        "one",
        "two",
    ]  # trailing blanks: ignored
    with pytest.raises(DataFileError, match=r"t2.txt, line 2: blank line; every line is one row"):
        read_texts(write(tmp_path / "t2.txt", "one\n\ntwo\n"))
    assert read_texts(write(tmp_path / "t.tsv", "id\ttext\n1\thello\n"), None) == ["hello"]
    assert read_texts(write(tmp_path / "u.tsv", "id\tbody\n1\thello\n"), "body") == ["hello"]
    with pytest.raises(DataFileError, match="empty"):
        read_texts(write(tmp_path / "e.txt", "\n\n"))
    with pytest.raises(DataFileError, match="missing column"):
        read_texts(tmp_path / "t.tsv", "body")


def test_not_utf8_files_name_the_file_and_line(tmp_path):
    latin1 = "sentence1\tsentence2\tscore\nca\tb\t1\ncaf\u00e9\td\t2\n".encode("latin-1")
    for name in ("bad.tsv", "bad.csv", "bad.jsonl", "bad.txt"):
        path = tmp_path / name
        path.write_bytes(latin1)
        with pytest.raises(DataFileError, match=rf"{name}, line 3: not UTF-8 text"):
            read_texts(path) if name.endswith(".txt") else read_rows(path)


def test_malformed_csv_gives_data_file_error(tmp_path):
    with pytest.raises(DataFileError, match=r"bad.csv, line 2: malformed csv \(',' expected after"):
        read_rows(write(tmp_path / "bad.csv", 'id,text\n1,"a"b\n'))
    with pytest.raises(DataFileError, match=r"short.csv, line 3: 1 field\(s\), but the header has 2"):
        read_rows(write(tmp_path / "short.csv", "id,text\n1,a\nb\n"))
    with pytest.raises(DataFileError, match=r"long.tsv, line 2: 3 field\(s\), but the header has 2"):
        read_rows(write(tmp_path / "long.tsv", "id\ttext\n1\ta\tb\n"))


def test_byte_order_mark_and_crlf(tmp_path):
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbftext,id\r\nhello,1\r\nworld,2\r\n")
    assert read_rows(tmp_path / "bom.csv") == [{"text": "hello", "id": "1"}, {"text": "world", "id": "2"}]
    (tmp_path / "crlf.txt").write_bytes(b"one\r\ntwo\r\n")
    assert read_texts(tmp_path / "crlf.txt") == ["one", "two"]


def test_json_array_and_json_lines_in_a_json_file(tmp_path):
    rows = [{"text": "a", "id": 1}, {"text": "b", "id": 2}]
    assert read_rows(write(tmp_path / "a.json", json.dumps(rows, indent=2))) == rows
    assert read_rows(write(tmp_path / "l.json", "\n".join(map(json.dumps, rows)))) == rows
    assert read_texts(tmp_path / "a.json") == ["a", "b"]
    with pytest.raises(DataFileError, match="item 1 of the JSON array is int"):
        read_rows(write(tmp_path / "n.json", '[{"text": "a"}, 3]'))
    with pytest.raises(DataFileError, match="expected a JSON array of objects, got str"):
        read_rows(write(tmp_path / "s.json", '"text"'))
    with pytest.raises(DataFileError, match="line 2: not valid JSON"):
        read_rows(write(tmp_path / "x.json", '{"a": 1}\n{oops\n'))


def test_read_texts_closes_the_file(tmp_path, monkeypatch):
    import gc
    import sys
    import warnings

    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)  # where an unclosed file's warning goes
    path = write(tmp_path / "t.txt", "one\ntwo\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)
        assert read_texts(path) == ["one", "two"]
        gc.collect()
    assert not unraisable, [u.exc_value for u in unraisable]


def test_read_corpus_ids(tmp_path):
    path = write(tmp_path / "c.jsonl", '{"id": "a", "text": "one"}\n{"id": 7, "text": "two"}\n')
    assert read_corpus(path, id_column="id") == (["one", "two"], ["a", "7"])
    assert read_corpus(path) == (["one", "two"], None)
    assert read_corpus(write(tmp_path / "c.txt", "one\n")) == (["one"], None)
    with pytest.raises(
        DataFileError, match=r"an id column \('id'\) was given, but a .txt file has no columns"
    ):
        read_corpus(tmp_path / "c.txt", id_column="id")


@pytest.mark.parametrize(
    "content,message",
    [
        ('{"id": "a", "text": "one"}\n{"text": "two"}\n', "row 2: id column 'id' is None"),
        ('{"id": "a", "text": "one"}\n{"id": null, "text": "two"}\n', "row 2: id column 'id' is None"),
        ('{"id": "a", "text": "one"}\n{"id": " ", "text": "two"}\n', "row 2: id column 'id' is ' '"),
        ('{"id": "a", "text": "one"}\n{"id": 1.5, "text": "two"}\n', "row 2: id column 'id' is 1.5"),
        ('{"id": "a", "text": "one"}\n{"id": "a", "text": "two"}\n', "rows 1 and 2: duplicate id 'a'"),
        ('{"key": "a", "text": "one"}\n', r"missing column\(s\) \['id'\]"),
    ],
)
def test_bad_ids(tmp_path, content, message):
    with pytest.raises(DataFileError, match=message):
        read_corpus(write(tmp_path / "c.jsonl", content), id_column="id")
