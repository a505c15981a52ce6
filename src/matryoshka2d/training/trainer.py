"""Training 2D Matryoshka embedding models: configuration, the training loop, checkpoints and the model card.

The loop is deliberately plain (nanoGPT style) and built on ``accelerate`` for device placement, mixed
precision and multi-process data parallelism (DDP). Each optimizer step:

1. asks the loss which layer counts it needs (``loss.layers_for_step(model.num_layers)``; the 2D loss
   samples them),
2. runs ONE forward pass per input column (anchor, positive, ...) returning the pooled embedding of every
   requested layer (:meth:`matryoshka2d.model.EmbeddingModel.forward`),
3. computes the loss from those embeddings (and labels), back-propagates, clips and steps AdamW with a
   linear warmup/decay schedule.

Every ``save_steps`` steps a checkpoint folder is written atomically with the model, the optimizer and
scheduler states, the random states of every process and the data position, so ``resume`` continues
exactly as if training had not stopped. The final model is saved in the sentence-transformers layout with
a model card describing the base model, data, loss, trained dims/layers and evaluation grid.

Usage (Python)::

    from matryoshka2d.training.trainer import TrainConfig, Trainer
    config = TrainConfig(model="sentence-transformers/all-MiniLM-L6-v2",
                         train_data=["../shared/data/snli/triplet-validation.tsv"],
                         output_dir="out/minilm-2d", loss="MultipleNegativesRankingLoss",
                         wrapper="Matryoshka2dLoss", steps=500)
    result = Trainer(config).train()

Usage (command line): ``m2d train --config examples/nli-mnrl-2d.yaml [--flag value ...]``; the same
command runs under ``torchrun --nproc_per_node N`` or ``accelerate launch`` (see docs/TRAINING.md).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import json
import math
import os
import random
import re
import shutil
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from matryoshka2d.errors import InvalidDimError, InvalidInputError, InvalidLayersError, Matryoshka2dError
from matryoshka2d.evaluation.sts import GridResult, evaluate_sts, resolve_grid
from matryoshka2d.model import EmbeddingModel
from matryoshka2d.persistence import atomic_directory
from matryoshka2d.training.data import BatchStream, TrainingData, load_training_data

# ---------------------------------------------------------------------------------------------- config

_KINDS = ("str", "int", "float", "bool", "str_list", "int_list", "pairs", "json", "columns")


def _option(default: Any, kind: str, help: str, nullable: bool = False) -> Any:
    """A config field: its default, how to parse it from YAML/flags, and its help text."""
    assert kind in _KINDS
    meta = {"kind": kind, "help": help, "nullable": nullable or default is None}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Every training option; the YAML keys and the ``m2d train`` flags (``--batch-size``) have these names.

    Paths are relative to the working directory. Use :meth:`from_yaml` / :meth:`from_dict` to build one
    from untrusted input: values are parsed and validated with errors naming the option.
    """

    # -- what to train
    model: str = _option(None, "str", "base model: a local model folder or a Hugging Face hub id")
    train_data: list[str] = _option(
        [],
        "str_list",
        "training files (tsv/csv/jsonl/parquet) or HF dataset ids (owner/name[:subset][@split])",
    )
    output_dir: str = _option(None, "str", "where the final model is saved (sentence-transformers layout)")
    columns: Any = _option(
        None,
        "columns",
        "text columns in input order (anchor,positive,negative) or a JSON role mapping "
        '({"anchor": "premise", "positive": "hypothesis"}); default: detect a known layout',
    )
    label_column: str | None = _option(
        None, "str", "label column for scored-pair losses (default: score/label)"
    )
    label_range: list[float] | None = _option(
        None,
        "json",
        "rescale labels from [low, high] to [0, 1] (e.g. [0, 5] for STSB with CosineSimilarityLoss)",
    )
    max_rows: int | None = _option(None, "int", "use only the first N rows of each training source")
    # -- loss
    loss: str = _option(
        "MultipleNegativesRankingLoss",
        "str",
        "base loss: MultipleNegativesRankingLoss (mnrl), CoSENTLoss (cosent), AnglELoss (angle), "
        "CosineSimilarityLoss (cosine)",
    )
    loss_args: dict = _option({}, "json", 'extra base-loss arguments as JSON, e.g. {"scale": 20}')
    wrapper: str | None = _option(
        "Matryoshka2dLoss",
        "str",
        "Matryoshka wrapper: Matryoshka2dLoss (2d), MatryoshkaLoss (matryoshka), "
        "AdaptiveLayerLoss (adaptive) or none",
        nullable=True,
    )
    dims: list[int] | None = _option(
        None,
        "int_list",
        "embedding sizes to train (default: the full size and powers of two down to size/16)",
    )
    schedule: list[list[int]] | None = _option(
        None, "pairs", "fixed (layers, dim) pairs trained every step (Starbucks), e.g. 2:32,4:64,6:128"
    )
    wrapper_args: dict = _option({}, "json", 'extra wrapper arguments as JSON, e.g. {"n_layers_per_step": 1}')
    # -- optimisation
    steps: int | None = _option(None, "int", "optimizer steps in total (default: from epochs)")
    epochs: float = _option(1.0, "float", "passes over the data when steps is not set")
    stop_at: int | None = _option(
        None, "int", "end this run after this step with a checkpoint (the schedule still spans steps)"
    )
    batch_size: int = _option(32, "int", "rows per batch per process")
    gradient_accumulation_steps: int = _option(1, "int", "batches accumulated per optimizer step")
    learning_rate: float = _option(2e-5, "float", "peak AdamW learning rate")
    weight_decay: float = _option(0.01, "float", "AdamW weight decay (not applied to biases and LayerNorm)")
    warmup_ratio: float = _option(0.1, "float", "fraction of steps with linear learning-rate warmup")
    warmup_steps: int | None = _option(None, "int", "warmup steps (overrides warmup_ratio)")
    max_grad_norm: float | None = _option(
        1.0, "float", "gradient clipping norm (none: no clipping)", nullable=True
    )
    mixed_precision: str = _option("no", "str", "no, bf16 or fp16 (fp16 needs a GPU)")
    seed: int = _option(42, "int", "seed of data order, dropout and layer/dim sampling")
    max_seq_length: int | None = _option(
        None, "int", "truncate inputs to this many tokens (default: the model's)"
    )
    no_duplicates: bool | None = _option(
        None, "bool", "keep texts unique within a batch (default: on for in-batch-negative losses)"
    )
    # -- evaluation
    eval_data: str | None = _option(
        None, "str", "STS file (sentence1, sentence2, score) evaluated over a grid"
    )
    eval_steps: int = _option(0, "int", "evaluate every N steps (0: only at the end, if eval_data is set)")
    eval_layers: list[int] | None = _option(None, "int_list", "layer counts of the grid (default: 1, L/2, L)")
    eval_dims: list[int] | None = _option(None, "int_list", "dims of the grid (default: the trained dims)")
    eval_batch_size: int = _option(64, "int", "batch size for evaluation")
    # -- checkpoints and output
    checkpoint_dir: str | None = _option(None, "str", "checkpoint folder (default: <output_dir>-checkpoints)")
    save_steps: int = _option(500, "int", "write a checkpoint every N steps (0: never)")
    save_total_limit: int | None = _option(
        2, "int", "keep only the newest N checkpoints (none: all)", nullable=True
    )
    resume: str | None = _option(None, "str", "checkpoint folder to continue from, or 'latest'")
    log_steps: int = _option(10, "int", "average and record the loss every N steps")
    progress: bool = _option(True, "bool", "show a tqdm progress bar")
    cpu: bool = _option(False, "bool", "train on CPU even if a GPU is available")
    find_unused_parameters: bool = _option(
        False, "bool", "DDP: allow parameters without gradient (a schedule that skips the last layer)"
    )

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        """Build and validate a config from a mapping (keys may use ``-`` or ``_``)."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        parsed: dict[str, Any] = {}
        for key, value in values.items():
            name = str(key).replace("-", "_")
            if name not in known:
                close = [k for k in known if k.startswith(name[:4])]
                hint = f"; did you mean {close}?" if close else ""
                raise InvalidInputError(f"unknown training option {key!r}{hint} (options: {sorted(known)})")
            parsed[name] = parse_option(known[name], value)
        config = cls(**parsed)
        config.validate()
        return config

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
        """Read a YAML mapping of options; ``overrides`` (e.g. command-line flags) win over the file."""
        import yaml

        path = Path(path)
        if not path.is_file():
            raise InvalidInputError(f"config file not found: {path}")
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise InvalidInputError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(values, dict):
            raise InvalidInputError(
                f"{path}: expected a mapping of option: value, got {type(values).__name__}"
            )
        return cls.from_dict({**values, **(overrides or {})})

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy (for checkpoints and model cards)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def validate(self) -> None:
        """Check required options and ranges; raise :class:`InvalidInputError` naming the bad option."""
        for name in ("model", "output_dir"):
            if not getattr(self, name):
                raise InvalidInputError(f"option {name!r} is required")
        if not self.train_data:
            raise InvalidInputError("option 'train_data' is required: give at least one file or dataset id")
        positive = ["batch_size", "gradient_accumulation_steps", "eval_batch_size", "log_steps"]
        positive += [
            n
            for n in ("steps", "stop_at", "max_rows", "max_seq_length", "save_total_limit")
            if getattr(self, n) is not None
        ]
        for name in positive:
            if getattr(self, name) < 1:
                raise InvalidInputError(f"option {name!r} must be >= 1, got {getattr(self, name)}")
        for name in ("save_steps", "eval_steps", "seed") + (
            ("warmup_steps",) if self.warmup_steps is not None else ()
        ):
            if getattr(self, name) < 0:
                raise InvalidInputError(f"option {name!r} must be >= 0, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise InvalidInputError(f"option 'learning_rate' must be > 0, got {self.learning_rate}")
        if not self.epochs > 0:
            raise InvalidInputError(f"option 'epochs' must be > 0, got {self.epochs}")
        if self.weight_decay < 0:
            raise InvalidInputError(f"option 'weight_decay' must be >= 0, got {self.weight_decay}")
        if not 0 <= self.warmup_ratio < 1:
            raise InvalidInputError(f"option 'warmup_ratio' must be in [0, 1), got {self.warmup_ratio}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise InvalidInputError(f"option 'max_grad_norm' must be > 0 (or none), got {self.max_grad_norm}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise InvalidInputError(
                f"option 'mixed_precision' must be no, bf16 or fp16, got {self.mixed_precision!r}"
            )
        if self.stop_at is not None and self.steps is not None and self.stop_at > self.steps:
            raise InvalidInputError(f"option 'stop_at' ({self.stop_at}) is beyond 'steps' ({self.steps})")
        for name in ("dims", "eval_layers", "eval_dims"):
            values = getattr(self, name)
            if values is not None and (not values or any(v < 1 for v in values)):
                raise InvalidInputError(
                    f"option {name!r} must be a non-empty list of positive integers, got {values}"
                )
        if self.schedule is not None and not self.schedule:
            raise InvalidInputError("option 'schedule' is empty: give (layers, dim) pairs like 2:32,4:64")
        if self.label_range is not None:
            low_high = self.label_range
            if (
                not isinstance(low_high, (list, tuple))
                or len(low_high) != 2
                or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                    for v in low_high
                )
            ):
                raise InvalidInputError(
                    f"option 'label_range' must be a list of two numbers [low, high] (e.g. [0, 5]), "
                    f"got {low_high!r}"
                )
            if not low_high[0] < low_high[1]:
                raise InvalidInputError(f"option 'label_range' must have low < high, got {list(low_high)}")


def parse_option(spec: dataclasses.Field, value: Any) -> Any:
    """Parse one option value from YAML or a command-line string according to its kind."""
    kind, name = spec.metadata["kind"], spec.name
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null")):
        if spec.metadata["nullable"]:
            return None
        raise InvalidInputError(f"option {name!r} cannot be none")

    def fail(expected: str) -> InvalidInputError:
        return InvalidInputError(f"option {name!r}: expected {expected}, got {value!r}")

    def split(v: Any) -> list:
        if isinstance(v, str):
            return [s.strip() for s in re.split(r"[,\s]+", v) if s.strip()]
        if isinstance(v, (list, tuple)):
            return [x for item in v for x in (split(item) if isinstance(item, str) else [item])]
        return [v]

    def to_int(v: Any) -> int:
        if isinstance(v, bool):
            raise fail("an integer")
        if isinstance(v, float) and v.is_integer():
            return int(v)
        try:
            return int(v)
        except (TypeError, ValueError):
            raise fail("an integer") from None

    if kind == "str":
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise fail("a string")
        return str(value)
    if kind == "int":
        return to_int(value)
    if kind == "float":
        try:
            out = float(value)
        except (TypeError, ValueError):
            raise fail("a number") from None
        if isinstance(value, bool) or not math.isfinite(out):
            raise fail("a finite number")
        return out
    if kind == "bool":
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "yes", "1", "on"):
            return True
        if text in ("false", "no", "0", "off"):
            return False
        raise fail("true or false")
    if kind == "str_list":
        return [str(v) for v in split(value)]
    if kind == "int_list":
        return [to_int(v) for v in split(value)]
    if kind == "pairs":
        pairs = []
        for item in split(value) if isinstance(value, str) else value:
            parts = item.split(":") if isinstance(item, str) else item
            if not isinstance(parts, (list, tuple)) or len(parts) != 2:
                raise fail("(layers, dim) pairs like 2:32,4:64 or [[2, 32], [4, 64]]")
            pairs.append([to_int(parts[0]), to_int(parts[1])])
        return pairs
    if kind == "json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise fail("JSON") from None
        expected = type(spec.default_factory()) if spec.default_factory is not dataclasses.MISSING else None
        if expected is not None and not isinstance(value, expected):
            raise fail(f"a JSON {expected.__name__}")
        return value
    if kind == "columns":
        if isinstance(value, str) and value.strip().startswith("{"):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise fail("a JSON mapping") from None
        if isinstance(value, Mapping):
            return {str(k): str(v) for k, v in value.items()}
        return [str(v) for v in split(value)]
    raise AssertionError(kind)


# ---------------------------------------------------------------------------------------------- losses

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


# ---------------------------------------------------------------------------------------------- trainer


@dataclass
class TrainResult:
    """What a call to :meth:`Trainer.train` produced.

    Attributes:
        output_dir: the saved final model, or None if the run stopped early (``stop_at``).
        checkpoint: the newest checkpoint written by this run, if any.
        step: the last optimizer step done.
        loss: the mean loss of the last logging window.
        evaluation: the last evaluation grid, if any.
        steps_per_second: optimizer steps per second in this run (excluding setup, evaluation, saving).
    """

    output_dir: Path | None
    checkpoint: Path | None
    step: int
    loss: float | None
    evaluation: dict | None
    steps_per_second: float


def _has_accelerator_device() -> bool:
    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


CHECKPOINT_PREFIX = "checkpoint-"


def list_checkpoints(checkpoint_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoint folders in ``checkpoint_dir``, oldest step first."""
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", path.name)
        if match and (path / "trainer_state.json").is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


class Trainer:
    """Trains an :class:`~matryoshka2d.model.EmbeddingModel` as described by a :class:`TrainConfig`.

    Args:
        config: the options.
        model, loss, data: optional ready-made objects replacing ``config.model`` / the loss built from the
            config / ``config.train_data`` (handy in Python; the CLI builds everything from the config).
            A resumed run always reloads the model from the checkpoint.
    """

    def __init__(
        self,
        config: TrainConfig,
        model: EmbeddingModel | None = None,
        loss: nn.Module | None = None,
        data: TrainingData | None = None,
    ) -> None:
        config.validate()
        self.config = config
        self.model = model
        self.loss = loss
        self.data = data
        self.log_history: list[dict] = []  # {"step", "loss", "lr"} every log_steps steps
        self.eval_history: list[dict] = []  # evaluation grids, with their step
        self.checkpoint_dir = Path(config.checkpoint_dir or f"{config.output_dir.rstrip('/')}-checkpoints")

    # ------------------------------------------------------------------ helpers
    def _say(self, message: str) -> None:
        if self.accelerator.is_main_process:
            tqdm.write(message, file=sys.stderr)

    def _resume_path(self) -> Path | None:
        resume = self.config.resume
        if resume is None:
            return None
        if resume.strip().lower() == "latest":
            found = list_checkpoints(self.checkpoint_dir)
            return found[-1] if found else None
        path = Path(resume)
        if not (path / "trainer_state.json").is_file():
            raise InvalidInputError(f"resume: {path} is not a checkpoint folder (no trainer_state.json)")
        return path

    def _eval_grid_axes(
        self, model: EmbeddingModel, trained_dims: list[int] | None
    ) -> tuple[list[int], list[int]]:
        """The evaluation grid: ``eval_layers`` (default 1, L/2, L) x ``eval_dims`` (default: the trained
        dims, else the full size, 1/2 and 1/4), checked by :func:`matryoshka2d.evaluation.resolve_grid`."""
        cfg = self.config
        n, d = model.num_layers, model.dim
        layers = cfg.eval_layers or [1, max(1, n // 2), n]
        dims = cfg.eval_dims or [x for x in (trained_dims or [d, d // 2, d // 4]) if x > 0]
        try:
            return resolve_grid(model, layers, dims)
        except (InvalidLayersError, InvalidDimError) as e:
            option = "eval_layers" if isinstance(e, InvalidLayersError) else "eval_dims"
            raise type(e)(f"option {option!r}: {e}") from None

    # ------------------------------------------------------------------ main entry
    def train(self) -> TrainResult:
        """Run (or continue) training; save checkpoints and, unless stopped early, the final model."""
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState
        from accelerate.utils import DistributedDataParallelKwargs, gather_object, set_seed
        from transformers import get_linear_schedule_with_warmup

        cfg = self.config
        use_cpu = cfg.cpu or not _has_accelerator_device()
        if cfg.mixed_precision == "fp16" and use_cpu:
            raise InvalidInputError("mixed_precision fp16 needs a GPU; use bf16 or no on CPU")
        # accelerate keeps one global state per process; let a second Trainer in the same process use other
        # settings (e.g. bf16 after fp32). The distributed setup (PartialState) is kept.
        reset = getattr(AcceleratorState, "_reset_state", None)
        if callable(reset):
            reset()
        accelerator = Accelerator(
            mixed_precision=cfg.mixed_precision,
            cpu=use_cpu,
            kwargs_handlers=[
                DistributedDataParallelKwargs(find_unused_parameters=cfg.find_unused_parameters)
            ],
        )
        self.accelerator = accelerator
        set_seed(cfg.seed)

        resume_from = self._resume_path()
        if cfg.resume and resume_from is None:
            self._say(f"resume: no checkpoint in {self.checkpoint_dir} yet; starting from step 0")
        state: dict[str, Any] = {}
        if resume_from is not None:
            state = json.loads((resume_from / "trainer_state.json").read_text(encoding="utf-8"))
            model = EmbeddingModel.load(resume_from / "model")
            model.name_or_path = state.get("base_model", cfg.model)  # the model being fine-tuned
        else:
            model = self.model if self.model is not None else EmbeddingModel.load(cfg.model)
        if cfg.max_seq_length is not None:
            model.max_seq_length = cfg.max_seq_length
        # The HF pooler head is never used for embeddings: freeze it so DDP sees no parameter without grad.
        for name, param in model.transformer.named_parameters():
            if name.startswith("pooler."):
                param.requires_grad_(False)
        loss = self.loss if self.loss is not None else build_loss(cfg, model)
        check = getattr(loss, "check_model", None)
        if callable(check):
            check(model)  # dims and fixed layers within the model's range
        needs_labels = bool(getattr(loss, "needs_labels", False))
        in_batch = bool(getattr(loss, "in_batch_negatives", False))
        data = self.data
        if data is None:
            data = load_training_data(
                cfg.train_data, cfg.columns, cfg.label_column, needs_labels, cfg.label_range, cfg.max_rows
            )
        if needs_labels and (data.labels is None or len(data.columns) != 2):
            raise InvalidInputError(
                f"{type(loss).__name__} needs scored pairs: two text columns and a label, got columns "
                f"{data.columns} and label {data.label_column!r}"
            )
        if in_batch and len(data.columns) < 2:
            raise InvalidInputError(
                f"{type(loss).__name__} needs (anchor, positive[, negative]) rows, "
                f"got one column {data.columns}"
            )
        eval_data, eval_axes = None, None
        described = loss_config(loss)
        schedule_dims = {int(d) for _, d in described.get("schedule") or []}
        trained_dims = described.get("dims") or sorted(schedule_dims, reverse=True) or None
        if cfg.eval_data:
            from matryoshka2d.data import load_sts

            eval_data = load_sts(cfg.eval_data)
            eval_axes = self._eval_grid_axes(model, trained_dims)

        no_duplicates = in_batch if cfg.no_duplicates is None else cfg.no_duplicates
        stream = BatchStream(
            data,
            cfg.batch_size,
            cfg.seed,
            no_duplicates,
            accelerator.num_processes,
            accelerator.process_index,
        )
        accum = cfg.gradient_accumulation_steps
        total_steps = cfg.steps or max(1, math.ceil(cfg.epochs * stream.batches_per_epoch() / accum))
        stop_at = min(cfg.stop_at or total_steps, total_steps)
        warmup = (
            cfg.warmup_steps if cfg.warmup_steps is not None else math.ceil(cfg.warmup_ratio * total_steps)
        )

        model.train()
        optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.learning_rate)
        scheduler = get_linear_schedule_with_warmup(optimizer, warmup, total_steps)
        ddp_model, optimizer = accelerator.prepare(model, optimizer)
        loss.to(accelerator.device)
        device = accelerator.device

        step = 0
        log_history: list[dict] = self.log_history
        eval_history: list[dict] = self.eval_history
        log_history.clear()
        eval_history.clear()
        layer_counts: Counter[int] = Counter()
        if resume_from is not None:
            step = int(state["step"])
            log_history.extend(state.get("log_history", []))
            eval_history.extend(state.get("eval_history", []))
            layer_counts = Counter({int(k): v for k, v in state.get("layer_counts", {}).items()})
            optimizer.load_state_dict(
                torch.load(resume_from / "optimizer.pt", map_location=device, weights_only=True)
            )
            scheduler.load_state_dict(torch.load(resume_from / "scheduler.pt", weights_only=True))
            if accelerator.scaler is not None and (resume_from / "scaler.pt").is_file():
                accelerator.scaler.load_state_dict(torch.load(resume_from / "scaler.pt", weights_only=True))
            stream.load_state_dict(state["sampler"])
            rng = torch.load(resume_from / "rng_state.pt", weights_only=False)
            _set_rng_state(rng[accelerator.process_index])  # the stream has checked the process count
            self._say(f"resumed from {resume_from} at step {step}")

        meta = {
            "base_model": state.get("base_model", cfg.model),
            "data": data.describe(),
            "loss": loss_config(loss),
            "trained_dims": trained_dims,
            "num_processes": accelerator.num_processes,
            "total_batch_size": cfg.batch_size * accum * accelerator.num_processes,
            "total_steps": total_steps,
        }
        self._say(
            f"training {meta['base_model']} on {len(data)} rows ({', '.join(data.columns)}) with "
            f"{meta['loss'].get('name', type(loss).__name__)}: {total_steps} steps of "
            f"{meta['total_batch_size']} rows on {accelerator.num_processes} process(es), {device}"
        )

        def save_checkpoint() -> Path:
            rngs = gather_object([_rng_state()])  # every process's random state, in rank order
            path = self.checkpoint_dir / f"{CHECKPOINT_PREFIX}{step}"
            if accelerator.is_main_process:
                with atomic_directory(path) as tmp:
                    accelerator.unwrap_model(ddp_model).save(tmp / "model")
                    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
                    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
                    if accelerator.scaler is not None:
                        torch.save(accelerator.scaler.state_dict(), tmp / "scaler.pt")
                    torch.save(rngs, tmp / "rng_state.pt")
                    trainer_state = {
                        "step": step,
                        "sampler": stream.state_dict(),
                        "base_model": meta["base_model"],
                        "config": cfg.to_dict(),
                        "log_history": log_history,
                        "eval_history": eval_history,
                        "layer_counts": {str(k): v for k, v in sorted(layer_counts.items())},
                    }
                    (tmp / "trainer_state.json").write_text(
                        json.dumps(trainer_state, indent=2), encoding="utf-8"
                    )
                if cfg.save_total_limit:
                    for old in list_checkpoints(self.checkpoint_dir)[: -cfg.save_total_limit]:
                        if old != path:
                            shutil.rmtree(old, ignore_errors=True)
            accelerator.wait_for_everyone()
            return path

        def evaluate() -> dict:
            grid: dict = {}
            if accelerator.is_main_process:
                result = evaluate_sts(
                    accelerator.unwrap_model(ddp_model),
                    eval_data,
                    *eval_axes,
                    batch_size=cfg.eval_batch_size,
                    show_progress=False,
                )
                grid = {"step": step, **result.to_dict()}
                eval_history.append(grid)
                best = grid["spearman"][-1][0]
                self._say(
                    f"step {step}: STS Spearman {best:.2f} at {grid['layers'][-1]} layers x "
                    f"{grid['dims'][0]} dims"
                )
            accelerator.wait_for_everyone()
            return grid

        num_layers = model.num_layers
        window: list[float] = []
        last_loss = log_history[-1]["loss"] if log_history else None
        last_checkpoint: Path | None = None
        bar = tqdm(
            total=stop_at,
            initial=step,
            desc="Training",
            unit="step",
            disable=not (cfg.progress and accelerator.is_main_process),
            dynamic_ncols=True,
        )
        batches = iter(stream)
        train_time, train_steps = 0.0, 0
        while step < stop_at:
            t0 = time.perf_counter()
            step_loss = 0.0
            for micro in range(accum):
                rows = next(batches)
                layers = loss.layers_for_step(num_layers)
                if (
                    max(layers) < num_layers
                    and accelerator.num_processes > 1
                    and not cfg.find_unused_parameters
                ):
                    raise InvalidInputError(
                        f"the loss asked for layers {sorted(layers)} without the last layer ({num_layers}); "
                        "with several processes set find_unused_parameters: true so DDP accepts unused layers"
                    )
                layer_counts.update(int(k) for k in layers)
                features = [
                    {k: v.to(device) for k, v in model.tokenize([column[i] for i in rows]).items()}
                    for column in data.texts
                ]
                labels = (
                    torch.tensor([data.labels[i] for i in rows], dtype=torch.float32, device=device)
                    if needs_labels
                    else None
                )
                sync = contextlib.nullcontext() if micro == accum - 1 else accelerator.no_sync(ddp_model)
                with sync:
                    with accelerator.autocast():
                        outputs = [ddp_model(f, layers=layers) for f in features]
                        value = loss(outputs, labels)
                    if not torch.isfinite(value):
                        raise Matryoshka2dError(
                            f"the loss became {value.item()} at step {step + 1}; lower learning_rate or use "
                            "mixed_precision no"
                        )
                    accelerator.backward(value / accum)
                step_loss += value.item() / accum
            if cfg.max_grad_norm is not None:
                accelerator.clip_grad_norm_(ddp_model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            if not accelerator.optimizer_step_was_skipped:
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            train_time += time.perf_counter() - t0
            train_steps += 1
            window.append(step_loss)
            bar.update(1)
            bar.set_postfix(loss=f"{sum(window) / len(window):.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            if step % cfg.log_steps == 0 or step == stop_at:
                mean = accelerator.reduce(
                    torch.tensor(sum(window) / len(window), device=device), "mean"
                ).item()
                last_loss = mean
                log_history.append({"step": step, "loss": round(mean, 6), "lr": scheduler.get_last_lr()[0]})
                window = []
            if eval_data is not None and (
                (cfg.eval_steps and step % cfg.eval_steps == 0) or step == total_steps
            ):
                evaluate()
            if (cfg.save_steps and step % cfg.save_steps == 0) or (step == stop_at < total_steps):
                last_checkpoint = save_checkpoint()
        bar.close()

        steps_per_second = train_steps / train_time if train_time else 0.0
        self._say(f"{train_steps} steps in {train_time:.1f} s of training: {steps_per_second:.3f} steps/s")
        if step < total_steps:
            self._say(f"stopped at step {step} of {total_steps}; continue with resume: {last_checkpoint}")
            self.model = accelerator.unwrap_model(ddp_model)
            return TrainResult(
                None,
                last_checkpoint,
                step,
                last_loss,
                eval_history[-1] if eval_history else None,
                steps_per_second,
            )

        final_eval = eval_history[-1] if eval_history else None
        output_dir = Path(cfg.output_dir)
        if accelerator.is_main_process:
            trained_layers = {str(k): v for k, v in sorted(layer_counts.items())}
            summary = {
                **meta,
                "trained_layers": trained_layers,
                "steps": step,
                "final_loss": last_loss,
                "config": cfg.to_dict(),
                "evaluation": final_eval,
            }
            unwrapped = accelerator.unwrap_model(ddp_model)
            unwrapped.eval()
            unwrapped.save(
                output_dir,
                model_card=training_model_card(unwrapped, summary),
                metadata={"training": summary},
            )
            self._say(f"saved the trained model to {output_dir}")
        accelerator.wait_for_everyone()
        self.model = accelerator.unwrap_model(ddp_model)
        return TrainResult(output_dir, last_checkpoint, step, last_loss, final_eval, steps_per_second)


def _describe_loss(config: Mapping[str, Any], indent: str = "") -> list[str]:
    """A loss config as a nested markdown list: the name, then one line per setting."""
    lines = [f"{indent}- **{config.get('name', 'loss')}**"]
    for key, value in config.items():
        if key == "name":
            continue
        if isinstance(value, Mapping) and "name" in value:
            lines += [f"{indent}  - {key}:", *_describe_loss(value, indent + "    ")]
        else:
            lines.append(f"{indent}  - {key}: `{json.dumps(value)}`")
    return lines


def training_model_card(model: EmbeddingModel, summary: Mapping[str, Any]) -> str:
    """README.md of a trained model: base model, data, loss and settings, trained dims/layers, evaluation."""
    cfg = summary["config"]
    data = summary["data"]
    loss = summary["loss"]
    dims = summary.get("trained_dims")
    layers = summary.get("trained_layers") or {}
    lines = [
        "---",
        "library_name: sentence-transformers",
        "tags: [sentence-transformers, sentence-similarity, matryoshka, matryoshka2d]",
        f"base_model: {summary['base_model']}",
        "---",
        "",
        f"# {Path(str(cfg['output_dir'])).name}",
        "",
        f"A 2D Matryoshka sentence embedding model trained with matryoshka2d from `{summary['base_model']}`: "
        f"{model.num_layers} transformer layers, {model.dim}-dim embeddings, {model.pooling_mode} pooling. "
        "Use the first k layers and the first d dims for faster, smaller embeddings.",
        "",
        "## Training data",
        "",
        *[f"- `{s['source']}`: {s['rows']} rows" for s in data["sources"]],
        f"- columns: {', '.join(data['columns'])}"
        + (f"; label: {data['label_column']}" if data.get("label_column") else ""),
        "",
        "## Loss",
        "",
        *_describe_loss(loss),
        "",
        f"- trained dims: {dims if dims else f'{model.dim} (full size only)'}",
        "- trained layer counts (times computed): "
        + (", ".join(f"{k}: {v}" for k, v in layers.items()) or "n/a"),
        "",
        "## Training settings",
        "",
        f"- steps: {summary['steps']}, batch size per process: {cfg['batch_size']}, processes: "
        f"{summary['num_processes']}, gradient accumulation: {cfg['gradient_accumulation_steps']} "
        f"(rows per step: {summary['total_batch_size']})",
        f"- AdamW, learning rate {cfg['learning_rate']}, weight decay {cfg['weight_decay']}, linear warmup "
        f"({cfg['warmup_steps'] if cfg['warmup_steps'] is not None else cfg['warmup_ratio']}) and decay, "
        f"gradient clipping {cfg['max_grad_norm']}, mixed precision {cfg['mixed_precision']}, "
        f"seed {cfg['seed']}",
        f"- final training loss: {summary['final_loss']:.4f}"
        if summary.get("final_loss") is not None
        else "",
    ]
    evaluation = summary.get("evaluation")
    if evaluation:
        lines += [
            "",
            "## Evaluation",
            "",
            f"Spearman correlation (x100) of cosine similarity on `{cfg['eval_data']}`, by number of layers "
            "(rows) and embedding dims (columns):",
            "",
            "```text",
            GridResult.from_dict(evaluation).table(),
            "```",
        ]
    lines += [
        "",
        "## Usage",
        "",
        "```python",
        "from matryoshka2d import EmbeddingModel",
        'model = EmbeddingModel.load("path/to/this/folder")',
        f'emb = model.encode(["a sentence"], layers={max(1, model.num_layers // 2)}, '
        f"dim={dims[-1] if dims else model.dim})",
        "```",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- command line


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--config FILE`` and one flag per :class:`TrainConfig` option (``--batch-size``...).

    Scalar flags are parsed (and rejected with a usage error) as they are read; list flags take several
    values or one comma-separated value. Flags that are not given are absent from the namespace, so
    they do not override the config file.
    """
    parser.add_argument("--config", help="YAML file of options; flags given here override it")
    for spec in dataclasses.fields(TrainConfig):
        flag = "--" + spec.name.replace("_", "-")
        kind = spec.metadata["kind"]
        default = spec.default_factory() if spec.default_factory is not dataclasses.MISSING else spec.default
        help_text = f"{spec.metadata['help']} (default: {default})"
        if kind == "bool":
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text
            )
        elif kind in ("str_list", "int_list", "pairs", "columns"):
            parser.add_argument(
                flag, nargs="+", default=argparse.SUPPRESS, metavar=spec.name.upper(), help=help_text
            )
        else:
            parser.add_argument(
                flag,
                type=_flag_type(spec),
                default=argparse.SUPPRESS,
                metavar=spec.name.upper(),
                help=help_text,
            )


def _flag_type(spec: dataclasses.Field):
    def parse(text: str) -> Any:
        try:
            return parse_option(spec, text)
        except InvalidInputError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = spec.name  # argparse names the type in some messages
    return parse


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The config of ``--config`` (if any) with every given flag overriding it."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    flags = {k: v for k, v in vars(args).items() if k in names}
    if getattr(args, "config", None):
        return TrainConfig.from_yaml(args.config, overrides=flags)
    return TrainConfig.from_dict(flags)


def run_train(args: argparse.Namespace) -> int:
    """``m2d train``: build the config from the file and flags, train, print where the result went.

    Prints the final model folder (or, when stopped early with ``stop_at``, the checkpoint to resume
    from) on stdout, once, from the main process.
    """
    result = Trainer(config_from_args(args)).train()
    where = result.output_dir or result.checkpoint
    if where is not None and int(os.environ.get("RANK", "0")) == 0:
        print(where)
    return 0
