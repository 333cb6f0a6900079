"""Assembly: the gRPC server with both APIs, health, reflection and metrics, and its lifecycle.

Health answers NOT_SERVING while models load and again once draining starts,
so Kubernetes probes and load balancers see the truth; SIGTERM/SIGINT drain
in-flight requests and then return normally.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import shutil
import signal
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc
from google.protobuf import descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from optic.proto.inference import grpc_service_pb2, grpc_service_pb2_grpc
from optic.proto.optic.v1 import vision_pb2
from optic.proto.pool import POOL
from optic.server import defaults, metrics
from optic.server.admission import Admission
from optic.server.api.kserve import KServeServicer
from optic.server.api.streams import StreamLimits
from optic.server.api.vision import VisionServicer
from optic.server.limits import ConnectionLimits, max_concurrent_rpcs, worst_case_memory
from optic.server.metrics_http import MetricsServer
from optic.server.probes import LIVENESS_SERVICE, READINESS_SERVICE
from optic.server.repository import ModelRepository
from optic.server.runtime import RuntimeOptions, default_threads
from optic.server.scheduler import BatchingConfig
from optic.server.security import SecurityConfig, TokenAuth, load_tokens, server_credentials
from optic.server.shm import DEFAULT_MAX_BYTES, KEPT_READ_BYTES, SharedMemoryRegistry
from optic.server.tasks.fair import CallLimits, FairExecutor
from optic.server.tasks.image import ImageLimits

log = logging.getLogger(__name__)

KSERVE_SERVICE = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
VISION_SERVICE = vision_pb2.DESCRIPTOR.services_by_name["Vision"].full_name


@dataclass
class ServerConfig:
    model_repo: Path = Path("model_repo")
    host: str = "0.0.0.0"
    grpc_port: int = defaults.GRPC_PORT
    metrics_port: int = defaults.METRICS_PORT  # 0: no metrics endpoint
    metrics_host: str = "0.0.0.0"
    metrics_max_connections: int = 16  # open /metrics connections; more are closed on arrival
    metrics_timeout: float = 5.0  # seconds a /metrics client gets to send its request and take the answer
    metrics_token: bool = False  # require the --auth-token-file token on /metrics too
    load_timeout: float = 120.0  # seconds for a model load (sessions + warm-up) before it is abandoned
    load_threads: int = 2  # model loads at once
    reuse_port: bool = False  # one of --workers N processes: share the ports with the others (SO_REUSEPORT)
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    image_limits: ImageLimits = field(default_factory=ImageLimits)
    call_limits: CallLimits = field(default_factory=CallLimits)  # pixels, mask pixels, RLE runs per call
    max_message_bytes: int = 64 * 1024 * 1024
    preprocess_threads: int = 0  # 0: one per usable core
    grace_seconds: float = 30.0
    control_mode: str = "none"  # none | explicit | poll, as Triton's --model-control-mode
    startup_models: tuple[str, ...] = ("*",)  # explicit mode: loaded at start ("*": all)
    poll_seconds: float = 5.0
    queue_timeout: float | None = None  # default queue policy timeout (s) where config.pbtxt sets none
    security: SecurityConfig = field(default_factory=SecurityConfig)
    max_inflight: int = defaults.MAX_INFLIGHT  # calls + stream items in flight before RESOURCE_EXHAUSTED
    max_streams: int = 128  # open streaming calls (ModelStreamInfer, DetectStream, health Watch, reflection)
    max_inflight_bytes: int = 1 << 30  # request bytes of the unary calls in flight
    streams: StreamLimits = field(default_factory=StreamLimits)
    connections: ConnectionLimits = field(default_factory=ConnectionLimits)
    allow_non_finite: bool = False  # KServe: accept NaN/Inf in float input tensors
    allow_client_shm: bool = False  # KServe: tensors in system shared memory (Triton's --allow-client-shm)
    max_shm_bytes: int = DEFAULT_MAX_BYTES  # registered shared-memory regions, all together
    shm_registry: Path | None = None  # where the regions are registered (shared by --workers); None: a private dir
    health_port: int = 0  # plaintext, health-only port for probes when the main port needs TLS or a token


def _pool() -> descriptor_pool.DescriptorPool:
    """Our protos' pool (see ``optic.proto.pool``) with health and reflection added, for the reflection service."""
    for file in (health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR):
        POOL.AddSerializedFile(file.serialized_pb)  # idempotent for an identical file
    return POOL


class StartupError(Exception):
    """The server cannot start (a port in use, an address it cannot bind): one line for the operator."""


class OpticServer:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.repo = ModelRepository(
            config.model_repo,
            config.runtime,
            config.batching,
            control_mode=config.control_mode,
            startup_models=config.startup_models,
            poll_seconds=config.poll_seconds,
            queue_timeout=config.queue_timeout,
            load_timeout=config.load_timeout,
            load_threads=config.load_threads,
            on_change=settle_heap,
        )
        self.health = health.aio.HealthServicer()
        self.draining = False
        self.port = 0
        self._stopped = asyncio.Event()
        self._pool = ThreadPoolExecutor(
            max_workers=config.preprocess_threads or default_threads(), thread_name_prefix="preprocess"
        )
        options = [
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.so_reuseport", int(config.reuse_port)),
            *config.connections.grpc_options(),
        ]
        self.credentials = server_credentials(config.security)
        interceptors: list[grpc.aio.ServerInterceptor] = []
        if config.security.token_file is not None:
            tokens = load_tokens(config.security.token_file)
            interceptors.append(TokenAuth(tokens, config.security.open_services))
        self.admission = Admission(config.max_inflight, config.max_streams, config.max_inflight_bytes)
        interceptors.append(self.admission)
        self.grpc = grpc.aio.server(
            options=options,
            interceptors=interceptors,
            # Beyond admission's budgets gRPC itself refuses, before reading the request: bounds the calls in receipt.
            maximum_concurrent_rpcs=max_concurrent_rpcs(config.max_inflight, config.max_streams),
        )
        self.health_grpc: grpc.aio.Server | None = None
        self.metrics: MetricsServer | None = None
        self._trimmer: asyncio.Task[None] | None = None
        self._refresher: asyncio.Task[None] | None = None
        if config.health_port:
            self.health_grpc = grpc.aio.server(options=[("grpc.so_reuseport", int(config.reuse_port))])
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_grpc)
        self._shm_dir: Path | None = None  # a private registry this server removes when it stops
        shm: SharedMemoryRegistry | None = None
        if config.allow_client_shm:
            directory = config.shm_registry
            if directory is None:
                directory = self._shm_dir = Path(tempfile.mkdtemp(prefix="optic-shm-"))
            shm = SharedMemoryRegistry(directory, max_bytes=config.max_shm_bytes)
        kserve = KServeServicer(
            self.repo,
            lambda: self.draining,
            self.admission,
            config.streams,
            config.allow_non_finite,
            shm,
            config.max_message_bytes,
        )
        grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(kserve, self.grpc)
        fair = FairExecutor(self._pool, config.preprocess_threads or default_threads())
        call_limits = replace(config.call_limits, max_answer_bytes=config.max_message_bytes)
        vision = VisionServicer(self.repo, fair, config.image_limits, call_limits, self.admission, config.streams)
        self.grpc.add_generic_rpc_handlers((vision.handler(),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection(
            (KSERVE_SERVICE, VISION_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc, pool=_pool()
        )

    @staticmethod
    def _bind(server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None) -> int:
        try:
            if credentials is None:
                port = server.add_insecure_port(address)
            else:
                port = server.add_secure_port(address, credentials)
        except RuntimeError:  # grpcio raises this when the port is taken
            port = 0
        if port == 0:
            raise StartupError(f"cannot listen on {address}: the address is in use or cannot be bound")
        return port

    def memory_budget(self) -> dict[str, int]:
        """:func:`optic.server.limits.worst_case_memory` for this server's flags."""
        c = self.config
        return worst_case_memory(
            max_inflight=c.max_inflight,
            max_inflight_bytes=c.max_inflight_bytes,
            max_message_bytes=c.max_message_bytes,
            max_streams=c.max_streams,
            stream_window_bytes=c.streams.window_bytes,
            workers=c.preprocess_threads or default_threads(),
            max_image_pixels=c.image_limits.max_pixels,
            max_rle_runs=c.call_limits.max_rle_runs,
            shm_bytes=c.max_shm_bytes + KEPT_READ_BYTES if c.allow_client_shm else 0,
        )

    async def _set_health(self, status: int) -> None:
        for service in (READINESS_SERVICE, KSERVE_SERVICE, VISION_SERVICE):
            await self.health.set(service, status)

    async def start(self) -> None:
        """Listen first (health says NOT_SERVING), then load models, then say SERVING."""
        address = f"{self.config.host}:{self.config.grpc_port}"
        self.port = self._bind(self.grpc, address, self.credentials)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        if self.health_grpc is not None:
            self._bind(self.health_grpc, f"{self.config.host}:{self.config.health_port}", None)
        if self.config.metrics_port:
            token_file = self.config.security.token_file
            tokens = load_tokens(token_file) if self.config.metrics_token and token_file is not None else ()
            self.metrics = MetricsServer(
                self.config.metrics_host,
                self.config.metrics_port,
                self.config.metrics_max_connections,
                self.config.metrics_timeout,
                tokens,
            )
            try:
                await self.metrics.start()
            except OSError as exc:
                where = f"{self.config.metrics_host}:{self.config.metrics_port}"
                raise StartupError(f"cannot listen on {where} (metrics): {exc.strerror or exc}") from None
        await self.grpc.start()
        if self.health_grpc is not None:
            await self.health_grpc.start()
        budget = self.memory_budget()
        log.info(
            "worst-case memory the limits allow above idle: %.0f MB (calls %.0f, receiving %.0f, streams %.0f, "
            "images %.0f, rle %.0f, shm %.0f); docs/operations.md says which flags lower it",
            *(budget[k] / 2**20 for k in ("total", "calls", "receiving", "streams", "images", "rle", "shm")),
        )
        sec = self.config.security
        log.info(
            "gRPC on %s:%d (%s%s), metrics on :%d; loading %s",
            self.config.host,
            self.port,
            ("mutual TLS" if sec.tls_client_ca else "TLS") if self.credentials else "plaintext",
            ", bearer token" if sec.token_file else "",
            self.config.metrics_port,
            self.config.model_repo,
        )
        self._trimmer = asyncio.get_running_loop().create_task(_trim_forever(), name="malloc-trim")
        if metrics.MULTIPROCESS:
            self._refresher = asyncio.get_running_loop().create_task(_refresh_forever(), name="metrics-refresh")
        await self.repo.start()
        if self.repo.versions or self.config.control_mode == "explicit":
            await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        served = [f"{n}:{v}" for n, vs in sorted(self.repo.versions.items()) for v in vs]
        log.info("serving %s (model control mode %s)", ", ".join(served) or "no models", self.config.control_mode)

    def remove_private_files(self) -> None:
        """The shared-memory registry this server made for itself (a ``--workers`` supervisor removes theirs)."""
        if self._shm_dir is not None:
            shutil.rmtree(self._shm_dir, ignore_errors=True)

    async def stop(self, grace: float | None = None) -> None:
        """Readiness off, refuse new calls, let in-flight ones finish (up to ``grace`` s), release models."""
        if self.draining:
            await self._stopped.wait()
            return
        self.draining = True
        try:
            await self._drain(grace)
        finally:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self.remove_private_files()
            self._stopped.set()
            log.info("stopped")

    async def _drain(self, grace: float | None) -> None:
        grace = self.config.grace_seconds if grace is None else grace
        deadline = time.monotonic() + grace
        # Readiness off; liveness stays SERVING, so a pod that drains cleanly is never restarted for it.
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.grpc.stop(grace)
        if self.health_grpc is not None:
            await self.health_grpc.stop(0)
        try:
            await asyncio.wait_for(self.repo.close(), max(0.5, deadline - time.monotonic()))
        except TimeoutError:
            # Past the grace period: stop every run still going (a model stuck in a loop included).
            log.warning("models still running after the %.0f s grace period: stopping their runs", grace)
            self.repo.terminate()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.repo.close(), 5.0)
        if self.metrics is not None:
            await self.metrics.close()
        for task in (self._trimmer, self._refresher):
            if task is not None:
                task.cancel()

    async def serve_forever(self) -> None:
        loop = asyncio.get_running_loop()
        starting = asyncio.ensure_future(self.start())
        stopping: list[asyncio.Future[None]] = []

        def on_signal() -> None:
            if not starting.done():  # still loading models: stop loading (their runs are stopped too), then drain
                starting.cancel()
            stopping.append(asyncio.ensure_future(self.stop()))

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        with contextlib.suppress(asyncio.CancelledError):
            await starting
        await self._stopped.wait()


def _glibc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return None


MMAP_THRESHOLD = 8 << 20


def _return_freed_memory() -> None:
    """glibc's allocator raises its mmap threshold after large blocks are freed, and then keeps later large
    buffers (request messages, images, tensors) in its heap after they are freed: a burst of big requests leaves
    the process big. A fixed threshold keeps every buffer above it in its own mapping, returned on free; smaller
    ones go back within 5 s (:func:`_trim_forever`).

    Not lower: a buffer in its own mapping faults its pages in one by one every time. At 1 MiB, a lone 1.77 MB
    detector tensor (copied twice on its way in) took 4.3 ms over the in-process run; at 8 MiB 1.9 ms (ad hoc,
    docs/benchmarks.md). 8 MiB holds one 640x640 FP32 image (4.9 MB), Ultralytics' default input."""
    libc = _glibc()
    if libc is not None:
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, MMAP_THRESHOLD)
        libc.mallopt(m_trim_threshold, 8 << 20)


def settle_heap() -> None:
    """Collect, then take what is alive out of Python's cyclic collector (``gc.freeze``).

    What start-up and a model's load make lives as long as the server or the model, yet every full collection
    walked all of it with the event loop stopped: 21-34 ms here under load, 1.3-2.7 ms once frozen
    (docs/operations.md). Frozen objects are still freed by reference counting, but a cycle among them would never
    be collected, so the last freeze is undone and collected first. Called through
    ``ModelRepository(on_change=...)`` after start-up, after every load (failed ones too) and once every unloaded
    or replaced version is released: one full collection each, on the event loop.
    """
    started = time.perf_counter()
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    took = (time.perf_counter() - started) * 1e3
    log.debug("heap settled: %d objects frozen after a %.1f ms collection", gc.get_freeze_count(), took)


async def _refresh_forever(seconds: float = 1.0) -> None:
    while True:
        metrics.refresh()
        await asyncio.sleep(seconds)


async def _trim_forever(seconds: float = 5.0) -> None:
    """Hand the pages of freed small blocks (gRPC reads big messages in many small slices) back to the system
    every few seconds; without it, refused and finished big requests leave the heaps large."""
    libc = _glibc()
    if libc is None:
        return
    while True:
        await asyncio.sleep(seconds)
        await asyncio.to_thread(libc.malloc_trim, 0)


def run(config: ServerConfig) -> None:
    _return_freed_memory()

    async def main() -> None:
        # Built inside the loop: grpc.aio and the health servicer bind to the running loop.
        server = OpticServer(config)
        try:
            await server.serve_forever()
        finally:  # also when start() fails (a port in use), which never reaches stop()
            server.remove_private_files()

    asyncio.run(main())
