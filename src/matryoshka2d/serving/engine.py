"""Dynamic batching for the embeddings server: a bounded queue, worker threads and token-budget batches.

Requests are tokenised when they arrive (:meth:`BatchingEngine.prepare`, any thread) and queued as rows
(one row per text). A worker thread takes up to ``sort_window`` rows first-in first-out, sorts them by
length and cuts them into batches whose padded size (rows x padded width) stays within the budget; the
batches go to a shared list that every worker runs from, so several workers share one window's batches
(and a window of few rows is cut into one batch per worker, so that a lone request is not run by one
worker while the others wait).
Requests asking for different layer counts share batches: in ``"shared"`` mode one forward pass runs to
the deepest layer count of the batch and every shallower exit is pooled from that same pass (the
backend's ``forward(features, layers=[...])`` primitive); in ``"grouped"`` mode a batch is split by layer
count and each group runs only its own layers. ``benchmarks/bench_server.py`` measures both.

The queue is bounded in texts: :meth:`BatchingEngine.submit` raises :class:`QueueFullError` at once
instead of letting memory grow, and a cancelled job (its client went away) leaves the queue at once; rows
already in a running forward pass finish and are dropped. :meth:`BatchingEngine.stop` finishes every
queued job before the workers exit (graceful shutdown).

The backend is anything with the engine-core interface of :class:`~matryoshka2d.model.EmbeddingModel`:
``num_layers``, ``dim``, ``hidden_size``, ``max_seq_length``, ``tokenizer``, ``tokenizer_input(texts)``,
``tokenize(texts, padding=False)``, ``pad(encoded, rows)`` and ``forward(features, layers)`` returning
``{k: pooled (batch, hidden_size)}`` as torch tensors or numpy arrays; optionally ``pad_multiple`` and
``pad(encoded, rows, multiple=)``: batch widths are then rounded up to a multiple of it (8 for torch
bfloat16 on a CPU: fewer shapes for oneDNN to build kernels for).
"""

from __future__ import annotations

import collections
import concurrent.futures
import copy
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from matryoshka2d.encoder import padded_width, prompt_option
from matryoshka2d.errors import InvalidInputError, Matryoshka2dError
from matryoshka2d.truncation import truncate_dims
from matryoshka2d.validation import check_positive_int

log = logging.getLogger("matryoshka2d.serving")

BATCH_MODES = ("shared", "grouped")


class QueueFullError(Matryoshka2dError):
    """The engine's queue holds as many texts as it may: the request is refused (HTTP 429)."""


class EngineStoppedError(Matryoshka2dError):
    """The engine is shutting down and takes no new work (HTTP 503)."""


class InputTooLongError(InvalidInputError):
    """A text is longer than ``max_seq_length`` tokens and truncation was switched off (HTTP 400)."""

    def __init__(self, message: str, index: int) -> None:
        super().__init__(message)
        self.index = index


@dataclass
class Prepared:
    """Tokenised texts, ready to queue: ``encoded`` holds unpadded id lists, ``lengths`` their sizes."""

    encoded: dict[str, list[list[int]]]
    lengths: list[int]

    @property
    def num_tokens(self) -> int:
        return int(sum(self.lengths))


@dataclass(eq=False)
class Job:
    """One request in the engine: its rows, the cell it asked for and the future that receives the result.

    ``future.result()`` is a float32 array ``(n, dim)``, L2-normalised, in input order.
    """

    prepared: Prepared
    layers: int
    dim: int
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    next_row: int = 0  # rows before this one have been taken by a worker
    done_rows: int = 0
    cancelled: bool = False  # its client went away or one of its batches failed: its other rows are dropped
    pooled: np.ndarray | None = None

    @property
    def size(self) -> int:
        return len(self.prepared.lengths)


@dataclass
class BatchStats:
    """What one forward pass did, for metrics: rows, padded tokens, layers run and seconds."""

    rows: int
    padded_tokens: int
    layers: tuple[int, ...]
    seconds: float


class BatchingEngine:
    """Batches embedding requests from many threads into few forward passes.

    Args:
        model: the backend (see the module docstring for the interface).
        max_batch_tokens: padded tokens (rows x padded width) per forward pass.
        max_batch_size: rows per forward pass at most.
        sort_window: rows a worker takes from the queue at once (per layer count in ``"grouped"`` mode),
            sorts by length and cuts into batches, so texts of similar length share a batch across
            requests. Larger windows pad less (STSB-like lengths, batches of 32: 81% of the padded tokens
            are real at 128 rows, 93% at 512, 98% sorting everything) but finish the window's requests
            together rather than one batch at a time.
        max_queue_texts: texts waiting in the queue at most; past it :meth:`submit` raises
            :class:`QueueFullError`. A request larger than this is still taken when the queue is empty.
        workers: worker threads, each running its own forward passes. On a CPU, give each worker
            ``cores // workers`` runtime threads (``torch.set_num_threads`` before :meth:`start`, ONNX
            Runtime's ``threads``): measured on 2 cores, 2 workers of 1 thread served 1.3x as many
            bfloat16 and int8 sentences as 1 worker of 2 threads (``m2d serve`` chooses so by default).
        mode: ``"grouped"`` (a pass per layer count; the default, measured faster on a mixed load) or
            ``"shared"`` (one pass to the deepest layer count of a batch).
        on_batch: called with :class:`BatchStats` after every forward pass (metrics).
        pad_multiple: batch widths are rounded up to a multiple of this (at most to ``max_seq_length``);
            default: the model's ``pad_multiple`` (8 for torch bfloat16 on a CPU with right padding, else
            1). Refused above 1 for a tokenizer that pads on the left (absolute positions would move).
    """

    def __init__(
        self,
        model,
        max_batch_tokens: int = 8192,
        max_batch_size: int = 32,
        sort_window: int = 512,
        max_queue_texts: int = 8192,
        workers: int = 1,
        mode: str = "grouped",
        on_batch: Callable[[BatchStats], None] | None = None,
        pad_multiple: int | None = None,
    ) -> None:
        if mode not in BATCH_MODES:
            raise InvalidInputError(f"mode must be one of {BATCH_MODES}, got {mode!r}")
        self.model = model
        self.max_batch_tokens = check_positive_int(max_batch_tokens, "max_batch_tokens")
        if self.max_batch_tokens < model.max_seq_length:
            raise InvalidInputError(
                f"max_batch_tokens={max_batch_tokens} is below the model's max_seq_length "
                f"({model.max_seq_length}): one long text would not fit in a batch"
            )
        self.max_batch_size = check_positive_int(max_batch_size, "max_batch_size")
        self.sort_window = check_positive_int(sort_window, "sort_window")
        self.max_queue_texts = check_positive_int(max_queue_texts, "max_queue_texts")
        self.workers = check_positive_int(workers, "workers")
        self.mode = mode
        self.on_batch = on_batch
        if pad_multiple is None:  # a backend without the attribute pads to the longest row
            pad_multiple = getattr(model, "pad_multiple", 1)
        elif pad_multiple != 1 and getattr(getattr(model, "tokenizer", None), "padding_side", "") == "left":
            raise InvalidInputError(
                f"pad_multiple={pad_multiple}: the model's tokenizer pads on the left, where extra padding "
                "moves the texts' absolute positions and changes their embeddings; use 1"
            )
        self.pad_multiple = check_positive_int(pad_multiple, "pad_multiple")
        self._pending: collections.deque[Job] = collections.deque()
        self._ready: collections.deque[list[tuple[Job, int]]] = collections.deque()  # cut, not yet run
        self._queued_texts = 0  # rows of pending jobs not yet taken by a worker
        self._cond = threading.Condition()
        self._stopping = False
        self._threads: list[threading.Thread] = []
        self._length_tokenizer = None  # a private copy, for the truncate=False length check
        self._length_lock = threading.Lock()

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> BatchingEngine:
        """Start the worker threads (idempotent)."""
        with self._cond:
            if self._threads:
                return self
            for i in range(self.workers):
                thread = threading.Thread(target=self._work, name=f"m2d-engine-{i}", daemon=True)
                thread.start()
                self._threads.append(thread)
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Take no new work, finish every queued job, then stop the workers.

        Args:
            timeout: seconds to wait for the workers (None: until they are done).
        """
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout)

    @property
    def queued_texts(self) -> int:
        """Texts waiting for a worker to take them (a take already cut into batches is not counted)."""
        return self._queued_texts

    @property
    def queued_requests(self) -> int:
        """Requests with texts waiting for a worker."""
        return len(self._pending)

    def has_room(self, texts: int) -> bool:
        """Whether ``texts`` more texts would fit in the queue now (a cheap check before tokenising)."""
        return self._queued_texts == 0 or self._queued_texts + texts <= self.max_queue_texts

    # ------------------------------------------------------------------ requests
    def prepare(self, texts: Sequence[str], truncate: bool = True, prompt: str | None = None) -> Prepared:
        """Tokenise ``texts`` (thread-safe) to at most ``max_seq_length`` tokens each, ``prompt`` (the
        model's ``resolve_prompt`` result; None: its default prompt) prepended.

        Raises:
            InputTooLongError: with ``truncate=False``, for the first text longer than ``max_seq_length``.
        """
        # no prompt argument when none is asked for: backends of the engine interface may take none
        encoded = self.model.tokenize(list(texts), padding=False, **prompt_option(prompt))
        encoded = {key: list(value) for key, value in encoded.items()}
        lengths = [len(ids) for ids in encoded["input_ids"]]
        if not truncate:
            limit = self.model.max_seq_length
            for i, n in enumerate(lengths):
                if n >= limit and (full := self._full_length(texts[i], prompt)) > limit:
                    raise InputTooLongError(
                        f"input[{i}] has {full} tokens, more than the model's "
                        f"max_seq_length of {limit}; shorten it or send truncate=true",
                        i,
                    )
        return Prepared(encoded, lengths)

    def _full_length(self, text: str, prompt: str | None = None) -> int:
        """Token count of ``text`` (its prompt and special tokens included) without truncation."""
        with self._length_lock:
            if self._length_tokenizer is None:
                self._length_tokenizer = copy.deepcopy(self.model.tokenizer)
            (text,) = self.model.tokenizer_input([text], **prompt_option(prompt))  # what tokenize() tokenises
            ids = self._length_tokenizer(text, truncation=False, verbose=False)["input_ids"]
        return len(ids)

    def submit(self, prepared: Prepared, layers: int, dim: int) -> Job:
        """Queue tokenised texts for the cell (``layers``, ``dim``); the job's future receives the result.

        ``layers`` and ``dim`` must already be valid for the model (the server checks them).

        Raises:
            QueueFullError: the queue has no room for these texts.
            EngineStoppedError: the engine is shutting down.
        """
        job = Job(prepared, layers, dim)
        if job.size == 0:
            raise InvalidInputError("nothing to encode: no texts")
        with self._cond:
            if self._stopping:
                raise EngineStoppedError("the server is shutting down")
            if not self.has_room(job.size):
                raise QueueFullError(
                    f"the queue is full ({self._queued_texts} texts waiting, at most "
                    f"{self.max_queue_texts}): retry later"
                )
            self._pending.append(job)
            self._queued_texts += job.size
            self._cond.notify()
        return job

    def cancel(self, job: Job) -> None:
        """Drop a job (its client went away): its queued rows leave the queue and its result is dropped."""
        with self._cond:
            if job.cancelled or job.future.done():
                return
            job.cancelled = True
            if job in self._pending:
                self._pending.remove(job)
                self._queued_texts -= job.size - job.next_row
        job.future.cancel()

    def encode(self, texts: Sequence[str], layers: int, dim: int, truncate: bool = True) -> np.ndarray:
        """Blocking helper: prepare, submit and wait (the engine must be started)."""
        return self.submit(self.prepare(texts, truncate), layers, dim).future.result()

    # ------------------------------------------------------------------ workers
    def _take(self) -> list[tuple[Job, int]] | None:
        """Rows for the next few forward passes, first-in first-out; None when stopping and drained.

        The budget (``sort_window`` rows, and as many batches' worth of tokens) is per batch group: in
        ``"grouped"`` mode each layer count gets its own, so that every group has as many rows to sort by
        length as a single-layer load (with one shared budget, a mix of three layer counts left ~a third of
        the rows per group: measured 1.45x the padding and ~1.7x the time per row).
        """
        with self._cond:
            while not self._pending and not self._stopping:
                self._cond.wait()
            if not self._pending:
                return None
            rows: list[tuple[Job, int]] = []
            used: dict[int, list[int]] = {}  # batch group -> [rows, tokens] taken
            max_rows = self.sort_window
            max_tokens = -(-self.sort_window // self.max_batch_size) * self.max_batch_tokens
            while self._pending:
                job = self._pending[0]
                budget = used.setdefault(job.layers if self.mode == "grouped" else 0, [0, 0])
                while job.next_row < job.size and budget[0] < max_rows:
                    n = job.prepared.lengths[job.next_row]
                    if budget[0] and budget[1] + n > max_tokens:
                        break
                    rows.append((job, job.next_row))
                    job.next_row += 1
                    budget[0] += 1
                    budget[1] += n
                if job.next_row < job.size:
                    break  # its group's budget is spent in the middle of this job; it stays at the head
                self._pending.popleft()
            self._queued_texts -= len(rows)
            return rows

    def _batches(self, rows: list[tuple[Job, int]]) -> list[list[tuple[Job, int]]]:
        """Rows sorted longest first, cut so that rows x padded width <= max_batch_tokens.

        With several workers, a take that gives fewer batches than workers has its largest batches halved
        until there is one per worker (or every batch is one row), so that every worker has a share of a
        lone request.
        """
        groups = [rows]
        if self.mode == "grouped":
            by_layers: dict[int, list[tuple[Job, int]]] = collections.defaultdict(list)
            for row in rows:
                by_layers[row[0].layers].append(row)
            groups = list(by_layers.values())
        batches = []
        for group in groups:
            group = sorted(group, key=lambda row: -row[0].prepared.lengths[row[1]])
            batch: list[tuple[Job, int]] = []
            width = 0  # the padded width of the batch: its first (longest) row's, rounded up
            for row in group:
                if batch and (
                    (len(batch) + 1) * width > self.max_batch_tokens or len(batch) >= self.max_batch_size
                ):
                    batches.append(batch)
                    batch = []
                if not batch:
                    width = self._padded_width(row[0].prepared.lengths[row[1]])
                batch.append(row)
            if batch:
                batches.append(batch)
        while len(batches) < self.workers:  # halves of a sorted batch stay sorted and within the budget
            largest = max(range(len(batches)), key=lambda i: len(batches[i]))
            batch = batches[largest]
            if len(batch) < 2:
                break
            half = (len(batch) + 1) // 2
            batches[largest : largest + 1] = [batch[:half], batch[half:]]
        return batches

    def _padded_width(self, longest: int) -> int:
        """The padded width of a batch whose longest row has ``longest`` tokens (as the model pads it)."""
        return padded_width(longest, self.pad_multiple, self.model.max_seq_length)

    def _next_batch(self) -> list[tuple[Job, int]] | None:
        """The next batch to run: one already cut, else one of a new take (its other batches are left for
        any worker); None when stopping and everything queued has been run."""
        while True:
            with self._cond:
                if self._ready:
                    batch = self._ready.popleft()
                elif self._pending or self._stopping:
                    rows = self._take()
                    if rows is None:
                        return None
                    if not rows:
                        continue
                    batch, *rest = self._batches(rows)
                    self._ready.extend(rest)
                    self._cond.notify(len(rest))  # idle workers: there is work ready
                else:
                    self._cond.wait()
                    continue
            batch = [row for row in batch if not row[0].cancelled]
            if batch:
                return batch

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            try:
                self._run_batch(batch)
            except Exception as e:  # fail these jobs, keep serving: later requests would hang otherwise
                log.exception("batch failed")
                self._fail({job for job, _ in batch}, e)

    def _fail(self, jobs: set[Job], error: BaseException) -> None:
        """Answer ``jobs`` with ``error`` and drop their rows still queued (none of them is computed)."""
        with self._cond:
            for job in jobs:
                if job.cancelled:
                    continue
                job.cancelled = True  # rows already taken by a worker are skipped or dropped too
                if job in self._pending:
                    self._pending.remove(job)
                    self._queued_texts -= job.size - job.next_row
        for job in jobs:
            try:
                job.future.set_exception(error)
            except concurrent.futures.InvalidStateError:  # answered or cancelled meanwhile
                pass

    def _run_batch(self, batch: list[tuple[Job, int]]) -> None:
        """One forward pass for ``batch``; an error (a bug, an out-of-memory) is :meth:`_work`'s to handle."""
        keys = batch[0][0].prepared.encoded.keys()
        encoded = {key: [job.prepared.encoded[key][i] for job, i in batch] for key in keys}
        layers = sorted({job.layers for job, _ in batch})
        start = time.perf_counter()
        with torch.inference_mode():  # padded inside it too, as encode does: compiled graphs match
            rows = range(len(batch))
            if self.pad_multiple == 1:  # the call of backends that take no multiple
                features = self.model.pad(encoded, rows)
            else:
                features = self.model.pad(encoded, rows, multiple=self.pad_multiple)
            width = int(features["input_ids"].shape[1])
            pooled = self.model.forward(features, layers)
            pooled = {k: _as_numpy(v) for k, v in pooled.items()}
        seconds = time.perf_counter() - start
        if self.on_batch is not None:
            self.on_batch(BatchStats(len(batch), width * len(batch), tuple(layers), seconds))
        finished = []
        with self._cond:  # rows of one job may be finished by several workers
            for r, (job, i) in enumerate(batch):
                if job.pooled is None:
                    job.pooled = np.empty((job.size, pooled[job.layers].shape[1]), dtype=np.float32)
                job.pooled[i] = pooled[job.layers][r]
                job.done_rows += 1
                if job.done_rows == job.size:
                    finished.append(job)
        for job in finished:
            if job.cancelled or job.future.done():
                continue
            result = np.ascontiguousarray(
                truncate_dims(job.pooled, job.dim, normalize=True), dtype=np.float32
            )
            job.pooled = None
            try:
                job.future.set_result(result)
            except concurrent.futures.InvalidStateError:  # cancelled meanwhile
                pass


def _as_numpy(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.float().cpu().numpy()
    return np.asarray(value, dtype=np.float32)
