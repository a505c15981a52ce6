"""Evaluation over the layers x dims grid from one pass over the data: STS (Spearman) and retrieval."""

from matryoshka2d.evaluation.retrieval import RetrievalGridResult, evaluate_retrieval, load_retrieval
from matryoshka2d.evaluation.sts import GridResult, evaluate_sts, resolve_grid

__all__ = [
    "GridResult",
    "RetrievalGridResult",
    "evaluate_retrieval",
    "evaluate_sts",
    "load_retrieval",
    "resolve_grid",
]
