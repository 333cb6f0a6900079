"""Serving-core figures, measured in one run on one machine (issue 4).

(a) KServe ModelInfer throughput, 64 concurrent closed-loop callers sending one
    image tensor each, dynamic batching on (defaults) vs off
    (``--max-batch-size 0``), for the classifier and the detector; rounds
    alternate on/off and the median is reported.
(b) Latency of a lone request (one caller, sequential) through the server vs
    calling the same onnxruntime session in-process on the same tensor:
    the difference is the serving overhead. Measured with the defaults (the
    adaptive window), with ``--max-queue-delay-ms 0``, and with the tensors in
    system shared memory (``--allow-client-shm``: input and outputs in one
    registered region, the message a few hundred bytes). A bare grpc.aio
    echo server takes the same turns with the same request bytes: its round
    trip is the transport's share of the overhead.
(c) Tensors in shared memory under load: 64 closed-loop callers, each with
    its own registered region (its input and the outputs), against the same
    tensors in the message, on one ``--allow-client-shm`` server; rounds
    alternate and the median is reported.
(d) Poll-mode swaps under load: 16 callers for 12 s while two new versions are
    dropped into the repository; every failed request is counted.

The load generator runs in its own process (see classify_vs_echo.py).

    python benchmarks/serving_core.py [--only lone_request_latency]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.classify_vs_echo import echo_server, free_port, load, run_load, wait_ready  # noqa: E402
from optic.proto.inference import grpc_service_pb2 as pb  # noqa: E402
from optic.server.runtime import OnnxModel, RuntimeOptions  # noqa: E402

INFER = "/inference.GRPCInferenceService/ModelInfer"
MODELS = ("classifier", "detector")
PARTS = ("throughput_64_concurrent", "lone_request_latency", "shm_throughput_64_concurrent", "poll_swap_under_load")


def input_shape(repo: Path, model: str) -> tuple[int, ...]:
    """One image's input shape, read from the model itself: the default models' sizes change (a hard-coded
    64x64 outlived them and every request was refused)."""
    spec = OnnxModel(repo / model / "1" / "model.onnx", RuntimeOptions(intra_op_threads=1)).inputs[0]
    return spec.shape[1:]


def request(model: str, x: np.ndarray) -> bytes:
    req = pb.ModelInferRequest(model_name=model)
    req.inputs.add(name="images", datatype="FP32", shape=x.shape)
    req.raw_input_contents.append(x.tobytes())
    return req.SerializeToString()


def payloads(repo: Path, model: str, n: int = 64) -> list[bytes]:
    rng = np.random.default_rng(0)
    shape = input_shape(repo, model)
    return [request(model, rng.random((1, *shape), dtype=np.float32)) for _ in range(n)]


def start(repo: Path, *flags: str, log: Path | None = None) -> tuple[subprocess.Popen, str]:
    """``optic serve`` on a free port, once its models are loaded; its output goes to ``log`` if given."""
    port = free_port()
    cmd = [sys.executable, "-m", "optic.server.cli", "serve", "--model-repo", str(repo), "--host", "127.0.0.1"]
    cmd += ["--grpc-port", str(port), "--metrics-port", "0", "--log-level", "WARNING", *flags]
    if log is None:
        proc = subprocess.Popen(cmd, cwd=ROOT)
    else:
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    url = f"127.0.0.1:{port}"
    wait_ready(url)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # ready = models loaded and warmed up
        with grpc.insecure_channel(url) as ch:
            call = ch.unary_unary("/inference.GRPCInferenceService/ServerReady")
            reply = pb.ServerReadyResponse.FromString(call(pb.ServerReadyRequest().SerializeToString(), timeout=5))
            if reply.ready:
                return proc, url
        time.sleep(0.2)
    raise RuntimeError("server not ready")


def stop(proc: subprocess.Popen) -> int:
    """SIGTERM, then the exit code."""
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=60)


def _round(args: argparse.Namespace, url: str, data: list[bytes], model: str, mode: str) -> dict:
    """One closed-loop round of 64 callers; any failed request ends the benchmark (the figures would mean nothing)."""
    r = run_load(url, data, 64, args.warmup, args.seconds, INFER)
    if r["errors"]:
        raise SystemExit(f"{model} {mode}: requests failed, the figures would mean nothing: {r['errors']}")
    print(
        f"{model:10s} {mode:12s} {r['throughput_rps']:8.1f} req/s  p50 {r['p50_ms']:6.2f} ms  "
        f"p99 {r['p99_ms']:6.2f} ms",
        flush=True,
    )
    return r


def throughput(args: argparse.Namespace) -> dict:
    results: dict = {}
    for model in MODELS:
        data = payloads(args.model_repo, model)
        runs: dict[str, list[dict]] = {"batching_on": [], "batching_off": []}
        for _ in range(args.rounds):
            for mode, flags in (("batching_on", ()), ("batching_off", ("--max-batch-size", "0"))):
                proc, url = start(args.model_repo, *flags)
                try:
                    runs[mode].append(_round(args, url, data, model, mode))
                finally:
                    stop(proc)
        on = statistics.median(r["throughput_rps"] for r in runs["batching_on"])
        off = statistics.median(r["throughput_rps"] for r in runs["batching_off"])
        results[model] = {"runs": runs, "on_rps": on, "off_rps": off, "ratio_on_to_off": on / off}
    return results


def shm_request(model: str, x: np.ndarray, outputs: dict[str, np.ndarray], region: str = "bench") -> tuple[bytes, int]:
    """A request with its input and every output in ``region`` (Triton's system shared memory), and the region's
    size: the input first, the outputs after it."""
    req = pb.ModelInferRequest(model_name=model)
    tensor = req.inputs.add(name="images", datatype="FP32", shape=x.shape)
    offset = 0
    for params, size in [(tensor.parameters, x.nbytes)] + [
        (req.outputs.add(name=name).parameters, array.nbytes) for name, array in outputs.items()
    ]:
        params["shared_memory_region"].string_param = region
        params["shared_memory_byte_size"].int64_param = size
        params["shared_memory_offset"].int64_param = offset
        offset += size
    return req.SerializeToString(), offset


@contextlib.contextmanager
def shm_region(channel: grpc.Channel, x: np.ndarray, size: int, region: str = "bench") -> Iterator[None]:
    """A POSIX shared-memory object holding ``x``, registered with the server as ``region``."""
    from multiprocessing import shared_memory

    block = shared_memory.SharedMemory(create=True, size=size)
    try:
        block.buf[: x.nbytes] = x.tobytes()
        register = channel.unary_unary("/inference.GRPCInferenceService/SystemSharedMemoryRegister")
        key = "/" + block.name.lstrip("/")
        register(pb.SystemSharedMemoryRegisterRequest(name=region, key=key, byte_size=size).SerializeToString())
        yield
    finally:
        block.close()
        block.unlink()


@contextlib.contextmanager
def echo(reply_size: int) -> Iterator[grpc.Channel]:
    """A bare grpc.aio server in its own process answering ModelInfer with ``reply_size`` bytes and doing nothing
    else: the transport's own round trip for a request, the floor under any gRPC server written in Python."""
    port = free_port()
    # Spawned, not forked: this process holds live gRPC channels, and gRPC does not support forking after them.
    proc = mp.get_context("spawn").Process(
        target=echo_server, args=(port, reply_size, ("ModelInfer",), "inference.GRPCInferenceService"), daemon=True
    )
    proc.start()
    try:
        url = f"127.0.0.1:{port}"
        wait_ready(url)
        with grpc.insecure_channel(url) as channel:
            yield channel
    finally:
        proc.terminate()
        proc.join()


def _interleaved(
    args: argparse.Namespace, model: str, local: OnnxModel, x: np.ndarray, outputs: dict[str, np.ndarray]
) -> dict[str, list[float]]:
    """Each turn: the in-process run, the server with the tensor in the message and in shared memory, and a bare
    echo server given the same request bytes and answering as many bytes as the server did."""
    body = request(model, x)
    in_shm, size = shm_request(model, x, outputs)
    times: dict[str, list[float]] = {k: [] for k in ("in_process", "served_default", "served_shm", "echo", "echo_shm")}
    proc, url = start(args.model_repo, "--allow-client-shm")
    try:
        with grpc.insecure_channel(url) as ch, shm_region(ch, x, size):
            call = ch.unary_unary(INFER)
            replies = len(call(body, timeout=10)), len(call(in_shm, timeout=10))
            with echo(replies[0]) as e1, echo(replies[1]) as e2:
                echo_message, echo_shm = e1.unary_unary(INFER), e2.unary_unary(INFER)
                turns = {
                    "in_process": lambda: local.run({"images": x}),
                    "served_default": lambda: call(body, timeout=10),
                    "served_shm": lambda: call(in_shm, timeout=10),
                    "echo": lambda: echo_message(body, timeout=10),
                    "echo_shm": lambda: echo_shm(in_shm, timeout=10),
                }
                for i in range(50 + args.lone_requests):
                    for label, turn in turns.items():
                        t = time.perf_counter()
                        turn()
                        if i >= 50:  # warm-up
                            times[label].append(time.perf_counter() - t)
    finally:
        stop(proc)
    return times


def lone_latency(args: argparse.Namespace) -> dict:
    """One caller, sequential. The in-process run, the tensor in the message, the tensor in shared memory (one server:
    defaults plus ``--allow-client-shm``) and a bare echo server given each of the two requests take turns request by
    request, so the machine's drift falls on all five alike; ``--max-queue-delay-ms 0`` gets a server of its own."""
    results: dict = {}
    for model in MODELS:
        local = OnnxModel(args.model_repo / model / "1" / "model.onnx", RuntimeOptions())
        x = np.random.default_rng(1).random((1, *local.inputs[0].shape[1:]), dtype=np.float32)
        local.warmup([1])
        outputs = local.run({"images": x})
        times = _interleaved(args, model, local, x, outputs)
        del local
        body = request(model, x)
        proc, url = start(args.model_repo, "--max-queue-delay-ms", "0")
        try:
            with grpc.insecure_channel(url) as ch:
                call = ch.unary_unary(INFER)
                for i in range(50 + args.lone_requests):
                    t = time.perf_counter()
                    call(body, timeout=10)
                    if i >= 50:
                        times.setdefault("served_no_delay", []).append(time.perf_counter() - t)
        finally:
            stop(proc)
        results[model] = {label: _pcts(seconds) for label, seconds in times.items()}
        for label in ("served_default", "served_shm", "served_no_delay"):
            results[model][label + "_overhead_p50_ms"] = (
                results[model][label]["p50_ms"] - results[model]["in_process"]["p50_ms"]
            )
        # What is left once the transport's own round trip for the same bytes is taken away: the server's own cost.
        for label, floor in (("served_default", "echo"), ("served_shm", "echo_shm")):
            results[model][label + "_own_overhead_p50_ms"] = (
                results[model][label + "_overhead_p50_ms"] - results[model][floor]["p50_ms"]
            )
        print(model, json.dumps(results[model]), flush=True)
    return results


def shm_throughput(args: argparse.Namespace) -> dict:
    """64 callers, the tensors in the message vs in shared memory (each caller its own region: the load generator's
    caller i always sends payload i of 64), rounds alternating on one ``--allow-client-shm`` server."""
    results: dict = {}
    for model in MODELS:
        rng = np.random.default_rng(2)
        local = OnnxModel(args.model_repo / model / "1" / "model.onnx", RuntimeOptions(intra_op_threads=1))
        shape = local.inputs[0].shape[1:]
        xs = [rng.random((1, *shape), dtype=np.float32) for _ in range(64)]
        outputs = local.run({"images": xs[0]})
        del local
        in_message = [request(model, x) for x in xs]
        in_shm = [shm_request(model, x, outputs, f"bench{i}") for i, x in enumerate(xs)]
        runs: dict[str, list[dict]] = {"message": [], "shm": []}
        proc, url = start(args.model_repo, "--allow-client-shm")
        try:
            with grpc.insecure_channel(url) as ch, contextlib.ExitStack() as regions:
                for i, (x, (_, size)) in enumerate(zip(xs, in_shm, strict=True)):
                    regions.enter_context(shm_region(ch, x, size, f"bench{i}"))
                for _ in range(args.rounds):
                    for mode, data in (("message", in_message), ("shm", [body for body, _ in in_shm])):
                        runs[mode].append(_round(args, url, data, model, mode))
        finally:
            stop(proc)
        message = statistics.median(r["throughput_rps"] for r in runs["message"])
        shm = statistics.median(r["throughput_rps"] for r in runs["shm"])
        results[model] = {"runs": runs, "message_rps": message, "shm_rps": shm, "ratio_shm_to_message": shm / message}
    return results


def poll_swap(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp)
        shutil.copytree(args.model_repo / "classifier", repo / "classifier")
        proc, url = start(repo, "--model-control-mode", "poll", "--repository-poll-secs", "0.5")
        out: mp.Queue = mp.Queue()
        p = mp.Process(target=load, args=(url, payloads(repo, "classifier"), 16, 0.0, 12.0, out, INFER))
        try:
            p.start()
            for version, at in (("2", 3.0), ("3", 7.0)):
                time.sleep(at - (3.0 if version == "3" else 0.0))
                shutil.copytree(repo / "classifier" / "1", repo / "classifier" / version)
            r = out.get(timeout=180)
            p.join()
        finally:
            stop(proc)
    failed = sum(r["errors"].values())
    print(f"poll swap: {r['requests']} requests, {failed} failed, {r['throughput_rps']:.0f} req/s", flush=True)
    return {"requests": r["requests"], "failed": failed, "errors": r["errors"], "swaps": 2, "result": r}


def _pcts(seconds: list[float]) -> dict:
    ms = np.array(seconds) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)), "n": len(ms)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--lone-requests", type=int, default=500)
    parser.add_argument("--model-repo", type=Path, default=ROOT / "model_repo")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "serving_core.json")
    parser.add_argument("--only", choices=PARTS, help="measure one part; the file's other parts are kept")
    args = parser.parse_args()
    summary = json.loads(args.json.read_text()) if args.only and args.json.exists() else {}
    summary |= {
        "benchmark": "serving_core",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
    }
    parts = dict(zip(PARTS, (throughput, lone_latency, shm_throughput, poll_swap), strict=True))
    for part, measure in parts.items():
        if args.only in (None, part):
            summary[part] = measure(args)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"-> {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
