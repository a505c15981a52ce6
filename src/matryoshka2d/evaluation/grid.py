"""The grid engine shared by every evaluation: encode once, score every (layers, dims) cell.

An evaluation over the layers x dims grid always does the same four things, and they live here once:

1. validate the requested layer counts and dims against the encoder (:func:`resolve_grid`);
2. encode every distinct text once, in one streaming pass that yields every cell
   (:func:`encode_grid`, a thin use of ``encoder.iter_encode(texts, layers=[...], dims=[...],
   normalize=True)``: one forward pass per batch up to the deepest layer count, each dim a re-normalised
   prefix);
3. score each cell with a metric function (STS: Spearman; retrieval: recall@k, MRR, nDCG);
4. collect the scores in one result type, :class:`GridResult`, with a table, ``to_dict``/``from_dict``
   and the cell/mean helpers.

Any encoder with ``iter_encode``, ``num_layers`` and ``dim`` works: the torch
:class:`~matryoshka2d.model.EmbeddingModel` and the ONNX encoders alike.

Undefined metrics (Spearman of constant similarities or constant gold scores) are reported as NaN, never
as a number: the score function returns :class:`Undefined` with the reason, the cell holds ``nan``, the
JSON holds ``NaN`` (Python's ``json`` writes and reads it), tables print ``nan``, and one
:class:`UndefinedMetricWarning` per metric and reason names the cells.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from tqdm.auto import tqdm

from matryoshka2d.encoder import prompt_option
from matryoshka2d.errors import DataFileError, InvalidDimError, InvalidInputError, InvalidLayersError
from matryoshka2d.truncation import check_dim, check_layers
from matryoshka2d.validation import check_positive_int, is_int

#: Keys of the JSON format that are not metric tables.
GRID_KEYS = ("model", "layers", "dims")

#: Decimals :meth:`GridResult.table` prints per metric (others: 4; Spearman is x 100).
TABLE_PRECISION = {"spearman": 2}


class GridEncoder(Protocol):
    """What the grid engine needs from an encoder (the torch model and the ONNX encoders have it)."""

    num_layers: int
    dim: int

    def iter_encode(self, texts, layers=None, dims=None, batch_size=32, normalize=True, **options): ...


class UndefinedMetricWarning(UserWarning):
    """A metric is undefined at some cells (reported as NaN), e.g. Spearman of constant similarities."""


@dataclass(frozen=True)
class Undefined:
    """What a score function returns for a metric that has no value at a cell, with the reason."""

    reason: str


#: ``score(cell_embeddings) -> {metric name: value or Undefined}``; the embeddings are normalised float32
#: arrays ``(len(texts), dim)`` in the order of the texts given to :func:`evaluate_grid`.
ScoreFunction = Callable[[np.ndarray], Mapping[str, "float | Undefined"]]


@dataclass
class GridResult:
    """One or several metrics for every (layers, dims) cell.

    ``metrics[name][i][j]`` is metric ``name`` at ``layers[i]``, ``dims[j]`` (``nan`` where undefined).

    JSON (``to_dict`` / ``from_dict``): a grid of one metric is written with the metric as a top-level key,
    which is the ``eval-sts --json`` format ``{"model", "layers", "dims", "spearman"}``; several metrics
    are written under ``"metrics"`` with the default one under ``"primary"``, the ``eval-retrieval --json``
    format. ``info`` entries (``num_queries``, ``num_docs``, ...) are top-level keys in both. ``from_dict``
    reads both formats; an undefined cell is ``NaN`` in the JSON.

    Attributes:
        model: name or path of the evaluated model.
        layers: layer counts, ascending (rows).
        dims: embedding sizes, descending (columns).
        metrics: ``{name: layers x dims table}``.
        primary: the metric :meth:`cell`, :meth:`mean` and :meth:`table` use by default (default: the first).
        info: other facts about the evaluation (written into the JSON).
    """

    model: str
    layers: list[int]
    dims: list[int]
    metrics: dict[str, list[list[float]]]
    primary: str | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.metrics:
            raise InvalidInputError("a grid result needs at least one metric")
        if self.primary is None:
            self.primary = next(iter(self.metrics))
        if self.primary not in self.metrics:
            raise InvalidInputError(f"primary metric {self.primary!r} is not one of {list(self.metrics)}")

    # ------------------------------------------------------------------ access
    @property
    def spearman(self) -> list[list[float]]:
        """The ``spearman`` table (STS results)."""
        return self.metrics[self._metric("spearman")]

    def _metric(self, metric: str | None) -> str:
        name = self.primary if metric is None else metric
        if name not in self.metrics:
            raise InvalidInputError(f"unknown metric {name!r}; this result has {list(self.metrics)}")
        return name  # type: ignore[return-value]

    def cell(self, layers: int, dim: int, metric: str | None = None) -> float:
        """One metric (default: :attr:`primary`) at one (layers, dim) cell."""
        table = self.metrics[self._metric(metric)]
        if layers not in self.layers or dim not in self.dims:
            raise InvalidInputError(
                f"no cell at layers={layers!r}, dim={dim!r}: the grid has layers {self.layers} and dims "
                f"{self.dims}"
            )
        return table[self.layers.index(layers)][self.dims.index(dim)]

    def mean(self, max_layers: int | None = None, metric: str | None = None) -> float:
        """Mean of a metric (default: :attr:`primary`) over all cells, or over the rows with at most
        ``max_layers`` layers; ``nan`` if any of those cells is undefined."""
        table = self.metrics[self._metric(metric)]
        rows = [r for k, r in zip(self.layers, table) if max_layers is None or k <= max_layers]
        if not rows:
            raise InvalidLayersError(
                f"no row of the grid has at most {max_layers} layers (its layer counts: {self.layers})"
            )
        return float(np.mean(rows))

    def undefined_cells(self, metric: str | None = None) -> list[tuple[int, int]]:
        """The (layers, dim) cells where a metric (default: :attr:`primary`) is undefined (NaN)."""
        table = self.metrics[self._metric(metric)]
        return [
            (k, d)
            for k, row in zip(self.layers, table)
            for d, value in zip(self.dims, row)
            if math.isnan(value)
        ]

    def table(self, metric: str | None = None, precision: int | None = None) -> str:
        """A plain-text table of one metric: one row per layer count, one column per dim.

        Args:
            metric: which metric (default: :attr:`primary`).
            precision: decimals (default: 2 for Spearman x 100, else 4). Undefined cells print ``nan``.
        """
        name = self._metric(metric)
        digits = TABLE_PRECISION.get(name, 4) if precision is None else precision
        corner = "layers \\ dims" if len(self.metrics) == 1 else f"{name}: layers \\ dims"
        head = [corner] + [str(d) for d in self.dims]
        rows = [
            [str(k)] + ["nan" if math.isnan(v) else f"{v:.{digits}f}" for v in row]
            for k, row in zip(self.layers, self.metrics[name], strict=True)
        ]
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        fmt = "  ".join(f"{{:>{w}}}" for w in widths)
        return "\n".join(fmt.format(*r) for r in [head, *rows])

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict:
        """The JSON form (see the class docs): one metric top-level, several under ``"metrics"``."""
        out: dict[str, Any] = {"model": self.model, "layers": list(self.layers), "dims": list(self.dims)}
        out.update(self.info)
        if len(self.metrics) == 1:
            out.update(self.metrics)
        else:
            out["primary"] = self.primary
            out["metrics"] = self.metrics
        return out

    @classmethod
    def from_dict(cls, data: Mapping) -> GridResult:
        """Read either JSON form written by :meth:`to_dict` (``NaN`` cells included).

        Raises:
            DataFileError: missing ``layers``/``dims``, no metric table, or a table that is not
                ``len(layers)`` rows of ``len(dims)`` numbers.
        """
        if not isinstance(data, Mapping) or "layers" not in data or "dims" not in data:
            raise DataFileError("a grid needs 'layers', 'dims' and at least one metric table")
        layers, dims = list(data["layers"]), list(data["dims"])
        for name, values in (("layers", layers), ("dims", dims)):
            if not all(is_int(v) and v > 0 for v in values):
                raise DataFileError(f"a grid's {name!r} must be positive integers, got {values!r:.80}")
        if "metrics" in data and isinstance(data["metrics"], Mapping):
            tables = dict(data["metrics"])
            info_keys = [k for k in data if k not in (*GRID_KEYS, "metrics", "primary")]
            primary = data.get("primary")
            if primary not in tables:
                primary = "ndcg@10" if "ndcg@10" in tables else None  # files written before "primary"
        else:
            tables = {k: v for k, v in data.items() if k not in GRID_KEYS and isinstance(v, list)}
            info_keys = [k for k in data if k not in GRID_KEYS and k not in tables]
            primary = None
        if not tables:
            raise DataFileError("a grid needs at least one metric table (e.g. 'spearman' or 'metrics')")
        metrics = {}
        for name, table in tables.items():
            if not isinstance(table, list) or len(table) != len(layers):
                raise DataFileError(f"metric {name!r} is not a table of {len(layers)} rows (one per layer)")
            rows = []
            for i, row in enumerate(table):
                if not isinstance(row, list) or len(row) != len(dims):
                    raise DataFileError(f"metric {name!r}: row {i} does not hold {len(dims)} numbers")
                try:
                    rows.append([float(v) for v in row])
                except (TypeError, ValueError):
                    raise DataFileError(
                        f"metric {name!r}: row {i} holds a value that is not a number"
                    ) from None
            metrics[name] = rows
        model = data.get("model")
        return cls(
            "" if model is None else str(model),
            layers,
            dims,
            metrics,
            primary=primary,
            info={k: data[k] for k in info_keys},
        )


def resolve_grid(encoder: GridEncoder, layers: Sequence[int] | None, dims: Sequence[int] | None):
    """Check the requested layer counts and dims against ``encoder``: ``(layers ascending, dims descending)``.

    Defaults: every layer count ``1..num_layers``; the full dim.

    Raises:
        InvalidLayersError, InvalidDimError: an empty list or a value out of range (the message names it).
    """
    if layers is not None and len(layers) == 0:
        raise InvalidLayersError("layers is empty: request at least one layer count")
    if dims is not None and len(dims) == 0:
        raise InvalidDimError("dims is empty: request at least one embedding size")
    num_layers, full = encoder.num_layers, encoder.dim
    # "is None", not "or": a numpy array has no truth value
    layers = sorted(
        {check_layers(k, num_layers) for k in (range(1, num_layers + 1) if layers is None else layers)}
    )
    dims = sorted({check_dim(d, full) for d in ([full] if dims is None else dims)}, reverse=True)
    return layers, dims


def encode_grid(
    encoder: GridEncoder,
    texts: Sequence[str],
    layers: Sequence[int],
    dims: Sequence[int],
    batch_size: int = 32,
    show_progress: bool | None = None,
    prompt: str | None = None,
    workers: int = 1,
) -> dict[tuple[int, int], np.ndarray]:
    """Embeddings of ``texts`` at every (layers, dim) cell from one streaming pass.

    A thin use of ``encoder.iter_encode(texts, layers=layers, dims=dims, normalize=True)``: each cell is
    the layer's pooled output cut to its first ``dim`` values and L2-normalised, exactly as
    ``encoder.encode(texts, layers=k, dim=d)`` gives it. ``prompt`` is passed on if given (``""``: the
    texts are encoded without the model's default prompt), ``workers`` (batches encoded at once, speed
    only) if not 1.

    Returns:
        ``{(k, d): float32 array (len(texts), d)}``; memory is ``len(texts) * len(layers) * sum(dims)``
        floats.
    """
    workers = check_positive_int(workers, "workers")
    cells = [(k, d) for k in layers for d in dims]
    out = {(k, d): np.empty((len(texts), d), dtype=np.float32) for k, d in cells}
    batches = encoder.iter_encode(
        texts,
        layers=list(layers),
        dims=list(dims),
        batch_size=batch_size,
        normalize=True,
        show_progress=show_progress,
        **prompt_option(prompt),
        **({"workers": workers} if workers != 1 else {}),
    )
    for batch in batches:
        for cell in cells:
            out[cell][batch.start : batch.start + batch.size] = batch[cell]
    return out


def evaluate_grid(
    encoder: GridEncoder,
    texts: Sequence[str],
    score: ScoreFunction,
    layers: Sequence[int] | None = None,
    dims: Sequence[int] | None = None,
    batch_size: int = 32,
    show_progress: bool | None = None,
    primary: str | None = None,
    info: Mapping[str, Any] | None = None,
    prompt: str | None = None,
    workers: int = 1,
) -> GridResult:
    """Encode ``texts`` once and score every (layers, dims) cell with ``score``.

    Args:
        encoder: anything with ``iter_encode``, ``num_layers`` and ``dim`` (its ``name_or_path`` is recorded).
        texts: the distinct texts the score function refers to by position.
        score: ``score(embeddings) -> {metric: value}`` for one cell (see :data:`ScoreFunction`); return
            :class:`Undefined` for a metric without a value there.
        layers: layer counts (default: ``1..num_layers``).
        dims: embedding sizes (default: the full dim).
        batch_size: texts per forward pass.
        show_progress: tqdm bars while encoding and scoring (default: for more than 20 batches).
        primary: the result's default metric (default: the first the score function returns).
        info: extra facts recorded in the result (and its JSON).
        prompt: passed to :func:`encode_grid` (None: the model's default prompt).
        workers: batches encoded at once (:meth:`~matryoshka2d.encoder.Encoder.iter_encode`; speed only).

    Warns:
        UndefinedMetricWarning: once per metric and reason, naming the cells reported as NaN.
    """
    layers, dims = resolve_grid(encoder, layers, dims)
    embeddings = encode_grid(
        encoder,
        texts,
        layers,
        dims,
        batch_size=batch_size,
        show_progress=show_progress,
        prompt=prompt,
        workers=workers,
    )
    show = show_progress if show_progress is not None else len(texts) > 20 * batch_size
    scores: dict[tuple[int, int], Mapping[str, float | Undefined]] = {}
    for cell in tqdm(list(embeddings), desc="Scoring cells", unit="cell", disable=not show):
        scores[cell] = score(embeddings.pop(cell))  # free each cell once it is scored
    names = list(next(iter(scores.values())))
    undefined: dict[tuple[str, str], list[tuple[int, int]]] = {}
    metrics: dict[str, list[list[float]]] = {}
    for name in names:
        table = []
        for k in layers:
            row = []
            for d in dims:
                value = scores[k, d][name]
                if isinstance(value, Undefined) or math.isnan(value):
                    reason = value.reason if isinstance(value, Undefined) else "the computation gave NaN"
                    undefined.setdefault((name, reason), []).append((k, d))
                    value = math.nan
                row.append(float(value))
            table.append(row)
        metrics[name] = table
    for (name, reason), cells in undefined.items():
        where = ", ".join(f"layers={k} dim={d}" for k, d in cells)
        warnings.warn(
            f"{name} is undefined (reported as NaN) at {len(cells)} cell{'s' * (len(cells) > 1)} ({where}): "
            f"{reason}",
            UndefinedMetricWarning,
            stacklevel=3,
        )
    model = getattr(encoder, "name_or_path", None)
    return GridResult(
        model=str(model) if model is not None else type(encoder).__name__,
        layers=layers,
        dims=dims,
        metrics=metrics,
        primary=primary,
        info=dict(info or {}),
    )
