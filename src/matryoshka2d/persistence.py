"""Reading and writing model folders in the sentence-transformers layout, atomically.

A folder holds ``modules.json`` listing the modules in order: the transformer (at the folder root or
in a sub-folder), ``1_Pooling``, optionally a ``Dense`` module and a ``Normalize`` module. Plain
transformers folders (a ``config.json`` and weights, no ``modules.json``) load with mean pooling.

matryoshka2d records a dim-truncated export as a Dense module whose weight is the first ``d`` rows of
the identity matrix (no bias, identity activation) followed by Normalize: sentence-transformers loading
the folder then produces exactly our "first d dims, re-normalised" embeddings. A model whose last layer
exit is rotated (:mod:`matryoshka2d.exit_rotations`) writes the first ``d`` rows of that rotation
instead. The loader accepts a Dense module of that form (no bias, identity activation, orthonormal
rows) and refuses any other Dense module with a clear error. Rotations of the other layer exits, which
sentence-transformers never computes, lie in :data:`EXIT_ROTATIONS_FILE`.

Safe outputs (one rule for every writer): :func:`atomic_directory` and :func:`atomic_write` check their
target first (:func:`check_output_folder`, :func:`check_output_file`; call these at the start of a long
command to refuse before the work). A folder target is replaced only if it is empty or holds a previous
matryoshka2d output of the same kind (its :data:`OUTPUT_MARKER` file records the kind), and then only with
``overwrite=True`` (``--overwrite``); an existing non-empty file only with ``overwrite=True`` (and, with a
``recognize`` check, only if it is such an output). Never: an input of the command, a folder containing an
input, a path inside an input folder, the current folder or an ancestor of it. Temporaries are named
``.NAME.tmp-<pid>-*`` / ``.NAME.old-<pid>-*`` beside the target; the next save of that target removes the
ones whose process is gone. Writers pass their kind and inputs::

    with atomic_directory(out, "search-index", overwrite=overwrite, inputs=[corpus_file]) as tmp:
        ...  # write into tmp
    atomic_write(json_path, text, "eval-sts JSON", overwrite=overwrite, inputs=[data_file],
                 recognize=json_with_keys("layers", "dims", "spearman"))
    mark_output_folder(checkpoint_dir, "checkpoints", inputs=[base_model])  # a folder written into over time
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from matryoshka2d.errors import ModelLoadError, OutputPathError
from matryoshka2d.pooling import pooling_config, pooling_mode_from_config
from matryoshka2d.validation import check_int

#: Extra metadata file written next to the sentence-transformers files.
METADATA_FILE = "matryoshka2d.json"
#: Rotations of layer exits other than the last (:mod:`matryoshka2d.exit_rotations`): a safetensors file
#: with one float32 (hidden, hidden) orthogonal matrix per layer count, under the key ``layers_<k>``.
EXIT_ROTATIONS_FILE = "exit_rotations.safetensors"
# How far from orthogonal a stored rotation may be (float32 round-off of a float64 fit is ~1e-6).
_ORTHOGONAL_TOLERANCE = 1e-4


# ---------------------------------------------------------------------------------------------- safe outputs
#: The marker every folder written by :func:`atomic_directory` carries: a small JSON object recording the
#: kind of output (``{"kind": "model", "matryoshka2d_version": ..., "created": ...}``).
OUTPUT_MARKER = ".matryoshka2d-output.json"

# Folders written before markers existed, recognised by their contents: kind -> predicate(folder).
_LEGACY_KINDS: dict[str, Callable[[Path], bool]] = {}

# What a temporary name beside a target looks like: ``.NAME.tmp-<pid>-<8 chars>`` (``.old-`` for a
# folder moved aside). Names without the pid come from matryoshka2d versions before the pid was recorded.
_TEMP_SUFFIX = re.compile(r"(?:(\d+)-)?[a-z0-9_]{8}")


def register_output_kind(kind: str, recognize: Callable[[Path], bool]) -> None:
    """Teach the safe-output rule to recognise folders of ``kind`` written before output markers existed.

    Args:
        kind: the output kind (``"model"``, ``"search-index"``, ``"checkpoint"``, ...).
        recognize: ``recognize(folder) -> bool``, True if ``folder`` (an existing, non-empty folder without
            a marker) is certainly an output of that kind written by matryoshka2d.
    """
    _LEGACY_KINDS[kind] = recognize


def output_kind(folder: str | os.PathLike) -> str | None:
    """The kind of matryoshka2d output ``folder`` holds (from its marker or a legacy recogniser), or None."""
    folder = Path(folder)
    marker = folder / OUTPUT_MARKER
    if marker.is_file():
        try:
            data = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        kind = data.get("kind") if isinstance(data, dict) else None
        return kind if isinstance(kind, str) else None
    for kind, recognize in _LEGACY_KINDS.items():
        try:
            if recognize(folder):
                return kind
        except (OSError, ValueError):
            continue
    return None


def _is_legacy_model(folder: Path) -> bool:
    return (folder / "modules.json").is_file() and (folder / METADATA_FILE).is_file()


def _is_legacy_search_index(folder: Path) -> bool:
    manifest = folder / "manifest.json"
    return manifest.is_file() and '"matryoshka2d-search-index"' in manifest.read_text(encoding="utf-8")


def _is_legacy_demo_report(folder: Path) -> bool:
    return (folder / "results.json").is_file() and (folder / "REPORT.md").is_file()


def _is_legacy_demo_work(folder: Path) -> bool:
    """The demo's cache: only ``<name>-<10 hex digits>`` models, checkpoint folders and result files."""
    names = [p.name for p in folder.iterdir() if not p.name.startswith(".")]
    pattern = re.compile(r"[\w.]+-[0-9a-f]{10}(-checkpoints|\.train\.json|\.json)?")
    return bool(names) and all(pattern.fullmatch(name) for name in names)


register_output_kind("model", _is_legacy_model)
register_output_kind("demo-work", _is_legacy_demo_work)
register_output_kind("search-index", _is_legacy_search_index)
register_output_kind("report", _is_legacy_demo_report)


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


def _within(inner: Path, outer: Path) -> bool:
    """``inner`` is ``outer`` or lies inside it (both real paths)."""
    return inner == outer or outer in inner.parents


def _local_inputs(inputs: Iterable[str | os.PathLike | None] | str | os.PathLike | None) -> list[Path]:
    """The inputs that exist on disk, as given (hub ids and None are skipped)."""
    if inputs is None:
        return []
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    out = []
    for item in inputs:
        if item is None or str(item) == "":
            continue
        path = Path(item).expanduser()
        if path.exists():
            out.append(path)
    return out


def _describe_entries(folder: Path, limit: int = 4) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    shown = ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")
    return f"{len(names)} entr{'y' if len(names) == 1 else 'ies'} ({shown})"


def _check_common(path: Path, real: Path, kind: str, inputs, is_folder: bool) -> None:
    """The rules shared by folder and file outputs: not the current folder, not an input, a usable parent."""
    cwd = _real(Path.cwd())
    if is_folder and _within(cwd, real):
        where = "the current folder" if real == cwd else f"a folder that contains the current folder ({cwd})"
        raise OutputPathError(
            f"{path} is {where}: matryoshka2d never writes a {kind} over it; give a new folder path instead"
        )
    for given in _local_inputs(inputs):
        source = _real(given)
        if real == source:
            raise OutputPathError(
                f"{path} is {given}, an input of this command: writing the {kind} there would destroy "
                "the input; choose another output path"
            )
        if _within(source, real):
            raise OutputPathError(
                f"{path} contains {given}, an input of this command: replacing it would delete the "
                "input; choose another output path"
            )
        if source.is_dir() and _within(real, source):
            raise OutputPathError(
                f"{path} lies inside {given}, an input folder of this command: matryoshka2d never writes "
                "into its inputs; choose an output path outside it"
            )
    for ancestor in path.absolute().parents:
        if ancestor.exists():
            if not ancestor.is_dir():
                raise OutputPathError(f"cannot write {path}: {ancestor} is a file, not a folder")
            _check_writable(ancestor, path)
            break


def _check_writable(folder: Path, path: Path) -> None:
    """Refuse now, before any work, an output whose folder cannot be written (permissions, a read-only
    file system): the writers' temporary files and renames go there. A probe file is created and removed
    (os.access says yes to root and knows nothing of file systems that refuse writes)."""
    try:
        handle, probe = tempfile.mkstemp(dir=folder, prefix=".m2d-write-check-")
    except OSError as e:
        raise OutputPathError(
            f"cannot write {path}: {folder} is not writable ({e.strerror or e}); choose another path"
        ) from None
    os.close(handle)
    os.unlink(probe)


def output_path(path: str | os.PathLike) -> Path:
    """``path`` as the writers use it: ``~`` expanded, and ``..`` folded (``idx/../idx`` is ``idx``: once
    ``idx`` is moved aside by a save, ``idx/..`` would no longer resolve)."""
    path = Path(path).expanduser()
    return Path(os.path.normpath(path)) if ".." in path.parts else path


def check_output_folder(
    path: str | os.PathLike,
    kind: str,
    *,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike | None] | str | os.PathLike | None = (),
) -> Path:
    """Check that a folder output of ``kind`` may be written at ``path``; raise :class:`OutputPathError`.

    The rule (every folder writer applies it through :func:`atomic_directory`; call this first to refuse
    before long work starts):

    - ``path`` may not exist yet, or be an empty folder: it is written.
    - It may hold a previous output of the same ``kind`` written by matryoshka2d (its
      :data:`OUTPUT_MARKER`, or a recognised older output): it is replaced only if ``overwrite`` is True.
    - Anything else is refused, whatever ``overwrite`` says: a folder holding other files, an output of
      another kind, a file, a symbolic link, the current folder or one of its ancestors, one of the
      command's ``inputs``, a folder containing an input, a path inside an input folder (real paths are
      compared, so symbolic links and ``..`` do not get around it), or a path whose nearest existing
      folder cannot be written.

    Args:
        path: the output folder.
        kind: what is written (``"model"``, ``"search-index"``, ``"checkpoint"``, ``"report"``, ...).
        overwrite: allow replacing a previous output of the same kind.
        inputs: paths the command reads (model folders, data files); ones that do not exist on disk (hub
            ids, None) are ignored.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    if not str(os.fspath(path)).strip():
        raise OutputPathError(f"no output path given for the {kind} (empty path)")
    path = output_path(path)
    real = _real(path)
    _check_common(path, real, kind, inputs, is_folder=True)
    if path.is_symlink():
        raise OutputPathError(
            f"{path} is a symbolic link (to {real}): matryoshka2d does not replace links; give the real path"
        )
    put_back_moved_aside(path)  # a save killed between its renames: the previous output is checked
    if not path.exists():
        return path
    if not path.is_dir():
        raise OutputPathError(
            f"{path} is a file, not a folder: matryoshka2d never replaces a file with a {kind}; "
            "choose another path"
        )
    if not any(path.iterdir()):
        return path
    found = output_kind(path)
    if found is None:
        raise OutputPathError(
            f"{path} is a folder holding {_describe_entries(path)} not written by matryoshka2d: it is left "
            f"alone; write the {kind} to a new or empty folder"
        )
    if found != kind:
        raise OutputPathError(
            f"{path} holds a matryoshka2d {found}, not a {kind}: it is left alone; choose another path"
        )
    if not overwrite:
        raise OutputPathError(
            f"{path} already holds a {kind} written by matryoshka2d: pass --overwrite (overwrite=True in "
            "Python) to replace it, or choose another path"
        )
    return path


def check_output_file(
    path: str | os.PathLike,
    kind: str,
    *,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike | None] | str | os.PathLike | None = (),
    recognize: Callable[[Path], bool] | None = None,
) -> Path:
    """Check that a file output of ``kind`` may be written at ``path``; raise :class:`OutputPathError`.

    The rule for single files (``.npy`` embeddings, JSON results):

    - ``path`` may not exist yet, or be an empty file: it is written.
    - An existing non-empty file is replaced only if ``overwrite`` is True, and then only if
      ``recognize(path)`` (when given) says it is an output of this kind (e.g. a ``.npy`` array, a JSON
      document with the keys matryoshka2d writes); otherwise it is left alone whatever ``overwrite`` says.
    - Always refused: a folder (or a path ending in a separator), a device or other non-regular file, a
      symbolic link, one of the command's ``inputs``, a path inside an input folder (real paths are
      compared), or a path in a folder that cannot be written.

    Args:
        path: the output file.
        kind: what is written, for messages (``"embeddings"``, ``"eval-sts JSON"``, ...).
        overwrite: allow replacing an existing file.
        inputs: paths the command reads; ones that do not exist on disk are ignored.
        recognize: ``recognize(path) -> bool``: is the existing file an output of this kind?

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    text = os.fspath(path)
    if not str(text).strip():
        raise OutputPathError(f"no output path given for the {kind} (empty path)")
    path = Path(path).expanduser()
    if path.is_dir() or text.endswith((os.sep, "/")):
        what = kind if kind.endswith("file") else f"{kind} file"
        raise OutputPathError(f"{text} is a folder: give the path of the {what} to write")
    real = _real(path)
    _check_common(path, real, kind, inputs, is_folder=False)
    if path.is_symlink():  # even a dangling one: the save would replace the link, not write its target
        raise OutputPathError(
            f"{path} is a symbolic link (to {real}): matryoshka2d does not replace links; give the real path"
        )
    if not path.exists():
        return path
    if not path.is_file():
        raise OutputPathError(f"{path} is not a regular file: matryoshka2d writes the {kind} only to a file")
    size = path.stat().st_size
    if size == 0:
        return path
    if not overwrite:
        raise OutputPathError(
            f"{path} already exists ({size} bytes): pass --overwrite (overwrite=True in Python) to replace "
            "it, or choose another path"
        )
    if recognize is not None and not recognize(path):
        raise OutputPathError(
            f"{path} exists and does not look like a matryoshka2d {kind} output: it is left alone even "
            "with --overwrite; remove it yourself or choose another path"
        )
    return path


def is_npy_file(path: Path) -> bool:
    """A recogniser for :func:`check_output_file`: the file starts with NumPy's ``.npy`` magic bytes."""
    with open(path, "rb") as f:
        return f.read(6) == b"\x93NUMPY"


def json_with_keys(*keys: str, in_list: bool = False) -> Callable[[Path], bool]:
    """A recogniser for :func:`check_output_file`: a JSON object holding ``keys`` (a list of such objects
    if ``in_list``)."""

    def recognize(path: Path) -> bool:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        items = data if in_list else [data]
        if not isinstance(items, list) or (in_list and not items):
            return False
        return all(isinstance(item, dict) and all(k in item for k in keys) for item in items)

    return recognize


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _stale(entry: Path, prefix: str) -> bool:
    """Whether ``entry`` is ``prefix`` + a temporary suffix made by a process no longer running."""
    if not entry.name.startswith(prefix):
        return False
    match = _TEMP_SUFFIX.fullmatch(entry.name[len(prefix) :])
    if match is None:
        return False
    pid = int(match.group(1)) if match.group(1) else None
    return pid is None or (pid != os.getpid() and not _pid_alive(pid))


def put_back_moved_aside(path: Path) -> None:
    """If ``path`` is missing because a save was killed between its two renames (:func:`atomic_directory`
    moves the previous folder into ``.NAME.old-*`` just before the new one takes its place), move that
    previous folder back: it is the only copy, and without it the next save would need no overwrite."""
    if os.path.lexists(path) or not path.parent.is_dir():
        return
    for entry in path.parent.iterdir():
        if _stale(entry, f".{path.name}.old-") and (entry / path.name).is_dir():
            os.replace(entry / path.name, path)
            return


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete what killed saves of ``path`` left beside it: ``.NAME.tmp-*`` and ``.NAME.old-*`` for that exact
    NAME, unless the process that made them is still running. Returns what was removed.

    A save killed between its two renames (:func:`atomic_directory`: the previous ``path`` moved aside into
    ``.NAME.old-*``, the new one not yet in its place) left no ``path`` at all: that previous folder is
    put back first, not deleted (it is the only copy).
    """
    path = Path(path)
    if not path.parent.is_dir():
        return []
    put_back_moved_aside(path)
    removed = []
    for entry in path.parent.iterdir():
        for tag in (".tmp-", ".old-"):
            # not one of a save in progress (this process's are cleaned by their own handler)
            if not _stale(entry, f".{path.name}{tag}"):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def _write_marker(folder: Path, kind: str) -> None:
    from matryoshka2d import __version__

    marker = {
        "kind": kind,
        "written_by": "matryoshka2d",
        "matryoshka2d_version": __version__,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    (folder / OUTPUT_MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")


def mark_output_folder(
    path: str | os.PathLike,
    kind: str,
    *,
    inputs: Iterable[str | os.PathLike | None] | str | os.PathLike | None = (),
) -> Path:
    """Create (or reuse) a folder that a command writes INTO over time (a checkpoint folder, the demo's
    work folder): refused like :func:`check_output_folder` unless it is missing, empty or already marked
    as ``kind``; then it gets the marker. Nothing in it is replaced here."""
    path = check_output_folder(path, kind, overwrite=True, inputs=inputs)
    path.mkdir(parents=True, exist_ok=True)
    if not (path / OUTPUT_MARKER).is_file():
        _write_marker(path, kind)
    return path


_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    """The process's umask, read without changing it where the OS says it (Linux: /proc/self/status);
    elsewhere set and put back under a lock (os.umask has no read-only form)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _UMASK_LOCK:
        umask = os.umask(0o077)  # the safe value, in case another thread creates a file meanwhile
        os.umask(umask)
    return umask


def _chmod_default(path: Path, mode: int) -> None:
    os.chmod(path, mode & ~_umask())  # mkdtemp/mkstemp make 0700/0600; outputs get the usual permissions


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's (or, where the OS allows, a folder's) data to disk: after a power loss a renamed-in
    output is either the old one or the complete new one, never a complete-looking name on a short file."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except (IsADirectoryError, PermissionError):  # folders cannot be opened on Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # a folder on a file system that refuses fsync of folders
        if not os.path.isdir(path):
            raise
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    """:func:`fsync_path` every file under ``folder``, then every folder, deepest first."""
    for root, _dirs, files in os.walk(folder, topdown=False):
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):  # a link (a user's, carried over) is new, its target is not
                fsync_path(path)
        fsync_path(root)


def write_replacing(path: str | os.PathLike, data: bytes | str) -> Path:
    """The write under every atomic file output: ``data`` to a temporary file beside ``path``, flushed to
    disk, then renamed over ``path`` (a reader sees the old file or the whole new one). No checks of the
    target (:func:`atomic_write` has them); a killed writer leaves only ``.NAME.tmp-<pid>-*``, which
    :func:`remove_stale_temporaries` deletes."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        _chmod_default(Path(tmp), 0o666)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_path(path.parent)  # the rename itself
    return path


@contextlib.contextmanager
def atomic_directory(
    path: str | os.PathLike,
    kind: str = "folder",
    *,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike | None] | str | os.PathLike | None = (),
) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success its files are flushed to disk and it replaces
    ``path`` in one rename.

    ``path`` is first checked with :func:`check_output_folder` (the safe-output rule: only an empty folder
    or a previous matryoshka2d output of the same ``kind`` with ``overwrite=True`` is replaced; never an
    input, a folder holding an input, the current folder). The new folder gets the :data:`OUTPUT_MARKER`
    recording ``kind``. On any error or KeyboardInterrupt the temporary folder is removed and ``path`` is
    left as it was; an existing ``path`` is moved aside first and deleted only after the new folder is in
    place. Temporaries of killed earlier saves of the same ``path`` (``.NAME.tmp-<pid>-*``,
    ``.NAME.old-<pid>-*``) are removed (:func:`remove_stale_temporaries`).

    Example::

        check_output_folder(out, "search-index", overwrite=overwrite, inputs=[corpus])  # before the work
        ...
        with atomic_directory(out, "search-index", overwrite=overwrite, inputs=[corpus]) as tmp:
            (tmp / "manifest.json").write_text(...)

    Args:
        path: the output folder.
        kind: what is written (recorded in the marker; an existing output must be of the same kind).
        overwrite: allow replacing a previous output of the same kind.
        inputs: paths the writing command reads (see :func:`check_output_folder`).
    """
    path = check_output_folder(path, kind, overwrite=overwrite, inputs=inputs)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
    _chmod_default(tmp, 0o777)
    old: Path | None = None
    try:
        yield tmp
        _write_marker(tmp, kind)
        _fsync_tree(tmp)  # on disk before its name is: a power loss leaves the old folder or the new one
        check_output_folder(path, kind, overwrite=overwrite, inputs=inputs)  # nothing appeared meanwhile
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-{os.getpid()}-", dir=path.parent))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
        fsync_path(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and (old / path.name).exists() and not path.exists():
            os.replace(old / path.name, path)  # put the previous folder back
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def atomic_write(
    path: str | os.PathLike,
    data: bytes | str,
    kind: str = "file",
    *,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike | None] | str | os.PathLike | None = (),
    recognize: Callable[[Path], bool] | None = None,
) -> Path:
    """Write a file under a temporary name beside it, flush it to disk and rename it into place (never
    half-written, even after a power loss).

    ``path`` is first checked with :func:`check_output_file` (an existing non-empty file is replaced only
    with ``overwrite=True`` and, if ``recognize`` is given, only if it is an output of this kind; never an
    input or a folder). On any error or KeyboardInterrupt the temporary file is removed. Temporaries of
    killed earlier writes of the same ``path`` are removed.

    Example::

        atomic_write(out, npy_bytes, "embeddings", overwrite=args.overwrite, inputs=[args.input],
                     recognize=is_npy_file)

    Args:
        path: the output file.
        data: its contents (``str`` is written as UTF-8).
        kind: what is written, for messages.
        overwrite: allow replacing an existing file.
        inputs: paths the writing command reads.
        recognize: ``recognize(path) -> bool`` for an existing file (see :func:`check_output_file`).
    """
    path = check_output_file(path, kind, overwrite=overwrite, inputs=inputs, recognize=recognize)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    return write_replacing(path, data)


#: Held around what changes process-wide state, so that two threads (two ONNX encoders, an export beside a
#: build, two model loads or saves) never overlap there: torch's TorchScript exporter keeps global state (two
#: exports at once fail: "GLOBALS.in_onnx_export must be True"), ``warnings.catch_warnings`` swaps the
#: process's filter list, and transformers' verbosity is global (two overlapping blocks could leave
#: "ignore" or "error" set for good). Re-entrant.
PROCESS_STATE_LOCK = threading.RLock()


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' per-file progress bars and load reports (we show our own progress); held
    under :data:`PROCESS_STATE_LOCK` (the settings are the process's)."""
    from transformers.utils import logging as hf_logging

    with PROCESS_STATE_LOCK:
        verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            yield
        finally:
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from e


@dataclass
class FolderSpec:
    """What a model folder describes, before any weight is loaded."""

    transformer_dir: Path
    pooling_mode: str = "mean"
    max_seq_length: int | None = None
    do_lower_case: bool = False
    normalize: bool = False
    dim: int | None = None
    metadata: dict | None = None
    #: Rotations of layer exits from :data:`EXIT_ROTATIONS_FILE`: ``{layer count: (hidden, hidden)}``.
    exit_rotations: dict[int, torch.Tensor] = field(default_factory=dict)
    #: The rotation of the last layer's exit, from a rotating Dense module (completed to a square matrix).
    output_rotation: torch.Tensor | None = None
    #: ``config_sentence_transformers.json``: named prompts, the one prepended to every text, and the
    #: similarity function the folder declares (kept when the model is saved again).
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    similarity_fn_name: str | None = None
    #: The pooling's ``include_prompt``: False (the prompt's tokens left out of the pooling) is supported
    #: only without prompts (the default prompt is refused at load, a per-call one when given).
    include_prompt: bool = True


HUB_IGNORE_PATTERNS = [
    "onnx/*",
    "openvino/*",
    "*.onnx",
    "*.h5",
    "*.msgpack",
    "*.ot",
    "tf_model*",
    "flax_model*",
    "rust_model*",
    "coreml/*",
]


def resolve_model_path(name_or_path: str | os.PathLike) -> Path:
    """A local folder as is; anything else is treated as a Hugging Face hub id and downloaded (cached).

    Raises:
        ModelLoadError: ``name_or_path`` is not a string or path, is empty, is a file, is a missing local
            path, or is a hub id that cannot be fetched.
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise ModelLoadError(
            f"a model must be given as a folder path or a Hugging Face hub id (a string), got "
            f"{type(name_or_path).__name__} {name_or_path!r}"
        )
    if not str(os.fspath(name_or_path)).strip():
        raise ModelLoadError(f"empty model path {os.fspath(name_or_path)!r}: give a model folder or a hub id")
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    text = str(name_or_path)
    if path.exists():
        raise ModelLoadError(f"{text} is a file, not a model folder")
    if text.startswith((".", "/", "~")) or text.count("/") > 1 or "\\" in text:
        raise ModelLoadError(f"model folder not found: {text}")
    try:
        from huggingface_hub import snapshot_download

        # Only what a PyTorch model folder needs: not the ONNX / OpenVINO / TF / Flax / Rust copies that
        # many sentence-transformers repos also ship (several times the model's size).
        return Path(snapshot_download(repo_id=text, ignore_patterns=HUB_IGNORE_PATTERNS))
    except Exception as e:  # network errors, missing repo, offline mode without a cache
        raise ModelLoadError(
            f"{name_or_path!r} is not a local folder and could not be fetched from the Hugging Face hub "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None


def read_folder_spec(folder: Path) -> FolderSpec:
    """Parse ``modules.json`` and the module configs of a model folder (no weights loaded)."""
    modules_file = folder / "modules.json"
    metadata = read_json(folder / METADATA_FILE) if (folder / METADATA_FILE).is_file() else None
    if not modules_file.is_file():
        if not (folder / "config.json").is_file():
            raise ModelLoadError(
                f"{folder} is not a model folder: it has neither modules.json (sentence-transformers) "
                "nor config.json (transformers)"
            )
        return FolderSpec(
            transformer_dir=folder, metadata=metadata, exit_rotations=read_exit_rotations(folder)
        )

    modules = read_json(modules_file)
    if not isinstance(modules, list) or not modules:
        raise ModelLoadError(f"{modules_file}: expected a non-empty list of modules")
    spec: FolderSpec | None = None
    seen_pooling = False
    include_prompt = True
    for module in sorted(modules, key=lambda m: m.get("idx", 0)):
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        sub = folder / module.get("path", "")
        if kind == "Transformer":
            spec = FolderSpec(
                transformer_dir=sub, metadata=metadata, exit_rotations=read_exit_rotations(folder)
            )
            st_config = sub / "sentence_bert_config.json"
            if st_config.is_file():
                cfg = read_json(st_config)
                if not isinstance(cfg, dict):
                    raise ModelLoadError(f"{st_config}: expected a JSON object, got {type(cfg).__name__}")
                spec.max_seq_length = cfg.get("max_seq_length")
                if spec.max_seq_length is not None:
                    check_int(
                        spec.max_seq_length,
                        f"{st_config}: max_seq_length",
                        minimum=1,
                        error=ModelLoadError,
                        what="it must be a positive number of tokens",
                    )
                spec.do_lower_case = bool(cfg.get("do_lower_case", False))
        elif spec is None:
            raise ModelLoadError(f"{modules_file}: the first module must be a Transformer, got {kind!r}")
        elif kind == "Pooling":
            pooling = read_json(sub / "config.json")
            spec.pooling_mode = pooling_mode_from_config(pooling, str(sub))
            include_prompt = pooling.get("include_prompt", True) is not False
            seen_pooling = True
        elif kind == "Dense":
            spec.dim, spec.output_rotation = _read_dense(sub)
        elif kind == "Normalize":
            spec.normalize = True
        else:
            raise ModelLoadError(
                f"{modules_file}: unsupported module {module.get('type')!r}; matryoshka2d supports "
                "Transformer, Pooling, Normalize and its own dim-truncation Dense module"
            )
    if spec is None or not seen_pooling:
        raise ModelLoadError(f"{modules_file}: a Transformer and a Pooling module are required")
    _read_prompts(folder, spec)
    spec.include_prompt = include_prompt
    if spec.default_prompt_name and spec.prompts[spec.default_prompt_name] and not include_prompt:
        raise ModelLoadError(
            f"{folder}: the pooling leaves the prompt's tokens out (include_prompt: false) and the folder "
            f"prepends the prompt {spec.default_prompt_name!r} to every text; matryoshka2d does not support "
            "that combination (its embeddings would differ from sentence-transformers')"
        )
    return spec


def _read_prompts(folder: Path, spec: FolderSpec) -> None:
    """Fill ``spec``'s prompts from ``config_sentence_transformers.json`` (if there is one), checked."""
    path = folder / "config_sentence_transformers.json"
    if not path.is_file():
        return
    config = read_json(path)
    if not isinstance(config, dict):
        raise ModelLoadError(f"{path}: expected a JSON object, got {type(config).__name__}")
    prompts = config.get("prompts") or {}
    if not isinstance(prompts, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in prompts.items()
    ):
        raise ModelLoadError(f"{path}: prompts must map prompt names to strings, got {prompts!r:.80}")
    default = config.get("default_prompt_name")
    if default is not None and (not isinstance(default, str) or default not in prompts):
        raise ModelLoadError(
            f"{path}: default_prompt_name {default!r} is not one of its prompts ({sorted(prompts)})"
        )
    similarity = config.get("similarity_fn_name")
    if similarity is not None and not isinstance(similarity, str):
        raise ModelLoadError(f"{path}: similarity_fn_name must be a string, got {similarity!r:.80}")
    spec.prompts, spec.default_prompt_name, spec.similarity_fn_name = dict(prompts), default, similarity


def _read_dense(dense_dir: Path) -> tuple[int, torch.Tensor | None]:
    """``(d, rotation)`` of the Dense module matryoshka2d writes; refuse any other Dense module.

    The first ``d`` rows of the identity (dim truncation): rotation None. ``d`` orthonormal rows (the
    first ``d`` rows of a rotated last exit): those rows completed to an orthogonal square matrix.
    """
    cfg = read_json(dense_dir / "config.json")
    weights_file = dense_dir / "model.safetensors"
    refuse = ModelLoadError(
        f"{dense_dir}: Dense modules that project embeddings are not supported (matryoshka2d keeps dim "
        "prefixes, optionally of a rotated exit: only a Dense module without bias or activation whose "
        "rows are orthonormal is accepted)"
    )
    if cfg.get("bias", True) or not str(cfg.get("activation_function", "")).endswith("Identity"):
        raise refuse
    if not weights_file.is_file():
        raise refuse
    from safetensors.torch import load_file

    weight = load_file(str(weights_file)).get("linear.weight")
    if weight is None or weight.ndim != 2 or weight.shape[0] > weight.shape[1]:
        raise refuse
    weight = weight.float()
    d, hidden = weight.shape
    if torch.equal(weight, torch.eye(d, hidden)):
        return d, None
    if not _is_orthonormal(weight):
        raise refuse
    return d, complete_rotation(weight)


def _is_orthonormal(rows: torch.Tensor) -> bool:
    """Whether the rows of ``rows`` are orthonormal (to float32 round-off)."""
    gram = rows.double() @ rows.double().T
    return bool(
        torch.allclose(gram, torch.eye(rows.shape[0], dtype=torch.float64), atol=_ORTHOGONAL_TOLERANCE)
    )


def complete_rotation(rows: torch.Tensor) -> torch.Tensor:
    """An orthogonal square matrix whose first rows are ``rows`` (``d`` orthonormal rows of length h).

    The other ``h - d`` rows span the orthogonal complement (from an SVD): any completion gives the same
    first ``d`` coordinates, which is all a ``d``-dim model uses.
    """
    d, hidden = rows.shape
    if d == hidden:
        return rows.float().contiguous()
    _, _, vt = torch.linalg.svd(rows.double(), full_matrices=True)
    return torch.cat([rows.double(), vt[d:]]).float().contiguous()


def check_rotation(
    matrix: object, hidden_size: int, what: str, error: type[Exception] = ModelLoadError
) -> torch.Tensor:
    """``matrix`` as a float32 tensor if it is an orthogonal ``(hidden_size, hidden_size)`` matrix.

    Raises:
        ``error`` naming ``what``: not a matrix of that shape, not finite, or not orthogonal.
    """
    try:
        tensor = torch.as_tensor(matrix).detach().cpu()
    except (TypeError, ValueError, RuntimeError):
        raise error(
            f"{what}: expected a float ({hidden_size}, {hidden_size}) rotation matrix, got "
            f"{type(matrix).__name__}"
        ) from None
    if tensor.shape != (hidden_size, hidden_size) or not tensor.is_floating_point():
        raise error(
            f"{what}: expected a float ({hidden_size}, {hidden_size}) rotation matrix, got "
            f"{tuple(tensor.shape)} {tensor.dtype}"
        )
    if not bool(torch.isfinite(tensor).all()) or not _is_orthonormal(tensor):  # square: checked above
        raise error(f"{what}: not an orthogonal matrix (R @ R.T must be the identity)")
    return tensor.float().contiguous()


def read_exit_rotations(folder: Path) -> dict[int, torch.Tensor]:
    """The rotations in ``folder``'s :data:`EXIT_ROTATIONS_FILE` (``{}`` without one); shapes are checked
    against the model by :meth:`EmbeddingModel.set_exit_rotations`."""
    path = folder / EXIT_ROTATIONS_FILE
    if not path.is_file():
        return {}
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ModelLoadError(f"{path}: cannot read the exit rotations ({e})") from None
    rotations = {}
    for key, tensor in tensors.items():
        match = re.fullmatch(r"layers_(\d+)", key)
        if match is None:
            raise ModelLoadError(f"{path}: unexpected entry {key!r} (expected layers_<k>)")
        rotations[int(match.group(1))] = tensor
    return rotations


def write_exit_rotations(folder: Path, rotations: Mapping[int, torch.Tensor]) -> None:
    """Write ``rotations`` (``{layer count: matrix}``) to ``folder``'s :data:`EXIT_ROTATIONS_FILE`."""
    from safetensors.torch import save_file

    tensors = {f"layers_{k}": rotations[k].detach().cpu().float().contiguous() for k in sorted(rotations)}
    save_file(tensors, str(folder / EXIT_ROTATIONS_FILE))


def write_folder(
    folder: Path,
    transformer,
    tokenizer,
    pooling_mode: str,
    max_seq_length: int,
    hidden_size: int,
    dim: int,
    metadata: dict,
    model_card: str,
    do_lower_case: bool = False,
    normalize: bool = True,
    exit_rotations: Mapping[int, torch.Tensor] | None = None,
    output_rotation: torch.Tensor | None = None,
    prompts: Mapping[str, str] | None = None,
    default_prompt_name: str | None = None,
    similarity_fn_name: str | None = None,
    include_prompt: bool = True,
) -> None:
    """Write a complete sentence-transformers model folder into ``folder`` (which must be empty).

    ``exit_rotations`` (layer exits other than the last) go to :data:`EXIT_ROTATIONS_FILE`;
    ``output_rotation`` (the last exit's) becomes the Dense module, its first ``dim`` rows, so that
    sentence-transformers computes the same embeddings.
    """
    import transformers

    from matryoshka2d import __version__

    with quiet_transformers(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformer.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    write_json(
        folder / "sentence_bert_config.json",
        {"max_seq_length": max_seq_length, "do_lower_case": do_lower_case},
    )
    write_json(
        folder / "1_Pooling" / "config.json", pooling_config(pooling_mode, hidden_size, include_prompt)
    )
    if dim < hidden_size or output_rotation is not None:
        from safetensors.torch import save_file

        projection = torch.eye(hidden_size) if output_rotation is None else output_rotation.float().cpu()
        dense = folder / "2_Dense"
        write_json(
            dense / "config.json",
            {
                "in_features": hidden_size,
                "out_features": dim,
                "bias": False,
                "activation_function": "torch.nn.modules.linear.Identity",
            },
        )
        weight = projection[:dim].contiguous()
        save_file({"linear.weight": weight}, str(dense / "model.safetensors"))
        modules.append(
            {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}
        )
    if normalize:
        n = len(modules)
        normalize_type = "sentence_transformers.models.Normalize"
        modules.append({"idx": n, "name": str(n), "path": f"{n}_Normalize", "type": normalize_type})
        (folder / f"{n}_Normalize").mkdir()
    write_json(folder / "modules.json", modules)  # type: ignore[arg-type]
    write_json(
        folder / "config_sentence_transformers.json",
        {
            "__version__": {
                "matryoshka2d": __version__,
                "transformers": transformers.__version__,
                "pytorch": torch.__version__,
            },
            "prompts": dict(prompts or {}),
            "default_prompt_name": default_prompt_name,
            "similarity_fn_name": similarity_fn_name or "cosine",
        },
    )
    if exit_rotations:
        write_exit_rotations(folder, exit_rotations)
    write_json(folder / METADATA_FILE, metadata)
    (folder / "README.md").write_text(model_card, encoding="utf-8")
