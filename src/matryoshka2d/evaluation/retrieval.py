"""Retrieval quality (recall@k, MRR@10, nDCG@10) over the whole layers x dims grid, from one pass.

Like the STS grid evaluator, every text (queries and corpus) is encoded once by the grid engine
(:mod:`matryoshka2d.evaluation.grid`), which streams every requested layer count from one forward pass
and every dim as a re-normalised prefix. Each grid cell is then scored with exact cosine
search (queries x corpus in chunks), so the numbers measure the embeddings, not an approximate index.

Metrics (binary relevance, averaged over queries):

* ``recall@k``: the fraction of a query's relevant documents found in its top ``k``.
* ``mrr@10``: ``1 / rank`` of the first relevant document if it is in the top 10, else 0.
* ``ndcg@10``: ``sum(1 / log2(rank + 1))`` over relevant documents in the top 10, divided by the same sum
  for an ideal ranking (Järvelin and Kekäläinen, 2002).

Retrieval sets:

* SNLI (:func:`load_snli_retrieval`): each premise is a query, its entailed hypotheses are relevant,
  and the corpus is every distinct hypothesis of the file (entailed, neutral and contradicting ones
  alike), so a model must rank entailment above mere topical overlap.
* STS Benchmark (:func:`load_sts_retrieval`): each sentence1 of a pair scored >= 4 is a query, that
  sentence2 is relevant, and the corpus is every sentence2 of the file. Use it for models trained on
  the SNLI files, for which the SNLI set is not held out.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from matryoshka2d.data import load_sts, read_rows, require_columns, text_column
from matryoshka2d.errors import DataFileError, InvalidInputError
from matryoshka2d.evaluation.grid import GridEncoder, GridResult, evaluate_grid
from matryoshka2d.ranking import top_k
from matryoshka2d.truncation import truncate_dims
from matryoshka2d.validation import is_int

#: The metrics every evaluation reports, besides ``recall@k`` for each requested ``k``.
RANKED_METRICS = ("mrr@10", "ndcg@10")


@dataclass(frozen=True)
class RetrievalData:
    """Queries, a corpus, and for each query the corpus positions of its relevant documents.

    Raises:
        InvalidInputError: empty queries or corpus, a relevance list per query missing, a query with no
            relevant document, or a position outside the corpus.
    """

    queries: list[str]
    corpus: list[str]
    relevant: list[list[int]]

    def __post_init__(self) -> None:
        if not self.queries or not self.corpus:
            raise InvalidInputError(
                f"a retrieval set needs queries and a corpus, got {len(self.queries)} queries and "
                f"{len(self.corpus)} documents"
            )
        if len(self.relevant) != len(self.queries):
            raise InvalidInputError(
                f"got {len(self.relevant)} relevance lists for {len(self.queries)} queries"
            )
        for i, rel in enumerate(self.relevant):
            if not rel:
                raise InvalidInputError(f"query {i} ({self.queries[i]!r:.60}) has no relevant document")
            bad = [p for p in rel if not 0 <= p < len(self.corpus)]
            if bad:
                raise InvalidInputError(
                    f"query {i}: relevant positions {bad} are outside the corpus (0..{len(self.corpus) - 1})"
                )

    def __len__(self) -> int:
        return len(self.queries)


def pairs_to_retrieval(
    queries: Sequence[str], documents: Sequence[str], relevant: Sequence[bool]
) -> RetrievalData:
    """A retrieval set from aligned (query, document, is-relevant) pairs.

    The corpus is every distinct document (relevant or not), in order of first appearance; the queries
    are the distinct queries with at least one relevant document.
    """
    corpus = list(dict.fromkeys(documents))
    position = {text: i for i, text in enumerate(corpus)}
    found: dict[str, list[int]] = {}
    for query, document, keep in zip(queries, documents, relevant, strict=True):
        if keep:
            docs = found.setdefault(query, [])
            if position[document] not in docs:
                docs.append(position[document])
    if not found:
        raise InvalidInputError("no query has a relevant document")
    return RetrievalData(queries=list(found), corpus=corpus, relevant=list(found.values()))


def load_snli_retrieval(
    path: str | os.PathLike, relevant_labels: Sequence[str] = ("entailment",)
) -> RetrievalData:
    """A retrieval set from an SNLI pair-class file (columns premise, hypothesis, label).

    Each distinct premise with at least one hypothesis labelled in ``relevant_labels`` is a query; the
    corpus is every distinct hypothesis of the file (all labels), in file order.

    Args:
        path: e.g. ``../shared/data/snli/pair-class-test.tsv``.
        relevant_labels: labels that make a hypothesis relevant to its premise.

    Raises:
        DataFileError: missing file or columns, or no premise with a relevant hypothesis.
    """
    rows = read_rows(path)
    require_columns(rows, ["premise", "hypothesis", "label"], path)
    missing = next((n for n, row in enumerate(rows, 1) if row.get("label") is None), None)
    if missing is not None:
        raise DataFileError(f"{path}, row {missing}: no 'label' (entailment, neutral or contradiction)")
    labels = [str(row["label"]).strip() for row in rows]
    wanted = set(relevant_labels)
    if not wanted & set(labels):
        raise DataFileError(
            f"{path}: no premise has a hypothesis labelled {sorted(wanted)} "
            f"(labels found: {sorted(set(labels))[:10]})"
        )
    premises = text_column(rows, "premise", path, non_empty=True)
    hypotheses = text_column(rows, "hypothesis", path, non_empty=True)
    return pairs_to_retrieval(premises, hypotheses, [label in wanted for label in labels])


def load_sts_retrieval(path: str | os.PathLike, min_score: float = 4.0) -> RetrievalData:
    """A retrieval set from scored pairs (STS Benchmark format: sentence1, sentence2, score).

    Each sentence1 with a pair scored ``>= min_score`` is a query and those sentence2s are relevant; the
    corpus is every distinct sentence2 of the file. With the STS Benchmark test split this gives a
    retrieval set that models trained on SNLI have not seen.

    Raises:
        DataFileError: missing file or columns, unusable scores, or no pair scored ``>= min_score``.
    """
    data = load_sts(path, varied_scores=False)  # positive pairs only (all scored 5) are a retrieval set
    keep = [score >= min_score for score in data.scores]
    if not any(keep):
        raise DataFileError(f"{path}: no pair has a score >= {min_score} (the highest is {max(data.scores)})")
    return pairs_to_retrieval(data.sentence1, data.sentence2, keep)


def load_retrieval(path: str | os.PathLike, min_score: float = 4.0) -> RetrievalData:
    """Load an SNLI-style (premise, hypothesis, label) or STS-style (sentence1, sentence2, score) file.

    The format is chosen by the file's columns; see :func:`load_snli_retrieval` and
    :func:`load_sts_retrieval`.
    """
    columns = set(read_rows(path)[0])
    if {"premise", "hypothesis", "label"} <= columns:
        return load_snli_retrieval(path)
    if {"sentence1", "sentence2", "score"} <= columns:
        return load_sts_retrieval(path, min_score=min_score)
    raise DataFileError(
        f"{path}: expected columns premise, hypothesis, label (SNLI style) or sentence1, sentence2, score "
        f"(STS style); the file has {sorted(columns)}"
    )


def check_recall_at(recall_at: Sequence[int]) -> list[int]:
    """``recall_at`` as a list if it is a non-empty sequence of positive integers."""
    values = list(recall_at) if isinstance(recall_at, Sequence) and not isinstance(recall_at, str) else None
    if not values or any(not is_int(k) or k < 1 for k in values):
        raise InvalidInputError(f"recall_at must be positive integers, got {recall_at!r}")
    return [int(k) for k in values]


def retrieval_metrics(
    query_embeddings: np.ndarray,
    corpus_embeddings: np.ndarray,
    relevant: Sequence[Sequence[int]],
    recall_at: Sequence[int] = (1, 10, 100),
    chunk_size: int = 1024,
    exclude: Sequence[Sequence[int]] | None = None,
) -> dict[str, float]:
    """recall@k (for each k in ``recall_at``), MRR@10 and nDCG@10 of exact cosine search.

    Documents of equal score rank in corpus order (the same ranking whatever the corpus size; ties are
    exact for duplicate texts, and common at a handful of dims). Cosines equal only in exact arithmetic
    (different vectors) are computed by one BLAS matrix product per chunk of queries and may differ in their
    last bit (~1e-8) with the chunk's size, so such near-ties may rank differently with ``chunk_size``
    (a per-row product that would not costs 10-50x the time of the grid's scoring).

    Args:
        query_embeddings: ``(num_queries, dim)`` array (normalised here).
        corpus_embeddings: ``(num_docs, dim)`` array (normalised here).
        relevant: for each query, the corpus positions of its relevant documents.
        recall_at: cut-offs for recall; each is clamped to the corpus size.
        chunk_size: queries scored at once (memory: ``chunk_size * num_docs`` floats).
        exclude: for each query, corpus positions left out of its ranking (e.g. the query's own text,
            which would otherwise take rank 1 and count as a miss).

    Returns:
        ``{"recall@1": ..., "recall@10": ..., "mrr@10": ..., "ndcg@10": ...}`` (means over queries, 0-1).
    """
    if (
        query_embeddings.ndim != 2
        or corpus_embeddings.ndim != 2
        or query_embeddings.shape[1] != corpus_embeddings.shape[1]
    ):
        raise InvalidInputError(
            f"query and corpus embeddings must be 2-D with the same width, got {query_embeddings.shape} "
            f"and {corpus_embeddings.shape}"
        )
    if len(relevant) != len(query_embeddings):
        raise InvalidInputError(f"got {len(relevant)} relevance lists for {len(query_embeddings)} queries")
    recall_at = check_recall_at(recall_at)
    num_docs = len(corpus_embeddings)
    for i, rel in enumerate(relevant):  # a position outside the corpus would mark another query's document
        if not len(rel) or not all(is_int(p) and 0 <= p < num_docs for p in rel):
            raise InvalidInputError(
                f"relevant[{i}] must be a non-empty list of corpus positions 0..{num_docs - 1}, "
                f"got {rel!r:.80}"
            )
    if exclude is not None and len(exclude) != len(query_embeddings):
        raise InvalidInputError(f"got {len(exclude)} exclusion lists for {len(query_embeddings)} queries")
    depth = min(max(*recall_at, 10), num_docs)
    queries = truncate_dims(np.asarray(query_embeddings, dtype=np.float32), None, normalize=True)
    corpus = np.ascontiguousarray(
        truncate_dims(np.asarray(corpus_embeddings, dtype=np.float32), None, normalize=True)
    )

    ranked = np.empty((len(queries), depth), dtype=np.int64)
    for start in range(0, len(queries), chunk_size):
        scores = queries[start : start + chunk_size] @ corpus.T
        if exclude is not None:
            for row, left_out in enumerate(exclude[start : start + len(scores)]):
                scores[row, list(left_out)] = -np.inf
        ranked[start : start + len(scores)] = top_k(scores, depth)

    # hits[q, r]: is the document at rank r relevant to query q (pairs encoded as q * num_docs + doc).
    pairs = np.fromiter(
        (q * num_docs + d for q, rel in enumerate(relevant) for d in set(rel)), dtype=np.int64
    )
    hits = np.isin(ranked + np.arange(len(queries))[:, None] * num_docs, pairs)
    num_relevant = np.array([len(set(rel)) for rel in relevant], dtype=np.float64)

    metrics = {
        f"recall@{k}": float(np.mean(hits[:, : min(k, depth)].sum(1) / num_relevant)) for k in recall_at
    }
    top10 = hits[:, : min(10, depth)]
    first = np.where(top10.any(1), top10.argmax(1) + 1, 0)
    metrics["mrr@10"] = float(np.mean(np.where(first > 0, 1.0 / np.maximum(first, 1), 0.0)))
    discounts = 1.0 / np.log2(np.arange(2, top10.shape[1] + 2))
    ideal = np.array([discounts[: int(min(n, len(discounts)))].sum() for n in num_relevant])
    metrics["ndcg@10"] = float(np.mean((top10 * discounts).sum(1) / ideal))
    return metrics


#: Retrieval results are :class:`~matryoshka2d.evaluation.grid.GridResult` objects (several metrics; the
#: default one is ``ndcg@10``). The name is kept for existing imports.
RetrievalGridResult = GridResult


def evaluate_retrieval(
    model: GridEncoder,
    data: RetrievalData | str | os.PathLike,
    layers: Sequence[int] | None = None,
    dims: Sequence[int] | None = None,
    recall_at: Sequence[int] = (1, 10, 100),
    batch_size: int = 32,
    show_progress: bool | None = None,
    query_prompt_name: str | None = None,
    document_prompt_name: str | None = None,
    workers: int = 1,
) -> GridResult:
    """Retrieval metrics for every (layers, dims) cell, encoding every distinct text once.

    Args:
        model: the encoder to evaluate (an :class:`~matryoshka2d.model.EmbeddingModel` or any encoder
            with ``iter_encode``, ``num_layers`` and ``dim``).
        data: a :class:`RetrievalData`, or the path of an SNLI pair-class or STS file (see
            :func:`load_retrieval`).
        layers: layer counts to evaluate (default: 1..num_layers).
        dims: embedding sizes to evaluate (default: the model's full dim).
        recall_at: cut-offs for recall@k.
        batch_size: encoding batch size.
        show_progress: tqdm bars while encoding and scoring (default: for more than 20 batches).
        query_prompt_name, document_prompt_name: the model's prompts for queries and for documents (e.g.
            ``"query"`` and ``"document"`` for a retrieval model; see
            :meth:`~matryoshka2d.encoder.Encoder.resolve_prompt`). Default (both None): every text gets
            the model's default prompt, if it has one; a text that is both a query and a document is
            then encoded once, otherwise once per prompt.
        workers: batches encoded at once (:meth:`~matryoshka2d.encoder.Encoder.iter_encode`; speed only).

    Returns:
        a :class:`GridResult` with ``recall@k`` for each ``k``, ``mrr@10`` and ``ndcg@10`` (the default
        metric), and ``num_queries``/``num_docs`` (and the prompts used, if any) in its ``info``.
    """
    recall_at = check_recall_at(recall_at)  # before the (slow) encoding
    if not isinstance(data, RetrievalData):
        data = load_retrieval(data)
    info: dict = {"num_queries": len(data.queries), "num_docs": len(data.corpus)}
    queries, corpus, prompt = data.queries, data.corpus, None
    if query_prompt_name is not None or document_prompt_name is not None:
        resolve = getattr(model, "resolve_prompt", None)
        if resolve is None:
            raise InvalidInputError(f"{type(model).__name__} takes no prompts")
        query_prompt, document_prompt = resolve(query_prompt_name), resolve(document_prompt_name)
        # Each text with its prompt, encoded without another (the same input the tokenizer gets from
        # encode(text, prompt=...)): one pass over queries and documents, as without prompts.
        queries = [query_prompt + text for text in queries]
        corpus = [document_prompt + text for text in corpus]
        prompt = ""
        info.update(query_prompt=query_prompt, document_prompt=document_prompt)
    texts = list(dict.fromkeys(queries + corpus))
    position = {text: i for i, text in enumerate(texts)}
    query_rows = np.array([position[t] for t in queries])
    corpus_rows = np.array([position[t] for t in corpus])
    # A query's own text in the corpus (an STS sentence1 that is another pair's sentence2) is the same
    # embedding: rank 1 for any model, judged not relevant. Left out of that query's ranking (unless it
    # is relevant), as BEIR's ignore_identical_ids does.
    in_corpus: dict[str, list[int]] = {}
    for i, text in enumerate(data.corpus):  # every copy (a corpus given in Python may repeat a text)
        in_corpus.setdefault(text, []).append(i)
    exclude = [
        [i for i in in_corpus.get(q, []) if i not in rel] for q, rel in zip(data.queries, data.relevant)
    ]

    def score(embeddings: np.ndarray) -> dict[str, float]:
        return retrieval_metrics(
            embeddings[query_rows], embeddings[corpus_rows], data.relevant, recall_at, exclude=exclude
        )

    return evaluate_grid(
        model,
        texts,
        score,
        layers,
        dims,
        batch_size=batch_size,
        show_progress=show_progress,
        primary="ndcg@10",
        info=info,
        prompt=prompt,
        workers=workers,
    )
