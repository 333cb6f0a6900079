"""Write small datasets in the formats ``optic export train`` reads, from the synthetic scenes, with chosen defects.

Every writer puts scene ``i`` of :func:`scenes` (train first, then val) in file ``{i:04d}``; a file that carries a
defect is named ``{i:04d}_{defect}``, so a test can check that an error or warning names it. Defects go to training
files 1, 2, 3, ... in the order they are given. Each writer returns the path to hand to ``load_dataset``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

from optic.export.data import SHAPES, Scene, make_scenes

SIZE = 64
SEG_NAMES = ("background", *SHAPES)  # mask value v is class SEG_NAMES[v]; 255 is void (VOC)


def scenes(n_train: int, n_val: int, seed: int = 0, size: int = SIZE) -> tuple[list[Scene], list[Scene]]:
    """The scenes every writer draws its train and val files from: the same arguments, the same scenes."""
    return make_scenes(n_train, seed, size=size), make_scenes(n_val, seed, start=n_train, size=size)


def _tagged(defects: Iterable[str], allowed: set[str], per_file: set[str]) -> dict[int, str]:
    """Check the defect names, and give each per-file defect its own training file: {index: defect}."""
    defects = list(defects)
    unknown = set(defects) - allowed
    if unknown:
        raise ValueError(f"unknown defect(s) {sorted(unknown)}; this writer knows {sorted(allowed)}")
    return {i + 1: d for i, d in enumerate(d for d in defects if d in per_file)}


def _stem(i: int, tagged: dict[int, str]) -> str:
    return f"{i:04d}_{tagged[i]}" if i in tagged else f"{i:04d}"


def save_image(array: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, quality=95) if path.suffix == ".jpg" else Image.fromarray(array).save(path)
    return path


def truncate(path: Path) -> Path:
    """Keep the first half of the file: the header still opens, the pixels do not decode."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _write_image(scene: Scene, folder: Path, stem: str, ext: str) -> Path:
    """The scene's image; a ``truncated_image`` or ``not_an_image`` stem gets the defect it names."""
    if stem.endswith("truncated_image"):
        return truncate(save_image(scene.image, folder / f"{stem}.jpg"))
    path = save_image(scene.image, folder / f"{stem}{ext}")
    if stem.endswith("not_an_image"):
        path.write_bytes(b"this is not an image\n")
    return path


# ---------------------------------------------------------------- classification

IMAGEFOLDER_DEFECTS = {"truncated_image", "not_an_image", "empty_class", "loose_image"}


def write_imagefolder(
    root: Path,
    n_train: int = 40,
    n_val: int = 10,
    seed: int = 0,
    *,
    size: int = SIZE,
    split_folders: bool = True,
    ext: str = ".png",
    defects: Sequence[str] = (),
) -> Path:
    """``train/<shape>/`` and ``val/<shape>/`` (labels: each scene's main shape); with ``split_folders=False`` all
    ``n_train + n_val`` images go straight into ``<shape>/``. ``empty_class`` adds an empty ``train/empty_class/``;
    ``loose_image`` an image beside the class folders."""
    tagged = _tagged(defects, IMAGEFOLDER_DEFECTS, {"truncated_image", "not_an_image"})
    train, val = scenes(n_train, n_val, seed, size)
    top = root / "train" if split_folders else root
    for i, scene in enumerate(train if split_folders else train + val):
        _write_image(scene, top / SHAPES[scene.label], _stem(i, tagged), ext)
    if split_folders:
        for i, scene in enumerate(val, start=n_train):
            _write_image(scene, root / "val" / SHAPES[scene.label], _stem(i, {}), ext)
    if "empty_class" in defects:
        (top / "empty_class").mkdir(parents=True)
    if "loose_image" in defects:
        save_image(train[0].image, top / "loose_image.png")
    return root


# ---------------------------------------------------------------- detection


def yolo_row(cls: int, box: Sequence[float], size: int) -> str:
    x1, y1, x2, y2 = box
    return f"{cls} {(x1 + x2) / 2 / size:.6f} {(y1 + y2) / 2 / size:.6f} {(x2 - x1) / size:.6f} {(y2 - y1) / size:.6f}"


# The extra label row each label defect appends (5 classes).
YOLO_ROWS = {
    "box_out_of_range": "0 1.1 0.5 0.2 0.2",  # x2 = 1.2: far outside
    "box_slightly_outside": "1 0.9975 0.5 0.01 0.2",  # x2 = 1.0025: within tolerance, clipped
    "zero_area_box": "2 0.5 0.5 0 0.2",
    "bad_class_id": "7 0.5 0.5 0.2 0.2",
    "negative_class_id": "-1 0.5 0.5 0.2 0.2",
    "bad_label_line": "0 0.5 0.5 0.2",
}
YOLO_DEFECTS = {*YOLO_ROWS, "truncated_image", "missing_label", "missing_names", "missing_train"}


def write_yolo(
    root: Path,
    n_train: int = 40,
    n_val: int = 10,
    seed: int = 0,
    *,
    size: int = SIZE,
    names_as: str = "list",
    list_files: bool = False,
    defects: Sequence[str] = (),
) -> Path:
    """``images/{train,val}/*.png``, ``labels/{train,val}/*.txt`` and ``data.yaml`` (``path: .``); returns the YAML.
    ``names_as="dict"`` writes ``{id: name}``; ``list_files`` lists the images in ``train.txt``/``val.txt``;
    ``n_val=0`` leaves ``val`` out of the YAML."""
    tagged = _tagged(defects, YOLO_DEFECTS, {*YOLO_ROWS, "truncated_image", "missing_label"})
    train, val = scenes(n_train, n_val, seed, size)
    config: dict[str, Any] = {"path": "."}
    for split, items, start in (("train", train, 0), ("val", val, n_train)):
        if not items:
            continue
        paths = []
        for i, scene in enumerate(items, start=start):
            stem = _stem(i, tagged if split == "train" else {})
            paths.append(_write_image(scene, root / "images" / split, stem, ".png"))
            rows = [yolo_row(o.class_id, o.bbox, size) for o in scene.objects]
            defect = tagged.get(i) if split == "train" else None
            if defect in YOLO_ROWS:
                rows.append(YOLO_ROWS[defect])
            if defect != "missing_label":
                label = root / "labels" / split / f"{stem}.txt"
                label.parent.mkdir(parents=True, exist_ok=True)
                label.write_text("\n".join(rows) + "\n")
        if list_files:
            (root / f"{split}.txt").write_text("".join(f"./{p.relative_to(root)}\n" for p in paths))
            config[split] = f"{split}.txt"
        else:
            config[split] = f"images/{split}"
    config["names"] = dict(enumerate(SHAPES)) if names_as == "dict" else list(SHAPES)
    for key in ("names", "train"):
        if f"missing_{key}" in defects:
            del config[key]
    path = root / "data.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


CATEGORY_IDS = [10 * (c + 1) for c in range(len(SHAPES))]
# The extra annotation each box defect adds: class, [x, y, w, h] (negative x: from the right edge), iscrowd.
COCO_BOXES: dict[str, tuple[int, list[float], int]] = {
    "crowd_box": (0, [1.0, 1.0, 20.0, 20.0], 1),
    "zero_area_box": (1, [5.0, 5.0, 0.0, 10.0], 0),
    "box_out_of_range": (2, [-10.0, 5.0, 30.0, 10.0], 0),  # 20 px past the right edge
    "box_slightly_outside": (3, [-10.0, 5.0, 10.4, 10.0], 0),  # 0.4 px past it: clipped
}  # gaps, as in COCO: the reader must remap them to 0..4
COCO_DEFECTS = {
    "truncated_image",
    "missing_image",
    "crowd_box",
    "zero_area_box",
    "box_out_of_range",
    "box_slightly_outside",
    "bad_category",
    "size_mismatch",
    "bad_json",
    "missing_categories",
}


def _coco_images(
    root: Path, split: str, items: list[Scene], start: int, tagged: dict[int, str]
) -> tuple[list[dict[str, Any]], list[Path]]:
    images, paths = [], []
    for i, scene in enumerate(items, start=start):
        path = _write_image(scene, root / split, _stem(i, tagged), ".png")
        if tagged.get(i) == "missing_image":
            path.unlink()
        h, w = scene.mask.shape
        if tagged.get(i) == "size_mismatch":
            w += 10
        images.append({"id": i + 1, "file_name": path.name, "width": w, "height": h})
        paths.append(path)
    return images, paths


def _write_json(path: Path, data: dict[str, Any], broken: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data)
    path.write_text(text[: len(text) // 2] if broken else text)
    return path


def write_coco_instances(
    root: Path, n_train: int = 40, n_val: int = 10, seed: int = 0, *, size: int = SIZE, defects: Sequence[str] = ()
) -> Path:
    """COCO's layout: ``annotations/instances_{train,val}.json`` and the images in ``train/``, ``val/``; category
    ids 10, 20, ... listed in reverse order. Returns the training JSON."""
    per_file = COCO_DEFECTS - {"bad_json", "missing_categories"}
    tagged = _tagged(defects, COCO_DEFECTS, per_file)
    train, val = scenes(n_train, n_val, seed, size)
    categories = [{"id": CATEGORY_IDS[c], "name": s, "supercategory": "shape"} for c, s in enumerate(SHAPES)][::-1]
    out = root / "annotations" / "instances_train.json"
    for split, items, start in (("train", train, 0), ("val", val, n_train)):
        if not items:
            continue
        marks = tagged if split == "train" else {}
        images, _ = _coco_images(root, split, items, start, marks)
        boxes: list[tuple[int, int, list[float], int]] = []  # image id, class, [x, y, w, h], iscrowd
        for i, scene in enumerate(items, start=start):
            boxes += [
                (i + 1, o.class_id, [o.bbox[0], o.bbox[1], o.bbox[2] - o.bbox[0], o.bbox[3] - o.bbox[1]], 0)
                for o in scene.objects
            ]
            if marks.get(i) in COCO_BOXES:
                cls, box, crowd = COCO_BOXES[marks[i]]
                boxes.append((i + 1, cls, [v if v >= 0 else size + v for v in box], crowd))
        annotations = [
            {
                "id": n + 1,
                "image_id": image_id,
                "category_id": CATEGORY_IDS[cls],
                "bbox": box,
                "area": box[2] * box[3],
                "iscrowd": crowd,
            }
            for n, (image_id, cls, box, crowd) in enumerate(boxes)
        ]
        bad = [i + 1 for i, d in marks.items() if d == "bad_category"]
        annotations += [{**annotations[0], "id": len(annotations) + 1, "image_id": j, "category_id": 99} for j in bad]
        data = {"images": images, "annotations": annotations, "categories": categories}
        if "missing_categories" in defects:
            del data["categories"]
        path = _write_json(root / "annotations" / f"instances_{split}.json", data, "bad_json" in defects)
        out = path if split == "train" else out
    return out


# ---------------------------------------------------------------- segmentation


def voc_palette() -> list[int]:
    """Pascal VOC's colour map: what makes its masks viewable, and what a reader must not decode to colours."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


def save_mask(mask: np.ndarray, path: Path) -> Path:
    """An index PNG, mode 'P' with VOC's palette, as VOC's SegmentationClass masks are."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(mask.astype(np.uint8), "P")
    img.putpalette(voc_palette())
    img.save(path)
    return path


SEGMENTATION_DEFECTS = {"truncated_image", "missing_mask", "mask_wrong_size", "mask_bad_value", "rgb_mask"}


def _scene_mask(scene: Scene, defect: str | None, void_border: bool) -> np.ndarray:
    mask = scene.mask.copy()
    if void_border:
        mask[0, :] = 255
    if defect == "mask_wrong_size":
        mask = np.pad(mask, ((0, 4), (0, 0)))
    elif defect == "mask_bad_value":
        mask[1, 1] = len(SEG_NAMES) + 3
    return mask


def _write_pair(scene: Scene, image_dir: Path, mask_dir: Path, stem: str, defect: str | None, void: bool) -> None:
    _write_image(scene, image_dir, stem, ".jpg" if image_dir.name == "JPEGImages" else ".png")
    if defect == "missing_mask":
        return
    mask = _scene_mask(scene, defect, void)
    if defect == "rgb_mask":
        colours = np.array(voc_palette(), np.uint8).reshape(-1, 3)
        save_image(colours[mask], mask_dir / f"{stem}.png")
    else:
        save_mask(mask, mask_dir / f"{stem}.png")


def write_voc(
    root: Path,
    n_train: int = 40,
    n_val: int = 10,
    seed: int = 0,
    *,
    size: int = SIZE,
    image_sets: bool = True,
    names_file: bool = True,
    void_border: bool = False,
    defects: Sequence[str] = (),
) -> Path:
    """VOC's layout: ``JPEGImages/*.jpg``, ``SegmentationClass/*.png`` (mode P, VOC palette, 0 background, 1 + shape
    id), ``ImageSets/Segmentation/{train,val}.txt`` unless ``image_sets=False``, and ``labels.txt`` (SEG_NAMES)
    unless ``names_file=False``. ``void_border`` marks the top row 255 (VOC's void)."""
    tagged = _tagged(defects, SEGMENTATION_DEFECTS, SEGMENTATION_DEFECTS)
    train, val = scenes(n_train, n_val, seed, size)
    sets = root / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    for split, items, start in (("train", train, 0), ("val", val, n_train)):
        stems = []
        for i, scene in enumerate(items, start=start):
            marks = tagged if split == "train" else {}
            stems.append(_stem(i, marks))
            _write_pair(scene, root / "JPEGImages", root / "SegmentationClass", stems[-1], marks.get(i), void_border)
        if image_sets and items:
            (sets / f"{split}.txt").write_text("".join(f"{s}\n" for s in stems))
    if names_file:
        (root / "labels.txt").write_text("\n".join(SEG_NAMES) + "\n")
    return root


def write_mask_pairs(
    root: Path,
    n_train: int = 40,
    n_val: int = 10,
    seed: int = 0,
    *,
    size: int = SIZE,
    split_folders: bool = True,
    names_file: bool = True,
    defects: Sequence[str] = (),
) -> Path:
    """``images/{train,val}/*.png`` beside ``masks/{train,val}/*.png`` (or all in ``images/``, ``masks/`` with
    ``split_folders=False``), and ``classes.txt``."""
    tagged = _tagged(defects, SEGMENTATION_DEFECTS, SEGMENTATION_DEFECTS)
    train, val = scenes(n_train, n_val, seed, size)
    for split, items, start in (("train", train, 0), ("val", val, n_train)):
        sub = split if split_folders else ""
        for i, scene in enumerate(items, start=start):
            marks = tagged if split == "train" else {}
            _write_pair(scene, root / "images" / sub, root / "masks" / sub, _stem(i, marks), marks.get(i), False)
    if names_file:
        (root / "classes.txt").write_text("\n".join(SEG_NAMES) + "\n")
    return root


# ---------------------------------------------------------------- captioning

CAPTION_DEFECTS = {"truncated_image", "image_without_captions", "empty_caption", "no_captions", "bad_json"}
VAL_ONLY_WORD = "zebra"


def caption_texts(scene: Scene) -> list[str]:
    """Two captions per image, one with the capitals and punctuation that tokenisation removes."""
    return [scene.caption, scene.caption.capitalize() + "."]


def write_coco_captions(
    root: Path,
    n_train: int = 40,
    n_val: int = 10,
    seed: int = 0,
    *,
    size: int = SIZE,
    val_only_word: bool = False,
    defects: Sequence[str] = (),
) -> Path:
    """``annotations/captions_{train,val}.json`` and the images in ``train/``, ``val/``; returns the training JSON.
    ``val_only_word`` adds a val caption full of VAL_ONLY_WORD, which the vocabulary (train only) must not hold."""
    tagged = _tagged(defects, CAPTION_DEFECTS, {"truncated_image", "image_without_captions", "empty_caption"})
    train, val = scenes(n_train, n_val, seed, size)
    out = root / "annotations" / "captions_train.json"
    for split, items, start in (("train", train, 0), ("val", val, n_train)):
        if not items:
            continue
        marks = tagged if split == "train" else {}
        images, _ = _coco_images(root, split, items, start, marks)
        annotations: list[dict[str, Any]] = []
        for i, scene in enumerate(items, start=start):
            texts = [] if marks.get(i) == "image_without_captions" else caption_texts(scene)
            if marks.get(i) == "empty_caption":
                texts.append(" ?! ")
            if split == "val" and val_only_word:
                texts.append(f"a {VAL_ONLY_WORD} {VAL_ONLY_WORD} {VAL_ONLY_WORD}")
            if "no_captions" in defects:
                texts = []
            annotations += [{"id": len(annotations) + 1, "image_id": i + 1, "caption": t} for t in texts]
        path = _write_json(
            root / "annotations" / f"captions_{split}.json",
            {"images": images, "annotations": annotations},
            "bad_json" in defects,
        )
        out = path if split == "train" else out
    return out
