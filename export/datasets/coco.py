"""COCO JSON: instances (detection, indexed with pycocotools) and captions.

COCO's own layout is ``annotations/instances_train2017.json`` beside ``train2017/``; the validation JSON is the
training one's name with ``train`` replaced by ``val``, and is used as the val split when it exists.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools.coco import COCO

from optic.export.datasets.base import CaptionSample, Collected, DatasetError, DetectionSample, Notes
from optic.export.datasets.images import check_image
from optic.export.datasets.text import tokenize
from optic.export.datasets.yolo import CLIPPED, TOLERANCE, ZERO_AREA

INSTANCES, CAPTIONS = "COCO instances JSON", "COCO captions JSON"
CROWD = "iscrowd annotation skipped"
UNKNOWN_IMAGE = "annotation for an image id not in 'images', ignored"
NO_CAPTIONS = "image without captions skipped"
EMPTY_CAPTION = "empty caption skipped"
_ROUNDING = 1e-3  # pixels: smaller overshoots are float noise from the tool that wrote the JSON


def load_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_bytes())
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read ({exc})") from None
    except UnicodeDecodeError:
        raise DatasetError(f"{path}: not valid JSON (not UTF-8 text)") from None
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a COCO JSON object with 'images' and 'annotations'")
    return data


def coco_kind(data: Mapping[str, Any]) -> str | None:
    """``instances`` or ``captions`` from the first annotation's keys (an empty list: from ``categories``, which
    only instances have), None when that says neither."""
    annotations = data.get("annotations")
    if annotations == []:
        return "instances" if "categories" in data else "captions"
    first = annotations[0] if isinstance(annotations, list) else None
    if isinstance(first, dict):
        if "caption" in first:
            return "captions"
        if "bbox" in first:
            return "instances"
    return None


def _entries(data: Mapping[str, Any], path: Path, key: str, required: tuple[str, ...]) -> list[dict[str, Any]]:
    entries = data.get(key)
    if not isinstance(entries, list):
        raise DatasetError(f"{path}: missing the '{key}' list that a COCO JSON needs")
    for i, entry in enumerate(entries):
        missing = [r for r in required if not isinstance(entry, dict) or r not in entry]
        if missing:
            raise DatasetError(f"{path}: {key}[{i}] has no '{missing[0]}'")
    return entries


def val_json(train_json: Path) -> Path | None:
    """COCO's naming: ``instances_train2017.json`` -> ``instances_val2017.json``, when that file exists."""
    name = train_json.name
    cut = name.rfind("train")
    if cut < 0:
        return None
    sibling = train_json.with_name(name[:cut] + "val" + name[cut + len("train") :])
    return sibling if sibling.is_file() else None


def images_folder(json_path: Path, file_names: list[str], images_dir: Path | None, *, explicit: bool) -> Path:
    """Where the JSON's ``file_name``s are. An ``explicit`` folder is used as is; otherwise the usual places are
    searched (``images_dir``'s neighbour first: the val JSON's images sit beside the training ones)."""
    split = json_path.stem.rsplit("_", 1)[-1]  # instances_train2017 -> train2017
    if images_dir is not None and explicit:
        if not images_dir.is_dir():
            raise DatasetError(f"{images_dir}: images folder does not exist")
        return images_dir
    here, up = json_path.parent, json_path.parent.parent
    hinted = [images_dir.parent / split, images_dir] if images_dir is not None else []
    candidates = [*hinted, here, here / "images", here / split, here / "images" / split, up / split]
    candidates = list(dict.fromkeys([*candidates, up / "images" / split, up / "images", up]))
    for folder in candidates:
        if any((folder / name).is_file() for name in file_names[:5]):
            return folder
    raise DatasetError(
        f"{json_path}: cannot find its images ({file_names[0]!r} is in none of "
        f"{', '.join(str(c) for c in candidates)}); pass the images folder (images_dir)"
    )


def _index(data: dict[str, Any]) -> COCO:
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress lines
        coco.createIndex()
    return coco


def _box_ok(bbox: Any) -> bool:
    return isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)


def _boxes(
    anns: list[dict[str, Any]], size: tuple[int, int], cat_index: dict[int, int], path: Path, image: Path, notes: Notes
) -> tuple[np.ndarray, np.ndarray]:
    """One image's boxes (xyxy pixels) and classes: crowd and zero-area boxes dropped, small overshoots clipped."""
    crowd = np.array([bool(a.get("iscrowd")) for a in anns], dtype=bool)
    if crowd.any():
        notes.warn(CROWD, image, int(crowd.sum()))
    anns = [a for a, c in zip(anns, crowd, strict=True) if not c]
    xywh = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
    xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
    limit = np.array([size[0], size[1], size[0], size[1]], dtype=np.float64)
    outside = np.maximum(-xyxy, xyxy - limit).max(axis=1, initial=-np.inf)
    far = outside > max(1.0, TOLERANCE * max(size))
    if far.any():
        i = int(np.argmax(far))
        x, y, w, h = xywh[i]
        raise DatasetError(
            f"{path}: annotation {anns[i].get('id', '?')} box [{x:g}, {y:g}, {w:g}, {h:g}] lies {outside[i]:.1f} px "
            f"outside {image.name} ({size[0]}x{size[1]})"
        )
    clipped = outside > _ROUNDING
    if clipped.any():
        notes.warn(CLIPPED, image, int(clipped.sum()))
    xyxy = xyxy.clip(0, limit)
    keep = (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])
    if not keep.all():
        notes.warn(ZERO_AREA, image, int((~keep).sum()))
    classes = np.array([cat_index[a["category_id"]] for a in anns], dtype=np.int64)
    return xyxy[keep], classes[keep]


def _detections(
    path: Path, data: dict[str, Any], cat_index: dict[int, int], notes: Notes, images_dir: Path | None, explicit: bool
) -> list[DetectionSample]:
    images = _entries(data, path, "images", ("id", "file_name"))
    annotations = _entries(data, path, "annotations", ("image_id", "category_id", "bbox"))
    if not images:
        raise DatasetError(f"{path}: 'images' is empty")
    for i, ann in enumerate(annotations):
        bbox = ann["bbox"]
        if not _box_ok(bbox) or not all(map(np.isfinite, bbox)):
            raise DatasetError(f"{path}: annotations[{i}] bbox {bbox!r} is not [x, y, width, height]")
        if ann["category_id"] not in cat_index:
            raise DatasetError(
                f"{path}: annotations[{i}] has category_id {ann['category_id']}, which is not in 'categories'"
            )
    known = {img["id"] for img in images}
    orphans = sum(ann["image_id"] not in known for ann in annotations)
    if orphans:
        notes.warn(UNKNOWN_IMAGE, path, orphans)
    coco = _index(data)
    folder = images_folder(path, [str(img["file_name"]) for img in images], images_dir, explicit=explicit)
    samples: list[DetectionSample] = []
    for info in coco.loadImgs(sorted(coco.getImgIds())):
        image = folder / str(info["file_name"])
        size = check_image(image, notes)
        if size is None:
            continue
        if info.get("width") and info.get("height") and (info["width"], info["height"]) != size:
            raise DatasetError(
                f"{image}: the image is {size[0]}x{size[1]} but {path.name} says {info['width']}x{info['height']}"
            )
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[info["id"]]))
        boxes, classes = _boxes(anns, size, cat_index, path, image, notes)
        samples.append(DetectionSample(image, size[0], size[1], boxes, classes))
    return samples


def read_coco_instances(
    json_path: Path, data: dict[str, Any], notes: Notes, images_dir: Path | None
) -> Collected[DetectionSample]:
    """``data`` is ``json_path`` already parsed (its kind was checked): COCO's JSONs are big enough to parse once."""
    categories = _entries(data, json_path, "categories", ("id", "name"))
    if not categories:
        raise DatasetError(f"{json_path}: 'categories' is empty")
    ids = sorted(c["id"] for c in categories)
    by_id = {c["id"]: str(c["name"]) for c in categories}
    names = tuple(by_id[i] for i in ids)
    cat_index = {cat: i for i, cat in enumerate(ids)}  # COCO's ids (1..90 with gaps) -> 0..K-1
    train = _detections(json_path, data, cat_index, notes, images_dir, explicit=True)
    val_path = val_json(json_path)
    val = None
    if val_path is not None:
        val_data = load_json(val_path)
        val_cats = _entries(val_data, val_path, "categories", ("id", "name"))
        if {c["id"]: str(c["name"]) for c in val_cats} != by_id:
            raise DatasetError(f"{val_path}: 'categories' differ from those of {json_path.name}")
        val = _detections(val_path, val_data, cat_index, notes, images_dir, explicit=False)
    k = len(names)
    return Collected(
        format=INSTANCES,
        source=json_path,
        names=names,
        train=train,
        val=val,
        counts=lambda s: np.bincount(s.classes, minlength=k),
        class_unit="instances",
        instance_unit="boxes",
        instances=lambda s: len(s.classes),
        split_note=f"{json_path.name} and {val_path.name} as given" if val_path else "",
    )


def _captioned(
    path: Path, data: dict[str, Any], notes: Notes, images_dir: Path | None, explicit: bool
) -> list[CaptionSample]:
    images = _entries(data, path, "images", ("id", "file_name"))
    annotations = _entries(data, path, "annotations", ("image_id", "caption"))
    captions: dict[Any, list[str]] = {}
    for ann in annotations:
        text = ann["caption"]
        if not isinstance(text, str) or not tokenize(text):
            notes.warn(EMPTY_CAPTION, path)
            continue
        captions.setdefault(ann["image_id"], []).append(" ".join(text.split()))
    if not captions:
        raise DatasetError(f"{path}: has no captions (a COCO captions JSON has annotations[].caption)")
    if not images:
        raise DatasetError(f"{path}: 'images' is empty")
    folder = images_folder(path, [str(img["file_name"]) for img in images], images_dir, explicit=explicit)
    samples = []
    for info in sorted(images, key=lambda img: str(img["file_name"])):
        image = folder / str(info["file_name"])
        if info["id"] not in captions:
            notes.warn(NO_CAPTIONS, image)
        elif check_image(image, notes) is not None:
            samples.append(CaptionSample(image, tuple(captions[info["id"]])))
    return samples


def read_coco_captions(
    json_path: Path, data: dict[str, Any], notes: Notes, images_dir: Path | None
) -> Collected[CaptionSample]:
    train = _captioned(json_path, data, notes, images_dir, explicit=True)
    val_path = val_json(json_path)
    val = _captioned(val_path, load_json(val_path), notes, images_dir, explicit=False) if val_path else None
    return Collected(
        format=CAPTIONS,
        source=json_path,
        names=(),
        train=train,
        val=val,
        instance_unit="captions",
        instances=lambda s: len(s.captions),
        split_note=f"{json_path.name} and {val_path.name} as given" if val_path else "",
    )
