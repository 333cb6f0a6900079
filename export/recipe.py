"""What every recipe shares: the report, and the check-then-write step.

A recipe trains a model and measures its gate metric with onnxruntime on the
exported graph (what will be served, not torch); :func:`finish` then refuses
to write unless parity and the gate both hold.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import onnx

from optic.export.onnx_export import OPSET
from optic.export.onnx_io import write_atomically

REPORT_COLUMNS = (
    "model",
    "params",
    "onnx size",
    "gate metric",
    "value",
    "gate",
    "parity diff",
    "train time",
    "written",
)


@dataclass(frozen=True)
class ModelReport:
    name: str
    paths: tuple[Path, ...]
    metric: str
    value: float
    gate: float
    max_abs_diff: float
    tolerance: float
    params: int
    onnx_bytes: int
    seconds: float
    written: bool = False
    reason: str = ""

    def summary(self) -> str:
        verdict = "written to " + ", ".join(map(str, self.paths)) if self.written else f"NOT written: {self.reason}"
        return (
            f"{self.name}: {self.metric} {self.value:.4f} (gate {self.gate:.2f}); ORT-vs-torch max abs diff "
            f"{self.max_abs_diff:.2e}; {self.params:,} parameters, {self.onnx_bytes / 1e6:.2f} MB; "
            f"{self.seconds:.0f}s; {verdict}"
        )

    def row(self) -> tuple[str, ...]:
        return (
            self.name,
            f"{self.params:,}",
            f"{self.onnx_bytes / 1e6:.2f} MB",
            self.metric,
            f"{self.value:.4f}",
            f"≥ {self.gate:.2f}",
            f"{self.max_abs_diff:.1e}",
            f"{self.seconds:.0f} s",
            "yes" if self.written else "NO",
        )


def table(reports: list[ModelReport]) -> str:
    rows = [REPORT_COLUMNS, *(r.row() for r in reports)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(REPORT_COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def eval_props(metric: str, value: float, split: str, max_abs_diff: float) -> dict[str, str]:
    """The evaluation, recorded in the model itself next to its other metadata."""
    return {
        f"optic.eval.{metric}": f"{value:.4f}",
        "optic.eval.split": split,
        "optic.export.parity_max_abs_diff": f"{max_abs_diff:.3e}",
        "optic.export.opset": str(OPSET),
    }


class Gated(Protocol):
    @property
    def gate(self) -> float: ...  # the metric below which the model is not written

    @property
    def tolerance(self) -> float: ...  # the largest torch-vs-onnxruntime difference allowed


def finish(
    name: str,
    out: Path,
    protos: dict[str, onnx.ModelProto],
    modules: list[object],
    metric: str,
    value: float,
    max_abs_diff: float,
    recipe: Gated,
    started: float,
) -> ModelReport:
    """Report a recipe's models and write each (``<out>/<entry>/1/model.onnx``) only if parity and the gate hold."""
    report = ModelReport(
        name=name,
        paths=tuple(out / entry / "1" / "model.onnx" for entry in protos),
        metric=metric,
        value=value,
        gate=recipe.gate,
        max_abs_diff=max_abs_diff,
        tolerance=recipe.tolerance,
        params=sum(count_params(m) for m in modules),
        onnx_bytes=size_of(*protos.values()),
        seconds=time.monotonic() - started,
    )
    if report.max_abs_diff > report.tolerance:
        return replace(report, reason=f"parity {report.max_abs_diff:.2e} > tolerance {report.tolerance:.0e}")
    if report.value < report.gate:
        return replace(report, reason=f"{report.metric} {report.value:.4f} < gate {report.gate:.2f}")
    for proto, path in zip(protos.values(), report.paths, strict=True):
        write_atomically(proto, path)
    return replace(report, written=True)


def size_of(*protos: onnx.ModelProto) -> int:
    return sum(p.ByteSize() for p in protos)


def count_params(module: object) -> int:
    return sum(p.numel() for p in module.parameters())  # type: ignore[attr-defined]
