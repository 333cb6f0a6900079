"""onnxruntime sessions: provider choice (CUDA mocked where there is no GPU), I/O binding, CUDA for real if present."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time

import numpy as np
import onnxruntime as ort
import pytest

from optic.server import runtime
from optic.server.runtime import OnnxModel, RuntimeOptions, providers_for
from tests.conftest import MODEL_REPO, ROOT, SIDE

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()
CLASSIFIER = MODEL_REPO / "classifier" / "1" / "model.onnx"


def test_cpu_is_cpu():
    assert providers_for("cpu") == ["CPUExecutionProvider"]


@pytest.mark.skipif(HAS_CUDA, reason="this onnxruntime has CUDA")
def test_cuda_without_cuda_is_an_error_and_auto_falls_back(caplog):
    with pytest.raises(RuntimeError, match="install onnxruntime-gpu"):
        providers_for("cuda")
    with caplog.at_level(logging.WARNING):
        assert providers_for("auto") == ["CPUExecutionProvider"]
    assert "falls back" in caplog.text or "not available" in caplog.text


def test_cuda_options_reach_the_provider(monkeypatch):
    # No GPU here: pretend onnxruntime offers CUDA to check what we would ask it for.
    monkeypatch.setattr(
        runtime.ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    got = providers_for("auto", (("device_id", "1"), ("gpu_mem_limit", "1073741824")))
    assert got == [("CUDAExecutionProvider", {"device_id": "1", "gpu_mem_limit": "1073741824"}), "CPUExecutionProvider"]
    assert providers_for("cuda")[0] == ("CUDAExecutionProvider", {})


def test_io_binding_gives_the_same_answers():
    x = np.random.default_rng(0).normal(0, 1, (5, 3, SIDE, SIDE)).astype(np.float32)
    bound = OnnxModel(CLASSIFIER, RuntimeOptions(io_binding=True))
    plain = OnnxModel(CLASSIFIER, RuntimeOptions(io_binding=False))
    assert bound.io_binding and not plain.io_binding
    np.testing.assert_array_equal(bound.run({"images": x})["logits"], plain.run({"images": x})["logits"])


@pytest.mark.skipif(HAS_CUDA, reason="this onnxruntime has CUDA")
def test_serve_with_device_cuda_fails_fast_without_cuda():
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "optic.server.cli",
            "serve",
            "--device",
            "cuda",
            "--grpc-port",
            "0",
            "--metrics-port",
            "0",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert result.returncode == 2 and "no CUDAExecutionProvider" in result.stderr


@pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime-gpu and a GPU")
def test_cuda_session_matches_cpu():
    x = np.random.default_rng(1).normal(0, 1, (8, 3, SIDE, SIDE)).astype(np.float32)
    gpu = OnnxModel(CLASSIFIER, RuntimeOptions(device="cuda"))
    assert gpu.providers[0] == "CUDAExecutionProvider" and gpu.io_binding
    cpu = OnnxModel(CLASSIFIER, RuntimeOptions(device="cpu"))
    np.testing.assert_allclose(gpu.run({"images": x})["logits"], cpu.run({"images": x})["logits"], atol=1e-3)


def test_thread_pools_follow_the_cgroup_cpu_quota(tmp_path):
    """A pod limited to 2 CPUs on a big node sizes its pools for 2, as a CFS quota (not affinity) says."""
    from optic.server.runtime import cgroup_cpu_quota

    (tmp_path / "cpu.max").write_text("200000 100000\n")
    assert cgroup_cpu_quota(tmp_path) == 2.0
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_quota(tmp_path) is None
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("150000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_quota(tmp_path) == 1.5
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_quota(tmp_path) is None


def test_default_instances_two_lanes_on_cpu_cores_one_on_a_gpu_or_one_core():
    assert runtime.default_instances(2) == 2 and runtime.default_instances(16) == 2
    assert runtime.default_instances(1) == 1
    assert runtime.default_instances(8, gpu=True) == 1


def test_a_run_beside_another_takes_the_narrow_lane_and_answers_the_same():
    """Alone: the wide session (all its threads). With company: the narrow one. Same answers either way."""
    x = np.random.default_rng(2).normal(0, 1, (4, 3, SIDE, SIDE)).astype(np.float32)
    model = OnnxModel(CLASSIFIER, RuntimeOptions(cores=2))
    assert model.threads == 2 and model.open_narrow_lane(2, 2) == []  # not narrower: no lane
    lanes = model.open_narrow_lane(1, 2)
    assert len(lanes) == 1 and lanes[0].threads == 1 and model.narrow == lanes  # one thread: one session for all
    seen: list[str] = []
    model.on_lane = seen.append
    expected = model.run({"images": x})["logits"]
    assert seen == ["wide"]

    barrier = threading.Barrier(2)
    answers: list[np.ndarray] = []

    def hold() -> dict[str, np.ndarray]:  # stands for a long batch: blocks inside the wide run's slot
        barrier.wait(timeout=10)
        barrier.wait(timeout=10)
        return {"logits": expected}

    # One run in flight (held inside the session), then another: it must take the lane.
    original = model._run
    model._run = lambda feeds, outputs: hold() if feeds is held else original(feeds, outputs)  # type: ignore[method-assign]
    held = {"images": x}
    first = threading.Thread(target=lambda: answers.append(model.run(held)["logits"]))
    first.start()
    barrier.wait(timeout=10)  # the first run is in flight now
    second = model.run({"images": x})["logits"]
    barrier.wait(timeout=10)
    first.join(timeout=10)
    assert seen == ["wide", "narrow", "wide"]  # counted as they answer: the narrow one first
    np.testing.assert_allclose(second, expected, atol=1e-5)
    assert len(answers) == 1

    model.terminate()  # an unload or a drain past its grace stops the lane's runs too
    assert lanes[0].terminated
    with pytest.raises(Exception, match="being unloaded"):
        model.run({"images": x})
    assert seen == ["wide", "narrow", "wide"]  # a refused run is not counted as run


def test_wider_narrow_lanes_get_a_session_per_run_so_their_pools_do_not_contend():
    """4 cores: beside the wide run (4 threads) each narrow run has its own 2-thread session."""
    model = OnnxModel(CLASSIFIER, RuntimeOptions(cores=4))
    seen: list[str] = []
    model.on_lane = seen.append
    lanes = model.open_narrow_lane(2, 3)
    assert [lane.threads for lane in lanes] == [2, 2, 2]
    gate, entered = threading.Event(), []
    for session in (model, *lanes):

        def blocking(feeds, outputs, session=session):
            entered.append(session)
            gate.wait(10)
            return {"logits": np.zeros((1, 5), np.float32)}

        session._run = blocking  # type: ignore[method-assign]
    runs = [threading.Thread(target=model.run, args=({"images": None},)) for _ in range(4)]
    for i, t in enumerate(runs):
        t.start()
        deadline = time.monotonic() + 10
        while len(entered) <= i and time.monotonic() < deadline:
            time.sleep(0.005)
    gate.set()
    for t in runs:
        t.join(timeout=10)
    assert entered == [model, lanes[0], lanes[1], lanes[2]]  # wide first, then the least busy narrow session
    assert sorted(seen) == ["narrow", "narrow", "narrow", "wide"]  # in the order they answered
    assert model._active == 0 and model._narrow_busy == [0, 0, 0]  # the counts went back down


def test_no_narrow_lane_on_cuda(monkeypatch):
    model = OnnxModel(CLASSIFIER, RuntimeOptions(cores=2))
    monkeypatch.setattr(model, "providers", ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert model.open_narrow_lane(1, 2) == [] and model.narrow == []


@pytest.mark.skipif(runtime.default_threads() < 2, reason="a narrow lane needs 2 or more cores")
def test_concurrent_calls_take_the_narrow_lane_and_get_the_lone_answers(tmp_path):
    """The default server runs two batches at once on 2+ cores; the stock Triton client's answers do not change."""
    from concurrent.futures import ThreadPoolExecutor

    import tritonclient.grpc as tc

    from tests.conftest import metric_values, scrape, start_server

    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "classifier").symlink_to(MODEL_REPO / "classifier")
    srv = start_server(tmp_path, repo=repo)
    try:
        x = np.random.default_rng(3).normal(0, 1, (8, 3, SIDE, SIDE)).astype(np.float32)

        def infer(i: int) -> np.ndarray:
            with tc.InferenceServerClient(srv.url) as client:
                inp = tc.InferInput("images", [1, 3, SIDE, SIDE], "FP32")
                inp.set_data_from_numpy(x[i % 8 : i % 8 + 1])
                return client.infer("classifier", [inp]).as_numpy("logits")[0]

        with tc.InferenceServerClient(srv.url) as client:
            config = client.get_model_config("classifier", as_json=True)["config"]
        assert config["instance_group"][0]["count"] == 2  # the default on 2+ CPU cores
        lone = [infer(i) for i in range(8)]
        with ThreadPoolExecutor(16) as pool:
            together = list(pool.map(infer, range(160)))
        for i, logits in enumerate(together):
            np.testing.assert_allclose(logits, lone[i % 8], atol=1e-4)
        text = scrape(srv.metrics_url)
        runs = {lane: sum(metric_values(text, "optic_lane_runs_total", lane=lane)) for lane in ("wide", "narrow")}
        assert runs["wide"] >= 8 and runs["narrow"] > 0, runs
    finally:
        assert srv.stop() == 0, srv.log()
