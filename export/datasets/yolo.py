"""Detection from an Ultralytics dataset YAML: ``path``, ``train``, ``val``, ``names``, and one ``labels/*.txt`` of
normalised ``class cx cy w h`` rows per image.

Paths and label files follow Ultralytics' own rules, so a dataset that trains there reads here unchanged.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from optic.export.datasets.base import Collected, DatasetError, DetectionSample, Notes, read_lines
from optic.export.datasets.images import IMAGE_SUFFIXES, iter_existing, list_images

FORMAT = "Ultralytics YAML"
TOLERANCE = 0.01  # normalised coordinates this far outside [0, 1] are clipped (Ultralytics allows 1%)
_ROUNDING = 1e-6  # below this, being outside [0, 1] is float formatting, not worth a warning
CLIPPED = "box slightly outside the image, clipped"
ZERO_AREA = "zero-area box skipped"
NO_LABEL_FILE = "image without a label file (no objects)"
SHARED = "image in both train and val"


def label_path(image: Path) -> Path:
    """Ultralytics' rule: the last ``/images/`` component becomes ``/labels/`` and the suffix ``.txt``."""
    a, b = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    return Path(b.join(str(image).rsplit(a, 1)).rsplit(".", 1)[0] + ".txt")


def load_yaml(path: Path) -> Any:
    try:
        yaml = importlib.import_module("yaml")  # PyYAML: imported here so other formats do not need it
    except ImportError:
        raise DatasetError(f"{path}: reading an Ultralytics YAML needs PyYAML (pip install pyyaml)") from None
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read ({exc})") from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise DatasetError(f"{path}: not valid YAML{at}: {getattr(exc, 'problem', None) or exc}") from None


def parse_names(value: Any, where: str) -> tuple[str, ...]:
    """``names`` as a list, or as ``{id: name}`` with ids 0..K-1 (Ultralytics writes both)."""
    if isinstance(value, Mapping):
        try:
            ids = sorted(int(k) for k in value)
        except (TypeError, ValueError):
            raise DatasetError(f"{where}: 'names' keys must be class ids 0..K-1") from None
        if ids != list(range(len(ids))):
            raise DatasetError(f"{where}: 'names' ids must be 0..{len(ids) - 1} without gaps, got {ids}")
        by_id = {int(k): v for k, v in value.items()}
        value = [by_id[i] for i in ids]
    if not isinstance(value, list) or not value or not all(isinstance(n, (str, int, float)) for n in value):
        raise DatasetError(f"{where}: 'names' must be a non-empty list of class names or a {{id: name}} mapping")
    return tuple(str(n) for n in value)


def _image_files(value: Any, root: Path, key: str, yaml_path: Path) -> list[Path]:
    """``train``/``val``: an images folder, a .txt list of image paths, one image, or a list of those."""
    entries = value if isinstance(value, list) else [value]
    files: list[Path] = []
    for entry in entries:
        if not isinstance(entry, str):
            raise DatasetError(f"{yaml_path}: '{key}' must be a path or a list of paths, got {entry!r}")
        p = root / entry
        if p.is_dir():
            found = list_images(p)
            if not found:
                raise DatasetError(f"{p}: the '{key}' folder has no images")
            files += found
        elif p.is_file() and p.suffix.lower() == ".txt":
            # Relative lines (./images/a.jpg) are relative to the list's folder, as in Ultralytics' coco.yaml.
            files += [p.parent / x for x in read_lines(p) if Path(x).suffix.lower() in IMAGE_SUFFIXES]
        elif p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
            files.append(p)
        else:
            raise DatasetError(f"{yaml_path}: '{key}' path {p} does not exist")
    return sorted(set(files))


def _rows(path: Path, k: int) -> tuple[np.ndarray, list[int]]:
    """(N, 5) class, cx, cy, w, h and each row's line number; polygon rows (Ultralytics segment labels) become
    their bounding boxes."""
    rows: list[list[float]] = []
    numbers: list[int] = []
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise DatasetError(f"{path}: not UTF-8 text") from None
    for number, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        where = f"{path}:{number}"
        try:
            values = [float(v) for v in parts]
        except ValueError:
            values = []
        polygon = len(values) >= 7 and len(values) % 2 == 1
        if not values or not np.isfinite(values).all() or (len(values) != 5 and not polygon):
            raise DatasetError(f"{where}: expected 5 numbers 'class cx cy w h' (or a polygon), got {line.strip()!r}")
        cls = values[0]
        if cls != int(cls) or not 0 <= cls < k:
            raise DatasetError(f"{where}: class id {parts[0]} is not one of the {k} classes in 'names' (0..{k - 1})")
        if len(values) > 5:
            xy = np.array(values[1:]).reshape(-1, 2)
            (x1, y1), (x2, y2) = xy.min(0), xy.max(0)
            values = [cls, (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1]
        rows.append(values)
        numbers.append(number)
    return np.array(rows, dtype=np.float64).reshape(-1, 5), numbers


def read_labels(path: Path, width: int, height: int, k: int, notes: Notes) -> tuple[np.ndarray, np.ndarray]:
    """Boxes (x1, y1, x2, y2 pixels) and classes of one label file, checked against the image's size."""
    rows, numbers = _rows(path, k)
    cx, cy, w, h = rows[:, 1], rows[:, 2], rows[:, 3], rows[:, 4]
    xyxy = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
    outside = np.maximum(-xyxy, xyxy - 1).max(axis=1, initial=-np.inf) if len(xyxy) else np.zeros(0)
    if (outside > TOLERANCE).any():
        first = int(np.argmax(outside > TOLERANCE))
        raise DatasetError(
            f"{path}:{numbers[first]}: the box reaches {outside[first]:.3f} outside the image; coordinates must be "
            "normalised to [0, 1] (class cx cy w h divided by the image's width and height)"
        )
    if (outside > _ROUNDING).any():
        notes.warn(CLIPPED, path, int((outside > _ROUNDING).sum()))
    boxes = xyxy.clip(0, 1) * [width, height, width, height]
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    if not keep.all():
        notes.warn(ZERO_AREA, path, int((~keep).sum()))
    return boxes[keep].astype(np.float32), rows[keep, 0].astype(np.int64)


def _samples(files: list[Path], k: int, notes: Notes) -> tuple[list[DetectionSample], int]:
    samples: list[DetectionSample] = []
    labelled = 0
    for image, (width, height) in iter_existing(files, notes):
        label = label_path(image)
        if label.is_file():
            labelled += 1
            boxes, classes = read_labels(label, width, height, k, notes)
        else:
            notes.warn(NO_LABEL_FILE, image)
            boxes, classes = np.zeros((0, 4), np.float32), np.zeros(0, np.int64)
        samples.append(DetectionSample(image, width, height, boxes, classes))
    return samples, labelled


def read_yolo(yaml_path: Path, notes: Notes) -> Collected[DetectionSample]:
    data = load_yaml(yaml_path)
    if not isinstance(data, Mapping):
        raise DatasetError(f"{yaml_path}: expected a mapping with 'path', 'train', 'val' and 'names'")
    for key in ("names", "train"):
        if not data.get(key):
            raise DatasetError(f"{yaml_path}: missing '{key}'; an Ultralytics dataset YAML needs 'train' and 'names'")
    names = parse_names(data["names"], str(yaml_path))
    if "nc" in data and data["nc"] != len(names):
        raise DatasetError(f"{yaml_path}: 'nc' is {data['nc']} but 'names' has {len(names)} entries")
    root = Path(str(data.get("path") or "."))
    root = root if root.is_absolute() else yaml_path.parent / root
    if not root.is_dir():
        raise DatasetError(f"{yaml_path}: 'path' {root} is not a folder")
    train_files = _image_files(data["train"], root, "train", yaml_path)
    val_files = _image_files(data["val"], root, "val", yaml_path) if data.get("val") else None
    if val_files is not None:
        shared = set(train_files).intersection(val_files)
        for path in sorted(shared):
            notes.warn(SHARED, path)
    k = len(names)
    train, labelled = _samples(train_files, k, notes)
    val, val_labelled = _samples(val_files, k, notes) if val_files is not None else (None, 0)
    if train and not labelled + val_labelled:
        raise DatasetError(
            f"{yaml_path}: none of the {len(train_files)} training images has a label file; labels are looked "
            f"for at {label_path(train[0].path)} (the last /images/ replaced by /labels/, suffix .txt)"
        )
    return Collected(
        format=FORMAT,
        source=yaml_path,
        names=names,
        train=train,
        val=val,
        counts=lambda s: np.bincount(s.classes, minlength=k),
        class_unit="instances",
        instance_unit="boxes",
        instances=lambda s: len(s.classes),
        split_note="train/val as given in the YAML",
    )
