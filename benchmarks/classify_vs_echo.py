"""Served Classify throughput vs the ceiling a bare grpc.aio server puts on this machine.

Both servers run in their own process; the load comes from a third process
(N concurrent callers in a closed loop, grpc.aio), which sends the very same
pre-serialised ClassifyRequest bytes to both, so client cost is identical.
The echo server answers with as many bytes as a real ClassifyResponse,
without parsing anything: it is the most a Python gRPC server can do here.
Servers are measured alternately (echo, optic, echo, optic, ...) and the
median of the rounds is reported, with the ratio.

    python benchmarks/classify_vs_echo.py --concurrency 64 --seconds 10 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from optic.export.data import SHAPES, make_scenes  # noqa: E402
from optic.proto.optic.v1 import vision_pb2 as pb  # noqa: E402

METHOD = "/optic.v1.Vision/Classify"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def echo_server(
    port: int, reply_size: int, methods: tuple[str, ...] = ("Classify",), service: str = "optic.v1.Vision"
) -> None:
    """A grpc.aio server answering every method of ``service`` in ``methods`` with ``reply_size`` bytes."""

    async def main() -> None:
        reply = b"\x00" * reply_size

        async def handle(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            return reply

        server = grpc.aio.server()
        handler = grpc.method_handlers_generic_handler(
            service, {m: grpc.unary_unary_rpc_method_handler(handle) for m in methods}
        )
        server.add_generic_rpc_handlers((handler,))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main())


def load(
    url: str,
    payloads: list[bytes],
    concurrency: int,
    warmup: float,
    seconds: float,
    out: mp.Queue,
    method: str = METHOD,
) -> None:
    """Closed loop: each caller sends its next request as soon as its last one is answered."""

    async def main() -> dict:
        latencies: list[float] = []
        errors: dict[str, int] = {}
        async with grpc.aio.insecure_channel(url) as channel:
            call = channel.unary_unary(method)
            start = time.perf_counter()
            measure_from, stop_at = start + warmup, start + warmup + seconds

            async def caller(i: int) -> None:
                n = i
                while (now := time.perf_counter()) < stop_at:
                    try:
                        await call(payloads[n % len(payloads)], timeout=30)
                    except grpc.RpcError as exc:
                        errors[exc.code().name] = errors.get(exc.code().name, 0) + 1
                    done = time.perf_counter()
                    if now >= measure_from:
                        latencies.append(done - now)
                    n += concurrency

            await asyncio.gather(*(caller(i) for i in range(concurrency)))
        latencies.sort()

        def pct(p: float) -> float:
            return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1e3

        return {
            "requests": len(latencies),
            "errors": errors,
            "throughput_rps": len(latencies) / seconds,
            "p50_ms": pct(0.50),
            "p99_ms": pct(0.99),
        }

    out.put(asyncio.run(main()))


def wait_ready(url: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with grpc.insecure_channel(url) as ch:
                grpc.channel_ready_future(ch).result(timeout=1)
                return
        except grpc.FutureTimeoutError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up")


def run_load(
    url: str, payloads: list[bytes], concurrency: int, warmup: float, seconds: float, method: str = METHOD
) -> dict:
    """The load generator in its own process, so it does not share the server's event loop."""
    queue: mp.Queue = mp.Queue()
    proc = mp.Process(target=load, args=(url, payloads, concurrency, warmup, seconds, queue, method))
    proc.start()
    result = queue.get(timeout=warmup + seconds + 120)
    proc.join()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model-repo", type=Path, default=ROOT / "model_repo")
    parser.add_argument("--serve-args", default="", help="extra flags for optic serve")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "classify_vs_echo.json")
    args = parser.parse_args()

    payloads = [
        pb.ClassifyRequest(model="classifier", image=pb.Image(data=_png(s.image)), top_k=5).SerializeToString()
        for s in make_scenes(64, seed=2024)
    ]
    # As many bytes as a real top-5 answer of the classifier.
    reply_size = len(
        pb.ClassifyResponse(
            model="classifier",
            model_version="1",
            classes=[pb.Classification(class_id=i, label=n, score=0.5) for i, n in enumerate(SHAPES)],
        ).SerializeToString()
    )

    optic_port, echo_port = free_port(), free_port()
    optic = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "optic.server.cli",
            "serve",
            "--model-repo",
            str(args.model_repo),
            "--host",
            "127.0.0.1",
            "--grpc-port",
            str(optic_port),
            "--metrics-port",
            "0",
            "--log-level",
            "WARNING",
            *args.serve_args.split(),
        ],
        cwd=ROOT,
    )
    echo = mp.Process(target=echo_server, args=(echo_port, reply_size), daemon=True)
    echo.start()
    rounds: dict[str, list[dict]] = {"echo": [], "optic": []}
    try:
        wait_ready(f"127.0.0.1:{optic_port}")
        wait_ready(f"127.0.0.1:{echo_port}")
        time.sleep(3)  # let model loading/warm-up finish
        for r in range(args.rounds):
            for name, port in (("echo", echo_port), ("optic", optic_port)):
                result = run_load(f"127.0.0.1:{port}", payloads, args.concurrency, args.warmup, args.seconds)
                rounds[name].append(result)
                print(
                    f"round {r + 1} {name:5s}: {result['throughput_rps']:8.1f} req/s  "
                    f"p50 {result['p50_ms']:6.2f} ms  p99 {result['p99_ms']:6.2f} ms  errors {result['errors']}",
                    flush=True,
                )
    finally:
        optic.send_signal(signal.SIGTERM)
        optic.wait(timeout=60)
        echo.terminate()

    def median(name: str, key: str) -> float:
        return statistics.median(x[key] for x in rounds[name])

    summary = {
        "benchmark": "classify_vs_echo",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "concurrency": args.concurrency,
        "seconds_per_round": args.seconds,
        "request_bytes": statistics.mean(len(p) for p in payloads),
        "reply_bytes_echo": reply_size,
        "rounds": rounds,
        "optic_rps": median("optic", "throughput_rps"),
        "echo_rps": median("echo", "throughput_rps"),
        "ratio_optic_to_echo": median("optic", "throughput_rps") / median("echo", "throughput_rps"),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(summary, indent=2) + "\n")
    print(
        f"median: optic {summary['optic_rps']:.1f} req/s, bare grpc.aio echo {summary['echo_rps']:.1f} req/s, "
        f"ratio {summary['ratio_optic_to_echo']:.2f} -> {args.json}"
    )
    return 0


def _png(image) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG")
    return buf.getvalue()


if __name__ == "__main__":
    sys.exit(main())
