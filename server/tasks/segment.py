"""Semantic segmentation: logits -> a class map at the original image size, PNG, counts, RLE."""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from optic.proto.optic.v1 import vision_pb2 as pb
from optic.server.errors import InvalidArgument
from optic.server.metadata import TASK_NAMES
from optic.server.tasks import draw
from optic.server.tasks.base import Task, Work, label_of
from optic.server.tasks.image import Prepared, Transform

if TYPE_CHECKING:
    from optic.server.repository import ServedModel


@dataclass(frozen=True)
class ClassMask:
    class_id: int
    pixel_count: int
    rle_counts: tuple[int, ...] = ()


def class_map(logits: np.ndarray, transform: Transform) -> np.ndarray:
    """(C, h, w) logits at model size -> (H, W) uint8 class ids at the original size, nearest sampling.

    Each original pixel centre is mapped through the resize transform into the
    model's grid, so stretch, letterbox (padding cut away) and centre-crop
    (outside the crop: class 0) are all handled by one rule.
    """
    labels = logits.argmax(0).astype(np.uint8)
    h_in, w_in = labels.shape
    cols = np.floor((np.arange(transform.width) + 0.5) * transform.scale_x + transform.pad_x).astype(np.int64)
    rows = np.floor((np.arange(transform.height) + 0.5) * transform.scale_y + transform.pad_y).astype(np.int64)
    col_ok, row_ok = (cols >= 0) & (cols < w_in), (rows >= 0) & (rows < h_in)
    out = labels[rows.clip(0, h_in - 1)[:, None], cols.clip(0, w_in - 1)[None, :]]
    out[~(row_ok[:, None] & col_ok[None, :])] = 0
    return out


def png(mask: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(mask, "L").save(buf, "PNG", optimize=False, compress_level=1)
    return buf.getvalue()


def rle(binary: np.ndarray, budget: Callable[[int], None] | None = None) -> tuple[int, ...]:
    """COCO uncompressed RLE: column-major run lengths, beginning with a (possibly empty) run of zeros.

    ``budget`` is told the run count before the runs are built, and may refuse (a striped image can have as
    many runs as pixels)."""
    flat = binary.T.ravel().view(np.uint8)
    if budget is not None:
        budget(int(np.count_nonzero(flat[1:] != flat[:-1])) + 2)
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0] == 1:
        counts.insert(0, 0)
    return tuple(int(c) for c in counts)


def summarise(
    mask: np.ndarray, num_classes: int, with_rle: bool, budget: Callable[[int], None] | None = None
) -> list[ClassMask]:
    counts = np.bincount(mask.ravel(), minlength=num_classes)
    return [
        ClassMask(c, int(n), rle(mask == c, budget) if with_rle else ()) for c, n in enumerate(counts.tolist()) if n > 0
    ]


@dataclass(frozen=True)
class Segmentation:
    mask: np.ndarray  # (H, W) uint8 class ids at the original size
    labels: dict[int, str]  # classes present
    pixel_counts: dict[int, int]
    rle: dict[int, tuple[int, ...]] = field(default_factory=dict)  # COCO RLE counts, when asked for


class Segment(Task[Segmentation]):
    name = "segment"
    long_name = TASK_NAMES["segment"]
    rpc = "Segment"
    request_type = pb.SegmentRequest
    response_type = pb.SegmentResponse
    default_model = "segmenter"
    masks = True

    def finish(
        self,
        work: Work,
        model: ServedModel,
        request: pb.SegmentRequest,
        prepared: Prepared,
        outputs: dict[str, np.ndarray],
    ) -> pb.SegmentResult:
        logits = outputs[model.outputs[0].name]
        if logits.ndim != 3:
            raise InvalidArgument(f"model {model.name!r} output has shape {logits.shape}; expected [C, H, W]")
        mask = class_map(logits, prepared.transform)
        labels = model.meta.labels
        # The run counts are counted (and may be refused) before the PNG is encoded: no work for a refusal.
        classes = [
            pb.ClassMask(
                class_id=m.class_id,
                label=label_of(labels, m.class_id),
                pixel_count=m.pixel_count,
                rle_counts=m.rle_counts,
            )
            for m in summarise(mask, logits.shape[0], request.return_rle, work.budget.take_runs)
        ]
        return pb.SegmentResult(
            mask_png=png(mask), width=prepared.transform.width, height=prepared.transform.height, classes=classes
        )

    # ------------------------------------------------------------------ client side

    def result(self, message: pb.SegmentResult) -> Segmentation:
        return Segmentation(
            np.asarray(Image.open(io.BytesIO(message.mask_png))),
            {c.class_id: c.label for c in message.classes},
            {c.class_id: c.pixel_count for c in message.classes},
            {c.class_id: tuple(c.rle_counts) for c in message.classes if c.rle_counts},
        )

    def render(self, result: Segmentation) -> str:
        total = sum(result.pixel_counts.values()) or 1
        return "\n".join(
            f"  {n / total:7.2%}  {result.labels[c]} ({c})" for c, n in sorted(result.pixel_counts.items())
        )

    def to_json(self, result: Segmentation) -> object:
        return {
            "mask": {"shape": list(result.mask.shape)},
            "labels": {str(k): v for k, v in result.labels.items()},
            "pixel_counts": {str(k): v for k, v in result.pixel_counts.items()},
            "rle": {str(k): list(v) for k, v in result.rle.items()},
        }

    def draw(self, image: Image.Image, result: Segmentation) -> Image.Image:
        colours = np.array([(0, 0, 0)] + [draw.colour(i) for i in range(255)], dtype=np.float32)[:256]
        return draw.tint(image, result.mask > 0, colours[result.mask.astype(np.int64)])  # class 0: background


TASK = Segment()
