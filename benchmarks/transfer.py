"""Transfer learning vs training from scratch on small data, through ``optic export train`` itself (issue 17).

A new dataset the trunk never saw: three new shape classes (cross, ring, arrow) drawn with Pillow on noisy
gradient backgrounds, with clutter from the old vocabulary (circles, squares). Classification: one new shape per
image (ImageFolder); detection: one to three new shapes per image (Ultralytics YAML). For each training-set size
(images per class) and seed, the same command runs ``--from`` the trunk (head frozen, then fine-tuned) and
``--from none`` (one scratch phase of as many epochs); the val split (fixed, 50 images per class) is scored on the
exported ONNX model through the server's pre- and post-processing, as the gate does.

    python benchmarks/transfer.py [--trunk model_repo/trunk.pt] [--per-class 20 100] [--tasks classify detect]
                                  [--json benchmarks/results/transfer.json]

Without a trunk file, ``--train-trunk`` first trains a small one (TrunkRecipe at 128 px, 6,000 scenes, 6 epochs:
minutes on one core) and says so in the results; the committed ``model_repo/trunk.pt`` is the one to measure.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from optic.export import cli  # noqa: E402
from tests.dataset_writers import save_image, yolo_row  # noqa: E402

NEW_SHAPES = ("cross", "ring", "arrow")
PALETTE = ((215, 40, 40), (40, 165, 60), (45, 85, 220), (235, 205, 45), (135, 60, 175), (240, 135, 30),
           (240, 240, 240), (25, 25, 25))  # fmt: skip


def _polygon(shape: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    """Outline of a cross or an arrow (a ring is drawn as two ellipses)."""
    if shape == "cross":
        a, b = r, r * 0.33
        pts = [(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b), (b, a), (-b, a), (-b, b), (-a, b), (-a, -b),
               (-b, -b)]  # fmt: skip
    else:  # arrow pointing right
        pts = [(-r, -0.25 * r), (0.2 * r, -0.25 * r), (0.2 * r, -0.7 * r), (r, 0), (0.2 * r, 0.7 * r),
               (0.2 * r, 0.25 * r), (-r, 0.25 * r)]  # fmt: skip
    c, s = math.cos(rot), math.sin(rot)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    a, b = rng.integers(60, 200, 3), rng.integers(60, 200, 3)
    t = np.linspace(0, 1, size)[None, :, None] if rng.random() < 0.5 else np.linspace(0, 1, size)[:, None, None]
    img = a * (1 - t) + b * t + rng.normal(0, 12, (size, size, 3))
    return Image.fromarray(np.broadcast_to(img, (size, size, 3)).clip(0, 255).astype(np.uint8))


def draw_scene(rng: np.random.Generator, size: int, classes: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """An image with one new shape per entry of ``classes`` and 0-2 old shapes as clutter; boxes (K, 4) xyxy."""
    img = _background(rng, size)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(0, 3))):  # clutter: the trunk's own shapes, never labelled
        r = size * rng.uniform(0.06, 0.12)
        x, y = rng.uniform(r, size - r, 2)
        colour = PALETTE[int(rng.integers(len(PALETTE)))]
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x - r, y - r, x + r, y + r], fill=colour)
    boxes = []
    scale = (0.25, 0.4) if len(classes) == 1 else (0.12, 0.22)
    for c in classes:
        r = size * rng.uniform(*scale)
        cx, cy = rng.uniform(r, size - r, 2)
        colour = PALETTE[int(rng.integers(len(PALETTE)))]
        if NEW_SHAPES[c] == "ring":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
            inner = r * rng.uniform(0.45, 0.6)
            hole = tuple(int(v) for v in np.asarray(img)[int(cy), int(min(size - 1, cx + r + 1))])
            draw.ellipse([cx - inner, cy - inner, cx + inner, cy + inner], fill=hole)
            boxes.append([cx - r, cy - r, cx + r, cy + r])
        else:
            pts = _polygon(NEW_SHAPES[c], cx, cy, r, rng.uniform(0, 2 * math.pi))
            draw.polygon(pts, fill=colour)
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            boxes.append([min(xs), min(ys), max(xs), max(ys)])
    return np.asarray(img), np.clip(np.array(boxes, np.float32).reshape(-1, 4), 0, size)


def write_classification(root: Path, per_class: int, val_per_class: int, seed: int, size: int) -> Path:
    rng = np.random.default_rng([seed, 1])
    for split, n in (("train", per_class), ("val", val_per_class)):
        split_rng = rng if split == "train" else np.random.default_rng([12345, 2])  # one val set for every run
        for i in range(n * len(NEW_SHAPES)):
            c = i % len(NEW_SHAPES)
            image, _ = draw_scene(split_rng, size, [c])
            save_image(image, root / split / NEW_SHAPES[c] / f"{i:04d}.png")
    return root


def write_detection(root: Path, per_class: int, val_per_class: int, seed: int, size: int) -> Path:
    """Ultralytics layout; ``per_class`` images per class on average (each image holds 1-3 objects)."""
    for split, n in (("train", per_class), ("val", val_per_class)):
        rng = np.random.default_rng([seed, 3]) if split == "train" else np.random.default_rng([12345, 4])
        for i in range(n * len(NEW_SHAPES)):
            classes = [int(c) for c in rng.integers(0, len(NEW_SHAPES), int(rng.integers(1, 4)))]
            image, boxes = draw_scene(rng, size, classes)
            save_image(image, root / "images" / split / f"{i:04d}.png")
            label = root / "labels" / split / f"{i:04d}.txt"
            label.parent.mkdir(parents=True, exist_ok=True)
            label.write_text("".join(yolo_row(c, b, size) + "\n" for c, b in zip(classes, boxes, strict=True)))
    config = {"path": ".", "train": "images/train", "val": "images/val", "names": list(NEW_SHAPES)}
    (root / "data.yaml").write_text(json.dumps(config))  # JSON is YAML
    return root / "data.yaml"


def train_small_trunk(path: Path, threads: int) -> dict[str, object]:
    """A small trunk when none was given: the shared multi-task training at 128 px, briefly."""
    from optic.export.train import TrunkRecipe, save_trunk, train_trunk

    workers = max(1, min(8, (os.cpu_count() or 2) // 2))
    recipe = replace(TrunkRecipe(), size=128, scenes=6000, epochs=6.0, workers=workers, threads=threads)
    started = time.monotonic()
    trained = train_trunk(recipe, progress=True)
    save_trunk(trained, path)
    return {"recipe": {k: str(v) for k, v in asdict(recipe).items()}, "seconds": round(time.monotonic() - started)}


def run_train(task: str, data: Path, repo: Path, source: str, args: argparse.Namespace, seed: int) -> dict:
    """One ``optic export train`` in this process; the val metric the gate saw, and the wall time."""
    parser = argparse.ArgumentParser(prog="optic export")
    cli.add_arguments(parser)
    name = f"{task}_{source.replace('/', '_')}"
    argv = ["train", task, "--data", str(data), "--out", str(repo), "--name", name, "--from", source,
            "--head-epochs", str(args.head_epochs), "--epochs", str(args.epochs), "--size", str(args.size),
            "--seed", str(seed), "--threads", str(args.threads), "--gate", "0", "--no-progress",
            "--patience", "100"]  # fmt: skip
    started = time.monotonic()
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        status = cli.run(parser.parse_args(argv))
    seconds = time.monotonic() - started
    if status != 0:
        raise SystemExit(f"optic export train failed ({status}):\n{log.getvalue()}")
    report = json.loads((repo / name / "report" / "report.json").read_text())
    ev = report["evaluation"]
    return {"metric": ev["metric_name"], "value": ev["metric"], **{k: v for k, v in ev["extra"].items()},
            "seconds": round(seconds, 1), "epochs": len(report["history"])}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trunk", type=Path, default=ROOT / "model_repo" / "trunk.pt")
    p.add_argument("--train-trunk", action="store_true", help="train a small trunk when --trunk does not exist")
    p.add_argument("--tasks", nargs="+", default=["classify"], choices=("classify", "detect"))
    p.add_argument("--per-class", type=int, nargs="+", default=[20, 100])
    p.add_argument("--val-per-class", type=int, default=50)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--head-epochs", type=int, default=3)
    p.add_argument("--epochs", type=int, default=7)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", type=Path, default=Path("/tmp/optic-transfer"))
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "transfer.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    trunk_info: dict[str, object] = {"path": str(args.trunk)}
    if not args.trunk.is_file():
        if not args.train_trunk:
            raise SystemExit(f"{args.trunk} does not exist: run `optic export all`, or pass --train-trunk")
        trunk_info |= {"trained_here": train_small_trunk(args.trunk, args.threads)}
        print(f"trunk trained: {trunk_info}", flush=True)
    rows = []
    for task in args.tasks:
        for n in args.per_class:
            for seed in args.seeds:
                root = args.work / f"{task}-{n}-{seed}"
                writer = write_classification if task == "classify" else write_detection
                data = writer(root / "data", n, args.val_per_class, seed, args.size)
                repo = root / "repo"
                for source in (str(args.trunk), "none"):
                    result = run_train(task, data, repo, source, args, seed)
                    row = {"task": task, "per_class": n, "seed": seed,
                           "from": "trunk" if source != "none" else "scratch", **result}  # fmt: skip
                    print(json.dumps(row), flush=True)
                    rows.append(row)
                    out = {"rows": rows, "trunk": trunk_info, "args": {k: str(v) for k, v in vars(args).items()},
                           "machine": {"python": platform.python_version(), "torch": torch.__version__,
                                       "cpus": os.cpu_count(), "threads": args.threads}}  # fmt: skip
                    args.json.parent.mkdir(parents=True, exist_ok=True)
                    args.json.write_text(json.dumps(out, indent=1) + "\n")  # after every run: partial results too
    print()
    print(table(rows))


def table(rows: list[dict]) -> str:
    """Markdown: one line per (task, size), trunk next to scratch, means over seeds."""
    lines = ["| task | train images / class | metric | from trunk | from scratch | time trunk | time scratch |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    keys = sorted({(r["task"], r["per_class"]) for r in rows}, key=lambda k: (k[0], k[1]))
    for task, n in keys:
        pick = {s: [r for r in rows if (r["task"], r["per_class"], r["from"]) == (task, n, s)]
                for s in ("trunk", "scratch")}  # fmt: skip
        mean = {s: float(np.mean([r["value"] for r in v])) for s, v in pick.items()}
        secs = {s: float(np.mean([r["seconds"] for r in v])) for s, v in pick.items()}
        metric = pick["trunk"][0]["metric"]
        lines.append(f"| {task} | {n} | {metric} | {mean['trunk']:.3f} | {mean['scratch']:.3f} | "
                     f"{secs['trunk']:.0f} s | {secs['scratch']:.0f} s |")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
