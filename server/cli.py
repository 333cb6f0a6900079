"""The ``optic`` command: serve, export, infer."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from server.runtime import DEVICES, RuntimeOptions, providers_for
from server.scheduler import BatchingConfig
from server.security import (
    OPEN_GROUPS,
    EscapingFormatter,
    SecurityConfig,
    SecurityError,
    load_tokens,
    server_credentials,
)
from server.tasks.image import ImageLimits

DEFAULT_GRPC_PORT = 8001
DEFAULT_METRICS_PORT = 8002


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-repo", type=Path, default=Path("model_repo"), help="model repository directory")
    p.add_argument("--host", default="0.0.0.0", help="address the gRPC port binds to")
    p.add_argument("--grpc-port", type=int, default=DEFAULT_GRPC_PORT)
    p.add_argument("--metrics-port", type=int, default=DEFAULT_METRICS_PORT, help="Prometheus /metrics (0: off)")
    p.add_argument("--metrics-host", default="0.0.0.0", help="address the metrics port binds to")
    p.add_argument("--device", choices=DEVICES, default="cpu", help="execution provider (auto: CUDA if present)")
    p.add_argument("--max-batch-size", type=int, default=32, help="largest dynamic batch (0: no batching)")
    p.add_argument("--max-queue-delay-ms", type=float, default=2.0, help="longest wait for a batch to fill")
    p.add_argument("--max-queue-size", type=int, default=1024, help="queued requests per model before refusing")
    p.add_argument("--instances", type=int, default=1, help="batches run concurrently per model")
    p.add_argument("--intra-op-threads", type=int, default=0, help="onnxruntime threads per run (0: cores / instances)")
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
    p.add_argument("--max-image-pixels", type=int, default=ImageLimits.max_pixels)
    p.add_argument("--max-message-mb", type=float, default=64.0, help="largest gRPC message accepted")
    p.add_argument("--grace-seconds", type=float, default=30.0, help="drain time on SIGTERM")
    p.add_argument(
        "--max-inflight",
        type=int,
        default=1024,
        help="calls in flight before new ones get RESOURCE_EXHAUSTED (health and reflection exempt)",
    )
    p.add_argument(
        "--allow-non-finite", action="store_true", help="KServe: accept NaN/Inf in float inputs (default: refused)"
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
        help="services reachable without a token: comma list of health, reflection, or 'none' (default: health)",
    )
    sec.add_argument(
        "--health-port", type=int, default=0, help="also serve gRPC health alone, plaintext, on this port (0: off)"
    )
    p.add_argument("--log-level", default="INFO")


def serve(args: argparse.Namespace) -> int:
    from server.app import ServerConfig, run

    for flag in (
        "max_batch_size",
        "max_queue_size",
        "instances",
        "intra_op_threads",
        "inter_op_threads",
        "max_image_pixels",
        "max_inflight",
        "health_port",
    ):
        at_least_one = ("instances", "max_queue_size", "max_image_pixels", "max_inflight")
        if getattr(args, flag) < (1 if flag in at_least_one else 0):
            print(f"optic serve: --{flag.replace('_', '-')} is out of range", file=sys.stderr)
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
    max_bytes = int(args.max_message_mb * 1024 * 1024)
    config = ServerConfig(
        model_repo=args.model_repo,
        host=args.host,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        runtime=RuntimeOptions(
            device=args.device,
            intra_op_threads=args.intra_op_threads,
            inter_op_threads=args.inter_op_threads,
            cuda_options=cuda_options,  # type: ignore[arg-type]
            io_binding=io_binding,
        ),
        batching=BatchingConfig(
            max_batch_size=args.max_batch_size,
            max_queue_delay=args.max_queue_delay_ms / 1000.0,
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
    )
    if args.repository_poll_secs <= 0 or args.queue_timeout_ms < 0:
        print("optic serve: --repository-poll-secs must be > 0 and --queue-timeout-ms >= 0", file=sys.stderr)
        return 2
    try:
        providers_for(args.device)  # --device cuda without CUDA: say so now, not once per model
    except RuntimeError as exc:
        print(f"optic serve: {exc}", file=sys.stderr)
        return 2
    if not args.model_repo.is_dir():
        print(f"optic serve: model repository {args.model_repo} is not a directory", file=sys.stderr)
        return 2
    run(config)
    return 0


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
    from server import infer_cli

    return infer_cli.run(args)


def bench(args: argparse.Namespace) -> int:
    from server import bench as bench_module

    return bench_module.main(args)


def export(args: argparse.Namespace) -> int:
    from export import cli

    return cli.run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="optic", description="Serve computer-vision models over gRPC.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="serve a model repository")
    _serve_args(p)
    p.set_defaults(func=serve)

    p = sub.add_parser("export", help="train/export models into a repository (needs the export extra)")
    from export.cli import add_arguments  # argparse only; torch is imported when the command runs

    add_arguments(p)
    p.set_defaults(func=export)

    p = sub.add_parser("infer", help="send images to a running server")
    from server.infer_cli import add_arguments as infer_arguments

    infer_arguments(p, f"localhost:{DEFAULT_GRPC_PORT}")
    p.set_defaults(func=infer)

    p = sub.add_parser("bench", help="load-test a running server (Optic or any KServe v2 server)")
    from server.bench import add_arguments as bench_arguments

    bench_arguments(p, f"localhost:{DEFAULT_GRPC_PORT}")
    p.set_defaults(func=bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(EscapingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(args, "log_level", "INFO"), handlers=[handler])
    try:
        return args.func(args)
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
