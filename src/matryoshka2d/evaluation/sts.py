"""STS evaluation over the whole layers x dims grid, from one pass over the data.

Every distinct sentence is encoded once by the grid engine (:mod:`matryoshka2d.evaluation.grid`), which
streams every requested layer count from one forward pass and every dim as a re-normalised prefix; each
cell is then one Spearman correlation between the pairs' cosine similarities and the gold scores.
Evaluating 6 layers x 5 dims therefore costs about one full-size encode plus 30 cheap correlations.

Spearman is undefined when the similarities or the gold scores are all equal; such a cell is ``nan``
(``NaN`` in the JSON) with an :class:`~matryoshka2d.evaluation.grid.UndefinedMetricWarning`, never 0.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
from scipy.stats import spearmanr

from matryoshka2d.data import StsData, load_sts
from matryoshka2d.evaluation.grid import GridEncoder, GridResult, Undefined, evaluate_grid, resolve_grid

__all__ = ["GridResult", "evaluate_sts", "resolve_grid", "spearman_x100", "spearman_undefined_reason"]

#: Cosine similarities spanning at most this much are constant up to float32 rounding: Spearman would
#: rank rounding noise, so it is reported as undefined.
CONSTANT_SIMILARITY_SPAN = 1e-6


def spearman_undefined_reason(similarities: np.ndarray, gold: np.ndarray) -> str | None:
    """Why Spearman of ``similarities`` against ``gold`` is undefined, or None if it is defined."""
    if len(similarities) < 2:
        return f"it needs at least 2 pairs, got {len(similarities)}"
    if np.ptp(gold) == 0:
        return f"the gold scores are all equal ({float(gold[0]):g})"
    if float(np.ptp(similarities)) <= CONSTANT_SIMILARITY_SPAN:
        return f"the cosine similarities are all equal (they span at most {CONSTANT_SIMILARITY_SPAN:g})"
    return None


def spearman_x100(similarities: np.ndarray, gold: np.ndarray) -> float:
    """Spearman rank correlation x 100; ``nan`` if undefined (see :func:`spearman_undefined_reason`)."""
    if spearman_undefined_reason(similarities, gold) is not None:
        return math.nan
    return float(spearmanr(similarities, gold).statistic * 100)


def evaluate_sts(
    model: GridEncoder,
    data: StsData | str | os.PathLike,
    layers: Sequence[int] | None = None,
    dims: Sequence[int] | None = None,
    batch_size: int = 32,
    show_progress: bool | None = None,
    workers: int = 1,
) -> GridResult:
    """Spearman x 100 between cosine similarity and gold scores for every (layers, dims) cell.

    Each distinct sentence is encoded once, in one pass that yields every requested cell.

    Args:
        model: the encoder to evaluate (an :class:`~matryoshka2d.model.EmbeddingModel` or any encoder
            with ``iter_encode``, ``num_layers`` and ``dim``).
        data: scored pairs, or the path of a tsv/csv/jsonl file with columns sentence1, sentence2, score.
        layers: layer counts to evaluate (default: 1..num_layers).
        dims: embedding sizes to evaluate (default: the model's full dim).
        batch_size: encoding batch size.
        show_progress: tqdm bar while encoding (default: for more than 20 batches).
        workers: batches encoded at once (:meth:`~matryoshka2d.encoder.Encoder.iter_encode`; speed only).

    Returns:
        a :class:`GridResult` with one metric, ``spearman`` (``nan`` where undefined).

    Warns:
        UndefinedMetricWarning: naming the cells where Spearman is undefined.
    """
    if not isinstance(data, StsData):
        data = load_sts(data)
    unique = list(dict.fromkeys(data.sentence1 + data.sentence2))
    position = {text: i for i, text in enumerate(unique)}
    idx1 = np.array([position[t] for t in data.sentence1])
    idx2 = np.array([position[t] for t in data.sentence2])
    gold = np.asarray(data.scores, dtype=np.float64)

    def score(embeddings: np.ndarray) -> dict[str, float | Undefined]:
        similarities = np.einsum("ij,ij->i", embeddings[idx1], embeddings[idx2])
        reason = spearman_undefined_reason(similarities, gold)
        return {"spearman": Undefined(reason) if reason else spearman_x100(similarities, gold)}

    return evaluate_grid(
        model,
        unique,
        score,
        layers,
        dims,
        batch_size=batch_size,
        show_progress=show_progress,
        workers=workers,
    )
