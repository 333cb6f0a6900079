"""The ``optic`` command: serve, export, infer."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from optic.server import defaults
from optic.server.api.streams import StreamLimits
from optic.server.limits import ConnectionLimits
from optic.server.logs import EscapingFormatter, RateLimit
from optic.server.runtime import DEVICES, RuntimeOptions, default_instances, default_threads, providers_for
from optic.server.scheduler import BatchingConfig
from optic.server.security import (
    OPEN_GROUPS,
    SecurityConfig,
    SecurityError,
    load_tokens,
    server_credentials,
)
from optic.server.shm import DEFAULT_MAX_BYTES
from optic.server.tasks.fair import CallLimits
from optic.server.tasks.image import ImageLimits
from optic.server.workers import SHM_REGISTRY_ENV, default_workers

if TYPE_CHECKING:
    from optic.server.app import ServerConfig


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-repo", type=Path, default=Path("model_repo"), help="model repository directory")
    p.add_argument("--host", default="0.0.0.0", help="address the gRPC port binds to")
    p.add_argument("--grpc-port", type=int, default=defaults.GRPC_PORT, help="gRPC port (0: any free port)")
    p.add_argument("--metrics-port", type=int, default=defaults.METRICS_PORT, help="Prometheus /metrics (0: off)")
    p.add_argument("--metrics-host", default="0.0.0.0", help="address the metrics port binds to")
    p.add_argument("--device", choices=DEVICES, default="cpu", help="execution provider (auto: CUDA if present)")
    p.add_argument("--max-batch-size", type=int, default=32, help="largest dynamic batch (0: no batching)")
    p.add_argument("--max-queue-delay-ms", type=float, default=2.0, help="longest wait for a batch to fill")
    p.add_argument(
        "--batch-window",
        choices=("adaptive", "fixed"),
        default="adaptive",
        help="adaptive: gather only while the expected wait costs less than a batch's fixed cost (an idle model "
        "runs a request at once); fixed: every batch waits up to --max-queue-delay-ms, as Triton",
    )
    p.add_argument(
        "--max-queue-size",
        type=int,
        default=BatchingConfig.max_queue_size,
        help="queued requests per model before refusing",
    )
    p.add_argument(
        "--instances",
        type=int,
        default=0,
        help="batches run concurrently per model (0: 2 on 2+ CPU cores, 1 on a GPU, one core or with "
        "--intra-op-threads); with automatic threads a batch alone runs on all the cores, the others on "
        "cores / instances each",
    )
    p.add_argument("--intra-op-threads", type=int, default=0, help="onnxruntime threads per run (0: automatic)")
    p.add_argument(
        "--cuda-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="CUDAExecutionProvider option (repeatable), e.g. device_id=0 or gpu_mem_limit=8589934592",
    )
    p.add_argument(
        "--io-binding",
        choices=("auto", "on", "off"),
        default="auto",
        help="onnxruntime I/O binding (auto: on for models running on CUDA)",
    )
    p.add_argument("--inter-op-threads", type=int, default=0, help="onnxruntime inter-op threads (0: default)")
    p.add_argument(
        "--model-control-mode",
        choices=("none", "explicit", "poll"),
        default="none",
        help="as Triton: none loads all at start; explicit loads --load-model and takes Load/Unload RPCs; "
        "poll also reloads changed models from disk",
    )
    p.add_argument(
        "--load-model", action="append", default=[], metavar="NAME", help="explicit mode: load at start ('*': all)"
    )
    p.add_argument("--repository-poll-secs", type=float, default=5.0, help="poll mode: seconds between scans")
    p.add_argument(
        "--queue-timeout-ms",
        type=float,
        default=0.0,
        help="queued requests older than this get DEADLINE_EXCEEDED (0: only the client's deadline)",
    )
    p.add_argument(
        "--max-image-pixels", type=int, default=ImageLimits.max_pixels, help="largest image accepted (width x height)"
    )
    p.add_argument("--max-message-mb", type=float, default=64.0, help="largest gRPC message accepted")
    p.add_argument("--grace-seconds", type=float, default=30.0, help="drain time on SIGTERM")
    p.add_argument(
        "--workers",
        type=int,
        default=0,
        help="server processes sharing the port (SO_REUSEPORT), each with its own sessions; "
        "0: one below 4 cores, else one per 2 cores up to 8, and one on a GPU (docs/operations.md)",
    )
    p.add_argument("--worker-index", type=int, default=-1, help=argparse.SUPPRESS)  # set by the supervisor
    p.add_argument("--worker-count", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument(
        "--max-inflight",
        type=int,
        default=defaults.MAX_INFLIGHT,
        help="unary calls + stream items in flight before new ones get RESOURCE_EXHAUSTED (probes exempt)",
    )
    b = p.add_argument_group("bounds (docs/operations.md has the memory formula)")
    b.add_argument(
        "--max-inflight-mb",
        type=float,
        default=1024.0,
        help="request megabytes of the unary calls and stream items in flight; more get RESOURCE_EXHAUSTED",
    )
    b.add_argument(
        "--max-shm-mb",
        type=float,
        default=DEFAULT_MAX_BYTES / 2**20,
        help="with --allow-client-shm: megabytes of all registered shared-memory regions together",
    )
    b.add_argument("--max-streams", type=int, default=128, help="open streaming calls (Watch and reflection included)")
    b.add_argument("--stream-window", type=int, default=StreamLimits.window, help="items of one stream in flight")
    b.add_argument(
        "--stream-window-mb",
        type=float,
        default=StreamLimits.window_bytes / 2**20,
        help="request + unwritten answer bytes one stream may hold; then it is not read until answers are taken",
    )
    b.add_argument(
        "--stream-idle-seconds",
        type=float,
        default=StreamLimits.idle_seconds,
        help="a stream with nothing in flight and no request for this long ends (DEADLINE_EXCEEDED)",
    )
    b.add_argument(
        "--max-streams-per-connection",
        type=int,
        default=ConnectionLimits.max_streams_per_connection,
        help="HTTP/2 concurrent streams per connection (further calls wait in the client)",
    )
    b.add_argument(
        "--max-connection-idle-seconds",
        type=float,
        default=ConnectionLimits.max_idle_seconds,
        help="close a connection with no call for this long",
    )
    b.add_argument(
        "--max-connection-age-seconds",
        type=float,
        default=ConnectionLimits.max_age_seconds,
        help="close every connection after this long (clients reconnect; long Watch streams are recycled)",
    )
    b.add_argument(
        "--keepalive-seconds",
        type=float,
        default=ConnectionLimits.keepalive_seconds,
        help="ping a quiet connection this often; one whose peer does not answer is closed",
    )
    b.add_argument(
        "--max-call-pixels",
        type=int,
        default=CallLimits.max_call_pixels,
        help="pixels of all images of one call, checked from their headers before any decoding",
    )
    b.add_argument(
        "--max-output-pixels",
        type=int,
        default=CallLimits.max_output_pixels,
        help="mask pixels one Segment call may ask for, checked before any is computed",
    )
    b.add_argument("--max-rle-runs", type=int, default=CallLimits.max_rle_runs, help="RLE counts in one answer at most")
    b.add_argument(
        "--model-load-timeout-seconds",
        type=float,
        default=120.0,
        help="a model load (sessions + warm-up) that takes longer is abandoned and its runs stopped",
    )
    b.add_argument("--model-load-threads", type=int, default=2, help="models loaded at once")
    b.add_argument(
        "--metrics-max-connections", type=int, default=16, help="open /metrics connections; more are closed at once"
    )
    b.add_argument(
        "--metrics-timeout-seconds",
        type=float,
        default=5.0,
        help="a /metrics client must send its request and take the answer within this",
    )
    b.add_argument(
        "--metrics-token", action="store_true", help="require the --auth-token-file bearer token on /metrics too"
    )
    p.add_argument(
        "--allow-non-finite", action="store_true", help="KServe: accept NaN/Inf in float inputs (otherwise refused)"
    )
    p.add_argument(
        "--allow-client-shm",
        action="store_true",
        help="KServe: let clients register POSIX shared-memory regions and pass tensors through them (Triton's "
        "system shared memory; clients on this host only, and they can read and write any shared-memory object "
        "this server's user can open)",
    )
    sec = p.add_argument_group("security")
    sec.add_argument("--tls-cert", type=Path, metavar="PEM", help="server certificate chain: serve gRPC over TLS")
    sec.add_argument("--tls-key", type=Path, metavar="PEM", help="server private key (with --tls-cert)")
    sec.add_argument(
        "--tls-client-ca", type=Path, metavar="PEM", help="mutual TLS: require client certificates signed by this CA"
    )
    sec.add_argument(
        "--auth-token-file",
        type=Path,
        metavar="FILE",
        help="require 'authorization: Bearer <token>' with a token from this file (one per line)",
    )
    sec.add_argument(
        "--auth-open",
        default="health",
        metavar="LIST",
        help="services reachable without a token: comma list of health, reflection, or 'none'",
    )
    sec.add_argument(
        "--health-port", type=int, default=0, help="also serve gRPC health alone, plaintext, on this port (0: off)"
    )
    p.add_argument("--log-level", default="INFO", help=f"one of {', '.join(LOG_LEVELS)}")


# Each numeric serve flag's valid range (inclusive); a value outside it stops `optic serve` with one line.
RANGES: dict[str, tuple[float, float]] = {
    "grpc_port": (0, 65535),
    "metrics_port": (0, 65535),
    "health_port": (0, 65535),
    "max_batch_size": (0, 4096),
    "max_queue_delay_ms": (0, 10_000),
    "max_queue_size": (1, 1_000_000),
    "instances": (0, 64),
    "intra_op_threads": (0, 1024),
    "inter_op_threads": (0, 1024),
    "repository_poll_secs": (0.05, 86_400),
    "queue_timeout_ms": (0, 86_400_000),
    "max_image_pixels": (64, 1_000_000_000),
    "max_message_mb": (0.01, 2047),
    "grace_seconds": (0, 3600),
    "workers": (0, 256),
    "max_inflight": (1, 1_000_000),
    "max_streams": (1, 1_000_000),
    "max_inflight_mb": (1, 10**7),
    "max_shm_mb": (0.001, 10**7),
    "stream_window": (1, 4096),
    "stream_window_mb": (0.01, 2047),
    "stream_idle_seconds": (0.1, 86_400),
    "max_streams_per_connection": (1, 100_000),
    "max_connection_idle_seconds": (1, 10**7),
    "max_connection_age_seconds": (1, 10**7),
    "keepalive_seconds": (1, 10**7),
    "max_call_pixels": (64, 10**10),
    "max_output_pixels": (64, 10**10),
    "max_rle_runs": (1, 10**9),
    "model_load_timeout_seconds": (0.1, 86_400),
    "model_load_threads": (1, 64),
    "metrics_max_connections": (1, 10_000),
    "metrics_timeout_seconds": (0.1, 3600),
}
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def check_serve_args(args: argparse.Namespace) -> str | None:
    """The first flag out of its range, as one line naming the range; None when all are fine."""
    for name, (low, high) in RANGES.items():
        value = getattr(args, name)
        if not low <= value <= high:  # also false for NaN
            return f"--{name.replace('_', '-')} {value:g} is out of range: choose {low:g} to {high:g}"
    if args.log_level.upper() not in LOG_LEVELS:
        return f"--log-level {args.log_level!r} is not a level: choose one of {', '.join(LOG_LEVELS)}"
    return None


def serve(args: argparse.Namespace) -> int:
    from optic.server.app import ServerConfig, StartupError, run

    problem = check_serve_args(args)
    if problem:
        print(f"optic serve: {problem}", file=sys.stderr)
        return 2
    security = _security(args)
    if isinstance(security, str):
        print(f"optic serve: {security}", file=sys.stderr)
        return 2
    bad = [o for o in args.cuda_option if "=" not in o or not o.split("=", 1)[0]]
    if bad:
        print(f"optic serve: --cuda-option {bad[0]!r} must be KEY=VALUE", file=sys.stderr)
        return 2
    cuda_options = tuple(tuple(o.split("=", 1)) for o in args.cuda_option)
    io_binding = {"auto": None, "on": True, "off": False}[args.io_binding]
    # A worker of N shares the cores with the others: its onnxruntime and decode threads take its share.
    share = max(1, default_threads() // args.worker_count) if args.worker_count > 1 else 0
    max_bytes = int(args.max_message_mb * 1024 * 1024)
    registry = os.environ.get(SHM_REGISTRY_ENV) if args.worker_index >= 0 else None  # one for all workers
    config = ServerConfig(
        model_repo=args.model_repo,
        host=args.host,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        runtime=RuntimeOptions(
            device=args.device,
            intra_op_threads=args.intra_op_threads,
            cores=share,
            inter_op_threads=args.inter_op_threads,
            cuda_options=cuda_options,
            io_binding=io_binding,
        ),
        batching=BatchingConfig(
            max_batch_size=args.max_batch_size,
            max_queue_delay=args.max_queue_delay_ms / 1000.0,
            adaptive=args.batch_window == "adaptive",
            max_queue_size=args.max_queue_size,
            instances=args.instances,
        ),
        image_limits=ImageLimits(max_bytes=max_bytes, max_pixels=args.max_image_pixels),
        max_message_bytes=max_bytes,
        grace_seconds=args.grace_seconds,
        control_mode=args.model_control_mode,
        startup_models=tuple(args.load_model) if args.model_control_mode == "explicit" else ("*",),
        poll_seconds=args.repository_poll_secs,
        queue_timeout=args.queue_timeout_ms / 1000.0 or None,
        security=security,
        max_inflight=args.max_inflight,
        health_port=args.health_port,
        allow_non_finite=args.allow_non_finite,
        allow_client_shm=args.allow_client_shm,
        max_shm_bytes=int(args.max_shm_mb * 2**20),
        shm_registry=Path(registry) if registry else None,
        max_streams=args.max_streams,
        max_inflight_bytes=int(args.max_inflight_mb * 2**20),
        streams=StreamLimits(args.stream_window, int(args.stream_window_mb * 2**20), args.stream_idle_seconds),
        connections=ConnectionLimits(
            max_streams_per_connection=args.max_streams_per_connection,
            keepalive_seconds=args.keepalive_seconds,
            max_idle_seconds=args.max_connection_idle_seconds,
            max_age_seconds=args.max_connection_age_seconds,
        ),
        call_limits=CallLimits(args.max_call_pixels, args.max_output_pixels, args.max_rle_runs),
        load_timeout=args.model_load_timeout_seconds,
        load_threads=args.model_load_threads,
        metrics_max_connections=args.metrics_max_connections,
        metrics_timeout=args.metrics_timeout_seconds,
        metrics_token=args.metrics_token,
        reuse_port=args.worker_index >= 0,
        preprocess_threads=share,
    )
    if args.metrics_token and args.auth_token_file is None:
        print("optic serve: --metrics-token needs --auth-token-file", file=sys.stderr)
        return 2
    try:
        providers = providers_for(args.device)  # --device cuda without CUDA: say so now, not once per model
    except RuntimeError as exc:
        print(f"optic serve: {exc}", file=sys.stderr)
        return 2
    if not args.model_repo.is_dir():
        print(f"optic serve: model repository {args.model_repo} is not a directory", file=sys.stderr)
        return 2
    on_gpu = any((p[0] if isinstance(p, tuple) else p) == "CUDAExecutionProvider" for p in providers)
    workers = args.workers or default_workers(default_threads(), gpu=on_gpu)
    if not args.instances:
        # Explicit --intra-op-threads means one session of that width: two runs on it would oversubscribe.
        instances = 1 if args.intra_op_threads else default_instances(share or default_threads(), gpu=on_gpu)
        config.batching = replace(config.batching, instances=instances)
    if workers > 1 and args.worker_index < 0:
        return _supervise(args, config, workers)
    try:
        run(config)
    except StartupError as exc:  # a port in use, an address that cannot be bound
        print(f"optic serve: {exc}", file=sys.stderr)
        return 2
    # Drained. A thread that is still stuck (a session being created cannot be interrupted) must not keep the
    # process alive past the grace period: the interpreter would wait for it at exit.
    exit_anyway = threading.Timer(5.0, os._exit, args=(0,))
    exit_anyway.daemon = True
    exit_anyway.start()
    return 0


def _supervise(args: argparse.Namespace, config: ServerConfig, workers: int) -> int:
    from optic.server.workers import port_is_free, supervise

    ports = [(config.host, config.grpc_port, "--grpc-port"), (config.host, config.health_port, "--health-port")]
    for host, port, flag in ports:
        if flag == "--grpc-port" and port == 0:
            print(
                "optic serve: --workers needs a fixed --grpc-port (0 would give each worker its own)", file=sys.stderr
            )
            return 2
        if port and not port_is_free(host, port):
            print(f"optic serve: cannot listen on {host}:{port} ({flag}): the address is in use", file=sys.stderr)
            return 2
    tokens = load_tokens(config.security.token_file) if config.metrics_token and config.security.token_file else ()
    options = {"max_connections": config.metrics_max_connections, "timeout": config.metrics_timeout, "tokens": tokens}
    return supervise(args.argv, workers, config.grace_seconds, (config.metrics_host, config.metrics_port, options))


def _security(args: argparse.Namespace) -> SecurityConfig | str:
    """The security flags, checked (files read, tokens parsed) before anything starts; a string is the error."""
    groups = tuple(g.strip() for g in args.auth_open.split(",") if g.strip() and g.strip() != "none")
    unknown = [g for g in groups if g not in OPEN_GROUPS]
    if unknown:
        return f"--auth-open {unknown[0]!r}: choose from {', '.join(OPEN_GROUPS)} or none"
    config = SecurityConfig(args.tls_cert, args.tls_key, args.tls_client_ca, args.auth_token_file, groups)
    try:
        server_credentials(config)
        if config.token_file is not None:
            load_tokens(config.token_file)
    except (SecurityError, UnicodeDecodeError) as exc:
        return str(exc)
    return config


def infer(args: argparse.Namespace) -> int:
    from optic.client import infer as infer_cli

    return infer_cli.run(args)


def bench(args: argparse.Namespace) -> int:
    from optic.client import bench as bench_module

    return bench_module.main(args)


def export(args: argparse.Namespace) -> int:
    from optic.export import cli

    return cli.run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="optic", description="Serve computer-vision models over gRPC.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="serve a model repository", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _serve_args(p)
    p.set_defaults(func=serve)

    p = sub.add_parser("export", help="train/export models into a repository (needs the export extra)")
    from optic.export.cli import add_arguments  # argparse only; torch is imported when the command runs

    add_arguments(p)
    p.set_defaults(func=export)

    p = sub.add_parser("infer", help="send images to a running server")
    from optic.client.infer import add_arguments as infer_arguments

    infer_arguments(p, f"localhost:{defaults.GRPC_PORT}")
    p.set_defaults(func=infer)

    p = sub.add_parser("bench", help="load-test a running server (Optic or any KServe v2 server)")
    from optic.client.bench import add_arguments as bench_arguments

    bench_arguments(p, f"localhost:{defaults.GRPC_PORT}")
    p.set_defaults(func=bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv
    handler = logging.StreamHandler()
    worker = f"[worker {args.worker_index}] " if getattr(args, "worker_index", -1) >= 0 else ""
    handler.setFormatter(EscapingFormatter(f"%(asctime)s %(levelname)s {worker}%(name)s: %(message)s"))
    handler.addFilter(RateLimit())  # no client can make warnings grow past 20 a minute per call site
    level = getattr(args, "log_level", "INFO").upper()
    logging.basicConfig(level=level if level in LOG_LEVELS else "INFO", handlers=[handler])
    try:
        return args.func(args)
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
