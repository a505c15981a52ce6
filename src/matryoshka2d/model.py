"""EmbeddingModel: a transformer encoder plus pooling that runs at any (layers, dims).

One forward pass returns the pooled embedding of every requested layer (layer k = the output after the
first k transformer layers; 0 = the embedding layer alone). That single primitive serves inference
(``encode``, which runs only the layers it needs), grid evaluation (all layers from one pass) and
training (losses receive the per-layer embeddings; nothing is monkey-patched).
"""

from __future__ import annotations

import copy
import inspect
import itertools
import os
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence, Set
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from matryoshka2d.errors import InvalidDimError, InvalidInputError, InvalidLayersError, ModelLoadError
from matryoshka2d.persistence import (
    FolderSpec,
    atomic_directory,
    quiet_transformers,
    read_folder_spec,
    resolve_model_path,
    write_folder,
)
from matryoshka2d.pooling import POOLING_MODES, pool
from matryoshka2d.truncation import (
    check_dim,
    check_layers,
    find_layer_stack,
    keep_first_layers,
    layer_view,
    truncate_dims,
)
from matryoshka2d.validation import check_positive_int

# Families whose position ids start after the padding index, so max_position_embeddings overstates the
# usable length by pad_token_id + 1 (514 positions = 512 tokens for RoBERTa).
_OFFSET_POSITION_FAMILIES = {
    "roberta",
    "xlm-roberta",
    "xlm-roberta-xl",
    "camembert",
    "data2vec-text",
    "longformer",
}


def check_texts_iterable(texts: object) -> None:
    """Refuse what cannot be encoded row by row in a defined order: a string, a non-iterable, a set or a dict.

    Output row i must belong to input item i; a set has no order and a dict would silently encode its keys.
    """
    if isinstance(texts, str) or not isinstance(texts, Iterable):
        raise InvalidInputError(f"texts must be a list of strings, got {type(texts).__name__}")
    if isinstance(texts, (Set, Mapping)):
        raise InvalidInputError(
            f"texts is a {type(texts).__name__}, which has no row order (a dict would give its keys): "
            "pass a list of strings, e.g. sorted(texts) or list(mapping.values())"
        )


def _check_text(text: object, i: int) -> str:
    if not isinstance(text, str):
        raise InvalidInputError(f"texts[{i}] is {type(text).__name__} ({text!r:.50}), expected str")
    return text


def check_texts(texts: object) -> list[str]:
    """Validate a list of texts: an ordered collection (not a set or dict), non-empty, every item a string."""
    check_texts_iterable(texts)
    texts = [_check_text(text, i) for i, text in enumerate(texts)]  # type: ignore[union-attr]
    if not texts:
        raise InvalidInputError("texts is empty: nothing to encode")
    return texts


# Texts tokenised and sorted by length together: enough to batch similar lengths, small enough for memory.
DEFAULT_CHUNK_SIZE = 8192


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


class EmbeddingModel(nn.Module):
    """A sentence embedding model that can be truncated to its first k layers and first d dims.

    Args:
        transformer: a Hugging Face encoder (``transformers.PreTrainedModel``) of a supported family:
            BERT, MPNet, RoBERTa/XLM-R, DistilBERT (any model with the same layer-stack layout).
        tokenizer: its tokenizer.
        pooling_mode: one of ``mean``, ``cls``, ``max``, ``mean_sqrt_len_tokens``, ``weightedmean``,
            ``lasttoken``.
        max_seq_length: longer inputs are truncated to this many tokens (default: the tokenizer's limit,
            capped by the model's position embeddings).
        dim: output embedding size (default: the hidden size). A model exported with
            :meth:`truncate` has a smaller ``dim``.
        do_lower_case: lower-case texts before tokenising (as some sentence-transformers folders ask).
        normalize: whether the model's own output is unit-length (a sentence-transformers Normalize module).
            Saved folders keep it, so sentence-transformers reproduces the model's output; ``encode``
            normalises by default either way.
        name_or_path: where the model came from, for reports and model cards.

    Example:
        >>> model = EmbeddingModel.load("sentence-transformers/all-MiniLM-L6-v2")
        >>> full = model.encode(["a sentence"])                  # (1, 384)
        >>> fast = model.encode(["a sentence"], layers=3, dim=64)  # half the layers, 1/6 the size
    """

    def __init__(
        self,
        transformer: nn.Module,
        tokenizer,
        pooling_mode: str = "mean",
        max_seq_length: int | None = None,
        dim: int | None = None,
        do_lower_case: bool = False,
        normalize: bool = True,
        name_or_path: str | None = None,
    ) -> None:
        super().__init__()
        if pooling_mode not in POOLING_MODES:
            raise ModelLoadError(f"unknown pooling mode {pooling_mode!r}; supported: {list(POOLING_MODES)}")
        parent, name = find_layer_stack(transformer)  # fail now, with the class name, if unknown
        self._num_layers = len(getattr(parent, name))  # a fixed fact: running fewer layers changes nothing
        self.transformer = transformer
        self.tokenizer = tokenizer
        self.pooling_mode = pooling_mode
        self.hidden_size: int = int(transformer.config.hidden_size)
        self.dim: int = check_dim(dim, self.hidden_size) if dim is not None else self.hidden_size
        self.do_lower_case = do_lower_case
        self.normalize = normalize
        self.metadata: dict = {}
        self.name_or_path = name_or_path or getattr(transformer.config, "_name_or_path", "") or "model"
        limit = getattr(tokenizer, "model_max_length", None) or 512
        positions = getattr(transformer.config, "max_position_embeddings", None) or limit
        if getattr(transformer.config, "model_type", "") in _OFFSET_POSITION_FAMILIES:
            positions -= (getattr(transformer.config, "pad_token_id", None) or 0) + 1  # ids start at pad + 1
        if limit > 100_000:  # tokenizers without a configured limit report a huge sentinel
            limit = positions
        self.max_seq_length: int = int(max_seq_length or min(limit, positions))
        self._input_names = set(inspect.signature(transformer.forward).parameters)
        # A fast tokenizer's call may switch its truncation/padding state: not safe from several threads.
        # Only tokenising is serialised; forward passes of any layer count run concurrently.
        self._tokenizer_lock = threading.Lock()

    # ------------------------------------------------------------------ loading and saving
    @classmethod
    def load(
        cls, name_or_path: str | os.PathLike, device: str | torch.device | None = None
    ) -> EmbeddingModel:
        """Load a sentence-transformers model folder, a plain transformers folder, or a hub id.

        sentence-transformers folders keep their pooling mode, ``max_seq_length`` and Normalize module;
        plain transformers folders get mean pooling. Hub ids are downloaded (and cached) with
        ``huggingface_hub``; set ``HF_HUB_OFFLINE=1`` to use the cache only.

        Raises:
            ModelLoadError: the folder is missing, is not a model folder, holds an unsupported module
                (a projecting Dense layer) or an architecture whose layer stack cannot be found.
        """
        from transformers import AutoModel, AutoTokenizer

        folder = resolve_model_path(name_or_path)
        spec: FolderSpec = read_folder_spec(folder)
        try:
            with quiet_transformers():  # e.g. "pooler weights not initialised": we never use the pooler
                transformer = AutoModel.from_pretrained(spec.transformer_dir)
                tokenizer = AutoTokenizer.from_pretrained(spec.transformer_dir)
        except Exception as e:  # OSError, ValueError, SafetensorError, ...: a folder we cannot read
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelLoadError(
                f"cannot load the transformer in {spec.transformer_dir}: {first_line}"
            ) from None
        vocab_size = getattr(transformer.config, "vocab_size", None)
        if vocab_size and len(tokenizer) < vocab_size // 2:
            raise ModelLoadError(
                f"{spec.transformer_dir}: the tokenizer has {len(tokenizer)} tokens but the model expects "
                f"{vocab_size}; are the tokenizer files (tokenizer.json, vocab.txt, ...) missing?"
            )
        model = cls(
            transformer,
            tokenizer,
            pooling_mode=spec.pooling_mode,
            max_seq_length=spec.max_seq_length,
            dim=spec.dim,
            do_lower_case=spec.do_lower_case,
            normalize=spec.normalize,
            name_or_path=str(name_or_path),
        )
        model.metadata = spec.metadata or {}
        model.eval()
        if device is not None:
            model.to(device)
        return model

    def save(
        self, path: str | os.PathLike, model_card: str | None = None, metadata: dict | None = None
    ) -> Path:
        """Save in the sentence-transformers layout (loadable by sentence-transformers), atomically.

        The folder is written under a temporary name and renamed into place, so an interrupted save never
        leaves a half-written model. An existing folder at ``path`` is replaced.

        Args:
            path: the output folder.
            model_card: README.md text; a short default card if None.
            metadata: extra entries for ``matryoshka2d.json`` (e.g. training settings).
        """
        path = Path(path)
        meta = {**self.metadata, **(metadata or {}), "num_layers": self.num_layers, "dim": self.dim}
        card = model_card or default_model_card(self)
        with atomic_directory(path) as tmp:
            write_folder(
                tmp,
                self.transformer,
                self.tokenizer,
                pooling_mode=self.pooling_mode,
                max_seq_length=self.max_seq_length,
                hidden_size=self.hidden_size,
                dim=self.dim,
                metadata=meta,
                model_card=card,
                do_lower_case=self.do_lower_case,
                normalize=self.normalize,
            )
        return path

    # ------------------------------------------------------------------ properties
    @property
    def num_layers(self) -> int:
        """Number of transformer layers of the loaded model (never changes while it runs fewer)."""
        return self._num_layers

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    # ------------------------------------------------------------------ forward
    def tokenize(self, texts: Sequence[str], padding: bool = True) -> dict:
        """Tokenise a batch, truncated to ``max_seq_length``.

        With ``padding=True`` (training, one batch): tensors padded to the longest text. With
        ``padding=False``: plain id lists, for :meth:`encode_layers` to sort by token count and pad per batch.
        """
        if self.do_lower_case:
            texts = [t.lower() for t in texts]
        with self._tokenizer_lock:
            encoded = self.tokenizer(
                list(texts),
                padding=padding,
                truncation=True,
                max_length=self.max_seq_length,
                return_tensors="pt" if padding else None,
            )
        return dict(encoded)

    def pad(
        self, encoded: Mapping[str, Sequence[Sequence[int]]], rows: Sequence[int]
    ) -> dict[str, torch.Tensor]:
        """Tensors for ``rows`` of :meth:`tokenize` output (``padding=False``), padded to the longest row.

        Pads like the tokenizer (``pad_token_id``, attention mask 0, token type 0, on its padding side)
        without touching the shared tokenizer, so it is safe from any number of threads.
        """
        width = max(len(encoded["input_ids"][i]) for i in rows)
        left = getattr(self.tokenizer, "padding_side", "right") == "left"
        pad_values = {"input_ids": self.tokenizer.pad_token_id or 0}
        out = {}
        for key, values in encoded.items():
            array = np.full((len(rows), width), pad_values.get(key, 0), dtype=np.int64)
            for r, i in enumerate(rows):
                seq = values[i]
                if left:
                    array[r, width - len(seq) :] = seq
                else:
                    array[r, : len(seq)] = seq
            out[key] = torch.from_numpy(array)
        return out

    def forward(
        self, features: dict[str, torch.Tensor], layers: Iterable[int] | None = None
    ) -> dict[int, torch.Tensor]:
        """Pooled embeddings of several layers from one forward pass.

        Only the transformer layers up to the deepest requested one run. Outputs are full-size and not
        normalised (callers truncate dims and normalise); gradients flow when called outside
        ``torch.no_grad``.

        Args:
            features: tokenizer output (``input_ids``, ``attention_mask``, ...), on the model's device.
            layers: layer counts to return, each in ``0..num_layers`` (0 = embedding layer only, before
                any transformer layer). Default: the last layer only.

        Returns:
            ``{k: tensor of shape (batch, hidden_size)}`` for every requested ``k``.
        """
        num_layers = self.num_layers
        wanted = sorted(set(layers)) if layers is not None else [num_layers]
        if not wanted:
            raise InvalidLayersError("layers is empty: request at least one layer")
        for k in wanted:
            if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k <= num_layers:
                raise InvalidLayersError(f"layer {k!r} is out of range: the model has layers 0..{num_layers}")
        deepest = max(wanted[-1], 1)
        inputs = {key: value for key, value in features.items() if key in self._input_names}
        need_all = wanted != [deepest]
        transformer = layer_view(self.transformer, deepest)  # shares every weight; self is not changed
        out = transformer(**inputs, output_hidden_states=need_all, return_dict=True)
        mask = features["attention_mask"]
        if not need_all:
            return {deepest: pool(out.last_hidden_state, mask, self.pooling_mode)}
        return {k: pool(out.hidden_states[k], mask, self.pooling_mode) for k in wanted}

    # ------------------------------------------------------------------ inference
    def iter_encode(
        self,
        texts: Iterable[str],
        layers: int | Sequence[int] | None = None,
        dims: int | Sequence[int] | None = None,
        batch_size: int = 32,
        normalize: bool = True,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        show_progress: bool | None = None,
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

        Yields:
            :class:`EmbeddingBatch` per chunk: ``batch[(layers, dim)]`` is a float32 array
            ``(batch.size, dim)``; ``batch.start`` is the position of its first text.

        Raises:
            InvalidLayersError, InvalidDimError, InvalidInputError: for out-of-range or malformed input.
        """
        check_texts_iterable(texts)
        ks = self._layer_list(layers)
        ds = self._dim_list(dims)
        chunk_size = check_positive_int(chunk_size, "chunk_size")
        batch_size = check_positive_int(batch_size, "batch_size")
        total = len(texts) if hasattr(texts, "__len__") else None  # type: ignore[arg-type]
        if show_progress is None:
            show_progress = total is None or total > 20 * batch_size
        iterator = iter(texts)
        start = 0
        with tqdm(total=total, desc="Encoding", unit="text", disable=not show_progress) as bar:
            while chunk := [
                _check_text(t, start + i) for i, t in enumerate(itertools.islice(iterator, chunk_size))
            ]:
                pooled = self._encode_chunk(chunk, ks, batch_size)
                cells = {(k, d): truncate_dims(pooled[k], d, normalize) for k in ks for d in ds}
                yield EmbeddingBatch(
                    start, len(chunk), {c: np.ascontiguousarray(e) for c, e in cells.items()}
                )
                start += len(chunk)
                bar.update(len(chunk))
        if start == 0:
            raise InvalidInputError("texts is empty: nothing to encode")

    def _encode_chunk(self, texts: list[str], layers: list[int], batch_size: int) -> dict[int, np.ndarray]:
        """Full-size, un-normalised pooled embeddings of ``texts`` for every layer count, in input order."""
        encoded = self.tokenize(texts, padding=False)
        order = np.argsort([-len(ids) for ids in encoded["input_ids"]], kind="stable")  # longest first
        out = {k: np.empty((len(texts), self.hidden_size), dtype=np.float32) for k in layers}
        device = self.device
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                idx = order[start : start + batch_size]
                features = {key: value.to(device) for key, value in self.pad(encoded, idx).items()}
                for k, emb in self.forward(features, layers).items():
                    out[k][idx] = emb.float().cpu().numpy()
        return out

    def _layer_list(self, layers: int | Sequence[int] | None) -> list[int]:
        if layers is None:
            return [self.num_layers]
        if not isinstance(layers, (Sequence, np.ndarray)) or isinstance(layers, str):
            return [check_layers(layers, self.num_layers)]  # type: ignore[arg-type]
        if len(layers) == 0:
            raise InvalidLayersError("layers is empty: request at least one layer count")
        return sorted({check_layers(k, self.num_layers) for k in layers})

    def _dim_list(self, dims: int | Sequence[int] | None) -> list[int]:
        if dims is None:
            return [self.dim]
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
    ) -> dict[int, np.ndarray]:
        """Full-size, un-normalised embeddings of every requested layer count, from one pass over the data.

        Returns:
            ``{k: float32 array of shape (len(texts), hidden_size)}``.
        """
        texts = check_texts(texts)
        ks = self._layer_list(list(layers) if layers is not None else None)
        batch_size = check_positive_int(batch_size, "batch_size")
        parts: dict[int, list[np.ndarray]] = {k: [] for k in ks}
        show = len(texts) > 20 * batch_size if show_progress is None else show_progress
        with tqdm(total=len(texts), desc="Encoding", unit="text", disable=not show) as bar:
            for start in range(0, len(texts), DEFAULT_CHUNK_SIZE):
                chunk = texts[start : start + DEFAULT_CHUNK_SIZE]
                for k, emb in self._encode_chunk(chunk, ks, batch_size).items():
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
    ) -> np.ndarray:
        """Embed texts using the first ``layers`` transformer layers and the first ``dim`` dimensions.

        Safe to call from many threads at once with different ``layers`` and ``dim``: the loaded model is
        never changed (see :func:`~matryoshka2d.truncation.layer_view`). The model's train/eval mode is
        used as it is (loaded models are in eval mode); gradients are never recorded.

        Args:
            texts: a list of strings (or one string, which gives a 1-D result).
            layers: run only the embeddings plus the first ``layers`` transformer layers (default: all).
                The dropped layers are not computed; the loaded model is not changed.
            dim: keep the first ``dim`` values of each embedding (default: ``model.dim``).
            batch_size: texts per forward pass (texts are sorted by length first).
            normalize: L2-normalise after truncation, so dot product = cosine similarity.
            show_progress: show a tqdm bar (default: when there are more than 20 batches).

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
            texts, k, d, batch_size=batch_size, normalize=normalize, show_progress=show_progress
        )
        parts = [batch[(k, d)] for batch in batches]
        emb = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return emb[0] if single else emb

    # ------------------------------------------------------------------ export
    def truncate(self, layers: int | None = None, dim: int | None = None) -> EmbeddingModel:
        """A standalone copy with only the first ``layers`` layers and output size ``dim``.

        Only the kept layers are copied. Saving the result writes ``num_hidden_layers = layers`` in its
        config and records ``dim`` so that sentence-transformers loading the folder produces the same
        embeddings as ``self.encode(texts, layers=layers, dim=dim)``.
        """
        k = check_layers(layers, self.num_layers) if layers is not None else self.num_layers
        d = check_dim(dim, self.dim) if dim is not None else self.dim
        transformer = copy.deepcopy(layer_view(self.transformer, k))  # copies the first k layers only
        keep_first_layers(transformer, k)
        model = EmbeddingModel(
            transformer,
            copy.deepcopy(self.tokenizer),
            pooling_mode=self.pooling_mode,
            max_seq_length=self.max_seq_length,
            dim=d,
            do_lower_case=self.do_lower_case,
            # encode() normalises by default (and re-normalises a dim prefix): the exported folder gets a
            # Normalize module so that sentence-transformers gives the same embeddings.
            normalize=True,
            name_or_path=self.name_or_path,
        )
        model.metadata = {
            **self.metadata,
            "truncated_from": {"model": self.name_or_path, "num_layers": self.num_layers, "dim": self.dim},
        }
        model.train(self.training)
        return model

    def extra_repr(self) -> str:
        return (
            f"name_or_path={self.name_or_path!r}, num_layers={self.num_layers}, dim={self.dim}, "
            f"pooling={self.pooling_mode!r}, max_seq_length={self.max_seq_length}"
        )


def default_model_card(model: EmbeddingModel) -> str:
    """A short README.md for a saved model folder."""
    source = model.metadata.get("truncated_from")
    lines = [
        "---",
        "library_name: sentence-transformers",
        "tags: [sentence-transformers, sentence-similarity, matryoshka, matryoshka2d]",
        "---",
        "",
        f"# {Path(str(model.name_or_path)).name or 'matryoshka2d model'}",
        "",
        f"Sentence embedding model saved by matryoshka2d: {model.num_layers} transformer layers, "
        f"{model.dim}-dim embeddings, {model.pooling_mode} pooling"
        + (", normalised." if model.normalize else "."),
    ]
    if source:
        lines += [
            "",
            f"Truncated from `{source['model']}` ({source['num_layers']} layers, {source['dim']} dims).",
        ]
    lines += [
        "",
        "```python",
        "from sentence_transformers import SentenceTransformer",
        'model = SentenceTransformer("path/to/this/folder")',
        "```",
        "",
    ]
    return "\n".join(lines)
