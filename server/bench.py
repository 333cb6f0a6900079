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
import asyncio
import io
import json
import math
import multiprocessing as mp
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import grpc
import numpy as np

from server.client import Credentials, open_channel
from server.proto.optic.v1 import vision_pb2 as vpb
from server.tensors import DATATYPES

TASK_OF_MODEL = {"classifier": "classify", "detector": "detect", "segmenter": "segment", "captioner": "caption"}
VISION_METHODS = {
    "classify": ("Classify", vpb.ClassifyRequest),
    "detect": ("Detect", vpb.DetectRequest),
    "segment": ("Segment", vpb.SegmentRequest),
    "caption": ("Caption", vpb.CaptionRequest),
}
KSERVE = "/inference.GRPCInferenceService/"


def _kpb():  # noqa: ANN202
    """The generated KServe module, imported late: it cannot share a process with tritonclient's."""
    from server.proto.inference import grpc_service_pb2

    return grpc_service_pb2


@dataclass
class BenchConfig:
    url: str = "localhost:8001"
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


# ---------------------------------------------------------------- payloads


def _jpeg(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def vision_payloads(config: BenchConfig, count: int = 32) -> tuple[str, list[bytes]]:
    """Real encoded images: synthetic scenes scaled to ``image_size``, as a camera would send them."""
    from PIL import Image

    from export.data import make_scenes  # numpy + Pillow only

    task = config.task or TASK_OF_MODEL.get(config.model, "classify")
    if task not in VISION_METHODS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(VISION_METHODS)}")
    method, request_type = VISION_METHODS[task]
    h, w = config.image_size
    images = [
        _jpeg(np.asarray(Image.fromarray(s.image).resize((w, h), Image.BILINEAR)))
        for s in make_scenes(count, seed=31, size=96, max_distractors=2)
    ]
    return f"/optic.v1.Vision/{method}", [
        request_type(model=config.model, image=vpb.Image(data=d)).SerializeToString() for d in images
    ]


def kserve_payloads(config: BenchConfig, count: int = 16) -> tuple[str, list[bytes]]:
    """Random tensors shaped from the model's own metadata (open dims: 1; batch axis: --batch)."""
    kpb = _kpb()
    with open_channel(config.url, config.credentials) as channel:
        call = channel.unary_unary(KSERVE + "ModelMetadata")
        raw = call(kpb.ModelMetadataRequest(name=config.model).SerializeToString(), timeout=config.timeout)
    meta = kpb.ModelMetadataResponse.FromString(raw)
    rng = np.random.default_rng(0)
    payloads = []
    for _ in range(count):
        request = kpb.ModelInferRequest(model_name=config.model)
        for tensor in meta.inputs:
            dtype = DATATYPES.get(tensor.datatype)
            if dtype is None or tensor.datatype == "BYTES":
                raise ValueError(f"input {tensor.name!r} is {tensor.datatype}; bench sends numeric tensors only")
            shape = [config.batch if i == 0 and d == -1 else (d if d > 0 else 1) for i, d in enumerate(tensor.shape)]
            value = (rng.random(shape) * 4).astype(dtype)
            request.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=shape)
            request.raw_input_contents.append(value.tobytes())
        payloads.append(request.SerializeToString())
    return KSERVE + "ModelInfer", payloads


# ---------------------------------------------------------------- workers


def _worker(
    config: BenchConfig, method: str, payloads: list[bytes], index: int, start_at: float, sent: mp.Value, out: mp.Queue
) -> None:  # type: ignore[type-arg]
    """One load process: returns (send offsets, latencies, codes) of the requests it measured."""

    async def main() -> tuple[list[float], list[float], list[str]]:
        starts: list[float] = []
        latencies: list[float] = []
        codes: list[str] = []
        options = [("grpc.max_send_message_length", 256 << 20), ("grpc.max_receive_message_length", 256 << 20)]
        creds = config.credentials
        if creds.secure:
            channel_cm = grpc.aio.secure_channel(config.url, creds.channel_credentials(), options=options)
        else:
            channel_cm = grpc.aio.insecure_channel(config.url, options=options)
        metadata = creds.metadata() or None
        async with channel_cm as channel:
            call = channel.unary_unary(method)
            measure_from = start_at + config.warmup
            stop_at = measure_from + (config.duration if not config.requests else 1e9)
            quota = math.ceil(config.requests / config.workers) if config.requests else 0
            outstanding = 0

            def done() -> bool:
                return time.monotonic() >= stop_at or (quota > 0 and len(latencies) >= quota)

            async def one(n: int) -> None:
                nonlocal outstanding
                begun = time.monotonic()
                code = "OK"
                try:
                    await call(payloads[n % len(payloads)], timeout=config.timeout, metadata=metadata)
                except grpc.aio.AioRpcError as exc:
                    code = exc.code().name
                finally:
                    outstanding -= 1
                if begun >= measure_from and not (quota and len(latencies) >= quota):
                    starts.append(begun - measure_from)
                    latencies.append(time.monotonic() - begun)
                    codes.append(code)
                    with sent.get_lock():
                        sent.value += 1

            await asyncio.sleep(max(0.0, start_at - time.monotonic()))
            if config.concurrency:
                callers = max(1, config.concurrency // config.workers + (index < config.concurrency % config.workers))

                async def caller(i: int) -> None:
                    nonlocal outstanding
                    n = i + index * 7919
                    while not done():
                        outstanding += 1
                        await one(n)
                        n += callers

                await asyncio.gather(*(caller(i) for i in range(callers)))
            else:
                rng = np.random.default_rng(index + 1)
                rate = config.rate / config.workers
                tasks: set[asyncio.Task[None]] = set()
                next_at, n = time.monotonic(), index * 7919
                while not done():
                    next_at += rng.exponential(1.0 / rate)
                    await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                    if outstanding >= config.max_outstanding:
                        if next_at >= measure_from:
                            starts.append(next_at - measure_from)
                            latencies.append(0.0)
                            codes.append("CLIENT_OVERLOAD")
                        continue
                    outstanding += 1
                    task = asyncio.ensure_future(one(n))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                    n += 1
                if tasks:
                    await asyncio.wait(tasks, timeout=config.timeout)
        return starts, latencies, codes

    out.put((index, *asyncio.run(main())))


# ---------------------------------------------------------------- server statistics


def server_statistics(
    url: str, model: str, timeout: float = 10.0, credentials: Credentials | None = None
) -> dict[str, dict] | None:
    """Cumulative KServe ModelStatistics per model version, or None when the server has none for ``model``."""
    kpb = _kpb()
    try:
        with open_channel(url, credentials) as channel:
            call = channel.unary_unary(KSERVE + "ModelStatistics")
            raw = call(kpb.ModelStatisticsRequest(name=model).SerializeToString(), timeout=timeout)
    except grpc.RpcError:
        return None
    out = {}
    for s in kpb.ModelStatisticsResponse.FromString(raw).model_stats:
        i = s.inference_stats
        out[f"{s.name}:{s.version}"] = {
            "inference_count": s.inference_count,
            "execution_count": s.execution_count,
            "success": (i.success.count, i.success.ns),
            "queue": (i.queue.count, i.queue.ns),
            "compute_infer": (i.compute_infer.count, i.compute_infer.ns),
            "compute_input": (i.compute_input.count, i.compute_input.ns),
            "compute_output": (i.compute_output.count, i.compute_output.ns),
        }
    return out


def _stats_delta(before: dict | None, after: dict | None) -> dict:
    if not before or not after:
        return {}
    out = {}
    for key, a in after.items():
        b = before.get(key)
        if b is None:
            continue
        executions = a["execution_count"] - b["execution_count"]
        inferences = a["inference_count"] - b["inference_count"]
        if executions <= 0:
            continue

        def mean_ms(name: str, a: dict = a, b: dict = b) -> float:
            count = a[name][0] - b[name][0]
            return (a[name][1] - b[name][1]) / max(1, count) / 1e6

        out[key] = {
            "inferences": inferences,
            "executions": executions,
            "mean_batch_size": inferences / executions,
            "queue_ms_per_request": mean_ms("queue"),
            "compute_infer_ms_per_batch": mean_ms("compute_infer"),
            "compute_input_ms_per_batch": mean_ms("compute_input"),
            "compute_output_ms_per_batch": mean_ms("compute_output"),
        }
    return out


# ---------------------------------------------------------------- running


def stats_models(config: BenchConfig) -> list[str]:
    if config.api == "vision" and (config.task or TASK_OF_MODEL.get(config.model)) == "caption":
        return [f"{config.model}_encoder", f"{config.model}_decoder"]
    return [config.model]


def run(config: BenchConfig, payloads: tuple[str, list[bytes]] | None = None) -> BenchResult:
    if (config.concurrency > 0) == (config.rate > 0):
        raise ValueError("give exactly one of --concurrency (closed loop) or --rate (open loop)")
    if config.workers < 1 or (config.duration <= 0 and not config.requests):
        raise ValueError("--workers must be >= 1 and --duration > 0 (or --requests > 0)")
    method, data = payloads or (vision_payloads(config) if config.api == "vision" else kserve_payloads(config))
    models = stats_models(config)
    before = {m: server_statistics(config.url, m, credentials=config.credentials) for m in models}
    # Spawned, not forked: this process has used gRPC (and maybe onnxruntime) threads, which a fork
    # can leave deadlocked in the child. Workers start together once all have imported.
    ctx = mp.get_context("spawn")
    sent = ctx.Value("l", 0)
    out: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
    start_at = time.monotonic() + 3.0
    procs = [
        ctx.Process(target=_worker, args=(config, method, data, i, start_at, sent, out), daemon=True)
        for i in range(config.workers)
    ]
    for p in procs:
        p.start()
    parts = []
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
    after = {m: server_statistics(config.url, m, credentials=config.credentials) for m in models}
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
        server |= _stats_delta(before[m], after[m])
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
        config=asdict(config),
        requests=len(codes),
        seconds=seconds,
        throughput_rps=float(ok.sum() / seconds) if seconds else 0.0,
        latency_ms=latency,
        errors=errors,
        server=server,
    )


def sweep(config: BenchConfig, values: list[float]) -> list[BenchResult]:
    """The same benchmark at each concurrency (closed loop) or rate (open loop) in ``values``."""
    data = vision_payloads(config) if config.api == "vision" else kserve_payloads(config)
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
    p.add_argument("--task", choices=tuple(VISION_METHODS), help="vision API task (default: from the model name)")
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
    p.add_argument("--no-progress", action="store_true")
    from server.infer_cli import add_credentials_arguments

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
    from server.infer_cli import credentials_of

    try:
        credentials = credentials_of(args)
    except OSError as exc:
        print(f"optic bench: error: {exc.filename}: {exc.strerror or exc}", file=sys.stderr)
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
        image_size=tuple(args.image_size),  # type: ignore[arg-type]
        timeout=args.timeout,
        progress=not args.no_progress,
        credentials=credentials,  # type: ignore[arg-type]
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
    if args.plot and args.sweep:
        plot(results, args.plot, f"{config.api} {config.model}")
        print(f"wrote {args.plot}", file=sys.stderr)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        body = [asdict(r) for r in results] if args.sweep else asdict(results[0])
        args.json.write_text(json.dumps(body, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0
