"""The m2d command line: happy paths and one-line errors with exit code 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import SENTENCES, prompted_copy

from matryoshka2d import EmbeddingModel, InvalidInputError
from matryoshka2d.cli import main


def test_encode(tiny_model_dir, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(SENTENCES) + "\n")
    out = tmp_path / "emb.npy"
    assert (
        main(
            [
                "encode",
                str(tiny_model_dir),
                "--input",
                str(texts),
                "--layers",
                "2",
                "--dim",
                "8",
                "--dtype",
                "float32",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    emb = np.load(out)
    expected = EmbeddingModel.load(tiny_model_dir).encode(SENTENCES, layers=2, dim=8)
    np.testing.assert_allclose(emb, expected, atol=1e-6)


def test_encode_with_a_prompt(tiny_model_dir, tmp_path, capsys):
    folder = prompted_copy(tiny_model_dir, tmp_path / "prompted")
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(SENTENCES) + "\n")
    model = EmbeddingModel.load(folder)
    for flags, kwargs in (
        (["--prompt-name", "document"], {"prompt_name": "document"}),
        (["--prompt", "q: "], {"prompt": "q: "}),
    ):
        out = tmp_path / f"{flags[0].strip('-')}.npy"
        assert (
            main(["encode", str(folder), "--input", str(texts), "--dim", "8", "--out", str(out), *flags]) == 0
        )
        np.testing.assert_allclose(np.load(out), model.encode(SENTENCES, dim=8, **kwargs), atol=1e-6)
    base = ["encode", str(folder), "--input", str(texts)]
    assert main([*base, "--out", str(tmp_path / "x.npy"), "--prompt-name", "doc"]) == 2
    err = capsys.readouterr().err
    assert "prompt_name 'doc' is not one of the model's prompts ('document', 'query')" in err
    with pytest.raises(SystemExit):  # argparse: not both
        main([*base, "--out", str(tmp_path / "y.npy"), "--prompt-name", "query", "--prompt", "q"])
    assert not (tmp_path / "x.npy").exists()


def test_eval_sts_json(tiny_model_dir, sts_file, tmp_path, capsys):
    out = tmp_path / "grid.json"
    code = main(
        [
            "eval-sts",
            str(tiny_model_dir),
            "--data",
            str(sts_file),
            "--layers",
            "1,2",
            "--dims",
            "32,8",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    result = json.loads(out.read_text())
    assert result["layers"] == [1, 2] and result["dims"] == [32, 8]
    assert np.array(result["spearman"]).shape == (2, 2) and result["model"] == str(tiny_model_dir)
    table = capsys.readouterr().out
    assert "layers" in table and f"{result['spearman'][1][1]:.2f}" in table


def test_truncate(tiny_model_dir, tmp_path):
    out = tmp_path / "small"
    assert main(["truncate", str(tiny_model_dir), "--layers", "2", "--dim", "16", "--out", str(out)]) == 0
    small = EmbeddingModel.load(out)
    assert (small.num_layers, small.dim) == (2, 16)


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["truncate", "{model}", "--layers", "7", "--out", "{tmp}/x"],
            "layers=7 is out of range: the model has 1..4",
        ),
        (["truncate", "{model}", "--dim", "99", "--out", "{tmp}/x"], "dim=99 is out of range"),
        (["eval-sts", "{model}", "--data", "{tmp}/missing.tsv"], "data file not found"),
        (["eval-sts", "{tmp}/no-model", "--data", "{sts}"], "model folder not found"),
        (["encode", "{model}", "--input", "{tmp}/empty.txt", "--out", "{tmp}/e.npy"], "no texts"),
        (["truncate", "{model}", "--layers", "0", "--out", "{tmp}/x"], "layers=0 is out of range"),
        (
            ["encode", "{model}", "--input", "{sts}", "--dim", "0", "--out", "{tmp}/e.npy"],
            "dim=0 is out of range",
        ),
        (["eval-sts", "{tmp}", "--data", "{sts}"], "is not a model folder"),
        (["eval-sts", "{model}", "--data", "{tmp}/nocol.tsv"], "score"),
        (["eval-sts", "{model}", "--data", "{tmp}/nan.tsv"], "'nan', not a finite number"),
        (["eval-sts", "{model}", "--data", "{tmp}/word.tsv"], "'high', not a number"),
        (["eval-sts", "{model}", "--data", "{tmp}/header.tsv"], "no data rows"),
        (["eval-sts", "{model}", "--data", "{sts}", "--layers", "one"], "comma-separated integers"),
        (
            ["encode", "{model}", "--input", "{sts}", "--out", "{tmp}"],
            "is a folder: give the path of the embeddings file",
        ),
    ],
)
def test_errors_are_one_line_with_exit_code_2(tiny_model_dir, sts_file, tmp_path, args, message, capsys):
    (tmp_path / "empty.txt").write_text("\n")
    (tmp_path / "nocol.tsv").write_text("sentence1\tsentence2\na\tb\n")
    (tmp_path / "nan.tsv").write_text("sentence1\tsentence2\tscore\na\tb\tnan\n")
    (tmp_path / "word.tsv").write_text("sentence1\tsentence2\tscore\na\tb\thigh\n")
    (tmp_path / "header.tsv").write_text("sentence1\tsentence2\tscore\n")
    argv = [a.format(model=tiny_model_dir, tmp=tmp_path, sts=sts_file) for a in args]
    try:  # in-process (a subprocess per case costs a torch import each); an exception would fail the test
        code = main(argv)
    except SystemExit as e:  # argparse usage errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["eval-sts", "m", "--data", "d.tsv", "--layers", "one,two"])
    assert exc.value.code == 2
    assert "comma-separated integers" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--epochs", "0"])
    assert exc.value.code == 2
    assert "--epochs: must be >= 1, got 0" in capsys.readouterr().err


def test_demo_epochs_reach_every_training_run(monkeypatch, tmp_path):
    import matryoshka2d.demo.experiment as experiment

    seen = {}
    monkeypatch.setattr(experiment, "run_demo", lambda out, work, **kwargs: seen.update(kwargs) or out)
    assert main(["demo", "--out", str(tmp_path / "r"), "--work", str(tmp_path / "w"), "--epochs", "1"]) == 0
    assert seen["common"] == {"epochs": 1}
    assert main(["demo", "--out", str(tmp_path / "r"), "--work", str(tmp_path / "w")]) == 0
    assert seen["common"] is None  # the demo's own schedule (COMMON)


# ---------------------------------------------------------------------- search and retrieval commands
@pytest.fixture
def corpus_tsv(tmp_path):
    path = tmp_path / "corpus.tsv"
    rows = ["id\ttext"] + [f"doc-{i}\t{s}" for i, s in enumerate(SENTENCES)]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def test_index_build_and_search(tiny_model_dir, corpus_tsv, tmp_path, capsys):
    out = tmp_path / "index"
    argv = ["index", "build", str(tiny_model_dir), "--corpus", str(corpus_tsv), "--id-column", "id"]
    assert main([*argv, "--out", str(out), "--shortlist-dim", "16", "--layers", "3"]) == 0
    assert "indexed 12 documents (32 dims)" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"] == str(tiny_model_dir.resolve()) and manifest["layers"] == 3
    assert manifest["shortlist"]["dim"] == 16 and manifest["count"] == 12

    hits_file = tmp_path / "hits.json"
    queries = [SENTENCES[2], SENTENCES[5]]
    argv = ["search", str(out), "--query", queries[0], "--query", queries[1], "-k", "3", "--shortlist", "6"]
    assert main([*argv, "--json", str(hits_file)]) == 0
    printed = capsys.readouterr().out
    hits = json.loads(hits_file.read_text())
    from matryoshka2d.search.index import SearchIndex

    expected = SearchIndex.load(out).search_texts(
        EmbeddingModel.load(tiny_model_dir), queries, k=3, shortlist=6
    )
    assert [h["query"] for h in hits] == queries
    assert [[hit["id"] for hit in h["hits"]] for h in hits] == expected.ids
    assert hits[0]["hits"][0]["text"] == SENTENCES[int(expected.ids[0][0].split("-")[1])]
    assert f"query: {queries[1]}" in printed and expected.ids[1][2] in printed


def test_index_and_search_with_document_and_query_prompts(tiny_model_dir, tmp_path, capsys):
    from matryoshka2d.search.index import SearchIndex

    folder = prompted_copy(tiny_model_dir, tmp_path / "prompted")
    model = EmbeddingModel.load(folder)
    corpus, more = tmp_path / "corpus.txt", tmp_path / "more.txt"
    corpus.write_text("\n".join(SENTENCES[:8]) + "\n")
    more.write_text("\n".join(SENTENCES[8:]) + "\n")
    out = tmp_path / "index"
    build = [
        "index",
        "build",
        str(folder),
        "--corpus",
        str(corpus),
        "--out",
        str(out),
        "--shortlist-dim",
        "8",
    ]
    assert main([*build, "--prompt-name", "documents"]) == 2  # a typo: refused before any encoding
    assert "('document', 'query')" in capsys.readouterr().err and not out.exists()
    assert main([*build, "--prompt-name", "document"]) == 0
    assert main(["index", "add", str(out), "--corpus", str(more)]) == 0  # the recorded prompt
    assert main(["index", "add", str(out), "--corpus", str(more), "--prompt", "q: "]) == 2
    assert "encoded with the prompt 'passage: ', not 'q: '" in capsys.readouterr().err
    index = SearchIndex.load(out)
    assert index.document_prompt == "passage: " and len(index) == len(SENTENCES)
    np.testing.assert_allclose(index.vectors, model.encode(SENTENCES, prompt_name="document"), atol=1e-6)
    hits_file = tmp_path / "hits.json"
    argv = ["search", str(out), "--query", SENTENCES[3], "-k", "4", "--prompt-name", "query"]
    assert main([*argv, "--json", str(hits_file)]) == 0
    expected = index.search(model.encode([SENTENCES[3]], prompt_name="query"), k=4)
    assert [hit["id"] for hit in json.loads(hits_file.read_text())[0]["hits"]] == expected.ids[0]


def test_index_add_and_search_a_queries_file(tiny_model_dir, tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(SENTENCES[:8]) + "\n")
    more = tmp_path / "more.txt"
    more.write_text("\n".join(SENTENCES[8:]) + "\n")
    out = tmp_path / "index"
    assert main(["index", "build", str(tiny_model_dir), "--corpus", str(corpus), "--out", str(out)]) == 0
    assert main(["index", "add", str(out), "--corpus", str(more)]) == 0
    assert "added 4 documents" in capsys.readouterr().out
    queries = tmp_path / "queries.txt"
    queries.write_text(SENTENCES[10] + "\n")
    assert (
        main(["search", str(out), "--queries", str(queries), "-k", "12", "--json", str(tmp_path / "h.json")])
        == 0
    )
    hits = json.loads((tmp_path / "h.json").read_text())[0]["hits"]
    assert sorted(int(h["id"]) for h in hits) == list(range(12))  # ids continue after the first 8
    assert hits[0]["score"] >= hits[-1]["score"]


def test_k_past_the_corpus_and_the_default_shortlist_is_clamped(tiny_model_dir, tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(SENTENCES[i % len(SENTENCES)] for i in range(250)) + "\n")
    out = tmp_path / "index"
    assert main(["index", "build", str(tiny_model_dir), "--corpus", str(corpus), "--out", str(out)]) == 0
    capsys.readouterr()
    argv = ["search", str(out), "--query", "a cat", "-k", "1000", "--json", str(tmp_path / "h.json")]
    assert main(argv) == 0  # the default shortlist (200) grows with k instead of refusing k
    assert "k=1000 is larger than the corpus (250 documents); returning 250 hits" in capsys.readouterr().err
    assert len(json.loads((tmp_path / "h.json").read_text())[0]["hits"]) == 250


@pytest.mark.parametrize(
    "args,message",
    [
        (["search", "{index}", "--query", "a cat", "-k", "0"], "k must be a positive integer, got 0"),
        (
            ["search", "{index}", "--query", "a cat", "-k", "10", "--shortlist", "5"],
            "shortlist=5 is smaller than k=10",
        ),
        (["search", "{index}"], "either with --query"),
        (["search", "{index}", "--query", "a cat", "--query", "  "], "--query number 2 is blank"),
        (["search", "{tmp}/missing", "--query", "a cat"], "search index folder not found"),
        (
            ["search", "{index}", "--query", "a cat", "--model", "{small}"],
            "makes 16-dim embeddings but the index",
        ),
        (
            ["index", "build", "{model}", "--corpus", "{dup}", "--id-column", "id", "--out", "{tmp}/x"],
            "duplicate id 'a'",
        ),
        (
            ["index", "build", "{model}", "--corpus", "{dup}", "--out", "{tmp}/x", "--shortlist-dim", "99"],
            "dim=99",
        ),
        (
            [
                "index",
                "build",
                "{model}",
                "--corpus",
                "{dup}",
                "--out",
                "{tmp}/x",
                "--shortlist-dim",
                "12",
                "--quantization",
                "binary",
            ],
            "multiple of 8, got 12",
        ),
        (
            ["index", "build", "{model}", "--corpus", "{tmp}/none.txt", "--out", "{tmp}/x"],
            "input file not found",
        ),
        (
            ["eval-retrieval", "{model}", "--data", "{dup}"],
            "expected columns premise, hypothesis, label (SNLI style) or sentence1, sentence2, score",
        ),
    ],
)
def test_search_errors_are_one_line_with_exit_code_2(tiny_model_dir, tmp_path, capsys, args, message):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(SENTENCES) + "\n")
    assert (
        main(
            ["index", "build", str(tiny_model_dir), "--corpus", str(corpus), "--out", str(tmp_path / "index")]
        )
        == 0
    )
    small = EmbeddingModel.load(tiny_model_dir).truncate(dim=16).save(tmp_path / "small")
    dup = tmp_path / "dup.tsv"
    dup.write_text("id\ttext\na\tone\nb\ttwo\na\tthree\n")
    fields = dict(index=tmp_path / "index", tmp=tmp_path, model=tiny_model_dir, small=small, dup=dup)
    capsys.readouterr()
    assert main([a.format(**fields) for a in args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "name,content,message",
    [
        (
            "c.jsonl",
            '{"id": "a", "text": "one"}\n{"text": "two"}\n',
            "c.jsonl, row 2: id column 'id' is None",
        ),
        ("c.csv", "id,text\na,one\ntwo\n", "c.csv, line 3: 1 field(s), but the header has 2"),
        ("c.txt", "one\ntwo\n", "c.txt: an id column ('id') was given, but a .txt file has no columns"),
    ],
)
def test_index_build_rejects_rows_without_an_id(tiny_model_dir, tmp_path, capsys, name, content, message):
    corpus = tmp_path / name
    corpus.write_text(content)
    argv = ["index", "build", str(tiny_model_dir), "--corpus", str(corpus), "--id-column", "id"]
    assert main([*argv, "--out", str(tmp_path / "index")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "index").exists()


def test_eval_retrieval_json(tiny_model_dir, tmp_path, capsys):
    pairs = tmp_path / "pairs.tsv"
    lines = ["premise\thypothesis\tlabel"]
    for i, s in enumerate(SENTENCES[:6]):
        lines += [f"{s}\t{SENTENCES[i + 6]}\tentailment", f"{s}\t{SENTENCES[(i + 7) % 12]}\tcontradiction"]
    pairs.write_text("\n".join(lines) + "\n")
    out = tmp_path / "grid.json"
    argv = ["eval-retrieval", str(tiny_model_dir), "--data", str(pairs), "--layers", "1,4", "--dims", "32,8"]
    assert main([*argv, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["layers"] == [1, 4] and result["dims"] == [32, 8]
    assert (result["num_queries"], result["num_docs"]) == (6, 7)
    assert np.array(result["metrics"]["ndcg@10"]).shape == (2, 2)
    assert f"{result['metrics']['ndcg@10'][1][0]:.4f}" in capsys.readouterr().out
    # a retrieval model's query and document prompts
    folder = prompted_copy(tiny_model_dir, tmp_path / "prompted")
    argv = [
        "eval-retrieval",
        str(folder),
        "--data",
        str(pairs),
        "--layers",
        "4",
        "--json",
        str(out),
        "--overwrite",
    ]
    assert main([*argv, "--query-prompt-name", "query", "--document-prompt-name", "document"]) == 0
    prompted = json.loads(out.read_text())
    assert (prompted["query_prompt"], prompted["document_prompt"]) == ("query: ", "passage: ")
    assert prompted["metrics"]["ndcg@10"][0][0] != result["metrics"]["ndcg@10"][1][0]
    assert main([*argv, "--query-prompt-name", "queries"]) == 2
    assert "prompt_name 'queries' is not one of the model's prompts" in capsys.readouterr().err


@pytest.mark.parametrize(
    "workers,threads,cores,expected",
    [
        (None, None, 2, (2, 1)),  # the default: two workers of half the cores each
        (None, None, 8, (2, 4)),
        (None, None, 1, (1, 1)),
        (None, None, 3, (1, 3)),  # an odd count: one worker, no core idle
        (None, 1, 2, (2, 1)),
        (None, 2, 2, (1, 2)),  # threads for every core: one worker
        (1, None, 2, (1, 2)),
        (3, None, 8, (3, 2)),
        (4, None, 2, (4, 1)),
    ],
)
def test_serve_worker_plan(workers, threads, cores, expected):
    from matryoshka2d.cli.serve import worker_plan

    assert worker_plan(workers, threads, cores) == expected


@pytest.mark.parametrize(
    "runtime,workers,threads,expected",
    [("torch", 2, 4, 4), ("onnx", 2, 1, 1), ("onnx-int8", 2, 4, 7), ("onnx", 1, 8, 8), ("onnx", 3, 2, 4)],
)
def test_serve_backend_threads(runtime, workers, threads, expected):
    """ONNX Runtime's pool is shared by concurrent runs, each adding its caller: workers x threads in all."""
    from matryoshka2d.backends import backend_threads

    assert backend_threads(runtime, workers, threads) == expected


@pytest.mark.parametrize("runtime", ["torch", "onnx"])
def test_encode_with_workers(tiny_model_dir, tmp_path, monkeypatch, runtime):
    """--workers 2: two batches encoded at once, each with half of torch's threads (set for the
    process, as a command may) and ONNX Runtime sessions sized for both; the same embeddings."""
    import torch

    monkeypatch.setenv("M2D_CACHE_DIR", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(SENTENCES * 3) + "\n")
    base = ["encode", str(tiny_model_dir), "--input", str(texts), "--layers", "3", "--runtime", runtime]
    import matryoshka2d.backends
    import matryoshka2d.encoder

    loads, pools = [], []
    load_encoder, worker_pool = matryoshka2d.backends.load_encoder, matryoshka2d.encoder._worker_pool

    def spy_load(*args, **kwargs):
        loads.append(kwargs.get("threads"))
        return load_encoder(*args, **kwargs)

    def spy_pool(workers):
        pools.append(workers)
        return worker_pool(workers)

    monkeypatch.setattr(matryoshka2d.backends, "load_encoder", spy_load)
    monkeypatch.setattr(matryoshka2d.encoder, "_worker_pool", spy_pool)
    try:
        torch.set_num_threads(2)
        assert main([*base, "--out", str(tmp_path / "one.npy")]) == 0
        assert main([*base, "--workers", "2", "--out", str(tmp_path / "two.npy")]) == 0
        assert torch.get_num_threads() == 2  # the workers' threads divide it; this thread's is unchanged
    finally:
        torch.set_num_threads(threads)
    # ONNX Runtime: one session pool for both workers (2 x (1 - 1) + 1 threads); torch: set by encode
    assert loads == [None, 1 if runtime == "onnx" else None] and pools == [1, 2]
    np.testing.assert_allclose(np.load(tmp_path / "two.npy"), np.load(tmp_path / "one.npy"), atol=1e-5)


@pytest.mark.parametrize("backend", ["faiss", "qdrant"])
def test_index_build_and_add_with_workers(tiny_model_dir, tmp_path, monkeypatch, backend):
    """--workers 2 on index build (faiss and Qdrant) and index add: two batches at once (a pool of 2),
    the same vectors as one worker; --workers is refused for an embed-corpus output, which encodes nothing."""
    import torch

    import matryoshka2d.encoder

    pools = []
    worker_pool = matryoshka2d.encoder._worker_pool

    def spy_pool(workers):
        pools.append(workers)
        return worker_pool(workers)

    monkeypatch.setattr(matryoshka2d.encoder, "_worker_pool", spy_pool)
    corpus = tmp_path / "docs.txt"
    corpus.write_text("\n".join(SENTENCES) + "\n")
    threads = torch.get_num_threads()
    build = ["index", "build", str(tiny_model_dir), "--corpus", str(corpus), "--shortlist-dim", "8"]
    build += ["--batch-size", "4"]  # three batches: both workers run some
    try:
        torch.set_num_threads(2)
        if backend == "faiss":
            from matryoshka2d.search.index import SearchIndex

            assert main([*build, "--out", str(tmp_path / "one")]) == 0
            assert main([*build, "--out", str(tmp_path / "two"), "--workers", "2"]) == 0
            assert (
                main(["index", "add", str(tmp_path / "two"), "--corpus", str(corpus), "--workers", "2"]) == 0
            )
            one, two = SearchIndex.load(tmp_path / "one"), SearchIndex.load(tmp_path / "two")
            assert len(two) == 2 * len(one)
            np.testing.assert_allclose(two.vectors[: len(one)], one.vectors, atol=1e-6)
            np.testing.assert_allclose(two.vectors[len(one) :], one.vectors, atol=1e-6)
        else:
            from matryoshka2d.search.qdrant import QdrantIndex

            edge = tmp_path / "edge"
            qdrant = ["--backend", "qdrant", "--qdrant-edge", str(edge)]
            assert main([*build, *qdrant, "--collection", "one"]) == 0
            assert main([*build, *qdrant, "--collection", "two", "--workers", "2"]) == 0
            with (
                QdrantIndex.open("one", edge_path=str(edge)) as q1,
                QdrantIndex.open("two", edge_path=str(edge)) as q2,
            ):
                hits1 = q1.search_texts(EmbeddingModel.load(tiny_model_dir), SENTENCES[:3], k=4)
                hits2 = q2.search_texts(EmbeddingModel.load(tiny_model_dir), SENTENCES[:3], k=4)
            assert hits1.ids == hits2.ids
            np.testing.assert_allclose(hits1.scores, hits2.scores, atol=1e-6)
        assert torch.get_num_threads() == 2  # faiss's work after the encoding keeps this thread's threads
    finally:
        torch.set_num_threads(threads)
    assert pools.count(2) == (2 if backend == "faiss" else 1) and 1 in pools


@pytest.mark.parametrize("command", ["eval-sts", "eval-retrieval"])
def test_eval_commands_with_workers(tiny_model_dir, sts_file, tmp_path, monkeypatch, command):
    """--workers 2: the grid's one pass runs two batches at once (a pool of 2), the same grid."""
    import matryoshka2d.encoder

    pools = []
    real_pool = matryoshka2d.encoder._worker_pool
    monkeypatch.setattr(matryoshka2d.encoder, "_worker_pool", lambda n: pools.append(n) or real_pool(n))
    argv = [command, str(tiny_model_dir), "--data", str(sts_file), "--layers", "1,4", "--batch-size", "2"]
    grids = []
    for workers in ("1", "2"):
        out = tmp_path / f"grid-{workers}.json"
        assert main([*argv, "--workers", workers, "--json", str(out)]) == 0
        result = json.loads(out.read_text())
        grids.append(result["spearman"] if command == "eval-sts" else result["metrics"]["ndcg@10"])
    assert pools == [1, 2]
    np.testing.assert_allclose(grids[1], grids[0], atol=1e-4)


def test_grid_evaluation_refuses_a_bad_workers_value(tiny_model, sts_file):
    from matryoshka2d.evaluation import evaluate_sts

    for bad in (0, True, 1.5):
        with pytest.raises(InvalidInputError, match="workers"):
            evaluate_sts(tiny_model, sts_file, workers=bad)
