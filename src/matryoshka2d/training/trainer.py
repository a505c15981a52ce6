"""The training loop: :class:`Trainer` runs (or continues) a run described by a :class:`TrainConfig`.

The loop is deliberately plain (nanoGPT style) and built on ``accelerate`` for device placement, mixed
precision and multi-process data parallelism (DDP). :meth:`Trainer.train` reads as::

    setup()                      # paths, lock, resume, model, loss, data, optimizer
    while step < stop_at:
        train_step()             # accumulate gradients over micro-batches, clip, step
        after_step()             # log, evaluate, checkpoint
    finish()                     # save the final model with its model card

Each optimizer step:

1. asks the loss which layer counts it needs (``loss.layers_for_step(model.num_layers)``; the 2D loss
   samples them),
2. runs ONE forward pass per input column (anchor, positive, ...) returning the pooled embedding of every
   requested layer (:meth:`matryoshka2d.model.EmbeddingModel.forward`),
3. computes the loss from those embeddings (and labels), back-propagates, clips and steps AdamW with a
   linear warmup/decay schedule.

Every ``save_steps`` steps a checkpoint is written (:mod:`matryoshka2d.training.checkpoints`), so
``resume`` continues exactly as if training had not stopped; a run only resumes its own checkpoints and
holds a lock on its checkpoint folder (:mod:`matryoshka2d.training.run_guard`). The final model is saved
in the sentence-transformers layout with a model card (:mod:`matryoshka2d.training.model_card`).

Usage (Python)::

    from matryoshka2d.training import TrainConfig, Trainer
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
import math
import os
import shutil
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from matryoshka2d.errors import InvalidDimError, InvalidInputError, InvalidLayersError, Matryoshka2dError
from matryoshka2d.evaluation.sts import evaluate_sts, resolve_grid
from matryoshka2d.model import EmbeddingModel
from matryoshka2d.training.checkpoints import (
    CHECKPOINT_PREFIX,
    STATE_FILE,
    CheckpointError,
    CorruptCheckpointError,
    LoadedCheckpoint,
    identity_differences,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    read_state,
    rng_state,
    run_fingerprint,
    run_identity,
    same_model,
    save_checkpoint,
    set_rng_state,
)
from matryoshka2d.training.config import TrainConfig, add_train_arguments, config_from_args
from matryoshka2d.training.data import BatchStream, TaskMixer, TrainingData, load_training_data
from matryoshka2d.training.loss_factory import build_loss, default_dims, loss_config
from matryoshka2d.training.model_card import training_model_card
from matryoshka2d.training.run_guard import (
    CHECKPOINT_KIND,
    RunLock,
    check_run_paths,
    prepare_checkpoint_dir,
    run_inputs,
)

__all__ = [
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "add_train_arguments",
    "build_loss",
    "config_from_args",
    "default_dims",
    "list_checkpoints",
    "run_train",
]


def _checked_loss(loss: nn.Module, model: EmbeddingModel) -> bool:
    """Check ``loss`` against ``model`` (dims and fixed layers within range); whether it needs labels."""
    check = getattr(loss, "check_model", None)
    if callable(check):
        check(model)
    return bool(getattr(loss, "needs_labels", False))


def _load_data(cfg: TrainConfig, needs_labels: bool) -> TrainingData:
    """The training rows described by the data options of ``cfg`` (``train_data``, ``columns``, ...)."""
    if not needs_labels:  # they would be dropped without a word
        given = [name for name in ("label_column", "label_range") if getattr(cfg, name) is not None]
        if given:
            raise InvalidInputError(
                f"option {given[0]!r}: the loss {cfg.loss} takes no labels (CoSENTLoss, AnglELoss and "
                "CosineSimilarityLoss do); leave it out or choose one of those"
            )
    return load_training_data(
        cfg.train_data, cfg.columns, cfg.label_column, needs_labels, cfg.label_range, cfg.max_rows
    )


@dataclass
class Task:
    """One training task: its rows, its loss (the wrapper around its base loss) and its batch stream."""

    data: TrainingData
    loss: nn.Module
    needs_labels: bool
    stream: BatchStream


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


class Trainer:
    """Trains an :class:`~matryoshka2d.model.EmbeddingModel` as described by a :class:`TrainConfig`.

    Args:
        config: the options.
        model, loss, data: optional ready-made objects replacing ``config.model`` / the loss built from the
            config / ``config.train_data`` (handy in Python; the CLI builds everything from the config).
            A resumed run always reloads the model from the checkpoint. A given loss or data object is
            described in the run fingerprint by its ``config()`` / ``describe()``.

    After :meth:`train`, ``model`` is the trained model and ``log_history`` / ``eval_history`` hold the
    logged losses and evaluation grids.
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
        self._given_model, self._given_loss, self._given_data = model, loss, data
        self.log_history: list[dict] = []  # {"step", "loss", "lr"} every log_steps steps
        self.eval_history: list[dict] = []  # evaluation grids, with their step
        self.checkpoint_dir = Path(config.checkpoint_dir or f"{config.output_dir.rstrip('/')}-checkpoints")
        #: The options that define this run (see :mod:`matryoshka2d.training.checkpoints`) and their hash.
        self.identity = run_identity(
            config,
            loss=loss_config(loss) if loss is not None else None,
            data=data.describe() if data is not None else None,
        )
        self.fingerprint = run_fingerprint(self.identity)
        self._lock: RunLock | None = None
        self._created_checkpoint_dir = False
        self._bar: Any = None

    # ------------------------------------------------------------------ the loop
    def train(self) -> TrainResult:
        """Run (or continue) training; save checkpoints and, unless stopped early, the final model.

        Raises:
            OutputPathError: ``output_dir`` or ``checkpoint_dir`` may not be written (checked first).
            RunLockedError: another live run uses the checkpoint folder.
            CheckpointError: the checkpoint to resume belongs to another run or is corrupt.
        """
        try:
            self._setup()
            while self.step < self.stop_at:
                self._train_step()
                self._after_step()
            return self._finish()
        finally:
            self._close()

    # ------------------------------------------------------------------ setup
    def _setup(self) -> None:
        resume = self.config.resume
        if (
            resume is not None
            and resume.strip().lower() != "latest"
            and not (Path(resume) / STATE_FILE).is_file()
        ):
            raise InvalidInputError(f"resume: {resume} is not a checkpoint folder (no {STATE_FILE})")
        check_run_paths(self.config, self.checkpoint_dir)  # before anything is loaded or written
        self._start_accelerator()
        self._lock_run()
        resumed = self._choose_checkpoint()
        self._build(resumed)
        if resumed is not None:
            self._restore(resumed)
        self._announce()

    def _start_accelerator(self) -> None:
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState
        from accelerate.utils import DistributedDataParallelKwargs, set_seed

        cfg = self.config
        use_cpu = cfg.cpu or not _has_accelerator_device()
        if cfg.mixed_precision == "fp16" and use_cpu:
            raise InvalidInputError("mixed_precision fp16 needs a GPU; use bf16 or no on CPU")
        # accelerate keeps one global state per process; let a second Trainer in the same process use other
        # settings (e.g. bf16 after fp32). The distributed setup (PartialState) is kept.
        reset = getattr(AcceleratorState, "_reset_state", None)
        if callable(reset):
            reset()
        self.accelerator = Accelerator(
            mixed_precision=cfg.mixed_precision,
            cpu=use_cpu,
            kwargs_handlers=[
                DistributedDataParallelKwargs(find_unused_parameters=cfg.find_unused_parameters)
            ],
        )
        self.device = self.accelerator.device
        set_seed(cfg.seed)

    def _lock_run(self) -> None:
        """The main process marks the checkpoint folder and locks it; every process learns the outcome."""
        error: Exception | None = None
        if self.accelerator.is_main_process:
            try:
                self._created_checkpoint_dir = prepare_checkpoint_dir(self.config, self.checkpoint_dir)
                self._lock = RunLock(
                    self.checkpoint_dir, f"{self.config.output_dir} (run {self.fingerprint})"
                ).acquire()
            except Exception as e:  # every process must learn of it, or the others would wait forever
                error = e
        if self.accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            message = [None if error is None else (type(error), str(error))]
            broadcast_object_list(message)
            if message[0] is not None and error is None:
                kind, text = message[0]
                error = kind(text) if issubclass(kind, Matryoshka2dError) else RuntimeError(text)
        if error is not None:
            raise error

    def _warn(self, message: str) -> None:
        if self.accelerator.is_main_process:
            warnings.warn(message, stacklevel=4)

    def _say(self, message: str) -> None:
        if self.accelerator.is_main_process:
            tqdm.write(message, file=sys.stderr)

    def _check_same_run(self, path: Path, state: dict) -> None:
        """Refuse a checkpoint written by another run (another base model, data, loss, schedule or seed)."""
        cfg = self.config
        saved_model = state.get("base_model")
        if isinstance(saved_model, str) and not same_model(saved_model, cfg.model):
            raise CheckpointError(
                f"resume: {path} continues training of model {saved_model!r}, but this run's model is "
                f"{cfg.model!r}; give --model {saved_model} to continue it, or another output_dir / "
                "checkpoint_dir to start a new run"
            )
        saved = state.get("run")
        if not isinstance(saved, dict):  # written before run fingerprints: rebuild it from the config
            try:
                saved = run_identity(TrainConfig.from_dict(state.get("config") or {}))
            except Matryoshka2dError as e:
                raise CorruptCheckpointError(f"{path / STATE_FILE}: 'config' is unusable ({e})") from None
        differences = identity_differences(saved, self.identity)
        if differences:
            shown = "; ".join(differences[:3]) + ("; ..." if len(differences) > 3 else "")
            raise CheckpointError(
                f"resume: {path} belongs to another run ({shown}); resume with that run's settings, or give "
                "this run another output_dir / checkpoint_dir"
            )

    def _choose_checkpoint(self) -> LoadedCheckpoint | None:
        """The checkpoint to resume from (read and checked), or None to start at step 0."""
        cfg = self.config
        found = list_checkpoints(self.checkpoint_dir)
        if cfg.resume is None:
            self._check_fresh_start(found)
            return None
        latest = cfg.resume.strip().lower() == "latest"
        if latest:
            if not found:
                self._say(f"resume: no checkpoint in {self.checkpoint_dir} yet; starting from step 0")
                return None
            candidates = list(reversed(found))
        else:
            candidates = [Path(cfg.resume)]  # a checkpoint folder (checked in _setup)
        for path in candidates:
            try:
                self._check_same_run(path, read_state(path))
                # Read onto the CPU: the optimizer moves its state to its parameters' device when it
                # loads it, and a process of a multi-process CPU run is on "cpu:N", a location
                # torch.load cannot map to.
                return load_checkpoint(path, "cpu", self.accelerator.num_processes)
            except CorruptCheckpointError as e:
                if not latest:
                    raise CorruptCheckpointError(f"resume: {e}") from None
                self._warn(f"resume latest: skipping a damaged checkpoint: {e}")
        raise CorruptCheckpointError(
            f"resume latest: no intact checkpoint in {self.checkpoint_dir} (all {len(found)} are damaged); "
            "remove them to start afresh"
        )

    def _check_fresh_start(self, found: list[Path]) -> None:
        """A new run (no ``resume``) in a checkpoint folder that already holds checkpoints."""
        if not found:
            return
        newest = found[-1]
        try:
            self._check_same_run(newest, read_state(newest))
            same = True
        except CheckpointError:  # another run's, or unreadable
            same = False
        if same:
            self._warn(
                f"{self.checkpoint_dir} holds checkpoints of this run up to {newest.name}; starting again "
                "from step 0 (give resume: latest to continue instead)"
            )
            return
        if not self.config.overwrite:
            raise CheckpointError(
                f"{self.checkpoint_dir} holds checkpoints of another run (newest: {newest.name}); give this "
                "run another output_dir / checkpoint_dir, or overwrite: true (--overwrite) to delete them"
            )
        self._warn(f"overwrite: deleting {len(found)} checkpoint(s) of another run in {self.checkpoint_dir}")
        if self.accelerator.is_main_process:
            for path in found:
                shutil.rmtree(path)
        self.accelerator.wait_for_everyone()

    def _build(self, resumed: LoadedCheckpoint | None) -> None:
        """Model and loss, data and evaluation set, then the optimizer and schedule (in this order: the random
        number streams depend on it), and the counters of a run at step 0."""
        self.model, self.loss = self._build_model_and_loss(resumed)
        self.data, self.stream = self._build_data()
        self.tasks = [Task(self.data, self.loss, self.needs_labels, self.stream), *self._build_extra_tasks()]
        #: Which task each batch comes from (one task: that task's batches in their own order).
        self.mixer = TaskMixer([task.stream for task in self.tasks], self.config.seed)
        self._build_optimizer()
        self.step = 0
        self.log_history.clear()
        self.eval_history.clear()
        self.layer_counts: Counter[int] = Counter()
        self.task_counts: Counter[int] = Counter()  # batches taken from each task
        cfg = self.config
        self.base_model = cfg.model if resumed is None else resumed.state.get("base_model", cfg.model)
        self.window: list[float] = []  # step losses since the last log entry
        self.last_loss: float | None = None
        self.last_checkpoint: Path | None = None
        self.train_time, self.train_steps = 0.0, 0
        self.batches = iter(self.mixer)

    def _build_model_and_loss(self, resumed: LoadedCheckpoint | None) -> tuple[EmbeddingModel, nn.Module]:
        cfg = self.config
        if resumed is not None:
            model = resumed.model
            model.name_or_path = resumed.state.get("base_model", cfg.model)  # the model being fine-tuned
        else:
            model = self._given_model if self._given_model is not None else EmbeddingModel.load(cfg.model)
            if model.exit_rotations:  # fitted to the weights training is about to change
                warnings.warn(
                    f"{cfg.model}: its layer exits {sorted(model.exit_rotations)} are rotated (m2d rotate); "
                    "the rotations fit its current weights only, so training starts without them: run "
                    "`m2d rotate` on the trained model to fit new ones",
                    stacklevel=2,
                )
                model.set_exit_rotations({})
        if cfg.max_seq_length is not None:
            model.max_seq_length = cfg.max_seq_length  # checked by the setter (1..the position embeddings)
        # The HF pooler head is never used for embeddings: freeze it so DDP sees no parameter without grad.
        for name, param in model.transformer.named_parameters():
            if name.startswith("pooler."):
                param.requires_grad_(False)
        loss = self._given_loss if self._given_loss is not None else build_loss(cfg, model)
        self.needs_labels = _checked_loss(loss, model)
        described = loss_config(loss)
        schedule_dims = {int(d) for _, d in described.get("schedule") or []}
        self.trained_dims = described.get("dims") or sorted(schedule_dims, reverse=True) or None
        return model, loss

    def _build_data(self) -> tuple[TrainingData, BatchStream]:
        """The training rows (checked against the loss), the evaluation set, this process's batch stream."""
        cfg = self.config
        data = self._given_data if self._given_data is not None else _load_data(cfg, self.needs_labels)
        self._check_data(self.loss, data, self.needs_labels)
        self.eval_data, self.eval_axes = None, None
        if cfg.eval_data:
            from matryoshka2d.data import load_sts

            self.eval_data = load_sts(cfg.eval_data)
            self.eval_axes = self._eval_grid_axes(self.model, self.trained_dims)
        return data, self._stream(data, self.loss)

    def _stream(self, data: TrainingData, loss: nn.Module) -> BatchStream:
        """This process's batch stream over ``data`` (distinct texts per batch for in-batch negatives)."""
        cfg, accelerator = self.config, self.accelerator
        in_batch = bool(getattr(loss, "in_batch_negatives", False))
        no_duplicates = in_batch if cfg.no_duplicates is None else cfg.no_duplicates
        return BatchStream(
            data,
            cfg.batch_size,
            cfg.seed,
            no_duplicates,
            accelerator.num_processes,
            accelerator.process_index,
        )

    def _build_extra_tasks(self) -> list[Task]:
        """The ``extra_tasks``: each with its own data and base loss, wrapped like the main task's."""
        tasks = []
        for index, options in enumerate(self.config.extra_tasks):
            cfg = self.config.task_config(options)
            loss = build_loss(cfg, self.model)
            needs_labels = _checked_loss(loss, self.model)
            try:
                data = _load_data(cfg, needs_labels)
                self._check_data(loss, data, needs_labels)
                stream = self._stream(data, loss)
            except Matryoshka2dError as e:  # every subclass takes one message
                raise type(e)(f"extra_tasks item {index}: {e}") from None
            tasks.append(Task(data, loss, needs_labels, stream))
        return tasks

    def _build_optimizer(self) -> None:
        """Step counts, AdamW with linear warmup and decay, and accelerate's wrapping (DDP, precision)."""
        from transformers import get_linear_schedule_with_warmup

        cfg = self.config
        self.accum = cfg.gradient_accumulation_steps
        self.total_steps = cfg.steps or max(
            1, math.ceil(cfg.epochs * self.mixer.batches_per_epoch() / self.accum)
        )
        self.stop_at = min(cfg.stop_at or self.total_steps, self.total_steps)
        warmup = (
            cfg.warmup_steps
            if cfg.warmup_steps is not None
            else math.ceil(cfg.warmup_ratio * self.total_steps)
        )
        self.model.train()
        optimizer = torch.optim.AdamW(_param_groups(self.model, cfg.weight_decay), lr=cfg.learning_rate)
        self.scheduler = get_linear_schedule_with_warmup(optimizer, warmup, self.total_steps)
        self.ddp_model, self.optimizer = self.accelerator.prepare(self.model, optimizer)
        for task in self.tasks:
            task.loss.to(self.device)

    def _check_data(self, loss: nn.Module, data: TrainingData, needs_labels: bool) -> None:
        if needs_labels and (data.labels is None or len(data.columns) != 2):
            raise InvalidInputError(
                f"{type(loss).__name__} needs scored pairs: two text columns and a label, got columns "
                f"{data.columns} and label {data.label_column!r}"
            )
        if getattr(loss, "in_batch_negatives", False) and len(data.columns) < 2:
            raise InvalidInputError(
                f"{type(loss).__name__} needs (anchor, positive[, negative]) rows, "
                f"got one column {data.columns}"
            )
        base = getattr(loss, "base", loss)
        bounds = getattr(base, "label_bounds", None)
        if bounds is not None and data.labels:  # labels rescaled by label_range are checked as rescaled
            low, high = bounds
            outside = [x for x in data.labels if not low <= x <= high]
            if outside:  # e.g. a cosine never reaches 5: the loss would pull every pair towards +-1
                raise InvalidInputError(
                    f"{type(base).__name__} takes labels in {low:g}..{high:g} only, but {len(outside)} "
                    f"labels lie outside (e.g. {outside[0]}): set label_range to the labels' scale, e.g. "
                    "[0, 5] for STS Benchmark scores"
                )
        # A loss that compares the rows of a batch has nothing to learn from a batch of one: its value is
        # exactly 0 (MultipleNegativesRankingLoss without a negative column: one candidate per anchor).
        gathered = getattr(base, "gather_across_devices", False)
        rows = self.config.batch_size * (self.accelerator.num_processes if gathered else 1)
        compares = getattr(loss, "ranks_pairs", False) or (
            getattr(loss, "in_batch_negatives", False) and len(data.columns) == 2
        )
        if compares and rows < 2:
            raise InvalidInputError(
                f"batch_size {self.config.batch_size}: {type(base).__name__} compares the rows of a batch "
                "with each other, so a batch of one row gives a loss of 0 (nothing is trained); use "
                "batch_size 2 or more"
            )

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

    def _restore(self, resumed: LoadedCheckpoint) -> None:
        """Continue exactly where the checkpoint stopped: states, logs, data position, random states."""
        state = resumed.state
        self.step = int(state["step"])
        self.log_history.extend(state.get("log_history", []))
        self.eval_history.extend(state.get("eval_history", []))
        self.layer_counts = Counter({int(k): v for k, v in state.get("layer_counts", {}).items()})
        self.last_loss = self.log_history[-1]["loss"] if self.log_history else None
        windows = state.get("loss_windows")  # absent in checkpoints written before it was saved
        self.window = list(windows[self.accelerator.process_index]) if windows else []
        self.optimizer.load_state_dict(resumed.optimizer)
        self.scheduler.load_state_dict(resumed.scheduler)
        if self.accelerator.scaler is not None and resumed.scaler is not None:
            self.accelerator.scaler.load_state_dict(resumed.scaler)
        self.task_counts = Counter({int(k): v for k, v in state.get("task_batches", {}).items()})
        if "tasks" in state:
            self.mixer.load_state_dict(state["tasks"])
        else:  # written before extra_tasks: one task, whose position is the mixer's
            sampler = state["sampler"]
            self.mixer.load_state_dict({**sampler, "seed": self.mixer.seed, "streams": [sampler]})
        set_rng_state(resumed.rngs[self.accelerator.process_index])
        self.last_checkpoint = resumed.path  # what to resume from if this run stops before its next one
        self._say(f"resumed from {resumed.path} at step {self.step}")

    def _announce(self) -> None:
        cfg, accelerator = self.config, self.accelerator
        self.meta = {
            "base_model": self.base_model,
            "data": self.data.describe(),
            "loss": loss_config(self.loss),
            "trained_dims": self.trained_dims,
            "num_processes": accelerator.num_processes,
            "total_batch_size": cfg.batch_size * self.accum * accelerator.num_processes,
            "total_steps": self.total_steps,
            "run_fingerprint": self.fingerprint,
        }
        if len(self.tasks) > 1:
            self.meta["extra_tasks"] = [
                {"data": task.data.describe(), "loss": loss_config(task.loss)} for task in self.tasks[1:]
            ]
        self._say(
            f"training {self.base_model} on {len(self.data)} rows ({', '.join(self.data.columns)}) with "
            f"{self.meta['loss'].get('name', type(self.loss).__name__)}: {self.total_steps} steps of "
            f"{self.meta['total_batch_size']} rows on {accelerator.num_processes} process(es), {self.device}"
        )
        for i, (task, described) in enumerate(zip(self.tasks[1:], self.meta.get("extra_tasks", [])), 1):
            self._say(
                f"  + task {i}: {len(task.data)} rows ({', '.join(task.data.columns)}) with "
                f"{described['loss'].get('name', type(task.loss).__name__)}, "
                f"{task.stream.batches_per_epoch()} of the {self.mixer.batches_per_epoch()} batches per epoch"
            )
        self._bar = tqdm(
            total=self.stop_at,
            initial=self.step,
            desc="Training",
            unit="step",
            disable=not (cfg.progress and accelerator.is_main_process),
            dynamic_ncols=True,
        )

    # ------------------------------------------------------------------ one step
    def _train_step(self) -> None:
        """One optimizer step: ``gradient_accumulation_steps`` micro-batches, clipping, AdamW, schedule."""
        cfg, accelerator = self.config, self.accelerator
        t0 = time.perf_counter()
        step_loss = 0.0
        for micro in range(self.accum):
            value = self._micro_batch(last=micro == self.accum - 1)
            step_loss += value / self.accum
        if cfg.max_grad_norm is not None:
            accelerator.clip_grad_norm_(self.ddp_model.parameters(), cfg.max_grad_norm)
        self.optimizer.step()
        if not accelerator.optimizer_step_was_skipped:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.train_time += time.perf_counter() - t0
        self.train_steps += 1
        self.window.append(step_loss)
        self._bar.update(1)
        self._bar.set_postfix(
            loss=f"{sum(self.window) / len(self.window):.4f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}"
        )

    def _micro_batch(self, last: bool) -> float:
        """Forward and backward of one batch (gradients synchronised across processes only if ``last``)."""
        accelerator, model = self.accelerator, self.model
        index, rows = next(self.batches)
        task = self.tasks[index]
        self.task_counts[index] += 1
        num_layers = model.num_layers
        layers = task.loss.layers_for_step(num_layers)
        if (
            max(layers) < num_layers
            and accelerator.num_processes > 1
            and not self.config.find_unused_parameters
        ):
            raise InvalidInputError(
                f"the loss asked for layers {sorted(layers)} without the last layer ({num_layers}); "
                "with several processes set find_unused_parameters: true so DDP accepts unused layers"
            )
        self.layer_counts.update(int(k) for k in layers)
        features = [
            {k: v.to(self.device) for k, v in model.tokenize([column[i] for i in rows]).items()}
            for column in task.data.texts
        ]
        labels = (
            torch.tensor([task.data.labels[i] for i in rows], dtype=torch.float32, device=self.device)
            if task.needs_labels
            else None
        )
        sync = contextlib.nullcontext() if last else accelerator.no_sync(self.ddp_model)
        with sync:
            with accelerator.autocast():
                outputs = [self.ddp_model(f, layers=layers) for f in features]
                value = task.loss(outputs, labels)
            if not torch.isfinite(value):
                raise Matryoshka2dError(
                    f"the loss became {value.item()} at step {self.step + 1}; lower learning_rate or use "
                    "mixed_precision no"
                )
            accelerator.backward(value / self.accum)
        return value.item()

    def _after_step(self) -> None:
        """Log the loss (every ``log_steps``), evaluate (``eval_steps``), checkpoint (``save_steps``)."""
        cfg, step = self.config, self.step
        # Not at stop_at (before the end): the resumed run's log must be the uninterrupted run's. The loss
        # reported for the stop is the mean since the last entry, kept out of the log.
        if step == self.stop_at < self.total_steps and step % cfg.log_steps and self.window:
            self.last_loss = self._window_loss()
        if step % cfg.log_steps == 0 or step == self.total_steps:
            mean = self.last_loss = self._window_loss()
            self.log_history.append(
                {"step": step, "loss": round(mean, 6), "lr": self.scheduler.get_last_lr()[0]}
            )
            self.window = []
        if self.eval_data is not None and (
            (cfg.eval_steps and step % cfg.eval_steps == 0) or step == self.total_steps
        ):
            self.evaluate()
        if (cfg.save_steps and step % cfg.save_steps == 0) or (step == self.stop_at < self.total_steps):
            self.last_checkpoint = self.save_checkpoint()

    def _window_loss(self) -> float:
        """The mean step loss since the last log entry, averaged over the processes."""
        window = torch.tensor(sum(self.window) / len(self.window), device=self.device)
        return self.accelerator.reduce(window, "mean").item()

    # ------------------------------------------------------------------ evaluation and checkpoints
    def evaluate(self) -> dict:
        """Evaluate the model being trained on ``eval_data`` over the grid (main process; in eval mode).

        Returns the grid (``{"step", "layers", "dims", "spearman"}``) on the main process, ``{}`` elsewhere.
        """
        grid: dict = {}
        if self.accelerator.is_main_process:
            model = self.accelerator.unwrap_model(self.ddp_model)
            model.eval()  # no dropout while evaluating (encode leaves the mode to its caller)
            try:
                result = evaluate_sts(
                    model,
                    self.eval_data,
                    *self.eval_axes,
                    batch_size=self.config.eval_batch_size,
                    show_progress=False,
                )
            finally:
                model.train()
            grid = {"step": self.step, **result.to_dict()}
            self.eval_history.append(grid)
            best = grid["spearman"][-1][0]
            self._say(
                f"step {self.step}: STS Spearman {best:.2f} at {grid['layers'][-1]} layers x "
                f"{grid['dims'][0]} dims"
            )
        self.accelerator.wait_for_everyone()
        return grid

    def save_checkpoint(self) -> Path:
        """Write ``checkpoint-<step>`` (main process) with the random states of every process."""
        from accelerate.utils import gather_object

        accelerator, cfg = self.accelerator, self.config
        rngs = gather_object([rng_state()])  # every process's random state, in rank order
        windows = gather_object([self.window])  # and its step losses not logged yet
        path = self.checkpoint_dir / f"{CHECKPOINT_PREFIX}{self.step}"
        if accelerator.is_main_process:
            state = {
                "step": self.step,
                "sampler": self.stream.state_dict(),
                "tasks": self.mixer.state_dict(),
                "task_batches": {str(k): v for k, v in sorted(self.task_counts.items())},
                "base_model": self.base_model,
                "run_fingerprint": self.fingerprint,
                "run": self.identity,
                "config": cfg.to_dict(),
                "log_history": self.log_history,
                "eval_history": self.eval_history,
                "layer_counts": {str(k): v for k, v in sorted(self.layer_counts.items())},
                "loss_windows": windows,
            }
            save_checkpoint(
                path,
                accelerator.unwrap_model(self.ddp_model),
                self.optimizer,
                self.scheduler,
                accelerator.scaler,
                rngs,
                state,
                kind=CHECKPOINT_KIND,
            )
            if cfg.save_total_limit:
                prune_checkpoints(self.checkpoint_dir, cfg.save_total_limit, path)
        accelerator.wait_for_everyone()
        return path

    # ------------------------------------------------------------------ the end
    def _finish(self) -> TrainResult:
        """Report the speed; save the final model with its card unless the run stopped early."""
        accelerator, cfg = self.accelerator, self.config
        self._bar.close()
        speed = self.train_steps / self.train_time if self.train_time else 0.0
        self._say(f"{self.train_steps} steps in {self.train_time:.1f} s of training: {speed:.3f} steps/s")
        last_eval = self.eval_history[-1] if self.eval_history else None
        self.model = accelerator.unwrap_model(self.ddp_model)
        if self.step < self.total_steps:
            self._say(
                f"stopped at step {self.step} of {self.total_steps}; continue with resume: "
                f"{self.last_checkpoint}"
            )
            return TrainResult(None, self.last_checkpoint, self.step, self.last_loss, last_eval, speed)

        output_dir = Path(cfg.output_dir)
        if accelerator.is_main_process:
            summary = {
                **self.meta,
                "trained_layers": {str(k): v for k, v in sorted(self.layer_counts.items())},
                **(
                    {"task_batches": {str(k): v for k, v in sorted(self.task_counts.items())}}
                    if len(self.tasks) > 1
                    else {}
                ),
                "steps": self.step,
                "final_loss": self.last_loss,
                "config": cfg.to_dict(),
                "evaluation": last_eval,
            }
            self.model.eval()
            self.model.save(
                output_dir,
                model_card=training_model_card(self.model, summary),
                metadata={"training": summary},
                overwrite=cfg.overwrite,
                inputs=[*run_inputs(cfg), self.checkpoint_dir],
            )
            self._say(f"saved the trained model to {output_dir}")
        accelerator.wait_for_everyone()
        return TrainResult(output_dir, self.last_checkpoint, self.step, self.last_loss, last_eval, speed)

    def _close(self) -> None:
        """Close the progress bar, release the lock, remove a checkpoint folder made here and left empty."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None
            if self._created_checkpoint_dir and not list_checkpoints(self.checkpoint_dir):
                shutil.rmtree(self.checkpoint_dir, ignore_errors=True)


def run_train(args: argparse.Namespace) -> int:
    """``m2d train``: build the config from the file and flags, train, print where the result went.

    Prints the final model folder (or, when stopped early with ``stop_at``, the checkpoint to resume
    from) on stdout, once, from the main process.
    """
    trainer = Trainer(config_from_args(args))
    try:
        result = trainer.train()
    finally:
        # the end of the script: under torchrun, take the process group down before the interpreter
        # exits (left to exit-time teardown, a rank was seen to abort with "terminate called without an
        # active exception" after saving, failing the run)
        accelerator = getattr(trainer, "accelerator", None)  # none when setup failed (e.g. a bad output_dir)
        if accelerator is not None:
            accelerator.end_training()
    where = result.output_dir or result.checkpoint
    if where is not None and int(os.environ.get("RANK", "0")) == 0:
        print(where)
    return 0
