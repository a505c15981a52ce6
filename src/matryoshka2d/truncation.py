"""Layer and dimension truncation: where a model is cut to its first k layers and first d dims.

Layers: the encoder's layer stack (a ``torch.nn.ModuleList``) is found by architecture. At inference
:func:`layer_view` gives a view of the model whose layer list holds the first k layers (the modules are
shared, no weight is copied, the model itself is never changed), so only those layers run and calls with
different k can run concurrently. :func:`keep_first_layers` cuts a model for good and fixes its config,
for export.

Dims: :func:`truncate_dims` keeps the first d values and optionally re-normalises.
"""

from __future__ import annotations

import copy
import functools
import inspect

import numpy as np
import torch
from torch import nn

from matryoshka2d.errors import InvalidDimError, InvalidLayersError, ModelLoadError
from matryoshka2d.validation import check_int

# Where the transformer block list lives, by family: BERT, RoBERTa, XLM-R, MPNet, ELECTRA, DeBERTa use
# encoder.layer; DistilBERT uses transformer.layer; some newer encoders use layers / encoder.layers.
_LAYER_STACK_PATHS = ("encoder.layer", "transformer.layer", "encoder.layers", "layers", "layer")


def layer_stack_path(model: nn.Module) -> tuple[tuple[str, ...], str]:
    """Where the transformer layer list is: the attribute path of its parent module, and its name.

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
            return tuple(parents), name
    raise ModelLoadError(
        f"cannot find the transformer layer stack of {type(model).__name__} "
        f"(looked for {', '.join(_LAYER_STACK_PATHS)}); supported families: BERT, MPNet, RoBERTa/XLM-R, "
        "DistilBERT and others with the same layout"
    )


# The normalisation some families apply once, after their last layer, found beside the layer list:
# ModernBERT's ``final_norm``, Llama-style decoders' ``norm``.
_FINAL_NORM_NAMES = ("final_norm", "norm")


def final_norm(model: nn.Module) -> nn.Module | None:
    """The normalisation ``model`` applies after its last layer, or None (BERT, MPNet, RoBERTa, ...).

    transformers applies it to ``last_hidden_state`` (and to ``hidden_states[-1]``) only, while a model cut
    to k layers applies it after layer k: so every layer exit is taken after it (:func:`exit_states`).
    """
    parents, _ = layer_stack_path(model)
    parent = _resolve(model, parents)
    for name in _FINAL_NORM_NAMES:
        module = parent._modules.get(name)
        if module is not None:
            return module
    return None


def exit_states(model: nn.Module, out, layers) -> dict[int, torch.Tensor]:
    """The hidden state after each layer count in ``layers``, from one output of ``model`` run with
    ``output_hidden_states=True``, each as the model cut to that many layers would return it: the last
    layer run gives ``last_hidden_state``; the others get the final norm, if the model has one."""
    ran = len(out.hidden_states) - 1  # layers run; hidden_states[0] is the embedding output
    norm = final_norm(model)
    states = {}
    for k in set(layers):
        if k == ran:
            states[k] = out.last_hidden_state
        else:
            states[k] = out.hidden_states[k] if norm is None else norm(out.hidden_states[k])
    return states


def find_layer_stack(model: nn.Module) -> tuple[nn.Module, str]:
    """The module holding the transformer layer list, and the attribute name of that list."""
    parents, name = layer_stack_path(model)
    return _resolve(model, parents), name


def check_layers(layers: int, num_layers: int) -> int:
    """Validate a layer count: an int in ``1..num_layers``."""
    return check_int(
        layers,
        "layers",
        1,
        num_layers,
        error=InvalidLayersError,
        what=f"the model has 1..{num_layers} layers",
    )


def check_dim(dim: int, model_dim: int) -> int:
    """Validate an embedding size: an int in ``1..model_dim``."""
    return check_int(
        dim,
        "dim",
        1,
        model_dim,
        error=InvalidDimError,
        what=f"the model's embeddings have 1..{model_dim} dims",
    )


def layer_view(model: nn.Module, k: int, drop_pooler: bool = False) -> nn.Module:
    """``model`` running only its first ``k`` transformer layers, without changing ``model``.

    The view is a shallow copy of the modules on the path to the layer stack (the root and, e.g., its
    ``encoder``) whose layer list holds the first ``k`` layers. Every parameter, buffer and layer module
    is shared with ``model`` (nothing is copied, gradients reach the same tensors); only the small
    containers on the path are new. ``model`` itself is never modified, so views of different ``k`` can
    run at the same time from many threads. Building one costs microseconds: callers build one per call,
    so a view always sees the model's current train/eval mode.

    Args:
        drop_pooler: also leave out the model's pooling head where it can run without one (see
            :func:`has_optional_pooler`): BERT's ``pooler``, a dense layer and tanh on the first token
            whose output (``pooler_output``, then None) sentence embeddings never use. Its weights stay
            in ``model``.
    """
    parent_path, name = layer_stack_path(model)
    stack = _resolve(model, parent_path + (name,))
    _install_output_capturing_hooks(model)
    drop_pooler = drop_pooler and has_optional_pooler(model)
    if k == len(stack) and not drop_pooler:
        return model
    root = _shallow(model)
    if drop_pooler:
        root._modules["pooler"] = None
    if k == len(stack):
        return root
    node = root
    for attr in parent_path:
        child = _shallow(node._modules[attr])
        node._modules[attr] = child
        node = child
    node._modules[name] = nn.ModuleList(list(stack)[:k])
    return root


def has_optional_pooler(model: nn.Module) -> bool:
    """Whether ``model`` has a ``pooler`` head that it can run without: transformers' models whose
    constructor takes ``add_pooling_layer`` (BERT, RoBERTa, MPNet, ...) run with ``pooler=None``."""
    return isinstance(getattr(model, "pooler", None), nn.Module) and _takes_add_pooling_layer(type(model))


@functools.cache
def _takes_add_pooling_layer(cls: type) -> bool:
    try:
        return "add_pooling_layer" in inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):  # no signature to read
        return False


def _install_output_capturing_hooks(model: nn.Module) -> None:
    """Install transformers' hidden-state capturing hooks on ``model`` itself, once, before any view exists.

    transformers 5 collects ``output_hidden_states`` with forward hooks on the (shared) layer modules,
    installed lazily on first use and marked by a flag on the model object. Installed from a view, the flag
    would land on that throw-away copy and every later view would install another set of hooks on the
    same layers: wrong hidden states and unbounded hook growth. Installed here, the flag is on the model and
    every view (a shallow copy of it) inherits it. Older transformers versions have no such hooks.
    """
    try:
        from transformers.utils.output_capturing import maybe_install_capturing_hooks
    except ImportError:  # transformers < 5: hidden states are returned without hooks
        return
    if hasattr(model, "config"):  # a PreTrainedModel; the function is itself thread-safe and idempotent
        maybe_install_capturing_hooks(model)


def _shallow(module: nn.Module) -> nn.Module:
    clone = copy.copy(module)  # shares __dict__ values: parameters, buffers, config, hooks
    clone._modules = dict(module._modules)  # but a container of our own, so replacing a child is local
    return clone


def _resolve(model: nn.Module, path: tuple[str, ...]) -> nn.Module:
    node = model
    for attr in path:
        node = getattr(node, attr)
    return node


def keep_first_layers(model: nn.Module, k: int) -> None:
    """Cut ``model`` (in place) to its first ``k`` layers and set ``config.num_hidden_layers = k``."""
    parent, name = find_layer_stack(model)
    setattr(parent, name, getattr(parent, name)[:k])
    model.config.num_hidden_layers = k
    if isinstance(getattr(model.config, "layer_types", None), list):  # per-layer settings (ModernBERT)
        model.config.layer_types = model.config.layer_types[:k]


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
    with np.errstate(over="ignore"):  # an overflow is handled below
        norms = np.linalg.norm(embeddings, axis=-1, keepdims=True)
    if not np.isfinite(norms).all() and np.isfinite(embeddings).all():
        # finite values whose squares overflow (~1e20 in float32): scale each row by its largest value first
        scale = np.max(np.abs(embeddings), axis=-1, keepdims=True)
        embeddings = embeddings / np.where(scale > 0, scale, 1)
        norms = np.linalg.norm(embeddings, axis=-1, keepdims=True)
    return embeddings / np.maximum(norms, 1e-12)
