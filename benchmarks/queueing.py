"""The latency floor of a model under open-loop load: M/D/1 and M/D/2 queues, simulated.

The suite's goal "p99 at 50 % load <= 2x a lone request's latency" meets this bound first: with Poisson arrivals
and a constant service time S (the best case: real service times vary), the sojourn time's p99 at utilisation
rho is a fixed multiple of S. One server is one model instance (Lindley's recursion); two servers are a model
with two lanes on 2+ cores (Optic's default there: two runs at once), each run still taking S. A few million
arrivals give the multiple; no server involved.

    python benchmarks/queueing.py [--arrivals 2000000] [--json benchmarks/results/queueing.json]
"""

from __future__ import annotations

import argparse
import heapq
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


def mdc_sojourn(rho: float, servers: int, arrivals: int, seed: int = 0) -> np.ndarray:
    """As :func:`md1_sojourn` with ``servers`` servers, first come first served, utilisation ``rho`` each: every
    arrival starts on the server that frees first (Kiefer-Wolfowitz), so one Python step per arrival."""
    if servers == 1:
        return md1_sojourn(rho, arrivals, seed)
    at = np.cumsum(np.random.default_rng(seed).exponential(1.0 / (rho * servers), arrivals)).tolist()
    free = [0.0] * servers  # a heap of the times the servers free up
    sojourn = np.empty(arrivals)
    for i, t in enumerate(at):
        end = max(t, free[0]) + 1.0
        heapq.heapreplace(free, end)
        sojourn[i] = end - t
    return sojourn


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arrivals", type=int, default=2_000_000)
    p.add_argument("--servers", default="1,2", help="comma-separated server counts")
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "queueing.json")
    args = p.parse_args(argv)
    tables: dict[str, dict] = {}
    for servers in (int(c) for c in args.servers.split(",")):
        table = tables.setdefault(f"M/D/{servers}", {})
        for rho in UTILISATIONS:
            s = mdc_sojourn(rho, servers, args.arrivals)
            table[str(rho)] = {q: float(np.percentile(s, int(q[1:]))) for q in ("p50", "p90", "p99")}
            print(f"M/D/{servers} at utilisation {rho:.1f}: sojourn p50 {table[str(rho)]['p50']:.2f}, "
                  f"p99 {table[str(rho)]['p99']:.2f} service times", flush=True)  # fmt: skip
    result = {"model": "M/D/c, Poisson arrivals, constant service time, c servers", "arrivals": args.arrivals,
              "sojourn_in_service_times": tables}  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
