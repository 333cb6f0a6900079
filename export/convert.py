"""Checkpoints users bring: a ``state_dict`` of one of our architectures becomes a repository entry.

Architecture hyper-parameters are read back from tensor shapes, and the
entry is written after the same parity check as a trained model. ONNX files
from elsewhere go through :mod:`optic.export.importer`, which needs no torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from optic.export import captioner, classifier, detector, segmenter, torchvision_models
from optic.export.data import SHAPES
from optic.export.importer import ExportError, check_name, override_spec
from optic.export.models import (
    CaptionDecoderStep,
    CaptionEncoder,
    DecodedDetector,
    ShapeClassifier,
    ShapeDetector,
    ShapeSegmenter,
)
from optic.export.onnx_export import parity, to_onnx
from optic.export.onnx_io import session, set_metadata, write_atomically
from optic.server.metadata import InputSpec, MetadataError, ModelMeta

ARCHS = ("classifier", "detector", "segmenter", "captioner")


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
    torchvision_weights: str | None = None,
    **spec_overrides: object,
) -> list[Path]:
    """Checkpoint -> repository entry (two for the captioner); returns the written paths.

    ``spec_overrides`` (size, resize, scale, mean, std) win over the
    checkpoint's input spec, which wins over the recipe's default. A
    torchvision architecture takes its input spec and categories from
    ``torchvision_weights`` (a name of its weights enum; default: DEFAULT).
    """
    if arch not in ARCHS + torchvision_models.ARCHS:
        known = ", ".join(ARCHS + torchvision_models.ARCHS)
        raise ExportError(f"unknown architecture {arch!r}; expected one of {known}")
    if name is not None:
        check_name(name)
    state, saved_labels, saved_spec = _load_checkpoint(checkpoint)
    if arch in torchvision_models.ARCHS:
        path = torchvision_models.convert(
            state, arch, out, name, labels or saved_labels, checkpoint.name, torchvision_weights, **spec_overrides
        )
        return [path]
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
    diff = captioner.pair_parity(encoder, decoder, session(enc_proto), session(dec_proto), sample.numpy(), 0)
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
