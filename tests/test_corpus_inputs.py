"""Corpus inputs (matryoshka2d.corpus.inputs): expansion, shard planning and reading shards from cursors."""

from __future__ import annotations

import json
import random

import pytest
from conftest import WORDS

from matryoshka2d.corpus.inputs import expand_inputs, plan_corpus, read_shard
from matryoshka2d.errors import DataFileError


def corpus_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12))) for _ in range(n)]


def all_rows(plan):
    texts, ids = [], []
    for shard in plan.shards:
        t, i = read_shard(plan, shard)
        assert len(t) == shard.rows
        texts += t
        ids += i or []
    return texts, ids


def write_formats(tmp_path, texts):
    """The same texts (and ids doc-0, doc-1, ...) as txt, jsonl, csv, tsv and parquet files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    ids = [f"doc-{i}" for i in range(len(texts))]
    files = {}
    files["txt"] = tmp_path / "c.txt"
    # a BOM, CRLF line ends, blank lines at the end
    files["txt"].write_text("\ufeff" + "\r\n".join(texts) + "\r\n\r\n  \n", encoding="utf-8")
    files["jsonl"] = tmp_path / "c.jsonl"
    files["jsonl"].write_text(
        "\n".join(json.dumps({"id": i, "body": t, "n": 1}) for i, t in zip(ids, texts)) + "\n\n",
        encoding="utf-8",
    )
    files["csv"] = tmp_path / "c.csv"
    files["csv"].write_text(
        "id,body\n" + "".join(f'{i},"{t}"\n' for i, t in zip(ids, texts)), encoding="utf-8"
    )
    files["tsv"] = tmp_path / "c.tsv"
    files["tsv"].write_text(
        "id\tbody\n" + "".join(f"{i}\t{t}\n" for i, t in zip(ids, texts)), encoding="utf-8"
    )
    files["parquet"] = tmp_path / "c.parquet"
    pq.write_table(pa.table({"id": ids, "body": texts}), files["parquet"], row_group_size=7)
    return files, ids


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "csv", "tsv", "parquet"])
@pytest.mark.parametrize("shard_rows", [1, 10, 25, 1000])
def test_every_format_reads_back_the_same_rows_shard_by_shard(tmp_path, fmt, shard_rows):
    texts = corpus_texts(53)
    files, ids = write_formats(tmp_path, texts)
    id_column = None if fmt == "txt" else "id"
    text_column = None if fmt == "txt" else "body"
    plan = plan_corpus([files[fmt]], text_column=text_column, id_column=id_column, shard_rows=shard_rows)
    assert plan.rows == 53
    assert [s.rows for s in plan.shards] == [min(shard_rows, 53 - i) for i in range(0, 53, shard_rows)]
    assert [s.first_row for s in plan.shards] == list(range(0, 53, shard_rows))
    got_texts, got_ids = all_rows(plan)
    assert got_texts == texts
    assert got_ids == ([] if fmt == "txt" else ids)
    # Shards are independent: reading them in reverse order gives the same rows.
    for shard in reversed(plan.shards):
        assert read_shard(plan, shard)[0] == texts[shard.first_row : shard.first_row + shard.rows]


def test_shards_never_span_files_and_row_numbers_continue_across_files(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("\n".join(corpus_texts(7, 1)) + "\n", encoding="utf-8")
    b.write_text("\n".join(corpus_texts(5, 2)) + "\n", encoding="utf-8")
    plan = plan_corpus(expand_inputs([str(tmp_path / "*.txt")]), shard_rows=3)
    assert [(s.input, s.rows, s.first_row) for s in plan.shards] == [
        (0, 3, 0),
        (0, 3, 3),
        (0, 1, 6),
        (1, 3, 7),
        (1, 2, 10),
    ]
    assert all_rows(plan)[0] == corpus_texts(7, 1) + corpus_texts(5, 2)
    assert [f.rows for f in plan.inputs] == [7, 5]


def test_csv_quoted_newlines_and_default_text_column(tmp_path):
    path = tmp_path / "q.csv"
    path.write_text('title,text\nx,"line one\nline two"\ny,plain\nz,"say ""hi"""\n', encoding="utf-8")
    plan = plan_corpus([path], shard_rows=1)  # default text column: "text"
    assert all_rows(plan)[0] == ["line one\nline two", "plain", 'say "hi"']
    assert plan.text_column == "text"


def test_jsonl_default_text_column_is_text_or_the_first_key(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"body": "one", "k": 1}\n{"body": "two", "k": 2}\n', encoding="utf-8")
    plan = plan_corpus([path])
    assert plan.text_column == "body" and all_rows(plan)[0] == ["one", "two"]


def test_input_hash_changes_with_the_content(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("a cat\nthe dog\n", encoding="utf-8")
    first = plan_corpus([path]).inputs[0]
    path.write_text("a cat\nthe cat\n", encoding="utf-8")
    second = plan_corpus([path]).inputs[0]
    assert first.size == second.size and first.sha256 != second.sha256


def test_expand_inputs_orders_globs_and_folders_by_name(tmp_path):
    for name in ("b.txt", "a.jsonl", "c.parquet", "notes.md"):
        (tmp_path / name).write_text("x\n", encoding="utf-8")
    assert [p.name for p in expand_inputs([str(tmp_path)])] == ["a.jsonl", "b.txt", "c.parquet"]
    assert [p.name for p in expand_inputs([str(tmp_path / "*.txt"), str(tmp_path / "b.txt")])] == ["b.txt"]


@pytest.mark.parametrize(
    "name, content, kwargs, message",
    [
        ("a.txt", "x\n", {"id_column": "id"}, "--id-column needs table files"),
        ("a.txt", "\n  \n", {}, "no texts to encode"),
        ("a.jsonl", '{"text": "a"}\n{"text": 3}\n', {}, "line 2: column 'text' is 3"),
        ("a.jsonl", '{"text": "a"}\nnot json\n', {}, "line 2: not valid JSON"),
        ("a.jsonl", '{"text": "a"}\n[1]\n', {}, "line 2: expected a JSON object"),
        ("a.jsonl", '{"text": "a", "id": ""}\n', {"id_column": "id"}, "id column 'id' is ''"),
        ("a.csv", "a,b\n1,2\n3\n", {}, "line 3: 1 field(s)"),
        ("a.csv", "a,b\n1,2\n", {"text_column": "body"}, "missing text column 'body'"),
        ("a.csv", "", {}, "empty file"),
        ("a.tsv", "text\tid\nx\t\n", {"id_column": "id"}, "id column 'id' is ''"),
    ],
)
def test_bad_inputs_are_named_with_file_and_line(tmp_path, name, content, kwargs, message):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataFileError, match=None) as info:
        plan_corpus([path], **kwargs)
    assert message in str(info.value) and str(path) in str(info.value)


def test_bad_bytes_and_parquet_values_are_refused(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\nnot \xff utf8\n")
    with pytest.raises(DataFileError, match="line 2: not UTF-8"):
        plan_corpus([bad])
    nulls = tmp_path / "nulls.parquet"
    pq.write_table(pa.table({"text": ["a", None, "c"]}), nulls)
    with pytest.raises(DataFileError, match="row 2: column 'text' is None"):
        plan_corpus([nulls])
    numbers = tmp_path / "numbers.parquet"
    pq.write_table(pa.table({"text": [1.5, 2.5]}), numbers)
    with pytest.raises(DataFileError, match="holds double, expected text"):
        plan_corpus([numbers])
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet at all")
    with pytest.raises(DataFileError, match="cannot read parquet"):
        plan_corpus([junk])


@pytest.mark.parametrize(
    "pattern, message",
    [
        ("missing.txt", "input file not found"),
        ("*.nothing", "no file matches"),
        ("x.md", "unsupported input type"),
    ],
)
def test_expand_inputs_refuses_what_it_cannot_read(tmp_path, pattern, message):
    (tmp_path / "x.md").write_text("x\n", encoding="utf-8")
    with pytest.raises(DataFileError, match=message):
        expand_inputs([str(tmp_path / pattern)])


def test_a_file_changed_after_planning_is_detected_when_reading(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("\n".join(corpus_texts(10)) + "\n", encoding="utf-8")
    plan = plan_corpus([path], shard_rows=4)
    path.write_text("\n".join(corpus_texts(5)) + "\n", encoding="utf-8")
    with pytest.raises(DataFileError, match="the file changed"):
        read_shard(plan, plan.shards[2])


@pytest.mark.parametrize("fmt", ["txt", "jsonl"])
def test_a_blank_line_before_the_last_text_is_refused_with_its_line(tmp_path, fmt):
    """Skipping it would make row i (and its default id) another line than i; m2d encode refuses it too."""
    lines = ["first", "", "third"] if fmt == "txt" else ['{"text": "first"}', "  ", '{"text": "third"}']
    path = tmp_path / f"c.{fmt}"
    path.write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    with pytest.raises(DataFileError, match=r"c\.(txt|jsonl), line 2: blank line before the last text"):
        plan_corpus([path], shard_rows=10)
    if fmt == "jsonl":  # rows with ids of their own: blank lines are skipped, as before
        path.write_text('{"id": "a", "text": "one"}\n\n{"id": "b", "text": "two"}\n', encoding="utf-8")
        plan = plan_corpus([path], id_column="id", shard_rows=10)
        assert read_shard(plan, plan.shards[0]) == (["one", "two"], ["a", "b"])


@pytest.mark.parametrize("fmt", ["csv", "tsv"])
def test_a_quote_that_never_closes_is_an_error_not_one_field_holding_the_rest(tmp_path, fmt):
    sep = "," if fmt == "csv" else "\t"
    path = tmp_path / f"c.{fmt}"
    path.write_text(f'id{sep}text\n1{sep}x\n2{sep}"a dog sat\n3{sep}x\n4{sep}x\n')
    with pytest.raises(DataFileError, match=r"line 3: malformed .*unexpected end of data"):
        plan_corpus([path], text_column="text", shard_rows=10)
    ok = tmp_path / f"ok.{fmt}"  # a quoted field may hold a line break
    ok.write_text(f'id{sep}text\n1{sep}"two\nlines"\n2{sep}x\n')
    plan = plan_corpus([ok], text_column="text", shard_rows=10)
    assert read_shard(plan, plan.shards[0])[0] == ["two\nlines", "x"]


def test_an_input_that_changes_while_the_job_runs_stops_it(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("".join(f"text {i}\n" for i in range(6)), encoding="utf-8")
    plan = plan_corpus([path], shard_rows=2)
    assert read_shard(plan, plan.shards[1])[0] == ["text 2", "text 3"]
    path.write_text("an inserted line\n" + path.read_text(encoding="utf-8"), encoding="utf-8")
    with pytest.raises(DataFileError, match="the file changed while the job ran"):
        read_shard(plan, plan.shards[1])  # its cursor would land inside a line
    path.write_text("".join(f"TEXT {i}\n" for i in range(6)), encoding="utf-8")  # same size, other texts
    read_shard(plan, plan.shards[1])  # the size check alone cannot tell ...
    with pytest.raises(DataFileError, match="other contents"):
        plan.inputs[0].check_unchanged(hash_it=True)  # ... the hash before "complete" does
