"""The committed model repository passes every gate on the independent stress set, re-checked in CI.

Each model is evaluated the way ``optic export`` gated it (:mod:`optic.export.evaluate`): the stress scenes'
encoded bytes through the server's ``prepare``, onnxruntime on the committed graph, the server's
post-processing. CI uses the first scenes of the same stress splits the export measured on (so the figures are
a subsample of the recorded ones), and the thresholds are the real gates minus a margin of about three
standard errors of the smaller sample (binomial for accuracies; bootstrap over images, measured on the export
split, for mAP and mIoU -- docs/models.md has the figures).
"""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort
import pytest

from optic.export import evaluate
from tests.conftest import MODEL_REPO

# slice -> scenes checked in CI (the export-time splits are larger; see evaluate.SLICES)
CI_SIZES = {"classification": 300, "detection": 150, "small_objects": 100, "segmentation": 150, "caption": 300}
# (real gate, CI threshold): margin ~3 standard errors at the CI sample size
CLASSIFIER = (0.95, 0.92)  # binomial SE at p=0.96, n=300: 0.011
DETECTOR_MAP50 = (0.90, 0.86)
DETECTOR_MAP = (0.70, 0.66)
DETECTOR_SMALL = (0.80, 0.75)
SEGMENTER = (0.85, 0.82)
CAPTIONER = (0.90, 0.86)  # binomial SE at p=0.92, n=300: 0.016


def _session(name: str) -> ort.InferenceSession:
    path = MODEL_REPO / name / "1" / "model.onnx"
    if not path.exists():
        pytest.fail(f"{path} is missing: run `make models`")
    return evaluate.session(Path(path))


def _recorded(sess: ort.InferenceSession, key: str) -> float:
    return float(sess.get_modelmeta().custom_metadata_map[f"optic.eval.{key}"])


def test_classifier_names_the_largest_shape():
    sess = _session("classifier")
    result = evaluate.classification(sess, evaluate.stress_samples("classification", CI_SIZES["classification"]))
    assert _recorded(sess, "accuracy") >= CLASSIFIER[0]
    assert result["accuracy"] >= CLASSIFIER[1], result


def test_detector_finds_every_shape_and_the_small_ones():
    sess = _session("detector")
    main = evaluate.detection(sess, evaluate.stress_samples("detection", CI_SIZES["detection"]))
    small = evaluate.detection(sess, evaluate.stress_samples("small_objects", CI_SIZES["small_objects"]))
    assert _recorded(sess, "map50") >= DETECTOR_MAP50[0] and _recorded(sess, "map50_95") >= DETECTOR_MAP[0]
    assert _recorded(sess, "small_map50") >= DETECTOR_SMALL[0]
    assert main["map50"] >= DETECTOR_MAP50[1], main
    assert main["map50_95"] >= DETECTOR_MAP[1], main
    assert small["map50"] >= DETECTOR_SMALL[1], small


def test_segmenter_mean_iou():
    sess = _session("segmenter")
    result = evaluate.segmentation(sess, evaluate.stress_samples("segmentation", CI_SIZES["segmentation"]))
    assert _recorded(sess, "mean_iou") >= SEGMENTER[0]
    assert result["miou"] >= SEGMENTER[1], result


def test_captioner_names_the_largest_shape_and_its_colour():
    enc, dec = _session("captioner_encoder"), _session("captioner_decoder")
    result = evaluate.captioning(enc, dec, evaluate.stress_samples("caption", CI_SIZES["caption"]))
    assert _recorded(enc, "named_largest") >= CAPTIONER[0]
    assert result["named_largest"] >= CAPTIONER[1], result["examples"]
