"""The Qdrant backend: equal to the faiss two-stage search, ids/payloads, mismatches, retries, threads, CLI.

Runs against qdrant-client's embedded local mode (``:memory:`` and a folder) and against qdrant-edge
(Qdrant's Rust engine in this process), both installed by the ``qdrant`` extra.
"""

from __future__ import annotations

import json
import threading
import uuid

import numpy as np
import pytest
from conftest import prompted_copy

from matryoshka2d.errors import InvalidDimError, InvalidInputError, Matryoshka2dError
from matryoshka2d.search import QdrantBackendError, QdrantIndex, RetryPolicy, SearchIndex, point_id

pytest.importorskip("qdrant_client", reason="the qdrant extra is not installed")  # make test installs it
pytest.importorskip("qdrant_edge", reason="the qdrant extra is not installed")

DIM, SHORT = 64, 16


def clustered(n: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    """Unit vectors around 25 centres (like embeddings of a few topics), float32."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((25, dim))
    x = centres[rng.integers(0, 25, n)] + 0.8 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def corpus():
    docs = clustered(1500)
    rng = np.random.default_rng(1)
    queries = docs[rng.choice(len(docs), 60, replace=False)] + 0.3 * rng.standard_normal((60, DIM))
    ids = [f"doc-{i}" for i in range(len(docs))]
    texts = [f"text of document {i}" for i in range(len(docs))]
    return docs, queries.astype(np.float32), ids, texts


def place(kind: str, tmp_path) -> dict:
    return {
        "memory": {"path": ":memory:"},
        "folder": {"path": str(tmp_path / "local")},
        "edge": {"edge_path": str(tmp_path / "edge")},
    }[kind]


def same_fraction(a: list[list[str]], b: list[list[str]]) -> float:
    """Fraction of queries with the same top-k ids (as sets: engines may order exact ties differently)."""
    return float(np.mean([set(x) == set(y) for x, y in zip(a, b, strict=True)]))


# ---------------------------------------------------------------------- equal to faiss
@pytest.mark.parametrize("kind", ["memory", "edge"])
def test_equals_faiss_two_stage_search(kind, corpus, tmp_path):
    docs, queries, ids, texts = corpus
    faiss_index = SearchIndex.from_embeddings(docs, ids, shortlist_dim=SHORT, texts=texts)
    expected = faiss_index.search(queries, k=10, shortlist=40)
    with QdrantIndex.from_search_index(
        faiss_index, "docs", show_progress=False, **place(kind, tmp_path)
    ) as q:
        assert len(q) == len(docs)
        got = q.search(queries, k=10, shortlist=40)
    assert same_fraction(got.ids, expected.ids) >= 0.99
    np.testing.assert_allclose(got.scores, expected.scores, atol=1e-5)
    # the shortlist matters: a full-dim exact search differs on some queries, so this is a two-stage search
    exact = SearchIndex.from_embeddings(docs, ids, shortlist_dim=DIM).search(queries, k=10, shortlist=10)
    assert same_fraction(got.ids, exact.ids) < 1.0
    assert got.texts[0] == [texts[int(i.split("-")[1])] for i in got.ids[0]]
    assert (got.indices == -1).all()


def recall(got: list[list[str]], truth: list[list[str]]) -> float:
    return float(np.mean([len(set(g) & set(t)) / len(t) for g, t in zip(got, truth, strict=True)]))


def test_edge_hnsw_shortlist_matches_faiss(corpus, tmp_path):
    docs, queries, ids, _ = corpus
    faiss_index = SearchIndex.from_embeddings(docs, ids, shortlist_dim=48, index="hnsw")
    expected = faiss_index.search(queries, k=10, shortlist=200)
    with QdrantIndex.from_search_index(
        faiss_index, "hnsw", show_progress=False, edge_path=str(tmp_path)
    ) as q:
        assert q.shortlist.index == "hnsw"
        got = q.search(queries, k=10, shortlist=200)
    assert same_fraction(got.ids, expected.ids) >= 0.99


def test_edge_binary_shortlist_has_faiss_recall(corpus, tmp_path):
    """Binary codes: Qdrant and faiss both rank by Hamming distance, but 64-bit codes tie a lot at the
    shortlist boundary and the two engines break ties differently, so the top 10 is equal only where no
    tie decides; recall against exact search is the same."""
    docs, queries, ids, _ = corpus
    exact = SearchIndex.from_embeddings(docs, ids, shortlist_dim=DIM).search(queries, k=10, shortlist=10).ids
    faiss_index = SearchIndex.from_embeddings(docs, ids, shortlist_dim=DIM, quantization="binary")
    expected = faiss_index.search(queries, k=10, shortlist=200).ids
    with QdrantIndex.from_search_index(faiss_index, "bin", show_progress=False, edge_path=str(tmp_path)) as q:
        assert q.shortlist.quantization == "binary"
        got = q.search(queries, k=10, shortlist=200).ids
    assert abs(recall(got, exact) - recall(expected, exact)) <= 0.03
    assert recall(got, expected) >= 0.9


def test_binary_shortlist_is_really_quantised_in_edge(corpus, tmp_path):
    """qdrant-edge searches the binary codes: a small shortlist then loses hits that the float one keeps."""
    docs, queries, ids, _ = corpus
    found = {}
    for quantization in ("none", "binary"):
        with QdrantIndex.create(
            quantization, dim=DIM, shortlist_dim=DIM, quantization=quantization, edge_path=str(tmp_path)
        ) as q:
            q.upload(docs, ids, show_progress=False)
            found[quantization] = q.search(queries, k=10, shortlist=20).ids
    exact = SearchIndex.from_embeddings(docs, ids, shortlist_dim=DIM).search(queries, k=10, shortlist=10).ids
    assert recall(found["none"], exact) == 1.0  # float shortlist on all dims: exact
    assert recall(found["binary"], exact) < 0.9


# ---------------------------------------------------------------------- ids, payloads, metadata
def test_point_ids_are_deterministic_uuids():
    a = point_id("doc-1")
    assert a == point_id("doc-1") != point_id("doc-2")
    assert uuid.UUID(a).version == 5


def test_upload_is_an_upsert_and_default_ids_continue(tmp_path):
    docs = clustered(50)
    with QdrantIndex.create("c", dim=DIM, shortlist_dim=SHORT, path=":memory:") as q:
        q.upload(docs[:20], show_progress=False)
        q.upload(docs[20:30], show_progress=False)  # default ids continue: 20..29
        assert len(q) == 30
        q.upload(docs[:5], ids=[str(i) for i in range(5)], show_progress=False)  # same ids: replaced
        assert len(q) == 30
        hit = q.search(docs[25], k=1, shortlist=5)
        assert hit.ids == [["25"]] and hit.texts is None
        assert hit.scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    with QdrantIndex.create("small", dim=DIM, shortlist_dim=SHORT, path=":memory:") as q:
        q.upload(docs[:3], show_progress=False)
        hits = q.search(docs[0], k=5, shortlist=5)  # k above the collection size: fewer hits, -inf padding
        assert len(hits.ids[0]) == 3 and np.isneginf(hits.scores[0, 3:]).all()


def test_metadata_round_trip_and_reopen(tmp_path):
    docs = clustered(40)
    for kw in ({"path": str(tmp_path / "local")}, {"edge_path": str(tmp_path / "edge")}):
        with QdrantIndex.create(
            "c", dim=DIM, shortlist_dim=32, quantization="int8", model="my-model", layers=3, **kw
        ) as q:
            assert q.metadata()["model"] == "my-model"
            q.upload(docs, [f"d{i}" for i in range(40)], [f"t{i}" for i in range(40)], show_progress=False)
        with QdrantIndex.open("c", **kw) as q:
            assert (q.dim, q.shortlist.dim, q.shortlist.quantization) == (DIM, 32, "int8")
            assert (q.model, q.layers, len(q)) == ("my-model", 3, 40)
            hit = q.search(docs[7], k=1, shortlist=10)
            assert hit.ids == [["d7"]] and hit.texts == [["t7"]]
        with QdrantIndex.create("c", dim=DIM, shortlist_dim=32, quantization="int8", **kw) as q:
            assert len(q) == 40 and q.model == "my-model"  # an existing compatible collection is reused
        with QdrantIndex.create("c", dim=DIM, shortlist_dim=32, recreate=True, **kw) as q:
            assert len(q) == 0


# ---------------------------------------------------------------------- mismatches and bad input
@pytest.mark.parametrize("kind", ["memory", "edge"])
def test_collection_with_other_sizes_is_refused(kind, tmp_path):
    kw = place(kind, tmp_path)
    if kind == "memory":  # one local-mode client, shared by both calls
        from qdrant_client import QdrantClient

        kw = {"client": QdrantClient(":memory:")}
    QdrantIndex.create("c", dim=DIM, shortlist_dim=SHORT, **kw).close()
    with pytest.raises(InvalidDimError, match=r"64-dim full vectors and 16-dim short.*32 dims"):
        QdrantIndex.create("c", dim=32, shortlist_dim=SHORT, **kw)
    with pytest.raises(InvalidDimError, match=r"16-dim short vectors.*8-dim shortlist"):
        QdrantIndex.create("c", dim=DIM, shortlist_dim=8, **kw)
    with pytest.raises(QdrantBackendError, match="created with a flat shortlist of none codes"):
        QdrantIndex.create("c", dim=DIM, shortlist_dim=SHORT, quantization="binary", **kw)


def test_foreign_collections_are_refused():
    from qdrant_client import QdrantClient, models

    client = QdrantClient(":memory:")
    client.create_collection(
        "plain", vectors_config=models.VectorParams(size=8, distance=models.Distance.COSINE)
    )
    client.create_collection(
        "dot",
        vectors_config={
            "short": models.VectorParams(size=4, distance=models.Distance.DOT),
            "full": models.VectorParams(size=8, distance=models.Distance.COSINE),
        },
    )
    with pytest.raises(QdrantBackendError, match="not the named vectors 'short' and 'full'"):
        QdrantIndex.open("plain", client=client)
    with pytest.raises(QdrantBackendError, match="'short' uses dot distance, expected cosine"):
        QdrantIndex.open("dot", client=client)
    with pytest.raises(QdrantBackendError, match="collection 'missing' does not exist"):
        QdrantIndex.open("missing", client=client)


def test_bad_input(tiny_model, tmp_path):
    with pytest.raises(InvalidInputError, match="exactly one place"):
        QdrantIndex.create("c", dim=8, path=":memory:", edge_path=str(tmp_path))
    with pytest.raises(InvalidInputError, match="exactly one place"):
        QdrantIndex.create("c", dim=8)
    with pytest.raises(InvalidInputError, match="'ivf' is not available in Qdrant"):
        QdrantIndex.create("c", dim=8, shortlist_dim=4, index="ivf", path=":memory:")
    with pytest.raises(InvalidInputError, match="collection name"):
        QdrantIndex.create("a/b", dim=8, edge_path=str(tmp_path))
    with pytest.raises(InvalidDimError, match="shortlist dim=9 is out of range"):
        QdrantIndex.create("c", dim=8, shortlist_dim=9, path=":memory:")
    with pytest.raises(QdrantBackendError, match="not a matryoshka2d qdrant-edge collection"):
        (tmp_path / "edge" / "x" / "shard").mkdir(parents=True)
        QdrantIndex.open("x", edge_path=str(tmp_path / "edge"))
    docs = clustered(20)
    with QdrantIndex.create("c", dim=DIM, shortlist_dim=SHORT, path=":memory:") as q:
        with pytest.raises(InvalidInputError, match="embeddings have 32 dims"):
            q.upload(docs[:, :32])
        with pytest.raises(InvalidInputError, match="duplicate id 'a'"):
            q.upload(docs[:2], ids=["a", "a"])
        with pytest.raises(InvalidInputError, match="ids\\[1\\] is int"):
            q.upload(docs[:2], ids=["a", 1])
        with pytest.raises(InvalidInputError, match="got 1 texts for 2 vectors"):
            q.upload(docs[:2], texts=["x"])
        with pytest.raises(InvalidInputError, match="contains NaN"):
            q.upload(np.full((2, DIM), np.nan))
        q.upload(docs, show_progress=False)
        with pytest.raises(InvalidInputError, match="shortlist=5 is smaller than k=10"):
            q.search(docs[0], k=10, shortlist=5)
        with pytest.raises(InvalidInputError, match="queries have 8 dims"):
            q.search(docs[:1, :8])
        with pytest.raises(InvalidInputError, match="k must be a positive integer"):
            q.search(docs[0], k=0)
        with pytest.raises(InvalidDimError, match="makes 32-dim embeddings but collection 'c' holds 64-dim"):
            q.search_texts(tiny_model, ["a cat"])


# ---------------------------------------------------------------------- retries
class Flaky:
    """Wraps a backend method: raises ``error`` the first ``failures`` calls, then calls through."""

    def __init__(self, fn, failures: int, error: Exception) -> None:
        self.fn, self.failures, self.error, self.calls = fn, failures, error, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return self.fn(*args, **kwargs)


def unexpected(status: int):
    from qdrant_client.http.exceptions import UnexpectedResponse

    return UnexpectedResponse(status_code=status, reason_phrase="x", content=b"busy", headers={})


def test_transient_upsert_errors_are_retried_with_growing_backoff():
    docs = clustered(30)
    with QdrantIndex.create(
        "c", dim=DIM, shortlist_dim=SHORT, path=":memory:", retry=RetryPolicy(retries=3, backoff=0.1)
    ) as q:
        waits: list[float] = []
        q._sleep = waits.append
        flaky = Flaky(q._backend.upsert, failures=2, error=unexpected(503))
        q._backend.upsert = flaky
        q.upload(docs, batch_size=30, show_progress=False)
        assert len(q) == 30 and flaky.calls == 3
        assert len(waits) == 2 and 0.075 <= waits[0] <= 0.125 and 0.15 <= waits[1] <= 0.25

        waits.clear()
        q._backend.upsert = Flaky(flaky.fn, failures=10, error=unexpected(429))
        with pytest.raises(QdrantBackendError, match="uploading points 0..29 failed after 4 attempts"):
            q.upload(docs, batch_size=30, show_progress=False)
        assert len(waits) == 3

        waits.clear()
        q._backend.upsert = Flaky(flaky.fn, failures=1, error=unexpected(400))  # a client error: no retry
        with pytest.raises(QdrantBackendError, match="failed: Unexpected Response: 400"):
            q.upload(docs, batch_size=30, show_progress=False)
        assert waits == []


def test_unreachable_server_fails_after_bounded_retries():
    """The real REST client against a closed local port: connection errors are retried, then reported."""
    import socket

    from qdrant_client import QdrantClient

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: nothing listens there
    # check_compatibility=False: the client's background version check would warn after the test ends
    client = QdrantClient(url=f"http://127.0.0.1:{port}", timeout=2, check_compatibility=False)
    with pytest.raises(QdrantBackendError, match="checking the collection failed after 3 attempts"):
        QdrantIndex.create("c", dim=8, client=client, retry=RetryPolicy(retries=2, backoff=0.01))
    client.close()


# ---------------------------------------------------------------------- threads
@pytest.mark.parametrize("kind", ["memory", "edge"])
def test_concurrent_searches_equal_sequential(kind, corpus, tmp_path):
    docs, queries, ids, _ = corpus
    with QdrantIndex.create("c", dim=DIM, shortlist_dim=SHORT, **place(kind, tmp_path)) as q:
        q.upload(docs[:600], ids[:600], show_progress=False)
        expected = [q.search(queries[i::4], k=5, shortlist=30).ids for i in range(4)]
        results: dict[int, list] = {}
        errors: list[BaseException] = []

        def work(i: int) -> None:
            try:
                for _ in range(3):
                    results[i] = q.search(queries[i::4], k=5, shortlist=30).ids
                    assert results[i] == expected[i]
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors and [results[i] for i in range(4)] == expected


# ---------------------------------------------------------------------- with a model, and the CLI
def test_upload_texts_equals_faiss_from_model(tiny_model):
    from conftest import SENTENCES

    faiss_index = SearchIndex.from_model(tiny_model, SENTENCES, shortlist_dim=8, show_progress=False)
    expected = faiss_index.search_texts(tiny_model, SENTENCES[:4], k=3, shortlist=6)
    with QdrantIndex.create("c", dim=tiny_model.dim, shortlist_dim=8, path=":memory:", layers=3) as q:
        q.layers = None  # all layers, like the faiss index
        q.upload_texts(tiny_model, SENTENCES, chunk_size=5, upload_batch_size=4, show_progress=False)
        got = q.search_texts(tiny_model, SENTENCES[:4], k=3, shortlist=6)
    assert got.ids == expected.ids
    assert got.texts == expected.texts
    np.testing.assert_allclose(got.scores, expected.scores, atol=1e-5)


def test_upload_and_search_texts_with_prompts_equal_faiss(tiny_model_dir, tmp_path):
    from conftest import SENTENCES

    from matryoshka2d import EmbeddingModel

    folder = prompted_copy(tiny_model_dir, tmp_path / "prompted")
    model = EmbeddingModel.load(folder)
    faiss_index = SearchIndex.from_model(
        model, SENTENCES, shortlist_dim=8, show_progress=False, prompt_name="document"
    )
    expected = faiss_index.search_texts(model, SENTENCES[:4], k=3, shortlist=6, prompt_name="query")
    with QdrantIndex.create("c", dim=model.dim, shortlist_dim=8, path=":memory:") as q:
        q.upload_texts(model, SENTENCES, show_progress=False, prompt_name="document")
        got = q.search_texts(model, SENTENCES[:4], k=3, shortlist=6, prompt_name="query")
        plain = q.search_texts(model, SENTENCES[:4], k=3, shortlist=6)
        with pytest.raises(InvalidInputError, match="prompt_name 'doc' is not one of the model's prompts"):
            q.upload_texts(model, ["x"], show_progress=False, prompt_name="doc")
        assert len(q) == len(SENTENCES)  # refused before any upload
    assert got.ids == expected.ids
    np.testing.assert_allclose(got.scores, expected.scores, atol=1e-5)
    assert not np.allclose(plain.scores, got.scores)  # the query prompt changes the scores


@pytest.mark.parametrize("where", ["--qdrant-path", "--qdrant-edge"])
def test_cli_index_build_and_search(where, tiny_model_dir, tmp_path, capsys):
    import json

    from conftest import SENTENCES

    from matryoshka2d.cli import main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")
    store = str(tmp_path / "store")
    build = ["index", "build", str(tiny_model_dir), "--corpus", str(corpus), "--shortlist-dim", "8"]
    qdrant = ["--backend", "qdrant", where, store]
    assert main([*build, *qdrant, "--collection", "sents", "--layers", "3"]) == 0
    assert "uploaded 12 documents (32 dims)" in capsys.readouterr().out
    hits_file = tmp_path / "hits.json"
    argv = ["search", "sents", *qdrant, "--query", SENTENCES[2], "-k", "3", "--shortlist", "6"]
    assert main([*argv, "--json", str(hits_file)]) == 0
    hits = json.loads(hits_file.read_text())
    assert hits[0]["hits"][0] == {"id": "2", "score": pytest.approx(1.0, abs=1e-5), "text": SENTENCES[2]}
    # the same corpus in a faiss index gives the same hits
    assert main([*build, "--layers", "3", "--out", str(tmp_path / "faiss")]) == 0
    faiss_json = tmp_path / "faiss.json"
    argv_faiss = ["search", str(tmp_path / "faiss"), "--query", SENTENCES[2], "-k", "3", "--shortlist", "6"]
    assert main([*argv_faiss, "--json", str(faiss_json)]) == 0
    assert [h["id"] for h in json.loads(faiss_json.read_text())[0]["hits"]] == [
        h["id"] for h in hits[0]["hits"]
    ]


def test_cli_bad_qdrant_options(tiny_model_dir, tmp_path, capsys):
    from matryoshka2d.cli import main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("a cat\na dog\n", encoding="utf-8")
    build = ["index", "build", str(tiny_model_dir), "--corpus", str(corpus)]
    cases = [
        ([*build, "--backend", "qdrant"], "needs --qdrant-url URL, --qdrant-path DIR or --qdrant-edge DIR"),
        ([*build, "--out", str(tmp_path / "i"), "--qdrant-path", "x"], "--qdrant-path is a Qdrant option"),
        ([*build], "--out is required"),
        (
            [*build, "--backend", "qdrant", "--qdrant-path", "x", "--out", "y"],
            "--out/--overwrite are for the faiss",
        ),
        (
            [*build, "--backend", "qdrant", "--qdrant-path", str(tmp_path / "q"), "--index", "ivf"],
            "'ivf' is not",
        ),
        (
            ["search", "nope", "--backend", "qdrant", "--qdrant-path", str(tmp_path / "q"), "--query", "x"],
            "collection 'nope' does not exist",
        ),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (argv, err)


def test_errors_are_matryoshka2d_errors():
    assert issubclass(QdrantBackendError, Matryoshka2dError)


# ---------------------------------------------------------------------- embed-corpus output folders
def test_upload_an_embed_corpus_output(tiny_model_dir, tiny_model, tmp_path, capsys):
    from conftest import SENTENCES

    from matryoshka2d.cli import main
    from matryoshka2d.corpus import embed_corpus

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")
    out = tmp_path / "emb"
    embed_corpus(tiny_model_dir, corpus, out, layers=[2, 4], dims=[8, 32], shard_rows=5, show_progress=False)
    faiss_index = SearchIndex.from_model(
        tiny_model, SENTENCES, shortlist_dim=8, layers=2, show_progress=False
    )
    expected = faiss_index.search_texts(tiny_model, SENTENCES[:3], k=4, shortlist=8)
    with QdrantIndex.from_corpus(
        out, "emb", layers=2, shortlist_dim=8, path=":memory:", show_progress=False
    ) as q:
        assert (len(q), q.dim, q.layers, q.model) == (12, 32, 2, str(tiny_model_dir.resolve()))
        got = q.search_texts(tiny_model, SENTENCES[:3], k=4, shortlist=8)
        assert got.ids == expected.ids and got.texts is None
        with pytest.raises(InvalidInputError, match=r"holds the cells.*needs 32-dim vectors of 3 layers"):
            q.upload_corpus(out, layers=3)
    # the CLI takes the folder as --corpus; the default is the deepest layer count
    qdrant = ["--backend", "qdrant", "--qdrant-edge", str(tmp_path / "edge")]
    assert (
        main(["index", "build", str(tiny_model_dir), "--corpus", str(out), "--shortlist-dim", "8", *qdrant])
        == 0
    )
    assert "uploaded the 32-dim, 4-layer vectors" in capsys.readouterr().out
    with QdrantIndex.open(edge_path=str(tmp_path / "edge")) as q:
        assert (len(q), q.layers) == (12, 4)


# ---------------------------------------------------------------------- model fingerprints
def test_model_fingerprint_is_recorded_and_checked(tiny_model_dirs, tmp_path):
    from conftest import SENTENCES

    from matryoshka2d import EmbeddingModel
    from matryoshka2d.search.fingerprint import ModelFingerprint, ModelMismatchError

    bert = EmbeddingModel.load(tiny_model_dirs["bert"])
    other = EmbeddingModel.load(tiny_model_dirs["mpnet"])  # same dim (32), other weights
    assert other.dim == bert.dim
    kw = {"edge_path": str(tmp_path / "edge")}
    with QdrantIndex.create(
        "c", dim=bert.dim, shortlist_dim=8, fingerprint=ModelFingerprint.of(bert), **kw
    ) as q:
        q.upload_texts(bert, SENTENCES, show_progress=False)
        with pytest.raises(ModelMismatchError, match="is not the model that built collection 'c'"):
            q.search_texts(other, ["a cat"])
    with QdrantIndex.open("c", **kw) as q:  # the fingerprint comes back from the marker
        assert q.fingerprint is not None
        assert q.search_texts(bert, [SENTENCES[3]], k=1, shortlist=4).ids == [["3"]]
        with pytest.raises(ModelMismatchError):
            q.upload_texts(other, ["a dog"], ids=["x"], show_progress=False)
    with pytest.raises(ModelMismatchError, match="was built with another model"):
        QdrantIndex.create("c", dim=bert.dim, shortlist_dim=8, fingerprint=ModelFingerprint.of(other), **kw)
    # a faiss index's fingerprint goes with it into Qdrant
    faiss_index = SearchIndex.from_model(bert, SENTENCES, shortlist_dim=8, show_progress=False)
    with QdrantIndex.from_search_index(faiss_index, "copy", path=":memory:", show_progress=False) as q:
        assert q.fingerprint is not None
        with pytest.raises(ModelMismatchError):
            q.search_texts(other, ["a cat"])


def test_cli_building_the_same_corpus_again_replaces_its_points(tiny_model_dir, tmp_path, capsys):
    """Without --id-column the ids are the row numbers: a re-run (or a run after an interrupted one) upserts
    the same points instead of adding every document a second time."""
    from conftest import SENTENCES

    from matryoshka2d.cli import main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")
    build = ["index", "build", str(tiny_model_dir), "--corpus", str(corpus), "--shortlist-dim", "8"]
    qdrant = ["--backend", "qdrant", "--qdrant-edge", str(tmp_path / "edge")]
    assert main([*build, *qdrant]) == 0
    assert main([*build, *qdrant]) == 0
    captured = capsys.readouterr()
    assert "now 12 points, 12 before" in captured.out
    assert "already holds 12 points and the ids are row numbers" in captured.err  # said, not silent
    with QdrantIndex.open(edge_path=str(tmp_path / "edge")) as q:
        assert len(q) == 12


def test_an_embed_corpus_output_of_another_model_is_refused(tiny_model_dirs, tmp_path, capsys):
    from conftest import SENTENCES

    from matryoshka2d.cli import main
    from matryoshka2d.corpus import embed_corpus
    from matryoshka2d.search.fingerprint import ModelMismatchError

    bert, mpnet = tiny_model_dirs["bert"], tiny_model_dirs["mpnet"]  # same dim (32), other weights
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")
    out = {}
    for name, folder in (("bert", bert), ("mpnet", mpnet)):
        out[name] = tmp_path / f"emb-{name}"
        embed_corpus(folder, corpus, out[name], layers=[2, 4], shard_rows=5, show_progress=False)
    kw = {"edge_path": str(tmp_path / "edge"), "shortlist_dim": 8, "show_progress": False}
    with QdrantIndex.from_corpus(out["bert"], "c", layers=4, **kw) as q:
        assert q.fingerprint is not None  # recorded from the output's manifest
        with pytest.raises(ModelMismatchError, match="another model than the one of collection 'c'"):
            q.upload_corpus(out["mpnet"], layers=4)
    with pytest.raises(ModelMismatchError, match="was built with another model"):
        QdrantIndex.from_corpus(out["mpnet"], "c", layers=4, **kw)
    with pytest.raises(InvalidInputError, match="holds embeddings of 4 layers, not 2"):
        QdrantIndex.from_corpus(out["bert"], "c", layers=2, **kw)
    with QdrantIndex.open("c", edge_path=str(tmp_path / "edge")) as q:
        assert len(q) == 12  # nothing of the refused uploads got in

    qdrant = ["--backend", "qdrant", "--qdrant-edge", str(tmp_path / "edge2")]
    # MODEL is checked against the model that made the vectors
    assert main(["index", "build", str(mpnet), "--corpus", str(out["bert"]), *qdrant]) == 2
    assert "is not the model" in capsys.readouterr().err
    assert main(["index", "build", str(bert), "--corpus", str(out["bert"]), "--column", "x", *qdrant]) == 2
    assert "--column: not for an embed-corpus output" in capsys.readouterr().err
    assert main(["index", "build", str(bert), "--corpus", str(out["bert"]), "--workers", "2", *qdrant]) == 2
    assert "--workers: not for an embed-corpus output" in capsys.readouterr().err
    assert main(["index", "build", str(bert), "--corpus", str(out["bert"]), *qdrant]) == 0


def test_upload_texts_refuses_a_bad_workers_value_first(tiny_model):
    from conftest import SENTENCES

    with QdrantIndex.create("c", dim=tiny_model.dim, shortlist_dim=8, path=":memory:") as q:
        for bad in (0, True, 2.5):
            with pytest.raises(InvalidInputError, match="workers"):
                q.upload_texts(tiny_model, SENTENCES, workers=bad, show_progress=False)
        assert len(q) == 0
        assert q.upload_texts(tiny_model, SENTENCES, workers=2, batch_size=4, show_progress=False) == 12


def test_default_ids_never_replace_a_document_with_that_id():
    docs = clustered(10)
    with QdrantIndex.create("c", dim=DIM, shortlist_dim=SHORT, path=":memory:") as q:
        q.upload(docs[:1], ids=["1"], show_progress=False)
        with pytest.raises(InvalidInputError, match=r"default ids 1..2 .*id '1' .*already in collection"):
            q.upload(docs[1:3], show_progress=False)  # would be "1", "2": "1" is taken
        assert len(q) == 1 and q.search(docs[0], k=1, shortlist=1).ids == [["1"]]
        q.upload(docs[1:3], ids=["x", "y"], show_progress=False)  # given ids: fine
        assert len(q) == 3


@pytest.mark.parametrize("where", ["memory", "edge"])
def test_an_embed_corpus_output_repeating_ids_across_shards_is_refused(tiny_model_dir, tmp_path, where):
    """Each shard's upload refuses repeats within it; across shards, into a new collection, an id already
    there means the corpus repeats it (an upsert would silently keep one of the two documents)."""
    from conftest import SENTENCES

    from matryoshka2d.corpus import embed_corpus

    corpus = tmp_path / "corpus.jsonl"
    rows = [{"id": f"d{i}", "text": t} for i, t in enumerate(SENTENCES[:8])] + [{"id": "d1", "text": "x"}]
    corpus.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    out = tmp_path / "emb"
    embed_corpus(tiny_model_dir, corpus, out, layers=[4], id_column="id", shard_rows=4, show_progress=False)
    place = {"path": ":memory:"} if where == "memory" else {"edge_path": str(tmp_path / "edge")}
    with pytest.raises(InvalidInputError, match=r"repeats ids of its earlier shards: id 'd1'"):
        QdrantIndex.from_corpus(out, "emb", shortlist_dim=8, show_progress=False, **place)
