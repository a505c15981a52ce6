"""The first search stage: a faiss index over the first ``d`` dims of every vector.

:class:`ShortlistConfig` says how it is built (exact scan, HNSW graph or IVF lists; float32, int8 or
binary codes); :func:`shortlist_codes` turns full vectors into the codes it stores; :func:`build_index`
creates (and trains) the faiss index and :func:`build_shortlist` fills it with a whole corpus;
:func:`outgrown` says when an index trained on a small first batch must be rebuilt; :func:`search_params`
gives the per-call search settings. Search settings are passed to faiss with each call instead of being
set on the shared index, so concurrent searches with different ``ef_search``/``nprobe`` never see each
other's settings.

Trained structures (IVF centroids, int8 ranges) are trained on a sample of the vectors present when the
index is built: at most ``max(64 * nlist, 10000)`` of them (:func:`training_size`). An index that grows
by later adds is rebuilt from all its vectors (:func:`outgrown`) whenever a build of all of them at once
would train on at least twice as many vectors as its current training did, so a small first batch
never fixes the shortlist's quality for good; the rebuilds double in size, so their total cost stays
within a small multiple of one build.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import faiss
import numpy as np

from matryoshka2d.errors import InvalidDimError, InvalidInputError
from matryoshka2d.truncation import truncate_dims

SHORTLIST_INDEXES = ("flat", "hnsw", "ivf")
QUANTIZATIONS = ("none", "int8", "binary")
DEFAULT_SHORTLIST_DIM = 64
# Trained structures use at most max(64 * nlist, this) training vectors (a seeded random sample).
MIN_TRAINING_SAMPLE = 10_000
_INT_FIELDS = ("dim", "hnsw_m", "hnsw_ef_construction", "hnsw_ef_search", "ivf_nlist", "ivf_nprobe")


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

    def __post_init__(self) -> None:
        # numpy integers (an np.int64 from an array of settings) become plain ints: faiss' setters and
        # json.dumps (the manifest) take only those. Other values are left for validate() to refuse.
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, np.integer):
                object.__setattr__(self, name, int(value))

    def validate(self, full_dim: int) -> ShortlistConfig:
        """Check every field against the index's full dim; return self (its integers are plain ``int``
        already: ``__post_init__``)."""
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
            check_positive_int(getattr(self, name), name)
        if self.ivf_nlist is not None:
            check_positive_int(self.ivf_nlist, "ivf_nlist")
        return self

    @property
    def binary(self) -> bool:
        return self.quantization == "binary"

    def to_dict(self) -> dict:
        return asdict(self)


def check_positive_int(value: object, name: str) -> int:
    """``value`` as an int if it is a positive integer (not a bool); InvalidInputError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InvalidInputError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def default_dim(shortlist_dim: int | None, dim: int) -> int:
    """The shortlist dim to use: ``shortlist_dim``, or ``min(64, dim)`` if None."""
    return min(DEFAULT_SHORTLIST_DIM, dim) if shortlist_dim is None else shortlist_dim


def default_nlist(count: int) -> int:
    """``sqrt(count)`` lists, at most ``count / 39`` (so k-means sees 39 points a list), at least 1."""
    return max(1, min(round(math.sqrt(count)), count // 39))


def needs_training(config: ShortlistConfig) -> bool:
    """Whether the shortlist index is trained (IVF centroids, int8 ranges) before vectors are added."""
    return config.index == "ivf" or config.quantization == "int8"


def training_size(config: ShortlistConfig, count: int) -> int:
    """How many of ``count`` vectors a build trains on: all, up to ``max(64 * nlist, 10000)`` (0 if the
    index needs no training). ``nlist`` is ``config.ivf_nlist``, or the default for ``count``."""
    if not needs_training(config):
        return 0
    nlist = config.ivf_nlist or default_nlist(count)
    return min(count, max(64 * nlist, MIN_TRAINING_SAMPLE))


def outgrown(config: ShortlistConfig, trained_on: int, count: int) -> bool:
    """Whether an index trained on ``trained_on`` vectors should be rebuilt now that it holds ``count``:
    a build of all of them at once with ``config`` (the settings a rebuild would use: ``ivf_nlist`` None
    where the list count was chosen automatically) would train on at least twice as many."""
    if not needs_training(config):
        return False
    return training_size(config, count) >= 2 * max(trained_on, 1)


def _training_rows(count: int, size: int) -> np.ndarray | None:
    """The rows of ``count`` that training uses (sorted, seeded), or None for all of them."""
    if size >= count:
        return None
    rng = np.random.default_rng(0)
    return np.sort(rng.choice(count, size, replace=False))


def shortlist_codes(vectors: np.ndarray, config: ShortlistConfig) -> np.ndarray:
    """What the shortlist stores for ``vectors``: the re-normalised first ``config.dim`` dims (float32),
    or their sign bits packed 8 to a byte for binary codes."""
    prefix = np.ascontiguousarray(truncate_dims(vectors, config.dim, normalize=True), dtype=np.float32)
    if config.binary:
        return np.packbits(prefix > 0, axis=1)
    return prefix


def build_index(
    config: ShortlistConfig, training_codes: np.ndarray
) -> tuple[faiss.Index | faiss.IndexBinary, ShortlistConfig]:
    """Create (and train, for IVF and int8) the faiss index for the codes of the vectors it is built for
    (trained on a seeded sample of at most :func:`training_size` of them).

    Returns:
        the empty (trained) index, and ``config`` with ``ivf_nlist`` filled in if it was chosen here.

    Raises:
        InvalidInputError: an IVF index with fewer vectors in the first batch than lists.
    """
    c = config
    count = len(training_codes)
    nlist = c.ivf_nlist or default_nlist(count)
    if c.index == "ivf" and count < nlist:
        raise InvalidInputError(
            f"an IVF shortlist with {nlist} lists needs at least {nlist} vectors in the first batch, "
            f"got {count}; add more vectors at once, lower ivf_nlist, or use index='flat'"
        )
    if c.binary:
        factory = {"flat": "BFlat", "hnsw": f"BHNSW{c.hnsw_m}", "ivf": f"BIVF{nlist}"}[c.index]
        index = faiss.index_binary_factory(c.dim, factory)
    else:
        codec = "SQ8" if c.quantization == "int8" else "Flat"
        factory = {
            "flat": codec,
            "hnsw": f"HNSW{c.hnsw_m}" + ("_SQ8" if codec == "SQ8" else ""),
            "ivf": f"IVF{nlist},{codec}",
        }[c.index]
        index = faiss.index_factory(c.dim, factory, faiss.METRIC_INNER_PRODUCT)
    if c.index == "hnsw":
        index.hnsw.efConstruction = c.hnsw_ef_construction
    if c.index == "ivf":
        if not c.binary:
            faiss.extract_index_ivf(index).cp.spherical = True  # the prefixes are unit vectors
        if c.ivf_nlist is None:
            c = replace(c, ivf_nlist=nlist)
    if not index.is_trained:
        # IVF k-means, and the int8 ranges, need no more than max(64 * nlist, 10000) vectors
        rows = _training_rows(len(training_codes), training_size(c, count))
        index.train(training_codes if rows is None else training_codes[rows])
    return index, c


def build_shortlist(
    config: ShortlistConfig, vectors: np.ndarray
) -> tuple[faiss.Index | faiss.IndexBinary, ShortlistConfig, int]:
    """Build, train and fill the shortlist index for all of ``vectors`` (normalised full vectors).

    Returns:
        the filled index, the settings (``ivf_nlist`` filled in), and how many vectors it was trained on
        (0 if it needs no training).
    """
    codes = shortlist_codes(vectors, config)
    index, config = build_index(config, codes)
    index.add(codes)
    return index, config, training_size(config, len(vectors))


def search_params(
    config: ShortlistConfig, shortlist: int, ef_search: int | None = None, nprobe: int | None = None
) -> faiss.SearchParameters | None:
    """Per-call faiss search settings: HNSW beam width ``max(ef_search, shortlist)`` or IVF ``nprobe``.

    Defaults come from ``config``; ``nprobe`` is capped at the list count.
    """
    if config.index == "hnsw":
        ef = check_positive_int(ef_search, "ef_search") if ef_search is not None else config.hnsw_ef_search
        return faiss.SearchParametersHNSW(efSearch=max(ef, shortlist))
    if config.index == "ivf":
        probe = check_positive_int(nprobe, "nprobe") if nprobe is not None else config.ivf_nprobe
        return faiss.SearchParametersIVF(nprobe=min(probe, config.ivf_nlist or probe))
    return None


def serialized_size(index: faiss.Index | faiss.IndexBinary, binary: bool) -> int:
    """Bytes of the faiss index when serialised (what it holds in memory, about)."""
    serialize = faiss.serialize_index_binary if binary else faiss.serialize_index
    return int(serialize(index).nbytes)


def write_index(index: faiss.Index | faiss.IndexBinary, path: str, binary: bool) -> None:
    (faiss.write_index_binary if binary else faiss.write_index)(index, path)


def read_index(path: str, binary: bool) -> faiss.Index | faiss.IndexBinary:
    return (faiss.read_index_binary if binary else faiss.read_index)(path)
