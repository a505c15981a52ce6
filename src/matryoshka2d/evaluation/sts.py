"""STS evaluation over the whole layers x dims grid, from one pass over the data.

Every layer count k is a prefix of one forward pass, so :meth:`EmbeddingModel.encode_layers` returns the
pooled output of all requested layers at once; each dim is a slice of those arrays. Evaluating 6 layers x
5 dims therefore costs about one full-size encode plus 30 cheap Spearman computations.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import spearmanr

from matryoshka2d.data import StsData, load_sts
from matryoshka2d.errors import InvalidDimError, InvalidLayersError
from matryoshka2d.model import EmbeddingModel
from matryoshka2d.truncation import check_dim, check_layers, truncate_dims


@dataclass
class GridResult:
    """Scores for every (layers, dims) cell: ``scores[i][j]`` is the score at ``layers[i]``, ``dims[j]``.

    ``to_dict`` gives the ``eval-sts --json`` format: ``{"model", "layers", "dims", "spearman"}``.
    """

    model: str
    layers: list[int]
    dims: list[int]
    spearman: list[list[float]]

    def to_dict(self) -> dict:
        return {"model": self.model, "layers": self.layers, "dims": self.dims, "spearman": self.spearman}

    @classmethod
    def from_dict(cls, data: dict) -> GridResult:
        return cls(
            data["model"], list(data["layers"]), list(data["dims"]), [list(r) for r in data["spearman"]]
        )

    def cell(self, layers: int, dim: int) -> float:
        """The score at one (layers, dim) cell."""
        return self.spearman[self.layers.index(layers)][self.dims.index(dim)]

    def mean(self, max_layers: int | None = None) -> float:
        """Mean score over all cells (or over the rows with at most ``max_layers`` layers)."""
        rows = [r for k, r in zip(self.layers, self.spearman) if max_layers is None or k <= max_layers]
        return float(np.mean(rows))

    def table(self, precision: int = 2) -> str:
        """A plain-text table: one row per layer count, one column per dim."""
        head = ["layers \\ dims"] + [str(d) for d in self.dims]
        rows = [[str(k)] + [f"{v:.{precision}f}" for v in row] for k, row in zip(self.layers, self.spearman)]
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        fmt = "  ".join(f"{{:>{w}}}" for w in widths)
        return "\n".join(fmt.format(*r) for r in [head, *rows])


def resolve_grid(model: EmbeddingModel, layers: Sequence[int] | None, dims: Sequence[int] | None):
    """Validate and sort the requested layers and dims (defaults: every layer, the full dim)."""
    if layers is not None and len(layers) == 0:
        raise InvalidLayersError("layers is empty: request at least one layer count")
    if dims is not None and len(dims) == 0:
        raise InvalidDimError("dims is empty: request at least one embedding size")
    layers = sorted({check_layers(k, model.num_layers) for k in (layers or range(1, model.num_layers + 1))})
    dims = sorted({check_dim(d, model.dim) for d in (dims or [model.dim])}, reverse=True)
    return layers, dims


def spearman_x100(similarities: np.ndarray, gold: np.ndarray) -> float:
    """Spearman rank correlation x 100 (nan-safe: constant similarities give 0)."""
    if np.ptp(similarities) == 0:
        return 0.0
    return float(spearmanr(similarities, gold).statistic * 100)


def evaluate_sts(
    model: EmbeddingModel,
    data: StsData | str | os.PathLike,
    layers: Sequence[int] | None = None,
    dims: Sequence[int] | None = None,
    batch_size: int = 32,
    show_progress: bool | None = None,
) -> GridResult:
    """Spearman x 100 between cosine similarity and gold scores for every (layers, dims) cell.

    Each distinct sentence is encoded once, in one pass that yields every requested layer.

    Args:
        model: the model to evaluate.
        data: scored pairs, or the path of a tsv/csv/jsonl file with columns sentence1, sentence2, score.
        layers: layer counts to evaluate (default: 1..num_layers).
        dims: embedding sizes to evaluate (default: the model's full dim).
        batch_size: encoding batch size.
        show_progress: tqdm bar while encoding (default: for more than 20 batches).
    """
    if not isinstance(data, StsData):
        data = load_sts(data)
    layers, dims = resolve_grid(model, layers, dims)
    unique = list(dict.fromkeys(data.sentence1 + data.sentence2))
    position = {text: i for i, text in enumerate(unique)}
    idx1 = np.array([position[t] for t in data.sentence1])
    idx2 = np.array([position[t] for t in data.sentence2])
    gold = np.asarray(data.scores, dtype=np.float64)
    by_layer = model.encode_layers(unique, layers, batch_size=batch_size, show_progress=show_progress)
    grid = []
    for k in layers:
        row = []
        for d in dims:
            emb = truncate_dims(by_layer[k], d, normalize=True)
            row.append(spearman_x100(np.einsum("ij,ij->i", emb[idx1], emb[idx2]), gold))
        grid.append(row)
    return GridResult(model=str(model.name_or_path), layers=layers, dims=dims, spearman=grid)
