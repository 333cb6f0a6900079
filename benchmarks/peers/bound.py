"""What any server's lead is bounded by: the CPU the shared pipeline costs per image with no server at all.

Every peer and Optic run the same decode, pre-processing, onnxruntime session and post-processing
(``common.Pipeline``); this measures that work alone, in one process on one core, per image, at batch sizes
1, 12 and 32 — both the whole pipeline and onnxruntime's ``session.run`` by itself. A server that cost nothing
could reach at most (a peer's CPU-ms per image) / (this figure) times that peer's throughput.

    .venv-peers/bin/python benchmarks/peers/bound.py [--cores 1] [--json benchmarks/results/peers-bound.json]
    .venv-peers/bin/python benchmarks/peers/bound.py --rebound    # after a new runner run: the bound only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from common import MODELS, Pipeline
from harness import load_images

ROOT = Path(__file__).resolve().parents[2]
BATCHES = (1, 12, 32)


def cpu_ms_per_image(work: Callable[[], int], rounds: int = 5, min_seconds: float = 1.0) -> float:
    """Median over rounds of this process's CPU ms per image; ``work`` does some images and says how many."""
    work()  # warm
    results = []
    for _ in range(rounds):
        images, cpu0, wall0 = 0, time.process_time(), time.monotonic()
        while time.monotonic() - wall0 < min_seconds:
            images += work()
        results.append((time.process_time() - cpu0) * 1e3 / images)
    return statistics.median(results)


def measure(model: str, images: Sequence[bytes]) -> dict[str, dict[str, float]]:
    pipeline = Pipeline(model)
    pipeline.warmup()
    tensors = [pipeline.preprocess(b).tensor for b in images[:32]]
    out: dict[str, dict[str, float]] = {}
    for size in BATCHES:
        batch = list(images[:size])
        stacked = [tensors[i % len(tensors)] for i in range(size)]

        def whole(batch: list[bytes] = batch) -> int:
            pipeline.run_batch(batch)
            return len(batch)

        def session_only(stacked: list[np.ndarray] = stacked) -> int:
            pipeline.infer(stacked)
            return len(stacked)

        out[str(size)] = {"pipeline": cpu_ms_per_image(whole), "onnxruntime": cpu_ms_per_image(session_only)}
        print(f"{model:10s} batch {size:2d}: pipeline {out[str(size)]['pipeline']:6.2f} CPU-ms/image, "
              f"onnxruntime alone {out[str(size)]['onnxruntime']:6.2f}", flush=True)  # fmt: skip
    return out


def zero_cost_bound(cpu_ms_per_image: dict, peers_json: Path) -> dict[str, dict[str, float]]:
    """Per model and system, the largest lead a zero-cost server could have: that system's server CPU-ms per
    image at c=64 in the runner's results, over the cheapest shared-pipeline figure measured here."""
    bound: dict[str, dict[str, float]] = {}
    for row in json.loads(peers_json.read_text())["results"]:
        model = row["model"]
        cheapest = min(v["pipeline"] for v in cpu_ms_per_image[model].values())
        cpu = row["by_concurrency"]["64"]["median"]["server_cpu_ms_per_image"]
        bound.setdefault(model, {})[row["system"]] = cpu / cheapest
    return bound


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cores", default="1", help="cores to pin this process to (the runner's servers get one)")
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "peers-bound.json")
    p.add_argument(
        "--rebound", action="store_true", help="measure nothing: recompute the bound in --json from the last run"
    )
    args = p.parse_args(argv)
    if args.rebound:
        result = json.loads(args.json.read_text())
    else:
        os.sched_setaffinity(0, {int(c) for c in args.cores.split(",")})
        images = load_images("synthetic")
        result = {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": {"cpu": platform.processor() or platform.machine(), "cores": args.cores},
            "cpu_ms_per_image": {model: measure(model, images) for model in MODELS},
        }
    peers = ROOT / "benchmarks" / "results" / "peers.json"
    if peers.exists():  # the largest lead a zero-cost server could have over each system, from the last run
        bound = zero_cost_bound(result["cpu_ms_per_image"], peers)
        result["max_throughput_ratio_of_a_zero_cost_server_at_c64"] = bound
        result["bound_from_peers_run"] = json.loads(peers.read_text())["date"]
        print(json.dumps(bound, indent=1))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
