"""The interface every inference backend implements: encode at any (layers, dims) cell.

A backend (the torch :class:`~matryoshka2d.model.EmbeddingModel`, the ONNX Runtime
:class:`~matryoshka2d.backends.onnx.OnnxEncoder`) only provides tokenising and ``forward``: full-size,
un-normalised, float32 pooled embeddings of one padded batch for several layer counts (or overrides
:meth:`Encoder._encode_batch`, which pads the rows of one batch and runs ``forward``); the chunk loop
(tokenise, sort by length, batch, workers) is shared.
Streaming (:meth:`Encoder.iter_encode`), :meth:`Encoder.encode`, :meth:`Encoder.encode_layers`, dim
truncation, normalisation and input checks are shared here, so grid evaluation, the search index and the
server accept every backend and treat them alike.
"""

from __future__ import annotations

import abc
import concurrent.futures
import contextlib
import copy
import itertools
import re
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence, Set
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from matryoshka2d.errors import InvalidDimError, InvalidInputError, InvalidLayersError, Matryoshka2dError
from matryoshka2d.truncation import check_dim, check_layers, truncate_dims
from matryoshka2d.validation import check_int, check_positive_int

# Texts tokenised and sorted by length together: enough to batch similar lengths, small enough for memory.
DEFAULT_CHUNK_SIZE = 8192
# Fewer texts than this per thread are tokenised in one call: starting threads would cost what they save.
MIN_TEXTS_PER_TOKENIZER_THREAD = 512


def check_texts_iterable(texts: object) -> None:
    """Refuse what cannot be encoded row by row in a defined order: a string, a non-iterable, a set or a dict.

    Output row i must belong to input item i; a set has no order and a dict would silently encode its keys.
    """
    if isinstance(texts, (bytes, bytearray, memoryview)):
        raise InvalidInputError(
            f"texts is {type(texts).__name__}: decode it to str first (e.g. data.decode('utf-8'))"
        )
    if isinstance(texts, str) or not isinstance(texts, Iterable):
        raise InvalidInputError(f"texts must be a list of strings, got {type(texts).__name__}")
    if isinstance(texts, (Set, Mapping)):
        raise InvalidInputError(
            f"texts is a {type(texts).__name__}, which has no row order (a dict would give its keys): "
            "pass a list of strings, e.g. sorted(texts) or list(mapping.values())"
        )


def check_text(text: object, i: int) -> str:
    """``text`` if it is a string, else an :class:`InvalidInputError` naming position ``i``."""
    if not isinstance(text, str):
        raise InvalidInputError(f"texts[{i}] is {type(text).__name__} ({text!r:.50}), expected str")
    problem = unicode_problem(text)
    if problem is not None:
        raise InvalidInputError(f"texts[{i}] {problem}")
    return text


def unicode_problem(text: str) -> str | None:
    """What makes ``text`` unusable by a tokenizer (``"is not valid Unicode: a lone surrogate ..."``), or
    None. A lone surrogate (``"\ud800"``) comes from JSON, which allows it, or a file read with
    ``errors="surrogateescape"``."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return (
            f"is not valid Unicode: a lone surrogate ({e.object[e.start : e.end]!a}) at character {e.start}"
        )
    return None


def _as_list(values: object, name: str, error: type[Matryoshka2dError]) -> object:
    """A set or a generator of layer counts / dims as a list; a mapping refused (its keys are not meant)."""
    if isinstance(values, Mapping):
        raise error(f"{name} is a {type(values).__name__}: pass a number or a list of numbers")
    if isinstance(values, Iterable) and not isinstance(values, (str, bytes, Sequence, np.ndarray)):
        return list(values)  # a set, a generator, a range's iterator
    return values


def check_texts(texts: object) -> list[str]:
    """Validate a list of texts: an ordered collection (not a set or dict), non-empty, every item a string."""
    check_texts_iterable(texts)
    texts = [check_text(text, i) for i, text in enumerate(texts)]  # type: ignore[union-attr]
    if not texts:
        raise InvalidInputError("texts is empty: nothing to encode")
    return texts


@dataclass(frozen=True)
class EmbeddingBatch:
    """Embeddings of consecutive input texts, for every requested (layers, dim) cell.

    Attributes:
        start: position of the first text of this batch in the input stream.
        size: number of texts in this batch.
        embeddings: ``{(layers, dim): float32 array of shape (size, dim)}``.
    """

    start: int
    size: int
    embeddings: dict[tuple[int, int], np.ndarray]

    def __getitem__(self, cell: tuple[int, int]) -> np.ndarray:
        return self.embeddings[cell]

    def __len__(self) -> int:
        return self.size


#: Prompt names every model has (empty where its folder does not define them), as in sentence-transformers 6.
IMPLICIT_PROMPTS = {"query": "", "document": ""}


def prompt_option(prompt: str | None) -> dict[str, str]:
    """``{"prompt": prompt}`` for an encoder call, or ``{}`` for None (the model's default prompt): so that
    a call asking for no prompt works with encoders (or engine backends) that take none."""
    return {"prompt": prompt} if prompt is not None else {}


class Encoder(abc.ABC):
    """Encoding at any (layers, dims) cell, shared by every backend.

    A subclass sets these attributes (plain attributes or properties):

    - ``num_layers`` (int): transformer layers of the loaded model; ``layers=k`` runs the first k only.
    - ``dim`` (int): output embedding size (prefixes ``1..dim`` are valid dims).
    - ``hidden_size`` (int): width of the pooled vectors :meth:`_encode_chunk` returns (>= ``dim``).
    - ``max_seq_length`` (int): longer inputs are truncated to this many tokens.
    - ``name_or_path`` (str): where the model came from.
    - ``backend`` (str): ``"torch"``, ``"onnx"`` or ``"onnx-int8"``.
    - ``precision`` (str): what the layers compute in: ``"float32"``, ``"bfloat16"``, ``"float16"`` or
      ``"int8"`` (pooling, dim truncation and normalisation are always float32).
    - ``prompts`` (dict) and ``default_prompt_name`` (str or None): the folder's prompts; the default one
      is prepended to every text before tokenising (:attr:`prompt`) unless a call names another
      (``prompt_name=``) or gives one (``prompt=``); ``include_prompt`` (bool): False if the pooling
      leaves the prompt's tokens out, which is supported only without a prompt.

    and implements :meth:`tokenize` and ``forward(features, layers)`` (or overrides
    :meth:`_encode_batch`). Every public method is safe to call from many threads at once if
    those are.
    """

    num_layers: int
    dim: int
    hidden_size: int
    name_or_path: str
    #: The longest ``max_seq_length`` the model's position embeddings allow (None: not known).
    max_positions: int | None = None
    prompts: dict[str, str] = {}
    default_prompt_name: str | None = None
    include_prompt: bool = True

    @property
    def max_seq_length(self) -> int:
        """Longer inputs are truncated to this many tokens; may be set, within ``1..max_positions``."""
        return self._max_seq_length

    @max_seq_length.setter
    def max_seq_length(self, value: int) -> None:
        limit = self.max_positions
        name = getattr(self, "name_or_path", "the model")
        self._max_seq_length = check_int(
            value,
            "max_seq_length",
            minimum=1,
            maximum=limit,
            what=f"{name} has {limit} position embeddings, so 1..{limit}" if limit else "",
        )

    @property
    def prompt(self) -> str:
        """The text prepended to every input before tokenising: the folder's default prompt, or ``""``."""
        return self.prompts[self.default_prompt_name] if self.default_prompt_name else ""

    def resolve_prompt(self, prompt_name: str | None = None, prompt: str | None = None) -> str:
        """The text a call prepends: ``prompt`` if given (``""``: none), else the prompt named
        ``prompt_name``, else the model's default prompt (:attr:`prompt`).

        As in sentence-transformers 6, ``"query"`` and ``"document"`` are names of every model: ``""``
        (no prompt) where the folder does not define them, so the same call serves symmetric models
        (all-MiniLM-L6-v2) and retrieval models with prompts. Unlike it, giving both is an error (it
        warns and uses ``prompt``).

        Raises:
            InvalidInputError: both given, an unknown name (the message lists the model's prompts), a
                non-string, or a prompt for a model whose pooling leaves prompt tokens out
                (``include_prompt: false``, which sentence-transformers pools differently).
        """
        if prompt_name is not None and prompt is not None:
            raise InvalidInputError("give prompt_name or prompt, not both")
        if prompt is not None:
            if not isinstance(prompt, str):
                raise InvalidInputError(f"prompt must be a string, got {type(prompt).__name__}")
            text = prompt
        elif prompt_name is not None:
            prompts = {**IMPLICIT_PROMPTS, **self.prompts}
            if not isinstance(prompt_name, str) or prompt_name not in prompts:
                known = ", ".join(repr(name) for name in sorted(prompts))
                raise InvalidInputError(
                    f"prompt_name {prompt_name!r:.60} is not one of the model's prompts ({known})"
                )
            text = prompts[prompt_name]
        else:
            return self.prompt  # checked when the model was loaded
        if text and not self.include_prompt:
            raise InvalidInputError(
                "the model's pooling leaves the prompt's tokens out (include_prompt: false), which "
                "matryoshka2d does not reproduce: encode without a prompt"
            )
        return text

    @property
    def backend(self) -> str:
        """The runtime: ``"torch"``, ``"onnx"`` or ``"onnx-int8"``."""
        return "torch"

    @property
    def precision(self) -> str:
        """What the layers compute in: ``"float32"``, ``"bfloat16"``, ``"float16"`` or ``"int8"``."""
        return "float32"

    @property
    def pad_multiple(self) -> int:
        """The width multiple for batches of unforeseen shapes (a server's), for :meth:`pad`'s ``multiple``.

        1 here; the torch model asks for 8 where its runtime builds kernels per input shape (see there).
        ``encode`` pads to the longest row only: it sorts by length, so its batches repeat few shapes."""
        return 1

    def describe(self) -> str:
        """One line for logs and CLI output, e.g. ``"minilm (6 layers, 384 dims; torch bfloat16)"``."""
        sizes = f"{self.num_layers} layers, {self.dim} dims"
        return f"{self.name_or_path} ({sizes}; {self.backend} {self.precision})"

    @abc.abstractmethod
    def tokenize(self, texts: Sequence[str], padding: bool = True, prompt: str | None = None) -> dict:
        """Tokenise a batch, truncated to ``max_seq_length``, with ``prompt`` prepended (default: the
        model's default prompt; see :meth:`resolve_prompt`). See the backend for the returned types."""

    def tokenizer_input(self, texts: Sequence[str], prompt: str | None = None) -> list[str]:
        """The strings the tokenizer is given for ``texts``: ``prompt`` (default: the model's default
        prompt) prepended, then lower-cased if the model asks (special tokens kept), as
        sentence-transformers does. Reads nothing it changes: safe from any number of threads."""
        prompt = self.prompt if prompt is None else prompt
        if prompt:
            texts = [prompt + text for text in texts]
        return lower_case(texts, self.tokenizer) if self.do_lower_case else list(texts)

    def _run_tokenizer(
        self, texts: Sequence[str], padding: bool, tensor_type: str, prompt: str | None = None
    ) -> dict:
        """The shared body of every backend's :meth:`tokenize`: lower-case if asked, truncate, tokenise.

        ``padding=True`` gives ``tensor_type`` arrays ("pt", "np") padded to the longest text; a fast
        tokenizer switches its own truncation/padding state per call, so those calls are serialised with
        the backend's ``_tokenizer_lock``. ``padding=False`` gives plain id lists (to sort by length and pad
        per batch), the same as the tokenizer's own call, from a private copy of a fast tokenizer's backend
        set up once (:meth:`_unpadded_backend`): no lock, so many threads tokenise at once, and a long list
        is cut into parts tokenised on :meth:`_tokenizer_threads` threads (the tokenizers library releases
        the GIL).
        """
        texts = self.tokenizer_input(texts, prompt)
        backend = None if padding else self._unpadded_backend()
        if backend is not None:
            return self._tokenize_unpadded(backend, texts)
        with self._tokenizer_lock:
            encoded = self.tokenizer(
                texts,
                padding=padding,
                truncation=True,
                max_length=self.max_seq_length,
                return_tensors=tensor_type if padding else None,
            )
        return dict(encoded)

    def _tokenizer_threads(self) -> int:
        """Threads a long list of texts is tokenised on: the backend's own thread count (1 here)."""
        return 1

    def _unpadded_backend(self):
        """A private copy of the fast tokenizer's backend (a ``tokenizers.Tokenizer``) set to what
        ``tokenizer(texts, truncation=True, max_length=max_seq_length)`` sets: truncation at
        ``max_seq_length`` on the tokenizer's truncation side, no padding, its ``split_special_tokens``.
        Never changed after, so any number of threads encode with it at once.

        Rebuilt when the tokenizer object, those settings, its vocabulary size (added tokens) or its
        normaliser, pre-tokeniser or post-processor change (e.g. ``model.max_seq_length = 128``,
        ``tokenizer.add_tokens``). None (the tokenizer's own call, under the lock) for a slow tokenizer
        and for one with a custom Python component, which cannot be copied.
        """
        tokenizer = self.tokenizer
        shared = (
            getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
        )
        if shared is None:
            return None
        try:
            state = (
                self.max_seq_length,
                getattr(tokenizer, "truncation_side", "right"),
                bool(getattr(tokenizer, "split_special_tokens", False)),
                shared.get_vocab_size(),
                *(None if part is None else part.__getstate__() for part in _pipeline(shared)),
            )
        except Exception:  # a custom component (e.g. a Python pre-tokeniser) has no state to compare
            return None
        cached = getattr(self, "_unpadded_cache", None)  # (tokenizer, state, backend copy or None)
        if cached is not None and cached[0] is tokenizer and cached[1] == state:
            return cached[2]
        try:
            with self._tokenizer_lock:  # another thread's padded call may be switching its state
                private = copy.deepcopy(shared)
        except Exception:  # cannot be pickled: keep using the tokenizer's own call
            private = None
        if private is not None:
            max_length, side, split = state[:3]
            private.enable_truncation(max_length, stride=0, strategy="longest_first", direction=side)
            private.no_padding()
            private.encode_special_tokens = split
        self._unpadded_cache = (tokenizer, state, private)
        return private

    def _tokenize_unpadded(self, backend, texts: list[str]) -> dict[str, list[list[int]]]:
        """``texts`` encoded by :meth:`_unpadded_backend` ``backend`` into the lists the tokenizer's own
        call returns (the keys of its ``model_input_names``), in parts on several threads if long."""
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)  # no character offsets
        parts = max(1, min(self._tokenizer_threads(), len(texts) // MIN_TEXTS_PER_TOKENIZER_THREAD))
        encodings = [e for part in _in_parts(encode, texts, parts) for e in part]
        names = self.tokenizer.model_input_names
        out = {"input_ids": [e.ids for e in encodings]}
        if "token_type_ids" in names:
            out["token_type_ids"] = [e.type_ids for e in encodings]
        if "attention_mask" in names:
            out["attention_mask"] = [e.attention_mask for e in encodings]
        return out

    def pad(
        self, encoded: Mapping[str, Sequence[Sequence[int]]], rows: Sequence[int], multiple: int = 1
    ) -> dict:
        """int64 arrays for ``rows`` of :meth:`tokenize` output (``padding=False``), padded to their longest
        (rounded up to a multiple of ``multiple``, though not past ``max_seq_length``).

        Pads like the tokenizer (``pad_token_id``, attention mask 0, token type 0, on its padding side)
        without touching the shared tokenizer, so it is safe from any number of threads. A backend may
        return its own array type (the torch model returns tensors).
        """
        left = getattr(self.tokenizer, "padding_side", "right") == "left"
        return pad_rows(encoded, rows, self.tokenizer.pad_token_id, left, multiple, self.max_seq_length)

    def _encode_chunk(
        self,
        texts: list[str],
        layers: list[int],
        batch_size: int,
        prompt: str | None = None,
        pool: concurrent.futures.ThreadPoolExecutor | None = None,
        workers: int = 1,
    ) -> dict[int, np.ndarray]:
        """Full-size, un-normalised pooled embeddings of ``texts`` for every layer count, in input order:
        tokenised, sorted by length and run ``batch_size`` at a time through :meth:`_encode_batch`.

        With ``workers`` threads of ``pool``, the texts are tokenised in that many parts at once, then
        each worker takes the next batch of the one sorted list until none is left: the batches are the
        same as with one worker (so are the embeddings, up to the runtime's thread count), and a worker
        that drew long batches takes fewer. An error in one worker, or Ctrl-C, stops the others after
        their current batch.

        Args:
            texts: checked strings (at most ``chunk_size`` of :meth:`iter_encode`).
            layers: checked, sorted, distinct layer counts in ``1..num_layers``.
            batch_size: texts per forward pass.
            prompt: prepended to every text (:meth:`resolve_prompt`'s result; None: the default prompt).
            pool: threads for ``workers`` > 1 (None: the calling thread does everything).
            workers: batches run at once.

        Returns:
            ``{k: float32 array of shape (len(texts), hidden_size)}`` for every ``k`` in ``layers``.
        """
        encoded = self._tokenize_in_parts(texts, prompt, pool, workers)
        order = sort_longest_first(encoded["input_ids"])
        out = {k: np.empty((len(texts), self.hidden_size), dtype=np.float32) for k in layers}
        starts = iter(range(0, len(texts), batch_size))
        take, stop = threading.Lock(), threading.Event()

        def run() -> None:
            try:
                while not stop.is_set():
                    with take:
                        start = next(starts, None)
                    if start is None:
                        return
                    idx = order[start : start + batch_size]
                    for k, pooled in self._encode_batch(encoded, idx, layers).items():
                        out[k][idx] = pooled  # rows of no other batch: no lock needed
            except BaseException:
                stop.set()  # the others stop after their current batch
                raise

        runners = 1 if pool is None else min(workers, -(-len(texts) // batch_size))
        if runners == 1:
            run()
            return out
        futures = [pool.submit(run) for _ in range(runners)]
        try:
            for future in futures:
                future.result()  # a worker's error (it has stopped the others), if any
        except BaseException:  # that error, or Ctrl-C here
            stop.set()
            concurrent.futures.wait(futures)
            raise
        return out

    def _tokenize_in_parts(
        self,
        texts: list[str],
        prompt: str | None,
        pool: concurrent.futures.ThreadPoolExecutor | None,
        workers: int,
    ) -> dict[str, list[list[int]]]:
        """:meth:`tokenize` (``padding=False``) of ``texts``, cut into ``workers`` parts tokenised at once
        on ``pool`` (each worker's runtime may have a single thread) and joined in input order."""
        if pool is None or workers == 1 or len(texts) < 2 * workers:
            return self.tokenize(texts, padding=False, prompt=prompt)
        parts = _in_parts(
            lambda part: self.tokenize(part, padding=False, prompt=prompt), texts, workers, pool
        )
        return {key: [row for part in parts for row in part[key]] for key in parts[0]}

    def _encode_batch(
        self, encoded: Mapping[str, Sequence[Sequence[int]]], rows: Sequence[int], layers: list[int]
    ) -> dict[int, np.ndarray]:
        """Pooled float32 embeddings (numpy) of ``rows`` of :meth:`tokenize` output (``padding=False``) for
        every layer count: :meth:`pad`, then the backend's ``forward`` (which a backend then provides, as
        the server's engine calls it too), unless the backend overrides this."""
        return self.forward(self.pad(encoded, rows), layers)  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ shared inference
    def iter_encode(
        self,
        texts: Iterable[str],
        layers: int | Sequence[int] | None = None,
        dims: int | Sequence[int] | None = None,
        batch_size: int = 32,
        normalize: bool = True,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        show_progress: bool | None = None,
        prompt_name: str | None = None,
        prompt: str | None = None,
        workers: int = 1,
    ) -> Iterator[EmbeddingBatch]:
        """Stream embeddings of any number of texts at several (layers, dim) cells from one forward pass.

        Texts are read ``chunk_size`` at a time from ``texts`` (any iterable, e.g. a generator over a
        file), tokenised, sorted by token count (less padding) and run in batches of ``batch_size``
        through the layers up to the deepest requested one; every requested layer count is pooled from
        that one pass and every dim is a prefix of it. Each chunk is yielded in input order, so memory
        stays bounded by ``chunk_size`` whatever the size of the input.

        Args:
            texts: an ordered iterable of strings (a list, a generator; not a set or a dict).
            layers: a layer count or a list of them (default: all layers).
            dims: an embedding size or a list of them (default: ``model.dim``).
            batch_size: texts per forward pass.
            normalize: L2-normalise each dim prefix (dot product = cosine similarity).
            chunk_size: texts tokenised and held at once.
            show_progress: a tqdm bar counting texts (default: when there are more than 20 batches, or
                always if the input length is unknown).
            prompt_name: the name of one of the model's ``prompts`` to prepend to every text (e.g.
                ``"query"`` for a retrieval model), as sentence-transformers' ``encode(prompt_name=)``.
            prompt: a prompt string to prepend instead (``""``: none, even if the model has a default
                prompt). Default (neither): the model's default prompt, if it has one.
            workers: forward passes run at once, each on its own thread (default 1): each chunk is
                tokenised in that many parts at once, then every worker takes the next batch of the one
                list sorted by length, so the batches (and the embeddings, up to the runtime's thread
                count) are those of one worker and a worker drawing long batches takes fewer. Each
                worker runs torch with the calling thread's torch threads divided among them (set in
                the worker threads; the caller's own count is unchanged). For ONNX Runtime, give the
                sessions their threads when loading: ``load_encoder(..., threads=1)`` on 2 cores (on
                more cores, a session's one pool is shared by the workers, each adding its calling
                thread: ``threads = workers x (t - 1) + 1`` for ``t`` threads a worker; ``m2d encode
                --workers`` does this); otherwise they compete for the cores. Small batches use many
                threads poorly: on 2 cores, 2 workers of 1 thread encoded 1.37x the sentences of 1
                worker of 2 threads in bfloat16 and 1.59x in ONNX int8
                (``benchmarks/bench_backends.py --workers``). An error in
                a worker, or Ctrl-C, stops the others after their current batch.

        Yields:
            :class:`EmbeddingBatch` per chunk: ``batch[(layers, dim)]`` is a float32 array
            ``(batch.size, dim)``; ``batch.start`` is the position of its first text.

        Raises:
            InvalidLayersError, InvalidDimError, InvalidInputError: for out-of-range or malformed input.
        """
        check_texts_iterable(texts)
        ks = self._layer_list(layers)
        ds = self._dim_list(dims)
        if not isinstance(normalize, (bool, np.bool_)):  # "no" or None would silently pick by truthiness
            raise InvalidInputError(f"normalize must be True or False, got {normalize!r:.50}")
        prompt = self.resolve_prompt(prompt_name, prompt)
        chunk_size = check_positive_int(chunk_size, "chunk_size")
        batch_size = check_positive_int(batch_size, "batch_size")
        workers = check_positive_int(workers, "workers")
        total = len(texts) if hasattr(texts, "__len__") else None  # type: ignore[arg-type]
        if show_progress is None:
            show_progress = total is None or total > 20 * batch_size
        iterator = iter(texts)
        start = 0
        with (
            tqdm(total=total, desc="Encoding", unit="text", disable=not show_progress) as bar,
            _worker_pool(workers) as pool,
        ):
            while chunk := [
                check_text(t, start + i) for i, t in enumerate(itertools.islice(iterator, chunk_size))
            ]:
                pooled = self._encode_chunk(chunk, ks, batch_size, prompt, pool, workers)
                cells = {(k, d): truncate_dims(pooled[k], d, normalize) for k in ks for d in ds}
                yield EmbeddingBatch(
                    start, len(chunk), {c: np.ascontiguousarray(e) for c, e in cells.items()}
                )
                start += len(chunk)
                bar.update(len(chunk))
        if start == 0:
            raise InvalidInputError("texts is empty: nothing to encode")

    def _layer_list(self, layers: int | Sequence[int] | None) -> list[int]:
        if layers is None:
            return [self.num_layers]
        if isinstance(layers, np.ndarray) and layers.ndim == 0:
            layers = layers.item()  # np.array(2): one layer count
        layers = _as_list(layers, "layers", InvalidLayersError)
        if not isinstance(layers, (Sequence, np.ndarray)) or isinstance(layers, str):
            return [check_layers(layers, self.num_layers)]  # type: ignore[arg-type]
        if len(layers) == 0:
            raise InvalidLayersError("layers is empty: request at least one layer count")
        return sorted({check_layers(k, self.num_layers) for k in layers})

    def _dim_list(self, dims: int | Sequence[int] | None) -> list[int]:
        if dims is None:
            return [self.dim]
        if isinstance(dims, np.ndarray) and dims.ndim == 0:
            dims = dims.item()
        dims = _as_list(dims, "dims", InvalidDimError)
        if not isinstance(dims, (Sequence, np.ndarray)) or isinstance(dims, str):
            return [check_dim(dims, self.dim)]  # type: ignore[arg-type]
        if len(dims) == 0:
            raise InvalidDimError("dims is empty: request at least one embedding size")
        return sorted({check_dim(d, self.dim) for d in dims}, reverse=True)

    def encode_layers(
        self,
        texts: Sequence[str],
        layers: Iterable[int] | None = None,
        batch_size: int = 32,
        show_progress: bool | None = None,
        prompt_name: str | None = None,
        prompt: str | None = None,
        workers: int = 1,
    ) -> dict[int, np.ndarray]:
        """Full-size, un-normalised embeddings of every requested layer count, from one pass over the data.

        Args:
            texts: a list of strings.
            layers: layer counts (default: all layers).
            batch_size: texts per forward pass.
            show_progress: show a tqdm bar (default: when there are more than 20 batches).
            prompt_name: the name of one of the model's ``prompts`` to prepend to every text (e.g.
                ``"query"`` for a retrieval model), as sentence-transformers' ``encode(prompt_name=)``.
            prompt: a prompt string to prepend instead (``""``: none, even if the model has a default
                prompt). Default (neither): the model's default prompt, if it has one.
            workers: forward passes run at once, each on its own thread (see :meth:`iter_encode`).

        Returns:
            ``{k: float32 array of shape (len(texts), hidden_size)}``.
        """
        texts = check_texts(texts)
        ks = self._layer_list(layers if layers is not None else range(1, self.num_layers + 1))
        batch_size = check_positive_int(batch_size, "batch_size")
        workers = check_positive_int(workers, "workers")
        prompt = self.resolve_prompt(prompt_name, prompt)
        parts: dict[int, list[np.ndarray]] = {k: [] for k in ks}
        show = len(texts) > 20 * batch_size if show_progress is None else show_progress
        with (
            tqdm(total=len(texts), desc="Encoding", unit="text", disable=not show) as bar,
            _worker_pool(workers) as pool,
        ):
            for start in range(0, len(texts), DEFAULT_CHUNK_SIZE):
                chunk = texts[start : start + DEFAULT_CHUNK_SIZE]
                for k, emb in self._encode_chunk(chunk, ks, batch_size, prompt, pool, workers).items():
                    parts[k].append(emb)
                bar.update(len(chunk))
        return {k: np.concatenate(v) for k, v in parts.items()}

    def encode(
        self,
        texts: str | Sequence[str],
        layers: int | None = None,
        dim: int | None = None,
        batch_size: int = 32,
        normalize: bool = True,
        show_progress: bool | None = None,
        prompt_name: str | None = None,
        prompt: str | None = None,
        workers: int = 1,
    ) -> np.ndarray:
        """Embed texts using the first ``layers`` transformer layers and the first ``dim`` dimensions.

        Safe to call from many threads at once with different ``layers`` and ``dim``: the loaded model is
        never changed.

        Args:
            texts: a list of strings (or one string, which gives a 1-D result).
            layers: run only the embeddings plus the first ``layers`` transformer layers (default: all).
                The dropped layers are not computed.
            dim: keep the first ``dim`` values of each embedding (default: ``model.dim``).
            batch_size: texts per forward pass (texts are sorted by length first).
            normalize: L2-normalise after truncation, so dot product = cosine similarity.
            show_progress: show a tqdm bar (default: when there are more than 20 batches).
            prompt_name: the name of one of the model's ``prompts`` to prepend to every text (e.g.
                ``"query"`` for a retrieval model), as sentence-transformers' ``encode(prompt_name=)``.
            prompt: a prompt string to prepend instead (``""``: none, even if the model has a default
                prompt). Default (neither): the model's default prompt, if it has one.
            workers: forward passes run at once, each on its own thread (see :meth:`iter_encode`).

        Returns:
            float32 array of shape ``(len(texts), dim)``.

        Raises:
            InvalidLayersError, InvalidDimError, InvalidInputError: for out-of-range or malformed input.
        """
        single = isinstance(texts, str)
        texts = check_texts([texts] if single else texts)
        k = check_layers(layers, self.num_layers) if layers is not None else self.num_layers
        d = check_dim(dim, self.dim) if dim is not None else self.dim
        batches = self.iter_encode(
            texts,
            k,
            d,
            batch_size=batch_size,
            normalize=normalize,
            show_progress=show_progress,
            prompt_name=prompt_name,
            prompt=prompt,
            workers=workers,
        )
        parts = [batch[(k, d)] for batch in batches]
        emb = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return emb[0] if single else emb


# Held from the start of a pool's first worker to the moment torch's default thread count is put back.
_POOL_START = threading.Lock()


@contextlib.contextmanager
def _worker_pool(workers: int) -> Iterator[concurrent.futures.ThreadPoolExecutor | None]:
    """Threads for ``workers`` batches at once (None for one: the calling thread runs them), each running
    torch with the calling thread's torch threads divided among them.

    ``torch.set_num_threads`` in a worker sets that thread's OpenMP team, and also torch's process-wide
    default, which every thread's first torch op copies. So every worker is started and set up at once,
    under a lock shared by all pools, and the default is put back before any of them runs a batch: the
    caller, other threads (and faiss, which shares torch's OpenMP) keep their thread counts.
    """
    if workers == 1:
        yield None
        return
    import torch

    with _POOL_START:
        caller = torch.get_num_threads()  # also this thread's own set-up, if it had none yet
        share = max(1, caller // workers)
        pool = concurrent.futures.ThreadPoolExecutor(
            workers, thread_name_prefix="m2d-encode", initializer=_use_torch_threads, initargs=(share,)
        )
        # A task per worker: each submit starts a thread, as the others wait in the barrier.
        ready = threading.Barrier(workers + 1, timeout=60)
        try:
            started = [pool.submit(ready.wait) for _ in range(workers)]
            ready.wait()  # every worker has set its count (and torch's default) to ``share``
            for future in started:
                future.result()
        except BaseException:  # a worker that could not start, or Ctrl-C: release the others
            ready.abort()
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        finally:
            torch.set_num_threads(caller)  # the default back (this thread's count is the same)
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _use_torch_threads(threads: int) -> None:
    """Pool initializer: this worker thread's torch (OpenMP) thread count."""
    import torch

    torch.set_num_threads(threads)  # this thread's count, and torch's default (the caller puts it back)
    torch.get_num_threads()  # torch's lazy per-thread set-up, now: later ops keep ``threads``


def lower_case(texts: Sequence[str], tokenizer) -> list[str]:
    """``texts`` lower-cased for a model with ``do_lower_case``, except the tokenizer's special tokens and
    the added tokens it does not normalise.

    As sentence-transformers 6 does it (the tokenizers library's ``Lowercase`` normaliser, which runs after
    those tokens are split off): a literal ``[SEP]`` or ``[MASK]`` in a text stays that token instead of
    becoming ``[sep]`` (unknown word pieces), and characters are lower-cased one by one (a final Greek
    sigma becomes σ, where Python's ``str.lower`` gives ς).
    """
    from tokenizers.normalizers import Lowercase

    lower = Lowercase().normalize_str
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    kept = {t.content for t in added.values() if not getattr(t, "normalized", True)}
    kept |= set(getattr(tokenizer, "all_special_tokens", ()))
    specials = sorted({t for t in kept if t and lower(t) != t}, key=len, reverse=True)
    if not specials:
        return [lower(t) for t in texts]
    pattern = re.compile("(" + "|".join(map(re.escape, specials)) + ")")
    return ["".join(p if i % 2 else lower(p) for i, p in enumerate(pattern.split(t))) for t in texts]


def sort_longest_first(input_ids: Sequence[Sequence[int]]) -> np.ndarray:
    """Row order by decreasing token count (stable), so each batch pads to similar lengths."""
    return np.argsort([-len(ids) for ids in input_ids], kind="stable")


def padded_width(longest: int, multiple: int = 1, max_width: int | None = None) -> int:
    """The width :func:`pad_rows` pads to: ``longest`` rounded up to a multiple of ``multiple``, though
    not past ``max_width`` unless ``longest`` already is."""
    multiple = check_positive_int(multiple, "multiple")
    rounded = -(-longest // multiple) * multiple
    return rounded if max_width is None else max(longest, min(rounded, max_width))


def _in_parts(fn, texts: list[str], parts: int, pool: concurrent.futures.Executor | None = None) -> list:
    """``fn`` of ``texts`` cut into ``parts`` contiguous parts, run at once, the results in input order: on
    ``pool`` if given, else the first part in this thread and the others on threads started for the call."""
    if parts == 1:
        return [fn(texts)]
    bounds = np.linspace(0, len(texts), parts + 1).astype(int)
    pieces = [texts[a:b] for a, b in itertools.pairwise(bounds)]
    if pool is not None:
        return list(pool.map(fn, pieces))
    with concurrent.futures.ThreadPoolExecutor(parts - 1) as own:
        rest = [own.submit(fn, piece) for piece in pieces[1:]]
        return [fn(pieces[0]), *(future.result() for future in rest)]


def _pipeline(backend) -> tuple:
    """The parts of a ``tokenizers.Tokenizer`` besides its vocabulary that decide the ids of a text."""
    return backend.normalizer, backend.pre_tokenizer, backend.post_processor


def pad_rows(
    encoded: Mapping[str, Sequence[Sequence[int]]],
    rows: Sequence[int],
    pad_token_id: int | None,
    left: bool = False,
    multiple: int = 1,
    max_width: int | None = None,
) -> dict[str, np.ndarray]:
    """int64 arrays for ``rows`` of un-padded tokenizer output, padded to the longest of those rows.

    Pads like a tokenizer (``input_ids`` with ``pad_token_id``, everything else, e.g. the attention mask
    and token types, with 0; on the left if ``left``) without touching the tokenizer, so any number of
    threads may pad at once. ``multiple`` rounds the width up to a multiple of it (padding masked out like
    any other), though not past ``max_width`` (the model's ``max_seq_length``) unless the longest row is.
    """
    width = padded_width(max(len(encoded["input_ids"][i]) for i in rows), multiple, max_width)
    pad_values = {"input_ids": pad_token_id or 0}
    out = {}
    for key, values in encoded.items():
        array = np.full((len(rows), width), pad_values.get(key, 0), dtype=np.int64)
        for r, i in enumerate(rows):
            seq = values[i]
            if left:
                array[r, width - len(seq) :] = seq
            else:
                array[r, : len(seq)] = seq
        out[key] = array
    return out
