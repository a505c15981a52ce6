"""Evaluation over the layers x dims grid from one pass over the data: STS (Spearman) and retrieval.

:mod:`~matryoshka2d.evaluation.grid` is the engine both use (encode once, score every cell, one result
type :class:`GridResult`); :mod:`~matryoshka2d.evaluation.sts` and :mod:`~matryoshka2d.evaluation.retrieval`
hold only their data loading and their metric.
"""

from matryoshka2d.evaluation.grid import (
    GridResult,
    Undefined,
    UndefinedMetricWarning,
    encode_grid,
    evaluate_grid,
    resolve_grid,
)
from matryoshka2d.evaluation.retrieval import (
    RetrievalData,
    RetrievalGridResult,
    evaluate_retrieval,
    load_retrieval,
    retrieval_metrics,
)
from matryoshka2d.evaluation.sts import evaluate_sts, spearman_x100

__all__ = [
    "GridResult",
    "RetrievalData",
    "RetrievalGridResult",
    "Undefined",
    "UndefinedMetricWarning",
    "encode_grid",
    "evaluate_grid",
    "evaluate_retrieval",
    "evaluate_sts",
    "load_retrieval",
    "resolve_grid",
    "retrieval_metrics",
    "spearman_x100",
]
