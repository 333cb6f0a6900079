"""What the JPEG draft decode costs in accuracy and buys in time, for the default models (issue 18, item 3).

Accuracy: every default vision model on the stress slices (the independent renderer, issue 16), through the
server's own ``prepare``, once with the model's decode forced to ``exact`` and once to ``draft``. Time: the
server's ``prepare`` (decode + resize + normalise) of one JPEG per camera size, median of single-threaded
runs, exact vs draft. Needs the export extra (the stress renderer) and the default model repository.

    python benchmarks/draft_decode.py [--repo model_repo] [--json benchmarks/results/draft_decode.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import sys
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.decoders import jpeg, photo_like, timed  # noqa: E402
from optic.export import evaluate  # noqa: E402
from optic.server.metadata import ModelMeta  # noqa: E402
from optic.server.tasks.image import ImageLimits, prepare  # noqa: E402

SLICES = {
    "classifier": ("classification", "jpeg"),
    "detector": ("detection", "hd_frames", "jpeg", "small_objects"),
    "segmenter": ("segmentation", "jpeg"),
}
SIZES = ((640, 480), (1280, 720), (1920, 1080))
DECODES = ("exact", "draft")


def accuracy(repo: Path, decode: str) -> dict[str, float]:
    """Each model's headline metric per slice with its decode forced to ``decode``."""
    declared = evaluate.meta_of

    def forced(sess: Any) -> ModelMeta:
        meta = declared(sess)
        assert meta.input is not None
        return replace(meta, input=replace(meta.input, decode=decode))

    evaluate.meta_of = forced  # the metric functions read the spec through meta_of
    try:
        out: dict[str, float] = {}
        for model, slices in SLICES.items():
            sess = evaluate.session(repo / model / "1" / "model.onnx", 1)
            for name in slices:
                samples = evaluate.stress_samples(name)
                if model == "classifier":
                    out[f"{model}/{name}"] = evaluate.classification(sess, samples)["accuracy"]
                elif model == "detector":
                    out[f"{model}/{name}"] = evaluate.detection(sess, samples)["map50"]
                else:
                    out[f"{model}/{name}"] = evaluate.segmentation(sess, samples)["miou"]
        return out
    finally:
        evaluate.meta_of = declared


def timings(repo: Path) -> dict[str, dict[str, float]]:
    limits = ImageLimits()
    out: dict[str, dict[str, float]] = {}
    for model in ("classifier", "detector"):
        sess = evaluate.session(repo / model / "1" / "model.onnx")
        spec = evaluate.meta_of(sess).input
        assert spec is not None
        # A warmed-up session, as in the server: its allocations set the heap's trim threshold, without which
        # every fresh float image here would pay page faults a server does not.
        sess.run(None, {sess.get_inputs()[0].name: np.zeros((8, 3, *spec.size), np.float32)})
        for width, height in SIZES:
            data = jpeg(photo_like(height, width))
            row = {d: timed(functools.partial(prepare, data, replace(spec, decode=d), limits), 7, 40) for d in DECODES}
            row["speedup"] = row["exact"] / row["draft"]
            out[f"{width}x{height} -> {model} {spec.size[1]}x{spec.size[0]}"] = row
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repo", type=Path, default=ROOT / "model_repo")
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "draft_decode.json")
    args = p.parse_args(argv)
    times = timings(args.repo)
    for key, row in times.items():
        print(f"{key:38s} exact {row['exact']:6.2f} ms  draft {row['draft']:6.2f} ms  {row['speedup']:.2f}x")
    exact, draft = accuracy(args.repo, "exact"), accuracy(args.repo, "draft")
    for key in exact:
        print(f"{key:38s} exact {exact[key]:.4f}  draft {draft[key]:.4f}  ({draft[key] - exact[key]:+.4f})")
    worst = min(draft[k] - exact[k] for k in exact)
    print(f"largest accuracy loss, exact -> draft: {-worst:.4f}")
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()},
        "prepare_ms": times,
        "accuracy": {"exact": exact, "draft": draft, "largest_loss": -worst},
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
