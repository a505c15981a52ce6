"""Shortlist-and-rerank search: find candidates with the first few dims, rank them with all dims.

Matryoshka embeddings keep most of their quality in a short prefix (Kusupati et al., 2022,
arXiv 2205.13147, "adaptive retrieval"). :class:`SearchIndex` stores every corpus vector once at full
size and searches in two stages:

1. **Shortlist**: a faiss index over the first ``d`` dims of every vector (re-normalised) returns the
   ``S`` best candidates per query. By default the scan is exact (``faiss.IndexFlatIP``); for large
   corpora an approximate graph (HNSW) or inverted-file (IVF) index can be used instead, and the
   shortlist codes can be compressed to int8 (faiss scalar quantizer, 1 byte a dim) or to binary
   (the sign of each dim, 1 bit a dim, compared by Hamming distance).
2. **Rerank**: the ``S`` candidates are scored exactly against the full query (cosine similarity on
   all dims; numpy gather + batched dot product) and the best ``k`` are returned.

All vectors are L2-normalised, so scores are cosine similarities. Ids are arbitrary strings.

Input handling (documented choices):

* ``k < 1``, ``shortlist < 1`` or ``shortlist < k`` raise :class:`~matryoshka2d.errors.InvalidInputError`.
* ``k`` larger than the corpus is **clamped** to the corpus size with a ``UserWarning`` (a corpus can
  legitimately be small); ``shortlist`` larger than the corpus is clamped silently. Both are clamped
  before ``shortlist < k`` is checked, so ``k=300, shortlist=200`` on 100 documents returns 100 hits.
* An empty corpus, duplicate ids and query arrays of the wrong width raise
  :class:`~matryoshka2d.errors.InvalidInputError`; a model whose embedding size differs from the
  index's raises :class:`~matryoshka2d.errors.InvalidDimError`.

Example:
    >>> model = EmbeddingModel.load("sentence-transformers/all-MiniLM-L6-v2")
    >>> index = SearchIndex.from_model(model, corpus_texts, ids=doc_ids, shortlist_dim=64)
    >>> hits = index.search_texts(model, ["a question"], k=10, shortlist=200)
    >>> hits.ids[0], hits.scores[0]
    >>> index.save("my-index"); index = SearchIndex.load("my-index", model=model)

Folder layout written by :meth:`SearchIndex.save` (format version 1)::

    manifest.json     format, format_version, model, layers, dim, count, shortlist settings
    vectors.npy       (count, dim) float32, normalised full vectors
    ids.json          list of count strings
    texts.json        list of count document texts (only if the index stores texts)
    shortlist.faiss   the faiss shortlist index (float or binary)
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import faiss
import numpy as np

from matryoshka2d.errors import DataFileError, InvalidDimError, InvalidInputError
from matryoshka2d.persistence import atomic_directory
from matryoshka2d.truncation import check_layers, truncate_dims
from matryoshka2d.validation import check_ordered

if TYPE_CHECKING:  # pragma: no cover
    from matryoshka2d.model import EmbeddingModel

FORMAT = "matryoshka2d-search-index"
FORMAT_VERSION = 1
SHORTLIST_INDEXES = ("flat", "hnsw", "ivf")
QUANTIZATIONS = ("none", "int8", "binary")

MANIFEST_FILE = "manifest.json"
VECTORS_FILE = "vectors.npy"
IDS_FILE = "ids.json"
TEXTS_FILE = "texts.json"
SHORTLIST_FILE = "shortlist.faiss"
DEFAULT_SHORTLIST_DIM = 64

# Rerank in query chunks so the gathered (queries, shortlist, dim) block stays below ~64 MB.
_RERANK_BLOCK_FLOATS = 16 * 1024 * 1024


@dataclass(frozen=True)
class ShortlistConfig:
    """How the first-stage shortlist is built and searched.

    Args:
        dim: number of leading dims used for the shortlist (``1..index dim``; a multiple of 8 for
            binary codes).
        index: ``"flat"`` (exact scan, default), ``"hnsw"`` (graph, approximate, no training) or
            ``"ivf"`` (inverted lists, approximate, trained with k-means on the first vectors added).
        quantization: ``"none"`` (float32, ``4*dim`` bytes a vector), ``"int8"`` (faiss 8-bit scalar
            quantizer, ``dim`` bytes, trained on the first vectors added) or ``"binary"`` (sign bits,
            ``dim/8`` bytes, Hamming distance).
        hnsw_m: HNSW neighbours per node (more: better recall, more memory, slower build).
        hnsw_ef_construction: HNSW build-time beam width.
        hnsw_ef_search: default HNSW search beam width; it is raised to the shortlist size if smaller.
        ivf_nlist: IVF list count; default ``sqrt(count)`` of the first batch added, capped so that
            every list gets at least 39 training vectors (faiss' rule of thumb). k-means is trained on
            at most ``64 * nlist`` of those vectors (a random sample), which keeps training fast.
        ivf_nprobe: default number of IVF lists scanned per query.
    """

    dim: int = 64
    index: str = "flat"
    quantization: str = "none"
    hnsw_m: int = 32
    hnsw_ef_construction: int = 80
    hnsw_ef_search: int = 128
    ivf_nlist: int | None = None
    ivf_nprobe: int = 32

    def validate(self, full_dim: int) -> ShortlistConfig:
        """Check every field against the index's full dim; return self."""
        if isinstance(self.dim, bool) or not isinstance(self.dim, (int, np.integer)):
            raise InvalidDimError(f"shortlist dim must be an integer, got {self.dim!r}")
        if not 1 <= self.dim <= full_dim:
            raise InvalidDimError(
                f"shortlist dim={self.dim} is out of range: the vectors have 1..{full_dim} dims"
            )
        if self.index not in SHORTLIST_INDEXES:
            raise InvalidInputError(
                f"unknown shortlist index {self.index!r}; choose one of {list(SHORTLIST_INDEXES)}"
            )
        if self.quantization not in QUANTIZATIONS:
            raise InvalidInputError(
                f"unknown quantization {self.quantization!r}; choose one of {list(QUANTIZATIONS)}"
            )
        if self.quantization == "binary" and self.dim % 8:
            raise InvalidDimError(
                f"binary shortlist codes need a dim that is a multiple of 8, got {self.dim}"
            )
        for name in ("hnsw_m", "hnsw_ef_construction", "hnsw_ef_search", "ivf_nprobe"):
            _check_positive_int(getattr(self, name), name)
        if self.ivf_nlist is not None:
            _check_positive_int(self.ivf_nlist, "ivf_nlist")
        return self

    @property
    def binary(self) -> bool:
        return self.quantization == "binary"


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
    """

    dim: int
    shortlist: ShortlistConfig | None = None
    model: str | None = None
    layers: int | None = None

    def __post_init__(self) -> None:
        _check_positive_int(self.dim, "dim")
        if self.shortlist is None:
            self.shortlist = ShortlistConfig(dim=min(DEFAULT_SHORTLIST_DIM, self.dim))
        self.shortlist.validate(self.dim)
        if self.layers is not None:
            _check_positive_int(self.layers, "layers")
        self._vectors = np.empty((0, self.dim), dtype=np.float32)
        self._ids: list[str] = []
        self._texts: list[str] | None = None  # document texts, if the index stores them
        self._positions: dict[str, int] = {}
        self._index: faiss.Index | faiss.IndexBinary | None = None

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
        **shortlist_options,
    ) -> SearchIndex:
        """An index over precomputed embeddings.

        Args:
            embeddings: ``(count, dim)`` array (normalised here; any float dtype).
            ids: one string id per row (default: ``"0"``, ``"1"``, ...).
            shortlist_dim: leading dims used for the shortlist (default: ``min(64, dim)``).
            model, layers: recorded in the manifest (see the class docs).
            texts: the documents' texts, to store and return with results (optional).
            **shortlist_options: other :class:`ShortlistConfig` fields (``index``, ``quantization``, ...).
        """
        embeddings = _as_matrix(embeddings, "embeddings")
        if embeddings.shape[0] == 0:
            raise InvalidInputError("embeddings is empty: an index needs at least one vector")
        dim = embeddings.shape[1]
        config = ShortlistConfig(dim=_default_dim(shortlist_dim, dim), **shortlist_options)
        index = cls(dim=dim, shortlist=config, model=model, layers=layers)
        index.add(embeddings, ids, texts)
        return index

    @classmethod
    def from_model(
        cls,
        model: EmbeddingModel,
        texts: Sequence[str],
        ids: Sequence[str] | None = None,
        shortlist_dim: int | None = None,
        layers: int | None = None,
        batch_size: int = 32,
        show_progress: bool | None = True,
        store_texts: bool = True,
        **shortlist_options,
    ) -> SearchIndex:
        """Encode ``texts`` with ``model`` (at ``layers``, full dim) and index them.

        Args:
            model: the embedding model; its ``name_or_path`` is recorded for later query encoding.
            texts: the corpus.
            ids: one string id per text (default: ``"0"``, ``"1"``, ...).
            shortlist_dim: leading dims used for the shortlist (default: ``min(64, model.dim)``).
            layers: encode with the first ``layers`` transformer layers (default: all).
            batch_size, show_progress: passed to :meth:`EmbeddingModel.encode`.
            store_texts: keep the texts in the index, so that results (and the CLI) can show them.
            **shortlist_options: other :class:`ShortlistConfig` fields.
        """
        if layers is not None:
            layers = check_layers(layers, model.num_layers)
        config = ShortlistConfig(dim=_default_dim(shortlist_dim, model.dim), **shortlist_options)
        index = cls(dim=model.dim, shortlist=config, model=str(model.name_or_path), layers=layers)
        index.add_texts(
            model, texts, ids, batch_size=batch_size, show_progress=show_progress, store_texts=store_texts
        )
        return index

    def add(
        self, embeddings: np.ndarray, ids: Sequence[str] | None = None, texts: Sequence[str] | None = None
    ) -> None:
        """Add vectors (normalised here) with their ids, and optionally their texts.

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
        embeddings = _as_matrix(embeddings, "embeddings")
        if embeddings.shape[0] == 0:
            raise InvalidInputError("embeddings is empty: nothing to add")
        if embeddings.shape[1] != self.dim:
            raise InvalidInputError(
                f"embeddings have {embeddings.shape[1]} dims but the index holds {self.dim}-dim vectors"
            )
        new_ids = self._check_new_ids(ids, embeddings.shape[0])
        new_texts = self._check_new_texts(texts, embeddings.shape[0])
        vectors = np.ascontiguousarray(truncate_dims(embeddings, None, normalize=True), dtype=np.float32)
        codes = self._shortlist_codes(vectors)
        if self._index is None:
            self._index = self._new_index(codes)
        self._index.add(codes)
        self._vectors = vectors if len(self._ids) == 0 else np.concatenate([self._vectors, vectors])
        start = len(self._ids)
        if new_texts is not None:
            self._texts = self._texts if self._texts is not None else []
            self._texts.extend(new_texts)
        self._ids.extend(new_ids)
        self._positions.update((id_, start + i) for i, id_ in enumerate(new_ids))

    def add_texts(
        self,
        model: EmbeddingModel,
        texts: Sequence[str],
        ids: Sequence[str] | None = None,
        batch_size: int = 32,
        show_progress: bool | None = True,
        store_texts: bool = True,
    ) -> None:
        """Encode ``texts`` with ``model`` (at the index's ``layers``) and add them.

        ``store_texts`` keeps the texts in the index; it only matters for the first add (see :meth:`add`).
        """
        from matryoshka2d.model import check_texts

        self.check_model(model)
        texts = check_texts(texts)
        new_ids = self._check_new_ids(ids, len(texts))  # fail before the (slow) encoding
        emb = model.encode(
            texts, layers=self.layers, batch_size=batch_size, normalize=True, show_progress=show_progress
        )
        keep = self._texts is not None if self._ids else store_texts
        self.add(emb, new_ids, texts if keep else None)

    def check_model(self, model: EmbeddingModel) -> None:
        """Refuse a model that cannot produce vectors comparable with the index's.

        Raises:
            InvalidDimError: the model's embedding size differs from the index's.
            InvalidLayersError: the index was built at more layers than the model has.
        """
        if model.dim != self.dim:
            raise InvalidDimError(
                f"the model {model.name_or_path!r} makes {model.dim}-dim embeddings but the index holds "
                f"{self.dim}-dim vectors (built with {self.model or 'an unknown model'!r}); query with"
                " the model that built the index"
            )
        if self.layers is not None:
            check_layers(self.layers, model.num_layers)

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
        if self._index is None or not self._ids:
            raise InvalidInputError("the index is empty: add documents before searching")
        k = _check_positive_int(k, "k")
        shortlist = _check_positive_int(shortlist, "shortlist")
        n = len(self._ids)
        # Clamp first: a k above the corpus size is clamped with a warning whatever the shortlist size.
        if k > n:
            warnings.warn(
                f"k={k} is larger than the corpus ({n} documents); returning {n} hits", stacklevel=2
            )
            k = n
        shortlist = min(shortlist, n)
        if shortlist < k:
            raise InvalidInputError(
                f"shortlist={shortlist} is smaller than k={k}: the shortlist must hold at least k candidates"
            )
        queries = _as_matrix(queries, "queries", allow_vector=True)
        if queries.shape[0] == 0:
            raise InvalidInputError("queries is empty: nothing to search")
        if queries.shape[1] != self.dim:
            raise InvalidInputError(
                f"queries have {queries.shape[1]} dims but the index holds {self.dim}-dim vectors"
            )
        queries = np.ascontiguousarray(truncate_dims(queries, None, normalize=True), dtype=np.float32)
        self._set_search_params(shortlist, ef_search, nprobe)
        _, candidates = self._index.search(self._shortlist_codes(queries), shortlist)
        return self._rerank(queries, candidates.astype(np.int64, copy=False), k)

    def search_texts(
        self,
        model: EmbeddingModel,
        texts: Sequence[str],
        k: int = 10,
        shortlist: int = 200,
        batch_size: int = 32,
        **search_options,
    ) -> SearchResult:
        """Encode query texts with ``model`` (at the index's ``layers``) and :meth:`search`."""
        self.check_model(model)
        texts = [texts] if isinstance(texts, str) else texts
        queries = model.encode(texts, layers=self.layers, batch_size=batch_size, show_progress=False)
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
            full = np.matmul(gathered, queries[start : start + block, :, None])[..., 0]  # (b, s)
            full[~valid] = -np.inf
            top = (
                np.argpartition(-full, k - 1, axis=1)[:, :k]
                if k < s
                else np.broadcast_to(np.arange(s), full.shape)
            )
            top_scores = np.take_along_axis(full, top, axis=1)
            order = np.argsort(-top_scores, axis=1, kind="stable")
            top = np.take_along_axis(top, order, axis=1)
            block_scores = np.take_along_axis(top_scores, order, axis=1)
            block_indices = np.take_along_axis(cand, top, axis=1)
            block_indices[~np.isfinite(block_scores)] = -1
            scores[start : start + len(cand)] = block_scores
            indices[start : start + len(cand)] = block_indices
        rows = [[i for i in row if i >= 0] for row in indices.tolist()]
        ids = [[self._ids[i] for i in row] for row in rows]
        texts = [[self._texts[i] for i in row] for row in rows] if self._texts is not None else None
        return SearchResult(ids=ids, scores=scores, indices=indices, texts=texts)

    # ------------------------------------------------------------------ shortlist internals
    def _shortlist_codes(self, vectors: np.ndarray) -> np.ndarray:
        prefix = np.ascontiguousarray(
            truncate_dims(vectors, self.shortlist.dim, normalize=True), dtype=np.float32
        )
        if self.shortlist.binary:
            return np.packbits(prefix > 0, axis=1)
        return prefix

    def _new_index(self, training_codes: np.ndarray) -> faiss.Index | faiss.IndexBinary:
        """Create (and train, for IVF and int8) the shortlist index for the first batch of codes."""
        c = self.shortlist
        d = c.dim
        nlist = c.ivf_nlist or _default_nlist(len(training_codes))
        if c.index == "ivf" and len(training_codes) < nlist:
            raise InvalidInputError(
                f"an IVF shortlist with {nlist} lists needs at least {nlist} vectors in the first batch, "
                f"got {len(training_codes)}; add more vectors at once, lower ivf_nlist, or use index='flat'"
            )
        if c.binary:
            factory = {"flat": "BFlat", "hnsw": f"BHNSW{c.hnsw_m}", "ivf": f"BIVF{nlist}"}[c.index]
            index = faiss.index_binary_factory(d, factory)
        else:
            codec = "SQ8" if c.quantization == "int8" else "Flat"
            factory = {
                "flat": codec,
                "hnsw": f"HNSW{c.hnsw_m}" + ("_SQ8" if codec == "SQ8" else ""),
                "ivf": f"IVF{nlist},{codec}",
            }
            index = faiss.index_factory(d, factory[c.index], faiss.METRIC_INNER_PRODUCT)
        if c.index == "hnsw":
            index.hnsw.efConstruction = c.hnsw_ef_construction
        if c.index == "ivf":
            if not c.binary:
                faiss.extract_index_ivf(index).cp.spherical = True  # the prefixes are unit vectors
            if c.ivf_nlist is None:
                self.shortlist = _replace(c, ivf_nlist=nlist)
        if not index.is_trained:
            sample = training_codes
            limit = max(64 * nlist, 10_000)  # IVF k-means, and the int8 ranges, need no more than this
            if len(sample) > limit:
                rng = np.random.default_rng(0)
                sample = sample[np.sort(rng.choice(len(sample), limit, replace=False))]
            index.train(sample)
        return index

    def _set_search_params(self, shortlist: int, ef_search: int | None, nprobe: int | None) -> None:
        c = self.shortlist
        if c.index == "hnsw":
            ef = _check_positive_int(ef_search, "ef_search") if ef_search is not None else c.hnsw_ef_search
            _downcast(self._index).hnsw.efSearch = max(ef, shortlist)
        elif c.index == "ivf":
            probe = _check_positive_int(nprobe, "nprobe") if nprobe is not None else c.ivf_nprobe
            ivf = self._index if c.binary else faiss.extract_index_ivf(self._index)
            ivf.nprobe = min(probe, ivf.nlist)

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
        shortlist = 0
        if self._index is not None:
            serialize = faiss.serialize_index_binary if self.shortlist.binary else faiss.serialize_index
            shortlist = int(serialize(self._index).nbytes)
        return {"full": int(self._vectors.nbytes), "shortlist": shortlist}

    def manifest(self) -> dict:
        """The metadata written to ``manifest.json``."""
        from matryoshka2d import __version__

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
            "shortlist": asdict(self.shortlist),
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

        Args:
            path: the output folder: new or empty, or an index written by matryoshka2d (replaced only with
                ``overwrite=True``); anything else is refused
                (:func:`~matryoshka2d.persistence.check_output_folder`).
            overwrite: replace an index previously saved at ``path``.
            inputs: paths the caller read (the corpus file, the model folder); never written over,
                into or above.

        Raises:
            OutputPathError: ``path`` may not be written (the message says what is there).
        """
        if self._index is None:
            raise InvalidInputError("the index is empty: nothing to save")
        path = Path(path)
        with atomic_directory(path, "search-index", overwrite=overwrite, inputs=inputs) as tmp:
            np.save(tmp / VECTORS_FILE, self._vectors)
            (tmp / IDS_FILE).write_text(json.dumps(self._ids, ensure_ascii=False), encoding="utf-8")
            if self._texts is not None:
                (tmp / TEXTS_FILE).write_text(json.dumps(self._texts, ensure_ascii=False), encoding="utf-8")
            write = faiss.write_index_binary if self.shortlist.binary else faiss.write_index
            write(self._index, str(tmp / SHORTLIST_FILE))
            (tmp / MANIFEST_FILE).write_text(json.dumps(self.manifest(), indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(
        cls, path: str | os.PathLike, model: EmbeddingModel | None = None, mmap: bool = False
    ) -> SearchIndex:
        """Read an index folder written by :meth:`save`.

        Args:
            path: the folder.
            model: if given, checked against the index (same embedding size; enough layers).
            mmap: memory-map the full vectors instead of reading them into memory (they are then
                read-only until more documents are added).

        Raises:
            DataFileError: the folder is missing, incomplete, of another format or an unsupported
                format version, or its files disagree with each other.
            InvalidDimError: ``model`` makes embeddings of another size.
        """
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise DataFileError(f"{path} is a file, not a search index folder (written by 'm2d index build')")
        if not path.is_dir():
            raise DataFileError(f"search index folder not found: {path}")
        manifest = _read_json(path, MANIFEST_FILE)
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise DataFileError(f"{path / MANIFEST_FILE}: not a matryoshka2d search index manifest")
        version = manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise DataFileError(
                f"{path}: search index format version {version!r} is not supported (this matryoshka2d reads "
                f"version {FORMAT_VERSION})"
            )
        try:
            config = ShortlistConfig(**manifest["shortlist"])
            layers, dim, count = manifest.get("layers"), int(manifest["dim"]), int(manifest["count"])
            index = cls(dim=dim, shortlist=config, model=manifest.get("model"), layers=layers)
        except (KeyError, TypeError, ValueError) as e:  # InvalidInputError is a ValueError too
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
            read = faiss.read_index_binary if config.binary else faiss.read_index
            shortlist_index = read(str(_existing(path, SHORTLIST_FILE)))
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
        index._positions = {id_: i for i, id_ in enumerate(ids)}
        if model is not None:
            index.check_model(model)
        return index


# ---------------------------------------------------------------------- helpers
def _existing(folder: Path, name: str) -> Path:
    if not (folder / name).is_file():
        raise DataFileError(f"{folder} is not a complete search index: {name} is missing")
    return folder / name


def _read_json(folder: Path, name: str):
    try:
        return json.loads(_existing(folder, name).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataFileError(f"cannot read {folder / name}: {e}") from None


def _check_positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InvalidInputError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


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
    return matrix


def _default_nlist(count: int) -> int:
    """``sqrt(count)`` lists, at most ``count / 39`` (so k-means sees 39 points a list), at least 1."""
    return max(1, min(round(math.sqrt(count)), count // 39))


def _downcast(index):
    return (
        faiss.downcast_IndexBinary(index)
        if isinstance(index, faiss.IndexBinary)
        else faiss.downcast_index(index)
    )


def _replace(config: ShortlistConfig, **changes) -> ShortlistConfig:
    return ShortlistConfig(**{**asdict(config), **changes})


def _default_dim(shortlist_dim: int | None, dim: int) -> int:
    return min(DEFAULT_SHORTLIST_DIM, dim) if shortlist_dim is None else shortlist_dim
