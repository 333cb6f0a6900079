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

from optic.export import captioner, classifier, convert, detector, importer, models, segmenter, train
from optic.export.data import SHAPES
from optic.export.train import TrunkRecipe
from optic.server.config import parse
from optic.server.metadata import InputSpec, ModelMeta
from tests.conftest import MODEL_REPO, ROOT

# A tiny shared trunk: 64 x 64 inputs, a few scenes, one epoch -- the machinery, not the quality.
TINY_TRUNK = TrunkRecipe(size=64, scenes=48, epochs=1, batch_size=16, width=4, neck=16, hidden=32, workers=1)
TINY_EVAL = 6  # stress scenes per slice
TINY = {
    "classifier": (classifier, classifier.ClassifierRecipe(trunk=TINY_TRUNK, test_size=TINY_EVAL, gate=0)),
    "detector": (
        detector,
        detector.DetectorRecipe(trunk=TINY_TRUNK, size=96, test_size=TINY_EVAL, gate=0, gate_map=0, gate_small=0),
    ),
    "segmenter": (segmenter, segmenter.SegmenterRecipe(trunk=TINY_TRUNK, test_size=TINY_EVAL, gate=0)),
    "captioner": (captioner, captioner.CaptionerRecipe(trunk=TINY_TRUNK, test_size=TINY_EVAL, gate=0)),
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
    assert report.gates and report.results.get("in_distribution")  # stress and generator figures side by side
    for path in report.paths:
        proto = onnx.load(str(path))
        onnx.checker.check_model(proto, full_check=True)
        sess = ort.InferenceSession(str(path))
        assert all(not isinstance(a.shape[0], int) for a in (*sess.get_inputs(), *sess.get_outputs())), "batch axis"
        props = sess.get_modelmeta().custom_metadata_map
        meta = ModelMeta.from_props(props)
        assert meta.task in ("classification", "detection", "segmentation", "captioning")
        assert props["optic.export.opset"] == "17" and "optic.export.parity_max_abs_diff" in props
        assert any(k.startswith("optic.eval.") for k in props) and "stress" in props["optic.eval.split"]


def test_gate_refuses_to_write(tmp_path):
    recipe = segmenter.SegmenterRecipe(trunk=TINY_TRUNK, test_size=TINY_EVAL, gate=1.01)
    report = segmenter.build(tmp_path, recipe, progress=False)
    assert not report.written and "gate" in report.reason and not (tmp_path / "segmenter").exists()


def test_builds_are_deterministic(tiny_repo, tmp_path):
    """A second, independent training run (not the memoised one) writes byte-identical files."""
    _, reports = tiny_repo
    again = train.train_trunk(TINY_TRUNK, progress=False)
    train._TRAINED[TINY_TRUNK], first = again, train._TRAINED[TINY_TRUNK]
    try:
        for name in ("detector", "captioner"):
            module, recipe = TINY[name]
            rebuilt = module.build(tmp_path, recipe, progress=False)
            for a, b in zip(rebuilt.paths, reports[name].paths, strict=True):
                assert a.read_bytes() == b.read_bytes(), a
            assert rebuilt.gates == reports[name].gates
    finally:
        train._TRAINED[TINY_TRUNK] = first


def test_detector_output_layout(tiny_repo):
    out, _ = tiny_repo
    sess = ort.InferenceSession(str(out / "detector" / "1" / "model.onnx"))
    size = TINY["detector"][1].size  # exported larger than the trunk trained: the weights are size-agnostic
    y = sess.run(None, {"images": np.zeros((2, 3, size, size), np.float32)})[0]
    anchors = sum((size // s) ** 2 for s in (8, 16, 32))
    assert y.shape == (2, 4 + len(SHAPES), anchors)
    assert ((y[:, 4:] >= 0) & (y[:, 4:] <= 1)).all()  # class scores are probabilities
    assert (y[:, 2:4] >= 0).all()  # widths and heights
    meta = ModelMeta.from_props(sess.get_modelmeta().custom_metadata_map)
    assert meta.output_layout == "yolov8" and meta.input.resize == "letterbox" and meta.input.size == (size, size)


def test_captioner_pair_decodes(tiny_repo):
    out, _ = tiny_repo
    enc = ort.InferenceSession(str(out / captioner.ENCODER / "1" / "model.onnx"))
    dec = ort.InferenceSession(str(out / captioner.DECODER / "1" / "model.onnx"))
    size = TINY_TRUNK.size
    texts = captioner.greedy_decode(enc, dec, np.zeros((3, 3, size, size), np.float32))
    assert len(texts) == 3 and all(w in captioner.VOCAB for t in texts for w in t.split())
    meta = ModelMeta.from_props(enc.get_modelmeta().custom_metadata_map)
    assert meta.vocab == captioner.VOCAB and meta.extra["optic.caption.decoder"] == captioner.DECODER
    features = enc.run(None, {"images": np.zeros((2, 3, size, size), np.float32)})[0]
    assert features.ndim == 3 and features.shape[0] == 2  # attention tokens, batch first


def test_training_scenes_follow_the_servers_preprocessing():
    """Training inputs are the server's preprocess of the scene; boxes and class maps land where it puts them."""
    from optic.export.data import WIDE, make_scenes, to_input
    from optic.server.tasks.image import preprocess

    spec = TINY_TRUNK.input_spec
    for scene in make_scenes(6, seed=11, style=WIDE):
        image, mask, boxes = to_input(scene, spec)
        tensor, t = preprocess(scene.image, spec)
        np.testing.assert_array_equal(image.astype(np.float32) / 255.0, np.moveaxis(tensor, 0, -1))
        assert len(boxes) == len(scene.objects) and set(np.unique(mask)) <= set(range(len(SHAPES) + 1))
        np.testing.assert_allclose(t.to_original(boxes[:, :4]), [o.bbox for o in scene.objects], atol=1e-3)


def test_caption_relations_follow_flips_and_rotations():
    text = "a large red circle to the left of a small blue star"
    assert train._relation_words(text, False, True, False) == "a large red circle to the right of a small blue star"
    assert train._relation_words(text, True, False, False) == "a large red circle above a small blue star"
    assert train._relation_words("a large red circle below a small blue star", True, True, False) == (
        "a large red circle to the left of a small blue star"
    )
    assert train._relation_words("a large red circle", True, True, True) == "a large red circle"


# ---------------------------------------------------------------- convert / import


@pytest.mark.parametrize("arch", ["classifier", "detector", "segmenter", "captioner"])
def test_convert_checkpoint(tmp_path, arch):
    torch.manual_seed(0)
    if arch == "classifier":
        modules = {"model": models.ShapeClassifier(5, width=4)}
    elif arch == "detector":
        modules = {"model": models.ShapeDetector(5, torch.tensor([[8.0, 8], [20, 20], [40, 40]]), width=4)}
    elif arch == "segmenter":
        modules = {"model": models.ShapeSegmenter(6, width=4)}
    else:
        modules = {"encoder": models.CaptionEncoder(), "decoder": models.CaptionDecoderStep(len(captioner.VOCAB))}
    ckpt = tmp_path / "model.pt"
    labels = captioner.VOCAB if arch == "captioner" else segmenter.LABELS if arch == "segmenter" else SHAPES
    # The legacy architectures convert checks take the input they were built for (the captioner's is 64 x 64).
    spec = InputSpec(size=(64, 64)) if arch == "captioner" else None
    convert.save_checkpoint(ckpt, arch, modules, labels, spec)
    paths = convert.convert(ckpt, arch, tmp_path / "repo", name=None)
    for path in paths:
        sess = ort.InferenceSession(str(path))
        meta = ModelMeta.from_props(sess.get_modelmeta().custom_metadata_map)
        assert float(sess.get_modelmeta().custom_metadata_map["optic.export.parity_max_abs_diff"]) < 1e-3
        assert (meta.vocab if arch == "captioner" else meta.labels) == labels
    if arch == "classifier":  # served output equals torch's on a real input
        size = ModelMeta.from_props(ort.InferenceSession(str(paths[0])).get_modelmeta().custom_metadata_map).input.size
        x = np.random.default_rng(1).normal(0, 1, (2, 3, *size)).astype(np.float32)
        got = ort.InferenceSession(str(paths[0])).run(None, {"images": x})[0]
        with torch.no_grad():
            want = modules["model"].eval()(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(got, want, atol=1e-4)


def test_convert_keeps_checkpoint_input_spec_and_flags_win(tmp_path):
    spec = InputSpec(size=(96, 96), resize="letterbox", mean=(0.4, 0.4, 0.4), std=(0.2, 0.2, 0.2))
    ckpt = tmp_path / "c.pt"
    convert.save_checkpoint(ckpt, "classifier", {"model": models.ShapeClassifier(5, width=4)}, SHAPES, spec)
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
    convert.save_checkpoint(ckpt, "classifier", {"model": models.ShapeClassifier(5, width=4)}, SHAPES)
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
