"""The best ``k`` of each row of a score matrix, with one tie rule: equal scores rank by position.

Shared by retrieval evaluation (:func:`~matryoshka2d.evaluation.retrieval.retrieval_metrics`: position =
the document's place in the corpus) and the search index's rerank (position = the document's row in the
index), so that a ranking never depends on ``k``, a shortlist size or how the candidates were ordered.
"""

from __future__ import annotations

import numpy as np


def top_k(scores: np.ndarray, k: int, positions: np.ndarray | None = None) -> np.ndarray:
    """Per row, the columns of the ``k`` highest scores, best first; equal scores rank by ``positions``.

    Exact and cheap: ``argpartition`` picks ``k`` columns; only rows where a score equal to the k-th one
    was left out are picked again, from the columns scoring at least that much; the ``k`` picked are then
    ordered by (-score, position).

    Args:
        scores: ``(rows, n)`` float array (``-inf`` for columns that must come last).
        k: columns wanted per row, ``1..n`` (``k >= n`` orders every column).
        positions: ``(rows, n)`` ranks for ties (smaller first); default: the column number.

    Returns:
        ``(rows, min(k, n))`` int array of column numbers.
    """
    n = scores.shape[1]
    if positions is None:
        positions = np.broadcast_to(np.arange(n), scores.shape)
    if k < n:
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        kth = np.take_along_axis(scores, top, axis=1).min(axis=1, keepdims=True)
        # everything above the k-th score is picked; more columns than k at or above it: a tie was cut
        for row in np.flatnonzero((scores >= kth).sum(axis=1) > k):
            candidates = np.flatnonzero(scores[row] >= kth[row, 0])
            by_rank = np.lexsort((positions[row, candidates], -scores[row, candidates]))
            top[row] = candidates[by_rank[:k]]
    else:
        top = np.broadcast_to(np.arange(n), scores.shape)
    order = np.lexsort(
        (np.take_along_axis(positions, top, axis=1), -np.take_along_axis(scores, top, axis=1)), axis=1
    )
    return np.take_along_axis(top, order, axis=1)
