"""matryoshka2d.ranking: the best k of each row, equal scores by position."""

from __future__ import annotations

import numpy as np

from matryoshka2d.ranking import top_k


def test_top_k_ranks_equal_scores_by_position():
    scores = np.array([[0.5, 0.9, 0.5, 0.5, 0.1], [0.2, 0.2, 0.2, 0.2, 0.2]], dtype=np.float32)
    positions = np.array([[40, 3, 7, 2, 9], [8, 6, 4, 2, 0]])
    for k, expected in ((1, [[1], [4]]), (2, [[1, 3], [4, 3]]), (3, [[1, 3, 2], [4, 3, 2]])):
        np.testing.assert_array_equal(top_k(scores, k, positions), expected)
    np.testing.assert_array_equal(top_k(scores, 5, positions), [[1, 3, 2, 0, 4], [4, 3, 2, 1, 0]])


def test_top_k_equals_a_full_sort_by_score_then_position():
    rng = np.random.default_rng(0)
    for _ in range(200):
        rows, n = rng.integers(1, 6), rng.integers(1, 40)
        scores = rng.integers(0, 4, size=(rows, n)).astype(np.float32)  # many ties
        scores[rng.random((rows, n)) < 0.2] = -np.inf
        positions = np.stack([rng.permutation(n) for _ in range(rows)])
        k = int(rng.integers(1, n + 3))
        expected = np.stack([np.lexsort((positions[r], -scores[r]))[:k] for r in range(rows)])
        np.testing.assert_array_equal(top_k(scores, k, positions), expected)
        np.testing.assert_array_equal(
            top_k(scores, k), np.stack([np.lexsort((np.arange(n), -scores[r]))[:k] for r in range(rows)])
        )
