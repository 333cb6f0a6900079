"""The committed model repository passes every gate, evaluated with onnxruntime on fixed held-out scenes."""

from __future__ import annotations

import onnxruntime as ort
import pytest

from optic.export import captioner, classifier, detector, segmenter
from optic.export.onnx_io import ort_predict
from tests.conftest import MODEL_REPO

HELD_OUT = 300  # a fixed slice of each recipe's held-out seed (disjoint from training)


def _session(name: str) -> ort.InferenceSession:
    path = MODEL_REPO / name / "1" / "model.onnx"
    if not path.exists():
        pytest.fail(f"{path} is missing: run `make models`")
    return ort.InferenceSession(str(path))


def test_classifier_gate():
    x, y = classifier._tensors(HELD_OUT, classifier.TEST_SEED)
    accuracy = float((ort_predict(_session("classifier"), x).argmax(1) == y).mean())
    assert accuracy >= classifier.ClassifierRecipe.gate, accuracy


def test_detector_gate():
    x, boxes = detector._data(HELD_OUT, detector.TEST_SEED)
    value = detector.coco_map50(ort_predict(_session("detector"), x), boxes)
    assert value >= detector.DetectorRecipe.gate, value


def test_segmenter_gate():
    x, masks = segmenter._data(HELD_OUT, segmenter.TEST_SEED)
    pred = ort_predict(_session("segmenter"), x, batch_size=100).argmax(1)
    value, per_class = segmenter.mean_iou(pred, masks, len(segmenter.LABELS))
    assert value >= segmenter.SegmenterRecipe.gate, per_class


def test_captioner_gate():
    x, references = captioner._data(HELD_OUT, captioner.TEST_SEED)
    hypotheses = captioner.greedy_decode(_session(captioner.ENCODER), _session(captioner.DECODER), x)
    value = captioner.bleu4(hypotheses, references)
    assert value >= captioner.CaptionerRecipe.gate, list(zip(hypotheses[:5], references[:5], strict=True))
