"""SearchIndex: two-stage results against numpy references, every shortlist variant, persistence, errors,
the model fingerprint, concurrent searches."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from conftest import SENTENCES, build_tiny_model, prompted_copy

from matryoshka2d.errors import DataFileError, InvalidDimError, InvalidInputError, InvalidLayersError
from matryoshka2d.search.fingerprint import PROBE_TEXTS, ModelFingerprint, ModelMismatchError
from matryoshka2d.search.index import FORMAT_VERSION, SearchIndex, ShortlistConfig

VARIANTS = [(index, quant) for index in ("flat", "hnsw", "ivf") for quant in ("none", "int8", "binary")]


def normalize(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    """600 clustered 48-dim corpus vectors and 25 queries near corpus points (a realistic geometry)."""
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((20, 48))
    corpus = centers[rng.integers(0, 20, 600)] + 0.6 * rng.standard_normal((600, 48))
    queries = corpus[rng.integers(0, 600, 25)] + 0.3 * rng.standard_normal((25, 48))
    return corpus.astype(np.float32), queries.astype(np.float32)


def exact_top(corpus: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = normalize(queries) @ normalize(corpus).T
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return top, np.take_along_axis(scores, top, axis=1)


def two_stage_reference(corpus, queries, d: int, s: int, k: int) -> np.ndarray:
    """What the two-stage search must return: top s by re-normalised prefix, then top k of those by full."""
    prefix = normalize(queries[:, :d]) @ normalize(corpus[:, :d]).T
    shortlist = np.argsort(-prefix, axis=1, kind="stable")[:, :s]
    full = np.take_along_axis(normalize(queries) @ normalize(corpus).T, shortlist, axis=1)
    return np.take_along_axis(shortlist, np.argsort(-full, axis=1, kind="stable")[:, :k], axis=1)


# ---------------------------------------------------------------------- results
def test_full_dim_shortlist_equals_exact_search(data):
    corpus, queries = data
    index = SearchIndex.from_embeddings(corpus, shortlist_dim=48)
    result = index.search(queries, k=10, shortlist=10)
    top, scores = exact_top(corpus, queries, 10)
    np.testing.assert_array_equal(result.indices, top)
    np.testing.assert_allclose(result.scores, scores, atol=1e-5)
    assert result.ids == [[str(i) for i in row] for row in top]


def test_shortlist_uses_only_the_prefix_then_reranks_with_all_dims(data):
    corpus, queries = data
    index = SearchIndex.from_embeddings(corpus, shortlist_dim=8)
    result = index.search(queries, k=5, shortlist=20)
    expected = two_stage_reference(corpus, queries, d=8, s=20, k=5)
    np.testing.assert_array_equal(result.indices, expected)
    # A tiny prefix with a short shortlist must miss some exact neighbours (otherwise nothing was tested).
    assert (result.indices != exact_top(corpus, queries, 5)[0]).any()
    # The scores are exact full-dim cosines of the returned documents, best first.
    full = np.einsum("qkd,qd->qk", normalize(corpus)[result.indices], normalize(queries))
    np.testing.assert_allclose(result.scores, full, atol=1e-5)
    assert (np.diff(result.scores, axis=1) <= 1e-7).all()


@pytest.mark.parametrize("kind,quant", VARIANTS)
def test_every_variant_is_exact_when_the_shortlist_covers_the_corpus(data, kind, quant):
    corpus, queries = data
    index = SearchIndex.from_embeddings(corpus, shortlist_dim=16, index=kind, quantization=quant, ivf_nlist=8)
    result = index.search(queries, k=10, shortlist=len(corpus), ef_search=len(corpus), nprobe=8)
    np.testing.assert_array_equal(result.indices, exact_top(corpus, queries, 10)[0])


@pytest.mark.parametrize("kind,quant", VARIANTS)
def test_every_variant_finds_most_exact_neighbours_with_a_moderate_shortlist(data, kind, quant):
    corpus, queries = data
    index = SearchIndex.from_embeddings(
        corpus, shortlist_dim=32, index=kind, quantization=quant, ivf_nprobe=4
    )
    result = index.search(queries, k=10, shortlist=150)
    top = exact_top(corpus, queries, 10)[0]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(result.indices, top, strict=True)])
    assert recall >= 0.9, (kind, quant, recall)
    assert index.shortlist.index == kind and index.shortlist.quantization == quant


def test_single_query_vector_and_list_input(data):
    corpus, queries = data
    index = SearchIndex.from_embeddings(corpus, shortlist_dim=16)
    one = index.search(queries[3], k=4)
    assert one.scores.shape == (1, 4)
    np.testing.assert_array_equal(one.indices[0], index.search(queries[3:4].tolist(), k=4).indices[0])


def test_queries_are_normalised(data):
    corpus, queries = data
    index = SearchIndex.from_embeddings(corpus, shortlist_dim=16)
    a, b = index.search(queries, k=5), index.search(queries * 7.5, k=5)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-6)


def test_string_ids_and_add_later(data):
    corpus, queries = data
    ids = [f"doc {i} – ünïcode\n#{i}" for i in range(len(corpus))]
    index = SearchIndex.from_embeddings(corpus[:400], ids=ids[:400], shortlist_dim=16)
    index.add(corpus[400:], ids=ids[400:])
    assert len(index) == 600 and index.ids == ids
    result = index.search(queries, k=10, shortlist=600)
    top = exact_top(corpus, queries, 10)[0]
    assert result.ids == [[ids[i] for i in row] for row in top]
    assert index.position(ids[450]) == 450


def test_default_ids_continue_after_add(data):
    corpus, _ = data
    index = SearchIndex.from_embeddings(corpus[:10], shortlist_dim=8)
    index.add(corpus[10:15])
    assert index.ids == [str(i) for i in range(15)]


def test_a_rejected_add_changes_nothing(data):
    corpus, queries = data
    index = SearchIndex.from_embeddings(corpus[:100], shortlist_dim=16)
    before = index.search(queries, k=5)
    with pytest.raises(InvalidInputError, match="'7' is already in the index"):
        index.add(corpus[100:110], ids=[str(i) for i in range(100, 109)] + ["7"])
    assert len(index) == 100
    np.testing.assert_array_equal(index.search(queries, k=5).indices, before.indices)


def test_memory_shrinks_with_quantization(data):
    corpus, _ = data
    sizes = {
        quant: SearchIndex.from_embeddings(corpus, shortlist_dim=32, quantization=quant).memory_bytes()
        for quant in ("none", "int8", "binary")
    }
    assert sizes["none"]["full"] == corpus.size * 4
    assert sizes["none"]["shortlist"] >= 600 * 32 * 4
    assert 600 * 32 <= sizes["int8"]["shortlist"] < sizes["none"]["shortlist"] / 3
    assert 600 * 4 <= sizes["binary"]["shortlist"] < sizes["int8"]["shortlist"] / 4


def test_ivf_list_count_defaults_to_the_corpus_size(data):
    corpus, _ = data
    index = SearchIndex.from_embeddings(corpus, shortlist_dim=16, index="ivf")
    assert index.shortlist.ivf_nlist == 15  # min(4 * sqrt(600), 600 // 39)


# ---------------------------------------------------------------------- persistence
@pytest.mark.parametrize("kind,quant", [("flat", "none"), ("hnsw", "int8"), ("ivf", "binary")])
def test_save_and_load_round_trip(data, tmp_path, kind, quant):
    corpus, queries = data
    ids = [f"id-{i}" for i in range(len(corpus))]
    index = SearchIndex.from_embeddings(
        corpus, ids, shortlist_dim=16, index=kind, quantization=quant, model="m"
    )
    index.save(tmp_path / "index")
    manifest = json.loads((tmp_path / "index" / "manifest.json").read_text())
    assert manifest["format_version"] == FORMAT_VERSION and manifest["count"] == 600 and manifest["dim"] == 48
    assert manifest["model"] == "m" and manifest["shortlist"]["dim"] == 16
    assert manifest["shortlist"]["index"] == kind and manifest["shortlist"]["quantization"] == quant
    for mmap in (False, True):
        loaded = SearchIndex.load(tmp_path / "index", mmap=mmap)
        assert loaded.ids == ids and loaded.shortlist == index.shortlist
        a, b = index.search(queries, k=7, shortlist=50), loaded.search(queries, k=7, shortlist=50)
        assert a.ids == b.ids
        np.testing.assert_allclose(a.scores, b.scores)
    loaded.add(corpus[:2], ids=["new-a", "new-b"])  # a memory-mapped index still accepts documents
    assert len(loaded) == 602


def test_save_replaces_an_existing_index_and_a_failed_save_keeps_the_old_one(data, tmp_path, monkeypatch):
    corpus, _ = data
    SearchIndex.from_embeddings(corpus[:50], shortlist_dim=8).save(tmp_path / "index")
    SearchIndex.from_embeddings(corpus[:60], shortlist_dim=8).save(tmp_path / "index", overwrite=True)
    assert len(SearchIndex.load(tmp_path / "index")) == 60

    import faiss

    def broken(*args):
        raise OSError("disk full")

    monkeypatch.setattr(faiss, "write_index", broken)
    with pytest.raises(OSError, match="disk full"):
        SearchIndex.from_embeddings(corpus[:70], shortlist_dim=8).save(tmp_path / "index", overwrite=True)
    assert len(SearchIndex.load(tmp_path / "index")) == 60
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]  # no temporary folder left behind


def test_texts_are_stored_returned_and_saved(data, tmp_path):
    corpus, queries = data
    texts = [f"text number {i}" for i in range(len(corpus))]
    index = SearchIndex.from_embeddings(corpus[:300], shortlist_dim=16)
    assert index.texts is None and index.search(queries, k=2).texts is None
    index.add(corpus[300:], texts=texts[300:])  # an index built without texts ignores them
    assert index.texts is None

    index = SearchIndex(dim=48)
    index.add(corpus[:300], texts=texts[:300])
    with pytest.raises(InvalidInputError, match="this index stores document texts"):
        index.add(corpus[300:])
    with pytest.raises(InvalidInputError, match="got 2 texts for 300 vectors"):
        index.add(corpus[300:], texts=["a", "b"])
    index.add(corpus[300:], texts=texts[300:])
    result = index.search(queries, k=3, shortlist=600)
    assert result.texts == [[texts[int(i)] for i in row] for row in result.ids]
    index.save(tmp_path / "index")
    assert SearchIndex.load(tmp_path / "index").search(queries, k=3, shortlist=600).texts == result.texts


def test_load_errors(data, tmp_path):
    corpus, _ = data
    with pytest.raises(DataFileError, match="not found"):
        SearchIndex.load(tmp_path / "missing")
    SearchIndex.from_embeddings(corpus[:50], shortlist_dim=8).save(tmp_path / "index")
    manifest_path = tmp_path / "index" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(DataFileError, match="format version 99 is not supported"):
        SearchIndex.load(tmp_path / "index")
    manifest_path.write_text(json.dumps({**manifest, "count": 51}))
    with pytest.raises(DataFileError, match="ids.json must list 51 string ids"):
        SearchIndex.load(tmp_path / "index")
    manifest_path.write_text(json.dumps(manifest))
    vectors = np.load(tmp_path / "index" / "vectors.npy")
    np.save(tmp_path / "index" / "vectors.npy", vectors[:, :40])
    with pytest.raises(
        DataFileError, match="vectors.npy has shape \\(50, 40\\) float32, expected \\(50, 48\\)"
    ):
        SearchIndex.load(tmp_path / "index")
    np.save(tmp_path / "index" / "vectors.npy", vectors)
    (tmp_path / "index" / "shortlist.faiss").write_bytes(b"garbage")
    with pytest.raises(DataFileError, match="cannot read the index files"):
        SearchIndex.load(tmp_path / "index")
    (tmp_path / "index" / "ids.json").write_text("[not json")
    with pytest.raises(DataFileError, match="cannot read .*ids.json"):
        SearchIndex.load(tmp_path / "index")
    (tmp_path / "index" / "ids.json").unlink()
    with pytest.raises(DataFileError, match="ids.json is missing"):
        SearchIndex.load(tmp_path / "index")
    manifest_path.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(DataFileError, match="not a matryoshka2d search index manifest"):
        SearchIndex.load(tmp_path / "index")


# ---------------------------------------------------------------------- bad input
def test_bad_search_arguments(data):
    corpus, queries = data
    index = SearchIndex.from_embeddings(corpus[:30], shortlist_dim=8)
    with pytest.raises(InvalidInputError, match="k must be a positive integer, got 0"):
        index.search(queries, k=0)
    with pytest.raises(InvalidInputError, match="shortlist=5 is smaller than k=10"):
        index.search(queries, k=10, shortlist=5)
    with pytest.raises(InvalidInputError, match="queries have 47 dims but the index holds 48-dim vectors"):
        index.search(queries[:, :47])
    with pytest.raises(InvalidInputError, match="NaN"):
        index.search(np.full((1, 48), np.nan))
    with pytest.raises(InvalidInputError, match="queries is empty"):
        index.search(np.zeros((0, 48)))


def test_k_larger_than_the_corpus_is_clamped_with_a_warning(data):
    corpus, queries = data
    index = SearchIndex.from_embeddings(corpus[:30], shortlist_dim=8)
    with pytest.warns(UserWarning, match="k=50 is larger than the corpus \\(30 documents\\)"):
        result = index.search(queries, k=50, shortlist=100)
    assert result.indices.shape == (25, 30)
    np.testing.assert_array_equal(result.indices, exact_top(corpus[:30], queries, 30)[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        index.search(queries, k=30, shortlist=100)  # a shortlist beyond the corpus is clamped silently
    # k is clamped before it is compared with the shortlist: asking for more hits than there are
    # documents is never an error, whatever the shortlist size.
    with pytest.warns(UserWarning, match="k=50 is larger than the corpus"):
        assert index.search(queries, k=50, shortlist=40).indices.shape == (25, 30)
    with (
        pytest.raises(InvalidInputError, match="shortlist=10 is smaller than k=30"),
        pytest.warns(UserWarning),
    ):
        index.search(queries, k=50, shortlist=10)


def test_bad_corpus_and_settings(data):
    corpus, _ = data
    with pytest.raises(InvalidInputError, match="embeddings is empty"):
        SearchIndex.from_embeddings(np.zeros((0, 48), dtype=np.float32))
    with pytest.raises(InvalidInputError, match="duplicate id 'a'"):
        SearchIndex.from_embeddings(corpus[:3], ids=["a", "b", "a"], shortlist_dim=8)
    with pytest.raises(InvalidInputError, match="got 2 ids for 3 vectors"):
        SearchIndex.from_embeddings(corpus[:3], ids=["a", "b"], shortlist_dim=8)
    with pytest.raises(InvalidInputError, match="ids must be strings"):
        SearchIndex.from_embeddings(corpus[:2], ids=["a", 2], shortlist_dim=8)
    with pytest.raises(InvalidInputError, match="2-D array"):
        SearchIndex.from_embeddings(corpus[0])
    with pytest.raises(InvalidDimError, match="shortlist dim=64 is out of range: the vectors have 1..48"):
        SearchIndex.from_embeddings(corpus, shortlist_dim=64)
    with pytest.raises(InvalidDimError, match="multiple of 8, got 12"):
        SearchIndex.from_embeddings(corpus, shortlist_dim=12, quantization="binary")
    with pytest.raises(InvalidInputError, match="unknown shortlist index 'lsh'"):
        SearchIndex.from_embeddings(corpus, shortlist_dim=8, index="lsh")
    with pytest.raises(InvalidInputError, match="needs at least 100 vectors"):
        SearchIndex.from_embeddings(corpus[:50], shortlist_dim=8, index="ivf", ivf_nlist=100)
    with pytest.raises(InvalidInputError, match="the index is empty"):
        SearchIndex(dim=48).search(corpus[:1])
    with pytest.raises(InvalidInputError, match="hnsw_m must be a positive integer"):
        ShortlistConfig(dim=8, hnsw_m=0).validate(48)


# ---------------------------------------------------------------------- with a model
def test_from_model_and_search_texts(tiny_model):
    ids = [f"s{i}" for i in range(len(SENTENCES))]
    index = SearchIndex.from_model(
        tiny_model, SENTENCES, ids=ids, shortlist_dim=8, layers=2, show_progress=False
    )
    assert index.model == str(tiny_model.name_or_path) and index.layers == 2 and index.dim == tiny_model.dim
    np.testing.assert_allclose(index.vectors, tiny_model.encode(SENTENCES, layers=2), atol=1e-6)
    assert index.texts == SENTENCES
    result = index.search_texts(tiny_model, SENTENCES[:4], k=3, shortlist=len(SENTENCES))
    exact = np.sort(tiny_model.encode(SENTENCES[:4], layers=2) @ index.vectors.T, axis=1)[:, ::-1][:, :3]
    np.testing.assert_allclose(result.scores, exact, atol=1e-5)
    np.testing.assert_allclose(result.scores[:, 0], 1.0, atol=1e-5)  # each text finds itself (or a tie)
    index.add_texts(tiny_model, ["a new text about a cat"], ids=["new"], show_progress=False)
    assert index.search_texts(tiny_model, "a new text about a cat", k=1).ids == [["new"]]


@pytest.mark.parametrize("shortlist_dim", [0, -8, 33])
def test_from_model_rejects_a_shortlist_dim_out_of_range(tiny_model, shortlist_dim):
    with pytest.raises(
        InvalidDimError, match=rf"shortlist dim={shortlist_dim} is out of range: the vectors have 1..32"
    ):
        SearchIndex.from_model(tiny_model, SENTENCES, shortlist_dim=shortlist_dim, show_progress=False)


def test_a_model_of_another_dim_or_depth_is_refused(tiny_model, tmp_path):
    index = SearchIndex.from_model(tiny_model, SENTENCES, shortlist_dim=8, layers=4, show_progress=False)
    index.save(tmp_path / "index")
    small = tiny_model.truncate(dim=16)
    with pytest.raises(InvalidDimError, match="makes 16-dim embeddings but the index holds 32-dim vectors"):
        SearchIndex.load(tmp_path / "index", model=small)
    with pytest.raises(InvalidDimError, match="16-dim embeddings"):
        index.search_texts(small, ["a cat"])
    with pytest.raises(InvalidLayersError, match="layers=4 is out of range"):
        index.search_texts(build_tiny_model(tmp_path / "two-layers", num_layers=2), ["a cat"])
    with pytest.raises(InvalidInputError, match="duplicate id"):
        index.add_texts(tiny_model, ["x", "y"], ids=["d", "d"])


# ---------------------------------------------------------------------- which model (fingerprint)
class IterEncodeOnly:
    """An encoder with only iter_encode, num_layers, dim and name_or_path (like a minimal backend)."""

    def __init__(self, model):
        self.model, self.num_layers, self.dim, self.name_or_path = model, model.num_layers, model.dim, "iter"

    def iter_encode(self, texts, **options):
        return self.model.iter_encode(texts, **options)


@pytest.fixture
def other_model(tiny_model_dirs):
    """A different model with the same dim and layer count as tiny_model (another family, other weights)."""
    from matryoshka2d import EmbeddingModel

    return EmbeddingModel.load(tiny_model_dirs["mpnet"])


@pytest.fixture
def prompted_model(tiny_model_dir, tmp_path):
    """The tiny model with a retrieval model's prompts (no default one)."""
    from matryoshka2d import EmbeddingModel

    folder = prompted_copy(tiny_model_dir, tmp_path / "prompted")
    return EmbeddingModel.load(folder)


def test_documents_and_queries_get_their_prompts(prompted_model, tmp_path):
    """Documents encoded with the document prompt (recorded: later adds and checks use it), queries with
    the query prompt; asking a filled index for another document prompt is refused."""
    model, docs = prompted_model, SENTENCES[:6]
    index = SearchIndex.from_model(model, docs, shortlist_dim=8, show_progress=False, prompt_name="document")
    assert index.document_prompt == "passage: "
    np.testing.assert_allclose(index.vectors, model.encode(docs, prompt_name="document"), atol=1e-6)
    assert np.abs(index.vectors - model.encode(docs)).max() > 1e-3  # the prompt changed them
    queries = SENTENCES[6:9]
    hits = index.search_texts(model, queries, k=3, prompt_name="query")
    expected = index.search(model.encode(queries, prompt_name="query"), k=3)
    assert hits.ids == expected.ids
    np.testing.assert_allclose(hits.scores, expected.scores, atol=1e-6)
    assert index.search_texts(model, queries, k=3).ids != hits.ids or not np.allclose(
        index.search_texts(model, queries, k=3).scores, hits.scores
    )  # without the query prompt the scores differ
    index.save(tmp_path / "index")
    loaded = SearchIndex.load(tmp_path / "index")
    assert loaded.document_prompt == "passage: "
    loaded.add_texts(model, SENTENCES[9:11], show_progress=False)  # the recorded prompt, not asked again
    np.testing.assert_allclose(
        loaded.vectors[-2:], model.encode(SENTENCES[9:11], prompt_name="document"), atol=1e-6
    )
    loaded.add_texts(
        model, SENTENCES[11:12], show_progress=False, prompt="passage: "
    )  # the same prompt: fine
    with pytest.raises(InvalidInputError, match="encoded with the prompt 'passage: ', not 'query: '"):
        loaded.add_texts(model, ["x"], show_progress=False, prompt_name="query")
    with pytest.raises(InvalidInputError, match="prompt_name 'passage' is not one of the model's prompts"):
        loaded.search_texts(model, queries, prompt_name="passage")
    # built from embeddings: told their prompt, it adds and checks with it
    vectors = model.encode(docs, prompt_name="document")
    from_vectors = SearchIndex.from_embeddings(
        vectors, shortlist_dim=8, texts=docs, document_prompt=model.resolve_prompt("document")
    )
    from_vectors.add_texts(model, SENTENCES[9:10], show_progress=False)
    np.testing.assert_allclose(
        from_vectors.vectors[-1], model.encode(SENTENCES[9], prompt_name="document"), atol=1e-6
    )
    # an index without a fingerprint checks a model by re-encoding stored documents: with their prompt
    loaded.fingerprint = None
    loaded._checked.clear()
    loaded.check_model(model)
    assert loaded.fingerprint is not None


def test_the_index_records_its_model_fingerprint(tiny_model, tiny_model_dir, tmp_path):
    from matryoshka2d import EmbeddingModel

    index = SearchIndex.from_model(tiny_model, SENTENCES, layers=3, shortlist_dim=8, show_progress=False)
    assert index.fingerprint is not None and index.fingerprint.layers == 3
    assert index.fingerprint.texts == PROBE_TEXTS and index.fingerprint.embeddings.shape == (
        len(PROBE_TEXTS),
        32,
    )
    index.save(tmp_path / "index")
    manifest = json.loads((tmp_path / "index" / "manifest.json").read_text())
    assert manifest["format_version"] == FORMAT_VERSION and manifest["model_fingerprint"]["texts"] == list(
        PROBE_TEXTS
    )
    assert (tmp_path / "index" / "model_fingerprint.npy").is_file()
    same = EmbeddingModel.load(tiny_model_dir)  # the same model, another object
    loaded = SearchIndex.load(tmp_path / "index", model=same)
    np.testing.assert_array_equal(loaded.fingerprint.embeddings, index.fingerprint.embeddings)
    assert loaded.search_texts(same, SENTENCES[2], k=1).ids == [["2"]]
    loaded.add_texts(same, ["a new text"], show_progress=False)
    # the same weights computing in bfloat16 are the same model
    bf16 = EmbeddingModel.load(tiny_model_dir, dtype="bfloat16")
    assert loaded.search_texts(bf16, SENTENCES[2], k=1).ids == [["2"]]


def test_another_model_of_the_same_dim_is_refused(tiny_model, other_model, tmp_path, capsys):
    assert other_model.dim == tiny_model.dim and other_model.num_layers == tiny_model.num_layers
    index = SearchIndex.from_model(tiny_model, SENTENCES, shortlist_dim=8, show_progress=False)
    before = index.vectors.copy()
    both = (
        rf"the model '{other_model.name_or_path}' is not the model that built this index "
        rf"\('{tiny_model.name_or_path}'\)"
    )
    with pytest.raises(ModelMismatchError, match=both):
        index.add_texts(other_model, ["a text"], show_progress=False)
    np.testing.assert_array_equal(index.vectors, before)  # nothing was added
    with pytest.raises(ModelMismatchError, match="lowest cosine similarity"):
        index.search_texts(other_model, ["a cat"])
    index.save(tmp_path / "index")
    with pytest.raises(ModelMismatchError, match=both):
        SearchIndex.load(tmp_path / "index", model=other_model)
    assert issubclass(ModelMismatchError, InvalidInputError)  # the CLI prints one line and exits 2


def test_the_cli_refuses_index_add_with_another_model(tiny_model_dirs, tmp_path, capsys):
    from matryoshka2d.cli import main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(SENTENCES) + "\n")
    more = tmp_path / "more.txt"
    more.write_text("a cat on a mat\n")
    out = tmp_path / "index"
    assert (
        main(["index", "build", str(tiny_model_dirs["bert"]), "--corpus", str(corpus), "--out", str(out)])
        == 0
    )
    capsys.readouterr()
    code = main(["index", "add", str(out), "--corpus", str(more), "--model", str(tiny_model_dirs["mpnet"])])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert str(tiny_model_dirs["mpnet"]) in err and str(tiny_model_dirs["bert"]) in err
    assert len(SearchIndex.load(out)) == len(SENTENCES)  # the index is unchanged
    assert main(["index", "add", str(out), "--corpus", str(more)]) == 0  # its own model is fine
    assert len(SearchIndex.load(out)) == len(SENTENCES) + 1


def test_a_model_is_checked_once_per_object(tiny_model, monkeypatch):
    index = SearchIndex.from_model(tiny_model, SENTENCES, shortlist_dim=8, show_progress=False)
    calls = []
    original = ModelFingerprint.check
    monkeypatch.setattr(ModelFingerprint, "check", lambda *a, **k: calls.append(1) or original(*a, **k))
    for _ in range(3):
        index.search_texts(tiny_model, ["a cat"], k=1)
    assert calls == []  # the building model was remembered
    from matryoshka2d import EmbeddingModel

    again = EmbeddingModel.load(tiny_model.name_or_path)
    for _ in range(3):
        index.search_texts(again, ["a cat"], k=1)
    assert calls == [1]


def test_an_encoder_with_only_iter_encode_works(tiny_model):
    encoder = IterEncodeOnly(tiny_model)
    index = SearchIndex.from_model(encoder, SENTENCES, layers=2, shortlist_dim=8, show_progress=False)
    assert index.model == "iter"
    np.testing.assert_allclose(index.vectors, tiny_model.encode(SENTENCES, layers=2), atol=1e-6)
    assert index.search_texts(tiny_model, SENTENCES[5], k=1).ids == [["5"]]  # the same model: accepted


def write_version_1(folder):
    """Turn a saved index into a format-1 folder (written before fingerprints existed)."""
    manifest_path = folder / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["model_fingerprint"]
    manifest["format_version"] = 1
    manifest_path.write_text(json.dumps(manifest))
    (folder / "model_fingerprint.npy").unlink()


def test_a_version_1_index_without_fingerprint_is_checked_by_its_stored_texts(
    tiny_model, other_model, tmp_path
):
    SearchIndex.from_model(tiny_model, SENTENCES, shortlist_dim=8, show_progress=False).save(tmp_path / "v1")
    write_version_1(tmp_path / "v1")
    old = SearchIndex.load(tmp_path / "v1")
    assert old.fingerprint is None and len(old) == len(SENTENCES)
    with pytest.raises(ModelMismatchError, match="embeddings of stored documents differ"):
        old.add_texts(other_model, ["a text"], show_progress=False)
    assert old.fingerprint is None and len(old) == len(SENTENCES)
    old.add_texts(tiny_model, ["a new text"], show_progress=False)  # verified, then recorded
    assert old.fingerprint is not None
    old.save(tmp_path / "v1", overwrite=True)
    manifest = json.loads((tmp_path / "v1" / "manifest.json").read_text())
    assert manifest["format_version"] == FORMAT_VERSION and manifest["model_fingerprint"] is not None
    with pytest.raises(ModelMismatchError):
        SearchIndex.load(tmp_path / "v1").search_texts(other_model, ["a cat"])


def test_an_index_without_fingerprint_or_texts_warns_for_another_model_name(
    tiny_model, other_model, tmp_path
):
    vectors = tiny_model.encode(SENTENCES)
    index = SearchIndex.from_embeddings(vectors, shortlist_dim=8, model=str(tiny_model.name_or_path))
    assert index.fingerprint is None and index.texts is None
    with pytest.warns(UserWarning, match="cannot check that .*mpnet.* is the model that built this index"):
        index.search_texts(other_model, ["a cat"], k=1)
    assert index.fingerprint is None  # an unverified model is not recorded
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        index.search_texts(tiny_model, ["a cat"], k=1)  # the recorded name: accepted, and recorded
    assert index.fingerprint is not None and index.fingerprint.model == str(tiny_model.name_or_path)
    with pytest.raises(ModelMismatchError):
        index.search_texts(other_model, ["a cat"], k=1)


def test_a_fingerprint_can_be_given_with_bare_embeddings(tiny_model, other_model):
    fingerprint = ModelFingerprint.of(tiny_model, layers=2)
    vectors = tiny_model.encode(SENTENCES, layers=2)
    index = SearchIndex.from_embeddings(vectors, shortlist_dim=8, layers=2, fingerprint=fingerprint)
    with pytest.raises(ModelMismatchError):
        index.add_texts(other_model, ["x"], show_progress=False)
    with pytest.raises(InvalidInputError, match="taken at layers=2 but the index encodes at layers=None"):
        SearchIndex.from_embeddings(vectors, shortlist_dim=8, fingerprint=fingerprint)


def test_version_rules(data, tmp_path):
    corpus, _ = data
    SearchIndex.from_embeddings(corpus[:50], shortlist_dim=8).save(tmp_path / "index")
    manifest_path = tmp_path / "index" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    assert manifest["format_version"] == FORMAT_VERSION == 3 and manifest["model_fingerprint"] is None
    manifest_path.write_text(json.dumps({**manifest, "format_version": 4}))
    with pytest.raises(DataFileError, match="version 4 is not supported .*written by a newer matryoshka2d"):
        SearchIndex.load(tmp_path / "index")
    for version in (1, 2):  # older folders have no document_prompt (and version 1 no fingerprint)
        older = {key: value for key, value in manifest.items() if key != "document_prompt"}
        manifest_path.write_text(json.dumps({**older, "format_version": version}))
        assert len(loaded := SearchIndex.load(tmp_path / "index")) == 50 and loaded.document_prompt is None
    manifest_path.write_text(json.dumps({**manifest, "document_prompt": 3}))
    with pytest.raises(DataFileError, match="malformed manifest .*document_prompt must be a string"):
        SearchIndex.load(tmp_path / "index")
    manifest_path.write_text(json.dumps({**manifest, "format_version": 1}))
    assert len(SearchIndex.load(tmp_path / "index")) == 50
    fp = {"method": "probe-embeddings", "texts": ["a", "b"], "layers": None, "model": "m"}
    manifest_path.write_text(json.dumps({**manifest, "model_fingerprint": fp}))
    with pytest.raises(DataFileError, match="model_fingerprint.npy is missing"):
        SearchIndex.load(tmp_path / "index")
    np.save(tmp_path / "index" / "model_fingerprint.npy", np.ones((3, 48), dtype=np.float32))
    with pytest.raises(DataFileError, match="malformed manifest .*expected 2 rows"):
        SearchIndex.load(tmp_path / "index")


# ---------------------------------------------------------------------- threads
def test_concurrent_searches_with_different_settings_equal_sequential_ones(data):
    from concurrent.futures import ThreadPoolExecutor

    corpus, queries = data
    hnsw = SearchIndex.from_embeddings(corpus, shortlist_dim=16, index="hnsw", hnsw_m=4)
    ivf = SearchIndex.from_embeddings(corpus, shortlist_dim=16, index="ivf", ivf_nlist=16)
    calls = [
        (index, option, value)
        for index, option in ((hnsw, "ef_search"), (ivf, "nprobe"))
        for value in (1, 2, 4, 16)
    ] * 5

    def run(call):
        index, option, value = call
        return index.search(queries, k=5, shortlist=5, **{option: value}).ids

    expected = [run(call) for call in calls]
    assert expected[0] != expected[3] or expected[4] != expected[7]  # the settings change the results
    with ThreadPoolExecutor(max_workers=4) as pool:
        assert list(pool.map(run, calls)) == expected


def test_an_encoder_with_a_plain_encode_works(tiny_model):
    class PlainEncode:  # encode(texts, layers=, dim=) only
        num_layers, dim, name_or_path = tiny_model.num_layers, tiny_model.dim, "plain"

        def encode(self, texts, layers=None, dim=None):
            return tiny_model.encode(texts, layers=layers, dim=dim)

    index = SearchIndex.from_model(PlainEncode(), SENTENCES, layers=3, shortlist_dim=8)
    np.testing.assert_allclose(index.vectors, tiny_model.encode(SENTENCES, layers=3), atol=1e-6)
    assert index.search_texts(PlainEncode(), SENTENCES[7], k=1).ids == [["7"]]


# ---------------------------------------------------------------------- review fixes
def build_cli_index(model_dir, tmp_path, texts=SENTENCES):
    from matryoshka2d.cli import main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(texts) + "\n")
    out = tmp_path / "index"
    argv = [
        "index",
        "build",
        str(model_dir),
        "--corpus",
        str(corpus),
        "--out",
        str(out),
        "--shortlist-dim",
        "8",
    ]
    assert main(argv) == 0
    return out


def test_concurrent_index_adds_keep_every_document(tiny_model_dir, tmp_path, monkeypatch):
    """Two 'm2d index add' runs on one index at once: the second waits for the first (the lock is held from
    the load to the save), so neither run's documents are lost."""
    import threading
    import time

    from matryoshka2d.cli import build_parser

    out = build_cli_index(tiny_model_dir, tmp_path)
    original = SearchIndex.add_texts

    def slow_add_texts(self, *args, **kwargs):  # both runs would load before either saves
        original(self, *args, **kwargs)
        time.sleep(0.5)

    monkeypatch.setattr(SearchIndex, "add_texts", slow_add_texts)
    runs = []
    for name, rows in (("a", ["A1\tfirst one", "A2\tfirst two"]), ("b", ["B1\tsecond one", "B2\tsecond 2"])):
        corpus = tmp_path / f"add-{name}.tsv"
        corpus.write_text("id\ttext\n" + "\n".join(rows) + "\n")
        argv = ["index", "add", str(out), "--corpus", str(corpus), "--id-column", "id"]
        runs.append(build_parser().parse_args(argv))
    start, codes = threading.Barrier(2), []

    def run(args):
        start.wait()
        codes.append(args.func(args))

    threads = [threading.Thread(target=run, args=(args,)) for args in runs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert codes == [0, 0]
    index = SearchIndex.load(out)
    assert len(index) == len(SENTENCES) + 4
    assert {"A1", "A2", "B1", "B2"} <= set(index.ids)


def test_index_lock_makes_a_second_holder_wait(tmp_path):
    import threading

    from matryoshka2d.search.index import index_lock

    events, waited = [], threading.Event()
    with index_lock(tmp_path / "index") as lock:
        assert lock == tmp_path / ".index.lock"  # beside the folder, not inside it

        def second():
            with index_lock(tmp_path / "sub" / ".." / "index", on_wait=lambda _: waited.set()):
                events.append("second")

        thread = threading.Thread(target=second)
        thread.start()
        assert waited.wait(10)
        events.append("first")
    thread.join()
    assert events == ["first", "second"]


@pytest.mark.parametrize(
    "kind,quant", [("flat", "int8"), ("hnsw", "int8"), ("ivf", "none"), ("ivf", "binary")]
)
@pytest.mark.parametrize("first", [1, 10])
def test_an_index_grown_from_a_small_first_batch_is_retrained(data, kind, quant, first):
    """Trained shortlists (int8 ranges, IVF centroids) are rebuilt from all stored vectors once the index
    has outgrown its training: growing from a tiny first batch searches like building at once."""
    corpus, queries = data
    options = dict(shortlist_dim=16, index=kind, quantization=quant, hnsw_m=8)
    at_once = SearchIndex.from_embeddings(corpus, **options)
    grown = SearchIndex.from_embeddings(corpus[:first], **options)
    grown.add(corpus[first:])
    assert grown.shortlist == at_once.shortlist  # an automatic IVF list count is chosen again (15, not 1)
    if kind != "hnsw":  # an HNSW graph is built in parallel: not bit-identical from run to run
        a, b = at_once.search(queries, k=10, shortlist=30), grown.search(queries, k=10, shortlist=30)
        np.testing.assert_array_equal(a.indices, b.indices)
    reference = two_stage_reference(corpus, queries, 16, 30, 10).tolist()

    def overlap(index):
        found = index.search(queries, k=10, shortlist=30).indices.tolist()
        return np.mean([len(set(x) & set(y)) / 10 for x, y in zip(found, reference)])

    assert overlap(grown) >= overlap(at_once) - 0.05  # (an int8 index trained on 1 vector: ~0.1)


def test_retraining_is_rare_and_survives_save_and_load(data, tmp_path):
    corpus, queries = data
    index = SearchIndex.from_embeddings(corpus[:2], shortlist_dim=16, quantization="int8")
    index.save(tmp_path / "index")
    manifest = json.loads((tmp_path / "index" / "manifest.json").read_text())
    assert manifest["shortlist_training"] == {"vectors": 2, "automatic_ivf_nlist": False}
    loaded = SearchIndex.load(tmp_path / "index")
    loaded.add(corpus[2:300])  # 300 >= 2 * 2: rebuilt, now trained on 300
    trained = loaded._index
    loaded.add(corpus[300:599])  # 599 < 2 * 300: only added
    assert loaded._index is trained
    loaded.add(corpus[599:])  # 600: rebuilt
    assert loaded._index is not trained
    at_once = SearchIndex.from_embeddings(corpus, shortlist_dim=16, quantization="int8")
    np.testing.assert_array_equal(
        loaded.search(queries, k=10, shortlist=30).indices,
        at_once.search(queries, k=10, shortlist=30).indices,
    )
    # an index that needs no training is never rebuilt
    flat = SearchIndex.from_embeddings(corpus[:1], shortlist_dim=16)
    first = flat._index
    flat.add(corpus[1:])
    assert flat._index is first and flat.manifest()["shortlist_training"] is None


def test_numpy_integer_settings_become_plain_ints(data, tmp_path):
    corpus, queries = data
    dims = np.array([8, 16, 48])
    index = SearchIndex.from_embeddings(
        corpus,
        shortlist_dim=dims[1],
        layers=np.int64(2),
        index="hnsw",
        hnsw_m=np.int64(8),
        hnsw_ef_search=np.int32(64),
        quantization="int8",
    )
    assert type(index.layers) is int and type(index.dim) is int
    assert all(
        type(v) is int
        for k, v in index.shortlist.to_dict().items()
        if k not in ("index", "quantization") and v is not None
    )
    assert index.search(queries, k=3).indices.shape == (25, 3)
    index.save(tmp_path / "hnsw")  # json.dumps of a numpy integer would fail here
    assert SearchIndex.load(tmp_path / "hnsw").shortlist == index.shortlist
    ivf = SearchIndex.from_embeddings(corpus, shortlist_dim=np.int64(8), index="ivf", ivf_nlist=np.int64(4))
    assert type(ivf.shortlist.ivf_nlist) is int
    ivf.save(tmp_path / "ivf")
    config = ShortlistConfig(dim=np.int64(8), ivf_nprobe=np.uint8(3)).validate(np.int64(48))
    assert type(config.dim) is int and type(config.ivf_nprobe) is int
    with pytest.raises(InvalidInputError, match="hnsw_m must be a positive integer"):
        ShortlistConfig(dim=8, hnsw_m=np.int64(0)).validate(48)


def test_index_add_refuses_its_folder_before_loading_the_model(tiny_model_dir, tmp_path, capsys, monkeypatch):
    from matryoshka2d.cli import main

    out = build_cli_index(tiny_model_dir, tmp_path)
    inside = out / "more.txt"
    inside.write_text("a blue bike\n")
    link = tmp_path / "link"
    link.symlink_to(out)
    more = tmp_path / "more.txt"
    more.write_text("a blue bike\n")

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the index folder was checked")

    monkeypatch.setattr("matryoshka2d.cli.search.load_runtime", no_model)
    capsys.readouterr()
    assert main(["index", "add", str(out), "--corpus", str(inside)]) == 2
    assert "an input of this command" in capsys.readouterr().err
    assert main(["index", "add", str(link), "--corpus", str(more)]) == 2
    assert "symbolic link" in capsys.readouterr().err
    monkeypatch.chdir(out)
    assert main(["index", "add", ".", "--corpus", str(more)]) == 2
    assert "current folder" in capsys.readouterr().err
    assert len(SearchIndex.load(out)) == len(SENTENCES)


def test_saving_over_an_index_keeps_the_users_other_files(tiny_model_dir, data, tmp_path):
    from matryoshka2d.cli import main

    out = build_cli_index(tiny_model_dir, tmp_path)
    (out / "NOTES.md").write_text("my notes\n")
    (out / "extra").mkdir()
    (out / "extra" / "a.txt").write_text("a\n")
    (out / "to-notes").symlink_to("NOTES.md")
    more = tmp_path / "more.txt"
    more.write_text("a blue bike\n")
    assert main(["index", "add", str(out), "--corpus", str(more)]) == 0
    assert len(SearchIndex.load(out)) == len(SENTENCES) + 1
    assert (out / "NOTES.md").read_text() == "my notes\n" and (out / "extra" / "a.txt").read_text() == "a\n"
    assert (out / "to-notes").is_symlink() and (out / "to-notes").read_text() == "my notes\n"
    corpus, _ = data
    SearchIndex.from_embeddings(corpus[:5], shortlist_dim=8).save(out, overwrite=True)  # the API too
    assert (out / "NOTES.md").read_text() == "my notes\n" and len(SearchIndex.load(out)) == 5
    assert not (out / "texts.json").exists()  # an index file the new index lacks is not carried over


def test_load_puts_back_an_index_moved_aside_by_a_killed_save(tiny_model_dir, tmp_path, capsys):
    """A save killed between its two renames leaves the only copy in .NAME.old-<pid>-*: load puts it back."""
    import subprocess
    import sys

    from matryoshka2d.cli import main

    out = build_cli_index(tiny_model_dir, tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a process that is no longer running
    aside = tmp_path / f".index.old-{dead.pid}-abcdefgh"
    aside.mkdir()
    out.rename(aside / "index")
    assert len(SearchIndex.load(out)) == len(SENTENCES)
    assert out.is_dir() and not (aside / "index").exists()
    out.rename(aside / "index")
    capsys.readouterr()
    assert main(["search", str(out), "--query", "a cat", "-k", "1"]) == 0
    assert capsys.readouterr().out.startswith("query: a cat\n   1  ")  # one hit
    assert out.is_dir()


def test_equal_scores_rank_by_position_whatever_k_and_shortlist(data):
    corpus, _ = data
    duplicated = np.concatenate([corpus[:100], corpus[:30], corpus[:30]])  # rows 100.. repeat rows 0..29
    rng = np.random.default_rng(1)
    queries = corpus[:30] + 0.01 * rng.standard_normal((30, 48)).astype(np.float32)
    index = SearchIndex.from_embeddings(duplicated, shortlist_dim=48)
    full = index.search(queries, k=9, shortlist=160)
    for row, scores in zip(full.indices, full.scores):
        ties = scores[:-1] == scores[1:]
        assert np.all(row[:-1][ties] < row[1:][ties])  # equal scores: lower position first
    assert full.indices[:, :3].tolist() == [[i, 100 + i, 130 + i] for i in range(30)]
    for k, shortlist in ((1, 1), (1, 20), (2, 2), (2, 20), (5, 7), (9, 160)):
        got = index.search(queries, k=k, shortlist=shortlist).indices
        np.testing.assert_array_equal(got, full.indices[:, :k])


def test_saving_over_an_index_by_a_tilde_or_dotdot_path_keeps_the_users_files(data, tmp_path, monkeypatch):
    corpus, _ = data
    monkeypatch.setenv("HOME", str(tmp_path))
    SearchIndex.from_embeddings(corpus[:5], shortlist_dim=8).save(tmp_path / "idx")
    (tmp_path / "idx" / "NOTES.md").write_text("my notes\n")
    SearchIndex.from_embeddings(corpus[:6], shortlist_dim=8).save("~/idx", overwrite=True)
    assert (tmp_path / "idx" / "NOTES.md").read_text() == "my notes\n" and len(SearchIndex.load("~/idx")) == 6
    SearchIndex.from_embeddings(corpus[:7], shortlist_dim=8).save(
        tmp_path / "idx" / ".." / "idx", overwrite=True
    )
    assert (tmp_path / "idx" / "NOTES.md").read_text() == "my notes\n"
    assert len(SearchIndex.load(tmp_path / "idx")) == 7
    assert (
        sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".idx.")) == []
    )  # nothing left aside


def test_an_index_saved_before_training_was_recorded_is_rebuilt_on_its_next_add(data, tmp_path):
    """A folder without shortlist_training may have been grown from a tiny first batch (trained on it
    alone, as the earlier version did): its next add rebuilds the shortlist once from every vector."""
    from matryoshka2d.search.shortlist import shortlist_codes

    corpus, queries = data
    unit = corpus / np.linalg.norm(corpus, axis=1, keepdims=True)
    old = SearchIndex.from_embeddings(corpus[:1], shortlist_dim=16, quantization="int8")
    old._index.add(shortlist_codes(unit[1:], old.shortlist))  # grown without a rebuild, as before
    old._vectors = unit.astype(np.float32)
    old._ids += [str(i) for i in range(1, len(corpus))]
    old.save(tmp_path / "old")
    manifest_file = tmp_path / "old" / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    del manifest["shortlist_training"]  # what a folder of the earlier version holds
    manifest_file.write_text(json.dumps(manifest))
    loaded = SearchIndex.load(tmp_path / "old")
    loaded.add(corpus[:1], ids=["extra"])  # rebuilt from all vectors
    at_once = SearchIndex.from_embeddings(
        np.concatenate([corpus, corpus[:1]]), shortlist_dim=16, quantization="int8"
    )
    np.testing.assert_array_equal(
        loaded.search(queries, k=10, shortlist=30).indices,
        at_once.search(queries, k=10, shortlist=30).indices,
    )


def test_index_add_on_a_missing_folder_creates_nothing(tiny_model_dir, tmp_path, capsys):
    from matryoshka2d.cli import main

    more = tmp_path / "more.txt"
    more.write_text("a blue bike\n")
    assert main(["index", "add", str(tmp_path / "typo" / "deeper" / "idx"), "--corpus", str(more)]) == 2
    assert "search index folder not found" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["more.txt"]


def test_a_mismatch_names_the_default_prompt_of_the_model(tiny_model_dir, tmp_path):
    from test_model import prompted_copy

    from matryoshka2d import EmbeddingModel

    index = SearchIndex.from_model(EmbeddingModel.load(tiny_model_dir), SENTENCES, shortlist_dim=8)
    prompted = EmbeddingModel.load(prompted_copy(tiny_model_dir, tmp_path / "p", {"q": "query: "}, "q"))
    with pytest.raises(ModelMismatchError, match="prepends the prompt 'query: '"):
        index.check_model(prompted)


def test_workers_reach_every_kind_of_encoder_and_bad_values_are_refused_first(tiny_model, monkeypatch):
    """workers=2 gives a pool of 2 to an encode() encoder and to the iter_encode-only one; a bad value is
    refused before an empty index records the model (it would then refuse every other model)."""
    import matryoshka2d.encoder
    from matryoshka2d.search.fingerprint import encode_texts

    pools = []
    real_pool = matryoshka2d.encoder._worker_pool
    monkeypatch.setattr(matryoshka2d.encoder, "_worker_pool", lambda n: pools.append(n) or real_pool(n))
    one = encode_texts(tiny_model, SENTENCES, None, batch_size=4)
    for model in (tiny_model, IterEncodeOnly(tiny_model)):
        np.testing.assert_allclose(
            encode_texts(model, SENTENCES, None, batch_size=4, workers=2), one, atol=1e-6
        )
    assert pools.count(2) == 2
    for bad in (0, -1, 2.5, True):
        with pytest.raises(InvalidInputError, match="workers"):
            encode_texts(tiny_model, SENTENCES, None, workers=bad)
        index = SearchIndex(dim=tiny_model.dim)
        with pytest.raises(InvalidInputError, match="workers"):
            index.add_texts(tiny_model, SENTENCES, workers=bad)
        assert index.fingerprint is None and len(index) == 0


# ---------------------------------------------------------------------- threads, extreme values
def test_searches_and_saves_beside_adds_from_other_threads(tmp_path):
    """Each search sees the index before or after an add, never half of one (faiss' add and the
    vectors/ids arrays change together); each save writes one state that loads."""
    import threading

    rng = np.random.default_rng(1)
    base = rng.standard_normal((400, 32)).astype(np.float32)
    index = SearchIndex.from_embeddings(base, ids=[f"b{i}" for i in range(400)], shortlist_dim=8)
    errors: list[BaseException] = []
    adding = threading.Event()

    def search() -> None:
        try:
            while not adding.is_set():
                result = index.search(base[:16], k=3, shortlist=50)
                assert [row[0] for row in result.ids] == [f"b{i}" for i in range(16)]  # itself, first
                np.testing.assert_allclose(result.scores[:, 0], 1.0, rtol=1e-5)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    def save() -> None:
        try:
            for i in range(6):
                folder = index.save(tmp_path / f"copy{i}")
                loaded = SearchIndex.load(folder)  # ids, vectors and shortlist of one state
                assert len(loaded.ids) == len(loaded.vectors) and len(loaded) % 40 == 0
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=search) for _ in range(6)] + [threading.Thread(target=save)]
    for t in threads:
        t.start()
    for j in range(60):
        index.add(rng.standard_normal((40, 32)).astype(np.float32), ids=[f"a{j}-{i}" for i in range(40)])
    adding.set()
    for t in threads:
        t.join()
    assert errors == [] and len(index) == 400 + 60 * 40


def test_huge_finite_values_are_normalised_and_zero_vectors_refused(data):
    corpus, _ = data
    index = SearchIndex.from_embeddings(corpus[:30], shortlist_dim=8)
    huge = np.full((1, 48), 1e20, dtype=np.float32)  # its squares overflow float32
    index.add(huge, ids=["huge"])
    np.testing.assert_allclose(index.vectors[index.position("huge")], 1 / np.sqrt(48), rtol=1e-6)
    result = index.search(huge, k=1)
    assert result.ids == [["huge"]] and result.scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(InvalidInputError, match="embeddings row 1 is all zeros"):
        index.add(np.stack([corpus[0], np.zeros(48, np.float32)]), ids=["x", "zero"])
    with pytest.raises(InvalidInputError, match="queries row 0 is all zeros"):
        index.search(np.zeros(48))
    assert len(index) == 31  # the refused add changed nothing


def test_an_unknown_shortlist_option_is_named(data):
    corpus, _ = data
    with pytest.raises(InvalidInputError, match="unknown shortlist option 'foo'; the options are .*index"):
        SearchIndex.from_embeddings(corpus[:30], shortlist_dim=8, foo=1)
