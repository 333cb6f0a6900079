"""`optic bench` end to end against the real server: a few seconds of tiny load, every JSON field present.

No thresholds on timings: the figures are for people, the test checks the tool works.
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT

FIELDS = {"config", "requests", "seconds", "throughput_rps", "latency_ms", "errors", "server"}
SERVER_FIELDS = {
    "inferences",
    "executions",
    "mean_batch_size",
    "queue_ms_per_request",
    "compute_infer_ms_per_batch",
    "compute_input_ms_per_batch",
    "compute_output_ms_per_batch",
}


def bench(server, *args: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "optic.server.cli",
        "bench",
        "--url",
        server.url,
        "--warmup",
        "0.3",
        "--no-progress",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)


def check(result: dict, model_key: str) -> None:
    assert result.keys() >= FIELDS
    assert result["requests"] > 0 and result["throughput_rps"] > 0 and result["errors"] == {}
    assert set(result["latency_ms"]) == {"p50", "p90", "p99", "max", "mean"}
    assert result["latency_ms"]["p50"] <= result["latency_ms"]["p99"] <= result["latency_ms"]["max"]
    assert result["server"][model_key].keys() >= SERVER_FIELDS
    assert result["server"][model_key]["inferences"] >= result["requests"]


def test_closed_loop_kserve(server, tmp_path):
    out = tmp_path / "k.json"
    r = bench(
        server,
        "--api",
        "kserve",
        "--model",
        "classifier",
        "--concurrency",
        "4",
        "--duration",
        "1.5",
        "--workers",
        "2",
        "--json",
        str(out),
    )
    assert r.returncode == 0, r.stderr
    check(json.loads(out.read_text()), "classifier:1")
    assert "answered/s" in r.stdout and "mean batch" in r.stdout


def test_open_loop_vision_detect(server, tmp_path):
    out = tmp_path / "v.json"
    r = bench(
        server,
        "--model",
        "detector",
        "--rate",
        "40",
        "--duration",
        "1.5",
        "--image-size",
        "120",
        "160",
        "--json",
        str(out),
    )
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    check(result, "detector:1")
    assert result["config"]["rate"] == 40 and result["config"]["concurrency"] == 0


def test_sweep_draws_a_plot(server, tmp_path):
    out, png = tmp_path / "s.json", tmp_path / "s.png"
    r = bench(
        server,
        "--model",
        "captioner",
        "--concurrency",
        "1",
        "--sweep",
        "1,3",
        "--duration",
        "1",
        "--image-size",
        "64",
        "64",
        "--json",
        str(out),
        "--plot",
        str(png),
    )
    assert r.returncode == 0, r.stderr
    results = json.loads(out.read_text())
    assert [x["config"]["concurrency"] for x in results] == [1, 3]
    for x in results:
        check(x, "captioner_decoder:1")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_arguments_are_one_line(server):
    r = bench(server, "--api", "kserve", "--model", "nope", "--concurrency", "1", "--duration", "1")
    assert r.returncode == 2 and r.stderr.strip().startswith("optic bench: error: NOT_FOUND")
    assert "Traceback" not in r.stderr


def test_the_suites_echo_ceiling_answers_every_task():
    """`make bench` compares every model with a bare gRPC echo server; the load tool must not need RPCs the echo
    lacks (it once asked the echo for ModelMetadata and the whole suite died at its first model)."""
    from benchmarks.suite import MODELS, echo_ceiling
    from optic.client.bench import BenchConfig

    for model in MODELS:
        config = BenchConfig(model=model, concurrency=2, duration=0.3, warmup=0.1, progress=False)  # as the suite
        result = echo_ceiling(config, reply_size=64)
        assert result["errors"] == {} and result["requests"] > 0, (model, result)
