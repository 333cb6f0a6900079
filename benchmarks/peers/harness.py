"""The peer benchmark's procedure (``run.py`` is its command line).

For each round, model and system (the systems' order rotates each round): start the server pinned to the
server cores, in a session of its own; wait until it answers; check its answers to eight images against
Optic's; run closed-loop load at each concurrency from this process, pinned to the client cores; stop the
server and every process it started. Per metric, the median over rounds is reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import io
import json
import math
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import loadgen
import numpy as np
import proctree
from common import BATCH_LOG_ENV
from systems import FRAMEWORKS, ROOT, SYSTEMS, Answer, System, compare, system_named

from optic.client.load import server_statistics, synthetic_images

MODELS = ("classifier", "detector")
CHECK_IMAGES = 8
LOAD_IMAGES = 32
IMAGE_SIZE = (480, 640)  # (h, w): what a camera sends


@dataclass
class Options:
    systems: tuple[str, ...] = SYSTEMS
    models: tuple[str, ...] = MODELS
    concurrency: tuple[int, ...] = (1, 64)
    seconds: float = 10.0
    warmup: float = 3.0
    rounds: int = 3
    images: str = "synthetic"  # synthetic | scenes
    server_cores: str = "0"
    client_cores: str = "1"
    start_timeout: float = 180.0
    optic_args: tuple[str, ...] = ()
    quick: bool = False
    out: Path = ROOT / "benchmarks" / "results" / "peers"


@dataclass
class Cell:
    """Everything measured for one system and model, over all rounds."""

    system: str
    model: str
    status: str = "pending"  # measured | excluded (answers differ) | failed (did not start, or broke)
    reason: str = ""
    start_s: list[float] = field(default_factory=list)  # until the first real answer
    stop_s: list[float] = field(default_factory=list)  # until no process of the server was left
    rounds: dict[int, list[dict[str, Any]]] = field(default_factory=dict)  # concurrency -> one result per round
    leftover_processes: list[str] = field(default_factory=list)
    affinity: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- images


def jpeg(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def scene_images(count: int, seed: int = 7) -> list[bytes]:
    """Scenes of the models' own training distribution, 640x480: the detector finds shapes in these (it finds
    none in ``synthetic_images``), so they exercise box decoding, NMS and the mapping back to pixels."""
    from PIL import Image

    from optic.export.data import make_scenes

    h, w = IMAGE_SIZE
    out = []
    for s in make_scenes(count, seed=seed, size=160):
        img = Image.fromarray(s.image).resize((w, h), Image.Resampling.BILINEAR)
        out.append(jpeg(np.asarray(img)))
    return out


def check_images() -> list[bytes]:
    """Four of the load's synthetic images and four scenes with shapes the detector finds."""
    half = CHECK_IMAGES // 2
    return synthetic_images(half, IMAGE_SIZE) + scene_images(CHECK_IMAGES - half)


def load_images(kind: str) -> list[bytes]:
    return synthetic_images(LOAD_IMAGES, IMAGE_SIZE) if kind == "synthetic" else scene_images(LOAD_IMAGES, seed=11)


# ---------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    system: System
    model: str
    port: int
    proc: subprocess.Popen
    tag: str
    log: Path
    batch_log: Path  # peers append each batch's size here (common.BATCH_LOG_ENV)

    def batches(self) -> tuple[int, int]:
        """(batches run, images in them) so far: Optic's own KServe statistics, the peers' batch log."""
        if self.system.name == "optic":
            stats = server_statistics(f"127.0.0.1:{self.port}", self.model) or {}
            return sum(s["execution_count"] for s in stats.values()), sum(s["inference_count"] for s in stats.values())
        try:
            sizes = [int(n) for n in self.batch_log.read_text().split()]
        except OSError:
            return 0, 0
        return len(sizes), sum(sizes)

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@contextlib.contextmanager
def serving(system: System, model: str, opts: Options, scratch: Path, cell: Cell) -> Iterator[Server]:
    """A started server, pinned and in its own session; on exit it and every process it made are stopped."""
    port = free_port()
    tag = uuid.uuid4().hex
    log = scratch / f"{system.name}-{model}-{port}.log"
    batch_log = scratch / f"{system.name}-{model}-{port}.batches"
    env = os.environ | system.env(model, scratch) | {proctree.MARKER: tag, "PYTHONUNBUFFERED": "1"}
    env[BATCH_LOG_ENV] = str(batch_log)
    # The same numpy/OpenMP thread caps for everyone: one core is all a server gets.
    env |= {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = ["taskset", "-c", opts.server_cores, *system.command(model, port, opts.optic_args)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    server = Server(system, model, port, proc, tag, log, batch_log)
    try:
        yield server
    finally:
        stopping = time.monotonic()
        left = proctree.stop(proc.pid, tag, signum=system.stop_signal)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        cell.stop_s.append(round(time.monotonic() - stopping, 2))
        if left:
            cell.leftover_processes.extend(left)
            print(f"  warning: {system.name} left processes that would not die: {', '.join(left)}", file=sys.stderr)


async def wait_ready(server: Server, probe: bytes, timeout: float) -> float:
    """Seconds until the server answered a real request (not only a health check)."""
    started = time.monotonic()
    transport = server.system.transport_for(server.model, server.port)
    transport.timeout_s = 10.0
    while time.monotonic() - started < timeout:
        if server.proc.poll() is not None:
            raise RuntimeError(f"exited with status {server.proc.returncode}:\n{server.log_tail()}")
        send = await transport.open(1, [probe])
        try:
            status, _ = await send(0)
        finally:
            await transport.close()
        if status == "OK":
            return time.monotonic() - started
        await asyncio.sleep(0.5)
    raise RuntimeError(f"not answering after {timeout:.0f} s:\n{server.log_tail()}")


async def answers(server: Server, images: list[bytes]) -> list[Answer]:
    """The server's answers to ``images``, one request each, in the common plain form."""
    transport = server.system.transport_for(server.model, server.port)
    send = await transport.open(1, [server.system.payload(server.model, b) for b in images])
    try:
        out = []
        for i in range(len(images)):
            status, body = await send(i)
            if status != "OK":
                raise RuntimeError(f"image {i}: {status} {body[:200]!r}")
            out.append(server.system.answer(server.model, body))
        return out
    finally:
        await transport.close()


def affinity_of(server: Server) -> list[str]:
    """Each process of the server with the cores its threads may run on, to show that the pinning held.

    Threads, not only processes: a thread pool may pin its own threads (onnxruntime does, when left to choose
    its thread count), and a thread on the client's core would blur both sides' figures.
    """
    out = []
    for pid, s in sorted(proctree.living(server.proc.pid, server.tag).items()):
        cores: set[str] = set()
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/status") as f:
                    cores.update(line.split()[1] for line in f if line.startswith("Cpus_allowed_list"))
        out.append(f"{s.name}:{'|'.join(sorted(cores))}")
    return out


# ---------------------------------------------------------------- the procedure


async def references(opts: Options, images: list[bytes], scratch: Path) -> dict[str, list[Answer]]:
    """Optic's answers to the check images, per model, from a server of its own."""
    optic = system_named("optic")
    out = {}
    for model in opts.models:
        cell = Cell("optic", model)
        with serving(optic, model, opts, scratch, cell) as server:
            await wait_ready(server, optic.payload(model, images[0]), opts.start_timeout)
            out[model] = await answers(server, images)
        print(f"reference: Optic {model}: {sum(len(a) for a in out[model])} results for {len(images)} images")
    return out


def pipeline_matches(model: str, images: list[bytes], reference: list[Answer]) -> str:
    """Whether ``common.Pipeline`` in this process gives Optic's answers ('' when it does): a difference here
    is in the shared code, not in any framework."""
    from common import Pipeline

    got = Pipeline(model).run_batch(images)
    return compare(reference, got)


async def run_cell(
    system: System, model: str, opts: Options, cell: Cell, reference: list[Answer], images: list[bytes],
    load: list[bytes], scratch: Path,
) -> None:  # fmt: skip
    """One start of one system: ready, checked, then measured at each concurrency; a failure marks the cell."""
    with serving(system, model, opts, scratch, cell) as server:
        try:
            ready = await wait_ready(server, system.payload(model, images[0]), opts.start_timeout)
            cell.start_s.append(round(ready, 2))
        except RuntimeError as exc:
            cell.status, cell.reason = "failed", f"did not start: {exc}"
            return
        if not cell.affinity:
            cell.affinity = affinity_of(server)
            stray = [a for a in cell.affinity if a.rsplit(":", 1)[1] != opts.server_cores]
            if stray:
                print(f"  warning: {system.name} threads not confined to cores {opts.server_cores}: {stray}")
        try:
            diff = compare(reference, await answers(server, images))
        except Exception as exc:  # a malformed answer is a disagreement too
            diff = f"{type(exc).__name__}: {exc}"
        if diff:
            cell.status, cell.reason = "excluded", f"answers differ from Optic's: {diff}"
            return
        payloads = [system.payload(model, b) for b in load]
        for c in opts.concurrency:
            r = await loadgen.closed_loop(
                system.transport_for(model, server.port), payloads, c, opts.warmup, opts.seconds,
                server.proc.pid, server.tag, server.batches,
            )  # fmt: skip
            cell.rounds.setdefault(c, []).append(asdict(r))
            lat = r.latency_ms
            errs = f", errors {r.errors}" if r.errors else ""
            print(
                f"  {system.name:9s} {model:10s} c={c:<3d} {r.throughput:8.1f} img/s"
                f"  p50 {lat.get('p50', math.nan):7.2f}  p99 {lat.get('p99', math.nan):7.2f} ms"
                f"  server {r.server_cpu_ms_per_image:6.2f} CPU-ms/img ({r.server_cores:.2f} cores)"
                f"  client {r.client_cores:.2f}  others {r.other_cores:.2f} cores  batch {r.mean_batch_size:.1f}{errs}",
                flush=True,
            )


def median_of(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per metric, the median over rounds; errors are summed."""

    def med(values: list[float]) -> float:
        values = [v for v in values if not math.isnan(v)]
        return statistics.median(values) if values else math.nan

    errors: dict[str, int] = {}
    for r in results:
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
    keys = ("throughput", "server_cpu_ms_per_image", "server_cores", "client_cores", "other_cores", "mean_batch_size")
    out: dict[str, Any] = {k: med([r[k] for r in results]) for k in keys}
    out["latency_ms"] = {q: med([r["latency_ms"].get(q, math.nan) for r in results]) for q in ("p50", "p90", "p99")}
    out["answered"] = sum(r["answered"] for r in results)
    out["errors"] = errors
    return out


def run(opts: Options) -> dict[str, Any]:
    """The whole benchmark; returns what ``peers.json`` holds."""
    os.sched_setaffinity(0, {int(c) for c in opts.client_cores.split(",")})
    started = dt.datetime.now(dt.timezone.utc)
    load_before = os.getloadavg()
    scratch = Path(tempfile.mkdtemp(prefix="optic-peers-"))  # server logs; BentoML's home
    cells = {(s, m): Cell(s, m) for m in opts.models for s in opts.systems}
    shared = asyncio.run(_rounds(opts, cells, scratch))
    for cell in cells.values():
        if cell.status == "pending" and cell.rounds:
            cell.status = "measured"
    if all(c.status == "measured" and not c.leftover_processes for c in cells.values()):
        shutil.rmtree(scratch, ignore_errors=True)
    else:
        print(f"server logs kept in {scratch}", file=sys.stderr)
    results = []
    for cell in cells.values():
        entry = {k: v for k, v in asdict(cell).items() if k != "rounds"}
        entry["by_concurrency"] = {
            str(c): {"median": median_of(rs), "rounds": rs} for c, rs in sorted(cell.rounds.items())
        }
        results.append(entry)
    return {
        "quick": opts.quick,
        "date": started.isoformat(timespec="seconds"),
        "duration_s": round((dt.datetime.now(dt.timezone.utc) - started).total_seconds(), 1),
        "machine": machine(load_before),
        "versions": versions(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()},
        "shared_pipeline_matches_optic": {m: not d for m, d in shared.items()},
        "results": results,
        "goal": goal(results, opts),
    }


async def _rounds(opts: Options, cells: dict[tuple[str, str], Cell], scratch: Path) -> dict[str, str]:
    """References first, then every round; returns, per model, how common.Pipeline compares with Optic."""
    images = check_images()
    load = load_images(opts.images)
    refs = await references(opts, images, scratch)
    shared = {m: pipeline_matches(m, images, refs[m]) for m in opts.models}
    for m, diff in shared.items():
        print(f"common.Pipeline in-process vs Optic, {m}: {diff or 'equal'}")
    for rnd in range(opts.rounds):
        k = rnd % len(opts.systems)
        order = opts.systems[k:] + opts.systems[:k]
        print(f"round {rnd + 1}/{opts.rounds}: {', '.join(order)}", flush=True)
        for model in opts.models:
            for name in order:
                cell = cells[(name, model)]
                if cell.status != "pending":
                    continue
                try:
                    await run_cell(system_named(name), model, opts, cell, refs[model], images, load, scratch)
                except Exception as exc:
                    cell.status, cell.reason = "failed", f"{type(exc).__name__}: {exc}"
                if cell.status != "pending":
                    print(f"  {name:9s} {model:10s} {cell.status}: {cell.reason}", flush=True)
    return shared


# ---------------------------------------------------------------- context


def machine(load_before: tuple[float, float, float]) -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    return {
        "cpu_model": model,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
    }


def versions() -> dict[str, Any]:
    """Versions in the peers' venv, in Optic's own venv (what ``optic serve`` runs), and Optic's commit."""
    names = ("litserve", "bentoml", "ray", "fastapi", "uvicorn", "starlette", "aiohttp", "grpcio", "protobuf",
             "numpy", "pillow", "onnxruntime", "opencv-python-headless")  # fmt: skip
    peers = {}
    for n in names:
        with contextlib.suppress(metadata.PackageNotFoundError):
            peers[n] = metadata.version(n)
    optic_venv: dict[str, str] = {}
    script = "import importlib.metadata as m, json, sys; print(json.dumps({n: m.version(n) for n in sys.argv[1:]}))"
    with contextlib.suppress(OSError, subprocess.CalledProcessError, json.JSONDecodeError):
        optic_venv = json.loads(
            subprocess.run(
                [str(ROOT / ".venv" / "bin" / "python"), "-c", script, "optic", "grpcio", "protobuf", "numpy",
                 "pillow", "onnxruntime", "opencv-python-headless"],
                capture_output=True, text=True, check=True,
            ).stdout
        )  # fmt: skip
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout)
    return {"peers_venv": peers, "optic_venv": optic_venv, "optic_commit": commit, "optic_tree_dirty": dirty}


# ---------------------------------------------------------------- the goal


def goal(results: list[dict[str, Any]], opts: Options) -> dict[str, Any]:
    """Optic against the best framework on each metric: throughput at the highest concurrency (>= 1.5x), p50 at
    the lowest (<= 0.8x), server CPU per image at the highest (<= 0.7x). The plain grpcio server is not a
    framework: it is measured as the floor, not compared with."""
    lo, hi = str(min(opts.concurrency)), str(max(opts.concurrency))
    out: dict[str, Any] = {}
    for model in opts.models:
        rows = {r["system"]: r for r in results if r["model"] == model and r["status"] == "measured"}
        optic, peers = rows.get("optic"), {k: v for k, v in rows.items() if k in FRAMEWORKS}
        floor = rows.get("grpcio")
        if optic is None or not peers:
            out[model] = {"evaluated": False, "why": "needs Optic and at least one measured peer"}
            continue

        def metric(row: dict[str, Any], c: str, key: str) -> float:
            m = row["by_concurrency"][c]["median"]
            return float(m["latency_ms"]["p50"]) if key == "p50" else float(m[key])

        checks = {}
        for name, c, key, better, bound in (
            (f"throughput_c{hi}", hi, "throughput", max, (">=", 1.5)),
            (f"p50_c{lo}", lo, "p50", min, ("<=", 0.8)),
            (f"cpu_ms_per_image_c{hi}", hi, "server_cpu_ms_per_image", min, ("<=", 0.7)),
        ):
            best_peer = better(peers, key=lambda p, c=c, key=key: metric(peers[p], c, key))
            ratio = metric(optic, c, key) / metric(peers[best_peer], c, key)
            ok = ratio >= bound[1] if bound[0] == ">=" else ratio <= bound[1]
            checks[name] = {"best_peer": best_peer, "ratio": round(ratio, 3), "target": f"{bound[0]} {bound[1]}",
                            "met": ok}  # fmt: skip
            if floor is not None:  # the same ratio for a server with no features: how far any server could go
                checks[name]["floor_ratio"] = round(metric(floor, c, key) / metric(peers[best_peer], c, key), 3)
        out[model] = {"evaluated": True, **checks}
    return out
