"""``optic bench``: a load generator for Optic or any KServe v2 gRPC server (Triton included).

Requests are serialised once, up front, and sent as raw bytes, so the client
spends its CPU on gRPC, not on protobuf. Load comes from ``--workers``
separate processes (never the server's event loop), each running asyncio:

- closed loop (``--concurrency N``): N callers, each sends its next request
  when the last one is answered;
- open loop (``--rate R``): Poisson arrivals at R requests/s in total, whether
  or not earlier ones were answered (the way real traffic arrives), with at
  most ``--max-outstanding`` in flight per worker (beyond it arrivals are
  counted as ``CLIENT_OVERLOAD``, not queued in the client).

Only requests *sent* after ``--warmup`` seconds count. Server-side queue and
compute times and the mean batch size come from the KServe ModelStatistics
RPC (before/after difference), when the server offers it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from optic.client import load
from optic.client.vision import Credentials
from optic.server import defaults
from optic.server.tasks import TASKS

DEFAULT_MAX_ERROR_RATE = 0.01  # a run with more failures than this exits 1: its figures describe a failing server


@dataclass
class BenchConfig:
    url: str = f"localhost:{defaults.GRPC_PORT}"
    api: str = "vision"  # vision | kserve
    model: str = "classifier"
    task: str = ""  # vision: classify | detect | segment | caption (default: from the model name)
    concurrency: int = 0  # closed loop when > 0
    rate: float = 0.0  # open loop (requests/s) when > 0
    duration: float = 10.0
    requests: int = 0  # stop after this many measured requests instead (0: use duration)
    warmup: float = 2.0
    workers: int = 1
    batch: int = 1  # kserve: samples per request
    image_size: tuple[int, int] = (480, 640)  # vision: (height, width) of the JPEGs sent
    timeout: float = 30.0
    max_outstanding: int = 2000
    progress: bool = True
    credentials: Credentials = field(default_factory=Credentials)  # TLS / mTLS / bearer token


@dataclass
class BenchResult:
    config: dict
    requests: int = 0
    seconds: float = 0.0
    throughput_rps: float = 0.0
    latency_ms: dict = field(default_factory=dict)
    errors: dict = field(default_factory=dict)
    server: dict = field(default_factory=dict)


# ---------------------------------------------------------------- running


def stats_models(config: BenchConfig, method: str) -> list[str]:
    if method.endswith("/Caption") and not config.model.endswith("_encoder"):
        return [f"{config.model}_encoder", f"{config.model}_decoder"]
    return [config.model]


def run(config: BenchConfig, payloads: tuple[str, list[bytes]] | None = None) -> BenchResult:
    if (config.concurrency > 0) == (config.rate > 0):
        raise ValueError("give exactly one of --concurrency (closed loop) or --rate (open loop)")
    if config.workers < 1 or (config.duration <= 0 and not config.requests):
        raise ValueError("--workers must be >= 1 and --duration > 0 (or --requests > 0)")
    method, data = payloads or load.payloads(config)
    models = stats_models(config, method)
    before = {m: load.server_statistics(config.url, m, credentials=config.credentials) for m in models}
    # Spawned, not forked: this process has used gRPC (and maybe onnxruntime) threads, which a fork
    # can leave deadlocked in the child. Workers start together once all have imported.
    ctx = mp.get_context("spawn")
    sent = ctx.Value("l", 0)
    out: Any = ctx.Queue()
    start_at = time.monotonic() + 3.0
    procs = [
        ctx.Process(target=load.worker, args=(config, method, data, i, start_at, sent, out), daemon=True)
        for i in range(config.workers)
    ]
    for p in procs:
        p.start()
    parts: list[tuple[int, list[float], list[float], list[str]]] = []
    limit = config.warmup + (config.duration if not config.requests else 3600) + config.timeout + 60
    deadline = time.monotonic() + limit
    while len(parts) < len(procs):
        try:
            parts.append(out.get(timeout=1.0))
        except Exception:  # queue.Empty: report progress while waiting
            if time.monotonic() > deadline:
                raise TimeoutError("load workers did not finish") from None
        if config.progress:
            elapsed = time.monotonic() - start_at
            phase = "warm-up" if elapsed < config.warmup else f"{elapsed - config.warmup:5.1f}s"
            print(f"\r  {phase}  {sent.value:8d} requests measured", end="", file=sys.stderr, flush=True)
    if config.progress:
        print(file=sys.stderr)
    for p in procs:
        p.join(timeout=10)
    after = {m: load.server_statistics(config.url, m, credentials=config.credentials) for m in models}
    starts = np.concatenate([np.asarray(p[1], dtype=np.float64) for p in parts]) if parts else np.zeros(0)
    lat = np.concatenate([np.asarray(p[2], dtype=np.float64) for p in parts]) if parts else np.zeros(0)
    codes = [c for p in parts for c in p[3]]
    ok = np.array([c == "OK" for c in codes], dtype=bool)
    seconds = config.duration if not config.requests else float(starts.max() + lat.max()) if len(lat) else 0.0
    ok_lat = lat[ok] * 1e3 if len(lat) else np.zeros(0)
    errors: dict[str, int] = {}
    for c in codes:
        if c != "OK":
            errors[c] = errors.get(c, 0) + 1
    server: dict = {}
    for m in models:
        server |= load.stats_delta(before[m], after[m])
    latency = (
        {
            "p50": float(np.percentile(ok_lat, 50)),
            "p90": float(np.percentile(ok_lat, 90)),
            "p99": float(np.percentile(ok_lat, 99)),
            "max": float(ok_lat.max()),
            "mean": float(ok_lat.mean()),
        }
        if len(ok_lat)
        else {}
    )
    return BenchResult(
        config=public_config(config),
        requests=len(codes),
        seconds=seconds,
        throughput_rps=float(ok.sum() / seconds) if seconds else 0.0,
        latency_ms=latency,
        errors=errors,
        server=server,
    )


def public_config(config: BenchConfig) -> dict:
    """The config as written into results: credentials only as what was used, never a token or a key path."""
    out = asdict(config)
    creds = config.credentials
    out["credentials"] = {"tls": creds.secure, "client_certificate": creds.cert is not None, "token": bool(creds.token)}
    return out


def error_rate(result: BenchResult) -> float:
    return sum(result.errors.values()) / result.requests if result.requests else 0.0


def sweep(config: BenchConfig, values: list[float]) -> list[BenchResult]:
    """The same benchmark at each concurrency (closed loop) or rate (open loop) in ``values``."""
    data = load.payloads(config)
    results = []
    for v in values:
        step = replace(config, concurrency=int(v)) if config.concurrency else replace(config, rate=float(v))
        if config.progress:
            print(f"{'concurrency' if config.concurrency else 'rate'} {v:g}", file=sys.stderr)
        results.append(run(step, data))
    return results


def plot(results: list[BenchResult], path: Path, title: str) -> None:
    """Latency (p50, p99) against throughput, one point per sweep step, like perf_analyzer's curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    x = [r.throughput_rps for r in results]
    for q, style in (("p50", "o-"), ("p99", "s--")):
        ax.plot(x, [r.latency_ms.get(q, float("nan")) for r in results], style, label=q)
    for r in results:
        c = r.config
        label = f"c={c['concurrency']}" if c["concurrency"] else f"{c['rate']:g}/s"
        ax.annotate(
            label, (r.throughput_rps, r.latency_ms.get("p99", 0)), fontsize=7, xytext=(3, 3), textcoords="offset points"
        )
    ax.set_xlabel("throughput (requests/s)")
    ax.set_ylabel("latency (ms)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser, default_url: str) -> None:
    p.add_argument("--url", default=default_url, help="server host:port (Optic, Triton, any KServe v2 gRPC server)")
    p.add_argument("--api", choices=("vision", "kserve"), default="vision")
    p.add_argument("--model", default="classifier")
    p.add_argument("--task", choices=tuple(TASKS), help="vision API task (default: the model's, asked from the server)")
    load = p.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=int, help="closed loop: concurrent callers (default 16)")
    load.add_argument("--rate", type=float, help="open loop: Poisson arrivals, requests/s")
    p.add_argument("--duration", type=float, default=10.0, help="seconds measured, after the warm-up")
    p.add_argument("--requests", type=int, default=0, help="stop after this many measured requests instead")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of load not measured")
    p.add_argument("--workers", type=int, default=1, help="load-generating processes")
    p.add_argument("--batch", type=int, default=1, help="kserve: samples per request")
    p.add_argument("--image-size", type=int, nargs=2, default=(480, 640), metavar=("H", "W"))
    p.add_argument("--timeout", type=float, default=30.0, help="per request, seconds")
    p.add_argument("--sweep", help="comma-separated concurrencies (with --concurrency) or rates (with --rate)")
    p.add_argument("--plot", type=Path, help="with --sweep: latency-vs-throughput PNG")
    p.add_argument("--json", type=Path, metavar="FILE", help="write every figure as JSON")
    p.add_argument(
        "--max-error-rate",
        type=float,
        default=DEFAULT_MAX_ERROR_RATE,
        help="exit 1 when more than this share of measured requests failed (any non-OK answer)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    from optic.client.infer import add_credentials_arguments

    add_credentials_arguments(p)


def _summary(r: BenchResult) -> str:
    c = r.config
    load = f"concurrency {c['concurrency']}" if c["concurrency"] else f"rate {c['rate']:g}/s"
    lat = r.latency_ms
    lines = [
        f"{c['api']} {c['model']} ({load}, {c['workers']} worker(s)): {r.requests} requests in {r.seconds:.1f} s, "
        f"{r.throughput_rps:.1f} answered/s",
        "  latency ms: " + (", ".join(f"{k} {lat[k]:.2f}" for k in ("p50", "p90", "p99", "max")) if lat else "none"),
        "  errors: " + (", ".join(f"{k} {v}" for k, v in sorted(r.errors.items())) or "none"),
    ]
    for key, s in r.server.items():
        lines.append(
            f"  server {key}: mean batch {s['mean_batch_size']:.2f}, queue {s['queue_ms_per_request']:.2f} ms/request, "
            f"compute {s['compute_infer_ms_per_batch']:.2f} ms/batch"
        )
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    from optic.client.infer import credentials_of

    try:
        credentials = credentials_of(args)
    except OSError as exc:
        print(f"optic bench: error: {exc.filename}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    if args.plot:
        try:
            import matplotlib  # noqa: F401 - checked before a run that could take minutes
        except ImportError:
            print("optic bench: error: --plot needs matplotlib (pip install -e '.[bench]')", file=sys.stderr)
            return 2
        if not args.sweep:
            print("optic bench: error: --plot draws a --sweep; give --sweep too", file=sys.stderr)
            return 2
    if not 0 <= args.max_error_rate <= 1:
        print("optic bench: error: --max-error-rate must be within [0, 1]", file=sys.stderr)
        return 2
    config = BenchConfig(
        url=args.url,
        api=args.api,
        model=args.model,
        task=args.task or "",
        concurrency=args.concurrency or (0 if args.rate else 16),
        rate=args.rate or 0.0,
        duration=args.duration,
        requests=args.requests,
        warmup=args.warmup,
        workers=args.workers,
        batch=args.batch,
        image_size=(args.image_size[0], args.image_size[1]),
        timeout=args.timeout,
        progress=not args.no_progress,
        credentials=credentials,
    )
    try:
        if args.sweep:
            values = [float(v) for v in args.sweep.split(",") if v.strip()]
            results = sweep(config, values)
        else:
            results = [run(config)]
    except (ValueError, grpc.RpcError) as exc:
        detail = f"{exc.code().name}: {exc.details()}" if isinstance(exc, grpc.RpcError) else str(exc)
        print(f"optic bench: error: {detail}", file=sys.stderr)
        return 2
    for r in results:
        print(_summary(r))
    if args.json:  # before the plot: figures are kept even if drawing fails
        args.json.parent.mkdir(parents=True, exist_ok=True)
        body = [asdict(r) for r in results] if args.sweep else asdict(results[0])
        args.json.write_text(json.dumps(body, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        plot(results, args.plot, f"{config.api} {config.model}")
        print(f"wrote {args.plot}", file=sys.stderr)
    worst = max(error_rate(r) for r in results)
    if worst > args.max_error_rate:
        print(
            f"optic bench: error rate {worst:.2%} is above --max-error-rate {args.max_error_rate:.2%}", file=sys.stderr
        )
        return 1
    return 0
