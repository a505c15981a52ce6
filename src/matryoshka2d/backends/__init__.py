"""Inference backends behind one interface (:class:`~matryoshka2d.encoder.Encoder`).

- ``"torch"``: :class:`~matryoshka2d.model.EmbeddingModel` in float32, bfloat16 or float16 (``dtype``;
  ``"auto"`` = bfloat16 where the hardware has it natively).
- ``"onnx"``: :class:`~matryoshka2d.backends.onnx.OnnxEncoder`, ONNX Runtime float32 on CPU.
- ``"onnx-int8"``: the same with ONNX Runtime's dynamic int8 quantisation (preset for this CPU).

Every backend has ``encode(texts, layers=, dim=)``, ``iter_encode``, ``encode_layers``, ``num_layers``
and ``dim``; ``layers=k`` runs only the first k layers on every backend. Grid evaluation, the search
index and the server accept any of them.
"""

from __future__ import annotations

import os

from matryoshka2d.encoder import Encoder
from matryoshka2d.errors import InvalidInputError

BACKENDS = ("torch", "onnx", "onnx-int8")

__all__ = ["BACKENDS", "backend_threads", "check_compile", "load_encoder", "worker_runtime_threads"]


def load_encoder(
    name_or_path: str | os.PathLike,
    backend: str = "torch",
    dtype: str = "float32",
    device: str | None = None,
    threads: int | None = None,
    compile: bool = False,
) -> Encoder:
    """Load a model folder (or hub id) for inference with the chosen backend.

    Args:
        name_or_path: a model folder or a Hugging Face hub id.
        backend: ``"torch"``, ``"onnx"`` or ``"onnx-int8"``.
        dtype: for ``"torch"``: ``"float32"``, ``"bfloat16"``, ``"float16"`` or ``"auto"``
            (:func:`~matryoshka2d.model.resolve_dtype`). The ONNX backends compute in float32 (int8
            weights for ``"onnx-int8"``): they accept ``"auto"`` and ``"float32"`` only.
        device: for ``"torch"``: where to run (default CPU). The ONNX backends run on CPU.
        threads: for the ONNX backends: ONNX Runtime intra-op threads (default: its own choice).
        compile: for ``"torch"``: run inference through ``torch.compile`` with frozen weights
            (:meth:`~matryoshka2d.model.EmbeddingModel.compile_for_inference`).

    Raises:
        InvalidInputError: an unknown backend, or a dtype/device the backend does not offer.
        ModelLoadError: the model cannot be loaded.
    """
    if backend not in BACKENDS:
        raise InvalidInputError(f"unknown backend {backend!r}; choose one of {list(BACKENDS)}")
    if backend == "torch":
        from matryoshka2d.model import EmbeddingModel

        model = EmbeddingModel.load(name_or_path, device=device, dtype=dtype)
        return model.compile_for_inference() if compile else model
    check_compile(backend, compile)
    if dtype not in ("auto", "float32"):
        raise InvalidInputError(
            f"dtype {dtype!r} is for the torch backend; backend {backend!r} computes in "
            f"{'int8/float32' if backend == 'onnx-int8' else 'float32'} (use dtype 'auto' or 'float32')"
        )
    if device not in (None, "cpu"):
        raise InvalidInputError(f"backend {backend!r} runs on the CPU; got device {device!r}")
    from matryoshka2d.backends.onnx import OnnxEncoder

    return OnnxEncoder(name_or_path, quantize="int8" if backend == "onnx-int8" else None, threads=threads)


def backend_threads(runtime: str, workers: int, threads: int) -> int:
    """The thread count to load the backend with, for ``workers`` workers of ``threads`` threads.

    torch: ``threads`` (each worker thread gets its own OpenMP team of that size). ONNX Runtime: a session
    has one intra-op pool that concurrent runs share, each run adding its calling thread, so ``workers x
    threads`` in all is a pool of ``workers x (threads - 1) + 1``.
    """
    return threads if runtime == "torch" else workers * (threads - 1) + 1


def worker_runtime_threads(runtime: str, workers: int) -> int | None:
    """The thread count to load the backend with for ``workers`` batches at once (``encode(workers=)``):
    None for one worker (the runtime's own choice) and for torch (``encode(workers=)`` gives each worker
    thread torch's threads divided among them); for ONNX Runtime, the one session pool the workers share
    (:func:`backend_threads` of torch's threads divided among them)."""
    if workers == 1 or runtime == "torch":
        return None
    import torch

    return backend_threads(runtime, workers, max(1, torch.get_num_threads() // workers))


def check_compile(backend: str, compile: bool) -> None:
    """Refuse ``compile`` for a backend other than torch (before anything is loaded)."""
    if compile and backend != "torch":
        raise InvalidInputError(
            f"compile is for the torch backend; backend {backend!r} runs ONNX Runtime's own optimised graphs"
        )
