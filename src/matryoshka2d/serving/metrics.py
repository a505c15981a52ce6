"""Prometheus metrics of the embeddings server (``GET /metrics``), one registry per app.

Names (all prefixed ``m2d_``): ``requests_total{endpoint,status}``, ``request_latency_seconds{endpoint}``
(histogram), ``batch_size`` (texts per forward pass, histogram), ``batch_padded_tokens`` (histogram),
``forward_seconds`` (histogram), ``queue_texts`` / ``queue_requests`` (gauges: waiting for a worker),
``prompt_tokens_total``, ``embeddings_total{layers}`` and ``model_loaded`` (gauge, 0 or 1).
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from matryoshka2d.serving.engine import BatchStats

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TOKEN_BUCKETS = (64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536)

__all__ = ["ServerMetrics", "CONTENT_TYPE_LATEST"]


class ServerMetrics:
    """The server's counters, histograms and gauges in their own ``CollectorRegistry``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "m2d_requests", "HTTP requests by endpoint and status code", ["endpoint", "status"], registry=r
        )
        self.latency = Histogram(
            "m2d_request_latency_seconds",
            "Time from request to response",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "m2d_batch_size", "Texts per forward pass", buckets=BATCH_BUCKETS, registry=r
        )
        self.batch_tokens = Histogram(
            "m2d_batch_padded_tokens",
            "Padded tokens (rows x padded width) per forward pass",
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.forward_seconds = Histogram(
            "m2d_forward_seconds", "Seconds per forward pass", buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_texts = Gauge("m2d_queue_texts", "Texts waiting for a worker", registry=r)
        self.queue_requests = Gauge("m2d_queue_requests", "Requests with texts waiting", registry=r)
        self.prompt_tokens = Counter(
            "m2d_prompt_tokens", "Tokens embedded (after truncation, special tokens included)", registry=r
        )
        self.embeddings = Counter("m2d_embeddings", "Texts embedded by layer count", ["layers"], registry=r)
        self.model_loaded = Gauge("m2d_model_loaded", "1 once the model is loaded", registry=r)

    def watch_queue(self, texts: Callable[[], float], requests: Callable[[], float]) -> None:
        """Read the queue depth from the engine whenever metrics are scraped."""
        self.queue_texts.set_function(texts)
        self.queue_requests.set_function(requests)

    def observe_batch(self, stats: BatchStats) -> None:
        """Record one forward pass (the engine's ``on_batch`` hook; thread-safe)."""
        self.batch_size.observe(stats.rows)
        self.batch_tokens.observe(stats.padded_tokens)
        self.forward_seconds.observe(stats.seconds)

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        """Record one finished request."""
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()
        self.latency.labels(endpoint=endpoint).observe(seconds)

    def render(self) -> bytes:
        """The Prometheus text format."""
        return generate_latest(self.registry)
