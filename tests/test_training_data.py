"""Tests of matryoshka2d.training.data: sources, column choice, labels, concatenation and the batch stream."""

from __future__ import annotations

import json

import pytest

from matryoshka2d.errors import DataFileError, InvalidInputError
from matryoshka2d.training.data import (
    BatchStream,
    TaskMixer,
    TrainingData,
    load_training_data,
    parse_hub_source,
    resolve_columns,
)


def write_tsv(path, header, rows):
    path.write_text("\n".join(["\t".join(header), *("\t".join(map(str, r)) for r in rows)]) + "\n")
    return path


@pytest.fixture
def triplets(tmp_path):
    rows = [(f"anchor {i}", f"positive {i}", f"negative {i}") for i in range(6)]
    return write_tsv(tmp_path / "triplets.tsv", ["anchor", "positive", "negative"], rows)


@pytest.fixture
def scored(tmp_path):
    rows = [(f"left {i}", f"right {i}", i % 6) for i in range(8)]
    return write_tsv(tmp_path / "sts.tsv", ["sentence1", "sentence2", "score"], rows)


# ---------------------------------------------------------------------------------------- loading
def test_detects_triplet_layout(triplets):
    data = load_training_data(triplets)
    assert data.columns == ["anchor", "positive", "negative"]
    assert data.labels is None
    assert data.texts[2][3] == "negative 3"
    assert data.describe()["sources"] == [{"source": str(triplets), "rows": 6}]


def test_detects_scored_pairs_with_label(scored):
    data = load_training_data(scored)
    assert data.columns == ["sentence1", "sentence2"]
    assert data.label_column == "score"
    assert data.labels == [float(i % 6) for i in range(8)]
    with pytest.warns(UserWarning, match="column 'score' is not used"):
        assert load_training_data(scored, use_labels=False).labels is None


def test_hard_negative_columns_left_out_by_the_detected_layout_are_named(tmp_path):
    rows = [(f"a {i}", f"p {i}", f"n {i}", f"m {i}") for i in range(4)]
    path = write_tsv(tmp_path / "hn.tsv", ["anchor", "positive", "negative_1", "negative_2"], rows)
    with pytest.warns(UserWarning, match=r"columns \['negative_1', 'negative_2'\] are not used"):
        assert load_training_data(path).columns == ["anchor", "positive"]
    listed = load_training_data(path, columns=["anchor", "positive", "negative_1"])
    assert listed.columns == ["anchor", "positive", "negative_1"]


def test_listed_columns_still_find_the_label_when_labels_are_needed(scored, tmp_path):
    data = load_training_data(scored, columns=["sentence1", "sentence2"], use_labels=True)
    assert data.label_column == "score" and data.labels == [float(i % 6) for i in range(8)]
    mapped = load_training_data(
        scored, columns={"anchor": "sentence2", "positive": "sentence1"}, use_labels=True
    )
    assert mapped.columns == ["sentence2", "sentence1"] and mapped.label_column == "score"
    assert load_training_data(scored, columns=["sentence1", "sentence2"]).labels is None  # not needed: none
    nli = write_tsv(tmp_path / "nli.tsv", ["premise", "hypothesis", "label"], [("p", "h", 0.5)])
    assert load_training_data(nli, columns=["premise", "hypothesis"], use_labels=True).labels == [0.5]
    with pytest.raises(DataFileError, match="needs a label per row"):
        load_training_data(nli, columns=["premise", "label"], use_labels=True)  # 'label' is a text column


def test_explicit_list_and_mapping(tmp_path):
    path = write_tsv(
        tmp_path / "nli.tsv", ["premise", "hypothesis", "other"], [("p1", "h1", "o1"), ("p2", "h2", "o2")]
    )
    as_list = load_training_data(path, columns=["hypothesis", "premise"])
    assert as_list.columns == ["hypothesis", "premise"] and as_list.texts[0] == ["h1", "h2"]
    as_map = load_training_data(path, columns={"positive": "other", "anchor": "premise"})
    assert as_map.columns == ["premise", "other"]
    assert load_training_data(path, columns="premise, other").columns == ["premise", "other"]


@pytest.mark.parametrize(
    ("columns", "message"),
    [
        ({"anchor": "a", "nonsense": "b"}, "unknown column role 'nonsense'"),
        ({"anchor": "a", "negative": "b"}, "skips an input"),
        ({"anchor": "a", "sentence1": "b"}, "two roles"),
        (["a", "a"], "lists a column twice"),
        ([], "columns is empty"),
    ],
)
def test_bad_column_choices(columns, message):
    with pytest.raises(InvalidInputError, match=message):
        resolve_columns(["a", "b"], columns, None, "file")


def test_missing_column_is_named(triplets):
    with pytest.raises(DataFileError, match=r"missing column\(s\) \['premise'\]"):
        load_training_data(triplets, columns=["anchor", "premise"])


def test_unknown_layout_asks_for_columns(tmp_path):
    path = write_tsv(tmp_path / "x.tsv", ["foo", "bar"], [("a", "b")])
    with pytest.raises(DataFileError, match="cannot tell which columns"):
        load_training_data(path)


def test_nan_and_bad_labels(tmp_path):
    nan = write_tsv(
        tmp_path / "nan.tsv", ["sentence1", "sentence2", "score"], [("a", "b", 1), ("c", "d", "nan")]
    )
    with pytest.raises(DataFileError, match="row 2: column 'score' is 'nan'"):
        load_training_data(nan)
    bad = write_tsv(tmp_path / "bad.tsv", ["sentence1", "sentence2", "score"], [("a", "b", "high")])
    with pytest.raises(DataFileError, match="not a number"):
        load_training_data(bad)


@pytest.mark.parametrize(
    ("text", "what"), [("", "empty"), ("   ", "only whitespace"), ("\u3000", "only whitespace")]
)
def test_empty_texts_are_refused_with_row_and_column(tmp_path, text, what):
    rows = [{"anchor": "a cat", "positive": "a dog"}, {"anchor": "the man", "positive": text}]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(DataFileError, match=rf"pairs.jsonl, row 2: column 'positive' is {what}"):
        load_training_data(path)
    with pytest.raises(DataFileError, match="row 2: column 'positive'"):  # also after a good source
        load_training_data([write_tsv(tmp_path / "ok.tsv", ["anchor", "positive"], [("x", "y")]), path])


def test_bad_sizes_are_named():
    data = TrainingData(["a", "b"], [[str(i) for i in range(8)], [f"p{i}" for i in range(8)]])
    with pytest.raises(InvalidInputError, match="batch_size must be an integer, got True"):
        BatchStream(data, True)
    with pytest.raises(InvalidInputError, match="rank=2 is out of range: there are 2 processes"):
        BatchStream(data, 2, num_replicas=2, rank=2)
    with pytest.raises(InvalidInputError, match="max_rows must be >= 1, got 0"):
        load_training_data("x.tsv", max_rows=0)


def test_labels_required_but_absent(triplets):
    with pytest.raises(DataFileError, match="needs a label per row"):
        load_training_data(triplets, use_labels=True)


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "empty.tsv").write_text("")
    with pytest.raises(DataFileError, match="empty file"):
        load_training_data(tmp_path / "empty.tsv")
    (tmp_path / "header.tsv").write_text("anchor\tpositive\n")
    with pytest.raises(DataFileError, match="no data rows"):
        load_training_data(tmp_path / "header.tsv")
    with pytest.raises(DataFileError, match="not found"):
        load_training_data(tmp_path / "missing.tsv")
    with pytest.raises(InvalidInputError, match="no training data"):
        load_training_data([])


def test_concatenates_files_of_different_formats(triplets, tmp_path):
    jsonl = tmp_path / "more.jsonl"
    jsonl.write_text(
        "\n".join(json.dumps({"anchor": f"j{i}", "positive": f"k{i}", "negative": f"l{i}"}) for i in range(3))
    )
    csv = tmp_path / "more.csv"
    csv.write_text('anchor,positive,negative\n"a, quoted",b,c\n')
    data = load_training_data([triplets, jsonl, csv])
    assert len(data) == 6 + 3 + 1
    assert data.texts[0][6] == "j0" and data.texts[0][-1] == "a, quoted"
    assert [s["rows"] for s in data.sources] == [6, 3, 1]


def test_parquet(tmp_path):
    import pyarrow as pa  # a dev dependency: never skipped
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table({"sentence1": ["a", "b"], "sentence2": ["c", "d"], "score": [0.5, 1.0]}),
        tmp_path / "x.parquet",
    )
    data = load_training_data(tmp_path / "x.parquet")
    assert data.labels == [0.5, 1.0] and data.texts[1] == ["c", "d"]


def test_concatenation_needs_the_same_layout(triplets, scored):
    with pytest.raises(DataFileError, match="do not match the earlier sources"):
        load_training_data([triplets, scored])


def test_max_rows_and_label_range(scored):
    data = load_training_data(scored, label_range=[0, 5], max_rows=3)
    assert len(data) == 3 and data.labels == [0.0, 0.2, 0.4]
    with pytest.raises(DataFileError, match="outside label_range"):
        load_training_data(scored, label_range=[0, 4])
    with pytest.raises(InvalidInputError, match="low < high"):
        load_training_data(scored, label_range=[5, 0])
    with pytest.raises(InvalidInputError, match="max_rows"):
        load_training_data(scored, max_rows=0)


# ---------------------------------------------------------------------------------------- hub datasets
def test_parse_hub_source():
    assert parse_hub_source("sentence-transformers/all-nli:triplet@dev") == (
        "sentence-transformers/all-nli",
        "triplet",
        "dev",
    )
    assert parse_hub_source("owner/name") == ("owner/name", None, "train")
    for bad in ("owner/name:", "owner/name@", "a/b/c"):
        with pytest.raises(DataFileError, match="neither an existing data file"):
            parse_hub_source(bad)


def test_hub_dataset_columns_subset_and_split(monkeypatch):
    import datasets  # a dev dependency: never skipped

    calls = []

    def fake_load(name, subset, split):
        calls.append((name, subset, split))
        return datasets.Dataset.from_dict(
            {"anchor": ["a", "b", "c"], "positive": ["d", "e", "f"], "id": [1, 2, 3]}
        )

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    data = load_training_data("someone/pairs:pair@validation", max_rows=2)
    assert calls == [("someone/pairs", "pair", "validation")]
    assert data.columns == ["anchor", "positive"] and data.texts == [["a", "b"], ["d", "e"]]


def test_hub_dataset_failure_is_one_clear_error(monkeypatch):
    import datasets

    def fail(*args, **kwargs):
        raise ConnectionError("offline\nmore details")

    monkeypatch.setattr(datasets, "load_dataset", fail)
    with pytest.raises(
        DataFileError, match=r"cannot load Hugging Face dataset 'nobody/nothing': ConnectionError: offline$"
    ):
        load_training_data("nobody/nothing")


def test_missing_datasets_package_is_explained(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("no module named datasets")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(DataFileError, match="needs the 'datasets' package"):
        load_training_data("owner/name")


# ---------------------------------------------------------------------------------------- batch stream
def make_data(n=40, duplicates=False):
    anchors = [f"a{i % 5}" if duplicates else f"a{i}" for i in range(n)]
    return TrainingData(["anchor", "positive"], [anchors, [f"p{i}" for i in range(n)]])


def take(stream, n):
    it = iter(stream)
    return [next(it) for _ in range(n)]


def test_stream_is_seeded_and_covers_an_epoch():
    data = make_data(40)
    first = take(BatchStream(data, 8, seed=1), 5)
    assert first == take(BatchStream(data, 8, seed=1), 5)
    assert first != take(BatchStream(data, 8, seed=2), 5)
    assert sorted(i for batch in first for i in batch) == list(range(40))  # one epoch = every row once
    two_epochs = take(BatchStream(data, 8, seed=1), 10)
    assert two_epochs[5:] != two_epochs[:5]  # a new order every epoch


def test_stream_drops_the_short_last_batch():
    stream = BatchStream(make_data(20), 8)
    assert [len(b) for b in stream.epoch_batches(0)] == [8, 8]


def test_no_duplicates_within_a_batch():
    data = make_data(40, duplicates=True)  # only 5 distinct anchors
    plain = take(BatchStream(data, 4, seed=0), 10)
    assert any(len({data.texts[0][i] for i in b}) < len(b) for b in plain)  # the check below is meaningful
    stream = BatchStream(data, 4, seed=0, no_duplicates=True)
    batches = stream.epoch_batches(0)
    assert len(batches) >= 8
    for batch in batches:
        texts = [t for i in batch for t in data.row_texts(i)]
        assert len(texts) == len(set(texts))
    assert len({i for b in batches for i in b}) == 4 * len(batches)  # no row used twice in an epoch


def test_no_duplicates_impossible_batch_is_an_error():
    with pytest.raises(InvalidInputError, match="lower batch_size"):
        BatchStream(make_data(40, duplicates=True), 6, no_duplicates=True).epoch_batches(0)


def test_stream_splits_across_processes():
    data = make_data(50)
    ranks = [BatchStream(data, 4, seed=3, num_replicas=2, rank=r).epoch_batches(0) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 6  # 12 full batches of 4, dealt out alternately
    rows = [i for batches in ranks for b in batches for i in b]
    assert len(rows) == len(set(rows)) == 48
    single = BatchStream(data, 4, seed=3).epoch_batches(0)
    assert ranks[0] == single[0::2] and ranks[1] == single[1::2]


def test_stream_resumes_from_its_state():
    data = make_data(30)
    stream = BatchStream(data, 4, seed=5, no_duplicates=True)
    straight = take(stream, 17)  # crosses an epoch boundary (7 batches per epoch)
    first = BatchStream(data, 4, seed=5, no_duplicates=True)
    head = take(first, 9)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = BatchStream(data, 4, seed=5, no_duplicates=True)
    resumed.load_state_dict(state)
    assert head + take(resumed, 8) == straight
    changed = BatchStream(data, 2, seed=5, no_duplicates=True)
    with pytest.raises(InvalidInputError, match="batch_size=4"):
        changed.load_state_dict(state)
    two_processes = BatchStream(data, 4, seed=5, no_duplicates=True, num_replicas=2, rank=1)
    with pytest.raises(InvalidInputError, match="made with 1 process"):
        two_processes.load_state_dict(state)


def test_stream_needs_enough_rows():
    with pytest.raises(InvalidInputError, match="fewer than one batch for every process"):
        BatchStream(make_data(10), 4, num_replicas=3, rank=0)
    with pytest.raises(InvalidInputError, match="batch_size"):
        BatchStream(make_data(10), 0)


# ---------------------------------------------------------------------------------------- several tasks
def test_mixer_of_one_task_is_that_task_s_stream():
    data = make_data(30)
    mixed = take(TaskMixer([BatchStream(data, 4, seed=5)], seed=5), 17)
    assert [task for task, _ in mixed] == [0] * 17
    assert [batch for _, batch in mixed] == take(BatchStream(data, 4, seed=5), 17)


def test_mixer_takes_every_batch_of_every_task_each_epoch_in_proportion():
    big, small = make_data(40), make_data(16)  # 10 and 4 batches of 4 per epoch
    streams = lambda: [BatchStream(big, 4, seed=1), BatchStream(small, 4, seed=1)]  # noqa: E731
    two_epochs = take(TaskMixer(streams(), seed=1), 28)
    for epoch in (two_epochs[:14], two_epochs[14:]):
        assert [task for task, _ in epoch].count(0) == 10 and [task for task, _ in epoch].count(1) == 4
        for t, rows in ((0, 40), (1, 16)):  # each task's own epoch: every row once
            assert sorted(i for task, batch in epoch if task == t for i in batch) == list(range(rows))
    tasks = [task for task, _ in two_epochs]
    assert tasks[:14] != sorted(tasks[:14]) and tasks[:14] != tasks[14:]  # interleaved, new order per epoch
    # The task order depends on the seed only; each task's batches are its own stream's.
    assert two_epochs == take(TaskMixer(streams(), seed=1), 28)
    assert [b for t, b in two_epochs if t == 1] == take(BatchStream(small, 4, seed=1), 8)
    assert [t for t, _ in take(TaskMixer(streams(), seed=2), 14)] != tasks[:14]


def test_mixer_resumes_from_its_state():
    big, small = make_data(40), make_data(16)
    streams = lambda: [BatchStream(big, 4, seed=3), BatchStream(small, 4, seed=3, no_duplicates=True)]  # noqa: E731
    straight = take(TaskMixer(streams(), seed=3), 30)  # crosses two epoch boundaries
    first = TaskMixer(streams(), seed=3)
    head = take(first, 11)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = TaskMixer(streams(), seed=3)
    resumed.load_state_dict(state)
    assert head + take(resumed, 19) == straight
    with pytest.raises(InvalidInputError, match="made with 2 training task"):
        TaskMixer([BatchStream(big, 4, seed=3)], seed=3).load_state_dict(state)
    with pytest.raises(InvalidInputError, match="seed=3"):
        TaskMixer(streams(), seed=4).load_state_dict(state)
