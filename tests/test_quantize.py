"""``optic export quantize``: an int8 copy is written only when it scores within the allowed drop of fp32."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

pytest.importorskip("onnxruntime.quantization")

from optic.export import quantize
from optic.export.data import WIDE, make_scenes
from optic.server.metadata import ModelMeta
from tests.conftest import MODEL_REPO


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("quantize-repo")
    for name in ("classifier", "detector"):
        shutil.copytree(MODEL_REPO / name, root / name)
    (root / "classifier" / "config.pbtxt").write_text(
        'name: "classifier"\nmax_batch_size: 16\ndynamic_batching { max_queue_delay_microseconds: 500 }\n'
    )
    return root


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "optic.server.cli", "export", "quantize", *args],
                          capture_output=True, text=True, timeout=300)


def test_our_classifier_is_gated_on_the_stress_set(repo: Path) -> None:
    report = quantize.quantize_entry(repo, "classifier", calibration=32, score_images=100)
    assert report.written, report.summary()
    assert report.metric == "stress classification accuracy"
    assert report.fp32 - report.int8 <= 0.01 and report.int8 > 0.8
    assert report.int8_bytes < report.fp32_bytes / 2
    path = repo / "classifier_int8" / "1" / "model.onnx"
    model = onnx.load(str(path))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    props = {p.key: p.value for p in model.metadata_props}
    assert props["optic.export.quantization.source"] == "classifier/1"
    assert float(props["optic.export.quantization.int8"]) == pytest.approx(report.int8, abs=1e-6)
    meta = ModelMeta.from_props(props)
    assert meta.task == "classification" and meta.input is not None
    config = (repo / "classifier_int8" / "config.pbtxt").read_text()  # the source's, renamed
    assert 'name: "classifier_int8"' in config and "max_batch_size: 16" in config
    assert "max_queue_delay_microseconds: 500" in config


def test_a_model_beyond_the_allowed_drop_is_not_written(repo: Path) -> None:
    report = quantize.quantize_entry(repo, "detector", "refused", calibration=8, max_drop=-1.0, score_images=20)
    assert not report.written and "drop" in report.reason
    assert not (repo / "refused").exists()


def test_other_models_are_measured_by_agreement_on_their_own_images(repo: Path, tmp_path: Path) -> None:
    for i, scene in enumerate(make_scenes(24, 123, style=WIDE)):
        (tmp_path / f"{i:02d}.jpg").write_bytes(scene.encoded)
    result = _cli("detector", "--repo", str(repo), "--name", "agreed", "--images", str(tmp_path),
                  "--calibration", "12", "--max-drop", "0.5")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "agreement with fp32 on 12 held-out images" in result.stdout
    agreement = float(result.stdout.split("int8 ")[1].split(" ")[0])
    assert 0.5 <= agreement <= 1.0, result.stdout  # mAP@0.5 of the int8 boxes against the fp32 ones
    assert (repo / "agreed" / "1" / "model.onnx").is_file()
    # The int8 copy batches as its source does: the default detector's config.pbtxt (batches of 8), renamed.
    copied = (repo / "agreed" / "config.pbtxt").read_text()
    assert 'name: "agreed"' in copied and "preferred_batch_size: 8" in copied, copied


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nope"], "no such model"),
        (["classifier", "--images", "/does/not/exist"], "not a directory"),
        (["classifier", "--calibration", "1"], "at least 2"),
        (["classifier", "--name", "../x"], "not a path"),
    ],
)
def test_mistakes_are_one_line(repo: Path, args: list[str], message: str) -> None:
    result = _cli(*args[:1], "--repo", str(repo), *args[1:])
    assert result.returncode == 2
    assert message in result.stderr and result.stderr.count("\n") == 1, result.stderr


def test_a_captioner_is_refused(tmp_path: Path) -> None:
    shutil.copytree(MODEL_REPO / "captioner_encoder", tmp_path / "captioner_encoder")
    result = _cli("captioner_encoder", "--repo", str(tmp_path))
    assert result.returncode == 2 and "quantize supports" in result.stderr
