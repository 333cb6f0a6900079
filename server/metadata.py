"""The self-describing model contract: ONNX ``metadata_props`` keys and their meaning.

The export stage writes these keys; the server reads them to pick pre- and
post-processing. Models exported by Ultralytics carry their own keys
(``names``, ``imgsz``, ``task``); those are understood as a fallback so such a
file serves without a config.
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
OUTPUT_KIND = "optic.output.kind"
OUTPUT_LAYOUT = "optic.output.layout"
VOCAB = "optic.vocab"

# Model (directory) names: what the repository serves and the export stage may write.
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")

# The one task vocabulary: short names (Ultralytics' and ``optic infer``'s words) -> the long names
# written in ``optic.task``. Everywhere a task is named, either form is accepted.
TASK_NAMES = {"classify": "classification", "detect": "detection", "segment": "segmentation", "caption": "captioning"}
TASKS = tuple(TASK_NAMES.values())
_ULTRALYTICS_TASKS = {"classify": "classification", "detect": "detection", "segment": "segmentation"}


def task_long_name(name: str) -> str:
    """``detect`` or ``detection`` -> ``detection``; anything else is returned unchanged (for callers to refuse)."""
    return TASK_NAMES.get(name, name)


def task_short_name(name: str | None) -> str:
    """``detection`` or ``detect`` -> ``detect``."""
    for short, long in TASK_NAMES.items():
        if name in (short, long):
            return short
    return name or ""
RESIZE_MODES = ("stretch", "letterbox", "center_crop")
COLORS = ("RGB", "BGR")
OUTPUT_KINDS = ("logits", "probabilities")
OUTPUT_LAYOUTS = ("yolov5", "yolov8")


class MetadataError(ValueError):
    """A metadata value is missing or malformed; the message names the key."""


@dataclass(frozen=True)
class InputSpec:
    """How an image becomes the model's input tensor."""

    size: tuple[int, int]  # (height, width)
    color: str = "RGB"
    resize: str = "stretch"
    scale: float = 1.0 / 255.0
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    layout: str = "NCHW"
    pad_value: int = 114  # letterbox border grey level (Ultralytics' value)


@dataclass(frozen=True)
class ModelMeta:
    task: str | None = None
    labels: tuple[str, ...] = ()
    input: InputSpec | None = None
    output_kind: str = "logits"
    output_layout: str | None = None  # detection: "yolov5" [N, A, 5+C] or "yolov8" [N, 4+C, A]
    vocab: tuple[str, ...] = ()  # captioning: token strings by id
    extra: Mapping[str, str] = field(default_factory=dict)  # every other key, as written

    def to_props(self) -> dict[str, str]:
        """The ``metadata_props`` entries that describe this model."""
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
            if spec.pad_value != InputSpec.pad_value:  # the default stays implicit
                props[INPUT_PAD_VALUE] = str(spec.pad_value)
        props[OUTPUT_KIND] = self.output_kind
        if self.output_layout:
            props[OUTPUT_LAYOUT] = self.output_layout
        if self.vocab:
            props[VOCAB] = json.dumps(list(self.vocab))
        return props

    @classmethod
    def from_props(cls, props: Mapping[str, str]) -> ModelMeta:
        """Parse ours, falling back to Ultralytics' keys; raises :class:`MetadataError`."""
        task = task_long_name(props[TASK]) if TASK in props else _ULTRALYTICS_TASKS.get(props.get("task", ""))
        if task is not None and task not in TASKS:
            raise MetadataError(f"metadata {TASK!r} is {task!r}; expected one of {', '.join(TASKS)}")
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
        spec: InputSpec | None = None
        if INPUT_SIZE in props:
            spec = InputSpec(
                size=_size(_json(props, INPUT_SIZE, list), INPUT_SIZE),
                color=_choice(props, INPUT_COLOR, COLORS, "RGB"),
                resize=_choice(props, INPUT_RESIZE, RESIZE_MODES, "stretch"),
                scale=_float(props, INPUT_SCALE, 1.0 / 255.0),
                mean=_triple(props, INPUT_MEAN, (0.0, 0.0, 0.0)),
                std=_triple(props, INPUT_STD, (1.0, 1.0, 1.0)),
                layout=_choice(props, INPUT_LAYOUT, ("NCHW", "NHWC"), "NCHW"),
                pad_value=int(_float(props, INPUT_PAD_VALUE, 114)),
            )
            if not 0 <= spec.pad_value <= 255:
                raise MetadataError(f"metadata {INPUT_PAD_VALUE!r} must be 0 to 255")
            if any(s == 0 for s in spec.std):
                raise MetadataError(f"metadata {INPUT_STD!r} must not contain 0")
        elif "imgsz" in props:  # Ultralytics: letterboxed RGB scaled to [0, 1]
            imgsz = _literal(props, "imgsz")
            spec = InputSpec(
                size=_size(imgsz if isinstance(imgsz, list) else [imgsz, imgsz], "imgsz"), resize="letterbox"
            )
        output_kind = _choice(props, OUTPUT_KIND, OUTPUT_KINDS, "logits")
        layout = _choice(props, OUTPUT_LAYOUT, OUTPUT_LAYOUTS, "yolov8") if OUTPUT_LAYOUT in props else None
        if layout is None and task == "detection" and "imgsz" in props:
            layout = "yolov8"  # Ultralytics exports detection heads as [N, 4+C, A]
        vocab = _json(props, VOCAB, list) if VOCAB in props else []
        if not all(isinstance(x, str) for x in vocab):
            raise MetadataError(f"metadata {VOCAB!r} must be a list of strings")
        known = {
            TASK,
            LABELS,
            INPUT_SIZE,
            INPUT_COLOR,
            INPUT_RESIZE,
            INPUT_SCALE,
            INPUT_MEAN,
            INPUT_STD,
            INPUT_LAYOUT,
            INPUT_PAD_VALUE,
            OUTPUT_KIND,
            OUTPUT_LAYOUT,
            VOCAB,
        }
        extra = {k: v for k, v in props.items() if k not in known}
        return cls(task, tuple(labels), spec, output_kind, layout, tuple(vocab), extra)


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
        return float(props.get(key, default))
    except ValueError as exc:
        raise MetadataError(f"metadata {key!r} must be a number") from exc


def _triple(props: Mapping[str, str], key: str, default: tuple[float, float, float]) -> tuple[float, float, float]:
    if key not in props:
        return default
    value = _json(props, key, list)
    if len(value) != 3 or not all(isinstance(v, (int, float)) for v in value):
        raise MetadataError(f"metadata {key!r} must be a list of 3 numbers")
    return (float(value[0]), float(value[1]), float(value[2]))
