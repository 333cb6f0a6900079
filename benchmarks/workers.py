"""Throughput of ``optic serve --workers N`` against the cores it is given: the measurement behind
``default_workers`` (server/workers.py).

For each server core count C (the server pinned to the first C cores, the load generator to the others) and
each worker count N in {1, 2, 4, …, C}, this starts ``optic serve --workers N`` with only the measured models
loaded, waits until every worker has loaded and warmed up (the process tree goes idle), and runs
``optic bench`` (Vision API, 640x480 JPEGs, closed loop) from ``--connections`` load processes. Each load
process is one TCP connection, and ``SO_REUSEPORT`` spreads connections, not calls, over the workers: a single
client channel would keep N-1 workers idle, so the load uses many (32 connections leave a worker of 8 without
one about once in ten runs). Rounds rotate the order of N. Prints a table and writes JSON: img/s, p50/p99,
the server's busy cores over the middle of the measured window, each N's throughput over N=1's in the same
round, and the server's RSS (all its processes) once warmed up.

    .venv/bin/python benchmarks/workers.py --cores 2,4,8 --load-cores 8-15 --out benchmarks/results/workers.json
    .venv/bin/python benchmarks/workers.py --cores 1 --load-cores 1 --seconds 3 --rounds 1   # a smoke run here

Needs at least max(C) + 1 cores. On a 2-core machine only C=1 fits, which says nothing about the rule.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bounds import Env, Server  # noqa: E402
from benchmarks.suite import TASK_OF  # noqa: E402
from optic.client import bench, load  # noqa: E402
from optic.server.workers import default_workers  # noqa: E402


def cpu_list(spec: str) -> list[int]:
    """``taskset``-style list: ``0-3,8``."""
    cores: list[int] = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        cores += range(int(lo), int(hi or lo) + 1)
    return cores


def worker_counts(cores: int) -> list[int]:
    counts, n = [], 1
    while n <= cores:
        counts.append(n)
        n *= 2
    if counts[-1] != cores:
        counts.append(cores)
    return counts


def start(
    repo: Path, models: list[str], cores: list[int], workers: int, log_dir: Path, extra: list[str] | None = None
) -> Server:
    """``optic serve --workers N`` pinned to ``cores``, once every worker has warmed up."""
    flags = ["--log-level", "WARNING", "--workers", str(workers), "--model-control-mode", "explicit", *(extra or [])]
    for model in models:
        flags += ["--load-model", model]
    server = Env(sys.executable, repo, log_dir).start(repo, *flags, cores=cores)
    # One worker answering says nothing of the others: they are ready when the whole tree stops loading.
    server.settle(seconds=1.5)
    if server.proc.poll() is not None:
        raise RuntimeError(f"optic serve exited with {server.proc.returncode}:\n{server.log()[-2000:]}")
    return server


def busy_cores(server: Server, begin: float, end: float, out: dict[str, float]) -> None:
    """The server's CPU seconds per second between the monotonic times ``begin`` and ``end``."""
    time.sleep(max(0.0, begin - time.monotonic()))
    cpu0, t0 = server.cpu_s(), time.monotonic()
    time.sleep(max(0.0, end - time.monotonic()))
    out["busy_cores"] = (server.cpu_s() - cpu0) / (time.monotonic() - t0)


def measure(server: Server, args: argparse.Namespace, model: str, payloads: tuple[str, list[bytes]]) -> dict:
    config = bench.BenchConfig(
        url=server.url, api="vision", model=model, concurrency=args.concurrency, duration=args.seconds,
        warmup=args.warmup, workers=args.connections, progress=False,
    )  # fmt: skip
    # bench.run starts its load 3 s after it is called (spawned processes); sample the middle of the window.
    begin = time.monotonic() + 3.0 + args.warmup + 0.2 * args.seconds
    cpu: dict[str, float] = {}
    sampler = threading.Thread(target=busy_cores, args=(server, begin, begin + 0.6 * args.seconds, cpu))
    sampler.start()
    result = bench.run(config, payloads)
    sampler.join()
    if bench.error_rate(result) > 0:
        raise SystemExit(f"{model}: requests failed ({result.errors}): the figures would mean nothing")
    img_s = result.throughput_rps
    return {
        "img_s": img_s,
        "p50_ms": result.latency_ms["p50"],
        "p99_ms": result.latency_ms["p99"],
        "busy_cores": cpu.get("busy_cores", 0.0),
        "cpu_ms_per_image": 1000 * cpu.get("busy_cores", 0.0) / img_s if img_s else 0.0,
    }


def run(args: argparse.Namespace) -> dict:
    load_cores = cpu_list(args.load_cores)
    all_cores = sorted(os.sched_getaffinity(0))
    plans = {c: worker_counts(c) for c in (int(v) for v in args.cores.split(","))}
    for c in plans:
        server_cores = all_cores[:c]
        if set(server_cores) & set(load_cores):
            raise SystemExit(f"--cores {c} overlaps --load-cores {args.load_cores}")
    os.sched_setaffinity(0, load_cores)  # this process and the load processes it spawns
    models = args.models.split(",")
    payloads = {
        m: load.payloads(bench.BenchConfig(url="", api="vision", model=m, task=TASK_OF[m])) for m in models
    }  # built once: the JPEGs are the same for every run
    runs: list[dict[str, Any]] = []
    log_dir = Path(tempfile.mkdtemp(prefix="optic-workers-"))
    for rnd in range(args.rounds):
        for cores, counts in plans.items():
            order = counts[rnd % len(counts) :] + counts[: rnd % len(counts)]
            for n in order:
                server = start(args.model_repo, models, all_cores[:cores], n, log_dir)
                rss_mb = server.rss_mb()
                try:
                    for model in models:
                        fig = measure(server, args, model, payloads[model])
                        key = {"round": rnd, "cores": cores, "workers": n, "model": model, "rss_mb": rss_mb}
                        runs.append(key | fig)
                        print(line(runs[-1]), flush=True)
                finally:
                    server.stop(timeout=30)
    return {"runs": runs, "summary": summarise(runs)}


def line(r: dict) -> str:
    return (
        f"round {r['round']}  {r['cores']:2d} cores  {r['workers']:2d} workers  {r['model']:10s} {r['img_s']:8.1f} "
        f"img/s  p50 {r['p50_ms']:7.2f}  p99 {r['p99_ms']:7.2f} ms  busy {r['busy_cores']:5.2f} cores"
    )


def summarise(runs: list[dict]) -> list[dict]:
    keys = sorted({(r["model"], r["cores"], r["workers"]) for r in runs})
    rows = []
    for model, cores, n in keys:
        mine = [r for r in runs if (r["model"], r["cores"], r["workers"]) == (model, cores, n)]
        one = {r["round"]: r["img_s"] for r in runs if (r["model"], r["cores"], r["workers"]) == (model, cores, 1)}
        # Paired by round: a round's one-worker run is the baseline its other runs are divided by (the machine
        # drifts between rounds more than between neighbouring runs).
        paired = [r["img_s"] / one[r["round"]] for r in mine if r["round"] in one]
        img_s = statistics.median(r["img_s"] for r in mine)
        rows.append({
            "model": model, "cores": cores, "workers": n, "img_s": img_s,
            "img_s_each_round": [r["img_s"] for r in mine],
            "p50_ms": statistics.median(r["p50_ms"] for r in mine),
            "p99_ms": statistics.median(r["p99_ms"] for r in mine),
            "busy_cores": statistics.median(r["busy_cores"] for r in mine),
            "rss_mb": statistics.median(r["rss_mb"] for r in mine) if all("rss_mb" in r for r in mine) else None,
            "over_one_worker": statistics.median(paired) if paired else None,
            "default_workers": default_workers(cores) == n,
        })  # fmt: skip
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| model | cores | workers | img/s (each round) | ÷ 1 worker (same round) | p50 ms | p99 ms | busy | RSS MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        rounds = " / ".join(f"{v:.0f}" for v in r["img_s_each_round"])
        mark = " (default)" if r["default_workers"] else ""
        lines.append(
            f"| {r['model']} | {r['cores']} | {r['workers']}{mark} | {r['img_s']:.1f} ({rounds}) | "
            f"{r['over_one_worker']:.2f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['busy_cores']:.2f} | "
            f"{'' if r['rss_mb'] is None else round(r['rss_mb'])} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-repo", type=Path, default=ROOT / "model_repo")
    p.add_argument("--models", default="classifier", help="comma-separated; each server loads only these")
    p.add_argument("--cores", default="2,4,8", help="server core counts to measure (the first C cores)")
    p.add_argument("--load-cores", default="8-15", help="cores of the load generator (taskset list)")
    p.add_argument("--concurrency", type=int, default=128, help="closed-loop callers in all")
    p.add_argument("--connections", type=int, default=32, help="load processes, one connection each")
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", type=Path, help="JSON results (benchmarks/results/workers.json is the published run)")
    args = p.parse_args(argv)
    started = time.time()
    result = run(args)
    rows = result["summary"]
    print(table(rows))
    doc = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "duration_s": round(time.time() - started, 1),
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version()},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        **result,
    }  # fmt: skip
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
