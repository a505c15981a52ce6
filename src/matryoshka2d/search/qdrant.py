"""Shortlist-and-rerank inside Qdrant: a short and a full named vector, one Query API call.

:class:`QdrantIndex` keeps the embedded default's two-stage search (:class:`~matryoshka2d.search.SearchIndex`)
but lets a Qdrant collection hold the vectors. Every point has two named vectors:

* ``short``: the first ``d`` dims, re-normalised (optionally compressed by Qdrant's scalar int8 or
  binary quantisation), searched for the shortlist;
* ``full``: all dims, never indexed (``hnsw m=0``), used only to rescore the shortlist.

A search is one Query API request per query, built from Qdrant's own multi-stage query:
``prefetch=Prefetch(query=short, using="short", limit=shortlist)`` followed by ``query=full,
using="full"``, so Qdrant takes ``shortlist`` candidates by the short vector and returns the best ``k``
of them by exact cosine similarity on the full vector, the same as ``SearchIndex.search``.

Where the collection lives (give exactly one):

* ``url``: a Qdrant server or cluster (``http://host:6333``; ``api_key`` for Qdrant Cloud). Upserts are
  batched and retried with exponential backoff on transient errors (timeouts, connection errors,
  HTTP 429/5xx, gRPC UNAVAILABLE); after the server's optimiser has built its segments, quantised and
  HNSW search are served by the real engine.
* ``path``: qdrant-client's embedded local mode (a folder, or ``":memory:"``): the same API in pure
  Python, for tests and small corpora. It ignores HNSW and quantisation settings: the shortlist is
  always an exact float scan of the short vectors.
* ``edge_path``: `qdrant-edge-py`, Qdrant's Rust engine embedded in the process (no server). A folder
  holds one shard per collection (``edge_path/COLLECTION/shard``) and a ``matryoshka2d.json`` marker.
  Uploads end with the engine's optimiser, so quantisation and HNSW are in force for every search.
* ``client``: an existing ``qdrant_client.QdrantClient``.

Ids: Qdrant point ids must be integers or UUIDs, so each string id is mapped to ``uuid5(NAMESPACE, id)``
(:func:`point_id`, deterministic: uploading the same id again replaces the point, which also makes a
retried or re-run upload idempotent). The original id, and the text if given, are kept in the payload
(``{"id": ..., "text": ...}``) and returned with hits.

The model that made the vectors (name, layers, dim) and the shortlist settings are recorded in the
collection's ``metadata`` (Qdrant servers that support collection metadata and local mode) or, for
qdrant-edge, in the ``matryoshka2d.json`` marker. Opening or uploading into a collection whose vector
sizes or distance differ from the expected ones raises a :class:`~matryoshka2d.errors.Matryoshka2dError`
naming both.

Example:
    >>> index = QdrantIndex.create("docs", url="http://localhost:6333", dim=384, shortlist_dim=64,
    ...                            quantization="binary", model="sentence-transformers/all-MiniLM-L6-v2")
    >>> index.upload(embeddings, ids=doc_ids, texts=doc_texts)
    >>> hits = index.search(query_vectors, k=10, shortlist=200)
    >>> hits.ids[0], hits.scores[0], hits.texts[0]
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
import uuid
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from matryoshka2d.encoder import prompt_option
from matryoshka2d.errors import (
    DataFileError,
    InvalidDimError,
    InvalidInputError,
    Matryoshka2dError,
    first_line,
)
from matryoshka2d.search.fingerprint import MIN_PROBE_COSINE, ModelFingerprint, ModelMismatchError
from matryoshka2d.search.index import (
    DEFAULT_SHORTLIST_DIM,
    SearchIndex,
    SearchResult,
    ShortlistConfig,
    _check_positive_int,
    requested_prompt,
    rows_of_width,
)
from matryoshka2d.truncation import check_layers, truncate_dims
from matryoshka2d.validation import check_ordered


def _prompt_option(model: object, prompt_name: str | None, prompt: str | None) -> dict:
    """:func:`~matryoshka2d.encoder.prompt_option` of the prompt a call asks for (``{}``: none asked)."""
    return prompt_option(requested_prompt(model, prompt_name, prompt))


if TYPE_CHECKING:  # pragma: no cover
    from matryoshka2d.model import EmbeddingModel

SHORT_VECTOR = "short"
FULL_VECTOR = "full"
QDRANT_SHORTLIST_INDEXES = ("flat", "hnsw")
DEFAULT_COLLECTION = "matryoshka2d"
METADATA_KEY = "matryoshka2d"
METADATA_FORMAT = "matryoshka2d-qdrant-collection"
METADATA_VERSION = 1
EDGE_MARKER_FILE = "matryoshka2d.json"
EDGE_SHARD_DIR = "shard"
# Fixed namespace of the string-id -> UUID mapping; changing it would orphan every existing collection.
ID_NAMESPACE = uuid.UUID("0b6e4f2c-5d0a-5e57-9c2b-6d61747279a2")

_RETRY_STATUS = {408, 429, 500, 502, 503, 504}


class QdrantBackendError(Matryoshka2dError):
    """A Qdrant collection that is missing or incompatible, or a server that keeps failing."""


def point_id(doc_id: str) -> str:
    """The Qdrant point id (a UUID string) of a document id: ``uuid5(ID_NAMESPACE, doc_id)``."""
    return str(uuid.uuid5(ID_NAMESPACE, doc_id))


@dataclass(frozen=True)
class RetryPolicy:
    """How failed requests to a Qdrant server are retried.

    Args:
        retries: extra attempts after the first (0 = no retry).
        backoff: seconds before the first retry; doubled each retry (with +-25% jitter).
        max_backoff: cap on one wait, in seconds.
    """

    retries: int = 4
    backoff: float = 0.5
    max_backoff: float = 8.0

    def delays(self) -> Iterator[float]:
        """The waits before each retry."""
        for attempt in range(self.retries):
            base = min(self.backoff * 2**attempt, self.max_backoff)
            yield base * random.uniform(0.75, 1.25)


# ---------------------------------------------------------------------- backends
class _Backend:
    """What :class:`QdrantIndex` needs from a place that stores a collection."""

    name = "qdrant"
    exact_float_only = False  # local mode: no quantisation or HNSW

    def exists(self) -> bool:
        raise NotImplementedError

    def create(self, dim: int, shortlist: ShortlistConfig, metadata: dict) -> None:
        raise NotImplementedError

    def describe(self) -> tuple[dict[str, tuple[int, str]], dict | None]:
        """``({vector name: (size, distance)}, matryoshka2d metadata or None)``."""
        raise NotImplementedError

    def delete(self) -> None:
        raise NotImplementedError

    def upsert(self, ids: list[str], short: np.ndarray, full: np.ndarray, payloads: list[dict]) -> None:
        raise NotImplementedError

    def finish_upload(self) -> None:
        """Make the uploaded points searchable with the collection's index and quantisation settings."""

    def query(
        self, short: np.ndarray, full: np.ndarray, k: int, shortlist: int, params: dict
    ) -> list[list[tuple[float, dict]]]:
        """For each query row: ``[(score, payload), ...]`` best first."""
        raise NotImplementedError

    def count(self) -> int:
        raise NotImplementedError

    def present(self, point_ids: list[str]) -> set[str]:
        """Which of ``point_ids`` the collection holds."""
        raise NotImplementedError

    def transient(self, error: BaseException) -> bool:
        return False

    def close(self) -> None:
        pass


def _import_qdrant_client():
    try:
        import qdrant_client
        from qdrant_client import models
    except ImportError:
        raise QdrantBackendError(
            "the Qdrant backend needs qdrant-client: pip install 'matryoshka2d[qdrant]'"
        ) from None
    return qdrant_client, models


class _ClientBackend(_Backend):
    """A collection reached through ``qdrant_client.QdrantClient`` (server, cluster or local mode)."""

    def __init__(self, client, collection: str, local: bool, owns_client: bool) -> None:
        _, self.models = _import_qdrant_client()
        self.client = client
        self.collection = collection
        self.local = local
        self.exact_float_only = local
        self.owns_client = owns_client
        self.name = "qdrant local mode" if local else "qdrant server"
        # Local mode is a pure-Python reference implementation without its own locking.
        self._lock = threading.RLock() if local else None

    def _call(self, fn: Callable, *args, **kwargs):
        if self._lock is None:
            return fn(*args, **kwargs)
        with self._lock:
            return fn(*args, **kwargs)

    def exists(self) -> bool:
        return bool(self._call(self.client.collection_exists, self.collection))

    def create(self, dim: int, shortlist: ShortlistConfig, metadata: dict) -> None:
        m = self.models
        quantization = None
        if shortlist.quantization == "int8":
            quantization = m.ScalarQuantization(
                scalar=m.ScalarQuantizationConfig(type=m.ScalarType.INT8, always_ram=True)
            )
        elif shortlist.quantization == "binary":
            quantization = m.BinaryQuantization(binary=m.BinaryQuantizationConfig(always_ram=True))
        short_hnsw = (
            m.HnswConfigDiff(m=shortlist.hnsw_m, ef_construct=shortlist.hnsw_ef_construction)
            if shortlist.index == "hnsw"
            else m.HnswConfigDiff(m=0)
        )
        vectors = {
            SHORT_VECTOR: m.VectorParams(
                size=shortlist.dim,
                distance=m.Distance.COSINE,
                hnsw_config=short_hnsw,
                quantization_config=quantization,
            ),
            FULL_VECTOR: m.VectorParams(
                size=dim, distance=m.Distance.COSINE, hnsw_config=m.HnswConfigDiff(m=0)
            ),
        }
        self._call(
            self.client.create_collection,
            self.collection,
            vectors_config=vectors,
            metadata={METADATA_KEY: metadata},
        )

    def describe(self) -> tuple[dict[str, tuple[int, str]], dict | None]:
        info = self._call(self.client.get_collection, self.collection)
        vectors = info.config.params.vectors
        sizes: dict[str, tuple[int, str]] = {}
        if isinstance(vectors, dict):
            for name, params in vectors.items():
                sizes[name] = (int(params.size), _distance_name(params.distance))
        elif vectors is not None:  # one unnamed vector
            sizes[""] = (int(vectors.size), _distance_name(vectors.distance))
        metadata = getattr(info.config, "metadata", None) or {}
        marker = metadata.get(METADATA_KEY) if isinstance(metadata, dict) else None
        return sizes, marker if isinstance(marker, dict) else None

    def delete(self) -> None:
        self._call(self.client.delete_collection, self.collection)

    def upsert(self, ids: list[str], short: np.ndarray, full: np.ndarray, payloads: list[dict]) -> None:
        batch = self.models.Batch(
            ids=ids, vectors={SHORT_VECTOR: short.tolist(), FULL_VECTOR: full.tolist()}, payloads=payloads
        )
        self._call(self.client.upsert, self.collection, points=batch, wait=True)

    def finish_upload(self) -> None:
        if self.local:
            return
        # A server indexes in the background; wait (bounded) until it reports the collection green.
        deadline = time.monotonic() + float(os.environ.get("M2D_QDRANT_INDEX_WAIT", "600"))
        while time.monotonic() < deadline:
            status = self.client.get_collection(self.collection).status
            if str(getattr(status, "value", status)).lower() == "green":
                return
            time.sleep(1.0)
        warnings.warn(
            f"collection {self.collection!r} is still being indexed by the server; searches are exact "
            "scans of the unindexed part until it finishes",
            stacklevel=3,
        )

    def query(
        self, short: np.ndarray, full: np.ndarray, k: int, shortlist: int, params: dict
    ) -> list[list[tuple[float, dict]]]:
        m = self.models
        search_params = m.SearchParams(
            hnsw_ef=params.get("hnsw_ef"),
            exact=params["exact"],
            quantization=m.QuantizationSearchParams(rescore=False),
        )
        requests = [
            m.QueryRequest(
                prefetch=m.Prefetch(
                    query=s.tolist(), using=SHORT_VECTOR, limit=shortlist, params=search_params
                ),
                query=f.tolist(),
                using=FULL_VECTOR,
                limit=k,
                with_payload=True,
            )
            for s, f in zip(short, full, strict=True)
        ]
        responses = self._call(self.client.query_batch_points, self.collection, requests=requests)
        return [[(float(p.score), p.payload or {}) for p in r.points] for r in responses]

    def count(self) -> int:
        return int(self._call(self.client.count, self.collection, exact=True).count)

    def present(self, point_ids: list[str]) -> set[str]:
        found = self._call(
            self.client.retrieve, self.collection, ids=point_ids, with_payload=False, with_vectors=False
        )
        return {str(record.id) for record in found}

    def transient(self, error: BaseException) -> bool:
        from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

        if isinstance(error, UnexpectedResponse):
            return error.status_code in _RETRY_STATUS
        if isinstance(error, (ResponseHandlingException, ConnectionError, TimeoutError)):
            return True
        try:
            import grpc
        except ImportError:  # pragma: no cover - grpcio is a qdrant-client dependency
            return False
        if isinstance(error, grpc.RpcError):
            code = error.code() if callable(getattr(error, "code", None)) else None
            return code in (
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.DEADLINE_EXCEEDED,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
            )
        return False

    def close(self) -> None:
        if self.owns_client:
            self.client.close()


class _EdgeBackend(_Backend):
    """A collection in qdrant-edge: Qdrant's engine in this process; one shard folder per collection."""

    name = "qdrant-edge"

    def __init__(self, root: str | os.PathLike, collection: str) -> None:
        try:
            import qdrant_edge
        except ImportError:
            raise QdrantBackendError(
                "the embedded Qdrant engine needs qdrant-edge-py: pip install 'matryoshka2d[qdrant]'"
            ) from None
        _check_collection_name(collection)
        self.qe = qdrant_edge
        self.folder = Path(root) / collection
        self.collection = collection
        self.shard = None

    @property
    def marker(self) -> Path:
        return self.folder / EDGE_MARKER_FILE

    def exists(self) -> bool:
        return self.marker.is_file() or (self.folder / EDGE_SHARD_DIR).exists()

    def _config(self, dim: int, shortlist: ShortlistConfig):
        qe = self.qe
        quantization = None
        if shortlist.quantization == "int8":
            quantization = qe.ScalarQuantizationConfig(type=qe.ScalarType.Int8, always_ram=True)
        elif shortlist.quantization == "binary":
            quantization = qe.BinaryQuantizationConfig(always_ram=True)
        hnsw = shortlist.hnsw_m if shortlist.index == "hnsw" else 0
        return qe.EdgeConfig(
            vectors={
                SHORT_VECTOR: qe.EdgeVectorParams(
                    size=shortlist.dim,
                    distance=qe.Distance.Cosine,
                    quantization_config=quantization,
                    hnsw_config=qe.HnswIndexConfig(
                        m=hnsw, ef_construct=shortlist.hnsw_ef_construction, full_scan_threshold=10_000
                    ),
                ),
                FULL_VECTOR: qe.EdgeVectorParams(
                    size=dim,
                    distance=qe.Distance.Cosine,
                    hnsw_config=qe.HnswIndexConfig(m=0, ef_construct=100, full_scan_threshold=10_000),
                ),
            },
            # optimize() at the end of an upload then always builds the HNSW graph and quantised codes,
            # however small the collection (the engine's default waits for ~10 MB of vectors).
            optimizers=qe.EdgeOptimizersConfig(indexing_threshold=1),
        )

    def create(self, dim: int, shortlist: ShortlistConfig, metadata: dict) -> None:
        from matryoshka2d.persistence import atomic_write

        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            self.shard = self.qe.EdgeShard.create(
                str(self.folder / EDGE_SHARD_DIR), self._config(dim, shortlist)
            )
        except Exception as e:  # qdrant-edge raises plain Exception
            raise QdrantBackendError(f"cannot create a qdrant-edge shard in {self.folder}: {e}") from None
        marker = {"vectors": {SHORT_VECTOR: shortlist.dim, FULL_VECTOR: dim}, METADATA_KEY: metadata}
        atomic_write(self.marker, json.dumps(marker, indent=2) + "\n", "qdrant-edge marker", overwrite=True)

    def _read_marker(self) -> dict:
        try:
            marker = json.loads(self.marker.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise QdrantBackendError(
                f"{self.folder} is not a matryoshka2d qdrant-edge collection ({EDGE_MARKER_FILE} is missing)"
            ) from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataFileError(f"cannot read {self.marker}: {e}") from None
        if not isinstance(marker, dict) or not isinstance(marker.get("vectors"), dict):
            raise DataFileError(f"{self.marker}: not a matryoshka2d qdrant-edge marker")
        return marker

    def describe(self) -> tuple[dict[str, tuple[int, str]], dict | None]:
        marker = self._read_marker()
        try:
            sizes = {name: (int(size), "cosine") for name, size in marker["vectors"].items()}
        except (TypeError, ValueError) as e:
            raise DataFileError(f"{self.marker}: malformed vector sizes ({e})") from None
        meta = marker.get(METADATA_KEY)
        return sizes, meta if isinstance(meta, dict) else None

    def open(self, dim: int, shortlist: ShortlistConfig) -> None:
        """Load the shard; the engine itself checks that its vectors match ``dim`` and ``shortlist``."""
        if self.shard is not None:
            return
        try:
            self.shard = self.qe.EdgeShard.load(
                str(self.folder / EDGE_SHARD_DIR), self._config(dim, shortlist)
            )
        except Exception as e:  # qdrant-edge raises plain Exception
            raise QdrantBackendError(f"cannot open the qdrant-edge shard in {self.folder}: {e}") from None

    def delete(self) -> None:
        import shutil

        self.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    def upsert(self, ids: list[str], short: np.ndarray, full: np.ndarray, payloads: list[dict]) -> None:
        qe = self.qe
        points = [
            qe.Point(id=i, vector={SHORT_VECTOR: s, FULL_VECTOR: f}, payload=p)
            for i, s, f, p in zip(ids, short.tolist(), full.tolist(), payloads, strict=True)
        ]
        self.shard.update(qe.UpdateOperation.upsert_points(points))

    def finish_upload(self) -> None:
        self.shard.optimize()  # builds the HNSW graph and the quantised codes; blocks until done
        self.shard.flush()

    def query(
        self, short: np.ndarray, full: np.ndarray, k: int, shortlist: int, params: dict
    ) -> list[list[tuple[float, dict]]]:
        qe = self.qe
        search_params = qe.SearchParams(
            hnsw_ef=params.get("hnsw_ef"),
            exact=params["exact"],
            quantization=qe.QuantizationSearchParams(rescore=False),
        )
        requests = [
            qe.QueryRequest(
                limit=k,
                query=qe.Query.Nearest(f, using=FULL_VECTOR),
                prefetches=[
                    qe.Prefetch(
                        limit=shortlist, query=qe.Query.Nearest(s, using=SHORT_VECTOR), params=search_params
                    )
                ],
                with_payload=True,
            )
            for s, f in zip(short.tolist(), full.tolist(), strict=True)
        ]
        responses = self.shard.query_batch(qe.QueryBatchRequest(requests))
        return [[(float(p.score), p.payload or {}) for p in r] for r in responses]

    def count(self) -> int:
        return int(self.shard.info().points_count)

    def present(self, point_ids: list[str]) -> set[str]:
        return {str(record.id) for record in self.shard.retrieve(point_ids, False, False)}

    def close(self) -> None:
        if self.shard is not None:
            self.shard.flush()
            self.shard.close()
            self.shard = None


def _distance_name(distance: Any) -> str:
    return str(getattr(distance, "value", distance)).lower()


def _check_collection_name(name: object) -> str:
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name:
        raise InvalidInputError(f"collection name must be a non-empty name without slashes, got {name!r}")
    return name


def _connect(
    collection: str,
    url: str | None,
    path: str | os.PathLike | None,
    edge_path: str | os.PathLike | None,
    client: Any,
    api_key: str | None,
    timeout: float | None,
) -> _Backend:
    given = [
        name
        for name, value in (("url", url), ("path", path), ("edge_path", edge_path), ("client", client))
        if value is not None
    ]
    if len(given) != 1:
        raise InvalidInputError(
            "give exactly one place for the Qdrant collection: url= (server or cluster), path= "
            f"(qdrant-client local mode), edge_path= (qdrant-edge) or client=; got {given or 'none'}"
        )
    _check_collection_name(collection)
    if edge_path is not None:
        return _EdgeBackend(edge_path, collection)
    qdrant_client, _ = _import_qdrant_client()
    if client is not None:
        local = type(getattr(client, "_client", None)).__name__ == "QdrantLocal"
        return _ClientBackend(client, collection, local=local, owns_client=False)
    if url is not None:
        kwargs = {"url": url, "api_key": api_key}
        if timeout is not None:
            kwargs["timeout"] = int(timeout)
        return _ClientBackend(qdrant_client.QdrantClient(**kwargs), collection, local=False, owns_client=True)
    location = str(path)
    try:
        new = (
            qdrant_client.QdrantClient(location=":memory:")
            if location == ":memory:"
            else qdrant_client.QdrantClient(path=location)
        )
    except RuntimeError as e:  # another process holds the local-mode folder
        raise QdrantBackendError(f"cannot open the Qdrant local-mode folder {location}: {e}") from None
    return _ClientBackend(new, collection, local=True, owns_client=True)


# ---------------------------------------------------------------------- the index
class QdrantIndex:
    """A Qdrant collection searched shortlist-first (short vector) and rescored with the full vector.

    Create one with :meth:`create` (new or existing compatible collection), :meth:`open` (existing) or
    :meth:`from_search_index`; fill it with :meth:`upload`, :meth:`upload_texts` or
    :meth:`upload_search_index`; query with :meth:`search` or :meth:`search_texts`. Use it as a context
    manager (or call :meth:`close`) to release the connection or the embedded engine.

    Searching is thread-safe (local mode is serialised by a lock; servers and qdrant-edge answer
    concurrent queries).
    """

    def __init__(
        self,
        backend: _Backend,
        dim: int,
        shortlist: ShortlistConfig,
        model: str | None = None,
        layers: int | None = None,
        retry: RetryPolicy | None = None,
        fingerprint: ModelFingerprint | None = None,
    ) -> None:
        self._backend = backend
        self.fingerprint = fingerprint
        # models that passed the fingerprint -> their rotations_version then (changed: checked again)
        self._checked_models: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.dim = dim
        self.shortlist = shortlist
        self.model = model
        self.layers = layers
        self.retry = retry or RetryPolicy()
        self._sleep: Callable[[float], None] = time.sleep

    # ------------------------------------------------------------------ opening
    @classmethod
    def create(
        cls,
        collection: str = DEFAULT_COLLECTION,
        *,
        dim: int,
        shortlist_dim: int | None = None,
        index: str = "flat",
        quantization: str = "none",
        model: str | None = None,
        layers: int | None = None,
        fingerprint: ModelFingerprint | None = None,
        url: str | None = None,
        path: str | os.PathLike | None = None,
        edge_path: str | os.PathLike | None = None,
        client: Any = None,
        api_key: str | None = None,
        timeout: float | None = None,
        recreate: bool = False,
        retry: RetryPolicy | None = None,
        **shortlist_options,
    ) -> QdrantIndex:
        """Create a collection, or reuse an existing one whose settings match.

        Args:
            collection: collection name.
            dim: full embedding size.
            shortlist_dim: dims of the short vector (default ``min(64, dim)``).
            index: ``"flat"`` (exact scan of the short vectors, or of their codes) or ``"hnsw"`` (Qdrant's
                graph index; approximate).
            quantization: ``"none"``, ``"int8"`` (Qdrant scalar quantisation) or ``"binary"`` (Qdrant
                binary quantisation: one bit a dim).
            model, layers: recorded in the collection metadata (the CLI encodes queries with them).
            fingerprint: the producing model's fingerprint (``ModelFingerprint.of(model, layers)``),
                recorded so that a different model is refused when it adds documents or queries.
            url, path, edge_path, client: where the collection lives (exactly one; see the module docs).
            api_key, timeout: for ``url``.
            recreate: delete an existing collection of that name first.
            retry: how server requests are retried (default :class:`RetryPolicy`).
            **shortlist_options: ``hnsw_m``, ``hnsw_ef_construction``, ``hnsw_ef_search``.

        Raises:
            InvalidDimError: an existing collection has other vector sizes (both are named).
            QdrantBackendError: an existing collection has another distance, other vector names or other
                shortlist settings, or Qdrant cannot be reached.
        """
        _check_positive_int(dim, "dim")
        if layers is not None:
            _check_positive_int(layers, "layers")
        shortlist = _qdrant_shortlist(
            ShortlistConfig(
                dim=min(DEFAULT_SHORTLIST_DIM, dim) if shortlist_dim is None else shortlist_dim,
                index=index,
                quantization=quantization,
                **shortlist_options,
            ),
            dim,
        )
        backend = _connect(collection, url, path, edge_path, client, api_key, timeout)
        self = cls(backend, dim, shortlist, model=model, layers=layers, retry=retry, fingerprint=fingerprint)
        try:
            exists = self._retrying(backend.exists, "checking the collection")
            if exists and recreate:
                self._retrying(backend.delete, "deleting the collection")
                exists = False
            if exists:
                stored = self._check_existing(expected_dim=dim, expected_shortlist=shortlist)
                if layers is not None and stored.get("layers") not in (None, layers):
                    raise InvalidInputError(
                        f"{backend.name} collection {collection!r} holds embeddings of "
                        f"{stored['layers']} layers, not {layers}: vectors of two layer counts do not "
                        "compare; use its layer count, another collection name, or recreate it"
                    )
                self.model = self.model or stored.get("model")
                self.layers = self.layers if self.layers is not None else stored.get("layers")
                stored_fingerprint = self._stored_fingerprint(stored)
                if stored_fingerprint is not None:
                    if fingerprint is not None and stored_fingerprint.agreement(fingerprint.embeddings) < (
                        MIN_PROBE_COSINE
                    ):
                        raise ModelMismatchError(
                            f"{backend.name} collection {collection!r} was built with another model "
                            f"({stored.get('model')!r}) than {fingerprint.model!r}: their embeddings of the "
                            "same probe sentences differ; use another collection name or recreate it"
                        )
                    self.fingerprint = stored_fingerprint
                if isinstance(backend, _EdgeBackend):
                    backend.open(dim, shortlist)
            else:
                self._retrying(
                    lambda: backend.create(dim, shortlist, self.metadata()), "creating the collection"
                )
        except BaseException:
            backend.close()
            raise
        return self

    @classmethod
    def open(
        cls,
        collection: str = DEFAULT_COLLECTION,
        *,
        url: str | None = None,
        path: str | os.PathLike | None = None,
        edge_path: str | os.PathLike | None = None,
        client: Any = None,
        api_key: str | None = None,
        timeout: float | None = None,
        model: EmbeddingModel | None = None,
        retry: RetryPolicy | None = None,
    ) -> QdrantIndex:
        """Open an existing collection (made by :meth:`create`, or any with ``short``/``full`` vectors).

        Args:
            collection: collection name.
            url, path, edge_path, client, api_key, timeout: see :meth:`create`.
            model: if given, checked against the collection (same embedding size).
            retry: see :meth:`create`.

        Raises:
            QdrantBackendError: the collection does not exist or is not a short/full cosine collection.
            InvalidDimError: ``model`` makes embeddings of another size than the ``full`` vectors.
        """
        backend = _connect(collection, url, path, edge_path, client, api_key, timeout)
        self = cls(backend, 1, ShortlistConfig(dim=1), retry=retry)
        try:
            if not self._retrying(backend.exists, "checking the collection"):
                raise QdrantBackendError(f"{backend.name}: collection {collection!r} does not exist")
            stored = self._check_existing(expected_dim=None, expected_shortlist=None)
            if isinstance(backend, _EdgeBackend):
                backend.open(self.dim, self.shortlist)
            self.model, self.layers = stored.get("model"), stored.get("layers")
            self.fingerprint = self._stored_fingerprint(stored)
            if model is not None:
                self.check_model(model)
        except BaseException:
            backend.close()
            raise
        return self

    @classmethod
    def from_search_index(
        cls,
        search_index: SearchIndex,
        collection: str = DEFAULT_COLLECTION,
        *,
        batch_size: int = 256,
        show_progress: bool | None = True,
        **create_options,
    ) -> QdrantIndex:
        """A collection holding a :class:`SearchIndex`'s vectors, ids, texts and shortlist settings.

        Args:
            search_index: the faiss index to copy (an IVF shortlist becomes ``flat``: Qdrant has no IVF;
                pass ``index=...`` to choose).
            collection: collection name.
            batch_size, show_progress: see :meth:`upload`.
            **create_options: the place (``url``/``path``/``edge_path``/``client``) and any
                :meth:`create` option to override the index's settings.
        """
        c = search_index.shortlist
        options = {
            "dim": search_index.dim,
            "shortlist_dim": c.dim,
            "index": c.index if c.index in QDRANT_SHORTLIST_INDEXES else "flat",
            "quantization": c.quantization,
            "model": search_index.model,
            "layers": search_index.layers,
            "fingerprint": getattr(search_index, "fingerprint", None),
            "hnsw_m": c.hnsw_m,
            "hnsw_ef_construction": c.hnsw_ef_construction,
            "hnsw_ef_search": c.hnsw_ef_search,
        }
        options.update(create_options)
        self = cls.create(collection, **options)
        try:
            self.upload_search_index(search_index, batch_size=batch_size, show_progress=show_progress)
        except BaseException:
            self.close()
            raise
        return self

    @classmethod
    def from_corpus(
        cls,
        folder: str | os.PathLike,
        collection: str = DEFAULT_COLLECTION,
        *,
        layers: int | None = None,
        batch_size: int = 256,
        show_progress: bool | None = True,
        check_model: object | None = None,
        **create_options,
    ) -> QdrantIndex:
        """A collection holding an ``m2d embed-corpus`` output (see :meth:`upload_corpus`).

        The model name, layer count and full dim come from the folder's manifest: the cell of the model's
        full dim at ``layers`` (default: the deepest layer count written). So does the model's fingerprint
        at that layer count (:class:`~matryoshka2d.search.fingerprint.ModelFingerprint`; outputs written
        before embed-corpus recorded it have none, and only the dim is checked): an existing collection
        built with another model is refused, and a new one records it, as :meth:`create` with
        ``fingerprint``.

        Args:
            folder: a finished ``embed-corpus`` output folder.
            collection: collection name.
            layers: which layer count's vectors to upload.
            batch_size, show_progress: see :meth:`upload`.
            check_model: the model the caller expects made the vectors (an encoder): refused
                (:class:`~matryoshka2d.search.fingerprint.ModelMismatchError`) if the folder records
                another one; recorded as the collection's model fingerprint if the folder records none.
            **create_options: the place (``url``/``path``/``edge_path``/``client``) and :meth:`create`
                options (``shortlist_dim``, ``index``, ``quantization``, ...).
        """
        from matryoshka2d.corpus import read_manifest

        manifest = read_manifest(folder)
        model = manifest.get("model") or {}
        dim = model.get("dim")
        deepest = max(
            (int(c["layers"]) for c in manifest.get("cells", []) if c.get("dim") == dim), default=None
        )
        if not isinstance(dim, int) or deepest is None:
            raise InvalidInputError(
                f"{folder}: the embed-corpus output has no cell of the model's full dim ({dim!r}); "
                "run embed-corpus with --dims including the model's dim"
            )
        layers = layers if layers is not None else deepest
        options = {"dim": dim, "model": model.get("name"), "layers": layers}
        recorded = _corpus_fingerprint(manifest, folder, layers)
        if recorded is not None:
            options["fingerprint"] = recorded
        if check_model is not None:
            if "fingerprint" in options:
                options["fingerprint"].check(
                    check_model, model.get("name"), f"the embed-corpus output {folder}"
                )
            else:
                options["fingerprint"] = ModelFingerprint.of(check_model, layers)
        options.update(create_options)
        self = cls.create(collection, **options)
        try:
            self.upload_corpus(folder, batch_size=batch_size, show_progress=show_progress)
        except BaseException:
            self.close()
            raise
        return self

    def _check_existing(self, expected_dim: int | None, expected_shortlist: ShortlistConfig | None) -> dict:
        """Read the collection's vectors and metadata, check them, adopt them; return the stored metadata."""
        backend = self._backend
        sizes, meta = self._retrying(backend.describe, "reading the collection")
        where = f"{backend.name} collection {backend.collection!r}"
        if SHORT_VECTOR not in sizes or FULL_VECTOR not in sizes:
            raise QdrantBackendError(
                f"{where} has vectors {sorted(sizes)}, not the named vectors {SHORT_VECTOR!r} and "
                f"{FULL_VECTOR!r} that matryoshka2d searches; use another collection name"
            )
        (short_size, short_distance), (full_size, full_distance) = sizes[SHORT_VECTOR], sizes[FULL_VECTOR]
        for name, distance in ((SHORT_VECTOR, short_distance), (FULL_VECTOR, full_distance)):
            if distance != "cosine":
                raise QdrantBackendError(
                    f"{where}: vector {name!r} uses {distance} distance, expected cosine; "
                    "use another collection"
                )
        if expected_dim is not None and expected_shortlist is not None:
            if (full_size, short_size) != (expected_dim, expected_shortlist.dim):
                raise InvalidDimError(
                    f"{where} holds {full_size}-dim full vectors and {short_size}-dim short vectors, but "
                    f"these embeddings have {expected_dim} dims with a {expected_shortlist.dim}-dim "
                    "shortlist; use another collection name, the matching model and shortlist dim, or "
                    "recreate the collection"
                )
        stored_config = None
        if meta is not None and isinstance(meta.get("shortlist"), dict):
            try:
                stored_config = ShortlistConfig(**meta["shortlist"])
            except TypeError:
                stored_config = None
        if expected_shortlist is not None and stored_config is not None:
            mine = (expected_shortlist.index, expected_shortlist.quantization)
            theirs = (stored_config.index, stored_config.quantization)
            if mine != theirs:
                raise QdrantBackendError(
                    f"{where} was created with a {theirs[0]} shortlist of {theirs[1]} codes, not {mine[0]} "
                    f"of {mine[1]}; use the same settings, another collection name, or recreate it"
                )
        self.dim = full_size
        self.shortlist = stored_config if stored_config is not None else ShortlistConfig(dim=short_size)
        self.shortlist = _qdrant_shortlist(_replace(self.shortlist, dim=short_size), full_size)
        return meta or {}

    # ------------------------------------------------------------------ metadata and accessors
    def metadata(self) -> dict:
        """What is recorded with the collection: format, model, layers, dims, shortlist settings."""
        from matryoshka2d import __version__

        return {
            "format": METADATA_FORMAT,
            "format_version": METADATA_VERSION,
            "matryoshka2d_version": __version__,
            "model": self.model,
            "layers": self.layers,
            "dim": self.dim,
            "normalized": True,
            "shortlist": asdict(self.shortlist),
            "model_fingerprint": None if self.fingerprint is None else self.fingerprint.to_json(),
        }

    def _stored_fingerprint(self, stored: dict) -> ModelFingerprint | None:
        data = stored.get("model_fingerprint")
        if data is None:
            return None
        try:
            return ModelFingerprint.from_json(data)
        except (KeyError, TypeError, ValueError) as e:
            raise QdrantBackendError(
                f"{self._backend.name} collection {self.collection!r}: malformed model fingerprint in its "
                f"metadata ({e})"
            ) from None

    @property
    def collection(self) -> str:
        return self._backend.collection

    @property
    def backend(self) -> str:
        """``"qdrant server"``, ``"qdrant local mode"`` or ``"qdrant-edge"``."""
        return self._backend.name

    def __len__(self) -> int:
        return self._retrying(self._backend.count, "counting points")

    def __repr__(self) -> str:
        c = self.shortlist
        return (
            f"QdrantIndex(collection={self.collection!r}, backend={self.backend!r}, dim={self.dim}, "
            f"shortlist=({c.dim} dims, {c.index}, {c.quantization}), model={self.model!r}, "
            f"layers={self.layers})"
        )

    def __enter__(self) -> QdrantIndex:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Release the client connection or the embedded engine (qdrant-edge flushes to disk first)."""
        self._backend.close()

    def check_model(self, model: EmbeddingModel) -> None:
        """Refuse a model whose embedding size differs from the collection's full vectors, or whose
        embeddings differ from the recorded fingerprint's (checked once per model object).

        Raises:
            InvalidDimError: another embedding size.
            ModelMismatchError: another model (a different fingerprint).
        """
        if model.dim != self.dim:
            raise InvalidDimError(
                f"the model {model.name_or_path!r} makes {model.dim}-dim embeddings but collection "
                f"{self.collection!r} holds {self.dim}-dim full vectors (built with "
                f"{self.model or 'an unknown model'!r}); query with the model that built it"
            )
        if self.layers is not None:
            check_layers(self.layers, model.num_layers)
        version = getattr(model, "rotations_version", 0)
        if self.fingerprint is not None and self._checked_models.get(model) != version:
            self.fingerprint.check(model, self.model, f"collection {self.collection!r}")
            self._checked_models[model] = version

    # ------------------------------------------------------------------ uploading
    def upload(
        self,
        embeddings: np.ndarray,
        ids: Sequence[str] | None = None,
        texts: Sequence[str] | None = None,
        batch_size: int = 256,
        show_progress: bool | None = True,
        finish: bool = True,
    ) -> int:
        """Upsert vectors (normalised here) with their ids and, optionally, texts.

        Uploading an id that is already in the collection replaces that point (Qdrant upsert), so a
        re-run or a retried batch never duplicates documents.

        Args:
            embeddings: ``(count, dim)`` array.
            ids: one unique string id per row (default: ``str(n)`` counting on from the collection's
                current point count; refused if one of those ids is in the collection already).
            texts: one text per row, stored in the payload and returned with hits.
            batch_size: points per upsert request.
            show_progress: tqdm progress bar (None: only on a terminal).
            finish: afterwards, let the engine build its index and quantised codes (qdrant-edge: blocking
                optimise; server: wait until the collection is green). Pass False when uploading in
                several calls, and call :meth:`finish_upload` once at the end.

        Returns:
            The number of points uploaded.

        Raises:
            InvalidInputError: malformed embeddings, wrong width, bad or duplicate ids, bad texts.
            QdrantBackendError: a batch still failed after the retries.
        """
        embeddings = rows_of_width(
            embeddings,
            "embeddings",
            self.dim,
            f"collection {self.collection!r} holds",
            "embeddings is empty: nothing to upload",
        )
        count = embeddings.shape[0]
        batch_size = _check_positive_int(batch_size, "batch_size")
        doc_ids = self._check_ids(ids, count)
        doc_texts = _check_texts(texts, count)
        self._upload_rows(
            lambda start, stop: np.asarray(embeddings[start:stop], dtype=np.float32),
            doc_ids,
            doc_texts,
            batch_size,
            show_progress,
        )
        if finish:
            self.finish_upload()
        return count

    def upload_texts(
        self,
        model: EmbeddingModel,
        texts: Sequence[str],
        ids: Sequence[str] | None = None,
        batch_size: int = 32,
        upload_batch_size: int = 256,
        show_progress: bool | None = True,
        store_texts: bool = True,
        chunk_size: int = 8192,
        prompt_name: str | None = None,
        prompt: str | None = None,
        workers: int = 1,
    ) -> int:
        """Encode ``texts`` with ``model`` (at the collection's ``layers``) chunk by chunk and upload them.

        Memory stays bounded by ``chunk_size`` texts; the model must make ``dim``-dim embeddings.

        Args:
            model: the embedding model.
            texts: the corpus.
            ids: one string id per text (default: see :meth:`upload`).
            batch_size: texts per forward pass.
            upload_batch_size: points per upsert request.
            show_progress: tqdm progress bar over the texts.
            store_texts: keep the texts in the payload.
            chunk_size: texts encoded (and held) at a time.
            prompt_name, prompt: the documents' prompt (e.g. ``prompt_name="document"``; default: the
                model's default prompt). Not recorded: give the same one to every upload, and the
                queries' one (e.g. ``"query"``) to :meth:`search_texts`.
            workers: batches encoded at once (:meth:`~matryoshka2d.encoder.Encoder.iter_encode`, each with
                its share of torch's threads; ONNX sessions are sized when loaded); speed only.
        """
        from matryoshka2d.encoder import check_texts

        prompted = _prompt_option(model, prompt_name, prompt)  # checked before any work
        workers = _check_positive_int(workers, "workers")
        self.check_model(model)
        texts = check_texts(texts)
        doc_ids = self._check_ids(ids, len(texts))
        layers = self.layers if self.layers is not None else model.num_layers
        from tqdm.auto import tqdm

        with tqdm(total=len(texts), desc="encode+upload", unit="doc", disable=_no_bar(show_progress)) as bar:
            for batch in model.iter_encode(
                texts,
                layers=layers,
                dims=model.dim,
                batch_size=batch_size,
                normalize=True,
                chunk_size=chunk_size,
                show_progress=False,
                **prompted,
                **({"workers": workers} if workers != 1 else {}),
            ):
                vectors = batch.embeddings[(layers, model.dim)]
                stop = batch.start + batch.size
                self._upload_rows(
                    lambda a, b, v=vectors, s=batch.start: v[a - s : b - s],
                    doc_ids[batch.start : stop],
                    list(texts[batch.start : stop]) if store_texts else None,
                    upload_batch_size,
                    False,
                    offset=batch.start,
                )
                bar.update(batch.size)
        self.finish_upload()
        return len(texts)

    def upload_search_index(
        self, search_index: SearchIndex, batch_size: int = 256, show_progress: bool | None = True
    ) -> int:
        """Upload every vector of a :class:`SearchIndex` with its ids and (if stored) texts."""
        if search_index.dim != self.dim:
            raise InvalidDimError(
                f"the search index holds {search_index.dim}-dim vectors but collection {self.collection!r} "
                f"holds {self.dim}-dim vectors"
            )
        if len(search_index) == 0:
            raise InvalidInputError("the search index is empty: nothing to upload")
        return self.upload(
            search_index.vectors,
            search_index.ids,
            search_index.texts,
            batch_size=batch_size,
            show_progress=show_progress,
        )

    def upload_corpus(
        self,
        folder: str | os.PathLike,
        layers: int | None = None,
        batch_size: int = 256,
        show_progress: bool | None = True,
    ) -> int:
        """Upload an ``m2d embed-corpus`` output folder: its full-dim cell, shard by shard (bounded memory).

        The short vectors are the first ``shortlist.dim`` dims of the full ones, re-normalised (the same
        as the folder's smaller cells), so only the cell with the collection's ``dim`` is read. The shards
        hold no texts: hits have ids only.

        Args:
            folder: a finished ``embed-corpus`` output (its ``manifest.json`` is read).
            layers: which layer count's cell to upload (default: the collection's ``layers``, else the
                deepest cell of the folder).
            batch_size, show_progress: see :meth:`upload`.

        Raises:
            InvalidInputError: the folder is not a finished output or holds no ``(layers, dim)`` cell.
        """
        import pyarrow.parquet as pq

        from matryoshka2d.corpus import cell_folder, read_manifest

        manifest = read_manifest(folder)
        if manifest.get("status") != "complete":
            raise InvalidInputError(
                f"{folder}: the embed-corpus job is not finished ({manifest.get('status')!r})"
            )
        cells = [(int(c["layers"]), int(c["dim"])) for c in manifest.get("cells", [])]
        wanted = layers if layers is not None else self.layers
        if wanted is None:
            wanted = max((k for k, d in cells if d == self.dim), default=None)
        if (wanted, self.dim) not in cells:
            raise InvalidInputError(
                f"{folder} holds the cells (layers, dim) {cells}; collection {self.collection!r} needs "
                f"{self.dim}-dim vectors" + (f" of {wanted} layers" if wanted is not None else "")
            )
        theirs = _corpus_fingerprint(manifest, folder, wanted)
        if theirs is not None and self.fingerprint is not None:
            same_probe = theirs.texts == self.fingerprint.texts  # else nothing to compare
            if same_probe and self.fingerprint.agreement(theirs.embeddings) < MIN_PROBE_COSINE:
                raise ModelMismatchError(
                    f"{folder} was encoded by {theirs.model!r}, another model than the one of collection "
                    f"{self.collection!r} ({self.model!r}): their embeddings of the same probe sentences "
                    "differ; upload it into another collection"
                )
        total = 0
        fresh = len(self) == 0  # else an upsert (a resumed upload, an addition) may replace ids on purpose
        from tqdm.auto import tqdm

        shards = manifest.get("shards", [])
        for shard in tqdm(shards, desc=f"upload {folder}", unit="shard", disable=_no_bar(show_progress)):
            path = Path(folder) / cell_folder(wanted, self.dim) / f"part-{int(shard['index']):05d}.parquet"
            try:
                table = pq.read_table(path, columns=["id", "embedding"])
            except (OSError, ValueError) as e:
                raise DataFileError(f"cannot read {path}: {e}") from None
            ids = [str(i) for i in table.column("id").to_pylist()]
            if fresh and total:  # into a new collection, an id already there came from an earlier shard
                self._refuse_repeated_ids(ids, f"{path}: the corpus repeats ids of its earlier shards")
            flat = table.column("embedding").combine_chunks().flatten().to_numpy()
            vectors = flat.reshape(table.num_rows, self.dim)
            total += self.upload(vectors, ids, batch_size=batch_size, show_progress=False, finish=False)
        self.finish_upload()
        return total

    def finish_upload(self) -> None:
        """Let the engine build its index and quantised codes for the uploaded points (see :meth:`upload`)."""
        self._backend.finish_upload()

    def _check_ids(self, ids: Sequence[str] | None, count: int) -> list[str]:
        if ids is None:
            start = len(self)
            new = [str(start + i) for i in range(count)]
            if start:  # a collection uploaded with its own ids may hold "25" already: an upsert replaces it
                self._refuse_repeated_ids(
                    new,
                    f"the default ids {new[0]}..{new[-1]} count on from the collection's {start} "
                    "points; pass ids=",
                )
            return new
        new = check_ordered(ids, "ids")  # a set or dict has no row order: refused
        if len(new) != count:
            raise InvalidInputError(f"got {len(new)} ids for {count} vectors/texts; give one id each")
        seen: set[str] = set()
        for i, id_ in enumerate(new):
            if not isinstance(id_, str):
                raise InvalidInputError(
                    f"ids[{i}] is {type(id_).__name__} ({id_!r:.50}); ids must be strings"
                )
            if id_ in seen:
                raise InvalidInputError(f"duplicate id {id_!r} in the new documents; ids must be unique")
            seen.add(id_)
        return new

    def _refuse_repeated_ids(self, ids: list[str], why: str) -> None:
        """Raise :class:`InvalidInputError` if the collection holds one of ``ids`` (an upload would replace
        it)."""
        points = {point_id(d): d for d in ids}
        found = self._retrying(lambda: self._backend.present(list(points)), "check ids")
        if found:
            first = next(doc for point, doc in points.items() if point in found)  # in the upload's order
            raise InvalidInputError(
                f"{why}: id {first!r} (and {len(found) - 1} more) is already in collection "
                f"{self.collection!r}, and uploading would replace that document"
            )

    def _upload_rows(
        self,
        rows: Callable[[int, int], np.ndarray],
        ids: list[str],
        texts: list[str] | None,
        batch_size: int,
        show_progress: bool | None,
        offset: int = 0,
    ) -> None:
        from tqdm.auto import tqdm

        count = len(ids)
        with tqdm(
            total=count, desc=f"upload to {self.collection}", unit="pt", disable=_no_bar(show_progress)
        ) as bar:
            for start in range(0, count, batch_size):
                stop = min(count, start + batch_size)
                full = np.ascontiguousarray(
                    truncate_dims(rows(offset + start, offset + stop), None, normalize=True), dtype=np.float32
                )
                short = np.ascontiguousarray(truncate_dims(full, self.shortlist.dim, normalize=True))
                batch_ids = ids[start:stop]
                if texts is None:
                    payloads = [{"id": d} for d in batch_ids]
                else:
                    payloads = [
                        {"id": d, "text": t} for d, t in zip(batch_ids, texts[start:stop], strict=True)
                    ]
                points = [point_id(d) for d in batch_ids]
                self._retrying(
                    lambda p=points, s=short, f=full, pl=payloads: self._backend.upsert(p, s, f, pl),
                    f"uploading points {offset + start}..{offset + stop - 1}",
                )
                bar.update(stop - start)

    def _retrying(self, fn: Callable[[], Any], what: str) -> Any:
        """Run ``fn``, retrying transient failures per :attr:`retry`; else :class:`QdrantBackendError`."""
        delays = self.retry.delays()
        attempt = 0
        while True:
            attempt += 1
            try:
                return fn()
            except Matryoshka2dError:
                raise
            except Exception as e:
                if self._backend.transient(e):
                    delay = next(delays, None)
                    if delay is not None:
                        self._sleep(delay)
                        continue
                first = first_line(e)
                tries = f" after {attempt} attempts" if attempt > 1 else ""
                raise QdrantBackendError(
                    f"{self._backend.name} collection {self._backend.collection!r}: {what} failed{tries}: "
                    f"{first}"
                ) from e

    # ------------------------------------------------------------------ searching
    def search(
        self,
        queries: np.ndarray,
        k: int = 10,
        shortlist: int = 200,
        ef_search: int | None = None,
        query_batch_size: int = 64,
    ) -> SearchResult:
        """Two-stage search for a batch of query vectors, in Qdrant.

        Args:
            queries: ``(num_queries, dim)`` array, or one ``(dim,)`` vector (normalised here).
            k: hits per query (fewer when the collection holds fewer points).
            shortlist: candidates Qdrant takes by the short vector and rescores with the full one;
                must be ``>= k``.
            ef_search: HNSW beam width for an ``hnsw`` shortlist (default: the config's, raised to
                ``shortlist``).
            query_batch_size: queries sent in one batch request.

        Returns:
            :class:`SearchResult` with ids, full-dim cosine scores and texts (if stored), best first.
            ``indices`` is ``-1`` everywhere: a collection has no row positions; use ``ids``.
        """
        k = _check_positive_int(k, "k")
        shortlist = _check_positive_int(shortlist, "shortlist")
        if shortlist < k:
            raise InvalidInputError(
                f"shortlist={shortlist} is smaller than k={k}: the shortlist must hold at least k candidates"
            )
        query_batch_size = _check_positive_int(query_batch_size, "query_batch_size")
        queries = rows_of_width(
            queries,
            "queries",
            self.dim,
            f"collection {self.collection!r} holds",
            "queries is empty: nothing to search",
            allow_vector=True,
        )
        full = np.ascontiguousarray(truncate_dims(queries, None, normalize=True), dtype=np.float32)
        short = np.ascontiguousarray(truncate_dims(full, self.shortlist.dim, normalize=True))
        params = self._search_params(shortlist, ef_search)
        hits: list[list[tuple[float, dict]]] = []
        for start in range(0, len(full), query_batch_size):
            stop = start + query_batch_size
            hits.extend(
                self._retrying(
                    lambda a=start, b=stop: self._backend.query(short[a:b], full[a:b], k, shortlist, params),
                    "searching",
                )
            )
        scores = np.full((len(full), k), -np.inf, dtype=np.float32)
        ids: list[list[str]] = []
        texts: list[list[str]] = []
        has_texts = True
        for i, row in enumerate(hits):
            scores[i, : len(row)] = [score for score, _ in row]
            ids.append([str(payload.get("id", "")) for _, payload in row])
            row_texts = [payload.get("text") for _, payload in row]
            has_texts = has_texts and all(isinstance(t, str) for t in row_texts)
            texts.append(row_texts)
        indices = np.full((len(full), k), -1, dtype=np.int64)
        return SearchResult(ids=ids, scores=scores, indices=indices, texts=texts if has_texts else None)

    def search_texts(
        self,
        model: EmbeddingModel,
        texts: Sequence[str],
        k: int = 10,
        shortlist: int = 200,
        batch_size: int = 32,
        prompt_name: str | None = None,
        prompt: str | None = None,
        **search_options,
    ) -> SearchResult:
        """Encode query texts with ``model`` (at the collection's ``layers``; ``prompt_name`` / ``prompt``:
        the queries' prompt, default the model's default prompt) and :meth:`search`."""
        prompted = _prompt_option(model, prompt_name, prompt)
        self.check_model(model)
        texts = [texts] if isinstance(texts, str) else texts
        queries = model.encode(
            texts, layers=self.layers, batch_size=batch_size, show_progress=False, **prompted
        )
        return self.search(queries, k=k, shortlist=shortlist, **search_options)

    def _search_params(self, shortlist: int, ef_search: int | None) -> dict:
        c = self.shortlist
        if c.index == "hnsw":
            ef = _check_positive_int(ef_search, "ef_search") if ef_search is not None else c.hnsw_ef_search
            return {"exact": False, "hnsw_ef": max(ef, shortlist)}
        # flat: an exact float scan, or a full scan of the quantised codes (exact=True would skip them)
        return {"exact": c.quantization == "none", "hnsw_ef": None}


# ---------------------------------------------------------------------- helpers


def _corpus_fingerprint(manifest: dict, folder: object, layers: int | None) -> ModelFingerprint | None:
    """The model fingerprint an ``embed-corpus`` manifest records for ``layers`` (None: an output written
    before embed-corpus recorded it)."""
    recorded = (manifest.get("model_fingerprints") or {}).get(str(layers))
    if recorded is None:
        return None
    try:
        return ModelFingerprint.from_json(recorded)
    except (KeyError, TypeError, ValueError) as e:
        raise InvalidInputError(f"{folder}: malformed model fingerprint in its manifest ({e})") from None


def _qdrant_shortlist(config: ShortlistConfig, dim: int) -> ShortlistConfig:
    config.validate(dim)
    if config.index not in QDRANT_SHORTLIST_INDEXES:
        raise InvalidInputError(
            f"shortlist index {config.index!r} is not available in Qdrant; choose one of "
            f"{list(QDRANT_SHORTLIST_INDEXES)}"
        )
    return config


def _replace(config: ShortlistConfig, **changes) -> ShortlistConfig:
    return ShortlistConfig(**{**asdict(config), **changes})


def _check_texts(texts: Sequence[str] | None, count: int) -> list[str] | None:
    if texts is None:
        return None
    new = check_ordered(texts, "texts")  # a set or dict has no row order: refused
    if len(new) != count:
        raise InvalidInputError(f"got {len(new)} texts for {count} vectors; give one text each")
    for i, text in enumerate(new):
        if not isinstance(text, str):
            raise InvalidInputError(f"texts[{i}] is {type(text).__name__}, expected str")
    return new


def _no_bar(show_progress: bool | None) -> bool | None:
    return None if show_progress is None else not show_progress
