"""Search: shortlist with the first few dims, rerank with all of them.

:mod:`matryoshka2d.search.index` is the embedded default (one process, faiss). Other backends (a vector
database) live beside it and follow the same two-stage pattern.
"""

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
