"""Detection post-processing: decoding both YOLO layouts, and NMS against a plain greedy reference."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from optic.server.tasks.boxes import candidates, detect, non_max_suppression
from tests.conftest import box_iou


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


# ---------------------------------------------------------------- against onnxruntime's NonMaxSuppression


def ort_nms_session(classes: int):
    """A one-node graph around the ONNX NonMaxSuppression operator, run by onnxruntime."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("NonMaxSuppression", ["boxes", "scores", "max", "iou", "score"], ["selected"])],
        "nms",
        [
            helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [1, None, 4]),
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, classes, None]),
            helper.make_tensor_value_info("max", TensorProto.INT64, [1]),
            helper.make_tensor_value_info("iou", TensorProto.FLOAT, [1]),
            helper.make_tensor_value_info("score", TensorProto.FLOAT, [1]),
        ],
        [helper.make_tensor_value_info("selected", TensorProto.INT64, [None, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def ort_nms(sess, boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, num_classes: int, thr: float):
    """Kept indices per the operator: per class (class-aware), boxes given as y1, x1, y2, x2."""
    yxyx = boxes[:, [1, 0, 3, 2]][None].astype(np.float32)
    per_class = np.zeros((1, num_classes, len(boxes)), np.float32)  # a box scores only for its own class
    per_class[0, classes, np.arange(len(boxes))] = scores
    selected = sess.run(
        None,
        {
            "boxes": yxyx,
            "scores": per_class,
            "max": np.array([len(boxes)], np.int64),
            "iou": np.array([thr], np.float32),
            "score": np.array([0.0], np.float32),
        },
    )[0]
    return set(selected[:, 2].tolist())


ORT_NMS = {}


@settings(max_examples=150, deadline=None, derandomize=True)
@given(
    n=st.integers(1, 120),
    seed=st.integers(0, 2**32 - 1),
    thr=st.sampled_from([0.3, 0.45, 0.5, 0.65, 0.7]),
    num_classes=st.integers(1, 4),
)
def test_nms_keeps_what_onnxruntime_keeps(n, seed, thr, num_classes):
    rng = np.random.default_rng(seed)
    # Integer corners on a small grid make overlaps common; distinct scores keep the order unambiguous.
    xy = rng.integers(0, 60, (n, 2))
    wh = rng.integers(1, 30, (n, 2))
    boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    scores = (rng.permutation(n) + 1).astype(np.float32) / (n + 1)
    classes = rng.integers(0, num_classes, n)
    sess = ORT_NMS.setdefault(num_classes, ort_nms_session(num_classes))
    ours = set(non_max_suppression(boxes, scores, thr, classes, max_det=n).tolist())
    assert ours == ort_nms(sess, boxes, scores, classes, num_classes, thr)


# ---------------------------------------------------------------- letterbox geometry


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    width=st.integers(8, 4000),
    height=st.integers(8, 4000),
    side=st.sampled_from([64, 96, 320, 640]),
    box=st.tuples(*[st.floats(0, 1)] * 4),
)
def test_letterbox_round_trip(width, height, side, box):
    from optic.server.tasks.pipelines import Transform, letterbox_geometry

    _, nw, nh, px, py = letterbox_geometry(width, height, (side, side))
    assert nw <= side and nh <= side and (nw == side or nh == side)  # fits, and touches two sides
    assert 0 <= px <= side - nw and 0 <= py <= side - nh
    t = Transform(width, height, nw / width, nh / height, px, py)
    x1, x2 = sorted((box[0] * width, box[2] * width))
    y1, y2 = sorted((box[1] * height, box[3] * height))
    original = np.array([[x1, y1, x2, y2]], np.float32)
    model = original * np.float32([t.scale_x, t.scale_y] * 2) + np.float32([t.pad_x, t.pad_y] * 2)
    assert (model[:, 0::2] >= px - 1e-3).all() and (model[:, 0::2] <= px + nw + 1e-3).all()
    np.testing.assert_allclose(t.to_original(model), original, atol=1e-3 * max(width, height))
