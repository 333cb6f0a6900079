"""Segmentation from image + index-PNG mask pairs: Pascal VOC's layout, or ``images/`` beside ``masks/``.

Masks are read once here, not only their headers: a value that is no class id or a mask of the wrong size would
otherwise surface as a crash (or silent garbage) in the loss, hours in; the read also gives per-class pixel counts.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from optic.export.datasets.base import Collected, DatasetError, Notes, SegmentationSample, read_lines
from optic.export.datasets.images import IMAGE_SUFFIXES, MISSING_IMAGE, check_image, list_images, read_mask

VOC, PAIRS = "VOC segmentation", "images/ + masks/ pairs"
NAME_FILES = ("labels.txt", "classes.txt", "names.txt", "class_names.txt")
NO_MASK = "image without a mask skipped"
UNREADABLE_MASK = "unreadable mask"
LAYOUTS = (
    "JPEGImages/ + SegmentationClass/ (VOC, optional ImageSets/Segmentation/train.txt, val.txt) or images/ + masks/"
)


def read_names(source: str | os.PathLike[str] | Sequence[str] | None, root: Path) -> tuple[str, ...]:
    """Class names by id: a list, a file of one name per line, or a names file found in the dataset folder."""
    if source is None:
        found = next((root / f for f in NAME_FILES if (root / f).is_file()), None)
        if found is None:
            raise DatasetError(
                f"{root}: segmentation needs class names (id 0 first, usually background): pass names "
                f"or put one name per line in {root / NAME_FILES[0]}"
            )
        source = found
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise DatasetError(f"{path}: class names file does not exist")
        names = tuple(read_lines(path))
        where = str(path)
    else:
        names, where = tuple(str(n) for n in source), "names"
    if not names:
        raise DatasetError(f"{where}: no class names")
    if len(set(names)) != len(names):
        repeated = sorted({n for n in names if names.count(n) > 1})
        raise DatasetError(f"{where}: class names repeat: {', '.join(repeated)}")
    return names


def _voc_image(folder: Path, stem: str) -> Path:
    return next(
        (folder / (stem + s) for s in (".jpg", *sorted(IMAGE_SUFFIXES)) if (folder / (stem + s)).is_file()),
        folder / f"{stem}.jpg",
    )


def _voc_pairs(root: Path) -> tuple[list[tuple[Path, Path]], list[tuple[Path, Path]] | None, str]:
    images, masks, sets = root / "JPEGImages", root / "SegmentationClass", root / "ImageSets" / "Segmentation"

    def pairs(stems: list[str]) -> list[tuple[Path, Path]]:
        return [(_voc_image(images, s), masks / f"{s}.png") for s in stems]

    def listed(name: str) -> list[str] | None:
        path = sets / name
        if not path.is_file():
            return None
        return sorted({line.split()[0] for line in read_lines(path)})

    train, val = listed("train.txt"), listed("val.txt")
    if train is not None:
        return pairs(train), pairs(val) if val is not None else None, "ImageSets/Segmentation train.txt/val.txt"
    stems = sorted(p.stem for p in masks.glob("*.png") if not p.name.startswith("."))
    return pairs(stems), None, ""


def _folder_pairs(root: Path) -> tuple[list[tuple[Path, Path]], list[tuple[Path, Path]] | None, str]:
    images, masks = root / "images", root / "masks"

    def pairs(folder: Path) -> list[tuple[Path, Path]]:
        return [(p, (masks / p.relative_to(images)).with_suffix(".png")) for p in list_images(folder)]

    if (images / "train").is_dir():
        val_dir = images / "val"
        return pairs(images / "train"), pairs(val_dir) if val_dir.is_dir() else None, "images/train, images/val"
    return pairs(images), None, ""


def read_segmentation(
    root: Path, notes: Notes, names: str | os.PathLike[str] | Sequence[str] | None, ignore_index: int
) -> Collected[SegmentationSample]:
    if (root / "JPEGImages").is_dir() and (root / "SegmentationClass").is_dir():
        fmt, (train_pairs, val_pairs, split_note) = VOC, _voc_pairs(root)
    elif (root / "images").is_dir() and (root / "masks").is_dir():
        fmt, (train_pairs, val_pairs, split_note) = PAIRS, _folder_pairs(root)
    else:
        raise DatasetError(f"{root}: not a segmentation dataset; accepted layouts: {LAYOUTS}")
    labels = read_names(names, root)
    k = len(labels)
    pixels: dict[Path, np.ndarray] = {}

    def read(pairs: list[tuple[Path, Path]]) -> list[SegmentationSample]:
        samples = []
        for image, mask_path in pairs:
            if not image.is_file():
                notes.skip(MISSING_IMAGE, image)
                continue
            if not mask_path.is_file():
                notes.skip(NO_MASK, image, f"no {mask_path.name}")
                continue
            size = check_image(image, notes)
            if size is None:
                continue
            try:
                mask = read_mask(mask_path)
            except DatasetError:
                raise
            except Exception as exc:  # any Pillow failure: the pair cannot be trained on
                notes.skip(UNREADABLE_MASK, mask_path, f"{type(exc).__name__}: {exc}")
                continue
            width, height = size
            if mask.shape != (height, width):
                raise DatasetError(
                    f"{mask_path}: the mask is {mask.shape[1]}x{mask.shape[0]} but its image {image.name} is "
                    f"{width}x{height}"
                )
            hist = np.bincount(mask.ravel(), minlength=256)
            bad = [v for v in np.flatnonzero(hist[k:]) + k if v != ignore_index]
            if bad:
                shown = ", ".join(str(v) for v in bad[:5])
                raise DatasetError(
                    f"{mask_path}: mask values {shown} are not class ids (0..{k - 1} for {k} names) nor the "
                    f"ignore index {ignore_index}"
                )
            counts = hist[:k].copy()
            if ignore_index < k:
                counts[ignore_index] = 0  # ignored pixels are not that class's
            pixels[mask_path] = counts
            samples.append(SegmentationSample(image, mask_path, width, height))
        return samples

    train = read(train_pairs)
    val = read(val_pairs) if val_pairs is not None else None
    return Collected(
        format=fmt,
        source=root,
        names=labels,
        train=train,
        val=val,
        counts=lambda s: pixels[s.mask_path],
        class_unit="pixels",
        instance_unit="labelled pixels",
        instances=lambda s: int(pixels[s.mask_path].sum()),
        split_note=f"{split_note} as given",
    )
