"""Detection: YOLO outputs -> boxes in the client's pixels, after NMS, with the model's own defaults."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from optic.proto.optic.v1 import vision_pb2 as pb
from optic.server.errors import InvalidArgument
from optic.server.metadata import TASK_NAMES
from optic.server.tasks import boxes, draw
from optic.server.tasks.base import Option, Task, Work, label_of
from optic.server.tasks.image import Prepared

if TYPE_CHECKING:
    from PIL import Image as PILImage

    from optic.server.repository import ServedModel

MAX_DETECTIONS = 10_000


@dataclass(frozen=True)
class DetectParams:
    """Per-request settings, checked; unset ones take the model's defaults."""

    conf_threshold: float
    iou_threshold: float
    agnostic: bool = False
    max_det: int = 300
    classes: tuple[int, ...] = ()

    def check(self, num_classes: int) -> DetectParams:
        for name in ("conf_threshold", "iou_threshold"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:  # also false for NaN
                raise InvalidArgument(f"{name.replace('_threshold', '')} threshold {value} must be within [0, 1]")
        if not 1 <= self.max_det <= MAX_DETECTIONS:
            raise InvalidArgument(f"max_detections {self.max_det} must be 1 to {MAX_DETECTIONS}")
        bad = [c for c in self.classes if c >= num_classes]
        if bad:
            raise InvalidArgument(f"class id(s) {bad[:8]} out of range; the model has {num_classes} classes")
        return self

    @classmethod
    def of(cls, request: Any, model: ServedModel) -> DetectParams:
        """The request's thresholds where set, else the model's defaults; checked."""
        defaults = cls.for_model(model)
        params = cls(
            conf_threshold=request.confidence_threshold
            if request.HasField("confidence_threshold")
            else defaults.conf_threshold,
            iou_threshold=request.iou_threshold if request.HasField("iou_threshold") else defaults.iou_threshold,
            agnostic=getattr(request, "class_agnostic", False),
            max_det=request.max_detections if request.HasField("max_detections") else defaults.max_det,
            classes=tuple(getattr(request, "class_ids", ())),
        )
        return params.check(len(model.meta.labels) or 1 << 30)

    @classmethod
    def for_model(cls, model: ServedModel) -> DetectParams:
        """The model's own defaults (its metadata; Ultralytics models: 0.25 / 0.7 / 300)."""
        d = model.meta.detect
        return cls(d.confidence_threshold, d.iou_threshold, False, d.max_detections)

    def as_defaults(self) -> dict[str, str]:
        return {
            "confidence_threshold": f"{self.conf_threshold:g}",
            "iou_threshold": f"{self.iou_threshold:g}",
            "max_detections": str(self.max_det),
        }


@dataclass(frozen=True)
class Detection:
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in original pixels
    score: float
    class_id: int
    label: str


def detection_messages(found: boxes.Detections, prepared: Prepared, labels: tuple[str, ...]) -> list[pb.Detection]:
    """Detections in model-input pixels -> messages in the client's pixels."""
    mapped = prepared.transform.to_original(found.boxes)
    return [
        pb.Detection(
            box=pb.Box(x1=b[0], y1=b[1], x2=b[2], y2=b[3]),
            score=float(s),
            class_id=int(c),
            label=label_of(labels, int(c)),
        )
        for b, s, c in zip(mapped, found.scores, found.class_ids, strict=True)
    ]


class Detect(Task[list[Detection]]):
    name = "detect"
    long_name = TASK_NAMES["detect"]
    rpc = "Detect"
    request_type = pb.DetectRequest
    response_type = pb.DetectResponse
    default_model = "detector"
    options = (
        Option("confidence_threshold", "--conf", float, "confidence threshold (default: the model's)"),
        Option("iou_threshold", "--iou", float, "NMS IoU threshold (default: the model's)"),
        Option("max_detections", "--max-det", int, "detections per image at most (default: the model's)"),
    )

    def defaults(self, model: ServedModel) -> dict[str, str]:
        return DetectParams.for_model(model).as_defaults()

    def validate(self, model: ServedModel, request: pb.DetectRequest) -> DetectParams:
        return DetectParams.of(request, model)

    def finish(
        self, work: Work, model: ServedModel, params: DetectParams, prepared: Prepared, outputs: dict[str, np.ndarray]
    ) -> pb.DetectResult:
        pred = outputs[model.outputs[0].name]
        if pred.ndim != 2:
            raise InvalidArgument(f"model {model.name!r} output has shape {pred.shape}; expected 2-D per image")
        labels = model.meta.labels
        layout = boxes.layout_of(pred.shape, model.meta.output_layout, len(labels))
        classes = np.asarray(params.classes, dtype=np.int64) if params.classes else None
        found = boxes.detect(
            pred, layout, params.conf_threshold, params.iou_threshold, params.agnostic, params.max_det, classes
        )
        return pb.DetectResult(
            width=prepared.transform.width,
            height=prepared.transform.height,
            detections=detection_messages(found, prepared, labels),
        )

    # ------------------------------------------------------------------ client side

    def result(self, message: pb.DetectResult) -> list[Detection]:
        return [
            Detection((d.box.x1, d.box.y1, d.box.x2, d.box.y2), d.score, d.class_id, d.label)
            for d in message.detections
        ]

    def render(self, result: list[Detection]) -> str:
        rows = [
            f"  {d.score:7.4f}  {d.label:12s} ({d.class_id})  [{', '.join(f'{v:.1f}' for v in d.box)}]" for d in result
        ]
        return "\n".join(rows) or "  (nothing detected)"

    def to_json(self, result: list[Detection]) -> object:
        return [asdict(d) for d in result]

    def draw(self, image: PILImage.Image, result: list[Detection]) -> PILImage.Image:
        return draw.boxes(image, [(d.box, d.class_id, f"{d.label} {d.score:.2f}") for d in result])


TASK = Detect()
