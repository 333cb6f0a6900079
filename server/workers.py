"""``optic serve --workers N``: N server processes on one port, under a small supervisor.

One Python process is bounded by its interpreter lock: gRPC's Python layer,
the event loop and the per-image glue take a core between them however many
cores the machine has. N processes, each a whole server (its own sessions,
batchers and decode pool), bind the same gRPC port with ``SO_REUSEPORT`` and
the kernel spreads connections (not calls: one connection stays with one
worker) across them.

The supervisor loads no model. It checks the port
is free (``SO_REUSEPORT`` would otherwise let two servers share it by
accident), starts the workers with prometheus-client's multiprocess mode
pointed at a private directory (and one shared-memory registry in it, so a
region registered on one worker can be used on any), serves ``/metrics`` summed over the workers,
restarts a worker that dies (with backoff), forwards SIGTERM/SIGINT so every
worker drains, and exits when they have, with the worst exit status.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
SHM_REGISTRY_ENV = "OPTIC_SHM_REGISTRY"  # the workers' one shared-memory registry (optic.server.shm)
_PR_SET_PDEATHSIG = 1
STARTUP_FAILURE = 2  # a worker that exits with this (bad flags, port taken) is not restarted


MAX_DEFAULT_WORKERS = 8  # the most measured; every worker holds its own models (~1.1 GB with the default ones)


def default_workers(cores: int, gpu: bool = False) -> int:
    """One worker per two cores from four cores up, at most 8; one on a GPU.

    Measured (benchmarks/workers.py, docs/operations.md#worker-processes): on 8 dedicated cores half as many
    workers as cores served 0.82x (classifier) and 0.86x (detector) the throughput of one per core in the same
    round, for half the memory, and leave each worker two onnxruntime threads, which a lone request uses (the
    detector alone runs 1.5x faster on two threads than on one). Below four cores a second worker bought 1.15x
    for twice the memory. Nothing above 8 server cores was measured, hence the cap. On a GPU each worker would
    hold its own CUDA context and arenas and split the batches: not measured, so opt-in.
    """
    if gpu:
        return 1
    return 1 if cores < 4 else min(cores // 2, MAX_DEFAULT_WORKERS)


def port_is_free(host: str, port: int) -> bool:
    """Whether ``port`` can be bound without ``SO_REUSEPORT``, i.e. nothing listens on it now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """A worker gets SIGTERM if the supervisor is killed outright (kill -9): no orphaned servers."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class _Worker:
    index: int
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    backoff: float = 1.0
    restarts: int = 0
    exits: list[int] = field(default_factory=list)


class Supervisor:
    def __init__(self, argv: list[str], workers: int, grace_seconds: float, metrics: tuple[str, int, dict]) -> None:
        """``argv``: the ``optic`` arguments (``serve ...``); each worker gets them plus its own overrides."""
        self.argv = argv
        self.workers = [_Worker(i) for i in range(workers)]
        self.grace = grace_seconds
        self.metrics_host, self.metrics_port, self.metrics_options = metrics
        self.stopping = False
        self.dir = Path(tempfile.mkdtemp(prefix="optic-metrics-"))

    def _start(self, w: _Worker) -> None:
        cmd = [sys.executable, "-m", "optic.server.cli", *self.argv,
               "--workers", "1", "--metrics-port", "0", "--worker-index", str(w.index),
               "--worker-count", str(len(self.workers))]  # fmt: skip
        env = os.environ | {MULTIPROC_ENV: str(self.dir), SHM_REGISTRY_ENV: str(self.dir / "shm-regions")}
        w.proc = subprocess.Popen(cmd, env=env, preexec_fn=_die_with_parent)
        w.started = time.monotonic()
        log.info("worker %d started (pid %d)", w.index, w.proc.pid)

    def _signal_all(self, sig: int) -> None:
        for w in self.workers:
            if w.proc is not None and w.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.send_signal(sig)

    async def run(self) -> int:
        from prometheus_client import CollectorRegistry
        from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

        from optic.server.metrics_http import MetricsServer

        loop = asyncio.get_running_loop()
        stop = asyncio.Event()

        def on_signal() -> None:
            if not self.stopping:
                log.info("stopping: draining %d workers (up to %.0f s)", len(self.workers), self.grace)
            self.stopping = True
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        metrics: MetricsServer | None = None
        if self.metrics_port:
            registry = CollectorRegistry()
            MultiProcessCollector(registry, str(self.dir))
            metrics = MetricsServer(self.metrics_host, self.metrics_port, registry=registry, **self.metrics_options)
            await metrics.start()
        log.info(
            "%d workers; each applies the bounds flags on its own and holds its own models: the memory to allow is "
            "%d x (idle + the worst case each worker logs)",
            len(self.workers),
            len(self.workers),
        )
        for w in self.workers:
            self._start(w)
        failed_start = False
        try:
            while not self.stopping:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.2)
                for w in self.workers:
                    if self.stopping or w.proc is None or w.proc.poll() is None:
                        continue
                    code = w.proc.returncode
                    w.exits.append(code)
                    mark_process_dead(w.proc.pid, str(self.dir))
                    if code == STARTUP_FAILURE and time.monotonic() - w.started < 30:
                        log.error("worker %d could not start (exit %d); stopping", w.index, code)
                        failed_start, self.stopping = True, True
                        break
                    log.warning("worker %d (pid %d) exited with %d; restarting in %.0f s",
                                w.index, w.proc.pid, code, w.backoff)  # fmt: skip
                    await asyncio.sleep(w.backoff)
                    if time.monotonic() - w.started > 60:
                        w.backoff = 1.0  # it ran a while: the next failure is not a crash loop
                    else:
                        w.backoff = min(30.0, w.backoff * 2)
                    w.restarts += 1
                    if not self.stopping:
                        self._start(w)
            self._signal_all(signal.SIGTERM)
            deadline = time.monotonic() + self.grace + 10  # each worker bounds its own drain; this is the backstop
            while any(w.proc is not None and w.proc.poll() is None for w in self.workers):
                if time.monotonic() > deadline:
                    log.error("workers still running %.0f s after SIGTERM; killing them", self.grace + 10)
                    self._signal_all(signal.SIGKILL)
                    break
                await asyncio.sleep(0.1)
        finally:
            if metrics is not None:
                await metrics.close()
            shutil.rmtree(self.dir, ignore_errors=True)
        codes = [w.proc.wait() for w in self.workers if w.proc is not None]
        if failed_start:
            return STARTUP_FAILURE
        return 0 if all(c == 0 for c in codes) else 1


def supervise(argv: list[str], workers: int, grace_seconds: float, metrics: tuple[str, int, dict]) -> int:
    return asyncio.run(Supervisor(argv, workers, grace_seconds, metrics).run())
