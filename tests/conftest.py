"""A real `optic serve` process on loopback ports, over the committed model repository.

The server runs in its own process (as in production) so that the tests can
use the stock tritonclient, whose generated `inference` protobuf module
cannot share a process with the server's.
"""

from __future__ import annotations

import io
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
MODEL_REPO = ROOT / "model_repo"


def input_side(name: str) -> int:
    """The square input side a committed model declares (its tensors are [N, 3, side, side])."""
    import onnx

    from optic.server.metadata import ModelMeta

    model = onnx.load(str(MODEL_REPO / name / "1" / "model.onnx"), load_external_data=False)
    meta = ModelMeta.from_props({p.key: p.value for p in model.metadata_props})
    assert meta.input is not None and meta.input.size[0] == meta.input.size[1], meta.input
    return meta.input.size[0]


SIDE = input_side("classifier")  # the committed classifier's input: KServe tests build [N, 3, SIDE, SIDE] tensors


def scrape(url: str) -> str:
    """A server's (or supervisor's) /metrics text."""
    return urllib.request.urlopen(url, timeout=10).read().decode()


def metric_values(text: str, sample: str, **labels: str) -> list[float]:
    """The values /metrics ``text`` gives the samples named ``sample`` whose labels include ``labels``, read with
    prometheus-client's own parser (the one way the tests read metrics)."""
    return [
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
    ]


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


_PORTS = random.Random()  # its own generator: a test that seeds ``random`` must not make the picks repeat


def free_port() -> int:
    """A loopback port free now, from below the kernel's ephemeral range.

    A port that ``bind(0)`` hands out is ephemeral: in the second it takes the server to start, any outgoing
    connection (a test's own client included) may take it as its source port, and the server's bind fails.
    That happened in CI. Ports below the range are never handed out that way, so only another listener can
    take one, and :func:`start_server` retries that case.
    """
    low, _ = _ephemeral_range()
    for _ in range(200 if low > 2048 else 0):  # no room below a range that starts low: the kernel's choice
        port = _PORTS.randrange(max(1024, low - 12000), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningServer:
    proc: subprocess.Popen
    grpc_port: int
    metrics_port: int
    log_path: Path
    health_port: int = 0  # the plaintext health-only port, when the main one needs TLS or a token

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def health(self, service: str = "") -> int:
        url = f"127.0.0.1:{self.health_port}" if self.health_port else self.url
        with grpc.insecure_channel(url) as ch:
            return (
                health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
            )

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)


def start_server(log_dir: Path, *extra: str, repo: Path = MODEL_REPO, health_port: bool = False) -> RunningServer:
    """``health_port``: also open the plaintext health-only port and wait on it (for TLS or token servers).

    A port taken between the pick and the server's bind (the server exits 2 saying so) is picked again, up to
    three times; any other exit is the test's failure.
    """
    for _ in range(2):
        try:
            return _start_server(log_dir, extra, repo, health_port)
        except PortTaken:
            pass
    return _start_server(log_dir, extra, repo, health_port)


class PortTaken(RuntimeError):
    pass


def _start_server(log_dir: Path, extra: tuple[str, ...], repo: Path, health_port: bool) -> RunningServer:
    ports: list[int] = []
    while len(ports) < 2 + health_port:  # distinct: a pick is free only until the server binds it
        if (port := free_port()) not in ports:
            ports.append(port)
    grpc_port, metrics_port = ports[:2]
    hp = ports[2] if health_port else 0
    log_path = log_dir / f"server-{grpc_port}.log"
    cmd = [
        sys.executable,
        "-m",
        "optic.server.cli",
        "serve",
        "--model-repo",
        str(repo),
        "--host",
        "127.0.0.1",
        "--grpc-port",
        str(grpc_port),
        "--metrics-port",
        str(metrics_port),
        "--metrics-host",
        "127.0.0.1",
        *(["--health-port", str(hp)] if hp else []),
        # One process whatever the machine's cores, so tests that look at the server's process see the server;
        # tests of --workers pass their own (the last flag wins).
        "--workers",
        "1",
        *extra,
    ]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
    server = RunningServer(proc, grpc_port, metrics_port, log_path, hp)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log = server.log()
            taken = "cannot listen on" in log and "in use" in log
            kind = PortTaken if proc.returncode == 2 and taken else RuntimeError
            raise kind(f"optic serve exited with {proc.returncode}:\n{log}")
        try:
            if server.health() == health_pb2.HealthCheckResponse.SERVING:
                return server
        except grpc.RpcError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"optic serve did not become SERVING in time:\n{server.log()}")


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    # A fixed window longer than the default makes batching under concurrency certain.
    srv = start_server(
        tmp_path_factory.mktemp("server"),
        "--max-queue-delay-ms",
        "20",
        "--max-batch-size",
        "32",
        "--batch-window",
        "fixed",
    )
    yield srv
    assert srv.stop() == 0, srv.log()


def encode(image: np.ndarray, fmt: str = "PNG", **kwargs: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, fmt, **kwargs)
    return buf.getvalue()


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of (N, 4) and (M, 4) xyxy boxes -> (N, M)."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(2)
    area_a = np.clip(a[:, 2:] - a[:, :2], 0, None).prod(1)
    area_b = np.clip(b[:, 2:] - b[:, :2], 0, None).prod(1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)
