"""Before/after figures for the twelve findings of the adversarial review (issue 15), measured on a live server.

Why: tests/test_bounds.py proves each finding is fixed with small limits set by flags, as pass/fail. The issue
asks for figures (server RSS, a victim client's latency, time to exit) of the attack itself, under the
*default* flags, on the code before and after the fix. This script runs each finding's attack against a
freshly started ``optic serve`` (one server process per finding, so one finding's damage cannot leak into
the next), from a model repository copied per finding, and writes the figures as JSON; ``--table`` turns two
such files into the markdown comparison (benchmarks/results/bounds.md).

The server under test is whatever ``--python`` imports ``optic`` from (a virtual environment with the tree
installed editable); only flags that both the old and the new ``serve`` accept are used. The client side
(this process) needs grpcio, numpy, Pillow and onnx (for the two hand-built models), i.e. the dev venv.

    python benchmarks/bounds.py --python /tmp/wt-before/.venv/bin/python --repo /tmp/models \\
        --out benchmarks/results/bounds-before.json
    python benchmarks/bounds.py --python .venv/bin/python --repo /tmp/models --out benchmarks/results/bounds-after.json
    python benchmarks/bounds.py --table benchmarks/results/bounds-before.json benchmarks/results/bounds-after.json

Attacks are scaled to a small shared machine (each says its scale in its figures); a safety cap stops the
stream flood (finding 1) when the server passes ``--rss-cap-mb``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import hashlib
import io
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from optic.proto.inference import grpc_service_pb2 as kpb
from optic.proto.inference import grpc_service_pb2_grpc as kpb_grpc
from optic.proto.optic.v1 import vision_pb2 as pb
from optic.proto.optic.v1 import vision_pb2_grpc as pb_grpc

Figures = dict[str, Any]
TOKEN = "bounds-benchmark-token-0123456789abcdef"
BIG = [("grpc.max_send_message_length", 1 << 28), ("grpc.max_receive_message_length", 1 << 28)]
OWN_CONNECTION = ("grpc.use_local_subchannel_pool", 1)  # a channel of its own TCP connection, not the pooled one
STARTED: list[subprocess.Popen[bytes]] = []  # every server this process started, killed on the way out


# ---------------------------------------------------------------- the server under test


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerExited(RuntimeError):
    def __init__(self, code: int, log: str) -> None:
        super().__init__(f"optic serve exited with {code}")
        self.code, self.log = code, log


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    grpc_port: int
    metrics_port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def pids(self) -> list[int]:
        """The server and its descendants (``--workers`` > 1 runs worker processes under a supervisor)."""
        found, todo = [], [self.pid]
        while todo:
            pid = todo.pop()
            found.append(pid)
            with contextlib.suppress(OSError):
                for task in os.listdir(f"/proc/{pid}/task"):
                    todo += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
        return found

    def _status(self, field: str) -> int:
        total = 0
        for pid in self.pids():
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith(field):
                        total += int(line.split()[1])
        return total

    def rss_mb(self) -> float:
        """VmRSS of the server's processes together."""
        return self._status("VmRSS:") / 1024

    def threads(self) -> int:
        return self._status("Threads:")

    def fds(self) -> int:
        total = 0
        for pid in self.pids():
            with contextlib.suppress(OSError):
                total += len(os.listdir(f"/proc/{pid}/fd"))
        return total

    def cpu_s(self) -> float:
        """utime + stime of the server's processes (those alive now)."""
        total = 0
        for pid in self.pids():
            with contextlib.suppress(OSError):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])
        return total / os.sysconf("SC_CLK_TCK")

    def settle(self, seconds: float = 1.0) -> float:
        """Wait until the process is idle (under 5 % of a core for ``seconds``); its RSS then."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            cpu = self.cpu_s()
            time.sleep(seconds)
            if self.cpu_s() - cpu < 0.05 * seconds:
                break
        return self.rss_mb()

    def stop(self, timeout: float = 30.0) -> tuple[int | None, float]:
        """SIGTERM; (exit code or None when it had to be killed, seconds to exit)."""
        started = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code: int | None = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            code = None
        return code, time.monotonic() - started


@dataclass
class Env:
    python: str
    models: Path  # the pristine repository to copy models from
    work: Path  # this run's scratch directory

    def repo(self, *models: str) -> Path:
        repo = self.work / "repo"
        repo.mkdir(parents=True)
        for model in models:
            shutil.copytree(self.models / model, repo / model)
        return repo

    def token_file(self) -> Path:
        path = self.work / "tokens"
        path.write_text(TOKEN + "\n")
        return path

    def start(
        self, repo: Path, *flags: str, nofile: int | None = None, wait: float = 90.0, cores: list[int] | None = None
    ) -> Server:
        grpc_port, metrics_port = free_port(), free_port()
        log_path = self.work / f"server-{grpc_port}.log"
        cmd = [
            self.python, "-m", "optic.server.cli", "serve", "--model-repo", str(repo), "--host", "127.0.0.1",
            "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port), "--metrics-host", "127.0.0.1",
            *flags,
        ]  # fmt: skip

        def limits() -> None:
            if nofile:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
            if cores:
                os.sched_setaffinity(0, cores)

        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, cwd=repo.parent, preexec_fn=limits,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )  # fmt: skip
        STARTED.append(proc)
        server = Server(proc, grpc_port, metrics_port, log_path)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise ServerExited(proc.returncode, server.log())
            with contextlib.suppress(grpc.RpcError), grpc.insecure_channel(server.url) as ch:
                answer = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return server
            time.sleep(0.2)
        raise RuntimeError(f"optic serve was not SERVING after {wait:.0f} s:\n{server.log()[-2000:]}")


@contextlib.contextmanager
def serving(env: Env, repo: Path, *flags: str, **kwargs: Any) -> Iterator[Server]:
    server = env.start(repo, *flags, **kwargs)
    try:
        yield server
    finally:
        server.stop(timeout=20)


class Peak:
    """The server's largest RSS while the ``with`` block runs (sampled every 50 ms)."""

    def __init__(self, server: Server) -> None:
        self.server, self.mb = server, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set() and self.server.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.mb = max(self.mb, self.server.rss_mb())
            time.sleep(0.05)

    def __enter__(self) -> Peak:
        self.mb = self.server.rss_mb()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# ---------------------------------------------------------------- payloads and models


def jpeg(width: int, height: int, seed: int = 0) -> bytes:
    """A photo-like image (smooth gradients, a few blobs, noise) as JPEG."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack([xx / width * 200, yy / height * 200, (xx + yy) / (width + height) * 255], -1)
    for _ in range(6):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(20, 120)
        img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 8, img.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


VICTIM_IMAGE = jpeg(640, 480)


def striped_png(width: int, height: int) -> bytes:
    stripes = np.zeros((height, width), np.uint8)
    stripes[:, ::2] = 255
    buf = io.BytesIO()
    Image.fromarray(stripes).save(buf, "PNG")
    return buf.getvalue()


def grey16_png(width: int, height: int) -> bytes:
    """A 16-bit grey PNG whose rows are constant: 40 M pixels in under 100 KB, as in the review."""
    rows = (np.arange(height, dtype=np.uint32) * 13 % 65536).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(np.repeat(rows[:, None], width, axis=1)).save(buf, "PNG", compress_level=9)
    return buf.getvalue()


def spinning_model(path: Path) -> Path:
    """A valid ONNX classifier whose graph loops 10^12 times: its warm-up never ends (tests/test_bounds.py uses it)."""
    import onnx
    from onnx import TensorProto, helper

    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Add", ["x_in", "one"], ["x_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x_in", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x_out", TensorProto.FLOAT, [1])],
        [helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])],
    )  # fmt: skip
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["images"], ["s"], keepdims=0),
         helper.make_node("Reshape", ["s", "shape1"], ["x0"]),
         helper.make_node("Loop", ["trips", "cond", "x0"], ["x"], body=body),
         helper.make_node("Reshape", ["x", "shape2"], ["logits"])],
        "spin",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 1])],
        [helper.make_tensor("trips", TensorProto.INT64, [], [10**12]),
         helper.make_tensor("cond", TensorProto.BOOL, [], [True]),
         helper.make_tensor("shape1", TensorProto.INT64, [1], [1]),
         helper.make_tensor("shape2", TensorProto.INT64, [2], [1, 1])],
    )  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def striped_segmenter(path: Path) -> Path:
    """A segmentation model whose class map alternates row by row whatever the image (as tests/test_bounds.py)."""
    import onnx
    from onnx import TensorProto, helper

    pattern = np.zeros((1, 2, 64, 64), np.float32)
    pattern[0, 1, ::2] = 1.0
    graph = helper.make_graph(
        [helper.make_node("Shape", ["images"], ["shape"], start=0, end=1),
         helper.make_node("Concat", ["shape", "tail"], ["full"], axis=0),
         helper.make_node("Expand", ["pattern", "full"], ["logits"])],
        "stripes",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 64, 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2, 64, 64])],
        [helper.make_tensor("pattern", TensorProto.FLOAT, [1, 2, 64, 64], pattern.ravel()),
         helper.make_tensor("tail", TensorProto.INT64, [3], [2, 64, 64])],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    meta = {"optic.task": "segmentation", "optic.labels": '["even", "odd"]', "optic.input.size": "[64, 64]"}
    for k, v in meta.items():
        model.metadata_props.add(key=k, value=v)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


# ---------------------------------------------------------------- clients


def code_of(exc: BaseException) -> str:
    if isinstance(exc, grpc.RpcError):
        return str(exc.code().name)
    return type(exc).__name__


def details_of(exc: BaseException) -> str:
    if isinstance(exc, grpc.RpcError):
        return str(exc.details() or "")[:200]
    return str(exc)[:200]


def victim(
    url: str, calls: int = 5, deadline: float = 5.0, fresh: bool = True, more: Callable[[], bool] | None = None
) -> Figures:
    """A normal client: 640x480 JPEG Classify calls one after another, each on a new TCP connection when
    ``fresh`` (so the listener must accept it); at least ``calls`` of them, and more while ``more()``."""
    latencies: list[float] = []
    codes: Counter[str] = Counter()
    request = pb.ClassifyRequest(model="classifier", image=pb.Image(data=VICTIM_IMAGE))
    shared = None if fresh else grpc.insecure_channel(url, options=[OWN_CONNECTION])
    try:
        n = 0
        while n < calls or (more is not None and more()):
            n += 1
            channel = shared or grpc.insecure_channel(
                url, options=[OWN_CONNECTION, ("grpc.max_reconnect_backoff_ms", 500)]
            )
            started = time.perf_counter()
            try:
                pb_grpc.VisionStub(channel).Classify(request, timeout=deadline)
                codes["OK"] += 1
                latencies.append((time.perf_counter() - started) * 1000)
            except grpc.RpcError as exc:
                codes[code_of(exc)] += 1
            finally:
                if shared is None:
                    channel.close()
    finally:
        if shared is not None:
            shared.close()
    return {
        "calls": sum(codes.values()),
        "codes": dict(codes),
        "ok": codes["OK"],
        "p50_ms": round(statistics.median(latencies), 1) if latencies else None,
        "max_ms": round(max(latencies), 1) if latencies else None,
        "deadline_s": deadline,
    }


def unary_code(fn: Callable[[], Any]) -> tuple[str, str, float]:
    started = time.perf_counter()
    try:
        fn()
        return "OK", "", round((time.perf_counter() - started) * 1000, 1)
    except grpc.RpcError as exc:
        return code_of(exc), details_of(exc), round((time.perf_counter() - started) * 1000, 1)


def server_ready(url: str, deadline: float = 5.0) -> Figures:
    with grpc.insecure_channel(url, options=[OWN_CONNECTION]) as ch:
        stub = kpb_grpc.GRPCInferenceServiceStub(ch)
        code, message, ms = unary_code(lambda: stub.ServerReady(kpb.ServerReadyRequest(), timeout=deadline))
    return {"code": code, "ms": ms, **({"message": message} if message else {})}


def health_check(url: str, deadline: float = 5.0) -> Figures:
    with grpc.insecure_channel(url, options=[OWN_CONNECTION]) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        code, _, ms = unary_code(lambda: stub.Check(health_pb2.HealthCheckRequest(), timeout=deadline))
    return {"code": code, "ms": ms}


def index(url: str) -> dict[str, list[str]]:
    with grpc.insecure_channel(url) as ch:
        answer = kpb_grpc.GRPCInferenceServiceStub(ch).RepositoryIndex(kpb.RepositoryIndexRequest(), timeout=10)
    return {m.name: [m.state, m.reason[:160]] for m in answer.models}


def segmenter_request(batch: int, total_mb: float) -> kpb.ModelInferRequest:
    """A segmenter batch (48 KB in, 96 KB of logits out per image) padded to ``total_mb`` with its ``id``,
    which the answer echoes: requests and answers of about ``total_mb`` each."""
    x = np.random.default_rng(0).random((batch, 3, 64, 64), dtype=np.float32)
    request = kpb.ModelInferRequest(model_name="segmenter")
    request.inputs.add(name="images", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    request.id = "x" * max(0, int(total_mb * 2**20) - request.ByteSize())
    return request


# ---------------------------------------------------------------- the findings


def f1_unread_stream(env: Env, args: argparse.Namespace) -> Figures:
    """One ModelStreamInfer stream of big requests with big answers, never read."""
    repo = env.repo("segmenter", "classifier")
    mb, count = args.stream_mb, args.stream_requests
    request = segmenter_request(32, mb)
    figures: Figures = {
        "scale": f"up to {count} requests of {request.ByteSize() / 2**20:.1f} MB (segmenter batch 32, id-padded; "
        f"answers ~{mb + 1.5:.0f} MB), 2 s write timeout, writes stop at server RSS {args.rss_cap_mb} MB",
    }
    with serving(env, repo) as srv:
        before = srv.settle()

        async def flood() -> Figures:
            sent, capped = 0, False
            async with grpc.aio.insecure_channel(srv.url, options=[*BIG, OWN_CONNECTION]) as channel:
                call = kpb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer()
                for _ in range(count):
                    if srv.rss_mb() > args.rss_cap_mb:
                        capped = True
                        break
                    try:
                        await asyncio.wait_for(call.write(request), timeout=2.0)
                    except TimeoutError:
                        break  # the server stopped reading: flow control pushes back
                    sent += 1
                await asyncio.sleep(1)
                held = await asyncio.to_thread(srv.settle)  # the server has computed what it read
                victims = await asyncio.to_thread(victim, srv.url, 3, 5.0)
                call.cancel()
            return {"requests_accepted": sent, "stopped_by_rss_cap": capped, "rss_held_mb": round(held),
                    "victim_during": victims}  # fmt: skip

        with Peak(srv) as peak:
            result = asyncio.run(flood())
        time.sleep(2)
        after = srv.settle()
        figures |= result | {"rss_before_mb": round(before), "rss_peak_mb": round(peak.mb),
                             "rss_after_cancel_mb": round(after)}  # fmt: skip
    return figures


def f2_idle_streams(env: Env, args: argparse.Namespace) -> Figures:
    """Idle ModelStreamInfer streams (never written): can anyone else get a call in?"""
    repo = env.repo("classifier")
    figures: Figures = {"scale": f"{args.idle_streams} streams, on 1 connection and on 16 connections"}
    with serving(env, repo) as srv:
        figures["victim_baseline"] = victim(srv.url, 5)

        async def attack(connections: int) -> Figures:
            channels = [grpc.aio.insecure_channel(srv.url, options=[OWN_CONNECTION]) for _ in range(connections)]
            stubs = [kpb_grpc.GRPCInferenceServiceStub(ch) for ch in channels]
            calls = [stubs[i % connections].ModelStreamInfer() for i in range(args.idle_streams)]
            await asyncio.sleep(3)
            victims = await asyncio.to_thread(victim, srv.url, 5)
            ready = await asyncio.to_thread(server_ready, srv.url)
            health = await asyncio.to_thread(health_check, srv.url)
            ended: Counter[str] = Counter()
            for c in calls:
                ended[(await c.code()).name if c.done() else "open"] += 1
            for c in calls:
                c.cancel()
            for ch in channels:
                await ch.close()
            return {"victim": victims, "server_ready": ready, "health": health, "attack_streams": dict(ended)}

        figures["one_connection"] = asyncio.run(attack(1))
        time.sleep(1)
        figures["sixteen_connections"] = asyncio.run(attack(16))
        time.sleep(1)
        figures["victim_after"] = victim(srv.url, 3)
    return figures


def f3_health_watch(env: Env, args: argparse.Namespace) -> Figures:
    """Health Watch streams on a server that requires a token (health open, the default): first without the
    token (the review's attack), then with it (is the number of open Watch streams bounded?)."""
    repo = env.repo("classifier")
    n, conns = args.watches, 5
    figures: Figures = {"scale": f"{n} Watch streams over {conns} connections (--auth-token-file set), without and "
                        "with the token"}  # fmt: skip
    with serving(env, repo, "--auth-token-file", str(env.token_file())) as srv:

        async def attack(metadata: tuple[tuple[str, str], ...] | None) -> Figures:
            channels = [grpc.aio.insecure_channel(srv.url, options=[OWN_CONNECTION]) for _ in range(conns)]
            calls = []
            for i in range(n):  # opened 100 at a time: a burst of thousands is partly CANCELLED by gRPC itself
                stub = health_pb2_grpc.HealthStub(channels[i % conns])
                calls.append(stub.Watch(health_pb2.HealthCheckRequest(service=""), metadata=metadata))
                if i % 100 == 99:
                    await asyncio.sleep(0.1)

            async def first(call: Any) -> str:
                try:
                    answer = await call.read()
                    return "SERVING" if answer.status == health_pb2.HealthCheckResponse.SERVING else str(answer.status)
                except grpc.aio.AioRpcError as exc:
                    return code_of(exc)

            reads = [asyncio.ensure_future(first(c)) for c in calls]
            done, pending = await asyncio.wait(reads, timeout=20)
            answers = Counter(t.result() for t in done)
            if pending:
                answers["no answer in 20 s"] = len(pending)
            held = await asyncio.to_thread(srv.settle)
            check = await asyncio.to_thread(health_check, srv.url)
            victims = await asyncio.to_thread(victim_with_token, srv.url, 3)
            for c in calls:
                c.cancel()
            for t in pending:
                t.cancel()
            for ch in channels:
                await ch.close()
            return {"first_answers": dict(answers), "accepted": answers["SERVING"], "rss_held_mb": round(held),
                    "health_check": check, "victim_during": victims}  # fmt: skip

        for name, metadata in (("no_token", None), ("with_token", (("authorization", f"Bearer {TOKEN}"),))):
            before = srv.settle()
            result = asyncio.run(attack(metadata))
            time.sleep(2)
            figures[name] = result | {"rss_before_mb": round(before), "rss_after_cancel_mb": round(srv.settle())}
    return figures


def victim_with_token(url: str, calls: int) -> Figures:
    latencies, codes = [], Counter[str]()
    request = pb.ClassifyRequest(model="classifier", image=pb.Image(data=VICTIM_IMAGE))
    with grpc.insecure_channel(url, options=[OWN_CONNECTION]) as ch:
        for _ in range(calls):
            started = time.perf_counter()
            try:
                pb_grpc.VisionStub(ch).Classify(request, timeout=5, metadata=(("authorization", f"Bearer {TOKEN}"),))
                codes["OK"] += 1
                latencies.append((time.perf_counter() - started) * 1000)
            except grpc.RpcError as exc:
                codes[code_of(exc)] += 1
    return {"codes": dict(codes), "p50_ms": round(statistics.median(latencies), 1) if latencies else None}


def f4_metrics_half_sent(env: Env, args: argparse.Namespace) -> Figures:
    """Half-sent /metrics requests against a server whose fd limit is a common 512... (set on both)."""
    repo = env.repo("classifier")
    n, nofile = args.metrics_sockets, args.nofile
    figures: Figures = {"scale": f"{n} sockets each sending 'GET /metr', server RLIMIT_NOFILE={nofile}"}
    with serving(env, repo, nofile=nofile) as srv:
        figures |= {"fds_before": srv.fds(), "threads_before": srv.threads(), "victim_baseline": victim(srv.url, 5)}
        sockets: list[socket.socket] = []
        refused = in_a_row = 0
        for _ in range(n):
            try:
                s = socket.create_connection(("127.0.0.1", srv.metrics_port), timeout=0.5)
                s.sendall(b"GET /metr")
                sockets.append(s)
                in_a_row = 0
            except OSError:
                refused += 1
                in_a_row += 1
                if in_a_row == 5:  # the listener's backlog is full: the server takes no more
                    break
        time.sleep(2)
        figures |= {"connect_errors": refused, "fds_during": srv.fds(), "threads_during": srv.threads()}
        figures["victim_during"] = victim(srv.url, 5)
        figures["metrics_get_during"] = metrics_get(srv.metrics_port)
        still_open = 0
        for s in sockets:
            s.setblocking(False)
            try:
                still_open += s.recv(1) != b""  # b"": the server closed it
            except BlockingIOError:
                still_open += 1  # nothing to read and not closed: the server still holds it
            except OSError:
                pass
        figures["sockets_still_open_server_side"] = still_open
        for s in sockets:
            s.close()
        time.sleep(2)
        figures |= {"fds_after_close": srv.fds(), "victim_after_close": victim(srv.url, 3)}
        figures["fd_limit_log_lines"] = sum("File descriptor limit" in line for line in srv.log().splitlines())
    return figures


def metrics_get(port: int) -> Figures:
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            answer.read()
            return {"code": answer.status, "ms": round((time.perf_counter() - started) * 1000, 1)}
    except Exception as exc:  # a timeout or a reset is the figure
        return {"code": type(exc).__name__, "ms": round((time.perf_counter() - started) * 1000, 1)}


def f5_never_warm(env: Env, args: argparse.Namespace) -> Figures:
    """A model whose warm-up never ends. Poll mode: it appears in the repository, another model 3 s later; is the
    other one loaded? Explicit mode: its RepositoryModelLoad is under way; does a load of another model go
    through? Each time: seconds from SIGTERM to exit with --grace-seconds 5."""
    wait = args.load_wait
    figures: Figures = {
        "scale": f"--grace-seconds 5; poll mode (0.5 s scans), detector added 3 s after 'spin', {wait:.0f} s wait; "
        "explicit mode, detector loaded 2 s after 'spin', 20 s deadline"
    }
    repo = env.repo("classifier")
    srv = env.start(repo, "--model-control-mode", "poll", "--repository-poll-secs", "0.5", "--grace-seconds", "5")
    poll: Figures = {"wait_s": wait}
    try:
        staging = env.work / "staging"
        spinning_model(staging / "spin" / "1" / "model.onnx")
        shutil.copytree(staging / "spin", env.work / "spin-copy")  # for the explicit-mode server below
        shutil.move(staging / "spin", repo / "spin")
        time.sleep(3)
        shutil.copytree(env.models / "detector", staging / "detector")
        shutil.move(staging / "detector", repo / "detector")
        added = time.monotonic()
        time.sleep(3)
        cpu = srv.cpu_s()
        time.sleep(2)
        poll["cores_busy_while_idle"] = round((srv.cpu_s() - cpu) / 2, 2)
        while time.monotonic() - added < wait:
            if index(srv.url).get("detector", [""])[0] == "READY":
                poll["detector_ready_after_s"] = round(time.monotonic() - added, 1)
                break
            time.sleep(0.5)
        poll |= {"index": index(srv.url), "victim": victim(srv.url, 3)}
    finally:
        code, seconds = srv.stop(timeout=20)
    figures["poll"] = poll | {"sigterm_exit_code": code, "sigterm_to_exit_s": round(seconds, 1) if code is not None
                              else None}  # fmt: skip

    repo = env.work / "explicit-repo"
    repo.mkdir()
    for model in ("classifier", "detector"):
        shutil.copytree(env.models / model, repo / model)
    shutil.copytree(env.work / "spin-copy", repo / "spin")
    explicit = ("--model-control-mode", "explicit", "--load-model", "classifier", "--grace-seconds", "5")
    srv = env.start(repo, *explicit)
    try:
        with grpc.insecure_channel(srv.url) as ch:
            stub = kpb_grpc.GRPCInferenceServiceStub(ch)
            spin = stub.RepositoryModelLoad.future(kpb.RepositoryModelLoadRequest(model_name="spin"), timeout=60)
            time.sleep(2)
            code_, message, ms = unary_code(
                lambda: stub.RepositoryModelLoad(kpb.RepositoryModelLoadRequest(model_name="detector"), timeout=20)
            )
            figures["explicit"] = {"detector_load": {"code": code_, "ms": ms, "message": message},
                                   "spin_load_done": spin.done(), "victim": victim(srv.url, 3)}  # fmt: skip
            spin.cancel()
    finally:
        code, seconds = srv.stop(timeout=20)
    figures["explicit"] = figures.get("explicit", {}) | {
        "sigterm_exit_code": code,
        "sigterm_to_exit_s": round(seconds, 1) if code is not None else None,
    }
    return figures


def f6_odd_version(env: Env, args: argparse.Namespace) -> Figures:
    """A version directory named '²' (str.isdigit() is true, int() fails), beside a good model."""
    repo = env.repo("classifier")
    (repo / "weird" / "²").mkdir(parents=True)
    shutil.copy(env.models / "classifier" / "1" / "model.onnx", repo / "weird" / "²" / "model.onnx")
    figures: Figures = {"scale": "repo: classifier/1, weird/² (a valid model.onnx inside)"}
    started = time.monotonic()
    try:
        with serving(env, repo, wait=60) as srv:
            figures |= {"none_mode_started": True, "start_s": round(time.monotonic() - started, 1),
                        "index": index(srv.url), "victim": victim(srv.url, 3)}  # fmt: skip
    except ServerExited as exc:
        last = [line for line in exc.log.splitlines() if line.strip()][-1:] or [""]
        figures |= {"none_mode_started": False, "exit_code": exc.code, "last_log_line": last[0][-200:]}
    with serving(env, repo, "--model-control-mode", "explicit", "--load-model", "classifier") as srv:
        with grpc.insecure_channel(srv.url) as ch:
            stub = kpb_grpc.GRPCInferenceServiceStub(ch)
            code, message, _ = unary_code(
                lambda: stub.RepositoryModelLoad(kpb.RepositoryModelLoadRequest(model_name="weird"), timeout=30)
            )
        figures["explicit_load_weird"] = {"code": code, "message": message}
    return figures


def f7_rle_amplification(env: Env, args: argparse.Namespace) -> Figures:
    """Segment with return_rle on a striped PNG whose column-major RLE has a run per pixel."""
    repo = env.repo("classifier")
    striped_segmenter(repo / "stripes" / "1" / "model.onnx")
    width = args.rle_width
    data = striped_png(width, 64)
    figures: Figures = {"scale": f"one {width}x64 striped PNG ({len(data) / 1024:.0f} KB), model 'stripes'"}
    with serving(env, repo) as srv:
        before, cpu = srv.settle(), srv.cpu_s()
        request = pb.SegmentRequest(model="stripes", image=pb.Image(data=data), return_rle=True)
        with Peak(srv) as peak, grpc.insecure_channel(srv.url, options=BIG) as ch:
            started = time.perf_counter()
            try:
                answer = pb_grpc.VisionStub(ch).Segment(request, timeout=120)
                code, message, size = "OK", "", answer.ByteSize()
            except grpc.RpcError as exc:
                code, message, size = code_of(exc), details_of(exc), 0
                if "larger than max (" in message:  # built, then refused by gRPC's send limit: its size
                    size = int(message.split("larger than max (")[1].split()[0])
            seconds = time.perf_counter() - started
        figures |= {
            "code": code, "message": message, "answer_mb": round(size / 2**20, 1), "wall_s": round(seconds, 1),
            "server_cpu_s": round(srv.cpu_s() - cpu, 1), "rss_before_mb": round(before),
            "rss_peak_delta_mb": round(peak.mb - before), "rss_idle_after_mb": round(srv.settle(2)),
            "victim_after": victim(srv.url, 3),
        }  # fmt: skip
    return figures


def f8_decode_starvation(env: Env, args: argparse.Namespace) -> Figures:
    """16-bit grey PNGs of 8000x5000 in Classify calls, while a normal client keeps calling: one call of many
    (the review's), one of 2 (within the new default --max-call-pixels), and 8 concurrent calls of 2 (each within
    it: does fairness hold across calls?). The 2-image call is also timed alone, without the victim's load."""
    repo = env.repo("classifier")
    big = grey16_png(8000, 5000)
    many = args.decode_images
    figures: Figures = {
        "scale": f"8000x5000 16-bit grey PNG ({len(big) / 1024:.0f} KB): 1 call of {many}, 1 call of 2, 8 concurrent "
        "calls of 2; victim: sequential 640x480 Classify, 5 s deadline"
    }
    with serving(env, repo) as srv:
        figures["victim_baseline"] = victim(srv.url, 5, fresh=False)
        for name, calls, images, with_victim in (
            (f"1x{many}", 1, many, True), ("1x2", 1, 2, True), ("1x2_alone", 1, 2, False), ("8x2", 8, 2, True)
        ):  # fmt: skip
            before, cpu = srv.settle(), srv.cpu_s()
            request = pb.ClassifyRequest(model="classifier", images=[pb.Image(data=big)] * images)
            with Peak(srv) as peak, grpc.insecure_channel(srv.url, options=[*BIG, OWN_CONNECTION]) as ch:
                started = time.perf_counter()
                heavy = [
                    pb_grpc.VisionStub(ch).Classify.future(request, timeout=args.heavy_timeout) for _ in range(calls)
                ]
                busy = lambda h=heavy: not all(f.done() for f in h)  # noqa: E731
                time.sleep(0.3)
                victims: Figures = {}
                if with_victim and busy():
                    victims = victim(srv.url, 1, fresh=False, more=busy)
                codes: Counter[str] = Counter()
                message = ""
                for future in heavy:
                    try:
                        future.result()
                        codes["OK"] += 1
                    except grpc.RpcError as exc:
                        codes[code_of(exc)] += 1
                        message = details_of(exc)
                heavy_s = time.perf_counter() - started
            figures[name] = {
                "codes": dict(codes), "message": message, "heavy_s": round(heavy_s, 1),
                "server_cpu_s": round(srv.cpu_s() - cpu, 1), "rss_before_mb": round(before),
                "rss_peak_mb": round(peak.mb), "victim_during": victims,
            }  # fmt: skip
    return figures


def f9_refused_payloads(env: Env, args: argparse.Namespace) -> Figures:
    """Big ModelInfer requests refused one at a time (no token, then a shape mismatch): what stays?"""
    repo = env.repo("classifier")
    mb, n = args.refused_mb, args.refused_requests
    blob = np.zeros(int(mb * 2**20) // 4, np.float32).tobytes()
    request = kpb.ModelInferRequest(model_name="classifier")
    request.inputs.add(name="images", datatype="FP32", shape=[1, 3, 64, 64])
    request.raw_input_contents.append(blob)  # the wrong size for the shape
    figures: Figures = {"scale": f"{n} x {mb:.0f} MB ModelInfer: {n // 2} without a token (UNAUTHENTICATED), "
                        f"{n - n // 2} with one and a shape mismatch (INVALID_ARGUMENT)"}  # fmt: skip
    with serving(env, repo, "--auth-token-file", str(env.token_file())) as srv:
        before = srv.settle(2)
        codes: Counter[str] = Counter()
        with Peak(srv) as peak, grpc.insecure_channel(srv.url, options=BIG) as ch:
            stub = kpb_grpc.GRPCInferenceServiceStub(ch)
            for i in range(n):
                metadata = (("authorization", f"Bearer {TOKEN}"),) if i >= n // 2 else None
                try:
                    stub.ModelInfer(request, timeout=60, metadata=metadata)
                    codes["OK"] += 1
                except grpc.RpcError as exc:
                    codes[code_of(exc)] += 1
        time.sleep(2)
        idle_2s = srv.rss_mb()
        time.sleep(6)
        figures |= {"codes": dict(codes), "rss_before_mb": round(before), "rss_peak_mb": round(peak.mb),
                    "rss_idle_2s_mb": round(idle_2s), "rss_idle_8s_mb": round(srv.rss_mb())}  # fmt: skip
    return figures


def image_shape(model_dir: Path) -> tuple[int, ...]:
    """One image's input shape (C, H, W), read from the model: a hard-coded 64x64 outlived the default models."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model_dir / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    return tuple(int(d) for d in sess.get_inputs()[0].shape[1:])


def f10_cancelled_streams(env: Env, args: argparse.Namespace) -> Figures:
    """Busy streams (a window of work started) cancelled by their client after the first answer: first with two
    items of each stream failing in-band (the review's case), then with every item valid."""
    repo = env.repo("detector", "classifier")
    n = args.cancelled_streams
    image = jpeg(320, 240, seed=2)
    figures: Figures = {
        "scale": f"{n} streams ({n // 2} DetectStream + {n - n // 2} ModelStreamInfer) of 8 requests, 2 of them for a "
        f"missing model; then {n} ModelStreamInfer of 8 valid requests; each cancelled after its first answer"
    }
    phrase = "Task exception was never retrieved"
    count = lambda text, words: sum(words in line for line in text.splitlines())  # noqa: E731
    shape = image_shape(repo / "classifier")  # "valid" must be valid for whichever classifier is the default

    async def attack(url: str, failing: int) -> None:
        async with grpc.aio.insecure_channel(url) as ch:
            for i in range(n):
                if failing and i < n // 2:
                    call: Any = pb_grpc.VisionStub(ch).DetectStream()
                    for j in range(8):
                        model = "detector" if j < 8 - failing else "missing"
                        request = pb.DetectRequest(model=model, image=pb.Image(data=image))
                        await call.write(pb.DetectFrame(frame_id=j, request=request))
                else:
                    call = kpb_grpc.GRPCInferenceServiceStub(ch).ModelStreamInfer()
                    x = np.random.default_rng(i).random((1, *shape), dtype=np.float32)
                    for j in range(8):
                        infer = kpb.ModelInferRequest(model_name="classifier" if j < 8 - failing else "missing")
                        infer.inputs.add(name="images", datatype="FP32", shape=list(x.shape))
                        infer.raw_input_contents.append(x.tobytes())
                        await call.write(infer)
                await call.read()
                call.cancel()
                await asyncio.sleep(0.05)

    with serving(env, repo) as srv:
        for name, failing in (("with_failing_items", 2), ("all_valid", 0)):
            seen = srv.log()
            asyncio.run(attack(srv.url, failing))
            time.sleep(2)
            new = srv.log()[len(seen) :]
            figures[name] = {"never_retrieved": count(new, phrase), "traceback": count(new, "Traceback"),
                             "sample": excerpt(new, ("never retrieved", "Traceback"))}  # fmt: skip
        figures["victim_after"] = victim(srv.url, 3)
    code, _ = srv.stop()
    log = srv.log()
    figures |= {
        "never_retrieved_lines": count(log, phrase),
        "traceback_lines": count(log, "Traceback"),
        "log_lines_total": len(log.splitlines()),
        "exit_code": code,
    }
    return figures


def excerpt(log: str, phrases: tuple[str, ...], lines: int = 8) -> list[str]:
    """The first log line holding one of ``phrases``, and the lines after it."""
    text = log.splitlines()
    for i, line in enumerate(text):
        if any(p in line for p in phrases):
            return [x[:240] for x in text[i : i + lines]]
    return []


def f11_load_overrides(env: Env, args: argparse.Namespace) -> Figures:
    """tritonclient-style RepositoryModelLoad with a config override and a file override (raw proto)."""
    repo = env.repo("classifier", "detector")
    detector = (env.models / "detector" / "1" / "model.onnx").read_bytes()
    param = kpb.ModelRepositoryParameter
    figures: Figures = {"scale": "explicit mode, --load-model classifier"}
    explicit = ("--model-control-mode", "explicit", "--load-model", "classifier")
    with serving(env, repo, *explicit) as srv, grpc.insecure_channel(srv.url, options=BIG) as ch:
        stub = kpb_grpc.GRPCInferenceServiceStub(ch)

        def load(name: str, params: dict[str, kpb.ModelRepositoryParameter]) -> Figures:
            request = kpb.RepositoryModelLoadRequest(model_name=name)
            for key, value in params.items():
                request.parameters[key].CopyFrom(value)
            code, message, _ = unary_code(lambda: stub.RepositoryModelLoad(request, timeout=60))
            return {"code": code, "message": message}

        def config_mbs(name: str) -> int | str:
            try:
                return int(stub.ModelConfig(kpb.ModelConfigRequest(name=name), timeout=10).config.max_batch_size)
            except grpc.RpcError as exc:
                return code_of(exc)

        was = config_mbs("classifier")
        answer = load("classifier", {"config": param(string_param=json.dumps({"max_batch_size": 4}))})
        after = config_mbs("classifier")
        figures["config_override"] = answer | {"max_batch_size_before": was, "max_batch_size_after": after, "asked": 4}
        params = {
            "config": param(string_param=json.dumps({"max_batch_size": 2})),
            "file:7/model.onnx": param(bytes_param=detector),
        }
        answer = load("fresh", params)
        try:
            versions: Any = list(stub.ModelMetadata(kpb.ModelMetadataRequest(name="fresh"), timeout=10).versions)
        except grpc.RpcError as exc:
            versions = code_of(exc)
        figures["file_override"] = answer | {"fresh_versions": versions, "asked_version": "7"}
        evil = {"config": param(string_param="{}"), "file:../evil/model.onnx": param(bytes_param=detector)}
        answer = load("evil", evil)
        figures["traversal_override"] = answer | {
            "written_outside": any(p.name.startswith("evil") for p in [*repo.iterdir(), *repo.parent.iterdir()])
        }
    return figures


def f12_contents_and_raw(env: Env, args: argparse.Namespace) -> Figures:
    """KServe ModelInfer with typed contents and raw_input_contents both set."""
    repo = env.repo("classifier")
    x = np.random.default_rng(0).random((1, 3, 64, 64), dtype=np.float32)
    request = kpb.ModelInferRequest(model_name="classifier")
    tensor = request.inputs.add(name="images", datatype="FP32", shape=list(x.shape))
    tensor.contents.fp32_contents.extend(x.ravel().tolist())
    request.raw_input_contents.append(x.tobytes())
    with serving(env, repo) as srv, grpc.insecure_channel(srv.url) as ch:
        stub = kpb_grpc.GRPCInferenceServiceStub(ch)
        code, message, _ = unary_code(lambda: stub.ModelInfer(request, timeout=30))
    return {"scale": "one 1x3x64x64 FP32 input, in fp32_contents and in raw_input_contents", "code": code,
            "message": message}  # fmt: skip


FINDINGS: dict[str, tuple[str, Callable[[Env, argparse.Namespace], Figures]]] = {
    "1": ("one unread stream holds whole requests", f1_unread_stream),
    "2": ("idle streams lock everyone out", f2_idle_streams),
    "3": ("health Watch unbounded, no token", f3_health_watch),
    "4": ("half-sent /metrics requests starve gRPC", f4_metrics_half_sent),
    "5": ("a never-warm model wedges loads and SIGTERM", f5_never_warm),
    "6": ("version directory '²'", f6_odd_version),
    "7": ("RLE output amplification", f7_rle_amplification),
    "8": ("decode starvation (16-bit 40 Mpx PNGs)", f8_decode_starvation),
    "9": ("refused big payloads retained", f9_refused_payloads),
    "10": ("cancelled streams log tracebacks", f10_cancelled_streams),
    "11": ("RepositoryModelLoad overrides", f11_load_overrides),
    "12": ("typed contents + raw_input_contents", f12_contents_and_raw),
}


# ---------------------------------------------------------------- running and reporting


def describe_tree(python: str) -> Figures:
    where = subprocess.run(
        [python, "-c", "import optic.server, pathlib; print(pathlib.Path(optic.server.__file__).parent.parent)"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout.strip()  # fmt: skip
    git = lambda *a: subprocess.run(["git", "-C", where, *a], capture_output=True, text=True).stdout.strip()  # noqa: E731
    return {"tree": where, "commit": git("rev-parse", "--short", "HEAD"),
            "uncommitted_files": len(git("status", "--porcelain").splitlines()),
            "server_code_sha1": code_digest(Path(where))}  # fmt: skip


def code_digest(tree: Path) -> str:
    """A digest of the tree's server code: the run's servers all ran this code if it is the same at the end."""
    digest = hashlib.sha1()
    for path in sorted((tree / "server").rglob("*.py")):
        digest.update(str(path.relative_to(tree)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def run(args: argparse.Namespace) -> int:
    wanted = args.only.split(",") if args.only else list(FINDINGS)
    report: Figures = {
        "python": args.python, **describe_tree(args.python),
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cores": os.cpu_count(), "machine": platform.machine(), "loadavg_at_start": os.getloadavg()[0],
        "findings": {},
    }  # fmt: skip
    out = Path(args.out)
    if args.only and out.exists():  # re-running some findings: keep the others
        report["findings"] = json.loads(out.read_text()).get("findings", {})
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="optic-bounds-") as tmp:
        for key in wanted:
            title, scenario = FINDINGS[key]
            print(f"[{time.monotonic() - started:5.0f} s] finding {key}: {title}", flush=True)
            env = Env(args.python, Path(args.repo).resolve(), Path(tmp) / f"f{key}")
            env.work.mkdir()
            t0 = time.monotonic()
            try:
                figures = scenario(env, args)
            except Exception as exc:  # one scenario's failure is a figure
                figures = {"error": f"{type(exc).__name__}: {exc}"[:2000], "trace": traceback.format_exc()[-2000:]}
            finally:
                for proc in STARTED:
                    if proc.poll() is None:
                        proc.kill()
                        proc.wait()
            figures["scenario_s"] = round(time.monotonic() - t0, 1)
            figures["title"] = title
            report["findings"][key] = figures
            print(json.dumps(figures, ensure_ascii=False)[:1500], flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    report["total_s"] = round(time.monotonic() - started, 1)
    report["server_code_changed_during_run"] = code_digest(Path(report["tree"])) != report["server_code_sha1"]
    out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {out} in {report['total_s']:.0f} s")
    return 0


# -- the table: one cell per finding and run, from its figures


def _codes(c: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" if len(c) > 1 or v != 1 else k for k, v in c.items())


def _victim(v: Figures) -> str:
    if not v:
        return "n/a"
    if v.get("ok") == v.get("calls") or v.get("codes") == {"OK": v.get("calls")}:
        return f"{v['calls']}/{v['calls']} OK, p50 {v['p50_ms']} ms, max {v['max_ms']} ms"
    lat = f", OK p50 {v['p50_ms']} ms" if v.get("p50_ms") is not None else ""
    return f"{_codes(v['codes'])} of {v['calls']}{lat}"


def _exit(f: Figures) -> str:
    if f["sigterm_exit_code"] is None:
        return "no exit 20 s after SIGTERM (killed)"
    return f"exit {f['sigterm_to_exit_s']} s after SIGTERM"


def cell(key: str, f: Figures) -> str:  # one branch per finding
    if "error" in f:
        return f"scenario failed: {f['error'][:200]}"
    if key == "1":
        cap = " (stopped at the RSS cap)" if f["stopped_by_rss_cap"] else ""
        return (f"{f['requests_accepted']} requests read{cap}; RSS {f['rss_before_mb']} → peak {f['rss_peak_mb']} "
                f"→ {f['rss_after_cancel_mb']} MB after cancel; victim {_victim(f['victim_during'])}")  # fmt: skip
    if key == "2":
        one, many = f["one_connection"], f["sixteen_connections"]
        return (f"1 conn: victim {_victim(one['victim'])}, ServerReady {one['server_ready']['code']}; "
                f"16 conns: victim {_victim(many['victim'])}, ServerReady {many['server_ready']['code']}, "
                f"attack streams {_codes(many['attack_streams'])}")  # fmt: skip
    if key == "3":
        out = []
        for name, label in (("no_token", "no token"), ("with_token", "with token")):
            w = f[name]
            out.append(f"{label}: {w['accepted']} accepted ({_codes(w['first_answers'])}), RSS {w['rss_before_mb']} → "
                       f"{w['rss_held_mb']} MB held")  # fmt: skip
        return "; ".join(out) + f"; victim {_codes(f['with_token']['victim_during']['codes'])}"
    if key == "4":
        return (f"fds {f['fds_before']} → {f['fds_during']}, threads {f['threads_before']} → {f['threads_during']}; "
                f"victim {_victim(f['victim_during'])}; /metrics {f['metrics_get_during']['code']}; after close: "
                f"victim {_victim(f['victim_after_close'])}")  # fmt: skip
    if key == "5":
        poll, exp = f["poll"], f["explicit"]
        ready = poll.get("detector_ready_after_s")
        loaded = f"detector READY after {ready} s" if ready is not None else "detector not READY"
        load = exp.get("detector_load", {})
        return (f"poll: {loaded} (waited {poll['wait_s']:.0f} s), "
                f"warm-up spinning {poll['cores_busy_while_idle']} cores, {_exit(poll)}; explicit: detector load "
                f"{load.get('code')} in {load.get('ms')} ms, {_exit(exp)}")  # fmt: skip
    if key == "6":
        start = (f"starts in {f['start_s']} s; weird {f['index'].get('weird', ['?'])[0]}, classifier "
                 f"{f['index'].get('classifier', ['?'])[0]}") if f["none_mode_started"] else (
            f"does not start (exit {f['exit_code']})")  # fmt: skip
        return f"{start}; explicit load: {f['explicit_load_weird']['code']}"
    if key == "7":
        if f["answer_mb"] and f["code"] != "OK":
            outcome = f"{f['answer_mb']} MB answer built, then {f['code']} (gRPC's send limit)"
        elif f["code"] == "OK":
            outcome = f"OK, {f['answer_mb']} MB answer"
        else:
            flag = re.search(r"--[a-z-]+", f["message"])
            outcome = f"{f['code']} before the answer was built" + (f" ({flag.group()})" if flag else "")
        return (f"{outcome}; {f['server_cpu_s']} s CPU, {f['wall_s']} s, RSS +{f['rss_peak_delta_mb']} MB peak, "
                f"{f['rss_idle_after_mb']} MB idle after")  # fmt: skip
    if key == "8":
        parts = []
        for name, c in f.items():
            if isinstance(c, dict) and "heavy_s" in c:
                v = c["victim_during"]
                vic = f"; victim {_victim(v)}" if v else ""
                parts.append(f"{name}: {_codes(c['codes'])} in {c['heavy_s']} s, {c['server_cpu_s']} s CPU, RSS "
                             f"+{c['rss_peak_mb'] - c['rss_before_mb']} MB peak{vic}")  # fmt: skip
        return "; ".join(parts) + f" (victim alone: p50 {f['victim_baseline']['p50_ms']} ms)"
    if key == "9":
        return (f"{_codes(f['codes'])}; RSS {f['rss_before_mb']} → peak {f['rss_peak_mb']} → idle "
                f"{f['rss_idle_2s_mb']} (2 s) / {f['rss_idle_8s_mb']} MB (8 s)")  # fmt: skip
    if key == "10":
        w, v = f["with_failing_items"], f["all_valid"]
        return (f"'Task exception was never retrieved' / Traceback lines: {w['never_retrieved']} / {w['traceback']} "
                f"(items failing), {v['never_retrieved']} / {v['traceback']} (all valid)")  # fmt: skip
    if key == "11":
        c, fo, t = f["config_override"], f["file_override"], f["traversal_override"]
        applied = "applied" if c["max_batch_size_after"] == c["asked"] else f"not applied ({c['max_batch_size_after']})"
        return (f"config: {c['code']}, max_batch_size {applied}; file:7: {fo['code']}, versions "
                f"{fo['fresh_versions']}; file:../: {t['code']}")  # fmt: skip
    if key == "12":
        return f["code"] + (f": {f['message'][:130]}" if f["message"] else "")
    return json.dumps(f)[:200]


def table(before_path: str, after_path: str, md_path: str) -> int:
    runs = [json.loads(Path(p).read_text()) for p in (before_path, after_path)]
    lines = [
        "# Issue 15: each finding's attack, before and after",
        "",
        "Generated by `benchmarks/bounds.py` (default flags on both servers unless a row says otherwise).",
        "",
        "| run | tree | commit | uncommitted files | server code sha1 | date | cores | load avg at start | total |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in zip(("before", "after"), runs, strict=True):
        changed = " (changed during the run!)" if r.get("server_code_changed_during_run") else ""
        lines.append(f"| {name} | `{r['tree']}` | {r['commit']} | {r['uncommitted_files']} | "
                     f"{r.get('server_code_sha1', '?')}{changed} | {r['date']} | {r['cores']} | "
                     f"{r['loadavg_at_start']:.2f} | {r.get('total_s', 0):.0f} s |")  # fmt: skip
    lines += ["", "| # | finding (scale) | before | after |", "|---|---|---|---|"]
    for key, (title, _) in FINDINGS.items():
        b, a = (r["findings"].get(key, {"error": "not run"}) for r in runs)
        scale = (a.get("scale") or b.get("scale") or "").replace("|", "/")
        row = [key, f"**{title}** ({scale})", cell(key, b), cell(key, a)]
        lines.append("| " + " | ".join(x.replace("|", "/").replace("\n", " ") for x in row) + " |")
    lines += ["", HOW_MEASURED, "", "## Reproduce", "", "```", *REPRODUCE, "```", ""]
    md = Path(md_path)
    old = md.read_text() if md.exists() else ""
    if "\n## Notes" in old:  # hand-written reading of the figures: kept when the table is regenerated
        lines.append(old[old.index("\n## Notes") + 1 :].rstrip("\n") + "\n")
    md.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


HOW_MEASURED = """## How measured

Each finding gets its own freshly started `optic serve` (the `--python` tree, `--host 127.0.0.1`, default flags
unless the row names one; only flags both trees accept) over a per-finding copy of the same committed model
repository, and the server is killed when the finding is done, so no finding's damage carries into the next.
Memory is VmRSS from `/proc/<pid>/status` (server process and any children summed; peaks sampled every 50 ms;
"idle"/"held" figures once the server's CPU use dropped below 5 % of a core); CPU is utime + stime from
`/proc/<pid>/stat`; fds and threads from `/proc/<pid>/fd` and `Threads:`. The *victim* is a normal client: a
640x480 JPEG `Classify` on a TCP connection of its own (a fresh one per call for findings 2 and 4, so the
listener must accept it), 5 s deadline; p50/max over its OK calls, every other status counted. Per finding:
1 pads each segmenter request's `id` (echoed in the answer) to make 30 MB requests and answers; 3 and 9 run
with `--auth-token-file` (health open, the default) and the attacker sends no token (3 then repeats with it);
4 starts the server with `RLIMIT_NOFILE` 512 (the same on both) and stops opening sockets after 5 refused
connects; 5 waits 130 s for the model added after the stuck one. Attacks are scaled to a 2-core machine shared
with other work (each row gives its scale; the before venv pins opencv-python-headless to the after venv's
version); the figures are one run each, and latencies move with the machine's load (header)."""


REPRODUCE = [
    "git worktree add /tmp/wt-before 3439e6d && cd /tmp/wt-before && python3.11 -m venv .venv \\",
    "    && .venv/bin/pip install -e . && .venv/bin/pip install opencv-python-headless==4.14.0.94  # as the after venv",
    "cp -r /tmp/wt-before/model_repo /tmp/bounds-models  # the committed models, the same for both runs",
    "cd /work/main",
    ".venv/bin/python benchmarks/bounds.py --python /tmp/wt-before/.venv/bin/python --repo /tmp/bounds-models \\",
    "    --out benchmarks/results/bounds-before.json",
    ".venv/bin/python benchmarks/bounds.py --python .venv/bin/python --repo /tmp/bounds-models \\",
    "    --out benchmarks/results/bounds-after.json",
    ".venv/bin/python benchmarks/bounds.py --table benchmarks/results/bounds-before.json \\",
    "    benchmarks/results/bounds-after.json --md benchmarks/results/bounds.md",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--python", help="the interpreter whose optic is the server under test")
    parser.add_argument("--repo", help="model repository to copy models from (each finding copies its own)")
    parser.add_argument("--out", help="JSON file of the figures")
    parser.add_argument("--only", help="comma list of findings to run (e.g. 1,7); others kept from --out")
    parser.add_argument("--table", nargs=2, metavar=("BEFORE_JSON", "AFTER_JSON"), help="write the markdown table")
    parser.add_argument("--md", default="benchmarks/results/bounds.md", help="where --table writes")
    scale = parser.add_argument_group("scale")
    scale.add_argument("--stream-mb", type=float, default=30.0, help="finding 1: size of each stream request")
    scale.add_argument("--stream-requests", type=int, default=80, help="finding 1: requests written at most")
    scale.add_argument("--rss-cap-mb", type=int, default=5000, help="finding 1: stop writing past this server RSS")
    scale.add_argument("--idle-streams", type=int, default=1024, help="finding 2")
    scale.add_argument("--watches", type=int, default=5000, help="finding 3")
    scale.add_argument("--metrics-sockets", type=int, default=600, help="finding 4")
    scale.add_argument("--nofile", type=int, default=512, help="finding 4: the server's RLIMIT_NOFILE")
    scale.add_argument("--load-wait", type=float, default=130.0, help="finding 5: seconds to wait for the new model")
    scale.add_argument("--rle-width", type=int, default=625_000, help="finding 7: striped PNG width (x64)")
    scale.add_argument("--decode-images", type=int, default=64, help="finding 8: 40 Mpx PNGs in the big call")
    scale.add_argument("--heavy-timeout", type=float, default=90.0, help="finding 8: deadline of the big call")
    scale.add_argument("--refused-mb", type=float, default=60.0, help="finding 9: size of each refused request")
    scale.add_argument("--refused-requests", type=int, default=30, help="finding 9")
    scale.add_argument("--cancelled-streams", type=int, default=50, help="finding 10")
    args = parser.parse_args(argv)
    if args.table:
        return table(args.table[0], args.table[1], args.md)
    if not (args.python and args.repo and args.out):
        parser.error("--python, --repo and --out are needed (or --table)")
    if os.sep in args.python:  # servers run in scratch directories: a relative path would not find the venv
        args.python = os.path.abspath(args.python)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: sys.exit(130))
    try:
        return run(args)
    finally:
        for proc in STARTED:
            if proc.poll() is None:
                proc.kill()


if __name__ == "__main__":
    sys.exit(main())
