"""onnxruntime sessions: provider choice (CUDA mocked where there is no GPU), I/O binding, CUDA for real if present."""

from __future__ import annotations

import logging
import subprocess
import sys

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
