"""INT8 models: onnxruntime static quantisation (QDQ), calibrated on images through the model's own pre-processing.

Static QDQ (quantise/dequantise pairs around every convolution and matmul,
weights per channel, activations per tensor) is the form onnxruntime's CPU
kernels run as true int8 and TensorRT reads as well. Calibration feeds images
that the model's own pre-processing (the server's, read from its metadata)
turned into tensors, so the activation ranges are the ones served. No torch:
this works on any model in a repository, ours or imported.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from optic.server.metadata import ModelMeta
from optic.server.tasks.image import preprocess


@dataclass(frozen=True)
class Quantized:
    path: Path
    fp32_bytes: int
    int8_bytes: int
    calibration_images: int


class _Reader:
    """onnxruntime's CalibrationDataReader protocol: one feed dict per call, None when done."""

    def __init__(self, name: str, tensors: Iterator[np.ndarray]) -> None:
        self.name, self.tensors = name, tensors

    def get_next(self) -> dict[str, np.ndarray] | None:
        tensor = next(self.tensors, None)
        return None if tensor is None else {self.name: tensor[None]}


def quantize_model(source: Path, target: Path, images: Iterable[np.ndarray], *, method: str = "minmax") -> Quantized:
    """Write an int8 QDQ copy of ``source`` (an image model with ``optic.input.*`` metadata) to ``target``.

    ``images``: decoded (H, W, 3) uint8 RGB pictures of the kind the model serves; ``method``: ``minmax`` or
    ``percentile`` (99.999th: robust to a few extreme activations) calibration.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    model = onnx.load(str(source))
    meta = ModelMeta.from_props({p.key: p.value for p in model.metadata_props})
    if meta.input is None:
        raise ValueError(f"{source}: no optic.input.* metadata; cannot make calibration tensors for it")
    spec = meta.input
    input_name = model.graph.input[0].name
    count = 0

    def tensors() -> Iterator[np.ndarray]:
        nonlocal count
        for pixels in images:
            count += 1
            yield preprocess(pixels, spec)[0].astype(np.float32)

    calibration = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile}[method]
    with tempfile.TemporaryDirectory(prefix="optic-quantize-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)  # fold and infer shapes first
        quantized = Path(tmp) / "int8.onnx"
        quantize_static(
            str(prepared),
            str(quantized),
            _Reader(input_name, tensors()),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=calibration,
            # Only the heavy ops' inputs and weights: a detector's last Concat joins pixel coordinates (0..640)
            # and probabilities (0..1), and one uint8 scale over both rounds every probability to 0 or 1.5.
            op_types_to_quantize=["Conv", "MatMul", "Gemm"],
            extra_options={"CalibTensorRangeSymmetric": False},
        )
        out = onnx.load(str(quantized))
        del out.metadata_props[:]
        for p in model.metadata_props:  # the same self-description, plus what was done to it
            out.metadata_props.add(key=p.key, value=p.value)
        out.metadata_props.add(key="optic.export.quantization", value=f"int8 static QDQ, {method}, {count} images")
        target.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(out, str(quantized))
        shutil.move(str(quantized), target)
    return Quantized(target, source.stat().st_size, target.stat().st_size, count)


# ---------------------------------------------------------------- a repository entry, gated


@dataclass(frozen=True)
class QuantizeReport:
    name: str
    target: str
    metric: str  # what was compared: the stress-set metric for our models, agreement with fp32 for others
    fp32: float
    int8: float
    max_drop: float
    fp32_bytes: int
    int8_bytes: int
    fp32_ms: float  # per image, batch 1, this process's onnxruntime
    int8_ms: float
    calibration_images: int
    written: bool
    reason: str = ""

    def summary(self) -> str:
        verdict = f"written to {self.target}" if self.written else f"NOT written: {self.reason}"
        return (
            f"{self.name} -> {self.target}: {self.metric} fp32 {self.fp32:.4f}, int8 {self.int8:.4f} "
            f"(allowed drop {self.max_drop:.3f}); {self.fp32_bytes / 1e6:.2f} -> {self.int8_bytes / 1e6:.2f} MB; "
            f"{self.fp32_ms:.2f} -> {self.int8_ms:.2f} ms/image; {self.calibration_images} calibration images; "
            f"{verdict}"
        )


_TASKS = ("classification", "detection", "segmentation")


def _latest_version(entry: Path) -> Path:
    versions = sorted((int(p.name), p) for p in entry.iterdir() if p.is_dir() and p.name.isascii() and p.name.isdigit())
    if not versions or not (versions[-1][1] / "model.onnx").is_file():
        raise ValueError(f"{entry}: no numbered version directory with a model.onnx")
    return versions[-1][1] / "model.onnx"


def _folder_images(folder: Path) -> list[bytes]:
    from optic.export.datasets import IMAGE_SUFFIXES

    servable = IMAGE_SUFFIXES - {".tif", ".tiff"}  # TIFF is not a served format (docs/operations.md)
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in servable and p.is_file())
    if len(files) < 4:
        raise ValueError(f"{folder}: found {len(files)} images (.jpg/.png/.bmp/.webp); calibration needs at least 4")
    return [p.read_bytes() for p in files]


def _decode_all(encoded: Iterable[bytes], meta: ModelMeta) -> Iterator[np.ndarray]:
    from optic.server.tasks.image import ImageLimits, decode_image

    limits = ImageLimits()
    for data in encoded:
        yield decode_image(data, limits, meta.input).pixels


def _agreement(task: str, ref: Any, new: Any, samples: list[Any]) -> float:
    """How often the int8 model answers what the fp32 one answers, on images neither was calibrated on."""
    from optic.export import evaluate

    if task == "detection":
        return evaluate.agreement_boxes(ref, new, samples)
    return evaluate.agreement_argmax(ref, new, samples)  # classification and segmentation


def quantize_entry(
    repo: Path,
    name: str,
    target: str | None = None,
    images: Path | None = None,
    calibration: int = 200,
    method: str = "minmax",
    max_drop: float = 0.01,
    out: Path | None = None,
    score_images: int = 300,
) -> QuantizeReport:
    """Quantise ``repo/name``'s latest version into ``out/target/1`` (default ``repo/<name>_int8``), written only
    when its score is at most ``max_drop`` below the fp32 model's.

    Score: for Optic's own shape models, the gate metric on the independent stress set; for any other model,
    agreement with the fp32 model on ``images`` held out from calibration (top-1 label, pixel class, or box
    mAP@0.5 against the fp32 boxes)."""
    from optic.export import evaluate
    from optic.export.data import SHAPES, WIDE, make_scenes
    from optic.export.importer import check_name
    from optic.export.onnx_io import write_atomically

    source = _latest_version(repo / name)
    props = onnx.load(str(source), load_external_data=False).metadata_props
    meta = ModelMeta.from_props({p.key: p.value for p in props})
    if meta.task not in _TASKS:
        raise ValueError(f"{name}: task {meta.task!r}; quantize supports {', '.join(_TASKS)} models")
    target = check_name(target or f"{name}_int8")
    out = out or repo
    ours = tuple(meta.labels[-len(SHAPES) :]) == SHAPES and images is None
    if ours:  # calibrate on the training distribution, score on the stress set (never calibrated on)
        scenes = make_scenes(calibration, 7_000_007, style=WIDE)
        encoded = [s.encoded for s in scenes]
        held_out: list[Any] = []
    else:
        if images is None:
            raise ValueError(f"{name} is not one of Optic's shape models: give --images DIR of the pictures it serves")
        everything = _folder_images(images)
        cut = max(2, min(calibration, len(everything) // 2))
        encoded, rest = everything[:cut], everything[cut:]
        held_out = [evaluate.Sample(data, np.zeros((1, 1), np.uint8), np.zeros((0, 4), np.float32),
                                    np.zeros(0, np.int64), np.zeros(0, np.int64), 0, "", "") for data in rest]
    with tempfile.TemporaryDirectory(prefix="optic-quantize-") as tmp:
        int8_path = Path(tmp) / "model.onnx"
        done = quantize_model(source, int8_path, _decode_all(encoded, meta), method=method)
        ref, new = evaluate.session(source), evaluate.session(int8_path)
        if ours:
            slice_name, key = {
                "classification": ("classification", "accuracy"),
                "detection": ("detection", "map50"),
                "segmentation": ("segmentation", "miou"),
            }[meta.task]
            samples = evaluate.stress_samples(slice_name, score_images)
            score = {"classification": evaluate.classification, "detection": evaluate.detection,
                     "segmentation": evaluate.segmentation}[meta.task]
            fp32, int8 = float(score(ref, samples)[key]), float(score(new, samples)[key])
            metric = f"stress {slice_name} {key}"
        else:
            fp32, int8 = 1.0, _agreement(meta.task, ref, new, held_out)
            metric = f"agreement with fp32 on {len(held_out)} held-out images"
        fp32_ms, int8_ms = evaluate.model_latency(ref), evaluate.model_latency(new)
        report = QuantizeReport(
            name, target, metric, fp32, int8, max_drop, done.fp32_bytes, done.int8_bytes, fp32_ms, int8_ms,
            done.calibration_images, written=False,
        )
        if fp32 - int8 > max_drop:
            return QuantizeReport(**{**report.__dict__, "reason": f"drop {fp32 - int8:.4f} > {max_drop:.3f}"})
        proto = onnx.load(str(int8_path))
        proto.metadata_props.add(key="optic.export.quantization.metric", value=metric)
        proto.metadata_props.add(key="optic.export.quantization.fp32", value=f"{fp32:.6f}")
        proto.metadata_props.add(key="optic.export.quantization.int8", value=f"{int8:.6f}")
        proto.metadata_props.add(key="optic.export.quantization.source", value=f"{name}/{source.parent.name}")
        path = out / target / "1" / "model.onnx"
        write_atomically(proto, path)
        config = _config_for(source.parent.parent, target)
        if config is not None:
            (out / target / "config.pbtxt").write_text(config)
    return QuantizeReport(**{**report.__dict__, "written": True})


def _config_for(entry: Path, target: str) -> str | None:
    """The source entry's configuration (batching, queue policy, warm-up) under the new name; None when the source
    has none (the server then derives the same defaults for both)."""
    from google.protobuf import text_format

    from optic.server import config

    if not (entry / config.CONFIG_FILE).is_file():
        return None
    cfg = config.read(entry).config
    cfg.name = target
    return text_format.MessageToString(cfg)
