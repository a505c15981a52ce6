"""ONNX graphs of the first k layers, per-exit sub-graphs and int8 dynamic quantisation.

:func:`export_onnx` writes the graph sentence-transformers' ONNX backend (optimum's
``ORTModelForFeatureExtraction``) runs: token inputs in, ``last_hidden_state`` out, for the first ``k``
transformer layers. The hidden state after every earlier layer keeps a known tensor name
(``hidden_state_<i>``), recorded in the graph's metadata (:data:`EXITS_KEY`), so :func:`extract_exits`
can cut a stand-alone graph that runs only the first ``i`` layers and returns every exit up to ``i`` —
that is how the ONNX backend (:mod:`matryoshka2d.backends.onnx`) runs ``layers=i`` without computing the
layers after ``i`` (ONNX Runtime runs the whole graph whatever outputs are asked for).

:func:`quantize_int8` applies ONNX Runtime's dynamic quantisation (int8 weights, activations quantised on
the fly) with the settings of the preset that fits this CPU (:func:`int8_preset`).

A graph whose weights pass :data:`EXTERNAL_DATA_BYTES` (protobuf cannot hold a file past 2 GiB:
bge-m3 or multilingual-e5-large in float32) keeps them in one file beside it, ``<name>_data``
(``model.onnx`` + ``model.onnx_data``, the layout optimum and sentence-transformers read): see
:func:`save_graph`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import shutil
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from matryoshka2d.errors import InvalidInputError, Matryoshka2dError
from matryoshka2d.persistence import PROCESS_STATE_LOCK, fsync_path, remove_stale_temporaries
from matryoshka2d.truncation import check_layers, exit_states, layer_view

#: Key of the graph metadata entry mapping every layer count to the tensor holding its hidden state.
EXITS_KEY = "matryoshka2d.exits"
#: The output sentence-transformers (optimum) reads.
LAST_HIDDEN_STATE = "last_hidden_state"
OPSET = 17

#: int8 presets, named like optimum's / sentence-transformers' ``AutoQuantizationConfig`` presets (the file
#: is ``model_qint8_<preset>.onnx``, sentence-transformers' name for int8 weights): CPU flags ->
#: ``reduce_range``. Weights are always signed int8, per channel. Without VNNI, u8 x s8 products can
#: saturate the int16 intermediate sums, so weights use 7 bits (reduce_range=True); optimum's avx2 preset
#: avoids it with uint8 weights instead (``model_quint8_avx2.onnx``). See docs/BENCHMARKS.md for both on
#: an AVX2 CPU.
INT8_PRESETS = {"avx512_vnni": False, "avx512": True, "avx2": True, "arm64": False}


class OnnxExportError(Matryoshka2dError):
    """The ONNX export or quantisation failed (missing onnx/onnxruntime, an unsupported model)."""


def require_onnx() -> None:
    """Raise :class:`OnnxExportError` with the install command if onnx or onnxruntime is missing."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise OnnxExportError(
            f"the ONNX backend needs onnx and onnxruntime ({e.name} is missing): "
            "pip install 'matryoshka2d[onnx]'"
        ) from None


def int8_preset() -> str:
    """The int8 preset for this CPU: ``avx512_vnni`` (VNNI or AMX), ``avx512``, ``avx2`` or ``arm64``."""
    if platform.machine().lower() in ("arm64", "aarch64"):
        return "arm64"
    flags: set[str] = set()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    if flags & {"avx512_vnni", "avx_vnni", "amx_int8"}:
        return "avx512_vnni"
    if "avx512f" in flags:
        return "avx512"
    return "avx2"


def int8_file_name(preset: str | None = None) -> str:
    """``model_qint8_<preset>.onnx``, the name sentence-transformers gives its dynamic int8 exports."""
    return f"model_qint8_{preset or int8_preset()}.onnx"


#: Weights a graph file holds itself: protobuf's 2 GiB message limit, less room for the graph. Past it they
#: go to one external data file beside the graph (:func:`save_graph`).
EXTERNAL_DATA_BYTES = 2**31 - 2**26


def external_data_path(path: str | os.PathLike) -> Path:
    """The file beside ``path`` holding its weights when they are external: ``model.onnx_data``."""
    path = Path(path)
    return path.with_name(path.name + "_data")


def _weight_bytes(graph) -> int:
    """Bytes of the graph's weights (counted one by one: the whole may be past protobuf's limit)."""
    return sum(t.ByteSize() for t in graph.graph.initializer)


def external_files(graph) -> set[str]:
    """The data files (relative paths) that ``graph``'s external weights are read from (loaded with or
    without its data; empty where the graph holds every weight itself)."""
    return {e.value for t in graph.graph.initializer for e in t.external_data if e.key == "location"}


def external_data_complete(path: str | os.PathLike, graph=None) -> bool:
    """Whether every external weight of the graph at ``path`` lies inside its data file (a data file that is
    missing, or was cut short by a crash, gives False). ``graph``: that graph already loaded (its header)."""
    path = Path(path)
    graph = load_graph_header(path) if graph is None else graph
    sizes: dict[str, int] = {}
    for tensor in graph.graph.initializer:
        info = {e.key: e.value for e in tensor.external_data}
        if "location" not in info:
            continue
        if info["location"] not in sizes:
            data = path.parent / info["location"]
            sizes[info["location"]] = data.stat().st_size if data.is_file() else -1
        end = int(info.get("offset", 0)) + int(info.get("length", 0))
        if sizes[info["location"]] < end:
            return False
    return True


def _temporary_folder(path: Path) -> tempfile.TemporaryDirectory:
    """A private folder beside ``path`` to write it in (``.NAME.tmp-<pid>-*``, the project's temporary
    names); what killed writes of ``path`` left there is removed first (:func:`remove_stale_temporaries`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    return tempfile.TemporaryDirectory(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)


def _move_into_place(tmp: Path, path: Path) -> None:
    """Rename the finished file ``tmp`` to ``path``, flushed to disk first (a power loss must not leave a
    complete-looking name on a short file)."""
    os.chmod(tmp, 0o644)
    fsync_path(tmp)
    os.replace(tmp, path)


def save_graph(graph, path: str | os.PathLike, external: bool | None = None) -> Path:
    """Write the ONNX ``graph`` (weights loaded in memory) to ``path`` atomically.

    With ``external`` (default: when the weights pass :data:`EXTERNAL_DATA_BYTES`) the weights go to one
    file, :func:`external_data_path`; it is moved into place before the graph that refers to it, so a
    reader that sees the new graph finds its data. A data file left at that name by an earlier graph is
    removed when the new one holds its weights itself. ``graph`` must not be used afterwards (saving with
    external data moves its weights out of it). A graph whose weights are references to another graph's
    data file (:func:`extract_exits` in the same folder) is written as it is.
    """
    import onnx

    path = Path(path)
    data = external_data_path(path)
    if external is None:
        external = _weight_bytes(graph) > EXTERNAL_DATA_BYTES
    with _temporary_folder(path) as folder:
        tmp = Path(folder) / path.name
        if external:
            onnx.save(graph, str(tmp), save_as_external_data=True, location=data.name)
            _move_into_place(tmp.with_name(data.name), data)
        else:
            onnx.save(graph, str(tmp))
        refers_to_data = data.name in external_files(graph)  # a cut graph sharing a data file of that name
        _move_into_place(tmp, path)
    if not external and not refers_to_data:
        data.unlink(missing_ok=True)
    return path


def copy_graph(source: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Copy the graph ``source`` to ``path`` with its weights in a data file beside it, atomically.

    A graph that already keeps them in ``<source>_data`` is copied file by file, as bytes (no 2 GiB of
    weights through memory; a symbolic link, as in the hub's cache, is followed); one that holds them
    itself is rewritten with :func:`save_graph` (``external=True``).
    """

    source, path = Path(source), Path(path)
    graph = load_graph_header(source)
    files = external_files(graph)
    if files != {external_data_path(source).name} or source.name != path.name:
        if files:
            from onnx.external_data_helper import load_external_data_for_model

            load_external_data_for_model(graph, str(source.parent))
        return save_graph(graph, path, external=True)
    with _temporary_folder(path) as folder:
        for src, dst in ((external_data_path(source), external_data_path(path)), (source, path)):
            tmp = Path(folder) / dst.name
            shutil.copyfile(src, tmp)  # the data file first: a reader that sees the graph finds its data
            _move_into_place(tmp, dst)
    return path


class _QuantizerHintFilter(logging.Filter):
    """Drops the records ONNX Runtime's quantiser logs on the root logger, and nothing else (changing the
    root logger's level instead would also silence every other thread while a quantisation runs)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return f"{os.sep}onnxruntime{os.sep}quantization{os.sep}" not in record.pathname


class _Exits(torch.nn.Module):
    """The first ``k`` layers as a module returning every hidden state after layer 1..k (ONNX export)."""

    def __init__(self, transformer: torch.nn.Module, k: int, input_names: list[str]) -> None:
        super().__init__()
        self.transformer = layer_view(transformer, k)
        self.input_names = input_names

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.transformer(
            **dict(zip(self.input_names, inputs)), output_hidden_states=True, return_dict=True
        )
        states = exit_states(self.transformer, out, range(1, len(out.hidden_states)))
        return tuple(states[k] for k in sorted(states))


def graph_input_names(model) -> list[str]:
    """The inputs the graph takes: ``input_ids``, ``attention_mask`` and, if used, ``token_type_ids``."""
    names = ["input_ids", "attention_mask"]
    if "token_type_ids" in getattr(model.tokenizer, "model_input_names", []) and (
        "token_type_ids" in model._input_names
    ):
        names.append("token_type_ids")
    return names


def export_onnx(
    model, path: str | os.PathLike, layers: int | None = None, external: bool | None = None
) -> Path:
    """Write the ONNX graph of ``model``'s embeddings and first ``layers`` transformer layers.

    The graph takes ``input_ids``, ``attention_mask`` (and ``token_type_ids`` when the model uses them),
    int64 of shape (batch, sequence), and returns ``last_hidden_state`` (batch, sequence, hidden_size),
    float32 — what sentence-transformers' ONNX backend expects; pooling, dim truncation and normalisation
    stay in the sentence-transformers modules of the folder. The hidden state after each layer ``i`` is
    the tensor ``hidden_state_<i>`` (recorded under :data:`EXITS_KEY` in the graph metadata) for
    :func:`extract_exits`. Written atomically.

    Args:
        model: a float32 :class:`~matryoshka2d.model.EmbeddingModel`.
        path: the ``.onnx`` file to write.
        layers: how many transformer layers the graph runs (default: all).
        external: weights in ``<path>_data`` beside the graph (default: only past
            :data:`EXTERNAL_DATA_BYTES`, where one file cannot hold them); see :func:`save_graph`.

    Raises:
        OnnxExportError: onnx/onnxruntime missing, or the model is not float32.
    """
    require_onnx()
    import onnx

    k = check_layers(layers, model.num_layers) if layers is not None else model.num_layers
    if model.dtype != torch.float32:
        raise OnnxExportError(
            f"ONNX export needs a float32 model, got {model.precision}: load it with dtype='float32'"
        )
    module = _Exits(model.transformer, k, graph_input_names(model))
    names = module.input_names
    exits = {i: f"hidden_state_{i}" for i in range(1, k)} | {k: LAST_HIDDEN_STATE}
    outputs = [exits[i] for i in range(1, k + 1)]
    sample = model.pad(model.tokenize(["a short example", "a slightly longer example text"], False), [0, 1])
    path = Path(path)
    # Exported into a folder of its own: past 2 GiB the exporter writes every weight as a file beside
    # the graph; save_graph then writes the graph where it belongs (with one data file if need be).
    with _temporary_folder(path) as folder, torch.no_grad():
        tmp = Path(folder) / path.name
        with PROCESS_STATE_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings and the exporter's deprecation notice
            # the caller's model: its modes are put back (read under the lock: another export of it may
            # be running)
            training = {m: m.training for m in module.modules()}
            module.eval()
            try:
                torch.onnx.export(
                    module,
                    tuple(sample[name] for name in names),
                    str(tmp),
                    input_names=names,
                    output_names=outputs,
                    dynamic_axes={name: {0: "batch_size", 1: "sequence_length"} for name in names + outputs},
                    opset_version=OPSET,
                    dynamo=False,  # the TorchScript exporter: no onnxscript needed, stable exit names
                )
            finally:
                for m, mode in training.items():
                    m.train(mode)
        graph = onnx.load(str(tmp))
        keep = [o for o in graph.graph.output if o.name == LAST_HIDDEN_STATE]
        # The exits stay as named intermediate tensors, typed in value_info (what extract_exits needs).
        graph.graph.value_info.extend(o for o in graph.graph.output if o.name != LAST_HIDDEN_STATE)
        del graph.graph.output[:]
        graph.graph.output.extend(keep)
        entry = graph.metadata_props.add()
        entry.key, entry.value = EXITS_KEY, json.dumps({str(i): name for i, name in exits.items()})
        return save_graph(graph, path, external)


def _exits_of(graph) -> dict[int, str] | None:
    for entry in graph.metadata_props:
        if entry.key == EXITS_KEY:
            return {int(i): name for i, name in json.loads(entry.value).items()}
    return None


def read_exits(source) -> dict[int, str] | None:
    """``{layer count: tensor name}`` recorded by :func:`export_onnx`, or None for another ONNX file.

    ``source``: the file's path, or the graph already loaded (``onnx.ModelProto``; e.g. by
    :func:`load_graph_header`, to read several records with one load).
    """
    return _exits_of(load_graph_header(source) if isinstance(source, (str, os.PathLike)) else source)


def load_graph_header(path: str | os.PathLike):
    """The ``onnx.ModelProto`` at ``path`` without the weights kept in a data file beside it."""
    import onnx

    return onnx.load(str(path), load_external_data=False)


def exit_output_name(layers: int) -> str:
    """The output of an :func:`extract_exits` graph holding the hidden state after ``layers`` layers."""
    return f"exit_{layers}"


def extract_exits(source: str | os.PathLike, layers: int, path: str | os.PathLike) -> Path:
    """Cut from ``source`` (written by :func:`export_onnx`) a graph running only the first ``layers`` layers.

    The new graph returns the hidden state of every layer count ``1..layers`` (outputs named
    :func:`exit_output_name`: ``exit_1``, ``exit_2``, ...) and holds only the nodes and weights these
    need. Where ``source`` keeps its weights in a data file and ``path`` is in the same folder, the new
    graph refers to that file instead of copying the weights (a few hundred KiB on disk, not the weights
    again); else it holds them as :func:`save_graph` decides. Written atomically.

    Raises:
        OnnxExportError: ``source`` has no recorded exits, or not up to ``layers``.
    """
    from onnx.external_data_helper import load_external_data_for_model
    from onnx.utils import Extractor

    source, path = Path(source), Path(path)
    if path.resolve() == source.resolve():
        raise OnnxExportError(f"extract_exits would write over its source {source}: give another path")
    # The weights stay on disk while cutting: the extractor's shape inference serialises the whole graph,
    # which protobuf refuses past 2 GiB.
    graph = load_graph_header(source)
    refer = bool(external_files(graph)) and path.parent.resolve() == source.parent.resolve()
    exits = _exits_of(graph) or {}
    if layers not in exits:
        raise OnnxExportError(
            f"{source} has no exit after layer {layers} (exits: {sorted(exits) or 'none recorded'})"
        )
    inputs = [i.name for i in graph.graph.input]
    sub = Extractor(graph).extract_model(inputs, [exits[i] for i in range(1, layers + 1)])
    renames = {output.name: exit_output_name(i) for i, output in enumerate(sub.graph.output, start=1)}
    taken = {name for node in sub.graph.node for name in [*node.input, *node.output]}
    if taken & (set(renames.values()) - set(renames)):
        raise OnnxExportError(
            f"{source}: a tensor is already named like an exit ({sorted(renames.values())})"
        )
    for node in sub.graph.node:
        node.output[:] = [renames.get(name, name) for name in node.output]
        node.input[:] = [renames.get(name, name) for name in node.input]
    for output in sub.graph.output:
        output.name = renames[output.name]
    del sub.metadata_props[:]
    if refer:
        return save_graph(sub, path, external=False)
    if external_files(sub):
        load_external_data_for_model(sub, str(source.parent))
    return save_graph(sub, path)


def quantize_int8(
    source: str | os.PathLike,
    path: str | os.PathLike,
    preset: str | None = None,
    external: bool | None = None,
    calibration: Sequence[Mapping[str, Any]] | None = None,
    outlier_ratio: float | None = None,
    threads: int | None = None,
) -> Path:
    """Dynamic int8 quantisation of an ONNX graph with ONNX Runtime (weights int8, activations on the fly).

    The settings of sentence-transformers' ``export_dynamic_quantized_onnx_model`` presets: every operator
    ONNX Runtime can quantise dynamically (the MatMul weights and the embedding tables), signed int8
    weights per channel (7-bit where the preset needs ``reduce_range``), activations quantised per batch.
    Measured on all-MiniLM-L6-v2 (STSB test): -0.27 Spearman at full size, a 4x smaller file (per-tensor
    MatMul-only quantisation: -0.22 but 2.6x larger). The graph metadata (the exits) is kept. Written
    atomically.

    With ``calibration``, the few activation channels that would set the int8 scale of a MatMul input on
    their own stay in float32 (:func:`~matryoshka2d.export.int8_outliers.split_outlier_channels`): on
    all-mpnet-base-v2 the median cosine of int8 to float32 embeddings goes from 0.888 to 0.990 (STSB
    validation sentences).

    Args:
        source: a float32 ``.onnx`` file.
        path: the ``.onnx`` file to write.
        preset: one of :data:`INT8_PRESETS` (default: :func:`int8_preset` for this CPU).
        external: weights in ``<path>_data`` beside the graph (default: past :data:`EXTERNAL_DATA_BYTES`).
        calibration: batches of graph inputs (:func:`~matryoshka2d.export.int8_outliers.calibration_feeds`)
            to find the outlier channels on; None quantises every channel (ONNX Runtime's plain dynamic
            quantisation, what sentence-transformers does).
        outlier_ratio: a channel is kept in float32 past this multiple of the median channel's range
            (default :data:`~matryoshka2d.export.int8_outliers.OUTLIER_RATIO`).
        threads: ONNX Runtime intra-op threads for the calibration run (default: its own choice).
    """
    require_onnx()
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from matryoshka2d.export.int8_outliers import OUTLIER_RATIO, OUTLIERS_KEY, split_outlier_channels

    preset = preset or int8_preset()
    if preset not in INT8_PRESETS:
        raise InvalidInputError(f"unknown int8 preset {preset!r}; choose one of {list(INT8_PRESETS)}")
    source, path = Path(source), Path(path)
    head = load_graph_header(source)
    metadata = [(entry.key, entry.value) for entry in head.metadata_props]
    files = external_files(head)
    big = bool(files) or _weight_bytes(head) > EXTERNAL_DATA_BYTES
    del head
    root = logging.getLogger()
    hint = _QuantizerHintFilter()
    with _temporary_folder(path) as folder:
        # ONNX Runtime writes a shape-inferred copy of its input beside it: so the input is a copy of the
        # source (and its data files: onnx refuses links to them) in this private folder, not the source,
        # which may be in a read-only model folder (or be quantised by another process at the same time).
        linked = Path(folder) / "source"
        linked.mkdir()
        for name in (source.name, *files):
            shutil.copyfile(source.parent / name, linked / name)
        tmp = Path(folder) / path.name
        to_quantize, float32_nodes = linked / source.name, []
        if calibration is not None:
            split = linked / f"split-{source.name}"
            ratio = OUTLIER_RATIO if outlier_ratio is None else outlier_ratio
            float32_nodes, record = split_outlier_channels(to_quantize, split, calibration, ratio, threads)
            metadata.append((OUTLIERS_KEY, json.dumps(record)))
            to_quantize = split
        with PROCESS_STATE_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            root.addFilter(hint)  # quantize_dynamic logs a pre-processing hint on the root logger
            try:
                quantize_dynamic(
                    str(to_quantize),
                    str(tmp),
                    per_channel=True,
                    reduce_range=INT8_PRESETS[preset],
                    weight_type=QuantType.QInt8,
                    nodes_to_exclude=float32_nodes,
                    use_external_data_format=big,
                )
            finally:
                root.removeFilter(hint)
        graph = onnx.load(str(tmp))
        present = {e.key for e in graph.metadata_props}
        for key, value in metadata:  # keep the exits (and what was split)
            if key not in present:
                entry = graph.metadata_props.add()
                entry.key, entry.value = key, value
        return save_graph(graph, path, external)
