"""Narrow lanes (``--instances``' default) against one batch at a time (``--instances 1``): the measurement behind
``default_instances`` (server/runtime.py).

With two or more CPU cores a model runs up to two batches at once: a batch that starts alone runs on all the
cores, one that starts while another runs gets a narrow session of cores / instances threads. For each model and
each round, alternating the two servers, this measures over the Vision API (640x480 JPEGs):

- 64 closed-loop callers: img/s, p99, the server's busy cores and CPU-ms per image;
- one caller: p50 / p99 (a lone request must not pay for the lanes);
- open-loop Poisson arrivals at half of ``--instances 1``'s 64-caller throughput in the same round: p50 / p99;
- the server's RSS once warmed up and its peak under the load, and its start-up time (load + warm-up).

    .venv/bin/python benchmarks/lanes.py --out benchmarks/results/lanes.json              # here: shared cores
    .venv/bin/python benchmarks/lanes.py --server-cores 0-7 --load-cores 8-15 --workers 4  # a bigger machine
    .venv/bin/python benchmarks/lanes.py --in-process --out benchmarks/results/lanes.json   # onnxruntime alone
    .venv/bin/python benchmarks/lanes.py --memory --out benchmarks/results/lanes.json       # the default repository
    .venv/bin/python benchmarks/lanes.py --captioner-threads --rounds 3 --out benchmarks/results/lanes.json

A model whose ``config.pbtxt`` sets ``instance_group`` (the default captioner's parts: count 1) ignores
``--instances``: its two variants are then the same server. ``--captioner-threads`` measures what those parts'
config does set instead: one thread per run (``intra_op_thread_count: 1``) against the server's choice (``0``: all
the cores), one batch at a time in both, in copies of the repository that differ only in that value.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bounds import Env, Peak  # noqa: E402
from benchmarks.suite import TASK_OF  # noqa: E402
from benchmarks.workers import cpu_list, start  # noqa: E402
from benchmarks.workers import measure as measure_c64  # noqa: E402
from optic.client import bench, load  # noqa: E402
from optic.server.runtime import OnnxModel, RuntimeOptions  # noqa: E402

REPOSITORY_MODELS = {"captioner": ["captioner_encoder", "captioner_decoder"]}  # what serves each name
VARIANTS = {"one batch at a time": ["--instances", "1"], "lanes (default)": []}
THREADS = re.compile(r'(key: "intra_op_thread_count" value: \{ string_value: )"\d+"')
CAPTIONER_THREADS = {"all cores per run": "0", "one thread per run (shipped)": "1"}  # the first is the base


def figures(url: str, model: str, payloads: tuple[str, list[bytes]], args: argparse.Namespace, **load_: Any) -> dict:
    config = bench.BenchConfig(
        url=url, api="vision", model=model, duration=args.seconds, warmup=args.warmup,
        progress=False, **({"workers": args.connections} | load_),
    )  # fmt: skip
    result = bench.run(config, payloads)
    if bench.error_rate(result) > 0:
        raise SystemExit(f"{model}: requests failed ({result.errors}): the figures would mean nothing")
    return {"img_s": result.throughput_rps, "p50_ms": result.latency_ms["p50"], "p99_ms": result.latency_ms["p99"]}


def serve_and_measure(
    args: argparse.Namespace, model: str, flags: list[str], payloads: Any, half_rate: float | None
) -> dict:
    started = time.monotonic()
    loaded = REPOSITORY_MODELS.get(model, [model])
    server = start(args.model_repo, loaded, args.server_cores, args.workers, args.log_dir, flags)
    out: dict[str, Any] = {"start_s": time.monotonic() - started, "rss_idle_mb": server.rss_mb()}
    try:
        with Peak(server) as peak:
            out["c64"] = measure_c64(server, argparse.Namespace(**vars(args), concurrency=64), model, payloads)
            out["c1"] = figures(server.url, model, payloads, args, concurrency=1, workers=1)
            rate = half_rate if half_rate is not None else out["c64"]["img_s"] / 2
            out["half_load"] = {"rate": rate, "p50_ms": math.nan, "p99_ms": math.nan}
            if not args.no_half_load:
                out["half_load"] |= figures(server.url, model, payloads, args, concurrency=0, rate=rate)
        out["rss_peak_mb"] = peak.mb
    finally:
        server.stop(timeout=30)
    return out


def images_per_s(session: OnnxModel, feeds: dict[str, np.ndarray], runners: int, seconds: float) -> float:
    """``runners`` threads calling ``session.run`` for ``seconds``."""
    done, stop, lock = [0], time.monotonic() + seconds, threading.Lock()
    batch = next(iter(feeds.values())).shape[0]

    def loop() -> None:
        while time.monotonic() < stop:
            session.run(feeds)
            with lock:
                done[0] += batch

    threads = [threading.Thread(target=loop) for _ in range(runners)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return done[0] / seconds


def in_process(repo: Path, model: str, seconds: float) -> dict:
    """Images/s of onnxruntime alone on zeros, at batch 1 and 8: one run at a time on 1 and on 2 threads, and two
    runs side by side on 1 thread each (what the lanes do under load)."""
    path = repo / REPOSITORY_MODELS.get(model, [model])[0] / "1" / "model.onnx"
    one, two = (OnnxModel(path, RuntimeOptions(intra_op_threads=t)) for t in (1, 2))
    spec = one.inputs[0]
    out: dict[str, dict[str, float]] = {}
    for batch in (1, 8):
        feeds = {spec.name: np.zeros((batch, *(d if d > 0 else 1 for d in spec.shape[1:])), np.float32)}
        one.run(feeds), two.run(feeds)
        out[f"batch_{batch}"] = {
            "one_run_1_thread": images_per_s(one, feeds, 1, seconds),
            "one_run_2_threads": images_per_s(two, feeds, 1, seconds),
            "two_runs_1_thread_each": images_per_s(one, feeds, 2, seconds),
        }
        print(model, batch, {k: round(v, 1) for k, v in out[f"batch_{batch}"].items()}, flush=True)
    return out


def memory(args: argparse.Namespace) -> dict:
    """The default repository's server (all models, one worker): RSS once idle, and its peak while the segmenter
    alone, then all four models at once, take 64 callers each for ``--seconds``."""
    out: dict[str, dict] = {}
    for name in args.variants.split(","):
        env = Env(sys.executable, args.model_repo, Path(tempfile.mkdtemp(prefix="optic-lanes-mem-")))
        server = env.start(args.model_repo, "--log-level", "WARNING", "--workers", "1", *VARIANTS[name])
        try:
            row = {"rss_idle_mb": server.settle(1.5)}
            for label, models in (("segmenter_alone", ["segmenter"]), ("all_four", list(TASK_OF))):
                with Peak(server) as peak:
                    bench_ = [sys.executable, "-m", "optic.server.cli", "bench", "--url", server.url, "--concurrency",
                              "64", "--duration", str(args.seconds), "--warmup", "1", "--no-progress"]  # fmt: skip
                    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
                    loads = [subprocess.Popen([*bench_, "--model", m], **quiet) for m in models]
                    for load_ in loads:
                        load_.wait()
                row[f"rss_peak_{label}_mb"] = peak.mb
            out[name] = row
            print(name, {k: round(v) for k, v in row.items()}, flush=True)
        finally:
            server.stop(timeout=30)
    return out


def captioner_repositories(source: Path) -> dict[str, Path]:
    """Copies of the captioner's two parts (models linked, configs rewritten), one per ``CAPTIONER_THREADS``."""
    root = Path(tempfile.mkdtemp(prefix="optic-captioner-threads-"))
    repos = {}
    for name, threads in CAPTIONER_THREADS.items():
        repo = root / f"threads-{threads}"
        for part in REPOSITORY_MODELS["captioner"]:
            (repo / part / "1").mkdir(parents=True)
            (repo / part / "1" / "model.onnx").symlink_to((source / part / "1" / "model.onnx").resolve())
            text, found = THREADS.subn(rf'\g<1>"{threads}"', (source / part / "config.pbtxt").read_text())
            if found != 1:
                raise SystemExit(f"{part}/config.pbtxt does not set intra_op_thread_count once: nothing to compare")
            (repo / part / "config.pbtxt").write_text(text)
        repos[name] = repo
    return repos


def captioner_threads(args: argparse.Namespace) -> dict:
    """Alternating rounds of the captioner on one thread per run and on all the cores (the base)."""
    if args.load_cores:
        os.sched_setaffinity(0, cpu_list(args.load_cores))
    payloads = load.payloads(bench.BenchConfig(url="", api="vision", model="captioner", task="caption"))
    repos = captioner_repositories(args.model_repo)
    runs: list[dict] = []
    try:
        for rnd in range(args.rounds):
            # The base's peak sets the half-load rate for both, so it is measured first; a quick pre-measure
            # would cost a round. Odd rounds run it again after the other, so neither always goes last.
            order = list(repos.items())
            if rnd % 2:
                order.append(order[0])
            half: float | None = None
            for i, (name, repo) in enumerate(order):
                fig = serve_and_measure(argparse.Namespace(**vars(args) | {"model_repo": repo}), "captioner", [],
                                        payloads, half)  # fmt: skip
                half = fig["half_load"]["rate"] if half is None else half
                if i == len(repos):  # the base's second turn: kept in place of its first
                    runs = [r for r in runs if not (r["round"] == rnd and r["variant"] == name)]
                runs.append({"model": "captioner", "round": rnd, "variant": name, **fig})
                r = runs[-1]
                print(
                    f"round {rnd} {name:30s} c64 {r['c64']['img_s']:6.1f} captions/s p99 {r['c64']['p99_ms']:5.0f}"
                    f" | c1 p50 {r['c1']['p50_ms']:5.2f} | half load ({half:.0f}/s) p99"
                    f" {r['half_load']['p99_ms']:6.1f}",
                    flush=True,
                )
    finally:
        shutil.rmtree(next(iter(repos.values())).parent, ignore_errors=True)
    return {"runs": runs, "summary": summarise(runs, list(CAPTIONER_THREADS), "c64_img_s_to_all_cores")}


def run(args: argparse.Namespace) -> dict:
    if args.load_cores:
        os.sched_setaffinity(0, cpu_list(args.load_cores))
    runs: list[dict] = []
    for model in args.models.split(","):
        payloads = load.payloads(bench.BenchConfig(url="", api="vision", model=model, task=TASK_OF[model]))
        for rnd in range(args.rounds):
            half: float | None = None
            for name in VARIANTS:  # one batch at a time first: its peak sets the half-load rate for both
                fig = serve_and_measure(args, model, VARIANTS[name], payloads, half)
                half = fig["half_load"]["rate"]
                runs.append({"model": model, "round": rnd, "variant": name, **fig})
                r = runs[-1]
                print(
                    f"{model:10s} round {rnd} {name:20s} c64 {r['c64']['img_s']:7.1f} img/s"
                    f" p99 {r['c64']['p99_ms']:6.0f}"
                    f" | c1 p50 {r['c1']['p50_ms']:6.2f} | half load ({half:.0f}/s) p50 {r['half_load']['p50_ms']:6.2f}"
                    f" p99 {r['half_load']['p99_ms']:6.1f} | RSS {r['rss_idle_mb']:.0f} -> {r['rss_peak_mb']:.0f} MB"
                    f" | start {r['start_s']:.1f} s",
                    flush=True,
                )
    return {"runs": runs, "summary": summarise(runs, list(VARIANTS))}


def summarise(runs: list[dict], variants: list[str], ratio_key: str = "c64_img_s_to_one_at_a_time") -> list[dict]:
    """Medians per model and variant, and each variant's ratios over the first (the base) paired by round."""
    rows = []
    for model in dict.fromkeys(r["model"] for r in runs):
        base = {r["round"]: r for r in runs if r["model"] == model and r["variant"] == variants[0]}
        for name in variants:
            mine = [r for r in runs if r["model"] == model and r["variant"] == name]

            def med(path: tuple[str, ...], rows_: list[dict] = mine) -> float:
                vals = []
                for r in rows_:
                    v: Any = r
                    for k in path:
                        v = v[k]
                    vals.append(v)
                return statistics.median(vals)

            row: dict[str, Any] = {"model": model, "variant": name}
            for key in (("c64", "img_s"), ("c64", "p99_ms"), ("c64", "cpu_ms_per_image"), ("c1", "p50_ms"),
                        ("c1", "p99_ms"), ("half_load", "p50_ms"), ("half_load", "p99_ms"), ("rss_idle_mb",),
                        ("rss_peak_mb",), ("start_s",)):  # fmt: skip
                row["_".join(key)] = med(key)
            row[ratio_key] = statistics.median(r["c64"]["img_s"] / base[r["round"]]["c64"]["img_s"] for r in mine)
            row["half_load_p99_to_lone_p99"] = med(("half_load", "p99_ms")) / med(("c1", "p99_ms"))
            rows.append(row)
    return rows


def _read(out: Path) -> dict:
    return json.loads(out.read_text()) if out.exists() else {}


def add_to(out: Path, key: str, data: Any) -> None:
    """Set one key of ``--out``'s JSON, keeping the rest: each partial mode adds to the full run's file."""
    out.write_text(json.dumps(_read(out) | {key: data}, indent=1, default=str) + "\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-repo", type=Path, default=ROOT / "model_repo")
    p.add_argument("--models", default="classifier,detector,segmenter")
    p.add_argument("--server-cores", default="", help="taskset-style list for the server (default: all)")
    p.add_argument("--load-cores", default="", help="taskset-style list for the load (default: all)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--connections", type=int, default=4, help="load processes (one connection each)")
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--memory", action="store_true", help="only the default repository's RSS (added to --out's JSON)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="with --memory: which servers")
    p.add_argument("--label", default="this build", help="with --memory: the key its figures go under")
    p.add_argument("--in-process", action="store_true", help="only onnxruntime, no server (added to --out's JSON)")
    p.add_argument("--captioner-threads", action="store_true", help="only the captioner's threads (added to --out)")
    p.add_argument("--no-half-load", action="store_true", help="skip the open-loop run (a quicker check)")
    p.add_argument("--out", type=Path, help="write JSON here")
    args = p.parse_args()
    args.server_cores = cpu_list(args.server_cores) if args.server_cores else sorted(os.sched_getaffinity(0))
    args.log_dir = Path(tempfile.mkdtemp(prefix="optic-lanes-"))
    if args.memory:
        data = memory(args)
        if args.out:
            add_to(args.out, "memory", {**_read(args.out).get("memory", {}), args.label: data})
        return 0
    if args.in_process:
        data = {m: in_process(args.model_repo, m, args.seconds / 2) for m in args.models.split(",") if m != "captioner"}
        if args.out:
            add_to(args.out, "in_process", data)
        return 0
    if args.captioner_threads:
        data = {
            "when": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "settings": {k: v for k, v in vars(args).items() if k not in ("log_dir", "model_repo", "models")},
            **captioner_threads(args),
        }
        print(json.dumps(data["summary"], indent=1))
        if args.out:
            add_to(args.out, "captioner_threads", data)
        return 0
    result = {
        "benchmark": "lanes",
        "when": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()},
        "settings": {k: v for k, v in vars(args).items() if k not in ("log_dir", "model_repo")},
        **run(args),
    }
    print(json.dumps(result["summary"], indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
