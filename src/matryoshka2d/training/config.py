"""The training configuration: every option of ``m2d train``, how it is parsed and checked, and the CLI glue.

:class:`TrainConfig` is a dataclass whose fields are the YAML keys of a training config and the flags of
``m2d train`` (``batch_size`` <-> ``--batch-size``). Each field carries its parsing kind and help text, so
:func:`add_train_arguments` builds one flag per option and :func:`parse_option` parses YAML values and
flag strings the same way. Bad values raise :class:`~matryoshka2d.errors.InvalidInputError` naming the
option.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matryoshka2d.errors import InvalidInputError
from matryoshka2d.validation import check_int, check_real, is_int, is_real

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
    extra_tasks: list[dict] = _option(
        [],
        "json",
        "more training tasks as a JSON list of {train_data, loss, and optionally loss_args, columns, "
        "label_column, label_range, max_rows}; every batch comes from one task, the tasks in proportion to "
        "their batches; each task's loss gets the same wrapper",
    )
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
    overwrite: bool = _option(
        False,
        "bool",
        "replace an output_dir that holds a previous training result, and start afresh in a checkpoint_dir "
        "holding another run's checkpoints (deleting them); never replaces other folders",
    )
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
        if path.is_dir():
            raise InvalidInputError(f"{path} is a folder, not a config file: give the path of a YAML file")
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
        config = cls.from_dict({**values, **(overrides or {})})
        config.source_file = path  # an input of the run: the output folder must not replace it
        return config

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy (for checkpoints and model cards)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def validate(self) -> None:
        """Check required options, types and ranges; raise :class:`InvalidInputError` naming the option."""
        for name in ("model", "output_dir"):
            if not getattr(self, name):
                raise InvalidInputError(f"option {name!r} is required")
        if not self.train_data:
            raise InvalidInputError("option 'train_data' is required: give at least one file or dataset id")
        optional = ("steps", "stop_at", "max_rows", "max_seq_length", "save_total_limit", "warmup_steps")
        minimum = {"save_steps": 0, "eval_steps": 0, "seed": 0, "warmup_steps": 0}
        maximum = {"seed": 2**32 - 1}  # numpy's seed range
        for name in (
            "batch_size",
            "gradient_accumulation_steps",
            "eval_batch_size",
            "log_steps",
            "save_steps",
            "eval_steps",
            "seed",
            *optional,
        ):
            value = getattr(self, name)
            if value is not None or name not in optional:
                check_int(value, f"option {name!r}", minimum=minimum.get(name, 1), maximum=maximum.get(name))
        for name in ("learning_rate", "epochs"):
            if not check_real(getattr(self, name), f"option {name!r}") > 0:
                raise InvalidInputError(f"option {name!r} must be > 0, got {getattr(self, name)}")
        check_real(self.weight_decay, "option 'weight_decay'", minimum=0)
        if not 0 <= check_real(self.warmup_ratio, "option 'warmup_ratio'") < 1:
            raise InvalidInputError(f"option 'warmup_ratio' must be in [0, 1), got {self.warmup_ratio}")
        if (
            self.max_grad_norm is not None
            and not check_real(self.max_grad_norm, "option 'max_grad_norm'") > 0
        ):
            raise InvalidInputError(f"option 'max_grad_norm' must be > 0 (or none), got {self.max_grad_norm}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise InvalidInputError(
                f"option 'mixed_precision' must be no, bf16 or fp16, got {self.mixed_precision!r}"
            )
        if self.stop_at is not None and self.steps is not None and self.stop_at > self.steps:
            raise InvalidInputError(f"option 'stop_at' ({self.stop_at}) is beyond 'steps' ({self.steps})")
        for name in ("dims", "eval_layers", "eval_dims"):
            values = getattr(self, name)
            if values is not None and (
                not isinstance(values, (list, tuple))
                or not values
                or not all(is_int(v) and v >= 1 for v in values)
            ):
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
                or not all(map(is_real, low_high))
            ):
                raise InvalidInputError(
                    f"option 'label_range' must be a list of two numbers [low, high] (e.g. [0, 5]), "
                    f"got {low_high!r}"
                )
            if not low_high[0] < low_high[1]:
                raise InvalidInputError(f"option 'label_range' must have low < high, got {list(low_high)}")
        self.extra_tasks = [self._parse_task(i, task) for i, task in enumerate(self.extra_tasks)]

    def _parse_task(self, index: int, task: Any) -> dict[str, Any]:
        """One ``extra_tasks`` entry, parsed and checked like the options of the same names."""
        where = f"option 'extra_tasks' item {index}"
        if not isinstance(task, Mapping):
            raise InvalidInputError(
                f"{where}: expected a mapping like {{train_data: ..., loss: ...}}, got {task!r}"
            )
        known = {f.name: f for f in dataclasses.fields(self) if f.name in TASK_OPTIONS}
        parsed: dict[str, Any] = {}
        for key, value in task.items():
            name = str(key).replace("-", "_")
            if name not in known:
                raise InvalidInputError(f"{where}: unknown key {key!r} (keys: {list(TASK_OPTIONS)})")
            try:
                parsed[name] = parse_option(known[name], value)
            except InvalidInputError as e:
                raise InvalidInputError(f"{where}: {e}") from None
        for name in ("train_data", "loss"):
            if not parsed.get(name):
                raise InvalidInputError(f"{where}: {name!r} is required")
        try:
            # The task's own values checked by the same rules as the main task's options.
            self.task_config(parsed).validate()
        except InvalidInputError as e:
            raise InvalidInputError(f"{where}: {e}") from None
        return parsed

    def task_config(self, task: Mapping[str, Any]) -> TrainConfig:
        """This config with one ``extra_tasks`` entry's data and loss options (unset ones: their defaults)."""
        defaults = TrainConfig(**{n: getattr(self, n) for n in ("model", "output_dir")})
        values = {name: copy.deepcopy(task.get(name, getattr(defaults, name))) for name in TASK_OPTIONS}
        return dataclasses.replace(self, **values, extra_tasks=[])


#: The keys of an ``extra_tasks`` entry: the data and base-loss options of the main task.
TASK_OPTIONS = (
    "train_data",
    "loss",
    "loss_args",
    "columns",
    "label_column",
    "label_range",
    "max_rows",
)


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
        if is_int(v):
            return int(v)
        if is_real(v) and float(v).is_integer():
            return int(v)
        if isinstance(v, str):
            try:
                return int(v.strip())
            except ValueError:
                pass
        raise fail("an integer")

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
        if isinstance(value, bool) or not is_real(out):
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
        if not isinstance(value, (str, list, tuple)):
            raise fail("(layers, dim) pairs like 2:32,4:64 or [[2, 32], [4, 64]]")
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
