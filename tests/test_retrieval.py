"""Retrieval metrics against hand-computed values, the SNLI retrieval set, and the one-pass grid."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import SENTENCES, data_path, packaged_minilm, prompted_copy

from matryoshka2d.errors import DataFileError, InvalidInputError, InvalidLayersError
from matryoshka2d.evaluation.retrieval import (
    RetrievalData,
    RetrievalGridResult,
    evaluate_retrieval,
    load_retrieval,
    load_snli_retrieval,
    load_sts_retrieval,
    retrieval_metrics,
)


def test_metrics_match_hand_computed_values():
    corpus = np.array([[1, 0], [0.8, 0.6], [0, 1], [-1, 0]], dtype=np.float32)
    queries = np.array([[2, 0], [0, 1]], dtype=np.float32)  # unnormalised on purpose
    # Query 0 ranks docs 0, 1, 2, 3; its relevant docs 1 and 2 sit at ranks 2 and 3.
    # Query 1 ranks doc 2 first, which is its only relevant doc (listed twice: counted once).
    metrics = retrieval_metrics(queries, corpus, [[1, 2], [2, 2]], recall_at=(1, 3))
    ndcg_q0 = (1 / math.log2(3) + 1 / math.log2(4)) / (1 + 1 / math.log2(3))
    assert metrics["recall@1"] == pytest.approx(0.5)
    assert metrics["recall@3"] == pytest.approx(1.0)
    assert metrics["mrr@10"] == pytest.approx((1 / 2 + 1) / 2)
    assert metrics["ndcg@10"] == pytest.approx((ndcg_q0 + 1) / 2)


def test_a_relevant_document_beyond_rank_10_scores_zero():
    rng = np.random.default_rng(0)
    corpus = rng.standard_normal((50, 8)).astype(np.float32)
    query = corpus[:1]
    scores = (query / np.linalg.norm(query)) @ (corpus / np.linalg.norm(corpus, axis=1, keepdims=True)).T
    worst = int(np.argmin(scores))
    metrics = retrieval_metrics(query, corpus, [[worst]], recall_at=(10, 50))
    assert metrics["mrr@10"] == 0 and metrics["ndcg@10"] == 0 and metrics["recall@10"] == 0
    assert metrics["recall@50"] == 1.0  # recall@k beyond 10 still finds it


def test_metric_input_errors():
    x = np.ones((2, 4), dtype=np.float32)
    with pytest.raises(InvalidInputError, match="same width"):
        retrieval_metrics(x, np.ones((3, 5)), [[0], [1]])
    with pytest.raises(InvalidInputError, match="got 1 relevance lists for 2 queries"):
        retrieval_metrics(x, x, [[0]])
    with pytest.raises(InvalidInputError, match="recall_at must be positive integers"):
        retrieval_metrics(x, x, [[0], [1]], recall_at=(0,))
    # a position outside the corpus used to mark a document of the next query as relevant
    for relevant in ([[0], [-1]], [[2], [0]], [[0], []]):
        with pytest.raises(InvalidInputError, match=r"relevant\[\d\] must be a non-empty list of corpus"):
            retrieval_metrics(x, x, relevant)


@pytest.mark.parametrize("num_docs", [5, 50, 1000])
def test_equal_scores_rank_in_corpus_order_whatever_the_corpus_size(num_docs):
    """Every document the same: the first relevant one by position wins, in the small-corpus path (a full
    sort) and in the partition path alike (it used to depend on argpartition's internals)."""
    corpus = np.ones((num_docs, 4), dtype=np.float32)
    query = np.ones((1, 4), dtype=np.float32)
    assert retrieval_metrics(query, corpus, [[0]], recall_at=(1,))["recall@1"] == 1.0
    last = retrieval_metrics(query, corpus, [[num_docs - 1]], recall_at=(1, num_docs))
    assert last["recall@1"] == 0.0 and last[f"recall@{num_docs}"] == 1.0
    # ties across the cut after the first 10 (depth 10 < num_docs: the partition path): positions 0-9 kept
    if num_docs > 10:
        assert retrieval_metrics(query, corpus, [[9]], recall_at=(10,))["recall@10"] == 1.0
        assert retrieval_metrics(query, corpus, [[10]], recall_at=(10,))["recall@10"] == 0.0


@pytest.fixture
def snli_file(tmp_path):
    rows = [
        ("premise", "hypothesis", "label"),
        ("A man plays a guitar.", "A man makes music.", "entailment"),
        ("A man plays a guitar.", "The man is famous.", "neutral"),
        ("A man plays a guitar.", "A woman sleeps.", "contradiction"),
        ("Two dogs run in a park.", "Animals are outside.", "entailment"),
        ("Two dogs run in a park.", "A man makes music.", "entailment"),
        ("A child eats.", "Nobody eats.", "contradiction"),
    ]
    path = tmp_path / "pairs.tsv"
    path.write_text("\n".join("\t".join(r) for r in rows) + "\n", encoding="utf-8")
    return path


def test_a_querys_own_text_in_the_corpus_is_left_out_of_its_ranking(tiny_model):
    """An STS sentence1 that is also another pair's sentence2 is the same embedding: rank 1 for any model,
    judged a miss (12 of the 309 STS Benchmark test queries), unless it is relevant."""
    texts = ["A man is cutting an onion.", "A man slices an onion.", "A dog runs.", "A cat sleeps."]
    data = RetrievalData(queries=[texts[0]], corpus=[texts[0], texts[2], texts[1], texts[3]], relevant=[[2]])
    alone = RetrievalData(queries=[texts[0]], corpus=[texts[2], texts[1], texts[3]], relevant=[[1]])
    with_copy, without = (evaluate_retrieval(tiny_model, d, recall_at=(1, 3)) for d in (data, alone))
    assert with_copy.metrics == without.metrics
    relevant_copy = RetrievalData(queries=[texts[0]], corpus=[texts[0], texts[1]], relevant=[[0]])
    assert evaluate_retrieval(tiny_model, relevant_copy, recall_at=(1,)).metrics["recall@1"][-1][0] == 1.0


def test_snli_retrieval_set(snli_file):
    data = load_snli_retrieval(snli_file)
    assert data.corpus == [
        "A man makes music.",
        "The man is famous.",
        "A woman sleeps.",
        "Animals are outside.",
        "Nobody eats.",
    ]
    assert data.queries == ["A man plays a guitar.", "Two dogs run in a park."]  # "A child eats." has none
    assert data.relevant == [[0], [3, 0]]
    assert len(load_snli_retrieval(snli_file, relevant_labels=("entailment", "neutral")).relevant[0]) == 2


def test_snli_retrieval_errors(snli_file, tmp_path):
    with pytest.raises(DataFileError, match="no premise has a hypothesis labelled \\['paraphrase'\\]"):
        load_snli_retrieval(snli_file, relevant_labels=("paraphrase",))
    bad = tmp_path / "bad.tsv"
    bad.write_text("premise\thypothesis\nA\tB\n")
    with pytest.raises(DataFileError, match="missing column\\(s\\) \\['label'\\]"):
        load_snli_retrieval(bad)
    ragged = tmp_path / "ragged.jsonl"  # the second row has no label: named, not a KeyError
    ragged.write_text(
        '{"premise": "A", "hypothesis": "B", "label": "entailment"}\n{"premise": "C", "hypothesis": "D"}\n'
    )
    with pytest.raises(DataFileError, match="row 2: no 'label'"):
        load_snli_retrieval(ragged)
    with pytest.raises(InvalidInputError, match="has no relevant document"):
        RetrievalData(queries=["q"], corpus=["d"], relevant=[[]])
    with pytest.raises(InvalidInputError, match="outside the corpus"):
        RetrievalData(queries=["q"], corpus=["d"], relevant=[[3]])


def test_sts_retrieval_set_and_format_detection(snli_file, tmp_path):
    sts = tmp_path / "sts.tsv"
    rows = [
        ("sentence1", "sentence2", "score"),
        ("A cat sits.", "A cat is sitting.", "4.8"),
        ("A cat sits.", "A dog runs.", "0.4"),
        ("Rain falls.", "It is raining.", "4.0"),
        ("A man sings.", "A cat is sitting.", "1.0"),
        ("A man sings.", "Someone sings.", "3.9"),
    ]
    sts.write_text("\n".join("\t".join(r) for r in rows) + "\n", encoding="utf-8")
    data = load_sts_retrieval(sts)
    assert data.corpus == ["A cat is sitting.", "A dog runs.", "It is raining.", "Someone sings."]
    assert data.queries == ["A cat sits.", "Rain falls."] and data.relevant == [[0], [2]]
    assert load_sts_retrieval(sts, min_score=3.5).queries[-1] == "A man sings."
    assert load_retrieval(sts) == data and load_retrieval(snli_file) == load_snli_retrieval(snli_file)
    with pytest.raises(DataFileError, match="no pair has a score >= 5.0 \\(the highest is 4.8\\)"):
        load_sts_retrieval(sts, min_score=5.0)
    other = tmp_path / "other.tsv"
    other.write_text("a\tb\nx\ty\n")
    with pytest.raises(DataFileError, match="expected columns premise, hypothesis, label"):
        load_retrieval(other)


def test_grid_cells_equal_direct_evaluation(tiny_model):
    corpus = SENTENCES
    queries = [s + " outside" for s in SENTENCES[:6]]
    relevant = [[i, (i + 1) % len(corpus)] for i in range(6)]
    data = RetrievalData(queries=queries, corpus=corpus, relevant=relevant)
    result = evaluate_retrieval(
        tiny_model, data, layers=[1, 3], dims=[8, 32], recall_at=(1, 5), batch_size=64
    )
    assert result.layers == [1, 3] and result.dims == [32, 8]
    assert set(result.metrics) == {"recall@1", "recall@5", "mrr@10", "ndcg@10"}
    assert (result.info["num_queries"], result.info["num_docs"]) == (6, 12)
    assert result.primary == "ndcg@10" and result.cell(3, 8) == result.cell(3, 8, "ndcg@10")
    for k in (1, 3):
        for d in (8, 32):
            direct = retrieval_metrics(
                tiny_model.encode(queries, layers=k, dim=d, batch_size=64),
                tiny_model.encode(corpus, layers=k, dim=d, batch_size=64),
                relevant,
                recall_at=(1, 5),
            )
            for name, value in direct.items():
                assert result.cell(k, d, name) == pytest.approx(value, abs=1e-6), (k, d, name)
    assert RetrievalGridResult.from_dict(result.to_dict()) == result
    as_json = json.loads(json.dumps(result.to_dict()))  # the eval-retrieval --json format
    assert set(as_json) == {"model", "layers", "dims", "num_queries", "num_docs", "primary", "metrics"}
    del as_json["primary"]  # files written before "primary" existed still default to ndcg@10
    assert RetrievalGridResult.from_dict(as_json) == result
    assert "ndcg@10: layers \\ dims" in result.table() and f"{result.cell(3, 8):.4f}" in result.table()
    with pytest.raises(InvalidLayersError, match="layers=9 is out of range"):
        evaluate_retrieval(tiny_model, data, layers=[9])


def test_queries_and_documents_get_their_own_prompts(tiny_model_dir, tmp_path):
    from matryoshka2d import EmbeddingModel

    folder = prompted_copy(tiny_model_dir, tmp_path / "prompted")
    model = EmbeddingModel.load(folder)
    corpus = SENTENCES
    queries = [SENTENCES[0], *(s + " outside" for s in SENTENCES[1:6])]  # one query is also a document
    relevant = [[(i + 1) % len(corpus)] for i in range(6)]
    data = RetrievalData(queries=queries, corpus=corpus, relevant=relevant)
    result = evaluate_retrieval(
        model,
        data,
        layers=[2],
        dims=[8],
        batch_size=64,
        query_prompt_name="query",
        document_prompt_name="document",
    )
    direct = retrieval_metrics(
        model.encode(queries, layers=2, dim=8, prompt_name="query"),
        model.encode(corpus, layers=2, dim=8, prompt_name="document"),
        relevant,
        exclude=[[0]] + [[]] * 5,  # the query's own text in the corpus, as without prompts
    )
    for name, value in direct.items():
        assert result.cell(2, 8, name) == pytest.approx(value, abs=1e-6), name
    assert (result.info["query_prompt"], result.info["document_prompt"]) == ("query: ", "passage: ")
    plain = evaluate_retrieval(model, data, layers=[2], dims=[8], batch_size=64)
    assert plain.cell(2, 8, "mrr@10") != pytest.approx(result.cell(2, 8, "mrr@10"), abs=1e-9)
    assert RetrievalGridResult.from_dict(json.loads(json.dumps(result.to_dict()))) == result
    with pytest.raises(InvalidInputError, match="prompt_name 'q' is not one of the model's prompts"):
        evaluate_retrieval(model, data, query_prompt_name="q")


def test_bad_recall_at_is_refused_before_encoding(tiny_model, monkeypatch):
    data = RetrievalData(queries=["a cat"], corpus=SENTENCES, relevant=[[0]])
    monkeypatch.setattr(tiny_model, "_encode_chunk", lambda *a, **k: pytest.fail("encoded first"))
    for bad in ((0,), (), (1.5,), (True,), "10"):
        with pytest.raises(InvalidInputError, match="recall_at must be positive integers"):
            evaluate_retrieval(tiny_model, data, recall_at=bad)


# nDCG@10 that all-MiniLM-L6-v2 at full size clearly exceeds on this SNLI subset (a broken encoder or
# metric lands far below it).
THRESHOLD_FULL = 0.5


@pytest.mark.integration
def test_minilm_on_snli_ranks_entailed_hypotheses_high(tmp_path):
    from matryoshka2d import EmbeddingModel

    path = data_path("snli", "pair-class-test.tsv")
    assert path.is_file(), f"SNLI not found at {path}; set M2D_DATA_DIR"
    subset = tmp_path / "snli-subset.tsv"  # the first 900 pairs: ~300 queries over ~900 hypotheses
    subset.write_text("\n".join(path.read_text(encoding="utf-8").splitlines()[:901]) + "\n", encoding="utf-8")
    model = EmbeddingModel.load(packaged_minilm())
    result = evaluate_retrieval(model, subset, layers=[1, 6], dims=[384, 32], batch_size=64)
    assert result.info["num_queries"] > 250 and result.info["num_docs"] > 800
    assert result.cell(6, 384) > THRESHOLD_FULL
    assert result.cell(6, 384) > result.cell(1, 32) + 0.1  # the smallest cell is clearly worse


def test_grid_engine_gives_exactly_the_numbers_of_the_old_per_layer_code(tiny_model):
    from matryoshka2d.truncation import truncate_dims

    queries = [s + " outside" for s in SENTENCES[:6]]
    data = RetrievalData(queries=queries, corpus=SENTENCES, relevant=[[i] for i in range(6)])
    result = evaluate_retrieval(tiny_model, data, layers=[2, 4], dims=[32, 8], recall_at=(1, 3), batch_size=4)
    texts = list(dict.fromkeys(queries + SENTENCES))
    by_layer = tiny_model.encode_layers(texts, [2, 4], batch_size=4)  # what the evaluator did before
    for k in (2, 4):
        for d in (32, 8):
            emb = truncate_dims(by_layer[k], d, normalize=True)
            old = retrieval_metrics(emb[:6], emb[[texts.index(t) for t in SENTENCES]], data.relevant, (1, 3))
            assert {name: result.cell(k, d, name) for name in old} == old


def test_positive_pairs_only_are_a_retrieval_set(tmp_path):
    """Every pair scored 5: no Spearman possible, but each pair is a query with its relevant document."""
    path = tmp_path / "positives.tsv"
    rows = [
        ("sentence1", "sentence2", "score"),
        ("A cat sat.", "The cat sat.", "5"),
        ("Rain.", "It rains.", "5"),
    ]
    path.write_text("\n".join("\t".join(r) for r in rows) + "\n", encoding="utf-8")
    data = load_sts_retrieval(path)
    assert data.queries == ["A cat sat.", "Rain."] and data.relevant == [[0], [1]]


def test_every_copy_of_a_querys_own_text_is_left_out(tiny_model):
    texts = ["A man is cutting an onion.", "A man slices an onion.", "A dog runs.", "A cat sleeps."]
    copies = RetrievalData(
        queries=[texts[0]], corpus=[texts[0], texts[1], texts[2], texts[0]], relevant=[[1]]
    )
    alone = RetrievalData(queries=[texts[0]], corpus=[texts[1], texts[2]], relevant=[[0]])
    with_copies, without = (evaluate_retrieval(tiny_model, d, recall_at=(1, 2)) for d in (copies, alone))
    assert with_copies.metrics == without.metrics
