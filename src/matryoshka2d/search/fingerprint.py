"""Which model made an index's vectors: a fingerprint from the model's embeddings of fixed probe texts.

Vectors of two different models are not comparable, even when they have the same size: a query encoded
by one model finds nonsense among documents encoded by another, and an index that mixes both is
silently damaged. An index therefore records a :class:`ModelFingerprint` of the model that built it, and
refuses a model whose fingerprint does not match when it encodes documents to add or queries to search.

How it works (decided for robustness and cost):

* The fingerprint is the model's normalised embeddings of a few fixed probe sentences, at the index's
  layer count and full dim (:data:`PROBE_TEXTS`, stored with the embeddings, so later changes of the
  constant never invalidate old indexes). Computing it is one small batch: milliseconds.
* Two fingerprints match when every probe sentence's two embeddings have cosine similarity of at least
  :data:`MIN_PROBE_COSINE` (0.95). Measured on all-MiniLM-L6-v2 (docs/SEARCH.md): the same weights on
  another backend or precision stay above it (bfloat16 0.9999, ONNX 1.0000, ONNX int8 0.987), because
  their vectors are meant to be interchangeable; another model or another layer count of the same model
  lands far below it (0.2-0.4). A lightly fine-tuned copy stays close (0.98 after 40 steps) and is
  accepted until its vectors drift further: the threshold leaves quantised backends of larger models a
  margin rather than refusing them.
* A hash of the weight files was rejected: it needs the files (a model trained in memory has none), it
  rejects the same model converted to ONNX or quantised, and hashing gigabytes is slow.

An index built from bare embeddings has no fingerprint unless one is given; an index folder written
before fingerprints existed (format version 1) has none either. For those, a model is checked by
re-encoding a few stored document texts when the index keeps them (the same test, with the documents as
probes), else only by its recorded name, with a warning.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from matryoshka2d.encoder import prompt_option
from matryoshka2d.errors import InvalidInputError
from matryoshka2d.truncation import truncate_dims
from matryoshka2d.validation import check_ordered, check_positive_int

#: The sentences whose embeddings identify a model (varied length, topic and language).
PROBE_TEXTS = (
    "A man is playing a guitar on a stage.",
    "The stock market fell sharply after the announcement.",
    "How do I reset my password?",
    "Photosynthesis converts light energy into chemical energy.",
    "Der Hund schläft auf dem Sofa.",
    "I can't believe how good this pasta is!",
    "The committee postponed the vote until next Tuesday.",
    "42",
)

#: Two fingerprints match when every probe's embeddings have at least this cosine similarity.
MIN_PROBE_COSINE = 0.95


class ModelMismatchError(InvalidInputError):
    """A model whose embeddings differ from those of the model that built an index."""


def model_name(model: object) -> str:
    """A model's ``name_or_path`` (or its class name), for messages and manifests."""
    name = getattr(model, "name_or_path", None)
    return str(name) if name else type(model).__name__


def encode_texts(
    model: object,
    texts: Sequence[str],
    layers: int | None,
    batch_size: int = 32,
    show_progress: bool | None = False,
    prompt: str | None = None,
    workers: int = 1,
) -> np.ndarray:
    """Normalised float32 embeddings of ``texts`` by ``model`` at ``layers`` (full dim), one row each.

    ``model`` is any encoder with ``encode(texts, layers=)`` (the torch model, the ONNX encoders; its
    ``batch_size``, ``show_progress`` and ``workers`` are passed if it takes them: ``workers``, batches
    encoded at once, changes only the speed) or, failing that, ``iter_encode`` with ``num_layers`` and
    ``dim``. ``prompt`` (None: the model's default prompt) is passed as ``prompt=`` (see
    :meth:`~matryoshka2d.encoder.Encoder.resolve_prompt`).
    """
    texts = check_ordered(texts, "texts")  # a set or dict has no row order: refused, never listed
    workers = check_positive_int(workers, "workers")
    prompted = prompt_option(prompt)
    parallel = {"workers": workers} if workers != 1 else {}  # not given to encoders without the option
    if hasattr(model, "encode"):
        options = {"batch_size": batch_size, "show_progress": show_progress, **parallel}
        params = inspect.signature(model.encode).parameters
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            options = {name: value for name, value in options.items() if name in params}
            if prompted and "prompt" not in params:
                raise InvalidInputError(
                    f"the model {model_name(model)!r} takes no prompt (its encode has none)"
                )
        emb = model.encode(texts, layers=layers, **options, **prompted)
    else:
        k = layers if layers is not None else model.num_layers  # type: ignore[attr-defined]
        batches = model.iter_encode(  # type: ignore[attr-defined]
            texts, layers=[k], batch_size=batch_size, show_progress=show_progress, **prompted, **parallel
        )
        emb = np.concatenate([batch[(k, model.dim)] for batch in batches])  # type: ignore[attr-defined]
    return np.ascontiguousarray(truncate_dims(np.asarray(emb, dtype=np.float32), None, normalize=True))


def encode_probe(model: object, texts: Sequence[str], layers: int | None) -> np.ndarray:
    """:func:`encode_texts` of a few probe sentences, in one batch."""
    return encode_texts(model, texts, layers, batch_size=max(1, len(texts)))


@dataclass(frozen=True, eq=False)
class ModelFingerprint:
    """A model's normalised embeddings of :attr:`texts` at :attr:`layers` (full dim).

    Attributes:
        texts: the probe sentences.
        embeddings: ``(len(texts), dim)`` float32, unit rows.
        layers: the layer count they were encoded at (None: all layers of the model).
        model: the model's name (for messages).
    """

    texts: tuple[str, ...]
    embeddings: np.ndarray
    layers: int | None = None
    model: str | None = None

    @classmethod
    def of(
        cls, model: object, layers: int | None = None, texts: Sequence[str] = PROBE_TEXTS
    ) -> ModelFingerprint:
        """The fingerprint of ``model`` at ``layers`` (see :func:`encode_probe` for what a model needs)."""
        return cls(tuple(texts), encode_probe(model, texts, layers), layers, model_name(model))

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def agreement(self, embeddings: np.ndarray) -> float:
        """The smallest cosine similarity between our probe embeddings and ``embeddings`` (same texts)."""
        other = truncate_dims(np.asarray(embeddings, dtype=np.float32), None, normalize=True)
        return float(np.min(np.einsum("ij,ij->i", self.embeddings, other)))

    def check(self, model: object, index_model: str | None = None, what: str = "this index") -> None:
        """Refuse ``model`` unless its embeddings of our probe texts match ours.

        Args:
            model: the encoder to check.
            index_model: the name of the model that made the fingerprint, for the message.
            what: what the fingerprint belongs to, for the message.

        Raises:
            ModelMismatchError: naming both models and the measured agreement.
        """
        new = encode_probe(model, self.texts, self.layers)
        if new.shape != self.embeddings.shape:
            agreement = -1.0
        else:
            agreement = self.agreement(new)
        if agreement < MIN_PROBE_COSINE:
            built = index_model or self.model or "an unknown model"
            raise ModelMismatchError(
                f"the model {model_name(model)!r} is not the model that built {what} ({built!r}): their "
                f"embeddings of the same probe sentences differ (lowest cosine similarity {agreement:.3f}, "
                f"need >= {MIN_PROBE_COSINE}); vectors of different models cannot be mixed or compared. "
                f"Use {built!r}, or build a new index with {model_name(model)!r}{prompt_hint(model)}"
            )

    # ------------------------------------------------------------------ storage
    def manifest(self) -> dict:
        """The JSON part (the embeddings are stored beside it as a ``.npy`` file)."""
        return {
            "method": "probe-embeddings",
            "texts": list(self.texts),
            "layers": self.layers,
            "model": self.model,
            "min_cosine": MIN_PROBE_COSINE,
        }

    def to_json(self) -> dict:
        """:meth:`manifest` with the embeddings as lists (one JSON object; :meth:`from_json` reads it)."""
        return {**self.manifest(), "embeddings": self.embeddings.tolist()}

    @classmethod
    def from_json(cls, data: dict) -> ModelFingerprint:
        """The fingerprint :meth:`to_json` wrote; ValueError/TypeError/KeyError if malformed."""
        return cls.from_manifest(data, np.asarray(data["embeddings"], dtype=np.float32))

    @classmethod
    def from_manifest(cls, data: dict, embeddings: np.ndarray) -> ModelFingerprint:
        """A fingerprint from :meth:`manifest` and its embeddings; ValueError/TypeError if malformed."""
        if not isinstance(data, dict) or data.get("method") != "probe-embeddings":
            raise ValueError(f"unknown model fingerprint {data!r:.80}")
        texts = data["texts"]
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError("model fingerprint texts must be a non-empty list of strings")
        if embeddings.ndim != 2 or embeddings.shape[0] != len(texts) or not np.isfinite(embeddings).all():
            raise ValueError(
                f"model fingerprint embeddings have shape {embeddings.shape}, expected {len(texts)} rows"
            )
        layers = data.get("layers")
        if layers is not None and (isinstance(layers, bool) or not isinstance(layers, int) or layers < 1):
            raise ValueError(f"model fingerprint layers is {layers!r}")
        return cls(tuple(texts), np.asarray(embeddings, dtype=np.float32), layers, data.get("model"))


def prompt_hint(model: object) -> str:
    """For a mismatch message: a model whose folder sets a default prompt may have built the index before
    matryoshka2d applied that prompt (2026-12-05), i.e. from embeddings without it."""
    prompt = getattr(model, "prompt", "")
    if not prompt:
        return ""
    return (
        f". (If the same model built it: its folder prepends the prompt {prompt!r} to every text, which "
        "matryoshka2d does since 2026-12-05, as sentence-transformers does; an index built before was "
        "encoded without it: rebuild it)"
    )
