"""The process around the models: health, reflection, metrics, CLI client, graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
import urllib.request

import grpc
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from optic.export.data import SHAPES, make_scenes
from optic.proto.optic.v1 import vision_pb2 as pb
from optic.proto.optic.v1 import vision_pb2_grpc as pb_grpc
from tests.conftest import ROOT, encode, start_server


def test_health_serving_for_each_service(server):
    for service in ("", "inference.GRPCInferenceService", "optic.v1.Vision"):
        assert server.health(service) == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_services(server):
    with grpc.insecure_channel(server.url) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        (answer,) = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for s in answer.list_services_response.service}
        assert {"inference.GRPCInferenceService", "optic.v1.Vision", "grpc.health.v1.Health"} <= names
        (answer,) = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(file_containing_symbol="optic.v1.Vision")])
        )
        assert answer.file_descriptor_response.file_descriptor_proto


def test_metrics_are_exposed_and_count_outcomes(server):
    with grpc.insecure_channel(server.url) as ch:
        stub = pb_grpc.VisionStub(ch)
        stub.Classify(pb.ClassifyRequest(model="classifier", image=pb.Image(data=encode(make_scenes(1, 9)[0].image))))
        with contextlib.suppress(grpc.RpcError):
            stub.Classify(pb.ClassifyRequest(model="classifier", image=pb.Image(data=b"junk")))
        with contextlib.suppress(grpc.RpcError):
            stub.Classify(pb.ClassifyRequest(model="x" * 500, image=pb.Image(data=b"junk")))
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    families = {m.name: m for m in text_string_to_metric_families(text)}
    for name in (
        "optic_requests",
        "optic_request_duration_seconds",
        "optic_queue_duration_seconds",
        "optic_compute_duration_seconds",
        "optic_batch_size",
        "optic_model_ready",
    ):
        assert name in families, name
    requests = {
        (s.labels["model"], s.labels["method"], s.labels["code"]): s.value
        for s in families["optic_requests"].samples
        if s.name == "optic_requests_total"
    }
    assert requests[("classifier", "Classify", "OK")] >= 1
    assert requests[("classifier", "Classify", "INVALID_ARGUMENT")] >= 1
    assert requests[("", "Classify", "NOT_FOUND")] >= 1  # unknown names never become label values
    assert all(len(model) < 100 for model, _, _ in requests)
    ready = [s for s in families["optic_model_ready"].samples if s.labels == {"model": "classifier", "version": "1"}]
    assert ready and ready[0].value == 1
    queue = [
        s
        for s in families["optic_queue_duration_seconds"].samples
        if s.name.endswith("_count") and s.labels["model"] == "classifier"
    ]
    assert queue and queue[0].value >= 1


def test_optic_infer_cli(server, tmp_path):
    scenes = make_scenes(2, seed=31)
    paths = []
    for i, s in enumerate(scenes):
        path = tmp_path / f"scene{i}.png"
        path.write_bytes(encode(s.image))
        paths.append(str(path))
    cmd = [sys.executable, "-m", "optic.server.cli", "infer", "--url", server.url, "--model", "classifier", *paths]
    table = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert table.returncode == 0, table.stderr
    assert SHAPES[scenes[0].label] in table.stdout.splitlines()[1]
    as_json = subprocess.run([*cmd, "--json", "--top-k", "2"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    results = json.loads(as_json.stdout)
    assert [v[0]["label"] for v in results.values()] == [SHAPES[s.label] for s in scenes]
    assert all(len(v) == 2 for v in results.values())
    bad = subprocess.run([*cmd[:-2], "--model", "nope", paths[0]], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert bad.returncode == 1 and "NOT_FOUND" in bad.stderr


def test_sigterm_drains_in_flight_requests_then_exits_0(tmp_path):
    # A long queue delay keeps requests in flight when SIGTERM lands.
    srv = start_server(tmp_path, "--max-queue-delay-ms", "400", "--max-batch-size", "64", "--batch-window", "fixed")
    images = [encode(s.image) for s in make_scenes(16, seed=77)]

    async def load_then_term() -> list:
        async with grpc.aio.insecure_channel(srv.url) as ch:
            stub = pb_grpc.VisionStub(ch)
            calls = [
                asyncio.ensure_future(
                    stub.Classify(pb.ClassifyRequest(model="classifier", image=pb.Image(data=d)), timeout=30)
                )
                for d in images
            ]
            await asyncio.sleep(0.15)
            srv.proc.terminate()
            return await asyncio.gather(*calls, return_exceptions=True)

    results = asyncio.run(load_then_term())
    assert all(isinstance(r, pb.ClassifyResponse) for r in results), results
    started = time.monotonic()
    assert srv.proc.wait(timeout=30) == 0, srv.log()
    assert time.monotonic() - started < 30
    try:
        with grpc.insecure_channel(srv.url) as ch:
            pb_grpc.VisionStub(ch).Classify(pb.ClassifyRequest(model="classifier"), timeout=2)
        raise AssertionError("a stopped server answered")
    except grpc.RpcError as err:
        assert err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def metrics_table() -> str:
    """The docs' metrics table, from the registry itself (``from tests.test_service import metrics_table``)."""
    from prometheus_client import REGISTRY

    import optic.server.metrics  # noqa: F401 - registers the families

    rows = ["| metric | type | labels | meaning |", "|---|---|---|---|"]
    for family in sorted(REGISTRY.collect(), key=lambda f: f.name):
        if not family.name.startswith("optic_"):
            continue
        suffix = "_total" if family.type == "counter" else ""
        # prometheus_client keeps label names only on the collector (no public accessor): fine for a test.
        collector = REGISTRY._names_to_collectors[family.name + suffix]
        labels = ", ".join(f"`{n}`" for n in collector._labelnames)
        rows.append(f"| `{family.name}{suffix}` | {family.type} | {labels} | {family.documentation} |")
    return "\n".join(rows)


def test_docs_list_every_metric():
    """docs/operations.md's metrics table is exactly the registry's optic_* families."""
    text = (ROOT / "docs" / "operations.md").read_text()
    section = text.split("## Metrics", 1)[1].split("\n## ", 1)[0]
    table = "\n".join(line for line in section.splitlines() if line.startswith("|"))
    assert table == metrics_table()
