"""torchvision checkpoints become repository entries that see the pixels their weights were trained on.

``optic export convert WEIGHTS.pth --arch resnet50`` builds the torchvision
architecture, loads the user's ``state_dict`` (what sits in their torch cache;
nothing is downloaded), exports it to ONNX and writes the weights' own
``transforms()`` — resize size, crop, interpolation, mean and std, read from
torchvision, not guessed — and category names into its metadata, so the
server reproduces ``weights.transforms()(pil_image)`` exactly.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from optic.export.importer import ExportError, check_name, override_spec
from optic.export.onnx_export import OPSET, parity
from optic.export.onnx_io import session, set_metadata, write_atomically
from optic.server.metadata import InputSpec, ModelMeta

CLASSIFICATION = ("resnet18", "resnet50", "mobilenet_v3_large", "efficientnet_b0", "vit_b_16", "convnext_tiny")
SEGMENTATION = ("fcn_resnet50", "deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large")
ARCHS = CLASSIFICATION + SEGMENTATION


def torchvision() -> types.ModuleType:
    """torchvision, importable beside a CPU-only torch.

    The torchvision wheel that pairs with our torch pin is linked against
    CUDA; beside the CPU torch its compiled operators (nms, roi_align, ...)
    cannot load, and ``import torchvision`` fails while registering their
    meta kernels. We need only its models and transforms, which are pure
    Python, so that one registration module is stood in for; no torchvision
    operator is ever called here.
    """
    try:
        import torchvision as tv
    except RuntimeError as exc:
        if "torchvision::" not in str(exc):
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
        import torchvision as tv
    return tv


def weights_of(arch: str, name: str | None = None) -> Any:
    """The weights enum entry whose transforms and categories describe the checkpoint (default: DEFAULT)."""
    enum = torchvision().models.get_model_weights(arch)
    if name is None:
        return enum.DEFAULT
    try:
        return enum[name]
    except KeyError:
        raise ExportError(f"{arch} has no weights {name!r}; it has {', '.join(w.name for w in enum)}") from None


def input_spec(weights: Any) -> InputSpec:
    """The weights' ``transforms()`` as our input spec (the ``torchvision`` pipeline)."""
    t = weights.transforms()
    interpolation = t.interpolation.value  # "bilinear", "bicubic", "nearest"
    if interpolation not in ("bilinear", "bicubic", "nearest"):
        raise ExportError(f"{weights} uses {interpolation} interpolation, which Optic does not reproduce")
    resize = int(t.resize_size[0])
    if hasattr(t, "crop_size"):  # ImageClassification: shorter side, then a centre crop
        crop = int(t.crop_size[0])
        return InputSpec(
            size=(crop, crop), resize="center_crop", pipeline="torchvision", resize_size=resize,
            interpolation=interpolation, mean=tuple(t.mean), std=tuple(t.std),
        )  # fmt: skip
    # SemanticSegmentation: the shorter side only; the graph takes any height and width.
    return InputSpec(
        size=(resize, resize), resize="shorter_side", pipeline="torchvision", resize_size=resize,
        interpolation=interpolation, mean=tuple(t.mean), std=tuple(t.std),
    )  # fmt: skip


class _Logits(nn.Module):
    """Segmentation models answer a dict; the served graph answers its ``out`` logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)["out"]


def _classes(state: dict[str, torch.Tensor], arch: str) -> int:
    """The class count the checkpoint's last layer was trained for (fine-tuned heads included)."""
    last = [k for k in state if k.endswith(".weight") and not k.startswith("aux_classifier")][-1]
    return int(state[last].shape[0])


def build(arch: str, state: dict[str, torch.Tensor]) -> nn.Module:
    tv = torchvision()
    kwargs: dict[str, Any] = {"weights": None, "num_classes": _classes(state, arch)}
    if arch in SEGMENTATION:
        kwargs["weights_backbone"] = None
        if any(k.startswith("aux_classifier") for k in state):
            kwargs["aux_loss"] = True
    model = tv.models.get_model(arch, **kwargs)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if "\n" in str(exc) else str(exc)
        raise ExportError(f"checkpoint does not fit torchvision's {arch}: {first[:300]}") from None
    return model.eval()


def convert(
    state: dict[str, torch.Tensor],
    arch: str,
    out: Path,
    name: str | None,
    labels: tuple[str, ...],
    source: str,
    weights_name: str | None = None,
    **spec_overrides: Any,
) -> Path:
    """A torchvision ``state_dict`` -> ``out/<name>/1/model.onnx`` with the weights' transforms and categories."""
    target = check_name(name or arch)
    weights = weights_of(arch, weights_name)
    model = build(arch, state)
    classes = _classes(state, arch)
    categories = tuple(weights.meta.get("categories") or ())
    labels = labels or (categories if len(categories) == classes else ())
    if len(labels) != classes:
        raise ExportError(f"{len(labels)} labels for a checkpoint with {classes} classes; pass --labels FILE")
    spec = override_spec(input_spec(weights), **spec_overrides)
    segmentation = arch in SEGMENTATION
    module: nn.Module = _Logits(model) if segmentation else model
    h, w = spec.size
    rng = np.random.default_rng(0)
    sample = torch.from_numpy(rng.normal(0, 1, (1, 3, h, w)).astype(np.float32))
    proto = _export(module, sample, segmentation)
    probes = [rng.normal(0, 1, (1, 3, h, w)).astype(np.float32), rng.normal(0, 1, (2, 3, h, w)).astype(np.float32)]
    if segmentation:
        probes.append(rng.normal(0, 1, (1, 3, h - 40, w + 24)).astype(np.float32))
    check = parity(module, session(proto), probes, 1e-3)
    if not check.ok:
        raise ExportError(f"onnxruntime differs from torch by {check.max_abs_diff:.2e} (tolerance 1e-3)")
    meta = ModelMeta(
        task="segmentation" if segmentation else "classification",
        labels=labels,
        input=spec,
        output_kind="logits",
        extra={
            "optic.export.parity_max_abs_diff": f"{check.max_abs_diff:.3e}",
            "optic.export.source": source,
            "optic.export.opset": str(OPSET),
            "optic.torchvision.arch": arch,
            "optic.torchvision.weights": str(weights),
        },
    )
    set_metadata(proto, meta.to_props(), doc=f"torchvision {arch} ({weights}) converted from {source}")
    path = out / target / "1" / "model.onnx"
    write_atomically(proto, path)
    return path


def _export(module: nn.Module, sample: torch.Tensor, dynamic_size: bool) -> Any:
    import tempfile
    import warnings

    import onnx

    axes = {0: "batch", 2: "height", 3: "width"} if dynamic_size else {0: "batch"}
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = Path(tmp) / "model.onnx"
        torch.onnx.export(
            module, (sample,), str(path), dynamo=False, input_names=["images"], output_names=["logits"],
            dynamic_axes={"images": axes, "logits": axes}, opset_version=OPSET, do_constant_folding=True,
        )  # fmt: skip
        proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    return proto
