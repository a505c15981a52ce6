"""Export a smaller standalone model: the first K layers and first D dims, as torch weights and/or ONNX.

:func:`export_model` is what ``m2d export`` (alias ``m2d truncate``) runs. Every format writes a
sentence-transformers folder holding only the K kept layers (``num_hidden_layers = K``) with a Dense
module keeping the first D dims and a Normalize module, so that ``SentenceTransformer(folder)`` gives
``encode(layers=K, dim=D)``. ``format="onnx"`` adds ``onnx/model.onnx`` (``SentenceTransformer(folder,
backend="onnx")``) and ``quantize="int8"`` adds ``onnx/model_qint8_<preset>.onnx`` (load it with
``model_kwargs={"file_name": "onnx/model_qint8_<preset>.onnx"}``). A model past 2 GiB of weights keeps
them in ``onnx/model.onnx_data`` beside the graph (ONNX external data, as optimum writes it).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from matryoshka2d.errors import InvalidInputError
from matryoshka2d.export.int8_outliers import calibration_feeds, split_outlier_channels
from matryoshka2d.export.onnx import (
    OnnxExportError,
    export_onnx,
    external_data_path,
    extract_exits,
    graph_input_names,
    int8_file_name,
    int8_preset,
    quantize_int8,
    read_exits,
    require_onnx,
)

FORMATS = ("torch", "onnx")
QUANTIZE = (None, "int8")
#: Where the ONNX graph lies in an exported folder (the place sentence-transformers looks for it).
ONNX_FILE = "onnx/model.onnx"

__all__ = [
    "FORMATS",
    "ONNX_FILE",
    "OnnxExportError",
    "export_model",
    "calibration_feeds",
    "export_onnx",
    "external_data_path",
    "extract_exits",
    "int8_file_name",
    "int8_preset",
    "quantize_int8",
    "read_exits",
    "split_outlier_channels",
]


def export_model(
    model,
    out: str | os.PathLike,
    layers: int | None = None,
    dim: int | None = None,
    format: str = "torch",
    quantize: str | None = None,
    *,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike | None] = (),
) -> Path:
    """Write the first ``layers`` layers and first ``dim`` dims of ``model`` as a standalone model folder.

    The folder is written atomically (:meth:`~matryoshka2d.model.EmbeddingModel.save`: a new or empty
    folder, or a previous matryoshka2d model with ``overwrite=True``).

    Args:
        model: a float32 :class:`~matryoshka2d.model.EmbeddingModel`.
        out: the output folder.
        layers: transformer layers to keep (default: all).
        dim: embedding size to keep (default: ``model.dim``).
        format: ``"torch"`` (safetensors weights) or ``"onnx"`` (the same plus ``onnx/model.onnx``).
        quantize: ``"int8"`` (needs ``format="onnx"``) also writes ``onnx/model_qint8_<preset>.onnx``,
            ONNX Runtime's dynamic quantisation with the preset for this CPU (:func:`int8_preset`).
        overwrite: replace a model previously written at ``out`` by matryoshka2d.
        inputs: other paths the caller read; never written over.

    Returns:
        The output folder.

    Raises:
        InvalidInputError: an unknown format or quantisation, or int8 without ONNX.
        InvalidLayersError, InvalidDimError: ``layers`` or ``dim`` out of range.
        OnnxExportError: onnx/onnxruntime are missing, or the model is not float32.
    """
    if format not in FORMATS:
        raise InvalidInputError(f"unknown export format {format!r}; choose one of {list(FORMATS)}")
    if quantize not in QUANTIZE:
        raise InvalidInputError(f"unknown quantisation {quantize!r}; choose 'int8' or none")
    if quantize and format != "onnx":
        raise InvalidInputError(f"--quantize {quantize} needs --format onnx (got --format {format})")
    if format == "onnx":
        require_onnx()  # before any work
    small = model.truncate(layers=layers, dim=dim)
    metadata: dict = {}
    write_onnx = None
    if format == "onnx":
        if model.precision != "float32":
            raise OnnxExportError(
                f"ONNX export needs a float32 model, got {model.precision}: load it with dtype='float32'"
            )
        preset = int8_preset() if quantize else None
        metadata["onnx"] = {"file": ONNX_FILE}
        if preset:
            metadata["onnx"].update(int8_file=f"onnx/{int8_file_name(preset)}", int8_preset=preset)

        def write_onnx(folder: Path) -> None:
            graph = export_onnx(small, folder / ONNX_FILE)
            if preset:
                feeds = calibration_feeds(small, graph_input_names(small))
                quantize_int8(graph, graph.parent / int8_file_name(preset), preset, calibration=feeds)

    return small.save(out, metadata=metadata, overwrite=overwrite, inputs=inputs, extra_files=write_onnx)
