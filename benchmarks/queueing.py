"""The latency floor of one model instance under open-loop load: an M/D/1 queue, simulated.

The suite's goal "p99 at 50 % load <= 2x a lone request's latency" meets this bound first: with Poisson arrivals
and a constant service time S (the best case: real service times vary), the sojourn time's p99 at utilisation
rho is a fixed multiple of S. Lindley's recursion over a few million arrivals gives it; no server involved.

    python benchmarks/queueing.py [--arrivals 2000000] [--json benchmarks/results/queueing.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
UTILISATIONS = (0.3, 0.5, 0.7, 0.9)


def md1_sojourn(rho: float, arrivals: int, seed: int = 0) -> np.ndarray:
    """Sojourn times (wait + service), in service times, of ``arrivals`` Poisson arrivals at utilisation ``rho``."""
    gaps = np.random.default_rng(seed).exponential(1.0 / rho, arrivals)
    # Lindley: W[n+1] = max(0, W[n] + S - A[n]); as a running maximum of partial sums: W = X - min(0, min(X)).
    x = np.concatenate(([0.0], np.cumsum(1.0 - gaps[:-1])))
    wait = x - np.minimum.accumulate(np.minimum(x, 0.0))
    return wait + 1.0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arrivals", type=int, default=2_000_000)
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "queueing.json")
    args = p.parse_args(argv)
    table = {}
    for rho in UTILISATIONS:
        s = md1_sojourn(rho, args.arrivals)
        table[str(rho)] = {q: float(np.percentile(s, int(q[1:]))) for q in ("p50", "p90", "p99")}
        print(f"M/D/1 at utilisation {rho:.1f}: sojourn p50 {table[str(rho)]['p50']:.2f}, "
              f"p99 {table[str(rho)]['p99']:.2f} service times")  # fmt: skip
    result = {"model": "M/D/1, Poisson arrivals, constant service time", "arrivals": args.arrivals,
              "sojourn_in_service_times": table}  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
