"""Optic against LitServe, BentoML and Ray Serve on the same models, images and pre/post-processing.

    .venv-peers/bin/python benchmarks/peers/run.py            # the full run (~15 min on 2 cores)
    python3 benchmarks/peers/run.py --quick                   # a smoke run; any python: it installs the venv

The peers live in their own venv (``.venv-peers``, made by ``setup_venv.sh``), so they never touch Optic's
``.venv`` or ``make test``; this script (re)makes that venv when its pins change and re-runs itself in it.
Prints a table and writes ``benchmarks/results/peers.json`` and ``peers.png`` (``--quick``: ``peers-quick.*``).
See README.md beside this file for what is measured and how.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
VENV = ROOT / ".venv-peers"
QUICK = {"seconds": 3.0, "warmup": 1.0, "rounds": 1}


def ensure_venv(argv: list[str]) -> None:
    """Install or refresh the peers' venv (a no-op when its pins are unchanged), then run inside it."""
    subprocess.run(["bash", str(HERE / "setup_venv.sh")], check=True)
    if Path(sys.prefix).resolve() != VENV.resolve():
        python = VENV / "bin" / "python"
        os.execv(python, [str(python), str(Path(__file__).resolve()), *argv])


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--systems", default="optic,litserve,bentoml,ray,grpcio", help="comma-separated, from the five")
    p.add_argument("--models", default="classifier,detector", help="comma-separated: classifier, detector")
    p.add_argument("--concurrency", default="1,64", help="comma-separated closed-loop concurrencies")
    p.add_argument("--seconds", type=float, help="measured seconds per concurrency (default 10)")
    p.add_argument("--warmup", type=float, help="unmeasured seconds before each measurement (default 3)")
    p.add_argument("--rounds", type=int, help="rounds, the systems' order rotating each round (default 3)")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 s warm-up, 3 s measured, 1 round")
    p.add_argument(
        "--images",
        choices=("synthetic", "scenes"),
        default="synthetic",
        help="load images: synthetic_images (default) or shape scenes the detector finds boxes in",
    )
    p.add_argument("--server-cores", default="0", help="cores the servers are pinned to (taskset list)")
    p.add_argument("--client-cores", default="1", help="cores the load generator (this process) is pinned to")
    p.add_argument(
        "--optic-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra `optic serve` argument (repeatable; e.g. --optic-arg=--intra-op-threads=1)",
    )
    p.add_argument("--out", type=Path, help="results path without extension (default benchmarks/results/peers)")
    p.add_argument("--no-plot", action="store_true")
    return p.parse_args(argv)


def options(args: argparse.Namespace) -> Any:
    from harness import MODELS, Options
    from systems import SYSTEMS

    systems = tuple(s.strip() for s in args.systems.split(",") if s.strip())
    models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    bad = [s for s in systems if s not in SYSTEMS] + [m for m in models if m not in MODELS]
    if bad or not systems or not models:
        raise SystemExit(f"run.py: unknown or missing system/model: {', '.join(bad) or '(none given)'}")
    defaults = Options()
    quick = QUICK if args.quick else {}
    out = args.out or ROOT / "benchmarks" / "results" / ("peers-quick" if args.quick else "peers")
    return Options(
        systems=systems,
        models=models,
        concurrency=tuple(sorted({int(c) for c in args.concurrency.split(",") if c.strip()})),
        seconds=args.seconds if args.seconds is not None else quick.get("seconds", defaults.seconds),
        warmup=args.warmup if args.warmup is not None else quick.get("warmup", defaults.warmup),
        rounds=args.rounds if args.rounds is not None else int(quick.get("rounds", defaults.rounds)),
        images=args.images,
        server_cores=args.server_cores,
        client_cores=args.client_cores,
        optic_args=tuple(args.optic_arg),
        quick=args.quick,
        out=out,
    )


# ---------------------------------------------------------------- reporting


def finite(obj: Any) -> Any:
    """``obj`` with every NaN/inf float replaced by None: strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(v) for v in obj]
    return obj


def fmt(v: float, digits: int = 1) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def table(report: dict[str, Any]) -> str:
    cs = report["settings"]["concurrency"]
    lo, hi = str(min(cs)), str(max(cs))
    head = (
        f"{'system':9s} {'model':10s} {'c=' + lo + ' img/s':>11s} {'c=' + lo + ' p50 ms':>11s} "
        f"{'c=' + hi + ' img/s':>12s} {'c=' + hi + ' p99 ms':>12s} {'CPU-ms/img c=' + lo:>17s} "
        f"{'CPU-ms/img c=' + hi:>18s}  errors"
    )
    lines = [head, "-" * len(head)]
    for r in report["results"]:
        if r["status"] != "measured":
            lines.append(f"{r['system']:9s} {r['model']:10s} {r['status']}: {r['reason'].splitlines()[0][:90]}")
            continue
        a, b = r["by_concurrency"][lo]["median"], r["by_concurrency"][hi]["median"]
        errors = {k: a["errors"].get(k, 0) + b["errors"].get(k, 0) for k in {*a["errors"], *b["errors"]}}
        lines.append(
            f"{r['system']:9s} {r['model']:10s} {fmt(a['throughput']):>11s} {fmt(a['latency_ms']['p50'], 2):>11s} "
            f"{fmt(b['throughput']):>12s} {fmt(b['latency_ms']['p99'], 2):>12s} "
            f"{fmt(a['server_cpu_ms_per_image'], 2):>17s} {fmt(b['server_cpu_ms_per_image'], 2):>18s}  "
            f"{sum(errors.values()) or '-'}"
        )
    for model, g in report["goal"].items():
        if not g.get("evaluated"):
            lines.append(f"goal, {model}: not evaluated ({g['why']})")
            continue
        parts = [
            f"{k} {v['ratio']}x of {v['best_peer']} (target {v['target']}: {'met' if v['met'] else 'NOT met'}"
            + (f"; grpcio {v['floor_ratio']}x)" if "floor_ratio" in v else ")")
            for k, v in g.items()
            if isinstance(v, dict)
        ]
        lines.append(f"goal, {model}: " + "; ".join(parts))
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    """One bar per system: throughput and p50 at the lowest concurrency, throughput and p99 at the highest,
    server CPU per image at the highest; whiskers span the rounds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cs = report["settings"]["concurrency"]
    lo, hi = str(min(cs)), str(max(cs))
    panels = (
        (lo, "throughput", f"img/s, c={lo}"),
        (lo, "p50", f"p50 ms, c={lo}"),
        (hi, "throughput", f"img/s, c={hi}"),
        (hi, "p99", f"p99 ms, c={hi}"),
        (hi, "server_cpu_ms_per_image", f"server CPU-ms/img, c={hi}"),
    )
    models = report["settings"]["models"]
    fig, axes = plt.subplots(len(models), len(panels), figsize=(3.2 * len(panels), 2.8 * len(models)), dpi=110,
                             squeeze=False)  # fmt: skip
    colours = {"optic": "#1f77b4", "litserve": "#9467bd", "bentoml": "#ff7f0e", "ray": "#2ca02c", "grpcio": "#7f7f7f"}

    def value(r: dict[str, Any], c: str, key: str) -> float:
        return float(r["latency_ms"].get(key, math.nan)) if key in ("p50", "p99") else float(r[key])

    for row, model in enumerate(models):
        rows = [r for r in report["results"] if r["model"] == model and r["status"] == "measured"]
        for col, (c, key, title) in enumerate(panels):
            ax = axes[row][col]
            names = [r["system"] for r in rows]
            med = [value(r["by_concurrency"][c]["median"], c, key) for r in rows]
            spread = [[value(x, c, key) for x in r["by_concurrency"][c]["rounds"]] for r in rows]
            err = [[m - min(s) for m, s in zip(med, spread, strict=True)],
                   [max(s) - m for m, s in zip(med, spread, strict=True)]]  # fmt: skip
            ax.bar(names, med, yerr=err, capsize=3, color=[colours.get(n, "grey") for n in names])
            ax.set_title(f"{model}: {title}", fontsize=9)
            ax.tick_params(labelsize=8)
            ax.grid(axis="y", alpha=0.3)
    quick = " (QUICK SMOKE RUN: not for publication)" if report["quick"] else ""
    fig.suptitle(f"Optic vs peers, {report['machine']['cpu_model']}, server on 1 core{quick}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str]) -> int:
    args = parse(argv)
    ensure_venv(argv)
    import harness

    opts = options(args)
    if set(opts.server_cores.split(",")) & set(opts.client_cores.split(",")):
        print("run.py: warning: server and load generator share a core: their figures mix", file=sys.stderr)
    report = harness.run(opts)
    print()
    print(table(report))
    json_path = opts.out.with_suffix(".json")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    # Before the plot, so the figures are kept even if drawing fails; NaN (nothing answered) as null.
    json_path.write_text(json.dumps(finite(report), indent=2, default=str) + "\n")
    print(f"wrote {json_path}")
    if not args.no_plot:
        plot(report, opts.out.with_suffix(".png"))
        print(f"wrote {opts.out.with_suffix('.png')}")
    leftovers = [p for r in report["results"] for p in r["leftover_processes"]]
    return 1 if leftovers or any(r["status"] == "failed" for r in report["results"]) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
