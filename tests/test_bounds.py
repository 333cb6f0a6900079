"""Every client's cost is bounded: one test per finding of the adversarial review (issue 15).

Each test drives one path at (or past) its limit with small limits set by
flags, and checks the server refuses by name, keeps answering everyone else,
and stays within its memory, file-descriptor and CPU bounds.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from benchmarks.bounds import spinning_model, striped_png, striped_segmenter  # the attacks, as benchmarked
from optic.export.data import make_scenes
from optic.proto.inference import grpc_service_pb2 as kpb
from optic.proto.inference import grpc_service_pb2_grpc as kpb_grpc
from optic.proto.optic.v1 import vision_pb2 as pb
from optic.proto.optic.v1 import vision_pb2_grpc as pb_grpc
from tests.conftest import MODEL_REPO, ROOT, SIDE, encode, free_port, metric_values, scrape, start_server
from tests.test_hostile import rss_mb

IMAGE = encode(make_scenes(1, seed=3)[0].image)


def copy_models(repo: Path, *names: str) -> Path:
    for name in names:
        shutil.copytree(MODEL_REPO / name, repo / name)
    return repo


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def classify_ok(url: str, timeout: float = 10) -> bool:
    with grpc.insecure_channel(url) as ch:
        stub = pb_grpc.VisionStub(ch)
        return bool(stub.Classify(pb.ClassifyRequest(model="classifier", image=pb.Image(data=IMAGE)), timeout=timeout))


def segmenter_batch(n: int = 2) -> kpb.ModelInferRequest:
    """1.5 MB of input, 3 MB of answer (n = 2 at the committed 256x256 input)."""
    x = np.random.default_rng(0).random((n, 3, SIDE, SIDE), dtype=np.float32)
    request = kpb.ModelInferRequest(model_name="segmenter")
    request.inputs.add(name="images", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    return request


# ---------------------------------------------------------------- 1. one stream holds a bounded number of bytes


def test_a_stream_that_is_never_read_holds_a_bounded_number_of_bytes(tmp_path):
    """60 requests of 1.5 MB with 3 MB answers, never read: the stream's byte window (8 MB) bounds what the server
    has taken in, whatever gRPC's own flow-control windows let the client write."""
    repo = copy_models(tmp_path / "repo", "segmenter", "classifier")
    srv = start_server(tmp_path, "--stream-window-mb", "8", "--max-message-mb", "16", repo=repo)
    try:
        before = rss_mb(srv.proc.pid)
        peak = [before]
        taken: list[float] = []  # request bytes the server has admitted and not yet answered
        request = segmenter_batch()

        def sample() -> None:
            peak.append(rss_mb(srv.proc.pid))
            taken.extend(bytes_in_flight(srv.metrics_url))

        async def flood() -> int:
            sent = 0
            # How many writes complete is gRPC's flow control, not ours: its windows grow with BDP probing, and a
            # client whose window grew takes the answers into its own memory (CI once saw all 60 accepted; a
            # 256 MB client window does it every time). The attacker keeps its window small; what the server
            # holds is checked by its admission gauge and RSS.
            async with grpc.aio.insecure_channel(srv.url, options=[("grpc.http2.bdp_probe", 0)]) as channel:
                call = kpb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer()
                for _ in range(60):
                    try:
                        await asyncio.wait_for(call.write(request), timeout=2.0)
                    except TimeoutError:
                        break  # the server stopped reading: flow control pushes back
                    sent += 1
                    sample()
                for _ in range(10):
                    await asyncio.sleep(0.3)
                    sample()
                assert classify_ok(srv.url)  # everyone else is still served
                call.cancel()
            return sent

        sent = asyncio.run(flood())
        time.sleep(2)
        after = rss_mb(srv.proc.pid)
        # Without the byte window the stream's 8 item slots would hold 12 MB of requests (and 24 MB of answers).
        assert max(taken) <= 8 * 2**20, f"{max(taken) / 2**20:.1f} MB of requests taken in ({sent} writes accepted)"
        assert max(peak) - before < 150, f"RSS {before:.0f} -> peak {max(peak):.0f} MB ({sent} writes accepted)"
        assert after - before < 80, f"RSS {before:.0f} -> {after:.0f} MB after the client left"
    finally:
        assert srv.stop() == 0, srv.log()


def test_request_bytes_in_flight_are_capped_by_their_size_on_the_wire(tmp_path):
    """--max-inflight-mb counts what each unary request occupies (its wire size): a second 14 MB tensor while the
    first runs is refused by name, a lone one always fits, and nothing stays counted afterwards."""
    repo = copy_models(tmp_path / "repo", "detector")
    srv = start_server(tmp_path, "--max-inflight-mb", "16", repo=repo)
    with grpc.insecure_channel(srv.url) as ch:
        meta = kpb_grpc.GRPCInferenceServiceStub(ch).ModelMetadata(kpb.ModelMetadataRequest(name="detector"))
        side = meta.inputs[0].shape[-1]
    x = np.random.default_rng(0).random((8, 3, side, side), dtype=np.float32)  # 14 MB at 384 px
    request = kpb.ModelInferRequest(model_name="detector")
    request.inputs.add(name="images", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    assert 8 * 2**20 < request.ByteSize() <= 16 * 2**20

    async def burst() -> list[grpc.StatusCode]:
        options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
        async with grpc.aio.insecure_channel(srv.url, options=options) as ch:
            stub = kpb_grpc.GRPCInferenceServiceStub(ch)

            async def one() -> grpc.StatusCode:
                try:
                    await stub.ModelInfer(request, timeout=60)
                    return grpc.StatusCode.OK
                except grpc.aio.AioRpcError as exc:
                    assert "--max-inflight-mb" in (exc.details() or ""), exc.details()
                    return exc.code()

            return await asyncio.gather(*(one() for _ in range(6)))

    try:
        codes = asyncio.run(burst())
        assert grpc.StatusCode.OK in codes and grpc.StatusCode.RESOURCE_EXHAUSTED in codes, codes
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
        options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
        with grpc.insecure_channel(srv.url, options=options) as ch:
            for _ in range(2):  # one after the other: each alone in flight, each admitted
                kpb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(request, timeout=60)
        metrics = urllib.request.urlopen(srv.metrics_url, timeout=5).read().decode()
        assert 'optic_admission_inflight{kind="bytes"} 0.0' in metrics
        assert 'optic_admission_limit{kind="bytes"} 1.6777216e+07' in metrics
    finally:
        assert srv.stop() == 0, srv.log()


@pytest.mark.parametrize("path", ["ModelInfer", "ModelStreamInfer", "DetectStream"])
def test_admission_counts_a_request_by_the_bytes_it_arrived_as(tmp_path, path):
    """A request's bytes in flight are the bytes it arrived as, unary call or stream item, not its re-encoded
    size (which costs a second encoding): a client that pads a request with a field it then overrides (8 MB of
    ``id`` or ``model``, then the real one) is counted at 8 MB more than its parsed form, while it runs."""
    repo = copy_models(tmp_path / "repo", "segmenter", "detector")
    srv = start_server(tmp_path, "--max-batch-size", "0", repo=repo)
    pad = "x" * (8 << 20)
    if path == "DetectStream":  # a flat 12 Mpx PNG: 42 kB that take ~0.1 s to decode
        image = pb.Image(data=encode(np.full((3000, 4000, 3), 40, np.uint8)))
        parsed: Any = pb.DetectFrame(frame_id=7, request=pb.DetectRequest(model="detector", image=image))
        padding = pb.DetectFrame(request=pb.DetectRequest(model=pad)).SerializeToString()
        method, parse = "/optic.v1.Vision/DetectStream", pb.DetectFrame.FromString
    else:
        parsed = segmenter_batch(4)  # 3 MB of input; ~0.2 s on 2 cores
        parsed.id = "7"
        padding = kpb.ModelInferRequest(id=pad).SerializeToString()
        method, parse = f"/inference.GRPCInferenceService/{path}", kpb.ModelInferRequest.FromString
    wire = padding + parsed.SerializeToString()
    assert parse(wire) == parsed and len(wire) > parsed.ByteSize() + (8 << 20)

    seen: list[float] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            seen.extend(bytes_in_flight(srv.metrics_url))
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
        with grpc.insecure_channel(srv.url, options=options) as ch:
            for _ in range(3):
                if path == "ModelInfer":
                    answer = kpb.ModelInferResponse.FromString(ch.unary_unary(method)(wire, timeout=60))
                    assert answer.id == "7"
                    continue
                (item,) = list(ch.stream_stream(method)(iter([wire]), timeout=60))
                if path == "ModelStreamInfer":
                    reply = kpb.ModelStreamInferResponse.FromString(item)
                    assert not reply.error_message and reply.infer_response.id == "7", reply.error_message
                else:
                    frame = pb.DetectFrameResult.FromString(item)
                    assert not frame.error_code and frame.frame_id == 7, frame.error_message
        done.set()
        watcher.join()
        # Admission lets go of a request before its answer is sent: a scrape after the last answer reads 0.
        assert bytes_in_flight(srv.metrics_url) == [0.0]
    finally:
        done.set()
        watcher.join()
        assert srv.stop() == 0, srv.log()
    assert max(seen) == len(wire), f"largest bytes in flight seen {max(seen):.0f}; the request was {len(wire)}"


def bytes_in_flight(metrics_url: str) -> list[float]:
    """The admission gauge of request bytes in flight, as /metrics says now."""
    return metric_values(scrape(metrics_url), "optic_admission_inflight", kind="bytes")


# ---------------------------------------------------------------- 2. idle streams lock nobody out


def test_idle_streams_hold_no_call_slots_and_time_out(tmp_path):
    repo = copy_models(tmp_path / "repo", "classifier", "detector")
    srv = start_server(tmp_path, "--max-inflight", "4", "--max-streams", "12", "--stream-idle-seconds", "2", repo=repo)

    async def scenario() -> None:
        channels = [grpc.aio.insecure_channel(srv.url) for _ in range(4)]
        streams = []
        for i in range(12):  # three times --max-inflight, never written to
            call = kpb_grpc.GRPCInferenceServiceStub(channels[i % 4]).ModelStreamInfer()
            streams.append(call)
        await asyncio.sleep(0.5)
        # Unary calls still get slots (streams take a slot per item, not per stream)...
        assert await asyncio.to_thread(classify_ok, srv.url)
        async with grpc.aio.insecure_channel(srv.url) as ch:
            ready = await kpb_grpc.GRPCInferenceServiceStub(ch).ServerReady(kpb.ServerReadyRequest(), timeout=5)
            assert ready.ready
            # ...but the stream budget is full.
            extra = kpb_grpc.GRPCInferenceServiceStub(ch).ModelStreamInfer()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await extra.read()
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-streams" in err.value.details()
        # Idle streams end by themselves.
        for call in streams:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await asyncio.wait_for(call.read(), timeout=10)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "idle" in err.value.details()
        for ch in channels:
            await ch.close()

    try:
        asyncio.run(scenario())
        metrics = urllib.request.urlopen(srv.metrics_url, timeout=5).read().decode()
        assert 'optic_admission_inflight{kind="streams"} 0.0' in metrics
        assert 'optic_admission_limit{kind="inflight"} 4.0' in metrics
    finally:
        assert srv.stop() == 0, srv.log()


def test_streams_per_connection_are_capped(tmp_path):
    repo = copy_models(tmp_path / "repo", "classifier")
    srv = start_server(tmp_path, "--max-streams-per-connection", "3", repo=repo)

    async def scenario() -> None:
        async with grpc.aio.insecure_channel(srv.url) as busy:
            stub = kpb_grpc.GRPCInferenceServiceStub(busy)
            held = [stub.ModelStreamInfer() for _ in range(3)]
            await asyncio.sleep(0.5)
            # A fourth call on the same connection waits for a stream slot (HTTP/2 MAX_CONCURRENT_STREAMS)...
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.ServerLive(kpb.ServerLiveRequest(), timeout=1.0)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            # ...while another connection (not shared: gRPC pools subchannels per process) is served at once.
            async with grpc.aio.insecure_channel(srv.url, options=[("grpc.use_local_subchannel_pool", 1)]) as other:
                live = await kpb_grpc.GRPCInferenceServiceStub(other).ServerLive(kpb.ServerLiveRequest(), timeout=5)
                assert live.live
            for call in held:
                call.cancel()

    try:
        asyncio.run(scenario())
    finally:
        assert srv.stop() == 0, srv.log()


# ---------------------------------------------------------------- 3. health Watch is bounded


def test_health_watch_streams_are_bounded(tmp_path):
    repo = copy_models(tmp_path / "repo", "classifier")
    srv = start_server(tmp_path, "--max-streams", "8", repo=repo)

    async def scenario() -> None:
        async with grpc.aio.insecure_channel(srv.url) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            watches = [stub.Watch(health_pb2.HealthCheckRequest(service="")) for _ in range(8)]
            for w in watches:
                assert (await w.read()).status == health_pb2.HealthCheckResponse.SERVING
            extra = stub.Watch(health_pb2.HealthCheckRequest(service=""))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await extra.read()
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            check = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)  # probes get through
            assert check.status == health_pb2.HealthCheckResponse.SERVING
            for w in watches:
                w.cancel()

    try:
        asyncio.run(scenario())
    finally:
        assert srv.stop() == 0, srv.log()


# ---------------------------------------------------------------- 4. the metrics port cannot starve the gRPC port


def test_half_sent_metrics_requests_cost_a_bounded_number_of_fds(tmp_path):
    repo = copy_models(tmp_path / "repo", "classifier")
    srv = start_server(tmp_path, "--metrics-max-connections", "4", "--metrics-timeout-seconds", "1", repo=repo)
    sockets = []
    try:
        before = fds(srv.proc.pid)
        for _ in range(60):
            s = socket.create_connection(("127.0.0.1", srv.metrics_port))
            s.sendall(b"GET /metr")  # never finished
            sockets.append(s)
        time.sleep(0.5)
        during = fds(srv.proc.pid)
        assert during - before <= 4 + 8, f"{before} -> {during} fds"  # the cap, and a few being closed
        assert classify_ok(srv.url)
        time.sleep(1.5)  # past the timeout: the half-sent ones are gone
        assert fds(srv.proc.pid) - before <= 2
        body = urllib.request.urlopen(srv.metrics_url, timeout=5).read().decode()
        assert "optic_requests_total" in body
        # Half-sent requests from one address take at most a quarter of the cap: a scraper elsewhere (another
        # loopback address here) still gets its answer while they are held.
        for _ in range(8):
            s = socket.create_connection(("127.0.0.1", srv.metrics_port), source_address=("127.0.0.2", 0))
            s.sendall(b"GET /metr")
            sockets.append(s)
        time.sleep(0.2)
        body = urllib.request.urlopen(srv.metrics_url, timeout=5).read().decode()
        assert "optic_requests_total" in body
    finally:
        for s in sockets:
            s.close()
        assert srv.stop() == 0, srv.log()


def test_metrics_can_require_the_token(tmp_path):
    repo = copy_models(tmp_path / "repo", "classifier")
    token = "metrics-token-0123456789abcdef"
    (tmp_path / "tokens").write_text(token + "\n")
    srv = start_server(
        tmp_path, "--auth-token-file", str(tmp_path / "tokens"), "--metrics-token", repo=repo, health_port=True
    )
    try:
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(srv.metrics_url, timeout=5)
        assert err.value.code == 401
        request = urllib.request.Request(srv.metrics_url, headers={"Authorization": f"Bearer {token}"})
        assert b"optic_requests_total" in urllib.request.urlopen(request, timeout=5).read()
    finally:
        assert srv.stop() == 0, srv.log()


# ---------------------------------------------------------------- 5. a model whose warm-up never ends


def index(url: str) -> dict[str, tuple[str, str]]:
    with grpc.insecure_channel(url) as ch:
        answer = kpb_grpc.GRPCInferenceServiceStub(ch).RepositoryIndex(kpb.RepositoryIndexRequest(), timeout=10)
    return {m.name: (m.state, m.reason) for m in answer.models}


def test_a_model_that_never_warms_up_is_abandoned_and_holds_nothing_back(tmp_path):
    repo = copy_models(tmp_path / "repo", "classifier")
    spinning_model(repo / "spin" / "1" / "model.onnx")
    started = time.monotonic()
    srv = start_server(
        tmp_path, "--model-load-timeout-seconds", "2", "--model-control-mode", "poll", "--repository-poll-secs",
        "0.5", "--grace-seconds", "3", repo=repo,
    )  # fmt: skip
    try:
        assert time.monotonic() - started < 30
        state, reason = index(srv.url)["spin"]
        assert state == "UNAVAILABLE" and "took over 2 s; abandoned" in reason
        assert classify_ok(srv.url)
        # Its thread was given back: the process is idle, not spinning a core.
        cpu = cpu_seconds(srv.proc.pid)
        time.sleep(2)
        assert cpu_seconds(srv.proc.pid) - cpu < 0.5
        # A model added afterwards loads (the loader is not wedged). The classifier again, under a new name: it
        # loads well within the 2 s given here; the detector's two warm-ups took over 2 s on a busy CI machine.
        shutil.copytree(MODEL_REPO / "classifier", repo / "classifier_again")
        deadline = time.monotonic() + 30
        while index(srv.url).get("classifier_again", ("", ""))[0] != "READY":
            assert time.monotonic() < deadline, index(srv.url)
            time.sleep(0.3)
    finally:
        stopping = time.monotonic()
        assert srv.stop() == 0, srv.log()
        assert time.monotonic() - stopping < 3 + 10


def test_poll_mode_loads_other_models_while_one_load_hangs(tmp_path):
    """A hanging load found by a scan holds back neither the models added after it nor later scans."""
    repo = copy_models(tmp_path / "repo", "classifier")
    srv = start_server(
        tmp_path, "--model-load-timeout-seconds", "60", "--model-control-mode", "poll", "--repository-poll-secs",
        "0.3", "--grace-seconds", "2", repo=repo,
    )  # fmt: skip
    try:
        spinning_model(repo / "spin" / "1" / "model.onnx")
        time.sleep(1.5)  # a scan has found it and is stuck in its warm-up
        shutil.copytree(MODEL_REPO / "classifier", repo / "classifier_again")  # loads in ~0.5 s, the detector in 3-5
        deadline = time.monotonic() + 15  # not the 60 s the hanging load may take
        while index(srv.url).get("classifier_again", ("", ""))[0] != "READY":
            assert time.monotonic() < deadline, index(srv.url)
            time.sleep(0.3)
        assert classify_ok(srv.url)
    finally:
        stopping = time.monotonic()
        assert srv.stop() == 0, srv.log()
        assert time.monotonic() - stopping < 2 + 10


def test_sigterm_during_a_stuck_load_exits_within_the_grace_period(tmp_path):
    repo = tmp_path / "repo"
    spinning_model(repo / "spin" / "1" / "model.onnx")
    copy_models(repo, "classifier")
    log = tmp_path / "stuck.log"
    port = str(free_port())
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "optic.server.cli", "serve", "--model-repo", str(repo), "--host", "127.0.0.1",
             "--grpc-port", port, "--metrics-port", "0", "--model-load-timeout-seconds", "600",
             "--grace-seconds", "2", "--workers", "1"],
            stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
        )  # fmt: skip
    time.sleep(6)  # loading: the spinning warm-up holds a loader thread
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0, log.read_text()
    assert time.monotonic() - sent < 2 + 10, log.read_text()


# ---------------------------------------------------------------- 6. odd directories fail only their model


def test_odd_version_directories_fail_only_their_model(tmp_path):
    repo = copy_models(tmp_path / "repo", "classifier")
    (repo / "weird" / "²").mkdir(parents=True)
    shutil.copy(MODEL_REPO / "classifier" / "1" / "model.onnx", repo / "weird" / "²" / "model.onnx")
    shutil.copytree(MODEL_REPO / "classifier" / "1", repo / "mixed" / "1")
    (repo / "mixed" / "³").mkdir()
    srv = start_server(tmp_path, repo=repo)
    try:
        states = index(srv.url)
        assert states["classifier"][0] == "READY" and states["mixed"][0] == "READY"
        assert states["weird"][0] == "UNAVAILABLE" and "no <version>/model.onnx" in states["weird"][1]
    finally:
        assert srv.stop() == 0, srv.log()
    explicit = start_server(tmp_path, "--model-control-mode", "explicit", repo=repo)
    try:
        with grpc.insecure_channel(explicit.url) as ch:
            stub = kpb_grpc.GRPCInferenceServiceStub(ch)
            with pytest.raises(grpc.RpcError) as err:
                stub.RepositoryModelLoad(kpb.RepositoryModelLoadRequest(model_name="weird"), timeout=30)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        assert explicit.stop() == 0, explicit.log()


# ---------------------------------------------------------------- 7. output work is bounded before it is done


@pytest.fixture(scope="module")
def budget_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("budget")
    repo = copy_models(tmp / "repo", "classifier", "segmenter")
    striped_segmenter(repo / "stripes" / "1" / "model.onnx")
    srv = start_server(tmp, "--max-call-pixels", "60000000", "--max-message-mb", "16", repo=repo)
    yield srv
    assert srv.stop() == 0, srv.log()


def test_rle_of_a_striped_image_is_refused_before_it_is_built(budget_server):
    srv = budget_server
    data = striped_png(625_000, 64)  # 40 M pixels in ~120 KB, 40 M runs
    before, cpu = rss_mb(srv.proc.pid), cpu_seconds(srv.proc.pid)
    peak = [before]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set() and srv.proc.poll() is None:
            peak.append(rss_mb(srv.proc.pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    with grpc.insecure_channel(srv.url, options=[("grpc.max_send_message_length", 1 << 26)]) as ch:
        stub = pb_grpc.VisionStub(ch)
        request = pb.SegmentRequest(model="stripes", image=pb.Image(data=data), return_rle=True)
        with pytest.raises(grpc.RpcError) as err:
            stub.Segment(request, timeout=60)
    stop.set()
    sampler.join()
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-rle-runs" in err.value.details()
    assert cpu_seconds(srv.proc.pid) - cpu < 8, "the refusal came after the work"
    assert max(peak) - before < 700, f"RSS {before:.0f} -> peak {max(peak):.0f} MB"
    # Refusals raised in post-processing keep nothing: their tracebacks' frames (holding the class map and
    # its run scratch) would otherwise sit in asyncio's reference cycles until a full collection (+260 MB
    # after 50 refusals of 10 Mpx).
    with grpc.insecure_channel(srv.url, options=[("grpc.max_send_message_length", 1 << 26)]) as ch:
        stub = pb_grpc.VisionStub(ch)
        for _ in range(4):
            with pytest.raises(grpc.RpcError):
                stub.Segment(request, timeout=60)
    time.sleep(6)  # the server hands freed pages back every 5 s
    assert rss_mb(srv.proc.pid) - before < 60, f"RSS {before:.0f} -> {rss_mb(srv.proc.pid):.0f} MB when idle"
    assert classify_ok(srv.url)


def test_mask_pixels_and_answer_size_are_checked_before_decoding(budget_server):
    with grpc.insecure_channel(budget_server.url, options=[("grpc.max_send_message_length", 1 << 26)]) as ch:
        stub = pb_grpc.VisionStub(ch)
        data = striped_png(625_000, 64)
        two = pb.SegmentRequest(model="segmenter", images=[pb.Image(data=data)] * 2)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            stub.Segment(two, timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "--max-call-pixels" in err.value.details()
        assert time.monotonic() - started < 2
        ok = stub.Segment(pb.SegmentRequest(model="segmenter", image=pb.Image(data=IMAGE), return_rle=True), timeout=30)
        assert ok.results[0].classes and ok.results[0].classes[0].rle_counts


# ---------------------------------------------------------------- 8. decode is fair


def test_the_pools_turns_put_a_newcomer_ahead_of_whoever_just_started_but_no_further():
    """The order in which :class:`FairExecutor` starts jobs, with a real pool of 2 threads (one per connection
    at a time) and jobs held until released: what a big call's images do to small calls beside it."""
    from concurrent.futures import ThreadPoolExecutor

    from optic.server.tasks.fair import FairExecutor

    started: list[str] = []
    gates: dict[str, threading.Event] = {}

    def job(name: str) -> str:
        started.append(name)
        gates[name].wait(10)
        return name

    async def scenario() -> list[str]:
        pool = ThreadPoolExecutor(2)
        fair = FairExecutor(pool, 2)
        tasks: dict[str, asyncio.Task[str]] = {}

        async def submit(name: str, call: str, conn: str = "conn") -> None:
            gates[name] = threading.Event()
            tasks[name] = asyncio.create_task(fair.run(call, job, name, connection=conn))
            await asyncio.sleep(0.1)  # the pool's thread has started the next job

        async def finish(name: str) -> None:
            gates[name].set()
            await tasks[name]
            await asyncio.sleep(0.1)  # the pool's thread has started the next job

        for i in range(1, 5):  # one call, four images, on one connection: one at a time (its share)
            await submit(f"big{i}", "big")
        await submit("small1", "small1")  # a second call on that connection, while big1 runs
        await finish("big1")  # small1 next, not big2 (it queued behind big, which had just started)
        await finish("small1")
        await submit("small2", "small2")
        await submit("small3", "small3")  # two newcomers while big2 runs: both ahead of big, in their order
        for name in ("big2", "small2", "small3"):
            await finish(name)
        await submit("small4", "small4")  # arrives while big3 runs: ahead of big4
        await submit("other", "other", conn="other")  # another connection: the second worker, at once
        for name in ("big3", "small4", "big4", "other"):
            await finish(name)
        pool.shutdown()
        # Nothing running or waiting: nothing kept (no call object per connection ever seen).
        assert fair._last_call == {} and fair._last_conn is None and not fair._queues and not fair._active
        return started

    order = asyncio.run(scenario())
    assert order == ["big1", "small1", "big2", "small2", "small3", "big3", "other", "small4", "big4"], order


def grey16_png(width: int, height: int) -> bytes:
    plane = (np.arange(width * height, dtype=np.uint32) % 65536).astype(np.uint16).reshape(height, width)
    buf = io.BytesIO()
    Image.fromarray(plane).save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def test_a_call_of_huge_images_cannot_starve_small_calls(tmp_path):
    repo = copy_models(tmp_path / "repo", "classifier")
    srv = start_server(tmp_path, "--max-call-pixels", "200000000", repo=repo)
    big = grey16_png(6000, 5000)  # 30 M pixels: ~0.7 s each to decode and resize here
    victim = encode(np.asarray(Image.fromarray(make_scenes(1, seed=9)[0].image).resize((640, 480))), "JPEG")
    try:
        with grpc.insecure_channel(srv.url, options=[("grpc.max_send_message_length", 1 << 28)]) as ch:
            stub = pb_grpc.VisionStub(ch)
            # 64 of them: refused from their headers, at once.
            with pytest.raises(grpc.RpcError) as err:
                stub.Classify(pb.ClassifyRequest(model="classifier", images=[pb.Image(data=big)] * 64), timeout=30)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "--max-call-pixels" in err.value.details()
            # 4 of them (within the budget) keep a worker busy for seconds. That is the connection's share of the
            # pool, so small calls on it take turns with the big one: each waits for the image being decoded at
            # most, not for the next one too (the order is tested above, step by step).
            heavy = stub.Classify.future(
                pb.ClassifyRequest(model="classifier", images=[pb.Image(data=big)] * 4), timeout=120
            )
            time.sleep(0.3)
            latencies = []
            for _ in range(5):
                started = time.monotonic()
                stub.Classify(pb.ClassifyRequest(model="classifier", image=pb.Image(data=victim)), timeout=5)
                latencies.append(time.monotonic() - started)
            assert not heavy.done() or heavy.result(), "the heavy call should still be decoding"
            heavy.result()
        assert max(latencies) < 2.0, latencies
        # Eight such calls of 2 from one client (one connection): the victim, on its own connection, waits for
        # one of them at most, not for all eight (turns go to connections first, then to their calls).
        with grpc.insecure_channel(srv.url, options=[("grpc.max_send_message_length", 1 << 28)]) as ch, \
                grpc.insecure_channel(srv.url, options=[("grpc.use_local_subchannel_pool", 1)]) as own:  # fmt: skip
            request = pb.ClassifyRequest(model="classifier", images=[pb.Image(data=big)] * 2)
            flood = [pb_grpc.VisionStub(ch).Classify.future(request, timeout=120) for _ in range(8)]
            time.sleep(0.3)
            latencies = []
            for _ in range(5):
                started = time.monotonic()
                pb_grpc.VisionStub(own).Classify(pb.ClassifyRequest(model="classifier", image=pb.Image(data=victim)),
                                                 timeout=5)  # fmt: skip
                latencies.append(time.monotonic() - started)
            for f in flood:
                f.cancel()
        assert max(latencies) < 2.0, latencies
    finally:
        assert srv.stop() == 0, srv.log()


# ---------------------------------------------------------------- 9. refused payloads are not retained


def test_refused_big_requests_leave_no_memory_behind(tmp_path):
    repo = copy_models(tmp_path / "repo", "classifier")
    token = "retained-token-0123456789abcdef"
    (tmp_path / "tokens").write_text(token + "\n")
    srv = start_server(
        tmp_path, "--auth-token-file", str(tmp_path / "tokens"), "--max-message-mb", "64", repo=repo,
        health_port=True,
    )  # fmt: skip
    blob = np.zeros(30 * 2**20 // 4, np.float32).tobytes()
    request = kpb.ModelInferRequest(model_name="classifier")
    request.inputs.add(name="images", datatype="FP32", shape=[1, 3, 64, 64])
    request.raw_input_contents.append(blob)  # 30 MB: the wrong size for the shape
    try:
        time.sleep(1)
        before = rss_mb(srv.proc.pid)
        with grpc.insecure_channel(srv.url, options=[("grpc.max_send_message_length", 1 << 27)]) as ch:
            stub = kpb_grpc.GRPCInferenceServiceStub(ch)
            for metadata, code in (
                (None, grpc.StatusCode.UNAUTHENTICATED),
                ((("authorization", f"Bearer {token}"),), grpc.StatusCode.INVALID_ARGUMENT),
            ):
                for _ in range(15):
                    with pytest.raises(grpc.RpcError) as err:
                        stub.ModelInfer(request, timeout=30, metadata=metadata)
                    assert err.value.code() == code
        time.sleep(1.5)
        after = rss_mb(srv.proc.pid)
        assert after - before < 150, f"RSS {before:.0f} -> {after:.0f} MB after 30 refused 30 MB requests"
    finally:
        assert srv.stop() == 0, srv.log()


# ---------------------------------------------------------------- 10. cancelled streams leave no tracebacks


def test_cancelled_streams_log_no_tracebacks(tmp_path):
    """Streams cancelled at any point (mid-window, right after a write, after the last answer) leave no
    "Task exception was never retrieved" and no traceback behind."""
    repo = copy_models(tmp_path / "repo", "detector", "classifier")
    srv = start_server(tmp_path, repo=repo)
    infer = kpb.ModelInferRequest(model_name="classifier")
    infer.inputs.add(name="images", datatype="FP32", shape=[1, 3, SIDE, SIDE])
    infer.raw_input_contents.append(np.zeros((1, 3, SIDE, SIDE), np.float32).tobytes())

    async def scenario() -> None:
        async with grpc.aio.insecure_channel(srv.url) as ch:
            for n in range(20):
                call = pb_grpc.VisionStub(ch).DetectStream()
                for i in range(6):
                    frame = pb.DetectRequest(model="detector", image=pb.Image(data=IMAGE))
                    await call.write(pb.DetectFrame(frame_id=i, request=frame))
                if n % 2:
                    await call.read()
                call.cancel()
            for n in range(30):
                stream = kpb_grpc.GRPCInferenceServiceStub(ch).ModelStreamInfer()
                for _ in range(1 + n % 3):
                    await stream.write(infer)
                if n % 3 == 0:
                    await stream.done_writing()
                if n % 2:
                    await stream.read()
                stream.cancel()
            await asyncio.sleep(0.5)

    try:
        asyncio.run(scenario())
        time.sleep(1)
        assert classify_ok(srv.url)
    finally:
        assert srv.stop() == 0, srv.log()
    log = srv.log()
    assert "Traceback" not in log and "never retrieved" not in log, log[-3000:]


# ---------------------------------------------------------------- 11. RepositoryModelLoad does what it says


def test_load_overrides_are_applied_or_refused(tmp_path):
    import tritonclient.grpc as tc

    repo = copy_models(tmp_path / "repo", "classifier", "detector")
    srv = start_server(tmp_path, "--model-control-mode", "explicit", "--load-model", "classifier", repo=repo)
    try:
        client = tc.InferenceServerClient(srv.url)
        client.load_model("classifier", config=json.dumps({"max_batch_size": 4}))
        assert client.get_model_config("classifier").config.max_batch_size == 4
        detector = (MODEL_REPO / "detector" / "1" / "model.onnx").read_bytes()
        client.load_model("fresh", config=json.dumps({"max_batch_size": 2}), files={"file:7/model.onnx": detector})
        assert client.get_model_metadata("fresh").versions == ["7"]
        assert classify_ok(srv.url)
        for files, phrase in (({"file:../x/model.onnx": detector}, "is not one Optic applies"),
                              ({"file:1/../../x": detector}, "is not one Optic applies")):  # fmt: skip
            with pytest.raises(tc.InferenceServerException) as err:
                client.load_model("evil", config="{}", files=files)
            assert "INVALID_ARGUMENT" in str(err.value.status()) and phrase in err.value.message()
        with pytest.raises(tc.InferenceServerException) as err:
            client.load_model("evil2", files={"file:1/model.onnx": detector})
        assert "need a 'config'" in err.value.message()
        assert not any(p.name.startswith(("evil", "..")) for p in repo.iterdir())
        client.unload_model("fresh")
    finally:
        assert srv.stop() == 0, srv.log()


# ---------------------------------------------------------------- the memory formula holds at its limits


def ten_megapixel_png() -> bytes:
    """4000x2500 (the --max-image-pixels of the test below) that compresses under its 16 MB message limit."""
    yy, xx = np.mgrid[0:2500, 0:4000]
    pixels = np.stack([xx % 256, yy % 256, (xx + yy) % 256], -1).astype(np.uint8)
    pixels[::7, ::5] = np.random.default_rng(1).integers(0, 256, pixels[::7, ::5].shape)
    return encode(pixels, "PNG")


def test_memory_stays_under_the_documented_formula_with_every_path_at_its_limit(tmp_path):
    """Each path of the formula alone, then all at once, at the limits the flags set; peak RSS above idle
    must stay under the formula's terms for that path (``receiving``: the calls the load sends at once)."""
    from optic.server.limits import worst_case_memory

    repo = copy_models(tmp_path / "repo", "classifier", "segmenter")
    striped_segmenter(repo / "stripes" / "1" / "model.onnx")
    mb = 2**20
    flags = {
        "--max-inflight": 64, "--max-inflight-mb": 24, "--max-message-mb": 16, "--max-streams": 4,
        "--stream-window-mb": 4, "--max-image-pixels": 10_000_000, "--max-rle-runs": 1_000_000,
        "--max-call-pixels": 40_000_000, "--max-output-pixels": 40_000_000,
    }  # fmt: skip
    srv = start_server(tmp_path, *(str(x) for kv in flags.items() for x in kv), repo=repo)

    def formula(receiving: int) -> dict[str, int]:
        return worst_case_memory(
            max_inflight=64, max_inflight_bytes=24 * mb, max_message_bytes=16 * mb, max_streams=4,
            stream_window_bytes=4 * mb, workers=os.cpu_count() or 1, max_image_pixels=10_000_000,
            max_rle_runs=1_000_000, receiving=receiving,
        )  # fmt: skip

    big_image, stripes = ten_megapixel_png(), striped_png(156_250, 64)  # both 10 M pixels
    assert len(big_image) < 16 * mb
    stop = threading.Event()
    errors: list[str] = []
    answered: dict[str, int] = {}

    def unary_big_tensors() -> None:
        request = segmenter_batch()
        request.raw_input_contents[0] = request.raw_input_contents[0] * 5  # 7.5 MB: refused after parsing
        with grpc.insecure_channel(srv.url, options=[("grpc.max_send_message_length", 1 << 25)]) as ch:
            stub = kpb_grpc.GRPCInferenceServiceStub(ch)
            while not stop.is_set():
                try:
                    stub.ModelInfer(request, timeout=30)
                except grpc.RpcError as exc:
                    if exc.code() not in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED):
                        errors.append(exc.code().name)
                answered["unary"] = answered.get("unary", 0) + 1

    def vision(kind: str) -> None:
        with grpc.insecure_channel(srv.url, options=[("grpc.max_send_message_length", 1 << 25)]) as ch:
            stub = pb_grpc.VisionStub(ch)
            request, call = {
                "images": (pb.SegmentRequest(model="segmenter", image=pb.Image(data=big_image)), stub.Segment),
                "classify": (pb.ClassifyRequest(model="classifier", images=[pb.Image(data=big_image)] * 2),
                             stub.Classify),
                "rle": (pb.SegmentRequest(model="stripes", image=pb.Image(data=stripes), return_rle=True),
                        stub.Segment),
            }[kind]  # fmt: skip
            while not stop.is_set():
                try:
                    call(request, timeout=60)
                except grpc.RpcError as exc:
                    if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or kind != "rle":
                        errors.append(f"{kind}: {exc.code().name}")
                answered[kind] = answered.get(kind, 0) + 1

    async def unread_streams() -> None:
        """Four streams (the --max-streams) write 1.5 MB requests with 3 MB answers and never read."""
        request = segmenter_batch()
        async with grpc.aio.insecure_channel(srv.url) as channel:
            calls = [kpb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer() for _ in range(4)]

            async def write(call: grpc.aio.StreamStreamCall) -> None:
                for _ in range(30):
                    await call.write(request)

            writers = [asyncio.ensure_future(write(call)) for call in calls]
            while not stop.is_set():
                await asyncio.sleep(0.1)
            assert not any(call.done() for call in calls), "a stream ended before the client cancelled it"
            for call in calls:
                call.cancel()
            await asyncio.gather(*writers, return_exceptions=True)

    def run(loads: list[threading.Thread], seconds: float) -> float:
        stop.clear()
        time.sleep(1)
        base = rss_mb(srv.proc.pid)
        for t in loads:
            t.start()
        peak, deadline = base, time.monotonic() + seconds
        while time.monotonic() < deadline:
            peak = max(peak, rss_mb(srv.proc.pid))
            time.sleep(0.05)
        stop.set()
        for t in loads:
            t.join(timeout=90)
        return peak - base

    def threads(target: object, n: int, *args: object) -> list[threading.Thread]:
        return [threading.Thread(target=target, args=args) for _ in range(n)]  # type: ignore[arg-type]

    streams = lambda: threading.Thread(target=lambda: asyncio.run(unread_streams()))  # noqa: E731
    paths = {  # path: (load, concurrent calls, the formula's terms it may use)
        "unary": (lambda: threads(unary_big_tensors, 6), 6, ("calls", "receiving")),
        "streams": (lambda: [streams()], 4, ("calls", "receiving", "streams")),
        "images": (lambda: threads(vision, 2, "images") + threads(vision, 1, "classify"), 3,
                   ("calls", "receiving", "images")),
        "rle": (lambda: threads(vision, 3, "rle"), 3, ("calls", "receiving", "images", "rle")),
        "all": (lambda: threads(unary_big_tensors, 6) + threads(vision, 2, "images") + threads(vision, 3, "rle")
                + [streams()], 15, ("total",)),
    }  # fmt: skip
    try:
        report = []
        for path, (load, receiving, terms) in paths.items():
            allowed = sum(formula(receiving)[t] for t in terms) / mb
            used = run(load(), 12 if path == "all" else 5)
            report.append(f"{path}: peak +{used:.0f} MB, formula {allowed:.0f} MB")
            assert used <= allowed, report
        print("\nmemory formula check: " + "; ".join(report))
        assert not errors, errors[:5]
        assert set(answered) == {"unary", "images", "classify", "rle"}, answered
        assert classify_ok(srv.url)
    finally:
        stop.set()
        assert srv.stop() == 0, srv.log()


def test_log_lines_a_client_can_cause_are_rate_limited():
    """Warnings and errors (a client can provoke some on demand) are kept to 20 a minute per call site, also when
    each message arrives formatted with a new object's name in it (asyncio's "Task exception was never retrieved")."""
    from optic.server.logs import RateLimit

    now = [0.0]
    limit = RateLimit(burst=20, seconds=60, clock=lambda: now[0])

    def record(level: int, msg: str, line: int = 1) -> logging.LogRecord:
        return logging.LogRecord("optic.x", level, __file__, line, msg, ("a",), None)

    kept = [limit.filter(record(logging.ERROR, f"task <Task-{i}> exception was never retrieved")) for i in range(1000)]
    assert sum(kept) == 20
    assert all(limit.filter(record(logging.INFO, "loaded %s")) for _ in range(100)), "the server's own lines stay"
    assert limit.filter(record(logging.ERROR, "another site %s", line=2))
    now[0] = 61.0
    first = record(logging.ERROR, "batch of %s failed")
    assert limit.filter(first) and "980 more like this dropped" in first.getMessage()
    for line in range(5000):  # however many call sites, the table stays bounded
        limit.filter(record(logging.WARNING, "odd", line=line))
    assert len(limit._sites) <= 1000
