"""The soak benchmark's machinery, briefly: the 10-minute run is `python benchmarks/soak.py` (README figures)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def test_short_soak_has_no_unexpected_answers(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    cmd = [
        sys.executable, "benchmarks/soak.py", "--minutes", "0.3", "--warmup", "5", "--rate", "40", "--bad-every", "5",
        "--max-growth", "50", "--out", str(out), "--plot", str(tmp_path / "soak.png"), "--no-progress",
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    assert report["unexpected"] == [] and report["requests"] > 300
    assert report["result"]["server_exit_code"] == 0 and report["result"]["server_tracebacks"] == 0
    # Every good kind was answered OK and every bad kind got its own status, none of them OK.
    counts = report["counts"]
    assert all(c.get("OK", 0) > 0 for name, c in counts.items() if not name.startswith("bad-")), counts
    assert all(c and "OK" not in c for name, c in counts.items() if name.startswith("bad-")), counts
    assert len(report["samples"]) >= 3 and (tmp_path / "soak.png").stat().st_size > 0
