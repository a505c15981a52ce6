"""Shortlist-and-rerank search: find candidates with the first few dims, rank them with all dims.

Matryoshka embeddings keep most of their quality in a short prefix (Kusupati et al., 2022,
arXiv 2205.13147, "adaptive retrieval"). :class:`SearchIndex` stores every corpus vector once at full
size and searches in two stages:

1. **Shortlist** (:mod:`matryoshka2d.search.shortlist`): a faiss index over the first ``d`` dims of every
   vector (re-normalised) returns the ``S`` best candidates per query. By default the scan is exact
   (``faiss.IndexFlatIP``); for large corpora an approximate graph (HNSW) or inverted-file (IVF) index can
   be used instead, and the shortlist codes can be compressed to int8 (faiss scalar quantizer, 1 byte a
   dim) or to binary (the sign of each dim, 1 bit a dim, compared by Hamming distance).
2. **Rerank**: the ``S`` candidates are scored exactly against the full query (cosine similarity on
   all dims; numpy gather + batched dot product) and the best ``k`` are returned.

All vectors are L2-normalised, so scores are cosine similarities. Ids are arbitrary strings.

Which model (:mod:`matryoshka2d.search.fingerprint`): an index built from a model records the model's
fingerprint (its embeddings of a few probe sentences); :meth:`SearchIndex.add_texts`,
:meth:`SearchIndex.search_texts` and :meth:`SearchIndex.load` with ``model=`` refuse a model whose
fingerprint differs (:class:`~matryoshka2d.search.fingerprint.ModelMismatchError`, naming both models),
so vectors of two models are never mixed or compared. The same model run by another backend or precision
(ONNX, bfloat16, int8) is accepted.

Input handling (documented choices):

* ``k < 1``, ``shortlist < 1`` or ``shortlist < k`` raise :class:`~matryoshka2d.errors.InvalidInputError`.
* ``k`` larger than the corpus is **clamped** to the corpus size with a ``UserWarning`` (a corpus can
  legitimately be small); ``shortlist`` larger than the corpus is clamped silently. Both are clamped
  before ``shortlist < k`` is checked, so ``k=300, shortlist=200`` on 100 documents returns 100 hits.
* An empty corpus, duplicate ids and query arrays of the wrong width raise
  :class:`~matryoshka2d.errors.InvalidInputError`; a model whose embedding size differs from the
  index's raises :class:`~matryoshka2d.errors.InvalidDimError`.

* Hits of equal score rank by their position in the index (the order documents were added), like
  ``m2d eval-retrieval``: the order does not depend on ``k``, ``shortlist`` or the shortlist index.
  (Which of several equal-scoring candidates enter a shortlist smaller than the corpus is faiss' choice.)

Growth: trained shortlists (IVF centroids, int8 ranges) are rebuilt from the stored vectors when the index
has outgrown what they were trained on (:func:`~matryoshka2d.search.shortlist.outgrown`), so an index
started with a few vectors and grown by :meth:`SearchIndex.add` searches like one built at once.

Thread safety: :meth:`SearchIndex.search` and :meth:`SearchIndex.search_texts` may run from many threads
at once (search settings are passed to faiss per call), and beside :meth:`SearchIndex.add` /
:meth:`SearchIndex.add_texts` and :meth:`SearchIndex.save` from other threads: searches and saves share the
index, an add has it alone (a readers-writer lock; the encoding of ``add_texts`` and ``search_texts`` runs
outside it), so a search sees the index before or after an add, never half of one. Processes that
update one index folder (load, add, save) hold :func:`index_lock` from the load to the save (``m2d index
add`` does), so that no update is lost.

Example:
    >>> model = EmbeddingModel.load("sentence-transformers/all-MiniLM-L6-v2")
    >>> index = SearchIndex.from_model(model, corpus_texts, ids=doc_ids, shortlist_dim=64)
    >>> hits = index.search_texts(model, ["a question"], k=10, shortlist=200)
    >>> hits.ids[0], hits.scores[0]
    >>> index.save("my-index"); index = SearchIndex.load("my-index", model=model)

Folder layout written by :meth:`SearchIndex.save` (format version 3)::

    manifest.json            format, format_version, model, layers, dim, count, shortlist settings,
                             model_fingerprint (probe texts and settings, or null), shortlist_training
                             (vectors the shortlist was trained on; optional, older readers ignore it),
                             document_prompt (the prompt the documents were encoded with, or null: the
                             model's default prompt)
    vectors.npy              (count, dim) float32, normalised full vectors
    ids.json                 list of count strings
    texts.json               list of count document texts (only if the index stores texts)
    shortlist.faiss          the faiss shortlist index (float or binary)
    model_fingerprint.npy    (probes, dim) float32: the model's embeddings of the probe texts (if any)

Other files a user keeps in the folder (notes, say) are carried over when the index is saved over it.

Format versions: a reader accepts every version up to its own and refuses newer ones (they may hold
information it would ignore); a writer always writes the current version. Version 1 (before model
fingerprints) has no ``model_fingerprint``: it loads, its model is checked by re-encoding stored texts
(or by name only, with a warning, if it stores none), and saving it writes version 3. Version 2 has no
``document_prompt``: its documents were encoded with the model's default prompt (null).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from matryoshka2d.errors import DataFileError, InvalidDimError, InvalidInputError, OutputPathError
from matryoshka2d.persistence import OUTPUT_MARKER, atomic_directory, output_path, put_back_moved_aside
from matryoshka2d.ranking import top_k
from matryoshka2d.search.fingerprint import (
    MIN_PROBE_COSINE,
    ModelFingerprint,
    ModelMismatchError,
    encode_texts,
    model_name,
    prompt_hint,
)
from matryoshka2d.search.shortlist import (
    DEFAULT_SHORTLIST_DIM,
    QUANTIZATIONS,
    SHORTLIST_INDEXES,
    ShortlistConfig,
    build_shortlist,
    check_positive_int,
    default_dim,
    needs_training,
    outgrown,
    read_index,
    search_params,
    serialized_size,
    shortlist_codes,
    write_index,
)
from matryoshka2d.truncation import check_layers, truncate_dims
from matryoshka2d.validation import check_ordered

if TYPE_CHECKING:  # pragma: no cover
    import faiss

    from matryoshka2d.encoder import Encoder

__all__ = [
    "DEFAULT_SHORTLIST_DIM",
    "FORMAT",
    "FORMAT_VERSION",
    "QUANTIZATIONS",
    "SHORTLIST_INDEXES",
    "SearchIndex",
    "SearchResult",
    "ShortlistConfig",
    "index_lock",
]

FORMAT = "matryoshka2d-search-index"
FORMAT_VERSION = 3  # 3: document_prompt; 2: model_fingerprint; 1: without it

MANIFEST_FILE = "manifest.json"
VECTORS_FILE = "vectors.npy"
IDS_FILE = "ids.json"
TEXTS_FILE = "texts.json"
SHORTLIST_FILE = "shortlist.faiss"
FINGERPRINT_FILE = "model_fingerprint.npy"
# What a save writes: any other entry of an index folder is the user's and is carried over by a save.
INDEX_FILES = frozenset(
    {MANIFEST_FILE, VECTORS_FILE, IDS_FILE, TEXTS_FILE, SHORTLIST_FILE, FINGERPRINT_FILE, OUTPUT_MARKER}
)

# Stored documents re-encoded to check a model against an index without a fingerprint.
_CHECK_DOCUMENTS = 8

# Rerank in query chunks so the gathered (queries, shortlist, dim) block stays below ~64 MB.
_RERANK_BLOCK_FLOATS = 16 * 1024 * 1024


@dataclass
class SearchResult:
    """Top-k hits of a query batch.

    Attributes:
        ids: for each query, the ids of its hits, best first (shorter than ``k`` only when an
            approximate shortlist returned fewer than ``k`` candidates).
        scores: ``(num_queries, k)`` float32 cosine similarities, best first; ``-inf`` where no hit.
        indices: ``(num_queries, k)`` int64 positions in the index; ``-1`` where no hit.
        texts: the hits' document texts, like ``ids``, if the index stores texts (else None).
    """

    ids: list[list[str]]
    scores: np.ndarray
    indices: np.ndarray
    texts: list[list[str]] | None = None

    def __len__(self) -> int:
        return len(self.ids)


def requested_prompt(model: object, prompt_name: str | None, prompt: str | None) -> str | None:
    """The prompt string a call asks for (None: it asks for none, the model's default applies); an
    encoder without prompts is refused only if one is asked for."""
    if prompt_name is None and prompt is None:
        return None
    resolve = getattr(model, "resolve_prompt", None)
    if resolve is None:
        raise InvalidInputError(f"the model {model_name(model)!r} takes no prompts")
    return resolve(prompt_name, prompt)


def _default_prompt(model: object) -> str:
    """The prompt ``model`` prepends when a call names none."""
    return getattr(model, "prompt", "") or ""


class ReadWriteLock:
    """Many readers at once or one writer; a writer waiting holds back new readers (no starvation).

    Not re-entrant: a thread holding it must not take it again."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writing = False
        self._writers_waiting = 0

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writing or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writing or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()


@dataclass(eq=False, repr=False)
class SearchIndex:
    """Full vectors stored once + a faiss shortlist over their first ``shortlist.dim`` dims.

    Build one with :meth:`from_embeddings` or :meth:`from_model` (or construct an empty one and
    :meth:`add`); query with :meth:`search` (vectors) or :meth:`search_texts` (texts + model).

    Args:
        dim: full embedding size of the vectors.
        shortlist: the shortlist settings (default: :class:`ShortlistConfig` with
            ``dim = min(64, dim)``).
        model: name or path of the model that produced the vectors (recorded in the manifest; the CLI
            loads it to encode queries).
        layers: the layer count the vectors were encoded with (None = all layers of the model).
        fingerprint: the producing model's :class:`~matryoshka2d.search.fingerprint.ModelFingerprint`
            (recorded by :meth:`from_model` and the first :meth:`add_texts`; None = unknown).
        document_prompt: the prompt the documents were encoded with (recorded by the first
            :meth:`add_texts` given one, e.g. ``prompt_name="document"``; later adds use it); None: the
            model's default prompt, if it has one.
    """

    dim: int
    shortlist: ShortlistConfig | None = None
    model: str | None = None
    layers: int | None = None
    fingerprint: ModelFingerprint | None = None
    document_prompt: str | None = None

    def __post_init__(self) -> None:
        self.dim = check_positive_int(self.dim, "dim")  # plain ints: numpy ones break json and faiss
        if self.shortlist is None:
            self.shortlist = ShortlistConfig(dim=min(DEFAULT_SHORTLIST_DIM, self.dim))
        self.shortlist = self.shortlist.validate(self.dim)
        if self.layers is not None:
            self.layers = check_positive_int(self.layers, "layers")
        if self.fingerprint is not None:
            self._check_fingerprint(self.fingerprint)
        if self.document_prompt is not None and not isinstance(self.document_prompt, str):
            raise InvalidInputError(
                f"document_prompt must be a string or None, got {type(self.document_prompt).__name__}"
            )
        self._vectors = np.empty((0, self.dim), dtype=np.float32)
        self._ids: list[str] = []
        self._texts: list[str] | None = None  # document texts, if the index stores them
        self._positions: dict[str, int] = {}
        self._index: faiss.Index | faiss.IndexBinary | None = None
        # Vectors the shortlist was trained on (0: it needs no training), and whether its IVF list count
        # was chosen automatically (then a rebuild for more vectors chooses it again).
        self._trained_on = 0
        self._automatic_nlist = self.shortlist.index == "ivf" and self.shortlist.ivf_nlist is None
        # Models already checked against the fingerprint (so search_texts checks a model once).
        self._checked: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._checked_lock = threading.Lock()
        # searches and saves read the state together; an add changes it alone (faiss' add is not safe
        # beside a search of the same index, and vectors, ids and shortlist must change as one)
        self._state_lock = ReadWriteLock()

    # ------------------------------------------------------------------ building
    @classmethod
    def from_embeddings(
        cls,
        embeddings: np.ndarray,
        ids: Sequence[str] | None = None,
        shortlist_dim: int | None = None,
        model: str | None = None,
        layers: int | None = None,
        texts: Sequence[str] | None = None,
        fingerprint: ModelFingerprint | None = None,
        document_prompt: str | None = None,
        **shortlist_options,
    ) -> SearchIndex:
        """An index over precomputed embeddings.

        Args:
            embeddings: ``(count, dim)`` array (normalised here; any float dtype).
            ids: one string id per row (default: ``"0"``, ``"1"``, ...).
            shortlist_dim: leading dims used for the shortlist (default: ``min(64, dim)``).
            model, layers: recorded in the manifest (see the class docs).
            texts: the documents' texts, to store and return with results (optional).
            fingerprint: the producing model's fingerprint (``ModelFingerprint.of(model, layers)``), so
                that later models are checked against it (optional).
            document_prompt: the prompt the embeddings were encoded with, if not the model's default
                (e.g. ``model.resolve_prompt("document")``): later :meth:`add_texts` use it.
            **shortlist_options: other :class:`ShortlistConfig` fields (``index``, ``quantization``, ...).
        """
        embeddings = _as_matrix(embeddings, "embeddings")
        if embeddings.shape[0] == 0:
            raise InvalidInputError("embeddings is empty: an index needs at least one vector")
        dim = embeddings.shape[1]
        config = shortlist_config(default_dim(shortlist_dim, dim), shortlist_options)
        index = cls(
            dim=dim,
            shortlist=config,
            model=model,
            layers=layers,
            fingerprint=fingerprint,
            document_prompt=document_prompt,
        )
        index.add(embeddings, ids, texts)
        return index

    @classmethod
    def from_model(
        cls,
        model: Encoder,
        texts: Sequence[str],
        ids: Sequence[str] | None = None,
        shortlist_dim: int | None = None,
        layers: int | None = None,
        batch_size: int = 32,
        show_progress: bool | None = True,
        store_texts: bool = True,
        prompt_name: str | None = None,
        prompt: str | None = None,
        workers: int = 1,
        **shortlist_options,
    ) -> SearchIndex:
        """Encode ``texts`` with ``model`` (at ``layers``, full dim) and index them.

        Args:
            model: the encoder (an :class:`~matryoshka2d.model.EmbeddingModel`, an ONNX encoder, or any
                object with ``encode(texts, layers=, ...)`` or ``iter_encode``, ``num_layers`` and ``dim``);
                its ``name_or_path`` and fingerprint are recorded.
            texts: the corpus.
            ids: one string id per text (default: ``"0"``, ``"1"``, ...).
            shortlist_dim: leading dims used for the shortlist (default: ``min(64, model.dim)``).
            layers: encode with the first ``layers`` transformer layers (default: all).
            batch_size, show_progress: passed to the encoder.
            store_texts: keep the texts in the index, so that results (and the CLI) can show them.
            prompt_name, prompt: the prompt to encode the documents with (see :meth:`add_texts`).
            workers: batches encoded at once (see :meth:`add_texts`).
            **shortlist_options: other :class:`ShortlistConfig` fields.
        """
        if layers is not None:
            layers = check_layers(layers, model.num_layers)
        config = shortlist_config(default_dim(shortlist_dim, model.dim), shortlist_options)
        index = cls(dim=model.dim, shortlist=config, model=model_name(model), layers=layers)
        index.add_texts(
            model,
            texts,
            ids,
            batch_size=batch_size,
            show_progress=show_progress,
            store_texts=store_texts,
            prompt_name=prompt_name,
            prompt=prompt,
            workers=workers,
        )
        return index

    def add(
        self, embeddings: np.ndarray, ids: Sequence[str] | None = None, texts: Sequence[str] | None = None
    ) -> None:
        """Add vectors (normalised here) with their ids, and optionally their texts.

        The vectors must come from the index's model: this method cannot check that (use
        :meth:`add_texts`, which encodes and checks the model).

        Args:
            embeddings: ``(count, dim)`` array.
            ids: one unique string id per row (default: the running row number as a string).
            texts: one document text per row, stored and returned with results. The first add decides:
                an index built with texts needs texts for every later add, one built without ignores them.

        Raises:
            InvalidInputError: an empty or malformed array, a width other than ``dim``, non-finite
                values, an id count that differs from the row count, a non-string id, or an id that is
                repeated or already in the index (nothing is added then).
        """
        embeddings = rows_of_width(
            embeddings, "embeddings", self.dim, "the index holds", "embeddings is empty: nothing to add"
        )
        vectors = np.ascontiguousarray(truncate_dims(embeddings, None, normalize=True), dtype=np.float32)
        with self._state_lock.write():
            self._add(vectors, ids, texts)

    def _add(self, vectors: np.ndarray, ids: Sequence[str] | None, texts: Sequence[str] | None) -> None:
        """:meth:`add` of normalised vectors, under the state lock."""
        new_ids = self._check_new_ids(ids, vectors.shape[0])
        new_texts = self._check_new_texts(texts, vectors.shape[0])
        if self._index is None:
            self._index, self.shortlist, self._trained_on = build_shortlist(self.shortlist, vectors)
            self._vectors = vectors
        else:
            combined = np.concatenate([self._vectors, vectors])
            # the settings a build of everything would use (an automatic IVF list count chosen again)
            config = replace(self.shortlist, ivf_nlist=None) if self._automatic_nlist else self.shortlist
            if outgrown(config, self._trained_on, len(combined)):
                # trained on too few vectors for its size now (a small first batch): rebuild from all
                self._index, self.shortlist, self._trained_on = build_shortlist(config, combined)
            else:
                self._index.add(shortlist_codes(vectors, self.shortlist))
            self._vectors = combined
        start = len(self._ids)
        if new_texts is not None:
            self._texts = self._texts if self._texts is not None else []
            self._texts.extend(new_texts)
        self._ids.extend(new_ids)
        self._positions.update((id_, start + i) for i, id_ in enumerate(new_ids))

    def add_texts(
        self,
        model: Encoder,
        texts: Sequence[str],
        ids: Sequence[str] | None = None,
        batch_size: int = 32,
        show_progress: bool | None = True,
        store_texts: bool = True,
        prompt_name: str | None = None,
        prompt: str | None = None,
        workers: int = 1,
    ) -> None:
        """Encode ``texts`` with ``model`` (at the index's ``layers``) and add them.

        The model is checked first (:meth:`check_model`): a model other than the one that built the
        index is refused, so an index never mixes vectors of two models. The first model added to an
        empty index is recorded (name and fingerprint).

        ``store_texts`` keeps the texts in the index; it only matters for the first add (see :meth:`add`).

        ``prompt_name`` / ``prompt`` choose the documents' prompt (e.g. ``prompt_name="document"`` for a
        retrieval model whose folder has query and document prompts; :meth:`search_texts` then takes
        ``prompt_name="query"``); default: the model's default prompt. The first add records it
        (:attr:`document_prompt`) and later adds use it: asking a filled index for another prompt is
        refused, as its vectors would not be comparable.

        ``workers``: batches encoded at once (:meth:`~matryoshka2d.encoder.Encoder.encode`'s ``workers``,
        each with its share of torch's threads; ONNX sessions are sized when loaded); speed only.

        Raises:
            ModelMismatchError: ``model`` is not the index's model.
            InvalidDimError, InvalidLayersError: see :meth:`check_model`.
            InvalidInputError: an unknown prompt name, or another prompt than the documents' one.
        """
        from matryoshka2d.encoder import check_texts

        texts = check_texts(texts)
        new_ids = self._check_new_ids(ids, len(texts))  # fail before the (slow) encoding
        workers = check_positive_int(workers, "workers")
        asked = requested_prompt(model, prompt_name, prompt)
        if self._ids:
            used = self.document_prompt if self.document_prompt is not None else _default_prompt(model)
            if asked is not None and asked != used:
                raise InvalidInputError(
                    f"the index's documents were encoded with the prompt {used!r}, not {asked!r}: vectors of "
                    "other prompts would not be comparable; add without a prompt (the index uses its own) "
                    "or build a new index"
                )
            prompt = self.document_prompt
        else:
            prompt = asked
        self.check_model(model, record=True)
        emb = encode_texts(
            model,
            texts,
            self.layers,
            batch_size=batch_size,
            show_progress=show_progress,
            prompt=prompt,
            workers=workers,
        )
        keep = self._texts is not None if self._ids else store_texts
        self.add(emb, new_ids, texts if keep else None)
        self.document_prompt = prompt  # what the first add records; later adds used it (or None, as before)
        if self.model is None:
            self.model = model_name(model)

    def check_model(self, model: Encoder, record: bool = False) -> None:
        """Refuse a model that cannot produce vectors comparable with the index's.

        Checks the embedding size and layer count, then the model's identity: its fingerprint must match
        the index's (:mod:`~matryoshka2d.search.fingerprint`). An index without a fingerprint (an older
        folder, or built from bare embeddings) is checked by re-encoding a few stored texts; if it stores
        no texts, only the model's name can be compared, and a different name gives a warning. A model
        that passed is remembered, so repeated searches with it are not re-checked.

        Args:
            model: the encoder.
            record: record ``model``'s fingerprint if the index has none yet and the model passed (used
                when adding documents: from then on, the index knows its model).

        Raises:
            InvalidDimError: the model's embedding size differs from the index's.
            InvalidLayersError: the index was built at more layers than the model has.
            ModelMismatchError: the model's embeddings differ from the index's model's (both named).
        """
        if model.dim != self.dim:
            raise InvalidDimError(
                f"the model {model_name(model)!r} makes {model.dim}-dim embeddings but the index holds "
                f"{self.dim}-dim vectors (built with {self.model or 'an unknown model'!r}); query with"
                " the model that built the index"
            )
        if self.layers is not None:
            check_layers(self.layers, model.num_layers)
        fingerprint = self.fingerprint
        if fingerprint is not None and self._was_checked(model, fingerprint):
            return
        if fingerprint is not None:
            fingerprint.check(model, self.model)
        elif self._ids and self._texts is not None:
            self._check_by_documents(model)
        elif self._ids:
            if self.model is None or model_name(model) != self.model:
                warnings.warn(
                    f"cannot check that {model_name(model)!r} is the model that built this index "
                    f"({self.model or 'not recorded'!r}): the index records no model fingerprint (an older "
                    "index or one built from bare embeddings) and stores no texts to re-encode; vectors "
                    "of different models must not be mixed or compared",
                    stacklevel=3,
                )
                return  # not recorded: an unverified model must not become the index's identity
        if self.fingerprint is None and (record or self._ids):
            self.fingerprint = ModelFingerprint.of(model, self.layers)
        self._remember(model, self.fingerprint)

    def _check_by_documents(self, model: Encoder) -> None:
        """Re-encode a few stored documents and compare them with their stored vectors."""
        rows = np.unique(
            np.linspace(0, len(self._ids) - 1, num=min(_CHECK_DOCUMENTS, len(self._ids))).astype(int)
        )
        documents = [self._texts[i] for i in rows]  # type: ignore[index]
        new = encode_texts(model, documents, self.layers, batch_size=len(rows), prompt=self.document_prompt)
        agreement = float(np.min(np.einsum("ij,ij->i", np.asarray(self._vectors[rows]), new)))
        if agreement < MIN_PROBE_COSINE:
            built = self.model or "an unknown model"
            raise ModelMismatchError(
                f"the model {model_name(model)!r} is not the model that built this index ({built!r}): its "
                f"embeddings of stored documents differ from the stored vectors (lowest cosine similarity "
                f"{agreement:.3f}, need >= {MIN_PROBE_COSINE}); vectors of different models cannot be mixed "
                f"or compared. Use {built!r}, or build a new index with {model_name(model)!r}"
                f"{prompt_hint(model)}"
            )

    def _was_checked(self, model: object, fingerprint: ModelFingerprint) -> bool:
        with self._checked_lock:
            try:
                # a model whose exit rotations changed since (rotations_version) is checked again
                entry = self._checked.get(model)
                version = getattr(model, "rotations_version", 0)
                return entry is not None and entry[0] is fingerprint and entry[1] == version
            except TypeError:  # not weak-referenceable: checked every time
                return False

    def _remember(self, model: object, fingerprint: ModelFingerprint | None) -> None:
        if fingerprint is None:
            return
        with self._checked_lock:
            try:
                self._checked[model] = (fingerprint, getattr(model, "rotations_version", 0))
            except TypeError:
                pass

    def _check_fingerprint(self, fingerprint: ModelFingerprint) -> None:
        if not isinstance(fingerprint, ModelFingerprint):
            raise InvalidInputError(
                f"fingerprint must be a ModelFingerprint, got {type(fingerprint).__name__}"
            )
        if fingerprint.dim != self.dim:
            raise InvalidDimError(
                f"the fingerprint's model makes {fingerprint.dim}-dim embeddings but the index holds "
                f"{self.dim}-dim vectors"
            )
        if fingerprint.layers != self.layers:
            raise InvalidInputError(
                f"the fingerprint was taken at layers={fingerprint.layers} but the index encodes at "
                f"layers={self.layers}: take it with ModelFingerprint.of(model, layers={self.layers})"
            )

    # ------------------------------------------------------------------ searching
    def search(
        self,
        queries: np.ndarray,
        k: int = 10,
        shortlist: int = 200,
        ef_search: int | None = None,
        nprobe: int | None = None,
    ) -> SearchResult:
        """Two-stage search for a batch of query vectors.

        Args:
            queries: ``(num_queries, dim)`` array, or one ``(dim,)`` vector (normalised here).
            k: hits per query; clamped (with a warning) to the corpus size.
            shortlist: candidates taken from the first stage and reranked with all dims; must be ``>= k``;
                clamped silently to the corpus size.
            ef_search: HNSW beam width for this call (default: the config's, raised to ``shortlist``).
            nprobe: IVF lists scanned for this call (default: the config's).

        Returns:
            :class:`SearchResult` with ids, exact full-dim cosine scores and positions, best first.
        """
        k = _check_positive_int(k, "k")
        shortlist = _check_positive_int(shortlist, "shortlist")
        queries = rows_of_width(
            queries, "queries", self.dim, "the index holds", "queries is empty: nothing to search", True
        )
        queries = np.ascontiguousarray(truncate_dims(queries, None, normalize=True), dtype=np.float32)
        with self._state_lock.read():  # the index as it is before or after any add, not during one
            return self._search(queries, k, shortlist, ef_search, nprobe)

    def _search(
        self, queries: np.ndarray, k: int, shortlist: int, ef_search: int | None, nprobe: int | None
    ) -> SearchResult:
        if self._index is None or not self._ids:
            raise InvalidInputError("the index is empty: add documents before searching")
        n = len(self._ids)
        # Clamp first: a k above the corpus size is clamped with a warning whatever the shortlist size.
        if k > n:
            warnings.warn(
                f"k={k} is larger than the corpus ({n} documents); returning {n} hits", stacklevel=3
            )
            k = n
        shortlist = min(shortlist, n)
        if shortlist < k:
            raise InvalidInputError(
                f"shortlist={shortlist} is smaller than k={k}: the shortlist must hold at least k candidates"
            )
        params = search_params(self.shortlist, shortlist, ef_search, nprobe)  # per call: thread-safe
        codes = shortlist_codes(queries, self.shortlist)
        _, candidates = self._index.search(codes, shortlist, params=params)
        return self._rerank(queries, candidates.astype(np.int64, copy=False), k)

    def search_texts(
        self,
        model: Encoder,
        texts: Sequence[str],
        k: int = 10,
        shortlist: int = 200,
        batch_size: int = 32,
        prompt_name: str | None = None,
        prompt: str | None = None,
        **search_options,
    ) -> SearchResult:
        """Encode query texts with ``model`` (at the index's ``layers``) and :meth:`search`.

        ``model`` is checked against the index's model first (once per model object; see
        :meth:`check_model`): queries encoded by another model would find nonsense. ``prompt_name`` /
        ``prompt``: the queries' prompt (e.g. ``"query"``; default: the model's default prompt).

        Raises:
            ModelMismatchError: ``model`` is not the index's model.
            InvalidInputError: an unknown prompt name.
        """
        prompt = requested_prompt(model, prompt_name, prompt)
        self.check_model(model)
        texts = [texts] if isinstance(texts, str) else texts
        queries = encode_texts(
            model, texts, self.layers, batch_size=batch_size, show_progress=False, prompt=prompt
        )
        return self.search(queries, k=k, shortlist=shortlist, **search_options)

    def _rerank(self, queries: np.ndarray, candidates: np.ndarray, k: int) -> SearchResult:
        num_queries, s = candidates.shape
        scores = np.full((num_queries, k), -np.inf, dtype=np.float32)
        indices = np.full((num_queries, k), -1, dtype=np.int64)
        block = max(1, _RERANK_BLOCK_FLOATS // (s * self.dim))
        for start in range(0, num_queries, block):
            cand = candidates[start : start + block]
            valid = cand >= 0
            gathered = self._vectors[np.where(valid, cand, 0)]  # (b, s, dim)
            # (b, s). einsum, not matmul: BLAS' matrix-vector kernels round a row's dot product differently
            # at the block's tail, so duplicate documents would get unequal scores depending on where
            # they lie among the candidates; einsum gives one row the same score wherever it lies.
            full = np.einsum("bsd,bd->bs", gathered, queries[start : start + block])
            full[~valid] = -np.inf
            top = top_k(full, k, positions=cand)  # equal scores by the row in the index
            block_scores = np.take_along_axis(full, top, axis=1)
            block_indices = np.take_along_axis(cand, top, axis=1)
            block_indices[~np.isfinite(block_scores)] = -1
            scores[start : start + len(cand)] = block_scores
            indices[start : start + len(cand)] = block_indices
        rows = [[i for i in row if i >= 0] for row in indices.tolist()]
        ids = [[self._ids[i] for i in row] for row in rows]
        texts = [[self._texts[i] for i in row] for row in rows] if self._texts is not None else None
        return SearchResult(ids=ids, scores=scores, indices=indices, texts=texts)

    # ------------------------------------------------------------------ input checks
    def _check_new_ids(self, ids: Sequence[str] | None, count: int) -> list[str]:
        if ids is None:
            start = len(self._ids)
            new = [str(start + i) for i in range(count)]
        else:
            new = check_ordered(ids, "ids")  # a set or dict has no row order: refused
            if len(new) != count:
                raise InvalidInputError(f"got {len(new)} ids for {count} vectors/texts; give one id each")
            for i, id_ in enumerate(new):
                if not isinstance(id_, str):
                    raise InvalidInputError(
                        f"ids[{i}] is {type(id_).__name__} ({id_!r:.50}); ids must be strings"
                    )
        seen: set[str] = set()
        for id_ in new:
            if id_ in seen:
                raise InvalidInputError(f"duplicate id {id_!r} in the new documents; ids must be unique")
            if id_ in self._positions:
                raise InvalidInputError(f"id {id_!r} is already in the index; ids must be unique")
            seen.add(id_)
        return new

    def _check_new_texts(self, texts: Sequence[str] | None, count: int) -> list[str] | None:
        if self._ids and self._texts is None:
            return None  # the index was built without texts
        if texts is None:
            if self._ids:
                raise InvalidInputError("this index stores document texts: pass texts= with the new vectors")
            return None
        new = check_ordered(texts, "texts")  # a set or dict has no row order: refused
        if len(new) != count:
            raise InvalidInputError(f"got {len(new)} texts for {count} vectors; give one text each")
        for i, text in enumerate(new):
            if not isinstance(text, str):
                raise InvalidInputError(f"texts[{i}] is {type(text).__name__}, expected str")
        return new

    # ------------------------------------------------------------------ accessors
    def __len__(self) -> int:
        return len(self._ids)

    def __repr__(self) -> str:
        c = self.shortlist
        return (
            f"SearchIndex(count={len(self)}, dim={self.dim}, shortlist=({c.dim} dims, {c.index}, "
            f"{c.quantization}), model={self.model!r}, layers={self.layers})"
        )

    @property
    def ids(self) -> list[str]:
        """The ids, in insertion order (a copy)."""
        return list(self._ids)

    @property
    def texts(self) -> list[str] | None:
        """The stored document texts in insertion order (a copy), or None if the index has none."""
        return None if self._texts is None else list(self._texts)

    @property
    def vectors(self) -> np.ndarray:
        """The normalised full vectors, ``(count, dim)`` float32 (read-only view)."""
        view = self._vectors.view()
        view.flags.writeable = False
        return view

    def position(self, id_: str) -> int:
        """The row of ``id_`` in :attr:`vectors`."""
        try:
            return self._positions[id_]
        except KeyError:
            raise InvalidInputError(f"id {id_!r} is not in the index") from None

    def memory_bytes(self) -> dict[str, int]:
        """Bytes held: ``full`` (the float32 vectors), ``shortlist`` (the faiss index, serialised size)."""
        shortlist = serialized_size(self._index, self.shortlist.binary) if self._index is not None else 0
        return {"full": int(self._vectors.nbytes), "shortlist": shortlist}

    def manifest(self) -> dict:
        """The metadata written to ``manifest.json``."""
        from matryoshka2d import __version__

        training = None
        if needs_training(self.shortlist):
            training = {"vectors": self._trained_on, "automatic_ivf_nlist": self._automatic_nlist}
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "matryoshka2d_version": __version__,
            "model": self.model,
            "layers": self.layers,
            "dim": self.dim,
            "count": len(self._ids),
            "normalized": True,
            "texts": self._texts is not None,
            "shortlist": self.shortlist.to_dict(),
            "model_fingerprint": self.fingerprint.manifest() if self.fingerprint is not None else None,
            "shortlist_training": training,
            "document_prompt": self.document_prompt,
        }

    # ------------------------------------------------------------------ persistence
    def save(
        self,
        path: str | os.PathLike,
        *,
        overwrite: bool = False,
        inputs: Iterable[str | os.PathLike | None] = (),
    ) -> Path:
        """Write the index to a folder, atomically (an existing folder is replaced only on success).

        Files of the replaced folder that are not part of an index (:data:`INDEX_FILES`: a user's notes,
        say) are carried over into the new folder (hard-linked, or copied across file systems), never
        deleted. To update a folder that other processes may update too, hold :func:`index_lock` from
        :meth:`load` to this save.

        Args:
            path: the output folder: new or empty, or an index written by matryoshka2d (replaced only with
                ``overwrite=True``); anything else is refused
                (:func:`~matryoshka2d.persistence.check_output_folder`).
            overwrite: replace an index previously saved at ``path``.
            inputs: paths the caller read (the corpus file, the model folder); never written over,
                into or above.

        Raises:
            OutputPathError: ``path`` may not be written (the message says what is there), or it holds an
                entry that cannot be carried over (not a file, folder or link).
        """
        with self._state_lock.read():  # one state: an add from another thread waits for the save
            return self._save(path, overwrite, inputs)

    def _save(
        self, path: str | os.PathLike, overwrite: bool, inputs: Iterable[str | os.PathLike | None]
    ) -> Path:
        if self._index is None:
            raise InvalidInputError("the index is empty: nothing to save")
        path = output_path(path)  # as atomic_directory sees it (``~`` expanded): the folder it replaces
        with atomic_directory(path, "search-index", overwrite=overwrite, inputs=inputs) as tmp:
            np.save(tmp / VECTORS_FILE, self._vectors)
            (tmp / IDS_FILE).write_text(json.dumps(self._ids, ensure_ascii=False), encoding="utf-8")
            if self._texts is not None:
                (tmp / TEXTS_FILE).write_text(json.dumps(self._texts, ensure_ascii=False), encoding="utf-8")
            if self.fingerprint is not None:
                np.save(tmp / FINGERPRINT_FILE, self.fingerprint.embeddings)
            write_index(self._index, str(tmp / SHORTLIST_FILE), self.shortlist.binary)
            (tmp / MANIFEST_FILE).write_text(json.dumps(self.manifest(), indent=2) + "\n", encoding="utf-8")
            _carry_over(path, tmp)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, model: Encoder | None = None, mmap: bool = False) -> SearchIndex:
        """Read an index folder written by :meth:`save` (any format version up to :data:`FORMAT_VERSION`).

        Args:
            path: the folder.
            model: if given, checked against the index (:meth:`check_model`: size, layers, identity).
            mmap: memory-map the full vectors instead of reading them into memory (they are then
                read-only until more documents are added).

        Raises:
            DataFileError: the folder is missing, incomplete, of another format or a newer format
                version, or its files disagree with each other.
            InvalidDimError: ``model`` makes embeddings of another size.
            ModelMismatchError: ``model`` is not the index's model.
        """
        path = Path(path).expanduser()
        with contextlib.suppress(OSError):  # a read-only place: report what is (not) there
            put_back_moved_aside(path)  # a save killed between its two renames left it beside ``path``
        if path.exists() and not path.is_dir():
            raise DataFileError(f"{path} is a file, not a search index folder (written by 'm2d index build')")
        if not path.is_dir():
            raise DataFileError(f"search index folder not found: {path}")
        manifest = _read_json(path, MANIFEST_FILE)
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise DataFileError(f"{path / MANIFEST_FILE}: not a matryoshka2d search index manifest")
        version = manifest.get("format_version")
        if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
            newer = isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION
            raise DataFileError(
                f"{path}: search index format version {version!r} is not supported (this matryoshka2d reads "
                f"versions 1..{FORMAT_VERSION}"
                + ("; it was written by a newer matryoshka2d)" if newer else ")")
            )
        try:
            config = ShortlistConfig(**manifest["shortlist"])
            layers, dim, count = manifest.get("layers"), int(manifest["dim"]), int(manifest["count"])
            trained_on, automatic_nlist = _read_training(manifest.get("shortlist_training"), config, count)
            fingerprint = None
            if version >= 2 and manifest.get("model_fingerprint") is not None:
                probe = np.load(_existing(path, FINGERPRINT_FILE))
                fingerprint = ModelFingerprint.from_manifest(manifest["model_fingerprint"], probe)
            index = cls(
                dim=dim,
                shortlist=config,
                model=manifest.get("model"),
                layers=layers,
                fingerprint=fingerprint,
                document_prompt=manifest.get("document_prompt"),
            )
        except (KeyError, TypeError, ValueError, OSError) as e:  # InvalidInputError is a ValueError too
            raise DataFileError(f"{path / MANIFEST_FILE}: malformed manifest ({e})") from None

        ids = _read_json(path, IDS_FILE)
        if not isinstance(ids, list) or len(ids) != count or not all(isinstance(i, str) for i in ids):
            raise DataFileError(f"{path}: {IDS_FILE} must list {count} string ids")
        if len(set(ids)) != count:
            raise DataFileError(f"{path}: {IDS_FILE} contains duplicate ids")
        texts = _read_json(path, TEXTS_FILE) if manifest.get("texts") else None
        if texts is not None and (
            not isinstance(texts, list) or len(texts) != count or not all(isinstance(t, str) for t in texts)
        ):
            raise DataFileError(f"{path}: {TEXTS_FILE} must list {count} texts")
        try:
            vectors = np.load(_existing(path, VECTORS_FILE), mmap_mode="r" if mmap else None)
            shortlist_index = read_index(str(_existing(path, SHORTLIST_FILE)), config.binary)
        except (OSError, ValueError, RuntimeError) as e:
            raise DataFileError(f"{path}: cannot read the index files ({str(e).splitlines()[0]})") from None
        if vectors.dtype != np.float32 or vectors.shape != (count, dim):
            raise DataFileError(
                f"{path}: {VECTORS_FILE} has shape {vectors.shape} {vectors.dtype}, "
                f"expected ({count}, {dim}) float32"
            )
        if shortlist_index.ntotal != count or shortlist_index.d != config.dim:
            raise DataFileError(
                f"{path}: {SHORTLIST_FILE} holds {shortlist_index.ntotal} vectors of {shortlist_index.d} "
                f"dims, expected {count} of {config.dim}"
            )
        index._vectors, index._ids, index._texts, index._index = vectors, ids, texts, shortlist_index
        index._trained_on, index._automatic_nlist = trained_on, automatic_nlist
        index._positions = {id_: i for i, id_ in enumerate(ids)}
        if model is not None:
            index.check_model(model)
        return index


# ---------------------------------------------------------------------- helpers
def lock_file(path: str | os.PathLike) -> Path:
    """The lock file of the index folder ``path``: ``.NAME.lock`` beside it (not inside: a save replaces
    the folder), for its real path, so that every spelling of the folder finds the same lock."""
    real = Path(os.path.realpath(Path(path).expanduser()))
    return real.parent / f".{real.name}.lock"


@contextlib.contextmanager
def index_lock(path: str | os.PathLike, on_wait: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """Hold the exclusive lock of the index folder ``path`` (across processes and threads).

    Hold it from :meth:`SearchIndex.load` to :meth:`SearchIndex.save` when updating a folder in place,
    so that two updates at once never lose one's documents::

        with index_lock("my-index"):
            index = SearchIndex.load("my-index")
            index.add_texts(model, more_texts)
            index.save("my-index", overwrite=True)

    Args:
        path: the index folder (it need not exist yet; its parent folder is created).
        on_wait: called with the lock file's path if another holder makes this one wait.

    Yields:
        the lock file's path (:func:`lock_file`).
    """
    from filelock import FileLock, Timeout

    where = lock_file(path)
    where.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(where))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if on_wait is not None:
            on_wait(where)
        lock.acquire()
    try:
        yield where
    finally:
        lock.release()


def _read_training(recorded: object, config: ShortlistConfig, count: int) -> tuple[int, bool]:
    """(vectors the shortlist was trained on, whether its IVF list count is automatic) from a manifest's
    ``shortlist_training``. Without one (a folder saved before it was recorded) the sample is unknown:
    such an index may have been grown from a tiny first batch, so it counts as trained on none and its
    next :meth:`SearchIndex.add` rebuilds the shortlist once from all its vectors (the list count as
    given)."""
    if recorded is None:
        return 0, False
    vectors = recorded.get("vectors") if isinstance(recorded, dict) else None
    automatic = recorded.get("automatic_ivf_nlist") if isinstance(recorded, dict) else None
    if (
        isinstance(vectors, bool)
        or not isinstance(vectors, int)
        or vectors < 0
        or not isinstance(automatic, bool)
    ):
        raise ValueError(
            f"shortlist_training must be {{'vectors': int, 'automatic_ivf_nlist': bool}}, got {recorded!r}"
        )
    return vectors, automatic


def _carry_over(folder: Path, new: Path) -> None:
    """Put the entries of ``folder`` that are not index files into ``new`` (hard links where possible, else
    copies): a save replaces the whole folder and must not delete a user's files in it."""
    if not folder.is_dir():
        return
    extra = sorted(p for p in folder.iterdir() if p.name not in INDEX_FILES)
    odd = [p.name for p in extra if not (p.is_symlink() or p.is_file() or p.is_dir())]
    if odd:
        raise OutputPathError(
            f"{folder} holds {', '.join(odd)}, which is not part of a search index and cannot be carried "
            "over into the new index folder (not a file, folder or link): move it out of the folder first"
        )
    for entry in extra:
        target = new / entry.name
        if entry.is_symlink():
            os.symlink(os.readlink(entry), target)
        elif entry.is_dir():
            shutil.copytree(entry, target, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, target)


def _link_or_copy(source: str | os.PathLike, target: str | os.PathLike) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system, or one without hard links
        shutil.copy2(source, target)


def _existing(folder: Path, name: str) -> Path:
    if not (folder / name).is_file():
        raise DataFileError(f"{folder} is not a complete search index: {name} is missing")
    return folder / name


def _read_json(folder: Path, name: str):
    try:
        return json.loads(_existing(folder, name).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataFileError(f"cannot read {folder / name}: {e}") from None


_check_positive_int = check_positive_int  # the name matryoshka2d.search.qdrant imports


def shortlist_config(dim: int, options: dict) -> ShortlistConfig:
    """``ShortlistConfig(dim=dim, **options)``, an unknown option named in an :class:`InvalidInputError`."""
    from dataclasses import fields

    known = {f.name for f in fields(ShortlistConfig)} - {"dim"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise InvalidInputError(
            f"unknown shortlist option {unknown[0]!r}; the options are {', '.join(sorted(known))}"
        )
    return ShortlistConfig(dim=dim, **options)


def rows_of_width(array: object, name: str, width: int, holder: str, empty: str, allow_vector: bool = False):
    """:func:`_as_matrix` of at least one row of ``width`` values; errors say ``empty`` (no rows) or
    "``name`` have N dims but ``holder`` ``width``-dim vectors"."""
    matrix = _as_matrix(array, name, allow_vector=allow_vector)
    if matrix.shape[0] == 0:
        raise InvalidInputError(empty)
    if matrix.shape[1] != width:
        raise InvalidInputError(f"{name} have {matrix.shape[1]} dims but {holder} {width}-dim vectors")
    return matrix


def _as_matrix(array: object, name: str, allow_vector: bool = False) -> np.ndarray:
    """``array`` as a 2-D real, finite numpy array (a 1-D one becomes one row if ``allow_vector``)."""
    try:
        matrix = np.asarray(array)
    except (TypeError, ValueError) as e:
        raise InvalidInputError(f"{name} must be a 2-D numeric array: {e}") from None
    if allow_vector and matrix.ndim == 1:
        matrix = matrix[None, :]
    if matrix.ndim != 2:
        raise InvalidInputError(f"{name} must be a 2-D array (rows, dims), got shape {matrix.shape}")
    if not np.issubdtype(matrix.dtype, np.number) or np.issubdtype(matrix.dtype, np.complexfloating):
        raise InvalidInputError(f"{name} must hold real numbers, got dtype {matrix.dtype}")
    if matrix.size and not np.isfinite(matrix).all():
        raise InvalidInputError(f"{name} contains NaN or infinite values")
    if matrix.size:
        zero = ~matrix.any(axis=1)
        if zero.any():
            raise InvalidInputError(
                f"{name} row {int(np.argmax(zero))} is all zeros: a zero vector has no direction, so its "
                "cosine similarity to anything is undefined"
            )
    return matrix
