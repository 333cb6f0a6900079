"""``optic export``: build, convert or import models into a repository.

Only argparse at import time: torch is loaded when a command runs, so the
server's CLI can offer ``optic export --help`` without the extra installed.
User mistakes (missing file, wrong architecture, bad checkpoint, label count)
end in one ``optic export: error: ...`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

MODELS = ("classifier", "detector", "segmenter", "captioner")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(
        dest="export_command", required=True, metavar="{" + ",".join(MODELS) + ",all,convert,import}"
    )
    for name in (*MODELS, "all"):
        p = sub.add_parser(name, help=f"train and export {'every default model' if name == 'all' else 'the ' + name}")
        p.add_argument("--out", type=Path, default=Path("model_repo"), help="model repository to write into")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--epochs", type=int, help="override each recipe's epoch count (quick trials)")
        p.add_argument("--no-progress", action="store_true", help="hide progress bars")

    p = sub.add_parser("convert", help="turn a PyTorch checkpoint of one of our architectures into a repository entry")
    p.add_argument("checkpoint", type=Path)
    p.add_argument(
        "--arch",
        required=True,
        help="ours (classifier, detector, segmenter, captioner) or torchvision's (resnet18, resnet50, "
        "mobilenet_v3_large, efficientnet_b0, vit_b_16, convnext_tiny, fcn_resnet50, deeplabv3_mobilenet_v3_large, "
        "lraspp_mobilenet_v3_large)",
    )
    p.add_argument(
        "--torchvision-weights",
        metavar="NAME",
        help="torchvision: which weights the checkpoint is (e.g. IMAGENET1K_V2): their transforms and categories "
        "are recorded (default: the architecture's DEFAULT)",
    )
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--name", help="model name in the repository (default: the architecture)")
    p.add_argument("--labels", type=Path, help="labels file (JSON list or one per line); default: the checkpoint's")
    _spec_flags(p, "the checkpoint's, else the recipe's")

    p = sub.add_parser(
        "import", help="wrap an existing ONNX model (e.g. Ultralytics, torchvision) as a repository entry"
    )
    p.add_argument("model", type=Path, metavar="MODEL.onnx")
    p.add_argument(
        "--task", help="classify, detect or segment (long names too); default: the model's own metadata (Ultralytics)"
    )
    p.add_argument("--labels", type=Path, help="labels file; default: the model's own metadata (Ultralytics 'names')")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--name", help="model name in the repository (default: the file's stem)")
    p.add_argument("--max-batch-size", type=int, default=32, help="for config.pbtxt when the batch axis is dynamic")
    _spec_flags(p, "the model's static input size / metadata, else the task's usual pre-processing")


def _spec_flags(p: argparse.ArgumentParser, default: str) -> None:
    """How images become the model's input, recorded in its metadata for the server."""
    from optic.server.metadata import DECODES, INTERPOLATIONS, PIPELINES, RESIZE_MODES

    g = p.add_argument_group(f"input spec (default: {default})")
    g.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"))
    g.add_argument("--resize", choices=RESIZE_MODES)
    g.add_argument("--pipeline", choices=PIPELINES, help="the reference pre-processing the model was trained with")
    g.add_argument("--resize-size", type=int, help="center_crop / shorter_side: the shorter side before cropping")
    g.add_argument("--interpolation", choices=INTERPOLATIONS)
    g.add_argument("--decode", choices=DECODES, help="draft: large JPEGs decode at reduced scale (faster, inexact)")
    g.add_argument("--scale", type=float, help="pixel multiplier before mean/std, e.g. 0.00392156862745098 (1/255)")
    g.add_argument("--mean", type=float, nargs=3, metavar=("R", "G", "B"))
    g.add_argument("--std", type=float, nargs=3, metavar=("R", "G", "B"))


def _spec_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "size": tuple(args.input_size) if args.input_size else None,
        "resize": args.resize,
        "scale": args.scale,
        "mean": tuple(args.mean) if args.mean else None,
        "std": tuple(args.std) if args.std else None,
        "pipeline": args.pipeline,
        "resize_size": args.resize_size,
        "interpolation": args.interpolation,
        "decode": args.decode,
    }


def _fail(message: str) -> int:
    print(f"optic export: error: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    try:
        from optic.export import importer
    except ImportError as exc:  # onnx comes with the extra, not with the server
        return _fail(f"needs the export extra (pip install -e '.[export]'): {exc}")
    try:
        if args.export_command == "import":  # no torch needed
            labels = importer.read_labels(args.labels) if args.labels else ()
            overrides = _spec_overrides(args)
            size = overrides.pop("size")
            path = importer.import_onnx(
                args.model, args.task, args.out, args.name, labels, size, args.max_batch_size, **overrides
            )
            print(f"wrote {path} and {path.parent.parent / 'config.pbtxt'}")
            return 0
        try:
            from optic.export import convert
        except ImportError as exc:  # torch and tqdm come with the extra, not with the server
            return _fail(f"needs the export extra (pip install -e '.[export]'): {exc}")
        if args.export_command == "convert":
            labels = importer.read_labels(args.labels) if args.labels else ()
            paths = convert.convert(
                args.checkpoint, args.arch, args.out, args.name, labels, args.torchvision_weights,
                **_spec_overrides(args),
            )
            for path in paths:
                print(f"wrote {path}")
            return 0
    except importer.ExportError as exc:
        return _fail(str(exc))
    return build(args)


def build(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from optic.export import captioner, classifier, detector, segmenter
    from optic.export.recipe import table

    recipes: dict[str, tuple[Callable[..., Any], Any]] = {
        "classifier": (classifier.build, classifier.ClassifierRecipe),
        "detector": (detector.build, detector.DetectorRecipe),
        "segmenter": (segmenter.build, segmenter.SegmenterRecipe),
        "captioner": (captioner.build, captioner.CaptionerRecipe),
    }
    names = MODELS if args.export_command == "all" else (args.export_command,)
    started = time.monotonic()
    reports = []
    for name in names:
        build_fn, recipe_cls = recipes[name]
        recipe = recipe_cls(seed=args.seed)
        if args.epochs:
            recipe = replace(recipe, epochs=args.epochs)
        report = build_fn(args.out, recipe, progress=not args.no_progress)
        print(report.summary(), flush=True)
        reports.append(report)
    print()
    print(table(reports))
    print(f"\ntotal {time.monotonic() - started:.0f}s")
    return 0 if all(r.written for r in reports) else 1
