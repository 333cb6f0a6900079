"""Two builds of the server side by side: is a change slower, or is the machine noisy?

Each build is a directory an installed ``optic`` can be imported from (``pip install --no-deps --target DIR
dist/optic-*.whl``, the wheel built from the commit to compare). Rounds alternate the order of the builds;
each round starts that build's ``optic serve`` pinned to ``--server-cores`` with only ``--model`` loaded and
runs ``optic bench`` (this process's build, Vision API, 640x480 JPEGs, closed loop) from ``--client-core``.
Prints each run and the medians, and writes JSON.

    pip wheel --no-deps . -w /tmp/new && pip install --no-deps --target /tmp/site-new /tmp/new/optic-*.whl
    (same for the older commit, into /tmp/site-old)
    python benchmarks/ab_builds.py --a /tmp/site-old --b /tmp/site-new --rounds 4 --out /tmp/ab.json

On this 2-core machine one-caller runs of one build drift by ±15 % within minutes (docs/benchmarks.md); a
machine with idle cores to pin to gives an answer.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.workers import cpu_list, start  # noqa: E402
from optic.client import bench, load  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--a", required=True, help="directory the first build's optic is imported from")
    p.add_argument("--b", required=True, help="directory the second build's optic is imported from")
    p.add_argument("--model-repo", type=Path, default=ROOT / "model_repo")
    p.add_argument("--model", default="classifier")
    p.add_argument("--task", default="classify")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--server-cores", default="0")
    p.add_argument("--client-core", default="1")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    os.sched_setaffinity(0, cpu_list(args.client_core))
    payloads = load.payloads(bench.BenchConfig(url="", api="vision", model=args.model, task=args.task))
    inherited = os.environ.get("PYTHONPATH", "")
    builds = {"a": args.a, "b": args.b}
    runs: list[dict] = []
    logs = Path(tempfile.mkdtemp(prefix="optic-ab-"))
    for rnd in range(args.rounds):
        for name in ("a", "b") if rnd % 2 == 0 else ("b", "a"):
            # Only the server imports the build under test; the load processes keep this process's.
            os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, (builds[name], inherited)))
            try:
                server = start(args.model_repo, [args.model], cpu_list(args.server_cores), 1, logs)
            finally:
                os.environ["PYTHONPATH"] = inherited
            config = bench.BenchConfig(
                url=server.url, api="vision", model=args.model, concurrency=args.concurrency,
                duration=args.seconds, warmup=2.0, workers=1, progress=False,
            )  # fmt: skip
            try:
                result = bench.run(config, payloads)
            finally:
                server.stop(timeout=30)
            if bench.error_rate(result) > 0:
                raise SystemExit(f"build {name}: requests failed ({result.errors})")
            run = {"round": rnd, "build": name, "img_s": result.throughput_rps, "p50_ms": result.latency_ms["p50"]}
            runs.append(run)
            print(f"round {rnd} {name}: {run['img_s']:7.1f} img/s  p50 {run['p50_ms']:.2f} ms", flush=True)
    summary = {
        name: {
            "dir": builds[name],
            "img_s": statistics.median(r["img_s"] for r in runs if r["build"] == name),
            "p50_ms": statistics.median(r["p50_ms"] for r in runs if r["build"] == name),
        }
        for name in builds
    }
    for name, s in summary.items():
        print(f"{name} ({s['dir']}): median {s['img_s']:.1f} img/s, p50 {s['p50_ms']:.2f} ms")
    if args.out:
        settings = {k: str(v) for k, v in vars(args).items()}
        args.out.write_text(json.dumps({"settings": settings, "runs": runs, "summary": summary}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
