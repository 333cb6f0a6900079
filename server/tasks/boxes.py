"""Box maths shared by the box-producing tasks: YOLO output decoding and non-maximum suppression, vectorised.

Three output layouts are understood: YOLOv5's ``[A, 5+C]`` (cx, cy, w, h,
objectness, class scores), Ultralytics YOLOv8/11's ``[4+C(+M), A]`` (cx, cy,
w, h, class scores; no objectness; M mask coefficients for segmentation), and
end-to-end heads' ``[K, 6]`` (x1, y1, x2, y2, score, class: YOLO26/v10 and
``nms=True`` exports, already suppressed). Thresholds follow Ultralytics: a
candidate's best class score must be *above* the confidence threshold, and a
box is suppressed when its IoU with a better one is *above* the IoU threshold.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LAYOUTS = ("yolov5", "yolov8", "end2end")


@dataclass(frozen=True)
class Detections:
    boxes: np.ndarray  # (K, 4) float32 x1, y1, x2, y2 in input pixels
    scores: np.ndarray  # (K,) float32
    class_ids: np.ndarray  # (K,) int64
    rows: np.ndarray  # (K,) int64: each detection's anchor in the model's output (instance masks use it)

    def take(self, keep: np.ndarray) -> Detections:
        return Detections(self.boxes[keep], self.scores[keep], self.class_ids[keep], self.rows[keep])


def candidates(pred: np.ndarray, layout: str, conf_threshold: float, num_classes: int = 0) -> Detections:
    """One image's raw output -> boxes whose best class score is above the threshold.

    ``num_classes`` separates class scores from what follows them (YOLOv8-seg's
    mask coefficients); 0 means every column after the box is a class score.
    """
    if layout == "end2end":
        scores = pred[:, 4]
        keep = np.flatnonzero(scores > conf_threshold)
        return Detections(
            pred[keep, :4].astype(np.float32),
            scores[keep].astype(np.float32),
            pred[keep, 5].astype(np.int64),
            keep.astype(np.int64),
        )
    if layout == "yolov8":
        pred = pred.T
        box, scores_all = pred[:, :4], pred[:, 4 : 4 + num_classes] if num_classes else pred[:, 4:]
    elif layout == "yolov5":
        box, obj, cls = pred[:, :4], pred[:, 4:5], pred[:, 5:]
        scores_all = obj * cls
    else:
        raise ValueError(f"unknown detection layout {layout!r}; expected one of {LAYOUTS}")
    class_ids = scores_all.argmax(1)
    scores = scores_all[np.arange(len(scores_all)), class_ids]
    keep = np.flatnonzero(scores > conf_threshold)
    box, scores, class_ids = box[keep], scores[keep], class_ids[keep]
    xyxy = np.concatenate([box[:, :2] - box[:, 2:] / 2, box[:, :2] + box[:, 2:] / 2], axis=1)
    return Detections(
        xyxy.astype(np.float32), scores.astype(np.float32), class_ids.astype(np.int64), keep.astype(np.int64)
    )


def non_max_suppression(
    boxes: np.ndarray,
    scores: np.ndarray,
    iou_threshold: float,
    class_ids: np.ndarray | None = None,
    max_det: int = 300,
) -> np.ndarray:
    """Indices kept by greedy NMS, best score first; class-aware when ``class_ids`` is given.

    Exact greedy NMS without a per-box loop and without the N x N IoU matrix:
    a sweep over boxes sorted by x1 lists only the pairs that overlap along x
    (classes are moved far apart first, so they never pair), IoU is computed
    for those pairs at once, and the kept set is the fixed point of "kept iff
    no kept, higher-scoring box overlaps it beyond the threshold" ("cluster
    NMS"), each sweep one vectorised pass over the overlapping pairs.
    """
    n = len(boxes)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.argsort(-scores, kind="stable")
    b = boxes[order].astype(np.float64)
    if class_ids is not None:  # offset each class far apart so classes never overlap
        b = b + (class_ids[order].astype(np.float64) * (np.abs(b).max() + 1.0) * 4.0)[:, None]
    hi, lo = _overlapping_pairs(b, iou_threshold)
    keep = np.ones(n, dtype=bool)
    while True:
        suppressed = np.zeros(n, dtype=bool)
        suppressed[lo[keep[hi]]] = True
        new = ~suppressed
        if np.array_equal(new, keep):
            break
        keep = new
    return order[keep][:max_det]


def _overlapping_pairs(b: np.ndarray, iou_threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (higher rank, lower rank) of boxes, given in rank order, whose IoU exceeds the threshold."""
    n = len(b)
    by_x = np.argsort(b[:, 0], kind="stable")
    x1_sorted = b[by_x, 0]
    # Box by_x[k] can only overlap boxes later in x order whose x1 is left of its x2.
    ends = np.searchsorted(x1_sorted, b[by_x, 2], side="left")
    starts = np.arange(1, n + 1)
    counts = np.maximum(ends - starts, 0)
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    first = np.repeat(np.arange(n), counts)
    step = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
    i, j = by_x[first], by_x[np.repeat(starts, counts) + step]
    lt = np.maximum(b[i, :2], b[j, :2])
    rb = np.minimum(b[i, 2:], b[j, 2:])
    inter = np.clip(rb - lt, 0, None).prod(1)
    area = np.clip(b[:, 2:] - b[:, :2], 0, None).prod(1)
    union = area[i] + area[j] - inter
    over = np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0) > iou_threshold
    i, j = i[over], j[over]
    return np.minimum(i, j), np.maximum(i, j)


def detect(
    pred: np.ndarray,
    layout: str,
    conf_threshold: float = 0.25,
    iou_threshold: float = 0.45,
    agnostic: bool = False,
    max_det: int = 300,
    classes: np.ndarray | None = None,
    num_classes: int = 0,
) -> Detections:
    """Raw output of one image -> final detections in input pixels, best first; ``classes`` keeps only those
    class ids. End-to-end outputs are already suppressed: they are only thresholded and cut to ``max_det``."""
    c = candidates(pred, layout, conf_threshold, num_classes)
    if classes is not None and len(classes):
        c = c.take(np.isin(c.class_ids, classes))
    if layout == "end2end":
        return c.take(np.arange(min(len(c.scores), max_det)))
    return c.take(non_max_suppression(c.boxes, c.scores, iou_threshold, None if agnostic else c.class_ids, max_det))


def layout_of(shape: tuple[int, ...], declared: str | None, num_classes: int) -> str:
    """The output layout from metadata, else from the shape: [A, 5+C] is YOLOv5's, [4+C, A] YOLOv8's (importing
    a model records its layout, after checking it against a real output)."""
    if declared in LAYOUTS:
        return declared
    if len(shape) == 2 and shape[0] == 4 + num_classes and shape[1] != 5 + num_classes:
        return "yolov8"
    return "yolov5"
