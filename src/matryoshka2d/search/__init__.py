"""Search: shortlist with the first few dims, rerank with all of them.

:mod:`matryoshka2d.search.index` is the embedded default (one process, faiss; its first stage is
:mod:`matryoshka2d.search.shortlist`). Other backends (a vector database) live beside it and follow the
same two-stage pattern. :mod:`matryoshka2d.search.fingerprint` identifies the model that built an index.
"""

from matryoshka2d.search.fingerprint import ModelFingerprint, ModelMismatchError
from matryoshka2d.search.index import (
    DEFAULT_SHORTLIST_DIM,
    FORMAT_VERSION,
    QUANTIZATIONS,
    SHORTLIST_INDEXES,
    SearchIndex,
    SearchResult,
    ShortlistConfig,
)
from matryoshka2d.search.qdrant import QdrantBackendError, QdrantIndex, RetryPolicy, point_id

__all__ = [
    "DEFAULT_SHORTLIST_DIM",
    "FORMAT_VERSION",
    "ModelFingerprint",
    "ModelMismatchError",
    "QUANTIZATIONS",
    "SHORTLIST_INDEXES",
    "SearchIndex",
    "SearchResult",
    "ShortlistConfig",
    "QdrantBackendError",
    "QdrantIndex",
    "RetryPolicy",
    "point_id",
]
