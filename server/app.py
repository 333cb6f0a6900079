"""Assembly: the gRPC server with both APIs, health, reflection and metrics, and its lifecycle.

Health answers NOT_SERVING while models load and again once draining starts,
so Kubernetes probes and load balancers see the truth; SIGTERM/SIGINT drain
in-flight requests and then return normally.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from google.protobuf import descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from optic.proto.inference import grpc_service_pb2, grpc_service_pb2_grpc
from optic.proto.optic.v1 import vision_pb2
from optic.proto.pool import POOL
from optic.server import defaults
from optic.server.admission import Admission
from optic.server.api.kserve import KServeServicer
from optic.server.api.vision import VisionServicer
from optic.server.metrics import serve_metrics
from optic.server.probes import LIVENESS_SERVICE, READINESS_SERVICE
from optic.server.repository import ModelRepository
from optic.server.runtime import RuntimeOptions, default_threads
from optic.server.scheduler import BatchingConfig
from optic.server.security import SecurityConfig, TokenAuth, load_tokens, server_credentials
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
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    image_limits: ImageLimits = field(default_factory=ImageLimits)
    max_message_bytes: int = 64 * 1024 * 1024
    preprocess_threads: int = 0  # 0: one per usable core
    grace_seconds: float = 30.0
    control_mode: str = "none"  # none | explicit | poll, as Triton's --model-control-mode
    startup_models: tuple[str, ...] = ("*",)  # explicit mode: loaded at start ("*": all)
    poll_seconds: float = 5.0
    queue_timeout: float | None = None  # default queue policy timeout (s) where config.pbtxt sets none
    security: SecurityConfig = field(default_factory=SecurityConfig)
    max_inflight: int = defaults.MAX_INFLIGHT  # calls in flight before new ones get RESOURCE_EXHAUSTED (health exempt)
    allow_non_finite: bool = False  # KServe: accept NaN/Inf in float input tensors
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
            ("grpc.so_reuseport", 0),
        ]
        self.credentials = server_credentials(config.security)
        interceptors: list[grpc.aio.ServerInterceptor] = []
        if config.security.token_file is not None:
            tokens = load_tokens(config.security.token_file)
            interceptors.append(TokenAuth(tokens, config.security.open_services))
        interceptors.append(Admission(config.max_inflight))
        self.grpc = grpc.aio.server(options=options, interceptors=interceptors)
        self.health_grpc: grpc.aio.Server | None = None
        if config.health_port:
            self.health_grpc = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_grpc)
        grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            KServeServicer(self.repo, lambda: self.draining, config.allow_non_finite), self.grpc
        )
        self.grpc.add_generic_rpc_handlers((VisionServicer(self.repo, self._pool, config.image_limits).handler(),))
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
            try:
                serve_metrics(self.config.metrics_port, self.config.metrics_host)
            except OSError as exc:
                where = f"{self.config.metrics_host}:{self.config.metrics_port}"
                raise StartupError(f"cannot listen on {where} (metrics): {exc.strerror or exc}") from None
        await self.grpc.start()
        if self.health_grpc is not None:
            await self.health_grpc.start()
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
        await self.repo.start()
        if self.repo.versions or self.config.control_mode == "explicit":
            await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        served = [f"{n}:{v}" for n, vs in sorted(self.repo.versions.items()) for v in vs]
        log.info("serving %s (model control mode %s)", ", ".join(served) or "no models", self.config.control_mode)

    async def stop(self, grace: float | None = None) -> None:
        """Readiness off, refuse new calls, let in-flight ones finish (up to ``grace`` s), release models."""
        if self.draining:
            await self._stopped.wait()
            return
        self.draining = True
        # Readiness off; liveness stays SERVING, so a pod that drains cleanly is never restarted for it.
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.grpc.stop(self.config.grace_seconds if grace is None else grace)
        if self.health_grpc is not None:
            await self.health_grpc.stop(0)
        await self.repo.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._stopped.set()
        log.info("stopped")

    async def serve_forever(self) -> None:
        await self.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(self.stop()))
        await self._stopped.wait()


def run(config: ServerConfig) -> None:
    async def main() -> None:
        # Built inside the loop: grpc.aio and the health servicer bind to the running loop.
        await OpticServer(config).serve_forever()

    asyncio.run(main())
