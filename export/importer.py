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

import numpy as np
import onnx
import onnxruntime as ort
from google.protobuf import text_format

from optic.export.onnx_io import session, set_metadata, write_atomically
from optic.proto.inference import model_config_pb2 as mc
from optic.server.config import CONFIG_FILE, PLATFORM, TYPE_OF
from optic.server.metadata import INPUT_STD, MODEL_NAME, InputSpec, MetadataError, ModelMeta, task_long_name
from optic.server.outputs import OutputMismatch, check_outputs
from optic.server.tensors import DATATYPES, ORT_DATATYPES

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
    pipeline: str | None = None,
    resize_size: int | None = None,
    interpolation: str | None = None,
    decode: str | None = None,
) -> InputSpec:
    """``base`` with whatever the user passed on the command line."""
    if size is not None and not all(0 < v <= 16384 for v in size):
        raise ExportError(f"input size {list(size)} must be two positive integers")
    if std is not None and any(v == 0 for v in std):
        raise ExportError(f"{INPUT_STD} {list(std)} must not contain 0")
    if resize_size is not None and not 0 < resize_size <= 16384:
        raise ExportError(f"--resize-size {resize_size} must be 1 to 16384")
    changes: dict[str, Any] = {"size": size, "resize": resize, "scale": scale, "mean": mean, "std": std}
    changes |= {"pipeline": pipeline, "resize_size": resize_size, "interpolation": interpolation, "decode": decode}
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


def _task(asked: str | None, existing: ModelMeta, outputs: list, source: Path) -> str:
    """The task: the model's own metadata, or the one asked for (short or long name); they must agree."""
    has_protos = len(outputs) > 1 and len(outputs[1].shape) == 4
    task = task_long_name(asked) if asked else existing.task
    if task is None:
        raise ExportError(f"{source}: the model does not say its task; pass --task classify, detect or segment")
    if task == "segmentation" and (has_protos or existing.task == "instance_segmentation"):
        task = "instance_segmentation"  # a YOLO-seg model: boxes plus per-object masks
    if task not in ("classification", "detection", "segmentation", "instance_segmentation"):
        raise ExportError(f"unknown task {asked!r}; expected classify, detect or segment (or their long names)")
    if existing.task and existing.task != task:
        raise ExportError(f"{source}: --task {asked} disagrees with the model's own metadata ({existing.task})")
    return task


def _default_spec(task: str, size: tuple[int, int]) -> InputSpec:
    """Pre-processing for a model that does not describe its own: torchvision's ImageNet convention for
    classification (shorter side to 256/224 of the crop, centre crop, bilinear), Ultralytics' letterbox for
    detection, a stretch with ImageNet statistics for segmentation."""
    if task == "classification":
        return replace(IMAGENET, size=size, pipeline="torchvision", resize_size=round(min(size) * 256 / 224))
    if task == "segmentation":
        return InputSpec(size=size, resize="stretch", mean=IMAGENET.mean, std=IMAGENET.std)
    return InputSpec(size=size, resize="letterbox", pipeline="ultralytics")


def _probe(sess: ort.InferenceSession, spec: InputSpec) -> list[tuple[int, ...]]:
    """Output shapes of one run at batch 1 and the model's real input size."""
    feeds = {}
    for arg in sess.get_inputs():
        dims = [d if isinstance(d, int) and d > 0 else 1 for d in arg.shape]
        if len(dims) == 4:
            h_axis, w_axis = (1, 2) if spec.layout == "NHWC" else (2, 3)
            dims[h_axis], dims[w_axis] = spec.size
        feeds[arg.name] = np.zeros(dims, DATATYPES[ORT_DATATYPES[arg.type]])
    return [tuple(o.shape) for o in sess.run(None, feeds)]


def import_onnx(
    source: Path,
    task: str | None,
    out: Path,
    name: str | None = None,
    labels: tuple[str, ...] = (),
    input_size: tuple[int, int] | None = None,
    max_batch_size: int = 32,
    **spec_overrides: object,
) -> Path:
    """Validate a foreign ONNX model, describe it with metadata, write it and its ``config.pbtxt``.

    The model's own metadata (ours, or Ultralytics': names, imgsz, task,
    end2end) wins over the task's defaults, and ``spec_overrides`` win over
    all. The model is then run once at its real input size, and its outputs
    must fit the task, the labels and one layout: nothing is guessed.
    """
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
    task = _task(task, existing, sess.get_outputs(), source)
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
    spec = existing.input if existing.input is not None and existing.input.size == size else _default_spec(task, size)
    spec = override_spec(replace(spec, layout="NHWC" if nhwc else "NCHW"), **spec_overrides)  # type: ignore[arg-type]
    meta = ModelMeta(
        task=task,
        labels=labels,
        input=spec,
        output_kind=existing.output_kind,
        output_layout=existing.output_layout,
        detect=existing.detect,
        extra={**existing.extra, "optic.export.source": source.name},
    )
    try:
        shapes = _probe(sess, spec)
        layout = check_outputs(meta, shapes, str(source))
    except OutputMismatch as exc:
        raise ExportError(str(exc)) from None
    except Exception as exc:  # onnxruntime refused the input: the size is not one the model takes
        raise ExportError(f"{source}: the model does not run at {size[0]}x{size[1]}: {str(exc)[:200]}") from None
    meta = replace(meta, output_layout=layout)
    set_metadata(proto, meta.to_props(), doc=proto.doc_string)
    batchable = all(not isinstance(a.shape[0], int) for a in (*sess.get_inputs(), *sess.get_outputs()))
    path = out / target / "1" / "model.onnx"
    write_atomically(proto, path)
    (out / target / CONFIG_FILE).write_text(config_pbtxt(target, proto, max_batch_size if batchable else 0))
    return path
