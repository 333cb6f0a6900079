"""Torch -> ONNX with a dynamic batch axis, self-describing metadata and a parity check.

A model is written only after ``onnx.checker`` passes, onnxruntime reproduces
torch's outputs, and the caller's quality gate holds; the file is replaced
atomically so a serving process polling the repository never sees half a file.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

OPSET = 17


@dataclass(frozen=True)
class Parity:
    max_abs_diff: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance


def to_onnx(
    model: nn.Module,
    sample: torch.Tensor | tuple[torch.Tensor, ...],
    input_name: str | list[str],
    output_name: str | list[str],
) -> onnx.ModelProto:
    """Trace ``model`` on ``sample`` into an ONNX graph whose axis 0 is a symbolic batch everywhere."""
    samples = sample if isinstance(sample, tuple) else (sample,)
    inputs = [input_name] if isinstance(input_name, str) else input_name
    outputs = [output_name] if isinstance(output_name, str) else output_name
    model.eval()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        path = Path(tmp) / "model.onnx"
        # The TorchScript exporter: stable for these conv nets and needs no onnxscript.
        torch.onnx.export(
            model,
            samples,
            str(path),
            dynamo=False,
            input_names=inputs,
            output_names=outputs,
            dynamic_axes={name: {0: "batch"} for name in (*inputs, *outputs)},
            opset_version=OPSET,
            do_constant_folding=True,
        )
        proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    return proto


def set_metadata(proto: onnx.ModelProto, props: Mapping[str, str], doc: str = "") -> None:
    del proto.metadata_props[:]
    for key in sorted(props):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, props[key]
    proto.producer_name = "optic-export"
    proto.doc_string = doc


def session(proto: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def ort_predict(sess: ort.InferenceSession, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i : i + batch_size]})[0] for i in range(0, len(x), batch_size)])


@torch.no_grad()
def parity(model: nn.Module, sess: ort.InferenceSession, inputs: list[np.ndarray], tolerance: float) -> Parity:
    """Largest |torch - onnxruntime| over every given input batch (several batch sizes)."""
    model.eval()
    worst = 0.0
    for x in inputs:
        expected = model(torch.from_numpy(x)).numpy()
        got = ort_predict(sess, x)
        worst = max(worst, float(np.max(np.abs(expected - got))))
    return Parity(worst, tolerance)


def write_atomically(proto: onnx.ModelProto, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".model-", suffix=".onnx.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(proto.SerializeToString(deterministic=True))
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; servers often run as another user
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
