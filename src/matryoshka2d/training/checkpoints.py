"""Checkpoints of a training run: writing, listing, reading (with clear errors), random states, run identity.

A checkpoint is a folder ``checkpoint-<step>/`` written atomically (a temporary folder renamed into place)::

    model/               a complete, loadable model folder
    optimizer.pt         AdamW state
    scheduler.pt         learning-rate schedule state
    scaler.pt            fp16 loss scaler (fp16 only)
    rng_state.pt         the Python, NumPy, torch (and CUDA) random states of every process, in rank order
    trainer_state.json   step, data position, run identity and fingerprint, config, logs, layer counts

**Run identity.** Every checkpoint records the options that define *what* is trained (:data:`RUN_OPTIONS`:
the base model, the data, the loss, the optimisation schedule and the seed) and a short hash of them, the
run fingerprint. Resuming compares the checkpoint's identity with the current config and refuses a
checkpoint of another run, naming the options that differ. Options that only say *where* and *how
often* (``output_dir``, ``checkpoint_dir``, ``stop_at``, ``save_steps``, logging, evaluation, progress) are
not part of it, so a run can be continued in slices (``stop_at``) and evaluated differently. ``steps`` and
``epochs`` are part of it: they shape the learning-rate schedule, so a run with more steps is a different
run (use ``stop_at`` to split one run into slices).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from matryoshka2d.errors import InvalidInputError, Matryoshka2dError, first_line
from matryoshka2d.persistence import atomic_directory
from matryoshka2d.validation import is_int

if TYPE_CHECKING:
    from matryoshka2d.training.config import TrainConfig

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"

#: The options that define a run, grouped as recorded in ``trainer_state.json`` under ``"run"``.
RUN_OPTIONS: dict[str, tuple[str, ...]] = {
    "model": ("model",),
    "data": ("train_data", "columns", "label_column", "label_range", "max_rows"),
    "loss": ("loss", "loss_args", "wrapper", "dims", "schedule", "wrapper_args"),
    "schedule": (
        "steps",
        "epochs",
        "batch_size",
        "gradient_accumulation_steps",
        "learning_rate",
        "weight_decay",
        "warmup_ratio",
        "warmup_steps",
        "max_grad_norm",
        "mixed_precision",
        "max_seq_length",
        "no_duplicates",
    ),
    "seed": ("seed",),
}


class CheckpointError(Matryoshka2dError):
    """A checkpoint that cannot be used: a missing or corrupt file, or a checkpoint of another run."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint file that is missing, truncated or unreadable (the message names the file)."""


# ---------------------------------------------------------------------------------------------- listing
def checkpoint_step(path: str | os.PathLike) -> int | None:
    """The step of a folder named ``checkpoint-<step>``, else None."""
    match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", Path(path).name)
    return int(match.group(1)) if match else None


def list_checkpoints(checkpoint_dir: str | os.PathLike) -> list[Path]:
    """Checkpoint folders in ``checkpoint_dir`` (those with a ``trainer_state.json``), oldest step first."""
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        step = checkpoint_step(path)
        if step is not None and (path / STATE_FILE).is_file():
            found.append((step, path))
    return [path for _, path in sorted(found)]


def prune_checkpoints(checkpoint_dir: Path, keep: int, current: Path) -> None:
    """Delete all but the newest ``keep`` checkpoints (never ``current``)."""
    for old in list_checkpoints(checkpoint_dir)[:-keep]:
        if old != current:
            shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- run identity
def _normal_source(value: Any) -> Any:
    """A path-like option without ``./`` and trailing slashes, so ``./m/`` and ``m`` are the same."""
    if isinstance(value, str) and value and ("/" in value or "\\" in value or value.startswith(".")):
        return os.path.normpath(value)
    return value


def run_identity(
    config: TrainConfig, loss: Mapping[str, Any] | None = None, data: Mapping[str, Any] | None = None
) -> dict[str, dict[str, Any]]:
    """The options that define the run (:data:`RUN_OPTIONS`), JSON-ready.

    Args:
        config: the training config.
        loss: the description of a loss object given instead of the config's loss (``loss_config``).
        data: the description of a data object given instead of ``train_data`` (``TrainingData.describe``).
    """
    values = config.to_dict()
    identity = {group: {name: values[name] for name in names} for group, names in RUN_OPTIONS.items()}
    identity["model"]["model"] = _normal_source(identity["model"]["model"])
    identity["data"]["train_data"] = [_normal_source(s) for s in identity["data"]["train_data"]]
    if values.get("extra_tasks"):  # only when set: runs without extra tasks keep their earlier identity
        identity["data"]["extra_tasks"] = [
            {**task, "train_data": [_normal_source(s) for s in task["train_data"]]}
            for task in values["extra_tasks"]
        ]
    if loss is not None:
        identity["loss"] = {"object": json.loads(json.dumps(loss, default=str))}
    if data is not None:
        identity["data"] = {"object": json.loads(json.dumps(data, default=str))}
    return identity


def run_fingerprint(identity: Mapping[str, Any]) -> str:
    """A short hash (16 hex digits) of a run identity."""
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def same_model(a: str, b: str) -> bool:
    """Whether two ``model`` options name the same model (equal text, or the same local folder)."""
    if _normal_source(a) == _normal_source(b):
        return True
    try:
        return Path(a).expanduser().exists() and os.path.samefile(Path(a).expanduser(), Path(b).expanduser())
    except OSError:
        return False


def identity_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``"name: saved -> current"`` for every option that differs between two run identities."""
    out = []
    for group in sorted(set(saved) | set(current)):
        mine, theirs = saved.get(group, {}), current.get(group, {})
        for name in sorted(set(mine) | set(theirs)):
            a, b = mine.get(name), theirs.get(name)
            if name == "model" and isinstance(a, str) and isinstance(b, str) and same_model(a, b):
                continue
            if name == "train_data" and isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
                if all(same_model(x, y) for x, y in zip(a, b)):  # the same files, spelled differently
                    continue
            if a != b:
                out.append(f"{name}: {json.dumps(a)} there, {json.dumps(b)} now")
    return out


# ---------------------------------------------------------------------------------------------- random states
def rng_state() -> dict:
    """This process's Python, NumPy, torch (and CUDA) random states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping) -> None:
    """Restore random states saved by :func:`rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------- write / read
def save_checkpoint(
    path: Path,
    model: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
    rngs: list[dict],
    state: Mapping[str, Any],
    kind: str = "checkpoint",
) -> Path:
    """Write one checkpoint folder atomically (see the module docstring for its files).

    An existing checkpoint folder of the same step (a run started again from step 0) is replaced.
    """
    with atomic_directory(path, kind, overwrite=True) as tmp:
        model.save(tmp / "model")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        if scaler is not None:
            torch.save(scaler.state_dict(), tmp / "scaler.pt")
        torch.save(rngs, tmp / "rng_state.pt")
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2), encoding="utf-8")
    return path


def read_state(path: Path) -> dict:
    """The ``trainer_state.json`` of a checkpoint, checked for the entries resuming needs.

    Raises:
        CorruptCheckpointError: the file is missing, not JSON, or lacks/garbles an entry (names the file).
    """
    file = Path(path) / STATE_FILE
    try:
        state = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{file} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptCheckpointError(f"{file} is not valid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(state, dict):
        raise CorruptCheckpointError(f"{file}: expected a JSON object, got {type(state).__name__}")
    step = state.get("step")
    sampler = state.get("sampler")
    if not is_int(step) or step < 0:
        raise CorruptCheckpointError(f"{file}: 'step' is {step!r}, expected a step number")
    if not isinstance(sampler, dict) or not all(is_int(sampler.get(k)) for k in ("epoch", "position")):
        raise CorruptCheckpointError(f"{file}: 'sampler' is {sampler!r}, expected the data position")
    for key, kind in (
        ("config", dict),
        ("log_history", list),
        ("eval_history", list),
        ("layer_counts", dict),
    ):
        if key in state and not isinstance(state[key], kind):
            raise CorruptCheckpointError(f"{file}: {key!r} is not a JSON {kind.__name__}")
    # What resuming reads from it: checked here, so that a damaged entry is one line naming the file
    # (and "resume latest" falls back to an older checkpoint), not a traceback while resuming.
    for entry in state.get("log_history", []):
        if not (isinstance(entry, dict) and is_int(entry.get("step")) and _is_number(entry.get("loss"))):
            raise CorruptCheckpointError(f"{file}: 'log_history' holds {entry!r:.80}, not a logged step")
    if not all(isinstance(entry, dict) for entry in state.get("eval_history", [])):
        raise CorruptCheckpointError(f"{file}: 'eval_history' holds something else than evaluations")
    for key in ("layer_counts", "task_batches"):
        counts = state.get(key, {})
        if not isinstance(counts, dict) or not all(
            isinstance(k, str) and k.isdigit() and is_int(v) for k, v in counts.items()
        ):
            raise CorruptCheckpointError(f"{file}: {key!r} is {counts!r:.80}, expected counts by number")
    tasks = state.get("tasks")
    if tasks is not None:
        streams = tasks.get("streams") if isinstance(tasks, dict) else None
        if not isinstance(streams, list) or not all(
            isinstance(s, dict) and all(is_int(s.get(k)) for k in ("epoch", "position"))
            for s in [tasks, *streams]
        ):
            raise CorruptCheckpointError(
                f"{file}: 'tasks' is {tasks!r:.80}, expected the tasks' data positions"
            )
    windows = state.get("loss_windows")
    if windows is not None and not (
        isinstance(windows, list) and all(isinstance(w, list) and all(map(_is_number, w)) for w in windows)
    ):
        raise CorruptCheckpointError(f"{file}: 'loss_windows' is {windows!r:.80}, expected lists of losses")
    return state


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _load_tensor_file(file: Path, map_location: Any = None, weights_only: bool = True) -> Any:
    if not file.is_file():
        raise CorruptCheckpointError(f"{file} is missing")
    try:
        return torch.load(file, map_location=map_location, weights_only=weights_only)
    except Exception as e:  # truncated zip, unpickling errors, ...: one line naming the file
        first = first_line(e)
        raise CorruptCheckpointError(f"{file} is corrupt or truncated ({first})") from None


@dataclass
class LoadedCheckpoint:
    """Everything read from a checkpoint folder, before it is applied to a run."""

    path: Path
    state: dict
    model: Any
    optimizer: dict
    scheduler: dict
    scaler: dict | None
    rngs: list


def load_checkpoint(path: Path, map_location: Any = None, num_processes: int = 1) -> LoadedCheckpoint:
    """Read and check every file of a checkpoint (the model too).

    Raises:
        CorruptCheckpointError: a missing, truncated or invalid file (the message names it).
    """
    from matryoshka2d.model import EmbeddingModel

    path = Path(path)
    state = read_state(path)
    optimizer = _load_tensor_file(path / "optimizer.pt", map_location)
    scheduler = _load_tensor_file(path / "scheduler.pt")
    scaler = _load_tensor_file(path / "scaler.pt") if (path / "scaler.pt").is_file() else None
    rngs = _load_tensor_file(path / "rng_state.pt", weights_only=False)
    if not isinstance(optimizer, dict) or "state" not in optimizer:
        raise CorruptCheckpointError(f"{path / 'optimizer.pt'} does not hold an optimizer state")
    if not isinstance(rngs, list) or not all(isinstance(r, dict) and "torch" in r for r in rngs):
        raise CorruptCheckpointError(f"{path / 'rng_state.pt'} does not hold the random states")
    if len(rngs) != num_processes:
        raise InvalidInputError(
            f"cannot resume: {path} was made with {len(rngs)} process(es), now {num_processes}; "
            "resume with the same number of processes"
        )
    try:
        model = EmbeddingModel.load(path / "model")
    except Matryoshka2dError as e:
        raise CorruptCheckpointError(f"{path / 'model'}: {e}") from None
    except Exception as e:  # a truncated safetensors file and the like
        first = first_line(e)
        raise CorruptCheckpointError(f"{path / 'model'} is corrupt or truncated ({first})") from None
    return LoadedCheckpoint(path, state, model, optimizer, scheduler, scaler, rngs)
