"""Closed-loop load, on asyncio: N callers, each sending its next request when the last is answered.

Requests are built once, up front (serialised protobuf for Optic, finished HTTP bodies for the peers), so
the client spends its core on the transport only. Answers are read but not parsed while timing. A run is a
warm-up, then a measured window: only requests *answered* inside the window count, throughput is successful
answers per second of window, and the server's CPU is sampled at the window's two edges.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import aiohttp
import grpc
import numpy as np
import proctree

Send = Callable[[int], Awaitable[tuple[str, bytes]]]  # request index -> (status, body); "OK" when answered
Batches = Callable[[], tuple[int, int]]  # the server's (batches run, images in them) so far


@dataclass
class Transport:
    """How to reach one server: ``open`` makes a sender for a concurrency, ``close`` releases it."""

    kind: str  # "grpc" | "http"
    target: str  # host:port (gRPC) or URL (HTTP)
    method: str = ""  # gRPC method path
    headers: dict[str, str] = field(default_factory=dict)  # HTTP
    timeout_s: float = 60.0
    _close: Callable[[], Awaitable[None]] | None = None

    async def open(self, concurrency: int, payloads: Sequence[bytes]) -> Send:
        if self.kind == "grpc":
            return await self._open_grpc(payloads)
        return await self._open_http(concurrency, payloads)

    async def close(self) -> None:
        if self._close is not None:
            await self._close()
            self._close = None

    async def _open_grpc(self, payloads: Sequence[bytes]) -> Send:
        options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
        channel = grpc.aio.insecure_channel(self.target, options=options)
        call = channel.unary_unary(self.method)  # bytes in, bytes out: no (de)serialisation in the client
        self._close = channel.close

        async def send(i: int) -> tuple[str, bytes]:
            try:
                body = await call(payloads[i % len(payloads)], timeout=self.timeout_s)
            except grpc.aio.AioRpcError as exc:
                return exc.code().name, b""
            return "OK", body

        return send

    async def _open_http(self, concurrency: int, payloads: Sequence[bytes]) -> Send:
        # A pool as large as the concurrency: every caller keeps its own connection alive.
        connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency, keepalive_timeout=60)
        session = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=self.timeout_s), headers=self.headers
        )
        self._close = session.close

        async def send(i: int) -> tuple[str, bytes]:
            try:
                async with session.post(self.target, data=payloads[i % len(payloads)]) as resp:
                    body = await resp.read()
                    return ("OK" if resp.status == 200 else f"HTTP_{resp.status}"), body
            except TimeoutError:
                return "TIMEOUT", b""
            except aiohttp.ClientError as exc:
                return type(exc).__name__, b""

        return send


@dataclass
class RunResult:
    concurrency: int
    window_s: float
    answered: int  # successful answers inside the window
    throughput: float  # answered / window_s
    latency_ms: dict[str, float]  # of the successful answers inside the window
    errors: dict[str, int]  # failures inside the window, by kind
    server_cpu_s: float
    server_cpu_ms_per_image: float
    server_cores: float  # server CPU seconds per second of window
    client_cores: float  # this process (the load generator), the same way
    other_cores: float  # everything else on the machine: other people's work, in the same window
    server_cpu_by_process: dict[str, float]  # CPU seconds by process name
    mean_batch_size: float  # images per model run inside the window, as the server counts them


def _machine_busy_s() -> float:
    """CPU seconds spent by the whole machine so far (all cores, everything but idle and iowait)."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return (sum(values[:8]) - idle) / proctree.TICKS


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


async def closed_loop(
    transport: Transport,
    payloads: Sequence[bytes],
    concurrency: int,
    warmup_s: float,
    seconds: float,
    server_pid: int,
    tag: str,
    batches: Batches | None = None,
) -> RunResult:
    """``concurrency`` callers for ``warmup_s`` + ``seconds``; the second part is measured."""
    send = await transport.open(concurrency, payloads)
    done: list[tuple[float, float, str]] = []  # (sent, answered, status)
    stop_at = float("inf")

    async def caller(k: int) -> None:
        i = k * 7919  # callers walk the images from different places
        while time.monotonic() < stop_at:
            sent = time.monotonic()
            status, _ = await send(i)
            done.append((sent, time.monotonic(), status))
            i += 1

    try:
        start = time.monotonic()
        stop_at = start + warmup_s + seconds + 3600.0  # set exactly below, once the window has begun
        tasks = [asyncio.ensure_future(caller(k)) for k in range(concurrency)]
        await asyncio.sleep(max(0.0, start + warmup_s - time.monotonic()))
        cpu0, own0, busy0 = proctree.sample(server_pid, tag), _own_cpu_s(), _machine_busy_s()
        batch0 = batches() if batches else (0, 0)
        window_start = time.monotonic()
        stop_at = window_start + seconds
        await asyncio.sleep(max(0.0, stop_at - time.monotonic()))
        cpu1, own1, busy1 = proctree.sample(server_pid, tag), _own_cpu_s(), _machine_busy_s()
        batch1 = batches() if batches else (0, 0)
        window_end = time.monotonic()
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=transport.timeout_s + 10)
    finally:
        await transport.close()
    window = window_end - window_start
    inside = [(s, a, st) for s, a, st in done if window_start <= a <= window_end]
    ok = np.array([(a - s) * 1e3 for s, a, st in inside if st == "OK"])
    errors: dict[str, int] = {}
    for _, _, st in inside:
        if st != "OK":
            errors[st] = errors.get(st, 0) + 1
    server_cpu, by_name = proctree.cpu_delta(cpu0, cpu1)
    own = own1 - own0
    runs, images = batch1[0] - batch0[0], batch1[1] - batch0[1]
    latency = (
        {q: float(np.percentile(ok, int(q[1:]))) for q in ("p50", "p90", "p99")} | {"mean": float(ok.mean())}
        if len(ok)
        else {}
    )
    return RunResult(
        concurrency=concurrency,
        window_s=window,
        answered=len(ok),
        throughput=len(ok) / window,
        latency_ms=latency,
        errors=errors,
        server_cpu_s=server_cpu,
        server_cpu_ms_per_image=server_cpu * 1e3 / len(ok) if len(ok) else float("nan"),
        server_cores=server_cpu / window,
        client_cores=own / window,
        other_cores=max(0.0, (busy1 - busy0) - server_cpu - own) / window,
        server_cpu_by_process={k: round(v, 4) for k, v in sorted(by_name.items(), key=lambda kv: -kv[1]) if v > 0},
        mean_batch_size=images / runs if runs > 0 else float("nan"),
    )
