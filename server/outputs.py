"""Does a model's real output fit what its metadata says? Checked at import and again at every load.

A YOLO-style output with symbolic dimensions can be read the wrong way round
(``[N, 6, 64]`` as YOLOv5's ``[N, A, 5+C]`` instead of YOLOv8's ``[N, 4+C, A]``)
and then answers nonsense with confidence. So the model is run once on an
input of its real size and the output shapes are matched against the task,
the label count and the declared layout; anything that does not fit, or fits
two ways, is refused with one line naming the shapes.
"""

from __future__ import annotations

from collections.abc import Sequence

from optic.server.metadata import ModelMeta

Shape = tuple[int, ...]


class OutputMismatch(ValueError):
    """The outputs do not fit the metadata; the message is one line naming the shapes."""


def detection_layouts(shape: Shape, classes: int, masks: int = 0) -> list[str]:
    """Every detection layout ``shape`` (batch axis first) fits, for ``classes`` classes (+ ``masks`` mask
    coefficients per anchor)."""
    if len(shape) != 3:
        return []
    _, a, b = shape
    fits = []
    if a == 4 + classes + masks and b > 0:
        fits.append("yolov8")
    if b == 5 + classes and not masks and a > 0:
        fits.append("yolov5")
    if b == 6 and not masks and a > 0:
        fits.append("end2end")
    return fits


def check_outputs(meta: ModelMeta, shapes: Sequence[Shape], name: str = "model") -> str | None:
    """The detection layout that ``shapes`` (real outputs at batch 1) fit, or None for other tasks; raises
    :class:`OutputMismatch` when they do not fit the task, labels and declared layout."""
    task, classes = meta.task, len(meta.labels)
    first = tuple(shapes[0]) if shapes else ()
    if task == "classification" and classes:
        flat = [d for d in first[1:] if d != 1] or [1]
        if len(flat) != 1 or flat[0] != classes:
            raise OutputMismatch(f"{name}: output {list(first)} has no axis of {classes} classes for {classes} labels")
    elif task == "segmentation" and classes:
        if len(first) != 4 or first[1] != classes:
            raise OutputMismatch(
                f"{name}: a segmentation output must be [N, {classes}, H, W] for {classes} labels, got {list(first)}"
            )
    elif task in ("detection", "instance_segmentation"):
        masks = 0
        if task == "instance_segmentation":
            protos = tuple(shapes[1]) if len(shapes) > 1 else ()
            if len(protos) != 4:
                raise OutputMismatch(f"{name}: an instance model needs prototypes [N, M, h, w], got {list(protos)}")
            masks = protos[1]
        if not classes:
            raise OutputMismatch(f"{name}: a detector needs labels to tell its output layout")
        fits = detection_layouts(first, classes, masks)
        expected = {
            "yolov8": f"[N, {4 + classes + masks}, A]",
            "yolov5": f"[N, A, {5 + classes}]",
            "end2end": "[N, K, 6]",
        }
        declared = meta.output_layout
        if declared is not None:
            if declared not in fits:
                also = f"; it fits {', '.join(fits)}" if fits else ""
                raise OutputMismatch(
                    f"{name}: output {list(first)} does not fit the {declared} layout for {classes} labels "
                    f"(expected {expected.get(declared, '?')}{also})"
                )
            return declared
        if len(fits) != 1:
            every = ", ".join(f"{k} {v}" for k, v in expected.items())
            problem = f"fits {' and '.join(fits)}: declare the layout" if fits else f"fits none of {every}"
            raise OutputMismatch(f"{name}: output {list(first)} for {classes} labels {problem}")
        return fits[0]
    return meta.output_layout
