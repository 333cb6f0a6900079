"""``optic serve --workers N``: processes sharing the port, metrics summed, crashes restarted, one drain."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np

from optic.proto.optic.v1 import vision_pb2 as pb
from optic.proto.optic.v1 import vision_pb2_grpc as pb_grpc
from tests.conftest import MODEL_REPO, ROOT, encode, free_port, metric_values, scrape, start_server

IMAGE = encode(np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8), "JPEG")


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def classify_over_new_connections(url: str, connections: int, per_connection: int) -> int:
    done = 0
    for _ in range(connections):
        # A channel of its own (no shared subchannel): a new TCP connection, which the kernel may give to any worker.
        with grpc.insecure_channel(url, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
            stub = pb_grpc.VisionStub(ch)
            for _ in range(per_connection):
                stub.Classify(pb.ClassifyRequest(model="classifier", image=pb.Image(data=IMAGE)), timeout=20)
                done += 1
    return done


def metric(url: str, name: str, **labels: str) -> float:
    return sum(metric_values(scrape(url), name, **labels))


def wait_for(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def test_workers_share_the_port_sum_their_metrics_restart_and_drain(tmp_path):
    srv = start_server(tmp_path, "--workers", "2", "--grace-seconds", "5")
    try:
        assert wait_for(lambda: len(children(srv.proc.pid)) == 2, 30)
        workers = children(srv.proc.pid)
        assert wait_for(lambda: srv.health() == 1 and "serving" in srv.log().split("[worker 1]")[-1], 60)
        time.sleep(1)
        before = {w: cpu_seconds(w) for w in workers}
        calls = classify_over_new_connections(srv.url, 24, 4)
        used = {w: cpu_seconds(w) - before[w] for w in workers}
        assert all(u > 0.05 for u in used.values()), f"a worker served nothing: CPU seconds {used}"
        metrics_url = f"http://127.0.0.1:{srv.metrics_port}/metrics"
        assert metric(metrics_url, "optic_requests_total", code="OK", method="Classify") == calls
        assert metric(metrics_url, "optic_model_ready", model="classifier") == 1.0

        os.kill(workers[0], signal.SIGKILL)  # a crash: the supervisor starts a new worker
        assert wait_for(lambda: len(children(srv.proc.pid)) == 2 and workers[0] not in children(srv.proc.pid), 30)
        assert "exited with -9; restarting" in srv.log()
        assert wait_for(lambda: srv.log().count("serving captioner") >= 3, 60)
        assert classify_over_new_connections(srv.url, 8, 1) == 8

        survivors = children(srv.proc.pid)
        started = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(timeout=30) == 0, srv.log()
        assert time.monotonic() - started < 5 + 10
        assert not [p for p in survivors if Path(f"/proc/{p}").exists() and "zombie" not in _state(p)]
        assert srv.log().count("optic.server.app: stopped") >= 2
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:", 1)[1].split("\n", 1)[0].lower()
    except OSError:
        return "gone"


def serve(*flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "optic.server.cli", "serve", "--model-repo", str(MODEL_REPO), "--metrics-port", "0",
         *flags],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip


def test_workers_refuse_a_taken_port_and_port_0(tmp_path):
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        done = serve("--host", "127.0.0.1", "--grpc-port", str(port), "--workers", "2")
    assert done.returncode == 2 and "in use" in done.stderr, done.stderr
    done = serve("--grpc-port", "0", "--workers", "2")
    assert done.returncode == 2 and "--workers needs a fixed --grpc-port" in done.stderr, done.stderr


def test_default_workers_follow_the_cores():
    from optic.server.workers import default_workers

    assert [default_workers(c) for c in (1, 2, 3, 4, 8, 16, 64)] == [1, 1, 1, 2, 4, 8, 8]
    assert [default_workers(c, gpu=True) for c in (1, 4, 16)] == [1, 1, 1]


def test_the_default_worker_count_follows_cores_and_device(monkeypatch):
    """What ``--workers 0`` starts: half the cores on CPU, one process on a GPU (the GPU is mocked: none here).
    Nothing is served: the supervisor and the single-process server are replaced by recorders."""
    from optic.server import app, cli, runtime

    started: list[tuple[str, int]] = []

    def single(config: object) -> None:
        started.append(("single", 1))
        raise app.StartupError("recorded")  # returns before the exit timer a drained server would set

    monkeypatch.setattr(cli, "default_threads", lambda: 8)
    monkeypatch.setattr(cli, "_supervise", lambda args, config, workers: started.append(("supervisor", workers)) or 0)
    monkeypatch.setattr(app, "run", single)
    argv = ["serve", "--model-repo", str(MODEL_REPO), "--grpc-port", "18001", "--metrics-port", "0"]
    assert cli.main([*argv, "--device", "cpu"]) == 0
    gpu = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(runtime.ort, "get_available_providers", lambda: gpu)
    assert cli.main([*argv, "--device", "cuda"]) == 2
    assert cli.main([*argv, "--device", "auto"]) == 2
    assert cli.main([*argv, "--device", "cuda", "--workers", "3"]) == 0
    assert started == [("supervisor", 4), ("single", 1), ("single", 1), ("supervisor", 3)]
