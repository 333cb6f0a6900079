"""Faults: model files broken on disk while serving, SIGTERM under load, clients that give up, models that
fail at run time. Real servers on temporary repositories; the failing and slow models are built here."""

from __future__ import annotations

import shutil
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from onnx import TensorProto, helper, numpy_helper
from tritonclient.grpc import service_pb2 as kpb
from tritonclient.grpc import service_pb2_grpc as kpb_grpc

from tests.conftest import MODEL_REPO, SIDE, start_server

SLOW_DIM = 1024


def write_model(repo: Path, name: str, model: onnx.ModelProto, config: str) -> None:
    (repo / name / "1").mkdir(parents=True)
    onnx.save(model, str(repo / name / "1" / "model.onnx"))
    (repo / name / "config.pbtxt").write_text(config)


def slow_model(matmuls: int) -> onnx.ModelProto:
    """x [N, 1] -> y [N, 1024]: ``matmuls`` 1024x1024 matrix products per sample (~5 ms each on 2 cores)."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array((rng.standard_normal((SLOW_DIM, SLOW_DIM)) / 32).astype(np.float32), "w"),
        numpy_helper.from_array(np.ones((SLOW_DIM, SLOW_DIM), np.float32), "ones"),
        numpy_helper.from_array(np.array([-1, 1, 1], np.int64), "shape"),
    ]
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["x3"]), helper.make_node("Mul", ["x3", "ones"], ["m"])]
    for i in range(matmuls):
        nodes.append(helper.make_node("MatMul", ["m" if i == 0 else f"m{i - 1}", "w"], [f"m{i}"]))
    nodes.append(helper.make_node("ReduceMean", [f"m{matmuls - 1}"], ["y"], axes=[2], keepdims=0))
    graph = helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", SLOW_DIM])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def divide_model() -> onnx.ModelProto:
    """d [N, 1] int64 -> y [N, 1] = 100 // d: a zero makes onnxruntime fail at run time (integer division)."""
    hundred = numpy_helper.from_array(np.array([[100]], np.int64), "hundred")
    graph = helper.make_graph(
        [helper.make_node("Div", ["hundred", "d"], ["y"])],
        "divide",
        [helper.make_tensor_value_info("d", TensorProto.INT64, ["N", 1])],
        [helper.make_tensor_value_info("y", TensorProto.INT64, ["N", 1])],
        [hundred],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def infer_request(model: str, name: str, array: np.ndarray, datatype: str) -> kpb.ModelInferRequest:
    request = kpb.ModelInferRequest(model_name=model)
    request.inputs.add(name=name, datatype=datatype, shape=list(array.shape))
    request.raw_input_contents.append(array.tobytes())
    return request


def statistics(s: kpb_grpc.GRPCInferenceServiceStub, model: str) -> kpb.ModelStatistics:
    return s.ModelStatistics(kpb.ModelStatisticsRequest(name=model), timeout=10).model_stats[0]


def wait_for(predicate, timeout: float = 15.0, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


# ---------------------------------------------------------------------------------------------- disk faults


def test_poll_mode_keeps_serving_when_the_model_file_is_corrupted_or_deleted(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(MODEL_REPO / "classifier", repo / "classifier")
    model_file = repo / "classifier" / "1" / "model.onnx"
    good = model_file.read_bytes()
    srv = start_server(tmp_path, "--model-control-mode", "poll", "--repository-poll-secs", "0.2", repo=repo)
    failures: list[str] = []
    answered = [0]
    stop = threading.Event()

    def load() -> None:  # steady traffic through every fault
        x = np.random.default_rng(0).random((1, 3, SIDE, SIDE), np.float32)
        with grpc.insecure_channel(srv.url) as ch:
            s = kpb_grpc.GRPCInferenceServiceStub(ch)
            while not stop.is_set():
                try:
                    s.ModelInfer(infer_request("classifier", "images", x, "FP32"), timeout=10)
                    answered[0] += 1
                except grpc.RpcError as err:
                    failures.append(f"{err.code().name}: {err.details()}")

    def index() -> list[tuple[str, str, str]]:
        models = s.RepositoryIndex(kpb.RepositoryIndexRequest(), timeout=10).models
        return [(m.version, m.state, m.reason) for m in models if m.name == "classifier"]

    thread = threading.Thread(target=load)
    thread.start()
    try:
        with grpc.insecure_channel(srv.url) as ch:
            s = kpb_grpc.GRPCInferenceServiceStub(ch)
            # 1. Overwritten with garbage in place: the loaded version keeps serving, the error is reported.
            model_file.write_bytes(b"\x00garbage" * 1000)
            wait_for(lambda: any(state == "UNAVAILABLE" for _, state, _ in index()), what="the failed reload")
            entries = index()
            assert ("1", "READY", "") in entries, entries
            assert any("failed" in r.lower() or "protobuf" in r.lower() or "load" in r.lower() for *_, r in entries)
            assert s.ModelReady(kpb.ModelReadyRequest(name="classifier"), timeout=5).ready
            # 2. Deleted: the same.
            model_file.unlink()
            wait_for(lambda: any("no <version>/model.onnx" in r for *_, r in index()), what="the deletion noticed")
            assert ("1", "READY", "") in index()
            # 3. Restored: reloaded, the error is gone.
            model_file.write_bytes(good)
            wait_for(lambda: index() == [("1", "READY", "")], what="the restored model")
        time.sleep(0.5)
    finally:
        stop.set()
        thread.join()
    assert not failures, failures[:5]
    assert answered[0] > 50
    metrics = urllib.request.urlopen(srv.metrics_url, timeout=5).read().decode()
    failed = [ln for ln in metrics.splitlines() if ln.startswith('optic_model_load_failures_total{model="classifier"}')]
    assert failed and float(failed[0].split()[-1]) >= 2, failed
    assert "failed to load classifier" in srv.log()
    assert srv.stop() == 0


# ---------------------------------------------------------------------------------------------- SIGTERM


def test_sigterm_under_load_drains_refuses_new_work_and_exits_0(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write_model(
        repo, "slow", slow_model(40), "max_batch_size: 4\ndynamic_batching { max_queue_delay_microseconds: 1000 }\n"
    )
    srv = start_server(tmp_path, "--grace-seconds", "20", repo=repo, health_port=True)
    results: list[object] = [None] * 12

    def one(i: int) -> None:
        with grpc.insecure_channel(srv.url) as ch:
            try:
                x = np.full((1, 1), i, np.float32)
                results[i] = kpb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(
                    infer_request("slow", "x", x, "FP32"), timeout=30
                )
            except grpc.RpcError as err:
                results[i] = err

    threads = [threading.Thread(target=one, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    time.sleep(0.3)  # every request is queued or running now (12 samples need ~2.5 s of compute here)
    srv.proc.terminate()
    signalled = time.monotonic()
    with grpc.insecure_channel(f"127.0.0.1:{srv.health_port}") as ch:
        health = health_pb2_grpc.HealthStub(ch)
        wait_for(
            lambda: (
                health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status
                == health_pb2.HealthCheckResponse.NOT_SERVING
            ),
            timeout=5,
            what="readiness NOT_SERVING",
        )
        # Liveness stays SERVING while draining: no restart for a pod that is shutting down cleanly.
        live = health.Check(health_pb2.HealthCheckRequest(service="optic.liveness"), timeout=2).status
        assert live == health_pb2.HealthCheckResponse.SERVING
    refused = None
    with grpc.insecure_channel(srv.url) as ch:
        try:
            kpb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(
                infer_request("slow", "x", np.ones((1, 1), np.float32), "FP32"), timeout=5
            )
        except grpc.RpcError as err:
            refused = err.code()
    assert refused == grpc.StatusCode.UNAVAILABLE, refused
    for t in threads:
        t.join()
    assert all(isinstance(r, kpb.ModelInferResponse) for r in results), results
    assert srv.proc.wait(timeout=30) == 0, srv.log()
    assert time.monotonic() - signalled < 20
    assert "stopped" in srv.log()


# ---------------------------------------------------------------------------------------------- clients giving up


def test_cancelled_and_expired_requests_never_reach_the_model(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write_model(
        repo, "slow", slow_model(60), "max_batch_size: 4\ndynamic_batching { max_queue_delay_microseconds: 1000 }\n"
    )
    srv = start_server(tmp_path, "--instances", "1", repo=repo)  # one batch at a time: a second would run beside it
    try:
        x = np.ones((1, 1), np.float32)
        four = np.ones((4, 1), np.float32)  # ~1.3 s of compute here: the others queue behind it
        with grpc.insecure_channel(srv.url) as ch:
            s = kpb_grpc.GRPCInferenceServiceStub(ch)
            base = statistics(s, "slow")
            busy = s.ModelInfer.future(infer_request("slow", "x", four, "FP32"), timeout=30)  # occupies the model
            time.sleep(0.05)
            expiring = s.ModelInfer.future(infer_request("slow", "x", x, "FP32"), timeout=0.1)
            cancelled = s.ModelInfer.future(infer_request("slow", "x", x, "FP32"), timeout=30)
            time.sleep(0.05)
            cancelled.cancel()
            busy.result()
            with pytest.raises(grpc.RpcError) as err:
                expiring.result()
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert cancelled.cancelled()
            time.sleep(0.3)
            after = statistics(s, "slow")
            # Only the first request (4 samples) was computed; the two that gave up while queued cost nothing.
            assert after.inference_count - base.inference_count == 4
            assert after.execution_count - base.execution_count == 1
            s.ModelInfer(infer_request("slow", "x", x, "FP32"), timeout=30)  # and the model still answers
            assert statistics(s, "slow").inference_count - base.inference_count == 5
    finally:
        assert srv.stop() == 0, srv.log()


# ---------------------------------------------------------------------------------------------- run-time failures


def test_a_model_failing_at_run_time_fails_only_the_poisoned_request(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    # Warm-up with ones: the default zeros would fail this model's load.
    config = (
        "max_batch_size: 8\ndynamic_batching { max_queue_delay_microseconds: 300000 }\n"
        'model_warmup { name: "ones" batch_size: 1 inputs { key: "d" value: '
        '{ data_type: TYPE_INT64 dims: [1] input_data_file: "ones" } } }\n'
    )
    write_model(repo, "divide", divide_model(), config)
    (repo / "divide" / "warmup").mkdir()
    (repo / "divide" / "warmup" / "ones").write_bytes(np.ones(1, np.int64).tobytes())
    srv = start_server(tmp_path, "--batch-window", "fixed", repo=repo)  # the 300 ms window batches them
    try:
        good = infer_request("divide", "d", np.array([[4]], np.int64), "INT64")
        bad = infer_request("divide", "d", np.array([[0]], np.int64), "INT64")
        with grpc.insecure_channel(srv.url) as ch:
            s = kpb_grpc.GRPCInferenceServiceStub(ch)
            with pytest.raises(grpc.RpcError) as err:
                s.ModelInfer(bad, timeout=10)
            assert err.value.code() == grpc.StatusCode.INTERNAL
            assert "model 'divide:1' failed" in err.value.details() and "division by zero" in err.value.details()
            # Batched together (one 300 ms window), the batch fails; the batcher then runs each request
            # alone, so only the poisoned one fails.
            same_batch = [s.ModelInfer.future(r, timeout=10) for r in (good, bad, good)]
            codes = []
            for f in same_batch:
                try:
                    answer = f.result()
                    assert np.frombuffer(answer.raw_output_contents[0], np.int64).tolist() == [25]
                    codes.append("OK")
                except grpc.RpcError as e:
                    codes.append(e.code().name)
            assert codes == ["OK", "INTERNAL", "OK"]
            for _ in range(3):  # and the batcher keeps going
                answer = s.ModelInfer(good, timeout=10)
                assert np.frombuffer(answer.raw_output_contents[0], np.int64).tolist() == [25]
            stats = statistics(s, "divide")
            assert stats.inference_stats.fail.count == 2 and stats.inference_stats.success.count == 5
            assert stats.execution_count == 5  # successful runs: the two neighbours alone, then three
        assert srv.health() == health_pb2.HealthCheckResponse.SERVING
    finally:
        assert srv.stop() == 0, srv.log()
