"""Classification from an ImageFolder: one sub-folder per class, optionally under ``train/`` and ``val/``.

The torchvision and Ultralytics layout: class ids are the sorted folder names' positions, so the same folders give
the same ids on every machine.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from optic.export.datasets.base import ClassificationSample, Collected, DatasetError, Notes
from optic.export.datasets.images import is_image_file, iter_existing, list_images, subfolders

FORMAT = "ImageFolder"
VAL_FOLDERS = ("val", "valid", "validation")
CLASS_WITHOUT_VAL = "class with no val images"
LOOSE_IMAGE = "image outside any class folder, ignored"
# Folder names that say the directory is a detection or segmentation dataset rather than classes.
_OTHER_LAYOUTS = {"labels", "masks", "annotations", "JPEGImages", "SegmentationClass"}


def _class_folders(folder: Path) -> list[Path]:
    classes = subfolders(folder)
    if not classes:
        raise DatasetError(f"{folder}: no class folders; ImageFolder expects one sub-folder of images per class")
    looks_other = _OTHER_LAYOUTS.intersection(c.name for c in classes)
    if looks_other:
        raise DatasetError(
            f"{folder}: has {', '.join(sorted(looks_other))}/, a detection or segmentation layout, not class "
            "folders; classification reads ImageFolder (one sub-folder of images per class, optionally under "
            "train/ and val/)"
        )
    return classes


def _read_split(folder: Path, names: tuple[str, ...], notes: Notes) -> list[ClassificationSample]:
    samples: list[ClassificationSample] = []
    for loose in sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p)):
        notes.warn(LOOSE_IMAGE, loose)
    for class_dir in _class_folders(folder):
        if class_dir.name not in names:
            raise DatasetError(
                f"{class_dir}: class {class_dir.name!r} is not among the training classes ({', '.join(names)})"
            )
        files = list_images(class_dir)
        if not files:
            raise DatasetError(f"{class_dir}: class folder has no images")
        label = names.index(class_dir.name)
        samples += [ClassificationSample(path, label) for path, _ in iter_existing(files, notes)]
    return samples


def read_imagefolder(root: Path, notes: Notes) -> Collected[ClassificationSample]:
    if not root.is_dir():
        raise DatasetError(f"{root}: classification reads an ImageFolder directory, and this is not a directory")
    train_dir = root / "train"
    val_dir = next((root / v for v in VAL_FOLDERS if (root / v).is_dir()), None)
    if not train_dir.is_dir():
        if val_dir is not None:
            raise DatasetError(f"{root}: has {val_dir.name}/ but no train/ folder")
        train_dir = root
    names = tuple(c.name for c in _class_folders(train_dir))
    train = _read_split(train_dir, names, notes)
    val = _read_split(val_dir, names, notes) if val_dir is not None else None
    if val is not None:
        present = {s.label for s in val}
        for i, name in enumerate(names):
            if i not in present:
                notes.warn(CLASS_WITHOUT_VAL, name)
    k = len(names)
    return Collected(
        format=FORMAT,
        source=root,
        names=names,
        train=train,
        val=val,
        counts=lambda s: np.bincount([s.label], minlength=k),
        class_unit="images",
        strata=lambda s: s.label,
        split_note=f"train/ and {val_dir.name}/ as given" if val_dir is not None else "",
    )
