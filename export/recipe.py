"""What every recipe shares: the report, the gates, and the check-then-write step.

A recipe exports its model and measures its gate metrics with onnxruntime on the exported graph (what will be
served, not torch), on the independent stress set, through the server's own pre- and post-processing
(:mod:`optic.export.evaluate`); :func:`finish` then refuses to write unless parity and every gate hold.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

import onnx

from optic.export.onnx_export import OPSET
from optic.export.onnx_io import write_atomically
from optic.server.metadata import InputSpec

REPORT_COLUMNS = (
    "model",
    "params",
    "onnx size",
    "gate metric (stress set)",
    "value",
    "gate",
    "in-distribution",
    "parity diff",
    "time",
    "written",
)
IN_DISTRIBUTION_SEED = 5_000_003  # our generator's held-out scenes: a seed training never uses
IN_DISTRIBUTION_SIZE = 300


# config.pbtxt written beside default models that batch better below --max-batch-size. onnxruntime's cost per image
# rises with batch size for the classifier and detector on CPU (benchmarks/peers/bound.py, 2026-11-26: classifier
# 2.65 / 2.87 / 3.10 ms, detector 11.70 / 12.46 / 13.27 ms at batch 1 / 12 / 32); at 64 callers, batches of 8
# served more than batches of 32 in two alternating rounds each (classifier 194.8 / 189.2 vs 184.0 / 168.0 img/s,
# detector 57.0 / 60.7 vs 56.0 / 58.7; docs/benchmarks.md). The
# segmenter serves as many images in batches of 8 with half the memory: alone, 64 callers, 640x480 JPEGs, 2 cores,
# 4 alternating rounds, 46.0-48.0 vs 44.7-47.8 img/s, p99 1.43-1.52 vs 1.81-1.86 s, peak RSS 786-794 vs
# 1,734-1,804 MB (two lanes each hold a batch's activations at 256x256 per image).
# The captioner's two parts run one batch at a time (the server's default is two on 2+ CPU cores: a narrow lane
# beside the wide run): a second encoder or decoder batch beside the first cost throughput at 64 callers in every
# round (benchmarks/lanes.py: 0.96 / 0.96 with lanes on both parts, 0.87 / 0.93 on the encoder alone), where the CNNs
# gained 1.17-1.38. Each run takes one thread (Triton's intra_op_thread_count): at 64 callers on 2 cores the server's
# threads took 1.82 cores (encoder runs 0.92, image decoding 0.33, the event loop 0.28, decoder steps 0.27), and
# a run's second intra-op thread waited for the others at every kernel. benchmarks/lanes.py --captioner-threads,
# 3 alternating rounds: 235 vs 217 captions/s at 64 callers (1.09x), 7.19 vs 8.18 CPU-ms per caption.
SERVING_CONFIG = {
    entry: "# Under load, run batches of 8 (Triton's preferred_batch_size): cheaper per image on CPU than 32.\n"
    "dynamic_batching { preferred_batch_size: [ 8 ] }\n"
    for entry in ("classifier", "detector", "segmenter")
} | {
    entry: "# One batch at a time, on one thread: under load the cores also decode images and run the decoding\n"
    "# loop, and a second batch beside the first (the narrow lane) or a second thread in a run served fewer\n"
    "# captions per second on 2 cores (docs/model-repository.md). On more cores, --workers scales it out.\n"
    "instance_group [ { count: 1 } ]\n"
    'parameters { key: "intra_op_thread_count" value: { string_value: "1" } }\n'
    for entry in ("captioner_encoder", "captioner_decoder")
}


def served_spec(spec: InputSpec) -> InputSpec:
    """The input spec the default models are served with: their training pre-processing, and the JPEG draft decode
    (a JPEG decodes at 1/2, 1/4 or 1/8 scale, never below the size the letterbox scales it to). Measured on the
    stress slices through the server's pipeline, exact -> draft moved no gate metric by more than 0.002
    (benchmarks/draft_decode.py), and a 640x480 JPEG costs 1.53 ms instead of 2.46 ms to prepare at 256 (1920x1080:
    5.15 instead of 12.53)."""
    return replace(spec, decode="draft")


@dataclass(frozen=True)
class ModelReport:
    name: str
    paths: tuple[Path, ...]
    metric: str  # the first gate's metric
    value: float
    gate: float
    max_abs_diff: float
    tolerance: float
    params: int
    onnx_bytes: int
    seconds: float
    written: bool = False
    reason: str = ""
    gates: dict[str, tuple[float, float]] = field(default_factory=dict)  # metric -> (value, gate)
    results: dict[str, Any] = field(default_factory=dict)  # every figure measured, per slice

    def summary(self) -> str:
        verdict = "written to " + ", ".join(map(str, self.paths)) if self.written else f"NOT written: {self.reason}"
        gates = ", ".join(f"{k} {v:.4f} (gate {g:.2f})" for k, (v, g) in self.gates.items())
        return (
            f"{self.name}: {gates}; ORT-vs-torch max abs diff {self.max_abs_diff:.2e}; {self.params:,} parameters, "
            f"{self.onnx_bytes / 1e6:.2f} MB; {self.seconds:.0f}s; {verdict}"
        )

    def row(self) -> tuple[str, ...]:
        in_dist = self.results.get("in_distribution", {})
        key = {"map50_95": "map50_95", "small_map50": "map50"}.get(self.metric, self.metric)
        value = in_dist.get(key) if isinstance(in_dist, dict) else None
        return (
            self.name,
            f"{self.params:,}",
            f"{self.onnx_bytes / 1e6:.2f} MB",
            " / ".join(self.gates),
            " / ".join(f"{v:.4f}" for v, _ in self.gates.values()),
            " / ".join(f"≥ {g:.2f}" for _, g in self.gates.values()),
            f"{value:.4f}" if isinstance(value, float) else "-",
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


def gate_props(
    gates: dict[str, tuple[float, float]], results: dict[str, Any], max_abs_diff: float, split: str
) -> dict[str, str]:
    """Gate values (``optic.eval.<metric>``), the in-distribution figures beside them, parity and opset."""
    props = {f"optic.eval.{k}": f"{v:.4f}" for k, (v, _) in gates.items()}
    props |= {f"optic.gate.{k}": f"{g:.2f}" for k, (_, g) in gates.items()}
    in_dist = results.get("in_distribution", {})
    for k, v in in_dist.items():
        if isinstance(v, float):
            props[f"optic.eval.in_distribution.{k}"] = f"{v:.4f}"
    props["optic.eval.split"] = f"{split} (optic.export.stress, seeds in optic.export.evaluate.SLICES)"
    props["optic.export.parity_max_abs_diff"] = f"{max_abs_diff:.3e}"
    props["optic.export.opset"] = str(OPSET)
    return props


@lru_cache(maxsize=4)
def _in_distribution(n: int) -> tuple[Any, ...]:
    from optic.export.data import WIDE, make_scenes
    from optic.export.evaluate import from_scene

    return tuple(from_scene(s) for s in make_scenes(n, IN_DISTRIBUTION_SEED, style=WIDE))


def in_distribution(n: int | None = None) -> list[Any]:
    """Held-out scenes of our own training generator, as :class:`optic.export.evaluate.Sample`."""
    return list(_in_distribution(IN_DISTRIBUTION_SIZE if n is None else min(n, IN_DISTRIBUTION_SIZE)))


class Gated(Protocol):
    @property
    def tolerance(self) -> float: ...  # the largest torch-vs-onnxruntime difference allowed


def finish(
    name: str,
    out: Path,
    protos: dict[str, onnx.ModelProto],
    modules: list[object],
    gates: dict[str, tuple[float, float]],
    max_abs_diff: float,
    recipe: Gated,
    started: float,
    results: dict[str, Any] | None = None,
) -> ModelReport:
    """Report a recipe's models and write each (``<out>/<entry>/1/model.onnx``) only if parity and every gate
    hold (``gates``: metric -> (value, gate))."""
    first = next(iter(gates))
    report = ModelReport(
        name=name,
        paths=tuple(out / entry / "1" / "model.onnx" for entry in protos),
        metric=first,
        value=gates[first][0],
        gate=gates[first][1],
        max_abs_diff=max_abs_diff,
        tolerance=recipe.tolerance,
        params=onnx_params(*protos.values()),
        onnx_bytes=size_of(*protos.values()),
        seconds=time.monotonic() - started,
        gates=dict(gates),
        results=dict(results or {}),
    )
    if report.max_abs_diff > report.tolerance:
        return replace(report, reason=f"parity {report.max_abs_diff:.2e} > tolerance {report.tolerance:.0e}")
    below = [f"{k} {v:.4f} < gate {g:.2f}" for k, (v, g) in gates.items() if v < g]
    if below:
        return replace(report, reason="; ".join(below))
    for (entry, proto), path in zip(protos.items(), report.paths, strict=True):
        write_atomically(proto, path)
        if entry in SERVING_CONFIG:
            (out / entry / "config.pbtxt").write_text(SERVING_CONFIG[entry])
    return replace(report, written=True)


def size_of(*protos: onnx.ModelProto) -> int:
    return sum(p.ByteSize() for p in protos)


def onnx_params(*protos: onnx.ModelProto) -> int:
    """Numbers stored in the graphs' initializers: the parameters the served models hold."""
    total = 0
    for proto in protos:
        for init in proto.graph.initializer:
            if init.data_type == onnx.TensorProto.FLOAT:
                n = 1
                for d in init.dims:
                    n *= d
                total += n
    return total


def count_params(*modules: object) -> int:
    """Distinct parameters over the modules (a shared trunk counts once)."""
    seen: dict[int, int] = {}
    for m in modules:
        for p in m.parameters():  # type: ignore[attr-defined]
            seen[id(p)] = p.numel()
    return sum(seen.values())
