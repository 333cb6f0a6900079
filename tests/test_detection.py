"""Detection post-processing: decoding both YOLO layouts, and NMS against a plain greedy reference."""

from __future__ import annotations

import numpy as np
import pytest

from server.tasks.detection import box_iou, candidates, detect, non_max_suppression


def greedy_reference(boxes, scores, thr, classes=None):
    order = list(np.argsort(-scores, kind="stable"))
    keep = []
    for i in order:
        if all(
            (classes is not None and classes[i] != classes[k])
            or box_iou(boxes[i : i + 1], boxes[k : k + 1])[0, 0] <= thr
            for k in keep
        ):
            keep.append(i)
    return np.array(keep, dtype=np.int64)


@pytest.mark.parametrize("seed", range(20))
def test_nms_matches_greedy(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 200))
    xy = rng.uniform(0, 100, (n, 2))
    wh = rng.uniform(2, 40, (n, 2))
    boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    scores = rng.uniform(0, 1, n).astype(np.float32)
    classes = rng.integers(0, 3, n)
    thr = float(rng.uniform(0.2, 0.8))
    np.testing.assert_array_equal(non_max_suppression(boxes, scores, thr), greedy_reference(boxes, scores, thr))
    np.testing.assert_array_equal(
        non_max_suppression(boxes, scores, thr, classes), greedy_reference(boxes, scores, thr, classes)
    )


def test_layouts_decode_to_the_same_boxes():
    # One box at (50, 40), 20x10, class 1 with confidence 0.9; plus a weak one.
    v5 = np.array([[50, 40, 20, 10, 0.9, 0.0, 1.0], [10, 10, 4, 4, 0.1, 1.0, 0.0]], np.float32)
    v8 = np.array([[50, 40, 20, 10, 0.0, 0.9], [10, 10, 4, 4, 0.1, 0.0]], np.float32).T
    for pred, layout in ((v5, "yolov5"), (v8, "yolov8")):
        det = detect(pred, layout, conf_threshold=0.25)
        np.testing.assert_allclose(det.boxes, [[40, 35, 60, 45]])
        assert det.class_ids.tolist() == [1] and det.scores[0] == pytest.approx(0.9)
    assert len(candidates(v5, "yolov5", 0.05).scores) == 2
