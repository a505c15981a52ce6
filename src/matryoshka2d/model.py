"""EmbeddingModel: a transformer encoder plus pooling that runs at any (layers, dims).

One forward pass returns the pooled embedding of every requested layer (layer k = the output after the
first k transformer layers; 0 = the embedding layer alone). That single primitive serves inference
(``encode``, which runs only the layers it needs), grid evaluation (all layers from one pass) and
training (losses receive the per-layer embeddings; nothing is monkey-patched).
"""

from __future__ import annotations

import copy
import inspect
import os
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from matryoshka2d.errors import InvalidInputError, InvalidLayersError, ModelLoadError
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
    first_layers,
    keep_first_layers,
    truncate_dims,
)

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


def check_texts(texts: object) -> list[str]:
    """Validate a list of texts: non-empty, every item a string."""
    if isinstance(texts, str) or not isinstance(texts, Iterable):
        raise InvalidInputError(f"texts must be a list of strings, got {type(texts).__name__}")
    texts = list(texts)
    if not texts:
        raise InvalidInputError("texts is empty: nothing to encode")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise InvalidInputError(f"texts[{i}] is {type(text).__name__} ({text!r:.50}), expected str")
    return texts


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
        find_layer_stack(transformer)  # fail now, with the class name, if the architecture is unknown
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
        self._lock = threading.RLock()  # layer truncation swaps the layer list for one forward pass

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
        """Number of transformer layers."""
        parent, name = find_layer_stack(self.transformer)
        return len(getattr(parent, name))

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
        encoded = self.tokenizer(
            list(texts),
            padding=padding,
            truncation=True,
            max_length=self.max_seq_length,
            return_tensors="pt" if padding else None,
        )
        return dict(encoded)

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
        with self._lock, first_layers(self.transformer, deepest):
            out = self.transformer(**inputs, output_hidden_states=need_all, return_dict=True)
        mask = features["attention_mask"]
        if not need_all:
            return {deepest: pool(out.last_hidden_state, mask, self.pooling_mode)}
        return {k: pool(out.hidden_states[k], mask, self.pooling_mode) for k in wanted}

    # ------------------------------------------------------------------ inference
    def encode_layers(
        self,
        texts: Sequence[str],
        layers: Iterable[int] | None = None,
        batch_size: int = 32,
        show_progress: bool | None = None,
    ) -> dict[int, np.ndarray]:
        """Full-size, un-normalised embeddings of every requested layer count, from one pass over the data.

        This is what grid evaluation uses: the layers are prefixes of one forward pass, so asking for all
        of them costs about one full encode.

        Returns:
            ``{k: float32 array of shape (len(texts), hidden_size)}``.
        """
        texts = check_texts(texts)
        layers = list(layers) if layers is not None else None
        if layers is not None and not layers:
            raise InvalidLayersError("layers is empty: request at least one layer count")
        wanted = sorted({check_layers(k, self.num_layers) for k in (layers or [self.num_layers])})
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidInputError(f"batch_size must be a positive integer, got {batch_size!r}")
        # Tokenise once, then batch texts of similar token counts (longest first): less padding to compute.
        encoded = self.tokenize(texts, padding=False)
        order = np.argsort([-len(ids) for ids in encoded["input_ids"]], kind="stable")
        out = {k: np.empty((len(texts), self.hidden_size), dtype=np.float32) for k in wanted}
        starts = range(0, len(texts), batch_size)
        if show_progress is None:
            show_progress = len(starts) > 20
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode():
                for start in tqdm(starts, desc="Encoding", unit="batch", disable=not show_progress):
                    idx = order[start : start + batch_size]
                    batch = {key: [values[i] for i in idx] for key, values in encoded.items()}
                    features = self.tokenizer.pad(batch, return_tensors="pt")
                    features = {key: value.to(self.device) for key, value in features.items()}
                    for k, emb in self.forward(features, wanted).items():
                        out[k][idx] = emb.float().cpu().numpy()
        finally:
            self.train(was_training)
        return out

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
        emb = self.encode_layers(texts, [k], batch_size=batch_size, show_progress=show_progress)[k]
        emb = np.ascontiguousarray(truncate_dims(emb, d, normalize), dtype=np.float32)
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
        with self._lock, first_layers(self.transformer, k):
            transformer = copy.deepcopy(self.transformer)
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
