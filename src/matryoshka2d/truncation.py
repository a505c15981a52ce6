"""Layer and dimension truncation: where a model is cut to its first k layers and first d dims.

Layers: the encoder's layer stack (a ``torch.nn.ModuleList``) is found by architecture. At inference
:func:`first_layers` swaps in a prefix view of that list for the duration of one forward pass, so only
the first k layers run (the modules are shared, no weight is copied, and the full list is put back
afterwards). :func:`keep_first_layers` cuts a model for good and fixes its config, for export.

Dims: :func:`truncate_dims` keeps the first d values and optionally re-normalises.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from matryoshka2d.errors import InvalidDimError, InvalidLayersError, ModelLoadError

# Where the transformer block list lives, by family: BERT, RoBERTa, XLM-R, MPNet, ELECTRA, DeBERTa use
# encoder.layer; DistilBERT uses transformer.layer; some newer encoders use layers / encoder.layers.
_LAYER_STACK_PATHS = ("encoder.layer", "transformer.layer", "encoder.layers", "layers", "layer")


def find_layer_stack(model: nn.Module) -> tuple[nn.Module, str]:
    """The module holding the transformer layer list, and the attribute name of that list.

    Raises:
        ModelLoadError: naming the model class, if no known layer stack is found.
    """
    for path in _LAYER_STACK_PATHS:
        *parents, name = path.split(".")
        parent = model
        for attr in parents:
            parent = getattr(parent, attr, None)
            if parent is None:
                break
        stack = getattr(parent, name, None) if parent is not None else None
        if isinstance(stack, nn.ModuleList) and len(stack) > 0:
            return parent, name  # type: ignore[return-value]
    raise ModelLoadError(
        f"cannot find the transformer layer stack of {type(model).__name__} "
        f"(looked for {', '.join(_LAYER_STACK_PATHS)}); supported families: BERT, MPNet, RoBERTa/XLM-R, "
        "DistilBERT and others with the same layout"
    )


def check_layers(layers: int, num_layers: int) -> int:
    """Validate a layer count: an int in ``1..num_layers``."""
    if isinstance(layers, bool) or not isinstance(layers, (int, np.integer)):
        raise InvalidLayersError(f"layers must be an integer, got {layers!r}")
    if not 1 <= layers <= num_layers:
        raise InvalidLayersError(f"layers={layers} is out of range: the model has 1..{num_layers} layers")
    return int(layers)


def check_dim(dim: int, model_dim: int) -> int:
    """Validate an embedding size: an int in ``1..model_dim``."""
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)):
        raise InvalidDimError(f"dim must be an integer, got {dim!r}")
    if not 1 <= dim <= model_dim:
        raise InvalidDimError(f"dim={dim} is out of range: the model's embeddings have 1..{model_dim} dims")
    return int(dim)


@contextlib.contextmanager
def first_layers(model: nn.Module, k: int) -> Iterator[None]:
    """Run ``model`` with only its first ``k`` transformer layers inside the ``with`` block.

    The layer list is replaced by a prefix view (same module objects, nothing copied) and restored on
    exit, also on error. Not thread-safe on its own: callers serialise forward passes.
    """
    parent, name = find_layer_stack(model)
    full = getattr(parent, name)
    if k == len(full):
        yield
        return
    setattr(parent, name, full[:k])
    try:
        yield
    finally:
        setattr(parent, name, full)


def keep_first_layers(model: nn.Module, k: int) -> None:
    """Cut ``model`` (in place) to its first ``k`` layers and set ``config.num_hidden_layers = k``."""
    parent, name = find_layer_stack(model)
    setattr(parent, name, getattr(parent, name)[:k])
    model.config.num_hidden_layers = k


def truncate_dims(embeddings, dim: int | None, normalize: bool):
    """Keep the first ``dim`` values of each row (all if None), then L2-normalise rows if asked.

    Works on numpy arrays and torch tensors alike; returns the same kind.
    """
    if dim is not None:
        embeddings = embeddings[..., :dim]
    if not normalize:
        return embeddings
    if isinstance(embeddings, torch.Tensor):
        return nn.functional.normalize(embeddings, p=2, dim=-1)
    norms = np.linalg.norm(embeddings, axis=-1, keepdims=True)
    return embeddings / np.maximum(norms, 1e-12)
