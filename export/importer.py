"""ONNX files from elsewhere (Ultralytics, torchvision exports, ...) become repository entries, without torch.

``import_onnx`` validates the file, describes it with the metadata it can
infer and writes it with a Triton ``config.pbtxt`` built from our
``ModelConfig`` message. Also the helpers every export path shares: the
one-line user error, name and label checks, input-spec overrides.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import onnx
from google.protobuf import text_format

from optic.export.onnx_io import session, set_metadata, write_atomically
from optic.proto.inference import model_config_pb2 as mc
from optic.server.config import CONFIG_FILE, PLATFORM, TYPE_OF
from optic.server.metadata import INPUT_STD, MODEL_NAME, InputSpec, MetadataError, ModelMeta, task_long_name
from optic.server.tensors import ORT_DATATYPES

IMAGENET = InputSpec(size=(224, 224), resize="center_crop", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


class ExportError(Exception):
    """A user-facing problem with their file or flags; the CLI prints it as one line."""


def override_spec(
    base: InputSpec,
    size: tuple[int, int] | None = None,
    resize: str | None = None,
    scale: float | None = None,
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
) -> InputSpec:
    """``base`` with whatever the user passed on the command line."""
    if size is not None and not all(0 < v <= 16384 for v in size):
        raise ExportError(f"input size {list(size)} must be two positive integers")
    if std is not None and any(v == 0 for v in std):
        raise ExportError(f"{INPUT_STD} {list(std)} must not contain 0")
    changes: dict[str, Any] = {"size": size, "resize": resize, "scale": scale, "mean": mean, "std": std}
    given: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in changes.items() if v is not None}
    return replace(base, **given)


def read_labels(path: Path) -> tuple[str, ...]:
    """A JSON list, or one label per line."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ExportError(f"cannot read labels file {path}: {exc.strerror}") from None
    stripped = text.strip()
    if stripped.startswith("["):
        try:
            labels = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise ExportError(f"labels file {path} is not a valid JSON list: {exc}") from None
    else:
        labels = [line.strip() for line in text.splitlines() if line.strip()]
    if not labels or not all(isinstance(x, str) for x in labels):
        raise ExportError(f"labels file {path} holds no labels (a JSON list of strings, or one per line)")
    return tuple(labels)


def check_name(name: str) -> str:
    """Repository entry names follow the server's rule; nothing else reaches a path."""
    if not MODEL_NAME.match(name):
        raise ExportError(f"model name {name!r} must be letters, digits, '_', '.' or '-' (at most 128), not a path")
    return name


def config_pbtxt(name: str, proto: onnx.ModelProto, max_batch_size: int) -> str:
    """A Triton model configuration for an imported model: our ``ModelConfig`` message in text format."""
    sess = session(proto)
    config = mc.ModelConfig(name=name, platform=PLATFORM, max_batch_size=max_batch_size)
    for tensors, args in ((config.input, sess.get_inputs()), (config.output, sess.get_outputs())):
        for arg in args:
            dims = [d if isinstance(d, int) else -1 for d in arg.shape]
            datatype = TYPE_OF[ORT_DATATYPES[arg.type]]
            tensors.add(name=arg.name, data_type=datatype, dims=dims[1:] if max_batch_size else dims)
    if max_batch_size > 0:
        config.dynamic_batching.SetInParent()
    return text_format.MessageToString(config)


def import_onnx(
    source: Path,
    task: str,
    out: Path,
    name: str | None = None,
    labels: tuple[str, ...] = (),
    input_size: tuple[int, int] | None = None,
    max_batch_size: int = 32,
    **spec_overrides: object,
) -> Path:
    """Validate a foreign ONNX model, describe it with metadata, write it and its ``config.pbtxt``.

    Pre-processing defaults by task: torchvision's (ImageNet mean/std; centre
    crop for classification, stretch for segmentation), Ultralytics' for
    detection (letterbox, [0, 1]); the model's own ``optic.input.*`` metadata
    wins over those, and ``spec_overrides`` (resize, scale, mean, std) win over all.
    """
    task = task_long_name(task)
    if task not in ("classification", "detection", "segmentation"):
        raise ExportError(f"unknown task {task!r}; expected classify, detect or segment (or their long names)")
    target = check_name(name or source.stem)
    if max_batch_size < 0:
        raise ExportError(f"--max-batch-size must be 0 (no batching) or more, not {max_batch_size}")
    if not source.is_file():
        raise ExportError(f"ONNX file {source} does not exist")
    try:
        proto = onnx.load(str(source))
        onnx.checker.check_model(proto)
        sess = session(proto)
    except Exception as exc:  # onnx/onnxruntime raise many types for a bad file
        raise ExportError(f"{source} is not a valid ONNX model ({type(exc).__name__}: {str(exc)[:200]})") from None
    props = {p.key: p.value for p in proto.metadata_props}
    try:
        existing = ModelMeta.from_props(props)
    except MetadataError as exc:
        raise ExportError(f"{source}: {exc}") from None
    images = [i for i in sess.get_inputs() if len(i.shape) == 4]
    if len(sess.get_inputs()) != 1 or not images:
        raise ExportError(
            f"{source}: expected one image input of rank 4, found {[(i.name, i.shape) for i in sess.get_inputs()]}"
        )
    inp = images[0]
    nhwc = inp.shape[3] == 3 and inp.shape[1] != 3
    static = [d for d in (inp.shape[1:3] if nhwc else inp.shape[2:4]) if isinstance(d, int)]
    size: tuple[int, int] | None = input_size or (
        (static[0], static[1]) if len(static) == 2 else existing.input.size if existing.input else None
    )
    if size is None:
        raise ExportError(f"{source}: the input size is dynamic and not in the metadata; pass --input-size H W")
    labels = labels or existing.labels
    if not labels:
        raise ExportError(f"{source}: no labels in the model's metadata; pass --labels FILE")
    out_shape = sess.get_outputs()[0].shape
    layout = None
    if task == "classification":
        classes = out_shape[-1]
        spec = InputSpec(size=size, resize="center_crop", mean=IMAGENET.mean, std=IMAGENET.std)
    elif task == "segmentation":
        classes = out_shape[1] if len(out_shape) == 4 else None
        spec = InputSpec(size=size, resize="stretch", mean=IMAGENET.mean, std=IMAGENET.std)
    else:
        spec = InputSpec(size=size, resize="letterbox")
        if len(out_shape) != 3:
            raise ExportError(f"{source}: a detector's first output must be rank 3, got {out_shape}")
        if existing.output_layout == "yolov8" or out_shape[1] == 4 + len(labels):
            layout, classes = "yolov8", out_shape[1] - 4 if isinstance(out_shape[1], int) else None
        else:
            layout, classes = "yolov5", out_shape[2] - 5 if isinstance(out_shape[2], int) else None
    if isinstance(classes, int) and classes != len(labels):
        raise ExportError(f"{len(labels)} labels given, but the model's output has {classes} classes")
    if existing.input is not None and existing.input.size == spec.size:
        spec = existing.input
    spec = override_spec(replace(spec, layout="NHWC" if nhwc else "NCHW"), **spec_overrides)  # type: ignore[arg-type]
    meta = ModelMeta(
        task=task,
        labels=labels,
        input=spec,
        output_kind=existing.output_kind,
        output_layout=layout,
        extra={**existing.extra, "optic.export.source": source.name},
    )
    set_metadata(proto, meta.to_props(), doc=proto.doc_string)
    batchable = all(not isinstance(a.shape[0], int) for a in (*sess.get_inputs(), *sess.get_outputs()))
    path = out / target / "1" / "model.onnx"
    write_atomically(proto, path)
    (out / target / CONFIG_FILE).write_text(config_pbtxt(target, proto, max_batch_size if batchable else 0))
    return path
