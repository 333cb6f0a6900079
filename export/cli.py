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
TRUNK_FILE = "trunk.pt"  # beside the model entries; the server ignores files at the repository's top level


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(
        dest="export_command", required=True, metavar="{" + ",".join(MODELS) + ",all,train,convert,import,quantize}"
    )
    for name in (*MODELS, "all"):
        p = sub.add_parser(name, help=f"train and export {'every default model' if name == 'all' else 'the ' + name}")
        p.add_argument("--out", type=Path, default=Path("model_repo"), help="model repository to write into")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--epochs", type=float, help="override the shared trunk's epochs (quick trials)")
        p.add_argument("--scenes", type=int, help="override the number of training scenes (quick trials)")
        p.add_argument("--no-progress", action="store_true", help="hide progress bars")

    from optic.export import finetune  # argparse only at import time

    finetune.add_parser(sub)

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


    p = sub.add_parser(
        "quantize", help="write an int8 copy of a repository model (onnxruntime static QDQ), gated against the fp32 one"
    )
    p.add_argument("model", metavar="NAME", help="the model's name in the repository (classification, detection "
                   "or segmentation)")
    p.add_argument("--repo", type=Path, default=Path("model_repo"), help="repository holding NAME")
    p.add_argument("--out", type=Path, help="repository to write into (default: --repo)")
    p.add_argument("--name", help="the int8 model's name (default: NAME_int8)")
    p.add_argument("--images", type=Path, metavar="DIR", help="pictures the model serves: half calibrate, half "
                   "measure agreement with fp32 (required for models other than Optic's shape models)")
    p.add_argument("--calibration", type=int, default=200, help="calibration images (default: 200)")
    p.add_argument("--method", choices=("minmax", "percentile"), default="minmax", help="activation-range "
                   "calibration (default: minmax)")
    p.add_argument("--max-drop", type=float, default=0.01, help="largest score loss allowed against fp32; the "
                   "model is not written beyond it (default: 0.01, one point)")

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


def _quantize(args: argparse.Namespace) -> int:
    from optic.export import quantize

    if not (args.repo / args.model).is_dir():
        return _fail(f"{args.repo / args.model}: no such model in the repository")
    if args.images is not None and not args.images.is_dir():
        return _fail(f"--images {args.images}: not a directory")
    if args.calibration < 2:
        return _fail("--calibration must be at least 2")
    try:
        report = quantize.quantize_entry(
            args.repo, args.model, args.name, args.images, args.calibration, args.method, args.max_drop, args.out
        )
    except ValueError as exc:
        return _fail(str(exc))
    print(report.summary())
    return 0 if report.written else 1


def _fail(message: str) -> int:
    print(f"optic export: error: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    try:
        from optic.export import importer
    except ImportError as exc:  # onnx comes with the extra, not with the server
        return _fail(f"needs the export extra (pip install -e '.[export]'): {exc}")
    try:
        if args.export_command == "quantize":  # no torch needed
            return _quantize(args)
        if args.export_command == "import":  # no torch needed
            labels = importer.read_labels(args.labels) if args.labels else ()
            overrides = _spec_overrides(args)
            size = overrides.pop("size")
            path = importer.import_onnx(
                args.model, args.task, args.out, args.name, labels, size, args.max_batch_size, **overrides
            )
            print(f"wrote {path} and {path.parent.parent / 'config.pbtxt'}")
            return 0
        if args.export_command == "train":
            from optic.export import finetune

            return finetune.run(args)
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
    """Train the shared trunk once (every model carries it), then export, gate and write each model."""
    from dataclasses import replace

    from optic.export import captioner, classifier, detector, segmenter
    from optic.export.recipe import table
    from optic.export.train import TrunkRecipe, trained

    recipes: dict[str, tuple[Callable[..., Any], Any]] = {
        "classifier": (classifier.build, classifier.ClassifierRecipe),
        "detector": (detector.build, detector.DetectorRecipe),
        "segmenter": (segmenter.build, segmenter.SegmenterRecipe),
        "captioner": (captioner.build, captioner.CaptionerRecipe),
    }
    names = MODELS if args.export_command == "all" else (args.export_command,)
    started = time.monotonic()
    trunk = replace(TrunkRecipe(), seed=args.seed)
    if args.epochs:
        trunk = replace(trunk, epochs=args.epochs)
    if args.scenes:
        trunk = replace(trunk, scenes=args.scenes)
    shared = trained(trunk, progress=not args.no_progress)
    print(f"shared trunk: {len(shared.history)} epochs in {shared.seconds:.0f}s", flush=True)
    reports = []
    for name in names:
        build_fn, recipe_cls = recipes[name]
        report = build_fn(args.out, recipe_cls(seed=args.seed, trunk=trunk), progress=not args.no_progress)
        print(report.summary(), flush=True)
        reports.append(report)
    print()
    print(table(reports))
    print(f"\ntotal {time.monotonic() - started:.0f}s (shared trunk {shared.seconds:.0f}s)")
    if args.export_command == "all" and all(r.written for r in reports):
        from optic.export.train import save_trunk

        print(f"wrote {save_trunk(shared, args.out / TRUNK_FILE)} (the trunk `optic export train --from` starts from)")
    return 0 if all(r.written for r in reports) else 1
