"""What keeps a training run from destroying other data or mixing with another run.

- **Output folders** (:func:`check_run_paths`): the final model folder follows the project's safe-output
  rule (:func:`matryoshka2d.persistence.check_output_folder`, kind ``"model"``): it may be new or empty, or
  hold a model written by matryoshka2d, replaced only with ``overwrite``; never the current folder, the
  base model, a data or config file, a folder containing one of them, or a folder holding anything else.
  The checkpoint folder is a folder of kind ``"checkpoints"`` (a marker file is written into it) and may
  be neither inside the output folder nor contain an input.
- **One live run per checkpoint folder** (:class:`RunLock`): a run holds ``<checkpoint_dir>/.train.lock``
  (an OS file lock, released by the OS if the process dies, plus its PID and start time for the message).
  A second run is refused while the first is alive; a lock file left by a dead process is taken over with
  a warning.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from matryoshka2d.errors import Matryoshka2dError, OutputPathError
from matryoshka2d.persistence import check_output_folder, mark_output_folder, register_output_kind
from matryoshka2d.training.checkpoints import STATE_FILE, checkpoint_step

if TYPE_CHECKING:
    from matryoshka2d.training.config import TrainConfig

LOCK_FILE = ".train.lock"
#: Output kinds of the training folders (markers written by :mod:`matryoshka2d.persistence`).
MODEL_KIND, CHECKPOINTS_KIND, CHECKPOINT_KIND = "model", "checkpoints", "checkpoint"


class RunLockedError(Matryoshka2dError):
    """Another live training run holds the checkpoint folder."""


# ------------------------------------------------------------------------------------------ legacy outputs
def _is_legacy_checkpoint(folder: Path) -> bool:
    return (folder / STATE_FILE).is_file() and (folder / "model").is_dir()


def _is_legacy_checkpoints(folder: Path) -> bool:
    """A checkpoint folder written before output markers: only checkpoints, locks and save temporaries."""
    entries = list(folder.iterdir())
    found = False
    for entry in entries:
        if checkpoint_step(entry) is not None and _is_legacy_checkpoint(entry):
            found = True
        elif not (entry.name.startswith(".checkpoint-") or entry.name == LOCK_FILE):
            return False
    return found


register_output_kind(CHECKPOINT_KIND, _is_legacy_checkpoint)
register_output_kind(CHECKPOINTS_KIND, _is_legacy_checkpoints)


# ---------------------------------------------------------------------------------------------- paths
def run_inputs(config: TrainConfig, resume: bool = True) -> list[str]:
    """The paths a run reads: base model, training and evaluation data, config file and (if ``resume``)
    the checkpoint it resumes from (which lies in the checkpoint folder, so that check leaves it out)."""
    inputs = [config.model, *config.train_data, config.eval_data]
    inputs += [source for task in config.extra_tasks for source in task["train_data"]]
    source = getattr(config, "source_file", None)
    if source is not None:
        inputs.append(str(source))
    if resume and config.resume and config.resume.strip().lower() != "latest":
        inputs.append(config.resume)
    return [str(i) for i in inputs if i]


def _real(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(Path(path).expanduser()))


def check_run_paths(config: TrainConfig, checkpoint_dir: Path) -> None:
    """Refuse, before any work, an output or checkpoint folder that the run may not write.

    Raises:
        OutputPathError: the message says what is at the path and what to do.
    """
    check_output_folder(config.output_dir, MODEL_KIND, overwrite=config.overwrite, inputs=run_inputs(config))
    output, checkpoints = _real(config.output_dir), _real(checkpoint_dir)
    if output == checkpoints or output in checkpoints.parents:
        raise OutputPathError(
            f"checkpoint_dir {checkpoint_dir} is inside output_dir {config.output_dir}: saving the final "
            "model would delete the checkpoints; choose a checkpoint_dir outside it"
        )
    if checkpoints in output.parents:  # refused by the final save otherwise: after all the training
        raise OutputPathError(
            f"output_dir {config.output_dir} is inside checkpoint_dir {checkpoint_dir}: the final model "
            "may not be written among the checkpoints; choose an output_dir outside it"
        )
    check_output_folder(
        checkpoint_dir,
        CHECKPOINTS_KIND,
        overwrite=True,
        inputs=[*run_inputs(config, resume=False), config.output_dir],
    )


def prepare_checkpoint_dir(config: TrainConfig, checkpoint_dir: Path) -> bool:
    """Create (or reuse) the checkpoint folder with its marker; True if it did not exist before."""
    created = not checkpoint_dir.exists()
    mark_output_folder(
        checkpoint_dir, CHECKPOINTS_KIND, inputs=[*run_inputs(config, resume=False), config.output_dir]
    )
    return created


# ---------------------------------------------------------------------------------------------- lock
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


class RunLock:
    """An exclusive lock of a run folder, held by one live process.

    The lock is an OS advisory lock (``fcntl.flock``) on ``<folder>/.train.lock``: the OS drops it when the
    holder dies, so a lock file left by a killed run is detected as stale (its recorded PID is named in a
    warning) and taken over. Where ``fcntl`` is missing, the recorded PID is checked instead.

    Args:
        folder: the folder to lock (it must exist).
        description: what the holder is doing, recorded in the lock file (e.g. the output folder).
    """

    def __init__(self, folder: str | os.PathLike, description: str = "") -> None:
        self.path = Path(folder) / LOCK_FILE
        self.description = description
        self._fd: int | None = None

    def _holder(self) -> dict:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def acquire(self) -> RunLock:
        """Take the lock.

        Raises:
            RunLockedError: a live process holds it (the message names its PID and when it started).
        """
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not on Linux/macOS
            fcntl = None
        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if fcntl is not None:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except OSError as e:
                        if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                            raise
                        raise self._locked_error() from None
                    # the file may have been removed by its holder's release since we opened it: retry then
                    try:
                        same_file = os.fstat(fd).st_ino == os.stat(self.path).st_ino
                    except FileNotFoundError:
                        same_file = False
                    if not same_file:
                        os.close(fd)
                        continue
                previous = self._holder()
                pid = previous.get("pid")
                if isinstance(pid, int) and pid != os.getpid():
                    same_host = previous.get("host") == socket.gethostname()
                    if fcntl is None and same_host and _pid_alive(pid):
                        raise self._locked_error()
                    warnings.warn(
                        f"{self.path}: taking over the lock of a training run that is no longer running "
                        f"(pid {pid}, started {previous.get('started', '?')})",
                        stacklevel=3,
                    )
                record = {
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "command": " ".join(sys.argv),
                    "run": self.description,
                }
                os.ftruncate(fd, 0)
                os.write(fd, json.dumps(record).encode("utf-8"))
                os.fsync(fd)
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
            return self
        raise RunLockedError(f"{self.path}: could not take the lock (it keeps changing); try again")

    def _locked_error(self) -> RunLockedError:
        holder = self._holder()
        who = (
            f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')}"
        )
        return RunLockedError(
            f"another training run ({who}) is using {self.path.parent}; wait for it to finish, or give this "
            "run another output_dir/checkpoint_dir"
        )

    def release(self) -> None:
        """Remove the lock file and drop the lock (a no-op if not held)."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(self._fd)  # closing drops the flock
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


__all__ = [
    "CHECKPOINTS_KIND",
    "CHECKPOINT_KIND",
    "LOCK_FILE",
    "MODEL_KIND",
    "OutputPathError",
    "RunLock",
    "RunLockedError",
    "check_run_paths",
    "prepare_checkpoint_dir",
    "run_inputs",
]
