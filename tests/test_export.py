"""Export stage: the scene generator, a tiny training run with parity, the gate, and the committed model."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from optic.export.data import SHAPES, make_scenes
from optic.server.metadata import ModelMeta
from tests.conftest import MODEL_REPO


def test_scenes_are_deterministic_and_complete():
    a, b = make_scenes(20, seed=5), make_scenes(20, seed=5)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x.image, y.image)
        assert x.caption == y.caption and x.objects == y.objects
    assert not np.array_equal(a[0].image, make_scenes(1, seed=6)[0].image)
    np.testing.assert_array_equal(make_scenes(1, seed=5, start=7)[0].image, a[7].image)  # order-independent
    labels = {s.label for s in make_scenes(200, seed=1)}
    assert labels == set(range(len(SHAPES)))
    for s in a:
        assert s.image.shape == (64, 64, 3) and s.image.dtype == np.uint8
        main = s.objects[0]
        x1, y1, x2, y2 = main.bbox
        assert 0 <= x1 < x2 <= 63 and 0 <= y1 < y2 <= 63
        assert (s.mask == main.class_id + 1).sum() > 0  # the mask marks the main shape's pixels
        assert s.caption.startswith(f"a large {main.color} {main.shape}")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pytest.importorskip("torch")
    from optic.export import classifier

    out = tmp_path_factory.mktemp("repo")
    recipe = classifier.ClassifierRecipe(epochs=1, train_per_epoch=256, test_size=64, width=4, gate=0.0)
    return out, classifier.build(out, recipe, progress=False)


def test_tiny_export_has_parity_and_metadata(tiny):
    out, report = tiny
    assert report.written and report.paths == (out / "classifier" / "1" / "model.onnx",)
    assert report.max_abs_diff < 1e-4
    proto = onnx.load(str(report.paths[0]))
    onnx.checker.check_model(proto)
    sess = ort.InferenceSession(str(report.paths[0]))
    (inp,) = sess.get_inputs()
    from optic.export.train import TrunkRecipe

    side = TrunkRecipe().size  # the shared trunk's letterboxed square input
    assert inp.shape[0] == "batch" and inp.shape[1:] == [3, side, side]
    meta = ModelMeta.from_props(sess.get_modelmeta().custom_metadata_map)
    assert meta.task == "classification" and meta.labels == SHAPES and meta.input.size == (side, side)
    assert meta.input.resize == "letterbox"
    assert sess.run(None, {inp.name: np.zeros((3, 3, side, side), np.float32)})[0].shape == (3, len(SHAPES))


def test_gate_refuses_to_write(tmp_path):
    pytest.importorskip("torch")
    from optic.export import classifier

    recipe = classifier.ClassifierRecipe(epochs=1, train_per_epoch=128, test_size=32, width=4, gate=1.01)
    report = classifier.build(tmp_path, recipe, progress=False)
    assert not report.written and "gate" in report.reason
    assert not (tmp_path / "classifier").exists()


def test_committed_classifier_describes_itself():
    sess = ort.InferenceSession(str(MODEL_REPO / "classifier" / "1" / "model.onnx"))
    props = sess.get_modelmeta().custom_metadata_map
    meta = ModelMeta.from_props(props)
    assert meta.task == "classification" and meta.labels == SHAPES and meta.output_kind == "logits"
    assert float(props["optic.eval.accuracy"]) >= 0.95
    assert float(props["optic.export.parity_max_abs_diff"]) < 1e-4


def test_export_without_torch_explains_the_extra(tmp_path):
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['torch'] = None; from optic.server.cli import main; "
        f"sys.exit(main(['export', 'classifier', '--out', {str(tmp_path)!r}]))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "pip install -e '.[export]'" in result.stderr
