"""Building the training loss from a config: base-loss and wrapper names, default dims, loss descriptions.

:func:`build_loss` turns the ``loss``, ``loss_args``, ``wrapper``, ``dims``, ``schedule`` and
``wrapper_args`` options into a module of :mod:`matryoshka2d.losses`; :func:`loss_config` describes a
built loss for checkpoints and the model card.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from torch import nn

from matryoshka2d.errors import InvalidInputError

if TYPE_CHECKING:
    from matryoshka2d.model import EmbeddingModel
    from matryoshka2d.training.config import TrainConfig

BASE_LOSS_ALIASES = {
    "mnrl": "MultipleNegativesRankingLoss",
    "cosent": "CoSENTLoss",
    "angle": "AnglELoss",
    "cosine": "CosineSimilarityLoss",
}
WRAPPER_ALIASES = {
    "matryoshka": "MatryoshkaLoss",
    "adaptive": "AdaptiveLayerLoss",
    "adaptive_layer": "AdaptiveLayerLoss",
    "2d": "Matryoshka2dLoss",
    "matryoshka2d": "Matryoshka2dLoss",
}
BASE_LOSSES = ("MultipleNegativesRankingLoss", "CoSENTLoss", "AnglELoss", "CosineSimilarityLoss")
WRAPPERS = ("MatryoshkaLoss", "AdaptiveLayerLoss", "Matryoshka2dLoss")


def _canonical(name: str, names: Sequence[str], aliases: Mapping[str, str], what: str) -> str:
    lookup = {n.lower(): n for n in names} | aliases
    key = name.strip().lower()
    if key not in lookup:
        raise InvalidInputError(f"unknown {what} {name!r}; choose one of {list(names)} (or {list(aliases)})")
    return lookup[key]


def default_dims(model_dim: int) -> list[int]:
    """The full size and the powers of two below it down to ``model_dim / 16`` (at least 8).

    384 -> [384, 256, 128, 64, 32]; 768 -> [768, 512, 256, 128, 64].
    """
    dims = [model_dim]
    d = 1 << (model_dim - 1).bit_length() - 1 if model_dim > 1 else 0
    while d >= max(model_dim // 16, 8) and d >= 1:
        if d < model_dim:
            dims.append(d)
        d //= 2
    return dims


def _construct(cls: type, args: Sequence[Any], kwargs: Mapping[str, Any], what: str) -> nn.Module:
    accepted = inspect.signature(cls).parameters
    unknown = [k for k in kwargs if k not in accepted]
    if unknown and not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
        raise InvalidInputError(
            f"{what} {cls.__name__} has no option(s) {unknown}; it accepts {list(accepted)}"
        )
    try:
        return cls(*args, **kwargs)
    except TypeError as e:
        raise InvalidInputError(f"{what} {cls.__name__}: {e}") from None


def build_loss(config: TrainConfig, model: EmbeddingModel) -> nn.Module:
    """The loss described by ``config``: a base loss, optionally inside a Matryoshka wrapper.

    ``dims`` (default :func:`default_dims`) goes to wrappers that take it; ``schedule`` to
    Matryoshka2dLoss. Every other wrapper option comes from ``wrapper_args``.
    """
    from matryoshka2d import losses

    base_name = _canonical(config.loss, BASE_LOSSES, BASE_LOSS_ALIASES, "loss")
    base = _construct(getattr(losses, base_name), (), config.loss_args, "loss")
    wrapper = config.wrapper
    if wrapper is None or wrapper.strip().lower() == "none":
        if config.schedule is not None:
            raise InvalidInputError("option 'schedule' needs wrapper Matryoshka2dLoss")
        if config.dims is not None:  # silently unused otherwise
            raise InvalidInputError(
                "option 'dims' needs a wrapper (Matryoshka2dLoss, MatryoshkaLoss): with wrapper none no dim "
                "prefix is trained; for the evaluation grid's dims use eval_dims"
            )
        if config.wrapper_args:
            raise InvalidInputError(
                f"option 'wrapper_args' ({sorted(config.wrapper_args)}) needs a wrapper; the wrapper is none"
            )
        return base
    wrapper_name = _canonical(wrapper, WRAPPERS, WRAPPER_ALIASES, "wrapper")
    cls = getattr(losses, wrapper_name)
    accepted = inspect.signature(cls).parameters
    kwargs = dict(config.wrapper_args)
    if config.schedule is not None:
        if "schedule" not in accepted:
            raise InvalidInputError(f"option 'schedule' needs wrapper Matryoshka2dLoss, not {wrapper_name}")
        if config.dims is not None:
            raise InvalidInputError(
                "give either 'dims' or 'schedule': a schedule fixes the (layers, dim) pairs"
            )
        kwargs["schedule"] = [tuple(pair) for pair in config.schedule]
    elif "dims" in accepted and "dims" in kwargs and config.dims is not None:
        raise InvalidInputError(
            "give 'dims' once: as the option or in wrapper_args, not both (they differ or repeat each other)"
        )
    elif "dims" in accepted and "dims" not in kwargs:
        kwargs["dims"] = list(config.dims) if config.dims is not None else default_dims(model.dim)
    elif config.dims is not None and "dims" not in accepted:
        raise InvalidInputError(
            f"option 'dims' does not apply to {wrapper_name} (it trains full-size embeddings)"
        )
    return _construct(cls, (base,), kwargs, "wrapper")


def loss_config(loss: nn.Module) -> dict:
    """``loss.config()`` if the loss has one, else its class name."""
    get = getattr(loss, "config", None)
    return get() if callable(get) else {"name": type(loss).__name__}
