"""Every architecture trains a few steps, exports, passes onnx.checker and parity; convert and import work."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from optic.export import captioner, classifier, convert, detector, importer, segmenter
from optic.export.data import SHAPES
from optic.server.config import parse
from optic.server.metadata import InputSpec, ModelMeta
from tests.conftest import MODEL_REPO, ROOT

TINY = {
    "classifier": (
        classifier,
        classifier.ClassifierRecipe(epochs=1, train_per_epoch=128, test_size=16, width=4, gate=0),
    ),
    "detector": (detector, detector.DetectorRecipe(epochs=1, train_size=128, test_size=16, width=4, gate=0)),
    "segmenter": (segmenter, segmenter.SegmenterRecipe(epochs=1, train_size=64, test_size=16, width=4, gate=0)),
    "captioner": (captioner, captioner.CaptionerRecipe(epochs=1, train_size=128, test_size=16, gate=0)),
}


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    return out, {name: module.build(out, recipe, progress=False) for name, (module, recipe) in TINY.items()}


@pytest.mark.parametrize("name", list(TINY))
def test_tiny_build_exports_with_parity(tiny_repo, name):
    _, reports = tiny_repo
    report = reports[name]
    assert report.written, report.reason
    assert report.max_abs_diff <= report.tolerance
    for path in report.paths:
        proto = onnx.load(str(path))
        onnx.checker.check_model(proto, full_check=True)
        sess = ort.InferenceSession(str(path))
        assert all(not isinstance(a.shape[0], int) for a in (*sess.get_inputs(), *sess.get_outputs())), "batch axis"
        props = sess.get_modelmeta().custom_metadata_map
        meta = ModelMeta.from_props(props)
        assert meta.task in ("classification", "detection", "segmentation", "captioning")
        assert props["optic.export.opset"] == "17" and "optic.export.parity_max_abs_diff" in props


def test_builds_are_deterministic(tiny_repo, tmp_path):
    _, reports = tiny_repo
    again = detector.build(tmp_path, TINY["detector"][1], progress=False)
    assert again.paths[0].read_bytes() == reports["detector"].paths[0].read_bytes()
    assert again.value == reports["detector"].value


def test_detector_output_layout(tiny_repo):
    out, _ = tiny_repo
    sess = ort.InferenceSession(str(out / "detector" / "1" / "model.onnx"))
    y = sess.run(None, {"images": np.zeros((2, 3, 96, 96), np.float32)})[0]
    grid = 96 // detector.STRIDE
    assert y.shape == (2, grid * grid * detector.NUM_ANCHORS, 5 + len(SHAPES))
    assert ((y[..., 4:] >= 0) & (y[..., 4:] <= 1)).all()  # objectness and class scores are probabilities
    meta = ModelMeta.from_props(sess.get_modelmeta().custom_metadata_map)
    assert meta.output_layout == "yolov5" and meta.input.resize == "letterbox"


def test_captioner_pair_decodes(tiny_repo):
    out, _ = tiny_repo
    enc = ort.InferenceSession(str(out / captioner.ENCODER / "1" / "model.onnx"))
    dec = ort.InferenceSession(str(out / captioner.DECODER / "1" / "model.onnx"))
    texts = captioner.greedy_decode(enc, dec, np.zeros((3, 3, 64, 64), np.float32))
    assert len(texts) == 3 and all(w in captioner.VOCAB for t in texts for w in t.split())
    meta = ModelMeta.from_props(enc.get_modelmeta().custom_metadata_map)
    assert meta.vocab == captioner.VOCAB and meta.extra["optic.caption.decoder"] == captioner.DECODER


def test_anchors_come_from_kmeans():
    rng = np.random.default_rng(0)
    wh = np.concatenate([rng.normal(10, 1, (100, 2)), rng.normal(30, 2, (100, 2)), rng.normal(60, 3, (100, 2))])
    anchors = detector.kmeans_anchors(np.abs(wh).astype(np.float32), 3)
    np.testing.assert_allclose(anchors, [[10, 10], [30, 30], [60, 60]], rtol=0.1)


# ---------------------------------------------------------------- convert / import


@pytest.mark.parametrize("arch", ["classifier", "detector", "segmenter", "captioner"])
def test_convert_checkpoint(tmp_path, arch):
    torch.manual_seed(0)
    if arch == "classifier":
        modules = {"model": classifier.ShapeClassifier(5, width=4)}
    elif arch == "detector":
        modules = {"model": detector.ShapeDetector(5, torch.tensor([[8.0, 8], [20, 20], [40, 40]]), width=4)}
    elif arch == "segmenter":
        modules = {"model": segmenter.ShapeSegmenter(6, width=4)}
    else:
        modules = {"encoder": captioner.CaptionEncoder(), "decoder": captioner.CaptionDecoderStep(len(captioner.VOCAB))}
    ckpt = tmp_path / "model.pt"
    labels = captioner.VOCAB if arch == "captioner" else segmenter.LABELS if arch == "segmenter" else SHAPES
    convert.save_checkpoint(ckpt, arch, modules, labels)
    paths = convert.convert(ckpt, arch, tmp_path / "repo", name=None)
    for path in paths:
        sess = ort.InferenceSession(str(path))
        meta = ModelMeta.from_props(sess.get_modelmeta().custom_metadata_map)
        assert float(sess.get_modelmeta().custom_metadata_map["optic.export.parity_max_abs_diff"]) < 1e-3
        assert (meta.vocab if arch == "captioner" else meta.labels) == labels
    if arch == "classifier":  # served output equals torch's on a real input
        x = np.random.default_rng(1).normal(0, 1, (2, 3, 64, 64)).astype(np.float32)
        got = ort.InferenceSession(str(paths[0])).run(None, {"images": x})[0]
        with torch.no_grad():
            want = modules["model"].eval()(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(got, want, atol=1e-4)


def test_convert_keeps_checkpoint_input_spec_and_flags_win(tmp_path):
    spec = InputSpec(size=(96, 96), resize="letterbox", mean=(0.4, 0.4, 0.4), std=(0.2, 0.2, 0.2))
    ckpt = tmp_path / "c.pt"
    convert.save_checkpoint(ckpt, "classifier", {"model": classifier.ShapeClassifier(5, width=4)}, SHAPES, spec)
    (path,) = convert.convert(ckpt, "classifier", tmp_path / "repo", name="big")
    meta = ModelMeta.from_props(ort.InferenceSession(str(path)).get_modelmeta().custom_metadata_map)
    assert meta.input == spec
    (path,) = convert.convert(ckpt, "classifier", tmp_path / "repo", name="big2", size=(128, 128), resize="stretch")
    sess = ort.InferenceSession(str(path))
    meta = ModelMeta.from_props(sess.get_modelmeta().custom_metadata_map)
    assert meta.input == InputSpec(size=(128, 128), resize="stretch", mean=spec.mean, std=spec.std)
    assert sess.run(None, {"images": np.zeros((1, 3, 128, 128), np.float32)})[0].shape == (1, 5)


def ultralytics_like(path, classes=3, anchors=16, size=64):
    """A tiny ONNX graph with an Ultralytics YOLOv8 head shape [N, 4+C, A] and Ultralytics metadata."""
    weight = helper.make_tensor(
        "w",
        TensorProto.FLOAT,
        [3, (4 + classes) * anchors],
        np.random.default_rng(0).normal(0, 1, 3 * (4 + classes) * anchors).tolist(),
    )
    shape = helper.make_tensor("s", TensorProto.INT64, [3], [-1, 4 + classes, anchors])
    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["images"], ["p"]),
            helper.make_node("Flatten", ["p"], ["f"]),
            helper.make_node("MatMul", ["f", "w"], ["m"]),
            helper.make_node("Reshape", ["m", "s"], ["output0"]),
        ],
        "yolo",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, ["batch", 4 + classes, anchors])],
        [weight, shape],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for k, v in {
        "names": str({i: f"thing{i}" for i in range(classes)}),
        "imgsz": f"[{size}, {size}]",
        "task": "detect",
        "stride": "32",
    }.items():
        model.metadata_props.add(key=k, value=v)
    onnx.save(model, str(path))


def test_import_ultralytics_detector(tmp_path):
    src = tmp_path / "yolo11n.onnx"
    ultralytics_like(src)
    path = importer.import_onnx(src, "detection", tmp_path / "repo")
    sess = ort.InferenceSession(str(path))
    props = sess.get_modelmeta().custom_metadata_map
    meta = ModelMeta.from_props(props)
    assert meta.task == "detection" and meta.labels == ("thing0", "thing1", "thing2")
    assert meta.output_layout == "yolov8" and meta.input.size == (64, 64) and meta.input.resize == "letterbox"
    assert props["names"].startswith("{0:")  # Ultralytics' own keys are kept
    config = parse((tmp_path / "repo" / "yolo11n" / "config.pbtxt").read_text()).config
    assert config.name == "yolo11n" and config.max_batch_size == 32 and list(config.input[0].dims) == [3, 64, 64]


def test_import_overrides_preprocessing(tmp_path):
    src = tmp_path / "yolo.onnx"
    ultralytics_like(src)
    path = importer.import_onnx(src, "detection", tmp_path / "repo", name="y", mean=(0.1, 0.2, 0.3), scale=1.0)
    meta = ModelMeta.from_props(ort.InferenceSession(str(path)).get_modelmeta().custom_metadata_map)
    assert meta.input.mean == (0.1, 0.2, 0.3) and meta.input.scale == 1.0 and meta.input.resize == "letterbox"


def test_import_classifier_needs_matching_labels(tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(SHAPES) + "\n")
    path = importer.import_onnx(
        MODEL_REPO / "classifier" / "1" / "model.onnx",
        "classification",
        tmp_path / "r",
        name="mine",
        labels=importer.read_labels(labels),
    )
    assert ModelMeta.from_props(ort.InferenceSession(str(path)).get_modelmeta().custom_metadata_map).labels == SHAPES
    with pytest.raises(importer.ExportError, match=r"output \[1, 5\] has no axis of 3 classes for 3 labels"):
        importer.import_onnx(
            MODEL_REPO / "classifier" / "1" / "model.onnx", "classification", tmp_path / "r", labels=("a", "b", "c")
        )


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "optic.server.cli", "export", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["convert", "missing.pt", "--arch", "classifier", "--out", "OUT"], "does not exist"),
        (["convert", "CKPT", "--arch", "resnet", "--out", "OUT"], "unknown architecture 'resnet'"),
        (["convert", "CORRUPT", "--arch", "classifier", "--out", "OUT"], "cannot be read"),
        (["convert", "CKPT", "--arch", "segmenter", "--out", "OUT"], "not a segmenter"),
        (["convert", "CKPT", "--arch", "classifier", "--out", "OUT", "--labels", "LABELS3"], "3 labels given"),
        (["import", "missing.onnx", "--task", "detection", "--out", "OUT"], "does not exist"),
        (["import", "CORRUPT", "--task", "detection", "--out", "OUT"], "not a valid ONNX model"),
        (["import", "CLASSIFIER", "--task", "classify", "--out", "OUT", "--labels", "LABELS3"], "no axis of 3 classes"),
        (["import", "CLASSIFIER", "--task", "poetry", "--out", "OUT"], "unknown task"),
        (["import", "CLASSIFIER", "--task", "classification", "--out", "OUT", "--name", "../x"], "not a path"),
        (["convert", "CKPT", "--arch", "classifier", "--out", "OUT", "--input-size", "60", "60"], "multiple of 8"),
        (["convert", "CKPT", "--arch", "classifier", "--out", "OUT", "--std", "1", "0", "1"], "must not contain 0"),
    ],
    ids=[
        "missing-ckpt",
        "wrong-arch",
        "corrupt-ckpt",
        "arch-mismatch",
        "ckpt-labels",
        "missing-onnx",
        "corrupt-onnx",
        "onnx-labels",
        "wrong-task",
        "traversal-name",
        "bad-input-size",
        "zero-std",
    ],
)
def test_cli_errors_are_one_line(tmp_path, args, needle):
    ckpt = tmp_path / "c.pt"
    convert.save_checkpoint(ckpt, "classifier", {"model": classifier.ShapeClassifier(5, width=4)}, SHAPES)
    (tmp_path / "corrupt").write_bytes(b"\x80\x02 this is not a checkpoint")
    (tmp_path / "labels3.json").write_text(json.dumps(["a", "b", "c"]))
    subst = {
        "CKPT": str(ckpt),
        "CORRUPT": str(tmp_path / "corrupt"),
        "OUT": str(tmp_path / "out"),
        "LABELS3": str(tmp_path / "labels3.json"),
        "CLASSIFIER": str(MODEL_REPO / "classifier/1/model.onnx"),
        "missing.pt": str(tmp_path / "missing.pt"),
        "missing.onnx": str(tmp_path / "missing.onnx"),
    }
    result = _cli(*[subst.get(a, a) for a in args])
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("optic export: error:") and needle in lines[0], result.stderr
    assert "Traceback" not in result.stderr
