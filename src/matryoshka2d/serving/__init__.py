"""An OpenAI-compatible embeddings server where each request picks its dims and its layers (``m2d serve``).

- :mod:`.app`: the FastAPI app (``/v1/embeddings`` with the ``layers`` extension, ``/v1/models``,
  ``/health``, ``/metrics``) and OpenAI-shaped errors.
- :mod:`.engine`: the batching engine (bounded queue, token-budget batches, one forward pass for mixed
  layer counts).
- :mod:`.metrics`: Prometheus metrics. :mod:`.runner`: uvicorn in the foreground or a background thread.

Needs the ``serve`` extra: ``pip install "matryoshka2d[serve]"``. Guide: docs/SERVING.md.
"""

from matryoshka2d.serving.app import EmbeddingServer, ServeConfig, create_app
from matryoshka2d.serving.engine import BatchingEngine, EngineStoppedError, InputTooLongError, QueueFullError
from matryoshka2d.serving.runner import BackgroundServer, make_server

__all__ = [
    "BackgroundServer",
    "BatchingEngine",
    "EmbeddingServer",
    "EngineStoppedError",
    "InputTooLongError",
    "QueueFullError",
    "ServeConfig",
    "create_app",
    "make_server",
]
