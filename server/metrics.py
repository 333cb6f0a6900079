"""Prometheus metrics, served as text on the metrics port.

Model labels only ever take names of models the repository actually loaded
(requests for unknown names count under ``model=""``), so clients cannot grow
the series count.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import Counter, Gauge, Histogram

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
    ["model", "version"],
    buckets=_LATENCY_BUCKETS,
)
COMPUTE_TIME = Histogram(
    "optic_compute_duration_seconds",
    "onnxruntime time per executed batch.",
    ["model", "version"],
    buckets=_LATENCY_BUCKETS,
)
BATCH_SIZE = Histogram(
    "optic_batch_size",
    "Samples per executed batch.",
    ["model", "version"],
    buckets=_BATCH_BUCKETS,
)
STAGE_TIME = Histogram(
    "optic_stage_duration_seconds",
    "Vision API time per image and stage: decode, preprocess, inference (queue + compute), postprocess.",
    ["model", "stage"],
    # Fine, geometric (x1.5 from 50 us to ~9 s): stage medians are read from these buckets.
    buckets=tuple(round(0.00005 * 1.5**k, 7) for k in range(31)),
)
INFERENCES = Counter(
    "optic_inferences",
    "Inference requests that reached a model version, by outcome (success/fail).",
    ["model", "version", "outcome"],
)
LANE_RUNS = Counter(
    "optic_lane_runs",
    "Batches run, counted as they answer, on a model's wide session (started alone, all its threads) or its "
    "narrow lane (started beside another batch); see --instances.",
    ["model", "version", "lane"],
)
# Gauges say how ``--workers N`` processes combine (prometheus-client multiprocess mode; ignored with one process):
# counts add up over the live workers; a model is ready only when every live worker serves it.
QUEUE_SIZE = Gauge(
    "optic_queue_size", "Requests waiting in the batching queue.", ["model", "version"], multiprocess_mode="livesum"
)
INFLIGHT = Gauge("optic_inflight_requests", "Requests being handled now.", ["model"], multiprocess_mode="livesum")
MODEL_READY = Gauge(
    "optic_model_ready",
    "1 when the model version is loaded and serving.",
    ["model", "version"],
    multiprocess_mode="livemin",
)
ADMISSION_INFLIGHT = Gauge(
    "optic_admission_inflight",
    "What admission control counts now: inflight = unary calls + stream items, streams = open streaming calls.",
    ["kind"],
    multiprocess_mode="livesum",
)
ADMISSION_LIMIT = Gauge(
    "optic_admission_limit",
    "Admission limits (--max-inflight, --max-streams), for alerting on the ratio.",
    ["kind"],
    multiprocess_mode="livesum",
)
MODEL_LOAD_FAILURES = Counter("optic_model_load_failures", "Failed attempts to load a model version.", ["model"])


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.ns += int(seconds * 1e9)


@dataclass
class BatchStats:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


class ModelStats:
    """One model version's statistics, Triton's ModelStatistics shape, mirrored to Prometheus.

    Updated on the event loop only, so plain integers suffice.
    """

    def __init__(self, model: str, version: str) -> None:
        self.model, self.version = model, version
        self.success, self.fail, self.queue = Duration(), Duration(), Duration()
        self.compute = BatchStats()
        self.batches: dict[int, BatchStats] = {}
        self.inference_count = 0
        self.execution_count = 0
        self.last_inference_ms = 0
        self._queue = QUEUE_TIME.labels(model, version)
        self._compute = COMPUTE_TIME.labels(model, version)
        self._batch = BATCH_SIZE.labels(model, version)
        self._lanes = {lane: LANE_RUNS.labels(model, version, lane) for lane in ("wide", "narrow")}
        self._ok = INFERENCES.labels(model, version, "success")
        self._failed = INFERENCES.labels(model, version, "fail")

    def observe_queue(self, seconds: float) -> None:
        self.queue.add(seconds)
        self._queue.observe(seconds)

    def observe_batch(self, size: int, compute_input: float, compute_infer: float, compute_output: float) -> None:
        self.execution_count += 1
        per_size = self.batches.setdefault(size, BatchStats())
        for stats in (self.compute, per_size):
            stats.compute_input.add(compute_input)
            stats.compute_infer.add(compute_infer)
            stats.compute_output.add(compute_output)
        self._batch.observe(size)
        self._compute.observe(compute_infer)

    def observe_lane(self, lane: str) -> None:
        """Called from the thread that runs the batch (a Prometheus counter is thread-safe)."""
        self._lanes[lane].inc()

    def observe_request(self, ok: bool, samples: int, seconds: float) -> None:
        if ok:
            self.success.add(seconds)
            self.inference_count += samples
            self.last_inference_ms = int(time.time() * 1000)
            self._ok.inc()
        else:
            self.fail.add(seconds)
            self._failed.inc()

    def track_queue(self, size: Callable[[], int]) -> None:
        if MULTIPROCESS:  # the value lives in a shared file, read by the supervisor: refresh() writes it
            _POLLED[(self.model, self.version)] = size
        else:
            QUEUE_SIZE.labels(self.model, self.version).set_function(size)

    def retire(self) -> None:
        """The version is unloaded: its gauges go, its counters stay (Prometheus counters never go back)."""
        if MULTIPROCESS:  # series cannot be removed from the workers' shared files: they read 0
            _POLLED.pop((self.model, self.version), None)
            QUEUE_SIZE.labels(self.model, self.version).set(0)
            MODEL_READY.labels(self.model, self.version).set(0)
            return
        for gauge in (QUEUE_SIZE, MODEL_READY):
            with contextlib.suppress(KeyError):
                gauge.remove(self.model, self.version)


# --workers N: prometheus-client's multiprocess mode (set by the supervisor) keeps values in files it sums up;
# gauges computed on read (set_function) are not supported there, so queue sizes are written once a second.
MULTIPROCESS = "PROMETHEUS_MULTIPROC_DIR" in os.environ
_POLLED: dict[tuple[str, str], Callable[[], int]] = {}


def refresh() -> None:
    for (model, version), size in list(_POLLED.items()):
        QUEUE_SIZE.labels(model, version).set(size())
