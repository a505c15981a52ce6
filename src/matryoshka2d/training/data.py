"""Training data: loading text columns (and labels) from files or the Hugging Face hub, and batching them.

Input formats:

- Local files: ``.tsv`` / ``.csv`` (header row), ``.jsonl`` (one JSON object a line) or ``.parquet``, read
  with :func:`matryoshka2d.data.read_rows`. Several files are concatenated (they must give the same
  columns), e.g. both SNLI triplet files.
- Hugging Face datasets: ``owner/name``, optionally ``owner/name:subset`` and ``@split`` (default
  ``train``), e.g. ``sentence-transformers/all-nli:triplet@train``. Needs the optional ``datasets``
  package.

Columns are chosen by name. Without an explicit choice the first known layout found is used:
``anchor, positive[, negative]``, ``sentence1, sentence2[, score|label]``, ``query, positive[, negative]``,
``premise, hypothesis``. ``columns`` may list the text columns in input order (``[premise, hypothesis]``)
or map roles to file columns (``{anchor: premise, positive: hypothesis}``).

Batching: :class:`BatchStream` yields the batches of every epoch in an order fixed by the seed, optionally
without duplicate texts inside a batch (in-batch negatives must not contain the positive itself), split
across processes, and can report and restore its position for exact resumption.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from matryoshka2d.data import SUFFIXES, read_rows, require_columns, score_column, text_column
from matryoshka2d.errors import DataFileError, InvalidInputError
from matryoshka2d.validation import check_int, check_positive_int

#: Layouts recognised when no columns are given: (text columns, optional extra text column, label columns).
KNOWN_LAYOUTS: tuple[tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]], ...] = (
    (("anchor", "positive"), ("negative",), ()),
    (("sentence1", "sentence2"), (), ("score", "label")),
    (("query", "positive"), ("negative",), ()),
    (("premise", "hypothesis"), (), ()),
)

#: Role names accepted as keys of a ``columns`` mapping, in input order; ``label``/``score`` name the label.
TEXT_ROLES = ("anchor", "sentence1", "query", "positive", "sentence2", "negative")
LABEL_ROLES = ("label", "score")
#: Label columns looked for when the loss needs labels and none is named, in this order.
LABEL_NAMES = ("score", "label")
_ROLE_POSITION = {"anchor": 0, "sentence1": 0, "query": 0, "positive": 1, "sentence2": 1, "negative": 2}


@dataclass
class TrainingData:
    """Rows of texts (one list per input column) and optional float labels.

    Attributes:
        columns: the text column names, in input order (column ``i`` feeds ``outputs[i]`` of the loss).
        texts: ``texts[i][row]`` is the text of column ``i`` in ``row``.
        labels: one float per row, or None.
        label_column: where the labels came from.
        sources: a description of every source (path or dataset id, and its row count).
    """

    columns: list[str]
    texts: list[list[str]]
    labels: list[float] | None = None
    label_column: str | None = None
    sources: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.texts[0])

    def row_texts(self, row: int) -> list[str]:
        """All texts of one row."""
        return [column[row] for column in self.texts]

    def describe(self) -> dict:
        """JSON-serialisable summary for model cards and checkpoints."""
        return {
            "sources": self.sources,
            "rows": len(self),
            "columns": self.columns,
            "label_column": self.label_column,
        }


def parse_hub_source(source: str) -> tuple[str, str | None, str]:
    """Split ``owner/name[:subset][@split]`` into (dataset id, subset, split)."""
    rest, at, split = source.partition("@")
    name, colon, subset = rest.partition(":")
    if not name or name.count("/") > 1 or (colon and not subset) or (at and not split):
        raise DataFileError(
            f"{source!r} is neither an existing data file nor a Hugging Face dataset id "
            "(owner/name[:subset][@split])"
        )
    return name, subset or None, split or "train"


def _looks_like_path(source: str) -> bool:
    return (
        Path(source).suffix.lower() in SUFFIXES
        or source.startswith((".", "/", "~"))
        or source.count("/") > 1  # owner/name has one slash
        or "\\" in source
    )


def read_source(source: str | os.PathLike, max_rows: int | None = None) -> tuple[list[dict], str]:
    """Rows of one local file or Hugging Face dataset, and a label naming it in errors.

    Raises:
        DataFileError: a missing file, an unknown dataset, or ``datasets`` not installed.
    """
    text = str(source)
    path = Path(text).expanduser()
    if path.is_file() or _looks_like_path(text):
        rows = read_rows(path)  # raises "data file not found" for a missing path
        return (rows[:max_rows] if max_rows else rows), str(path)
    name, subset, split = parse_hub_source(text)
    try:
        import datasets
    except ImportError:
        raise DataFileError(
            f"{text!r} is not a local file; loading Hugging Face datasets needs the 'datasets' package "
            "(pip install 'matryoshka2d[datasets]')"
        ) from None
    try:
        dataset = datasets.load_dataset(name, subset, split=split)
    except Exception as e:  # network, unknown id, unknown split: report in one line
        first = str(e).splitlines()[0] if str(e) else ""
        raise DataFileError(
            f"cannot load Hugging Face dataset {text!r}: {type(e).__name__}: {first}"
        ) from None
    if max_rows:
        dataset = dataset.select(range(min(max_rows, len(dataset))))
    if len(dataset) == 0:
        raise DataFileError(f"{text}: no data rows")
    columns = {c: dataset[c] for c in dataset.column_names}
    rows = [dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True)]
    return rows, text


def resolve_columns(
    have: Sequence[str],
    columns: Sequence[str] | Mapping[str, str] | None,
    label_column: str | None,
    where: str,
) -> tuple[list[str], str | None]:
    """The text columns (in input order) and label column to read from a file with columns ``have``.

    Args:
        have: the columns present in the file.
        columns: None (detect a known layout), a list of text column names, or a mapping
            ``{role: column}`` with roles anchor/sentence1/query (first input), positive/sentence2 (second),
            negative (third) and label/score (the label).
        label_column: the label column; None keeps the label named in ``columns`` or found by detection.
        where: the source, for error messages.
    """
    label = label_column
    if isinstance(columns, Mapping):
        text_cols: dict[int, str] = {}
        for role, column in columns.items():
            if role in LABEL_ROLES:
                label = label if label is not None else str(column)
            elif role in _ROLE_POSITION:
                position = _ROLE_POSITION[role]
                if position in text_cols:
                    raise InvalidInputError(f"columns maps two roles to input {position}: {dict(columns)}")
                text_cols[position] = str(column)
            else:
                raise InvalidInputError(
                    f"unknown column role {role!r}; use {list(TEXT_ROLES) + list(LABEL_ROLES)}"
                )
        if sorted(text_cols) != list(range(len(text_cols))):
            raise InvalidInputError(
                f"columns {dict(columns)} skips an input: give the first (anchor/sentence1/query) and second "
                "(positive/sentence2) before a negative"
            )
        texts = [text_cols[i] for i in range(len(text_cols))]
    elif columns is not None:
        if isinstance(columns, str):
            columns = [c.strip() for c in columns.split(",") if c.strip()]
        texts = [str(c) for c in columns]
        positions = [_ROLE_POSITION.get(c) for c in texts]
        if None not in positions and positions != sorted(positions):  # e.g. [anchor, negative, positive]
            raise InvalidInputError(
                f"columns {texts} are role names out of their order: inputs are taken in the order listed "
                "(anchor/sentence1/query, positive/sentence2, negative), so this would train on "
                f"{texts[1]!r} as the positive; reorder them, or give a mapping such as "
                "{anchor: anchor, positive: positive, negative: negative}"
            )
    else:
        for required, optional, labels in KNOWN_LAYOUTS:
            if all(c in have for c in required):
                texts = list(required) + [c for c in optional if c in have]
                if label is None:
                    label = next((c for c in labels if c in have), None)
                unused = [c for c in have if c.startswith("negative") and c not in texts]
                if unused:  # sentence-transformers' hard-negative naming: negative_1, negative_2, ...
                    warnings.warn(
                        f"{where}: columns {unused} are not used (the layout found is {texts}); to train on "
                        "them, list the text columns, e.g. columns: [anchor, positive, negative_1]",
                        stacklevel=2,
                    )
                break
        else:
            raise DataFileError(
                f"{where}: cannot tell which columns to train on (the file has {list(have)}); set "
                "columns, e.g. columns: [anchor, positive, negative] or "
                "columns: {anchor: premise, positive: hypothesis}"
            )
    if not texts:
        raise InvalidInputError("columns is empty: name at least one text column")
    if len(set(texts)) != len(texts):
        raise InvalidInputError(f"columns lists a column twice: {texts}")
    if label is not None and label in texts:
        raise InvalidInputError(f"column {label!r} is both a text column and the label column")
    return texts, label


def load_training_data(
    sources: str | os.PathLike | Sequence[str | os.PathLike],
    columns: Sequence[str] | Mapping[str, str] | None = None,
    label_column: str | None = None,
    use_labels: bool | None = None,
    label_range: Sequence[float] | None = None,
    max_rows: int | None = None,
) -> TrainingData:
    """Load and concatenate training rows from local files and/or Hugging Face datasets.

    Args:
        sources: one source or a list; each a local file or a dataset id (see the module docstring).
        columns: text columns (list, in input order) or a role mapping; None detects a known layout.
        label_column: the column holding float labels (e.g. ``score``). None: the label named in a
            ``columns`` mapping, else the one of a detected layout, else (only when ``use_labels`` is True)
            a column named ``score`` or ``label``.
        use_labels: True requires labels, False drops them, None keeps labels if a label column is found.
        label_range: ``(low, high)``: labels are checked to lie in that range and rescaled to ``0..1``
            (e.g. ``[0, 5]`` for STS Benchmark scores with CosineSimilarityLoss).
        max_rows: keep only the first ``max_rows`` rows of each source.

    Raises:
        DataFileError: a missing or empty source, a missing column, a non-text value, a NaN/unparsable
            label, sources with different columns, or labels required but absent.
    """
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    sources = list(sources)
    if not sources:
        raise InvalidInputError("no training data: give at least one file or dataset id")
    if max_rows is not None:
        check_positive_int(max_rows, "max_rows")
    out: TrainingData | None = None
    for source in sources:
        rows, where = read_source(source, max_rows)
        texts_cols, label = resolve_columns(list(rows[0].keys()), columns, label_column, where)
        if use_labels is False:
            # found by detection, named in a columns mapping, or just there (an explicit one is refused)
            unused = label or next((c for c in LABEL_NAMES if c in rows[0] and c not in texts_cols), None)
            if unused is not None:
                warnings.warn(
                    f"{where}: column {unused!r} is not used: the loss takes no labels, so every row is "
                    "trained as a positive pair (low-scored pairs too); filter the rows first, or use a loss "
                    "that takes labels (cosent, angle, cosine)",
                    stacklevel=2,
                )
            label = None
        elif use_labels and label is None:  # columns were listed: still find a score/label column
            label = next((c for c in LABEL_NAMES if c in rows[0] and c not in texts_cols), None)
        if use_labels and label is None:
            raise DataFileError(
                f"{where}: the loss needs a label per row but no label column was found (the file has "
                f"{list(rows[0].keys())}); set label_column"
            )
        require_columns(rows, texts_cols + ([label] if label else []), where)
        texts = [text_column(rows, c, where, non_empty=True) for c in texts_cols]
        labels = score_column(rows, label, where) if label else None
        if out is None:
            out = TrainingData(texts_cols, texts, labels, label)
        else:
            if len(texts_cols) != len(out.columns) or (labels is None) != (out.labels is None):
                raise DataFileError(
                    f"{where}: columns {texts_cols} (label {label!r}) do not match the earlier sources' "
                    f"{out.columns} (label {out.label_column!r}); concatenated sources need the same layout"
                )
            for mine, theirs in zip(out.texts, texts, strict=True):
                mine.extend(theirs)
            if out.labels is not None and labels is not None:
                out.labels.extend(labels)
        out.sources.append({"source": where, "rows": len(rows)})
    assert out is not None
    if label_range is not None and out.labels is not None:
        out.labels = rescale_labels(out.labels, label_range)
    return out


def rescale_labels(labels: list[float], label_range: Sequence[float]) -> list[float]:
    """Map labels from ``label_range = (low, high)`` to ``0..1``; labels outside the range are an error."""
    if len(label_range) != 2 or not all(math.isfinite(float(v)) for v in label_range):
        raise InvalidInputError(
            f"label_range must be two finite numbers [low, high], got {list(label_range)}"
        )
    low, high = float(label_range[0]), float(label_range[1])
    if not high > low:
        raise InvalidInputError(f"label_range must have low < high, got {list(label_range)}")
    bad = next((x for x in labels if not low <= x <= high), None)
    if bad is not None:
        raise DataFileError(f"label {bad} is outside label_range [{low}, {high}]")
    return [(x - low) / (high - low) for x in labels]


def _resume_epochs(cursor, epoch_items: Callable[[int], list]) -> Iterator:
    """Yield the items of epoch ``cursor.epoch`` from ``cursor.position`` on, then every later epoch's.

    ``cursor.epoch`` / ``cursor.position`` always point at the next item (what a ``state_dict`` saves),
    so a stream rebuilt from them continues exactly.
    """
    while True:
        items = epoch_items(cursor.epoch)
        while cursor.position < len(items):
            item = items[cursor.position]
            cursor.position += 1
            yield item
        cursor.epoch += 1
        cursor.position = 0


class BatchStream:
    """Endless, seeded stream of row-index batches for one process, resumable at any batch.

    Each epoch the rows are shuffled with a generator seeded by ``(seed, epoch)``, so the order depends only
    on the seed, never on how many epochs or processes ran before. The global list of batches of an epoch
    is dealt out round-robin to ``num_replicas`` processes (batch ``j`` goes to rank ``j % num_replicas``);
    trailing batches that would leave some process without one are dropped, as is a final short batch.

    With ``no_duplicates`` a batch never holds the same text twice (across all of its rows' columns): a
    row that would repeat a text is deferred to a later batch. This matters for in-batch-negative losses,
    where a duplicate would be both a positive and a "negative".

    Args:
        data: the training rows.
        batch_size: rows per batch per process.
        seed: shuffling seed.
        no_duplicates: keep texts unique within each batch.
        num_replicas: number of processes sharing the data.
        rank: this process's index.
    """

    def __init__(
        self,
        data: TrainingData,
        batch_size: int,
        seed: int = 0,
        no_duplicates: bool = False,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        check_positive_int(batch_size, "batch_size")
        check_positive_int(num_replicas, "num_replicas")
        check_int(
            rank, "rank", minimum=0, maximum=num_replicas - 1, what=f"there are {num_replicas} processes"
        )
        if len(data) < batch_size * num_replicas:
            raise InvalidInputError(
                f"the training data has {len(data)} rows, fewer than one batch for every process "
                f"(batch_size {batch_size} x {num_replicas} processes)"
            )
        self.data = data
        self.batch_size = batch_size
        self.seed = int(seed)
        self.no_duplicates = no_duplicates
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self.position = 0  # batches of the current epoch already handed out to this process
        self._cache: tuple[int, list[list[int]]] | None = None

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This process's batches of one epoch (row indices)."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.data)).tolist()
        batches = self._dedup_batches(order) if self.no_duplicates else self._plain_batches(order)
        usable = len(batches) - len(batches) % self.num_replicas
        mine = batches[self.rank : usable : self.num_replicas]
        if not mine:
            raise InvalidInputError(
                f"epoch {epoch} has no full batch for every process: {len(batches)} batches of "
                f"{self.batch_size} distinct-text rows for {self.num_replicas} processes; lower batch_size"
            )
        self._cache = (epoch, mine)
        return mine

    def _plain_batches(self, order: list[int]) -> list[list[int]]:
        size = self.batch_size
        return [order[i : i + size] for i in range(0, len(order) - size + 1, size)]

    def _dedup_batches(self, order: list[int]) -> list[list[int]]:
        # Greedy: fill each batch from the deferred rows first, then from the shuffled order; a row sharing
        # a text with the batch is deferred. The deferred list stays short unless texts repeat a lot.
        batches: list[list[int]] = []
        deferred: list[int] = []
        pos = 0
        while True:
            batch: list[int] = []
            seen: set[str] = set()
            still_deferred: list[int] = []
            candidates = iter(deferred)
            while len(batch) < self.batch_size:
                row = next(candidates, None)
                if row is None:
                    if pos == len(order):
                        break
                    row, pos = order[pos], pos + 1
                texts = self.data.row_texts(row)
                if seen.isdisjoint(texts):
                    batch.append(row)
                    seen.update(texts)
                else:
                    still_deferred.append(row)
            still_deferred.extend(candidates)  # deferred rows not reached this time keep their order
            deferred = still_deferred
            if len(batch) < self.batch_size:
                return batches  # the rest cannot fill a batch of distinct texts
            batches.append(batch)

    def __iter__(self) -> Iterator[list[int]]:
        return _resume_epochs(self, self.epoch_batches)

    def batches_per_epoch(self) -> int:
        """Batches this process gets in the first epoch (later epochs differ by a few at most)."""
        return len(self.epoch_batches(0))

    def state_dict(self) -> dict:
        """The position to resume from: epoch and batches already taken in it, plus the settings."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "no_duplicates": self.no_duplicates,
            "num_replicas": self.num_replicas,
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Continue from a saved position (the settings must match, or the batches would differ)."""
        if state.get("num_replicas", self.num_replicas) != self.num_replicas:
            raise InvalidInputError(
                f"cannot resume: the checkpoint was made with {state['num_replicas']} process(es), now "
                f"{self.num_replicas}; resume with the same number of processes"
            )
        for key in ("seed", "batch_size", "no_duplicates"):
            if key in state and state[key] != getattr(self, key):
                raise InvalidInputError(
                    f"cannot resume: the checkpoint was made with {key}={state[key]!r}, "
                    f"now {getattr(self, key)!r}"
                )
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])


class TaskMixer:
    """Endless, seeded stream of ``(task, batch)`` over several tasks' :class:`BatchStream`, resumable.

    Every batch comes from one task. Each epoch holds every batch of every task's epoch once, the tasks in
    a seeded random order (seeded by ``(seed, epoch)``), so each task is sampled in proportion to its number
    of batches (sentence-transformers' proportional multi-dataset sampler). With one task it yields that
    task's batches in their own order.

    Args:
        streams: one batch stream per task (task 0 first).
        seed: seed of the task order.
    """

    def __init__(self, streams: Sequence[BatchStream], seed: int = 0) -> None:
        if not streams:
            raise InvalidInputError("TaskMixer needs at least one task")
        self.streams = list(streams)
        self.seed = int(seed)
        self.epoch = 0
        self.position = 0  # batches of the current epoch already handed out
        self._cache: tuple[int, list[int]] | None = None

    def epoch_tasks(self, epoch: int) -> list[int]:
        """The task of each batch of one epoch, in order."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        tasks = [t for t, stream in enumerate(self.streams) for _ in stream.epoch_batches(epoch)]
        if len(self.streams) > 1:
            order = np.random.default_rng([self.seed, epoch, len(self.streams)]).permutation(len(tasks))
            tasks = [tasks[i] for i in order]
        self._cache = (epoch, tasks)
        return tasks

    def __iter__(self) -> Iterator[tuple[int, list[int]]]:
        # Each task's stream is at the same epoch as the mixer: an epoch takes exactly its batches.
        iterators = [iter(stream) for stream in self.streams]
        for task in _resume_epochs(self, self.epoch_tasks):
            yield task, next(iterators[task])

    def batches_per_epoch(self) -> int:
        """Batches of every task in the first epoch."""
        return len(self.epoch_tasks(0))

    def state_dict(self) -> dict:
        """The position to resume from: the mixer's and every task stream's."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "streams": [stream.state_dict() for stream in self.streams],
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Continue from a saved position (same tasks and settings, or the batches would differ)."""
        streams = state.get("streams", [])
        if len(streams) != len(self.streams):
            raise InvalidInputError(
                f"cannot resume: the checkpoint was made with {len(streams)} training task(s), now "
                f"{len(self.streams)}; resume with the same extra_tasks"
            )
        if state.get("seed", self.seed) != self.seed:
            raise InvalidInputError(
                f"cannot resume: the checkpoint was made with seed={state['seed']!r}, now {self.seed!r}"
            )
        for stream, saved in zip(self.streams, streams):
            stream.load_state_dict(saved)
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
