"""The self-describing model contract: ONNX ``metadata_props`` keys and their meaning.

The export stage writes these keys; the server reads them to pick pre- and
post-processing. Models exported by Ultralytics carry their own keys
(``names``, ``imgsz``, ``stride``, ``task``, ``end2end``, ``args``); those are
understood as a fallback, so such a file serves without a config and answers
as Ultralytics' own predictor does.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

TASK = "optic.task"
LABELS = "optic.labels"
INPUT_SIZE = "optic.input.size"
INPUT_COLOR = "optic.input.color"
INPUT_RESIZE = "optic.input.resize"
INPUT_SCALE = "optic.input.scale"
INPUT_MEAN = "optic.input.mean"
INPUT_STD = "optic.input.std"
INPUT_LAYOUT = "optic.input.layout"
INPUT_PAD_VALUE = "optic.input.pad_value"
INPUT_PIPELINE = "optic.input.pipeline"
INPUT_DECODE = "optic.input.decode"
INPUT_RESIZE_SIZE = "optic.input.resize_size"
INPUT_INTERPOLATION = "optic.input.interpolation"
INPUT_STRIDE = "optic.input.stride"
OUTPUT_KIND = "optic.output.kind"
OUTPUT_LAYOUT = "optic.output.layout"
VOCAB = "optic.vocab"
DETECT_CONFIDENCE = "optic.detect.confidence_threshold"
DETECT_IOU = "optic.detect.iou_threshold"
DETECT_MAX = "optic.detect.max_detections"

KEYS = frozenset(
    {TASK, LABELS, INPUT_SIZE, INPUT_COLOR, INPUT_RESIZE, INPUT_SCALE, INPUT_MEAN, INPUT_STD, INPUT_LAYOUT}
    | {INPUT_PAD_VALUE, INPUT_PIPELINE, INPUT_DECODE, INPUT_RESIZE_SIZE, INPUT_INTERPOLATION, INPUT_STRIDE}
    | {OUTPUT_KIND, OUTPUT_LAYOUT, VOCAB, DETECT_CONFIDENCE, DETECT_IOU, DETECT_MAX}
)

# Model (directory) names: what the repository serves and the export stage may write.
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")

# The one task vocabulary: short names (Ultralytics' and ``optic infer``'s words) -> the long names
# written in ``optic.task``. Everywhere a task is named, either form is accepted.
TASK_NAMES = {
    "classify": "classification",
    "detect": "detection",
    "segment": "segmentation",
    "instance-segment": "instance_segmentation",
    "caption": "captioning",
}
TASKS = tuple(TASK_NAMES.values())
# Ultralytics' ``task`` metadata: its "segment" models are instance segmentation (boxes + per-object masks).
_ULTRALYTICS_TASKS = {"classify": "classification", "detect": "detection", "segment": "instance_segmentation"}

RESIZE_MODES = ("stretch", "letterbox", "letterbox_auto", "center_crop", "shorter_side")
PIPELINES = ("optic", "ultralytics", "torchvision")
DECODES = ("exact", "draft")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
COLORS = ("RGB", "BGR")
OUTPUT_KINDS = ("logits", "probabilities")
OUTPUT_LAYOUTS = ("yolov5", "yolov8", "end2end")


def task_long_name(name: str) -> str:
    """``detect`` or ``detection`` -> ``detection``; anything else is returned unchanged (for callers to refuse)."""
    return TASK_NAMES.get(name, name)


def task_short_name(name: str | None) -> str:
    """``detection`` or ``detect`` -> ``detect``."""
    for short, long in TASK_NAMES.items():
        if name in (short, long):
            return short
    return name or ""


class MetadataError(ValueError):
    """A metadata value is missing or malformed; the message names the key."""


@dataclass(frozen=True)
class InputSpec:
    """How an image becomes the model's input tensor.

    ``pipeline`` names the reference the pixels must match: ``optic`` (our own
    models: Pillow bilinear), ``ultralytics`` (OpenCV decode and
    ``INTER_LINEAR`` letterbox, as its predictor) or ``torchvision`` (the
    weights' own ``transforms()``: Pillow resize of the shorter side, centre
    crop). ``decode`` ``draft`` lets a large JPEG decode at 1/2, 1/4 or 1/8
    scale in the DCT domain: faster, and not the same pixels.
    """

    size: tuple[int, int]  # (height, width); for shorter_side: the nominal size (warm-up)
    color: str = "RGB"
    resize: str = "stretch"
    scale: float = 1.0 / 255.0
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    layout: str = "NCHW"
    pad_value: int = 114  # letterbox border grey level (Ultralytics' value)
    pipeline: str = "optic"
    decode: str = "exact"
    resize_size: int = 0  # center_crop / shorter_side: the shorter side's length before cropping (0: the crop's)
    interpolation: str = "bilinear"
    stride: int = 32  # letterbox_auto: each side padded only up to a multiple of this


@dataclass(frozen=True)
class DetectDefaults:
    """A detector's request defaults (Ultralytics': 0.25 / 0.7 / 300)."""

    confidence_threshold: float = 0.25
    iou_threshold: float = 0.45
    max_detections: int = 300


ULTRALYTICS_DETECT = DetectDefaults(0.25, 0.7, 300)


@dataclass(frozen=True)
class ModelMeta:
    task: str | None = None
    labels: tuple[str, ...] = ()
    input: InputSpec | None = None
    output_kind: str = "logits"
    # detection: "yolov5" [N, A, 5+C], "yolov8" [N, 4+C, A] (+ mask coefficients for instance segmentation),
    # "end2end" [N, K, 6] (x1, y1, x2, y2, score, class: NMS already done)
    output_layout: str | None = None
    vocab: tuple[str, ...] = ()  # captioning: token strings by id
    detect: DetectDefaults = field(default_factory=DetectDefaults)
    extra: Mapping[str, str] = field(default_factory=dict)  # every other key, as written

    def to_props(self) -> dict[str, str]:
        """The ``metadata_props`` entries that describe this model (defaults stay implicit where old models had
        none, so files written before a key existed stay byte-identical)."""
        props: dict[str, str] = dict(self.extra)
        if self.task:
            props[TASK] = self.task
        if self.labels:
            props[LABELS] = json.dumps(list(self.labels))
        if self.input:
            spec = self.input
            props |= {
                INPUT_SIZE: json.dumps(list(spec.size)),
                INPUT_COLOR: spec.color,
                INPUT_RESIZE: spec.resize,
                INPUT_SCALE: repr(spec.scale),
                INPUT_MEAN: json.dumps(list(spec.mean)),
                INPUT_STD: json.dumps(list(spec.std)),
                INPUT_LAYOUT: spec.layout,
            }
            base = InputSpec(size=spec.size)
            optional = {
                INPUT_PAD_VALUE: (spec.pad_value, base.pad_value),
                INPUT_PIPELINE: (spec.pipeline, base.pipeline),
                INPUT_DECODE: (spec.decode, base.decode),
                INPUT_RESIZE_SIZE: (spec.resize_size, base.resize_size),
                INPUT_INTERPOLATION: (spec.interpolation, base.interpolation),
                INPUT_STRIDE: (spec.stride, base.stride),
            }
            props |= {key: str(value) for key, (value, default) in optional.items() if value != default}
        props[OUTPUT_KIND] = self.output_kind
        if self.output_layout:
            props[OUTPUT_LAYOUT] = self.output_layout
        if self.vocab:
            props[VOCAB] = json.dumps(list(self.vocab))
        if self.detect != DetectDefaults():
            props |= {
                DETECT_CONFIDENCE: repr(self.detect.confidence_threshold),
                DETECT_IOU: repr(self.detect.iou_threshold),
                DETECT_MAX: str(self.detect.max_detections),
            }
        return props

    @classmethod
    def from_props(cls, props: Mapping[str, str]) -> ModelMeta:
        """Parse ours, falling back to Ultralytics' keys; raises :class:`MetadataError`."""
        ultralytics = TASK not in props and "imgsz" in props
        task = task_long_name(props[TASK]) if TASK in props else _ULTRALYTICS_TASKS.get(props.get("task", ""))
        if task is not None and task not in TASKS:
            raise MetadataError(f"metadata {TASK!r} is {task!r}; expected one of {', '.join(TASKS)}")
        labels = _labels(props)
        spec: InputSpec | None = None
        if INPUT_SIZE in props:
            spec = _input_spec(props)
        elif ultralytics:
            spec = _ultralytics_spec(props, task)
        default_kind = "probabilities" if ultralytics and task == "classification" else "logits"
        output_kind = _choice(props, OUTPUT_KIND, OUTPUT_KINDS, default_kind)
        layout = _choice(props, OUTPUT_LAYOUT, OUTPUT_LAYOUTS, "yolov8") if OUTPUT_LAYOUT in props else None
        if layout is None and ultralytics and task in ("detection", "instance_segmentation"):
            # Ultralytics heads are [N, 4+C(+32), A]; end-to-end ones (YOLO26/v10, nms=True) [N, K, 6].
            layout = "end2end" if _ultralytics_end2end(props) else "yolov8"
        vocab = _json(props, VOCAB, list) if VOCAB in props else []
        if not all(isinstance(x, str) for x in vocab):
            raise MetadataError(f"metadata {VOCAB!r} must be a list of strings")
        base = ULTRALYTICS_DETECT if ultralytics else DetectDefaults()
        detect = DetectDefaults(
            _float(props, DETECT_CONFIDENCE, base.confidence_threshold),
            _float(props, DETECT_IOU, base.iou_threshold),
            int(_float(props, DETECT_MAX, base.max_detections)),
        )
        if not (0 <= detect.confidence_threshold <= 1 and 0 <= detect.iou_threshold <= 1 and detect.max_detections > 0):
            raise MetadataError("metadata optic.detect.* must be thresholds in [0, 1] and a positive count")
        extra = {k: v for k, v in props.items() if k not in KEYS}
        return cls(task, tuple(labels), spec, output_kind, layout, tuple(vocab), detect, extra)


def _labels(props: Mapping[str, str]) -> list[str]:
    if LABELS in props:
        labels = _json(props, LABELS, list)
    elif "names" in props:  # Ultralytics: a Python dict literal {0: 'person', ...}
        names = _literal(props, "names")
        if isinstance(names, dict):
            labels = [names[k] for k in sorted(names)]
        elif isinstance(names, list | tuple):
            labels = list(names)
        else:
            raise MetadataError("metadata 'names' must be a dict or a list of class names")
    else:
        labels = []
    if not all(isinstance(x, str) for x in labels):
        raise MetadataError(f"metadata {LABELS!r} must be a list of strings")
    return labels


def _input_spec(props: Mapping[str, str]) -> InputSpec:
    spec = InputSpec(
        size=_size(_json(props, INPUT_SIZE, list), INPUT_SIZE),
        color=_choice(props, INPUT_COLOR, COLORS, "RGB"),
        resize=_choice(props, INPUT_RESIZE, RESIZE_MODES, "stretch"),
        scale=_float(props, INPUT_SCALE, 1.0 / 255.0),
        mean=_triple(props, INPUT_MEAN, (0.0, 0.0, 0.0)),
        std=_triple(props, INPUT_STD, (1.0, 1.0, 1.0)),
        layout=_choice(props, INPUT_LAYOUT, ("NCHW", "NHWC"), "NCHW"),
        pad_value=int(_float(props, INPUT_PAD_VALUE, 114)),
        pipeline=_choice(props, INPUT_PIPELINE, PIPELINES, "optic"),
        decode=_choice(props, INPUT_DECODE, DECODES, "exact"),
        resize_size=int(_float(props, INPUT_RESIZE_SIZE, 0)),
        interpolation=_choice(props, INPUT_INTERPOLATION, INTERPOLATIONS, "bilinear"),
        stride=int(_float(props, INPUT_STRIDE, 32)),
    )
    if not 0 <= spec.pad_value <= 255:
        raise MetadataError(f"metadata {INPUT_PAD_VALUE!r} must be 0 to 255")
    if any(s == 0 for s in spec.std):
        raise MetadataError(f"metadata {INPUT_STD!r} must not contain 0")
    if not 0 <= spec.resize_size <= 16384 or not 1 <= spec.stride <= 1024:
        raise MetadataError(f"metadata {INPUT_RESIZE_SIZE!r} must be 0 to 16384 and {INPUT_STRIDE!r} 1 to 1024")
    return spec


def _ultralytics_spec(props: Mapping[str, str], task: str | None) -> InputSpec:
    """Ultralytics' predictor: OpenCV decode; letterbox to ``imgsz`` (the minimal stride-multiple rectangle for
    a dynamic export); classification: shorter side to ``imgsz``, centre crop; RGB / 255."""
    imgsz = _literal(props, "imgsz")
    size = _size(list(imgsz) if isinstance(imgsz, list | tuple) else [imgsz, imgsz], "imgsz")
    stride = _literal(props, "stride") if "stride" in props else 32
    if not isinstance(stride, int) or not 1 <= stride <= 1024:
        raise MetadataError("metadata 'stride' must be an integer 1 to 1024")
    if task == "classification":
        resize = "center_crop" if size[0] == size[1] else "stretch"
    else:
        resize = "letterbox_auto" if _ultralytics_args(props).get("dynamic") else "letterbox"
    return InputSpec(size=size, resize=resize, pipeline="ultralytics", stride=stride)


def _ultralytics_args(props: Mapping[str, str]) -> dict:
    args = _literal(props, "args") if "args" in props else {}
    return args if isinstance(args, dict) else {}


def _ultralytics_end2end(props: Mapping[str, str]) -> bool:
    end2end = props.get("end2end", "False").strip() == "True"
    return end2end or bool(_ultralytics_args(props).get("nms"))


def _json(props: Mapping[str, str], key: str, kind: type) -> Any:
    try:
        value = json.loads(props[key])
    except json.JSONDecodeError as exc:
        raise MetadataError(f"metadata {key!r} is not valid JSON: {exc}") from exc
    if not isinstance(value, kind):
        raise MetadataError(f"metadata {key!r} must be a JSON {kind.__name__}")
    return value


def _literal(props: Mapping[str, str], key: str) -> object:
    try:
        return ast.literal_eval(props[key])
    except (ValueError, SyntaxError) as exc:
        raise MetadataError(f"metadata {key!r} is not a literal: {props[key]!r}") from exc


def _size(value: list, key: str) -> tuple[int, int]:
    if len(value) != 2 or not all(isinstance(v, int) and 0 < v <= 16384 for v in value):
        raise MetadataError(f"metadata {key!r} must be [height, width] with positive integers")
    return (value[0], value[1])


def _choice(props: Mapping[str, str], key: str, allowed: tuple[str, ...], default: str) -> str:
    value = props.get(key, default)
    if value not in allowed:
        raise MetadataError(f"metadata {key!r} is {value!r}; expected one of {', '.join(allowed)}")
    return value


def _float(props: Mapping[str, str], key: str, default: float) -> float:
    try:
        value = float(props.get(key, default))
    except ValueError as exc:
        raise MetadataError(f"metadata {key!r} must be a number") from exc
    if value != value:  # NaN
        raise MetadataError(f"metadata {key!r} must be a number")
    return value


def _triple(props: Mapping[str, str], key: str, default: tuple[float, float, float]) -> tuple[float, float, float]:
    if key not in props:
        return default
    value = _json(props, key, list)
    if len(value) != 3 or not all(isinstance(v, (int, float)) for v in value):
        raise MetadataError(f"metadata {key!r} must be a list of 3 numbers")
    return (float(value[0]), float(value[1]), float(value[2]))
