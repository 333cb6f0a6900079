"""Reading the datasets users already have, for ``optic export train``: ImageFolder, Ultralytics YAML, COCO
instances and captions JSON, VOC-style segmentation.

``load_dataset`` finds the format from the path, checks every file it will train on (headers, labels, masks) and
returns typed samples that reference their files; images are decoded later with :func:`read_image`. A dataset that
cannot be trained on raises :class:`DatasetError`, one line naming the file and the fault; files it can do without
are skipped and counted in ``Dataset.report`` (or refused with ``strict``). Nothing here writes anything.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from optic.export.datasets.base import (
    CaptionSample,
    ClassificationSample,
    Dataset,
    DatasetError,
    DatasetReport,
    DetectionSample,
    Issue,
    Notes,
    Sample,
    SegmentationSample,
    finish,
)
from optic.export.datasets.coco import coco_kind, load_json, read_coco_captions, read_coco_instances
from optic.export.datasets.imagefolder import read_imagefolder
from optic.export.datasets.images import IMAGE_SUFFIXES, read_image, read_mask
from optic.export.datasets.text import SPECIALS, build_vocab, tokenize
from optic.export.datasets.voc import LAYOUTS as SEGMENTATION_LAYOUTS
from optic.export.datasets.voc import read_segmentation
from optic.export.datasets.yolo import read_yolo
from optic.server.metadata import TASK_NAMES, task_short_name

__all__ = [
    "IMAGE_SUFFIXES",
    "SPECIALS",
    "CaptionSample",
    "ClassificationSample",
    "Dataset",
    "DatasetError",
    "DatasetReport",
    "DetectionSample",
    "Issue",
    "Sample",
    "SegmentationSample",
    "build_vocab",
    "load_dataset",
    "read_image",
    "read_mask",
    "tokenize",
]

LAYOUTS = {
    "classify": "an ImageFolder directory (one sub-folder of images per class, optionally under train/ and val/)",
    "detect": "an Ultralytics dataset .yaml, a COCO instances .json, or a folder holding one of them",
    "segment": f"a folder with {SEGMENTATION_LAYOUTS}",
    "caption": "a COCO captions .json, or a folder with annotations/captions_train*.json",
}
NamesArg = str | os.PathLike[str] | Sequence[str] | None


def _unsupported(task: str, path: Path, what: str) -> DatasetError:
    return DatasetError(f"{path}: {what}; accepted layouts for {TASK_NAMES[task]}: {LAYOUTS[task]}")


def _detection_file(root: Path) -> Path:
    """A folder given for detection: its one dataset YAML, else COCO's ``annotations/instances_train*.json``."""
    yamls = sorted(p for p in (*root.glob("*.yaml"), *root.glob("*.yml")) if not p.name.startswith("."))
    preferred = [p for p in yamls if p.stem in ("data", "dataset")]
    if len(preferred) == 1 or len(yamls) == 1:
        return (preferred or yamls)[0]
    if yamls:
        raise DatasetError(f"{root}: several dataset YAMLs ({', '.join(p.name for p in yamls)}); pass one of them")
    coco = sorted((root / "annotations").glob("instances_train*.json")) or sorted(root.glob("instances_train*.json"))
    if coco:
        return coco[0]
    raise _unsupported("detect", root, "no dataset YAML or annotations/instances_train*.json in this folder")


def _caption_file(root: Path) -> Path:
    found = sorted((root / "annotations").glob("captions_train*.json")) or sorted(root.glob("captions_train*.json"))
    if not found:
        raise _unsupported("caption", root, "no annotations/captions_train*.json in this folder")
    return found[0]


def load_dataset(
    task: str,
    path: str | os.PathLike[str],
    *,
    seed: int = 0,
    val_fraction: float = 0.2,
    strict: bool = False,
    names: NamesArg = None,
    ignore_index: int = 255,
    min_word_count: int = 2,
    images_dir: str | os.PathLike[str] | None = None,
) -> Dataset[Any]:
    """Read the dataset at ``path`` for ``task`` (``classify|detect|segment|caption`` or the long names).

    - ``seed``, ``val_fraction``: draw the val split (stratified per class for classification) when the dataset
      has none of its own; the same seed gives the same split.
    - ``strict``: refuse the dataset at the first unreadable image or missing file instead of skipping it.
    - ``names``: segmentation's class names (a list or a file of one per line); other formats carry their own.
    - ``ignore_index``: the mask value that marks pixels without a label (VOC's 255).
    - ``min_word_count``: captioning's frequency cut, counted on the training split.
    - ``images_dir``: COCO JSON's images folder, when it is not beside the JSON or in COCO's own layout.

    The samples' type follows the task; annotate the result (``ds: Dataset[DetectionSample] = load_dataset(...)``).
    """
    short = task_short_name(task)
    if short not in TASK_NAMES:
        known = f"{', '.join(TASK_NAMES)} (or {', '.join(TASK_NAMES.values())})"
        raise DatasetError(f"unknown task {task!r}; one of {known}")
    if not 0 <= val_fraction < 1:
        raise DatasetError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if not 0 <= ignore_index <= 255:
        raise DatasetError(f"ignore_index must be a mask value 0..255, got {ignore_index}")
    if min_word_count < 1:
        raise DatasetError(f"min_word_count must be at least 1, got {min_word_count}")
    if names is not None and short != "segment":
        raise DatasetError(f"names are only read for segmentation; {TASK_NAMES[short]} takes them from the dataset")
    source = Path(path).absolute()
    if not source.exists():
        raise DatasetError(f"{source}: no such file or directory")
    images = Path(images_dir).absolute() if images_dir is not None else None
    try:
        return _load(short, source, seed, val_fraction, strict, names, ignore_index, min_word_count, images)
    except OSError as exc:  # permissions, a file vanishing mid-read: still one line, not a traceback
        raise DatasetError(f"{exc.filename or source}: {exc.strerror or exc}") from None


def _load(
    short: str,
    source: Path,
    seed: int,
    val_fraction: float,
    strict: bool,
    names: NamesArg,
    ignore_index: int,
    min_word_count: int,
    images: Path | None,
) -> Dataset[Any]:
    notes = Notes(source, strict)

    if short == "classify":
        return finish(short, read_imagefolder(source, notes), notes, seed=seed, val_fraction=val_fraction)
    if short == "segment":
        if not source.is_dir():
            raise _unsupported(short, source, "not a folder")
        found = read_segmentation(source, notes, names, ignore_index)
        return finish(short, found, notes, seed=seed, val_fraction=val_fraction)
    if short == "detect":
        file = _detection_file(source) if source.is_dir() else source
        if file.suffix.lower() in (".yaml", ".yml"):
            return finish(short, read_yolo(file, notes), notes, seed=seed, val_fraction=val_fraction)
        if file.suffix.lower() != ".json":
            raise _unsupported(short, file, "not a .yaml or .json file")
        data = load_json(file)
        kind = coco_kind(data)
        if kind != "instances":
            what = "this is a COCO captions JSON" if kind == "captions" else "no annotations with 'bbox'"
            raise _unsupported(short, file, what)
        found_boxes = read_coco_instances(file, data, notes, images)
        return finish(short, found_boxes, notes, seed=seed, val_fraction=val_fraction)

    file = _caption_file(source) if source.is_dir() else source
    if file.suffix.lower() != ".json":
        raise _unsupported(short, file, "not a .json file")
    data = load_json(file)
    kind = coco_kind(data)
    if kind != "captions":
        what = "this is a COCO instances JSON" if kind == "instances" else "no annotations with a 'caption'"
        raise _unsupported(short, file, what)

    def vocab(train: list[CaptionSample]) -> tuple[str, ...]:
        words = build_vocab((c for s in train for c in s.captions), min_word_count)
        if len(words) == len(SPECIALS):
            raise DatasetError(
                f"{file}: the vocabulary is empty: no word occurs {min_word_count} or more times in the training "
                "captions (lower min_word_count)"
            )
        return words

    found_captions = read_coco_captions(file, data, notes, images)
    return finish(short, found_captions, notes, seed=seed, val_fraction=val_fraction, vocab=vocab)
