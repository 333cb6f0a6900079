"""Prometheus metrics, served as text on the metrics port.

Model labels only ever take names of models the repository actually loaded
(requests for unknown names count under ``model=""``), so clients cannot grow
the series count.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

REQUESTS = Counter(
    "optic_requests",
    "Requests answered, by model, RPC method and gRPC status code.",
    ["model", "method", "code"],
)
REQUEST_LATENCY = Histogram(
    "optic_request_duration_seconds",
    "Time from receiving a request to answering it.",
    ["model", "method"],
    buckets=_LATENCY_BUCKETS,
)
QUEUE_TIME = Histogram(
    "optic_queue_duration_seconds",
    "Time a request waited in its model's batching queue.",
    ["model"],
    buckets=_LATENCY_BUCKETS,
)
COMPUTE_TIME = Histogram(
    "optic_compute_duration_seconds",
    "onnxruntime time per executed batch.",
    ["model"],
    buckets=_LATENCY_BUCKETS,
)
BATCH_SIZE = Histogram(
    "optic_batch_size",
    "Samples per executed batch.",
    ["model"],
    buckets=_BATCH_BUCKETS,
)
INFLIGHT = Gauge("optic_inflight_requests", "Requests being handled now.", ["model"])
MODEL_READY = Gauge("optic_model_ready", "1 when the model version is loaded and serving.", ["model", "version"])


class ModelMetrics:
    """The batcher's observer for one model."""

    def __init__(self, model: str) -> None:
        self._queue = QUEUE_TIME.labels(model)
        self._compute = COMPUTE_TIME.labels(model)
        self._batch = BATCH_SIZE.labels(model)

    def observe_queue(self, seconds: float) -> None:
        self._queue.observe(seconds)

    def observe_batch(self, size: int, seconds: float) -> None:
        self._batch.observe(size)
        self._compute.observe(seconds)


def serve_metrics(port: int, host: str = "0.0.0.0") -> None:
    """Start the /metrics HTTP endpoint on a daemon thread."""
    start_http_server(port, addr=host)
