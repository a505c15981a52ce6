"""The ONNX Runtime backend: the same ``encode(texts, layers=, dim=)`` as the torch model, on CPU.

``layers=k`` runs only the first k layers: ONNX Runtime runs every node of a graph whatever outputs are
asked for, so each layer count gets its own graph, cut on first use from one graph of all layers
(:func:`~matryoshka2d.export.onnx.extract_exits`) and cached on disk (see :func:`onnx_cache_dir`). A
request for several layer counts (grid evaluation) runs the graph of the deepest one, which returns every
earlier exit. Pooling, dim truncation and normalisation are float32, shared with the torch backend.
The weights are stored once: the cached graph of all layers keeps them in a data file beside it
(``model.onnx_data``) that every cut graph refers to instead of holding a copy, and ONNX Runtime maps that
file into memory, so the sessions of all layer counts share its pages (each session still makes its own
pre-packed copy of the matrix weights; measured on all-MiniLM-L6-v2 with all 6 graphs:
benchmarks/bench_onnx_memory.py, docs/BENCHMARKS.md). Graphs are built under a file lock in the cache
folder, so processes sharing a cache build each graph once.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import threading
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from matryoshka2d.encoder import Encoder
from matryoshka2d.errors import ModelLoadError, first_line
from matryoshka2d.export.int8_outliers import calibration_feeds, read_outlier_record
from matryoshka2d.export.onnx import (
    copy_graph,
    exit_output_name,
    export_onnx,
    external_data_complete,
    external_data_path,
    extract_exits,
    graph_input_names,
    int8_file_name,
    int8_preset,
    load_graph_header,
    quantize_int8,
    read_exits,
    require_onnx,
)
from matryoshka2d.pooling import pool_numpy
from matryoshka2d.validation import check_positive_int

#: Bump when the cached graphs change meaning (new exporter settings), so old caches are not reused.
#: 2: weights in a data file the cut graphs share; 3: int8 keeps outlier channels float32; 4: their side
#: products join after the bias (ONNX Runtime fuses MatMul + bias again)
CACHE_VERSION = "4"


def onnx_cache_dir() -> Path:
    """Where cut and exported ONNX graphs are cached: ``$M2D_CACHE_DIR/onnx``, else
    ``$XDG_CACHE_HOME/matryoshka2d/onnx`` (default ``~/.cache/matryoshka2d/onnx``).

    Model folders are not written to (they may be read-only: an installed package, the hub cache).
    """
    root = os.environ.get("M2D_CACHE_DIR")
    if root:
        return Path(root).expanduser() / "onnx"
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg).expanduser() / "matryoshka2d" / "onnx"


def _fingerprint(files: Sequence[Path]) -> str:
    """A short hash of the files' real paths, sizes and modification times (a changed file: a new key)."""
    digest = hashlib.sha256(CACHE_VERSION.encode())
    for f in sorted(files):
        stat = f.stat()
        digest.update(f"{f.resolve()}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


class OnnxEncoder(Encoder):
    """Encode with ONNX Runtime (CPU) at any (layers, dims), float32 or int8.

    Built from a model folder (anything :meth:`EmbeddingModel.load` reads): the tokenizer, pooling,
    ``max_seq_length`` and dim come from the folder. The graph of all layers is the folder's own
    ``onnx/model.onnx`` (or ``onnx/model_qint8_<preset>.onnx`` for int8) when ``m2d export`` wrote it
    (an int8 file written before int8 kept its outlier channels in float32 is quantised again instead),
    else it is exported from the torch weights once and cached. Safe to call from many threads at once
    (``InferenceSession.run`` is thread-safe; graphs are built once, under a lock, and written atomically).

    Args:
        name_or_path: a model folder or a hub id.
        quantize: None (float32) or ``"int8"`` (ONNX Runtime dynamic quantisation, preset for this CPU;
            the few outlier activation channels stay float32: :mod:`matryoshka2d.export.int8_outliers`).
        threads: ONNX Runtime intra-op threads (default: ONNX Runtime's choice, one per physical core).
        cache_dir: where cut graphs are cached (default :func:`onnx_cache_dir`).
    """

    def __init__(
        self,
        name_or_path: str | os.PathLike,
        quantize: str | None = None,
        threads: int | None = None,
        cache_dir: str | os.PathLike | None = None,
    ) -> None:
        require_onnx()
        from matryoshka2d.model import EmbeddingModel

        if quantize not in (None, "int8"):
            from matryoshka2d.errors import InvalidInputError

            raise InvalidInputError(f"unknown quantisation {quantize!r}; choose 'int8' or none")
        if threads is not None:  # checked before any work (ONNX Runtime would fail on first use)
            threads = check_positive_int(threads, "threads")
        from matryoshka2d.persistence import read_folder_spec, resolve_model_path

        # Resolved once: a hub id resolved twice could load one revision and key the cache by another.
        folder = resolve_model_path(name_or_path)
        model = EmbeddingModel.load(folder, dtype="float32")  # settings, and weights if we export
        self.tokenizer = model.tokenizer
        self.pooling_mode = model.pooling_mode
        self.max_positions = model.max_positions
        self.max_seq_length = model.max_seq_length
        self.do_lower_case = model.do_lower_case
        self.prompts, self.default_prompt_name = model.prompts, model.default_prompt_name
        self.include_prompt = model.include_prompt
        self.hidden_size = model.hidden_size
        self.dim = model.dim
        self.num_layers = model.num_layers
        self.name_or_path = str(name_or_path)
        self.metadata = model.metadata
        # Applied after pooling, as the torch model does (EmbeddingModel.set_exit_rotations).
        self._rotations_t = {k: r.numpy().T.copy() for k, r in model.exit_rotations.items()}
        self.quantize = quantize
        self.preset = int8_preset() if quantize else None
        self.threads = threads
        self._tokenizer_lock = threading.Lock()
        self._build_lock = threading.Lock()
        self._sessions: dict[int, object] = {}

        self._folder = folder
        shipped_fp32 = self._shipped(folder / "onnx" / "model.onnx")
        shipped_int8 = (
            self._shipped(folder / "onnx" / int8_file_name(self.preset), int8=True) if quantize else None
        )
        self._fp32_graph = shipped_fp32  # None: exported from the torch weights into the cache on first use
        self._int8_graph = shipped_int8
        if shipped_fp32 or shipped_int8:
            graphs = [f for f in (shipped_fp32, shipped_int8) if f is not None]
            key_files = graphs + [d for d in map(external_data_path, graphs) if d.is_file()]
        else:
            spec = read_folder_spec(folder)
            key_files = [
                f
                for f in spec.transformer_dir.iterdir()
                if f.is_file() and re.search(r"\.(safetensors|bin|json)$", f.name)
            ]
        name = re.sub(r"[^\w.-]+", "_", Path(str(self.name_or_path)).name)[-40:] or "model"
        self.cache = Path(cache_dir or onnx_cache_dir()) / f"{name}-{_fingerprint(key_files)}"
        # The torch weights are kept only until the graph of all layers exists (reloaded if ever needed).
        self._torch_model = model if shipped_fp32 is None else None
        self.input_names = graph_input_names(model)

    # ------------------------------------------------------------------ Encoder interface
    @property
    def backend(self) -> str:
        return "onnx-int8" if self.quantize else "onnx"

    @property
    def precision(self) -> str:
        return "int8" if self.quantize else "float32"

    def _tokenizer_threads(self) -> int:
        """The sessions' thread count (``threads``; default: the cores this process may use)."""
        if self.threads:
            return self.threads
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1

    def tokenize(self, texts: Sequence[str], padding: bool = True, prompt: str | None = None) -> dict:
        """Tokenise a batch, truncated to ``max_seq_length``, ``prompt`` (default: the model's default
        prompt) prepended: numpy arrays if ``padding``, else lists."""
        encoded = self._run_tokenizer(texts, padding, "np", prompt)
        return {key: value for key, value in encoded.items() if key in self.input_names}

    def forward(
        self, features: dict[str, np.ndarray], layers: Sequence[int] | None = None
    ) -> dict[int, np.ndarray]:
        """Pooled float32 embeddings of several layer counts from one run of the deepest one's graph.

        The ONNX counterpart of :meth:`EmbeddingModel.forward <matryoshka2d.model.EmbeddingModel.forward>`
        (what the server's batching engine calls): full-size, not normalised.

        Args:
            features: :meth:`pad` output (``input_ids``, ``attention_mask``, ...).
            layers: layer counts in ``1..num_layers`` (default: the last layer only).

        Returns:
            ``{k: array of shape (batch, hidden_size)}`` for every requested ``k`` (rotated where the
            model's layer exit k is).
        """
        wanted = self._layer_list(layers)  # None, one layer count or several, as EmbeddingModel.forward
        feed = {name: np.asarray(features[name], dtype=np.int64) for name in self.input_names}
        outputs = self.session(wanted[-1]).run([exit_output_name(k) for k in wanted], feed)
        # numpy, not torch: torch's spinning threads slowed ONNX Runtime's next run (pool_numpy)
        mask = feed["attention_mask"]
        pooled = {k: pool_numpy(hidden, mask, self.pooling_mode) for k, hidden in zip(wanted, outputs)}
        return {k: emb @ self._rotations_t[k] if k in self._rotations_t else emb for k, emb in pooled.items()}

    # ------------------------------------------------------------------ graphs
    def graph_path(self, layers: int, quantized: bool | None = None) -> Path:
        """The cached graph running the first ``layers`` layers (it may not be built yet), of this encoder's
        precision or, with ``quantized``, of the given one."""
        quantized = bool(self.quantize) if quantized is None else quantized
        suffix = f".qint8_{self.preset or int8_preset()}" if quantized else ""
        return self.cache / f"layers-{layers}{suffix}.onnx"

    def session(self, layers: int):
        """The ``onnxruntime.InferenceSession`` running the first ``layers`` layers (built on first use)."""
        session = self._sessions.get(layers)
        if session is not None:
            return session
        with self._build_lock:
            if layers not in self._sessions:
                import onnxruntime as ort

                options = ort.SessionOptions()
                if self.threads:
                    options.intra_op_num_threads = self.threads
                options.log_severity_level = 3
                # ONNX Runtime's threads busy-wait after each run by default; the pooling that follows (then
                # on torch's threads, now numpy) and the next batch's padding lost the cores to them:
                # measured on 2 cores, spinning off made 1 of 6 layers 1.5x faster and int8 at full size
                # 1.36x (docs/BENCHMARKS.md).
                options.add_session_config_entry("session.intra_op.allow_spinning", "0")
                # Under the lock until the session has mapped its files: other processes may build (or
                # rebuild a damaged cache) in the same folder.
                with self._cache_lock():
                    self._sessions[layers] = self._open(layers, ort, options)
            return self._sessions[layers]

    def _open(self, layers: int, ort, options):
        """The session of the cached graph of ``layers`` (built if missing). A cached graph that ONNX Runtime
        cannot load (damaged on disk) is built again once, with the graph of all layers it is cut from."""
        for attempt in (1, 2):
            full = self._full_graph()  # first: rebuilt (with its cut graphs) if its data is gone
            path = self.graph_path(layers)
            try:
                if not path.is_file():
                    extract_exits(full, layers, path)
                return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            except Exception as e:
                first = first_line(e)
                if attempt == 2:
                    raise ModelLoadError(f"cannot load the ONNX graph {path} ({first})") from None
                warnings.warn(
                    f"the cached graph {path} cannot be loaded ({first}): building it again", stacklevel=4
                )
                for built in (full, external_data_path(full)):  # the cut graphs go with it (_missing)
                    built.unlink(missing_ok=True)
                path.unlink(missing_ok=True)
        raise AssertionError("unreachable")

    def _shipped(self, path: Path, int8: bool = False) -> Path | None:
        """``path`` if it is a graph of all layers written by ``m2d export`` (with its exits), else None.

        With ``int8``, also None for an int8 graph exported before int8 kept its outlier activation
        channels in float32 (it is quantised again instead).
        """
        if not path.is_file():
            return None
        try:
            header = load_graph_header(path)  # once: an int8 graph of < 2 GiB holds its weights
        except Exception as e:  # not a graph: cut short, overwritten, ...
            first = first_line(e)
            raise ModelLoadError(
                f"{path} is not a readable ONNX graph ({first}): export the model again (m2d export "
                "--format onnx) or remove that file"
            ) from None
        exits = read_exits(header)
        if not exits or max(exits) != self.num_layers:
            return None
        if not external_data_complete(path, header):
            raise ModelLoadError(
                f"{path}: its weights file {external_data_path(path).name} is missing or cut short: export "
                "the model again (m2d export --format onnx) or remove the graph"
            )
        return None if int8 and read_outlier_record(header) is None else path

    @contextlib.contextmanager
    def _cache_lock(self) -> Iterator[None]:
        """Held (across processes) while graphs are built in the cache folder. What a killed builder left
        there is removed by the next write of the same graph
        (:func:`~matryoshka2d.export.onnx.save_graph`)."""
        from filelock import FileLock

        from matryoshka2d.errors import ModelLoadError

        lock = FileLock(str(self.cache / ".build.lock"))
        try:
            self.cache.mkdir(parents=True, exist_ok=True)
            lock.acquire()
        except OSError as e:  # a read-only or unreachable cache folder
            raise ModelLoadError(
                f"cannot build ONNX graphs in {self.cache} ({e.strerror or e}): set M2D_CACHE_DIR (or "
                "cache_dir=) to a writable folder"
            ) from None
        try:
            yield
        finally:
            lock.release()

    def _full_graph(self) -> Path:
        """The cached graph of all layers with its exits, its weights in a data file beside it (so that
        every cut graph refers to them instead of holding a copy): copied from the folder's own graph where
        ``m2d export`` wrote one, else exported from the torch weights (and quantised for int8).

        Called under the build locks.
        """
        if not self.quantize:
            full = self._fp32_full_graph()
        else:
            full = self.cache / int8_file_name(self.preset)
            if self._missing(full, quantized=True):
                if self._int8_graph is not None:
                    copy_graph(self._int8_graph, full)
                else:
                    feeds = calibration_feeds(self, self.input_names)
                    quantize_int8(
                        self._fp32_full_graph(),
                        full,
                        self.preset,
                        external=True,
                        calibration=feeds,
                        threads=self.threads,
                    )
        self._torch_model = None  # free the weights: every later graph is cut from the cached ones
        return full

    def _missing(self, full: Path, quantized: bool) -> bool:
        """Whether the graph of all layers ``full`` (or its data file) must be built; if so, the cut graphs
        that refer to its data are removed too (they are cut again from the new one)."""
        try:
            if full.is_file() and external_data_complete(full):
                return False
        except Exception:  # a header that does not parse (damaged on disk): built again
            pass
        for k in range(1, self.num_layers + 1):
            self.graph_path(k, quantized).unlink(missing_ok=True)
        return True

    def _fp32_full_graph(self) -> Path:
        full = self.cache / "model.onnx"
        if self._missing(full, quantized=False):
            if self._fp32_graph is not None:
                copy_graph(self._fp32_graph, full)
            else:
                if self._torch_model is None:
                    from matryoshka2d.model import EmbeddingModel

                    self._torch_model = EmbeddingModel.load(self._folder, dtype="float32")
                export_onnx(self._torch_model, full, external=True)
        return full

    def warm_up(self, layers: Sequence[int] | None = None, exits: bool = False) -> OnnxEncoder:
        """Build the graphs of ``layers`` (default: every layer count) now rather than on first use.

        ``exits`` is accepted for the torch model's signature and changes nothing: the graph of ``k``
        layers already returns every exit up to ``k``.
        """
        for k in self._layer_list(layers if layers is not None else range(1, self.num_layers + 1)):
            self.session(k)
        return self

    def __repr__(self) -> str:
        return f"OnnxEncoder({self.describe()}, cache={str(self.cache)!r})"
