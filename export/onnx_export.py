"""Torch -> ONNX with a dynamic batch axis, self-describing metadata and a parity check.

A model is written only after ``onnx.checker`` passes, onnxruntime reproduces
torch's outputs, and the caller's quality gate holds (see ``recipe.finish``).
"""

from __future__ import annotations

import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from optic.export.onnx_io import ort_predict

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

