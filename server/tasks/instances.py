"""Instance segmentation (YOLOv8-seg style): boxes after NMS, and each object's mask at the original resolution.

The model gives ``output0 [4+C+M, A]`` (boxes, class scores, M mask
coefficients per anchor) and prototypes ``[M, mh, mw]`` at stride 4. An
object's mask logits are its coefficients times the prototypes, resampled to
the original image as Ultralytics' ``retina_masks`` path does (bilinear up by
1, 2 or 4, the letterbox padding cut away, bilinear to the original size),
thresholded at 0 and cut to the box. The resampling is computed only inside
each box, as two small interpolation matrices (rows, columns), so an object
costs its box's area, never the whole image's.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from optic.proto.optic.v1 import vision_pb2 as pb
from optic.server.errors import InvalidArgument
from optic.server.metadata import TASK_NAMES
from optic.server.tasks import boxes, draw
from optic.server.tasks.base import Option, Task, Work, label_of
from optic.server.tasks.detect import DetectParams
from optic.server.tasks.image import Prepared
from optic.server.tasks.segment import rle

if TYPE_CHECKING:
    from optic.server.repository import ServedModel


def _linear(out_size: int, in_size: int, scale: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear sampling as torch's ``interpolate(align_corners=False)``: for each output index, the two source
    indices and the weight of the second; ``scale`` is input units per output unit."""
    src = np.maximum((np.arange(out_size) + 0.5) * scale - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    return i0, i1, src - i0


def _matrix(rows: np.ndarray, i0: np.ndarray, i1: np.ndarray, w1: np.ndarray, in_size: int) -> np.ndarray:
    """The interpolation of ``rows`` (output indices) as a dense (len(rows), in_size) matrix."""
    m = np.zeros((len(rows), in_size))
    r = np.arange(len(rows))
    np.add.at(m, (r, i0[rows]), 1.0 - w1[rows])
    np.add.at(m, (r, i1[rows]), w1[rows])
    return m


@dataclass(frozen=True)
class _Axis:
    """One axis of the resampling: prototypes (n) -> upsampled by f -> letterbox cut -> original (size)."""

    n: int  # prototype cells
    f: int  # first upsampling factor
    cut: int  # first kept row/column of the upsampled mask
    kept: int  # how many are kept
    size: int  # original image length

    def weights(self, lo: int, hi: int) -> np.ndarray:
        """(hi - lo, n): original indices lo..hi-1 as combinations of prototype cells."""
        i0, i1, w1 = _linear(self.size, self.kept, self.kept / self.size)
        second = _matrix(np.arange(lo, hi), i0, i1, w1, self.kept)
        j0, j1, v1 = _linear(self.n * self.f, self.n, 1.0 / self.f)
        first = _matrix(np.arange(self.cut, self.cut + self.kept), j0, j1, v1, self.n)
        return second @ first


def _axes(mh: int, mw: int, ih: int, iw: int, h0: int, w0: int) -> tuple[_Axis, _Axis]:
    """Ultralytics' ``process_mask_native``: the upsampling factor from the letterbox padding, then
    ``scale_masks``' cut (its padding arithmetic) of the upsampled mask."""
    g = min(ih / h0, iw / w0)
    pad = (ih - max(round(h0 * g), 1)) | (iw - max(round(w0 * g), 1))
    f = 4 // math.gcd(4, pad | pad // 2)
    big_h, big_w = mh * f, mw * f
    g2 = min(big_h / h0, big_w / w0)
    nh, nw = max(round(h0 * g2), 1), max(round(w0 * g2), 1)
    top, left = round((big_h - nh) / 2 - 0.1), round((big_w - nw) / 2 - 0.1)
    return _Axis(mh, f, top, nh, h0), _Axis(mw, f, left, nw, w0)


@dataclass(frozen=True)
class Mask:
    x: int
    y: int
    mask: np.ndarray  # (h, w) bool inside the box


def instance_masks(
    coefficients: np.ndarray, protos: np.ndarray, found_boxes: np.ndarray, input_hw: tuple[int, int], width: int,
    height: int,
) -> list[Mask]:  # fmt: skip
    """Each object's mask within its box (boxes in original pixels): pixel (r, c) is kept when
    ``x1 <= c < x2`` and ``y1 <= r < y2`` and the resampled logit is above 0."""
    m, mh, mw = protos.shape
    ay, ax = _axes(mh, mw, input_hw[0], input_hw[1], height, width)
    flat = protos.reshape(m, mh * mw).astype(np.float64)
    out = []
    for coef, (x1, y1, x2, y2) in zip(coefficients.astype(np.float64), found_boxes, strict=True):
        c0, c1 = max(0, math.ceil(x1)), min(width, math.ceil(x2))
        r0, r1 = max(0, math.ceil(y1)), min(height, math.ceil(y2))
        if c1 <= c0 or r1 <= r0:
            out.append(Mask(c0, r0, np.zeros((0, 0), bool)))
            continue
        logits = (coef @ flat).reshape(mh, mw)
        out.append(Mask(c0, r0, (ay.weights(r0, r1) @ logits @ ax.weights(c0, c1).T) > 0))
    return out


def mask_png(mask: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(mask).convert("1").save(buf, "PNG", optimize=False, compress_level=1)
    return buf.getvalue()


@dataclass(frozen=True)
class InstanceMask:
    box: tuple[float, float, float, float]
    score: float
    class_id: int
    label: str
    x: int  # the mask's top-left pixel in the image
    y: int
    mask: np.ndarray  # (h, w) bool inside the box
    rle: tuple[int, ...] = field(default=())


class InstanceSegment(Task[list[InstanceMask]]):
    name = "instance-segment"
    long_name = TASK_NAMES["instance-segment"]
    rpc = "Segment"
    request_type = pb.SegmentRequest
    response_type = pb.SegmentResponse
    default_model = "segmenter"
    masks = True
    options = (
        Option("confidence_threshold", "--conf", float, "confidence threshold (default: the model's)"),
        Option("iou_threshold", "--iou", float, "NMS IoU threshold (default: the model's)"),
        Option("max_detections", "--max-det", int, "detections per image at most (default: the model's)"),
    )

    def check(self, model: ServedModel) -> None:
        super().check(model)
        if len(model.outputs) < 2:
            raise InvalidArgument(f"model {model.name!r} has no mask prototypes output; it is not an instance model")

    def defaults(self, model: ServedModel) -> dict[str, str]:
        return DetectParams.for_model(model).as_defaults()

    def validate(self, model: ServedModel, request: pb.SegmentRequest) -> tuple[DetectParams, bool]:
        return DetectParams.of(request, model), request.return_rle

    def finish(
        self, work: Work, model: ServedModel, params: Any, prepared: Prepared, outputs: dict[str, np.ndarray]
    ) -> pb.SegmentResult:
        detect, with_rle = params
        pred, protos = outputs[model.outputs[0].name], outputs[model.outputs[1].name]
        labels = model.meta.labels
        nc = len(labels) or pred.shape[0] - 4 - protos.shape[0]
        layout = model.meta.output_layout or "yolov8"
        classes = np.asarray(detect.classes, dtype=np.int64) if detect.classes else None
        found = boxes.detect(
            pred, layout, detect.conf_threshold, detect.iou_threshold, detect.agnostic, detect.max_det, classes, nc
        )
        t = prepared.transform
        mapped = t.to_original(found.boxes)
        coefficients = (pred[:, found.rows].T if layout == "yolov8" else pred[found.rows])[:, -protos.shape[0] :]
        masks = instance_masks(coefficients, protos, mapped, prepared.tensor.shape[-2:], t.width, t.height)
        result = pb.SegmentResult(width=t.width, height=t.height)
        for box, score, cls, m in zip(mapped, found.scores, found.class_ids, masks, strict=True):
            count = int(m.mask.sum())
            if not count:  # an empty mask drops its object, as Ultralytics does
                continue
            result.instances.append(
                pb.Instance(
                    box=pb.Box(x1=box[0], y1=box[1], x2=box[2], y2=box[3]),
                    score=float(score),
                    class_id=int(cls),
                    label=label_of(labels, int(cls)),
                    mask_png=mask_png(m.mask),
                    mask_x=m.x,
                    mask_y=m.y,
                    mask_width=m.mask.shape[1],
                    mask_height=m.mask.shape[0],
                    pixel_count=count,
                    rle_counts=full_rle(m, t.width, t.height, work.budget.take_runs) if with_rle else (),
                )
            )
        return result

    # ------------------------------------------------------------------ client side

    def result(self, message: pb.SegmentResult) -> list[InstanceMask]:
        return [
            InstanceMask(
                (i.box.x1, i.box.y1, i.box.x2, i.box.y2),
                i.score,
                i.class_id,
                i.label,
                i.mask_x,
                i.mask_y,
                np.asarray(Image.open(io.BytesIO(i.mask_png))).astype(bool),
                tuple(i.rle_counts),
            )
            for i in message.instances
        ]

    def render(self, result: list[InstanceMask]) -> str:
        rows = [
            f"  {i.score:7.4f}  {i.label:12s} ({i.class_id})  [{', '.join(f'{v:.1f}' for v in i.box)}]  "
            f"{int(i.mask.sum())} px"
            for i in result
        ]
        return "\n".join(rows) or "  (nothing found)"

    def to_json(self, result: list[InstanceMask]) -> object:
        return [
            {"box": list(i.box), "score": i.score, "class_id": i.class_id, "label": i.label,
             "mask": {"x": i.x, "y": i.y, "width": i.mask.shape[1], "height": i.mask.shape[0],
                      "pixels": int(i.mask.sum())}, "rle": list(i.rle)}
            for i in result
        ]  # fmt: skip

    def draw(self, image: Image.Image, result: list[InstanceMask]) -> Image.Image:
        colours = np.zeros((image.height, image.width, 3), np.float32)
        painted = np.zeros((image.height, image.width), bool)
        for i in result:
            h, w = i.mask.shape
            region = painted[i.y : i.y + h, i.x : i.x + w]
            region |= i.mask
            colours[i.y : i.y + h, i.x : i.x + w][i.mask] = draw.colour(i.class_id)
        tinted = draw.tint(image, painted, colours)
        return draw.boxes(tinted, [(i.box, i.class_id, f"{i.label} {i.score:.2f}") for i in result])


def full_rle(m: Mask, width: int, height: int, budget: Callable[[int], None]) -> tuple[int, ...]:
    """The box mask placed on the whole image, as COCO uncompressed RLE."""
    whole = np.zeros((height, width), bool)
    h, w = m.mask.shape
    whole[m.y : m.y + h, m.x : m.x + w] = m.mask
    return rle(whole, budget)


TASK = InstanceSegment()
