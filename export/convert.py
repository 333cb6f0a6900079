"""Users bring their own: checkpoints of our architectures, and ONNX files from elsewhere.

``convert``: a ``state_dict`` of one of our architectures (architecture
hyper-parameters are read back from tensor shapes) becomes a repository entry
after the same parity check as a trained model. ``import_onnx``: an existing
ONNX file (Ultralytics, torchvision exports, ...) is validated, described with
the metadata we can infer, and written with a Triton ``config.pbtxt``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from export import captioner, classifier, detector, segmenter
from export.data import SHAPES
from export.models import (
    CaptionDecoderStep,
    CaptionEncoder,
    DecodedDetector,
    ShapeClassifier,
    ShapeDetector,
    ShapeSegmenter,
)
from export.onnx_export import parity, session, set_metadata, to_onnx, write_atomically
from server.metadata import INPUT_STD, MODEL_NAME, InputSpec, MetadataError, ModelMeta
from server.tensors import ORT_DATATYPES, TRITON_TYPES

ARCHS = ("classifier", "detector", "segmenter", "captioner")
IMAGENET = InputSpec(size=(224, 224), resize="center_crop", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


class ExportError(Exception):
    """A user-facing problem with their file or flags; the CLI prints it as one line."""


def save_checkpoint(
    path: Path,
    arch: str,
    modules: Mapping[str, nn.Module],
    labels: tuple[str, ...],
    input_spec: InputSpec | None = None,
) -> None:
    """The checkpoint format ``convert`` reads: state dict, labels (the captioner's: its vocabulary), input spec.

    The input spec is stored as our ``optic.input.*`` metadata strings, so the
    file stays loadable with ``torch.load(weights_only=True)``.
    """
    state = {f"{k}.{n}": t for k, m in modules.items() for n, t in m.state_dict().items()}
    ckpt: dict[str, object] = {"arch": arch, "state_dict": state, "labels": list(labels)}
    if input_spec is not None:
        ckpt["input"] = ModelMeta(input=input_spec).to_props()
    torch.save(ckpt, path)


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
    changes = {"size": size, "resize": resize, "scale": scale, "mean": mean, "std": std}
    return replace(base, **{k: tuple(v) if isinstance(v, list) else v for k, v in changes.items() if v is not None})


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


def _load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], tuple[str, ...], InputSpec | None]:
    if not path.is_file():
        raise ExportError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt file
        raise ExportError(f"checkpoint {path} cannot be read ({type(exc).__name__}: {str(exc)[:200]})") from None
    if isinstance(obj, dict) and "state_dict" in obj:
        spec = None
        if obj.get("input"):
            try:
                spec = ModelMeta.from_props(obj["input"]).input
            except (MetadataError, TypeError, AttributeError) as exc:
                raise ExportError(f"checkpoint {path} has a bad input spec: {exc}") from None
        return dict(obj["state_dict"]), tuple(obj.get("labels") or ()), spec
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj), (), None
    raise ExportError(f"checkpoint {path} is neither a state_dict nor a dict with a 'state_dict' entry")


def _strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Accept both bare keys and keys saved under ``prefix.`` (as :func:`save_checkpoint` writes)."""
    if any(k.startswith(prefix + ".") for k in state):
        return {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")}
    return state


def _shape(state: Mapping[str, torch.Tensor], key: str, arch: str) -> torch.Size:
    if key not in state:
        raise ExportError(f"checkpoint is not a {arch}: it has no tensor {key!r}")
    return state[key].shape


def _load_into(module: nn.Module, state: Mapping[str, torch.Tensor], arch: str) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if "\n" in str(exc) else str(exc)
        raise ExportError(f"checkpoint does not fit the {arch} architecture: {first[:300]}") from None


def _check_labels(labels: tuple[str, ...], count: int, what: str) -> None:
    if len(labels) != count:
        raise ExportError(f"{len(labels)} labels given, but the checkpoint's {what} has {count} classes")


def check_name(name: str) -> str:
    """Repository entry names follow the server's rule; nothing else reaches a path."""
    if not MODEL_NAME.match(name):
        raise ExportError(f"model name {name!r} must be letters, digits, '_', '.' or '-' (at most 128), not a path")
    return name


def _fit(spec: InputSpec, arch: str) -> InputSpec:
    """Input sizes each architecture can take: the captioner's dense layer fixes 64x64; the others downsample 8x."""
    h, w = spec.size
    if arch == "captioner" and (h, w) != (64, 64):
        raise ExportError(f"the captioner takes 64x64 inputs only, not {h}x{w}")
    if arch != "captioner" and (h % 8 or w % 8 or min(h, w) < 16):
        raise ExportError(f"the {arch} needs an input size that is a multiple of 8 and at least 16, not {h}x{w}")
    return spec


def convert(
    checkpoint: Path,
    arch: str,
    out: Path,
    name: str | None = None,
    labels: tuple[str, ...] = (),
    **spec_overrides: object,
) -> list[Path]:
    """Checkpoint -> repository entry (two for the captioner); returns the written paths.

    ``spec_overrides`` (size, resize, scale, mean, std) win over the
    checkpoint's input spec, which wins over the recipe's default.
    """
    if arch not in ARCHS:
        raise ExportError(f"unknown architecture {arch!r}; expected one of {', '.join(ARCHS)}")
    if name is not None:
        check_name(name)
    state, saved_labels, saved_spec = _load_checkpoint(checkpoint)
    labels = labels or saved_labels
    defaults = {
        "classifier": classifier.INPUT_SPEC,
        "detector": detector.INPUT_SPEC,
        "segmenter": segmenter.INPUT_SPEC,
        "captioner": captioner.INPUT_SPEC,
    }
    spec = _fit(override_spec(saved_spec or defaults[arch], **spec_overrides), arch)  # type: ignore[arg-type]
    rng = np.random.default_rng(0)

    def probe(*shape: int) -> np.ndarray:
        return rng.normal(0, 1, shape).astype(np.float32)

    if arch == "captioner":
        return _convert_captioner(state, out, labels, spec)
    if arch == "classifier":
        state = _strip(state, "model")
        width = _shape(state, "features.0.0.weight", arch)[0]
        classes = _shape(state, "head.5.weight", arch)[0]
        module: nn.Module = ShapeClassifier(classes, width=width)
        labels = labels or SHAPES
        _check_labels(labels, classes, arch)
        task, kind, layout, tol = "classification", "logits", None, 1e-4
        inputs, output = ["images"], "logits"
    elif arch == "segmenter":
        state = _strip(state, "model")
        width = _shape(state, "enc1.0.weight", arch)[0]
        classes = _shape(state, "classifier.weight", arch)[0]
        module = ShapeSegmenter(classes, width=width)
        labels = labels or segmenter.LABELS
        _check_labels(labels, classes, arch)
        task, kind, layout, tol = "segmentation", "logits", None, 1e-3
        inputs, output = ["images"], "logits"
    else:
        state = _strip(state, "model")
        anchors = state.get("anchors")
        if anchors is None:
            raise ExportError("checkpoint is not a detector: it has no 'anchors' buffer")
        width = _shape(state, "backbone.0.0.weight", arch)[0]
        per_anchor = _shape(state, "head.weight", arch)[0] // len(anchors)
        det = ShapeDetector(per_anchor - 5, anchors, width=width, stride=detector.STRIDE)
        _load_into(det, state, arch)
        module = DecodedDetector(det)
        labels = labels or SHAPES
        _check_labels(labels, per_anchor - 5, arch)
        task, kind, layout, tol = "detection", "probabilities", "yolov5", 1e-3
        inputs, output = ["images"], "detections"
    if arch != "detector":
        _load_into(module, state, arch)
    module.eval()
    h, w = spec.size
    proto = to_onnx(module, torch.from_numpy(probe(2, 3, h, w)), inputs[0], output)
    check = parity(module, session(proto), [probe(1, 3, h, w), probe(4, 3, h, w)], tol)
    if not check.ok:
        raise ExportError(f"onnxruntime differs from torch by {check.max_abs_diff:.2e} (tolerance {tol:.0e})")
    meta = ModelMeta(
        task=task,
        labels=labels,
        input=spec,
        output_kind=kind,
        output_layout=layout,
        extra={"optic.export.parity_max_abs_diff": f"{check.max_abs_diff:.3e}", "optic.export.source": checkpoint.name},
    )
    set_metadata(proto, meta.to_props(), doc=f"converted from {checkpoint.name}")
    path = out / (name or arch) / "1" / "model.onnx"
    write_atomically(proto, path)
    return [path]


def _convert_captioner(
    state: dict[str, torch.Tensor], out: Path, vocab: tuple[str, ...], spec: InputSpec
) -> list[Path]:
    arch = "captioner"
    enc_state, dec_state = _strip(state, "encoder"), _strip(state, "decoder")
    feature_dim, flat = _shape(enc_state, "features.10.weight", arch)
    hidden = _shape(enc_state, "init_h.weight", arch)[0]
    width = _shape(enc_state, "features.0.0.weight", arch)[0]
    vocab_size, embed = _shape(dec_state, "embed.weight", arch)
    vocab = vocab or captioner.VOCAB
    if len(vocab) != vocab_size:
        raise ExportError(f"{len(vocab)} vocabulary entries given, but the checkpoint's decoder has {vocab_size}")
    if flat != 8 * width * 16:
        raise ExportError("checkpoint is not a captioner encoder for 64x64 inputs")
    encoder = CaptionEncoder(feature_dim, hidden, width)
    decoder = CaptionDecoderStep(vocab_size, feature_dim, hidden, embed)
    _load_into(encoder, enc_state, arch)
    _load_into(decoder, dec_state, arch)
    encoder.eval()
    decoder.eval()
    sample = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    enc_proto, dec_proto = captioner.export_pair(encoder, decoder, sample)
    diff = captioner._parity(encoder, decoder, session(enc_proto), session(dec_proto), sample.numpy(), 0)
    if diff > 1e-4:
        raise ExportError(f"onnxruntime differs from torch by {diff:.2e} (tolerance 1e-4)")
    extra = {"optic.export.parity_max_abs_diff": f"{diff:.3e}"}
    captioner.describe_pair((enc_proto, dec_proto), spec, vocab, extra, "captioner {role}, converted")
    paths = []
    for proto, model_name in ((enc_proto, captioner.ENCODER), (dec_proto, captioner.DECODER)):
        path = out / model_name / "1" / "model.onnx"
        write_atomically(proto, path)
        paths.append(path)
    return paths


# ---------------------------------------------------------------- import


def config_pbtxt(name: str, proto: onnx.ModelProto, max_batch_size: int) -> str:
    """A Triton-style model configuration for an imported model (field names as Triton's)."""
    sess = session(proto)
    lines = [f'name: "{name}"', 'platform: "onnxruntime_onnx"', f"max_batch_size: {max_batch_size}"]
    for kind, args in (("input", sess.get_inputs()), ("output", sess.get_outputs())):
        for arg in args:
            dims = [d if isinstance(d, int) else -1 for d in arg.shape]
            if max_batch_size > 0:
                dims = dims[1:]
            lines.append(
                f'{kind} [\n  {{\n    name: "{arg.name}"\n    data_type: {TRITON_TYPES[ORT_DATATYPES[arg.type]]}'
                f"\n    dims: [ {', '.join(map(str, dims))} ]\n  }}\n]"
            )
    if max_batch_size > 0:
        lines.append("dynamic_batching { }")
    return "\n".join(lines) + "\n"


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
    if task not in ("classification", "detection", "segmentation"):
        raise ExportError(f"unknown task {task!r}; expected classification, detection or segmentation")
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
    size = input_size or (tuple(static) if len(static) == 2 else existing.input.size if existing.input else None)
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
    (out / target / "config.pbtxt").write_text(config_pbtxt(target, proto, max_batch_size if batchable else 0))
    return path
