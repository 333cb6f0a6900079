"""The dataset layer of `optic export train`: every format read right, splits deterministic, and every bad dataset
answered with one line that names the file (or a counted warning), never a traceback."""

from __future__ import annotations

import functools
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from optic.export.data import SHAPES, Scene
from optic.export.datasets import (
    SPECIALS,
    DatasetError,
    build_vocab,
    load_dataset,
    read_image,
    read_mask,
    tokenize,
)
from optic.export.datasets.base import val_count
from tests.dataset_writers import (
    SEG_NAMES,
    VAL_ONLY_WORD,
    caption_texts,
    save_mask,
    scenes,
    write_coco_captions,
    write_coco_instances,
    write_imagefolder,
    write_mask_pairs,
    write_voc,
    write_yolo,
)


@functools.cache
def _all_scenes(n_train: int, n_val: int, seed: int) -> list[Scene]:
    train, val = scenes(n_train, n_val, seed)
    return train + val


def scene_of(path: Path, n_train: int = 40, n_val: int = 10, seed: int = 0) -> Scene:
    """The scene a writer put in ``path`` (files are named by the scene's index)."""
    return _all_scenes(n_train, n_val, seed)[int(path.stem[:4])]


def paths(samples: tuple) -> list[str]:
    return [s.path.name for s in samples]


# ---------------------------------------------------------------- formats read right


def test_imagefolder_with_split_folders(tmp_path: Path) -> None:
    ds = load_dataset("classify", write_imagefolder(tmp_path))
    train, _ = scenes(40, 10)
    assert ds.names == tuple(sorted({SHAPES[s.label] for s in train}))
    assert (len(ds.train), len(ds.val)) == (40, 10)
    for sample in ds.train + ds.val:
        assert ds.names[sample.label] == SHAPES[scene_of(sample.path).label]
    assert sum(ds.report.class_counts["val"]) == 10
    assert "train/ and val/ as given" in ds.report.split
    np.testing.assert_array_equal(read_image(ds.train[0].path), scene_of(ds.train[0].path).image)


def test_imagefolder_without_val_is_split_per_class_and_deterministically(tmp_path: Path) -> None:
    root = write_imagefolder(tmp_path, split_folders=False)
    ds = load_dataset("classification", root, seed=3)  # the long task name works too
    again = load_dataset("classify", root, seed=3)
    other = load_dataset("classify", root, seed=4)
    assert (paths(ds.train), paths(ds.val)) == (paths(again.train), paths(again.val))
    assert paths(ds.val) != paths(other.val)
    assert not set(paths(ds.train)) & set(paths(ds.val))
    assert len(ds.train) + len(ds.val) == 50
    per_class = Counter(s.label for s in ds.train + ds.val)
    assert Counter(s.label for s in ds.val) == {c: val_count(n, 0.2) for c, n in per_class.items()}
    assert "seed 3" in ds.report.split and "stratified" in ds.report.split
    assert [s.path for s in ds.train] == sorted(s.path for s in ds.train)


@pytest.mark.parametrize("variant", [{}, {"names_as": "dict"}, {"list_files": True}])
def test_yolo_boxes_match_the_scenes(tmp_path: Path, variant: dict) -> None:
    ds = load_dataset("detect", write_yolo(tmp_path, **variant))
    assert ds.names == SHAPES
    assert (len(ds.train), len(ds.val)) == (40, 10)
    for sample in ds.train + ds.val:
        scene = scene_of(sample.path)
        assert (sample.width, sample.height) == (64, 64)
        assert sample.boxes.dtype == np.float32 and sample.classes.dtype == np.int64
        np.testing.assert_allclose(sample.boxes, [o.bbox for o in scene.objects], atol=1e-3)
        assert sample.classes.tolist() == [o.class_id for o in scene.objects]
        assert not sample.boxes.flags.writeable
    assert ds.report.instances["train"] == sum(len(scene_of(s.path).objects) for s in ds.train)


def test_yolo_without_val_is_split_by_seed(tmp_path: Path) -> None:
    path = write_yolo(tmp_path, n_train=30, n_val=0)
    a, b = load_dataset("detect", path, seed=1), load_dataset("detect", path, seed=1)
    assert paths(a.val) == paths(b.val) and len(a.val) == 6 and len(a.train) == 24
    assert paths(load_dataset("detect", path, seed=2).val) != paths(a.val)
    assert load_dataset("detect", tmp_path).report.source == path  # a folder holding data.yaml works too


def test_coco_instances_remaps_categories_and_converts_boxes(tmp_path: Path) -> None:
    ds = load_dataset("detect", write_coco_instances(tmp_path))
    assert ds.names == SHAPES  # ids 10..50, listed in reverse, become 0..4 in sorted id order
    assert (len(ds.train), len(ds.val)) == (40, 10)
    for sample in ds.train + ds.val:
        scene = scene_of(sample.path)
        np.testing.assert_allclose(sample.boxes, [o.bbox for o in scene.objects], atol=1e-4)
        assert sample.classes.tolist() == [o.class_id for o in scene.objects]


def test_coco_found_from_its_folder_or_with_an_images_dir(tmp_path: Path) -> None:
    train_json = write_coco_instances(tmp_path / "coco", n_train=6, n_val=2)
    assert load_dataset("detect", tmp_path / "coco").report.source == train_json
    elsewhere = tmp_path / "elsewhere" / "boxes.json"
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(train_json.read_bytes())
    assert "cannot find its images" in _error(lambda: load_dataset("detect", elsewhere))
    ds = load_dataset("detect", elsewhere, images_dir=tmp_path / "coco" / "train", val_fraction=0.5)
    assert (len(ds.train), len(ds.val)) == (3, 3)
    captions = write_coco_captions(tmp_path / "captions", n_train=6, n_val=2)
    assert load_dataset("caption", tmp_path / "captions").report.source == captions


def test_voc_masks_equal_the_scenes(tmp_path: Path) -> None:
    ds = load_dataset("segment", write_voc(tmp_path, void_border=True))
    assert ds.names == SEG_NAMES and (len(ds.train), len(ds.val)) == (40, 10)
    for sample in ds.train[:5] + ds.val[:5]:
        expected = scene_of(sample.path).mask.copy()
        expected[0, :] = 255
        np.testing.assert_array_equal(read_mask(sample.mask_path), expected)  # indices, not palette colours
        assert read_image(sample.path).shape == (64, 64, 3)
    train_pixels = sum(scene_of(s.path).mask[1:].size for s in ds.train)
    assert ds.report.instances["train"] == train_pixels  # void pixels are not counted
    assert sum(ds.report.class_counts["train"]) == train_pixels


def test_voc_without_image_sets_and_mask_pairs(tmp_path: Path) -> None:
    ds = load_dataset("segment", write_voc(tmp_path / "voc", image_sets=False), seed=5)
    assert (len(ds.train), len(ds.val)) == (40, 10) and "seed 5" in ds.report.split
    pairs = write_mask_pairs(tmp_path / "pairs", names_file=False)
    ds = load_dataset("segmentation", pairs, names=list(SEG_NAMES))
    assert len(ds.train) == 40
    np.testing.assert_array_equal(read_mask(ds.val[0].mask_path), scene_of(ds.val[0].path).mask)
    (tmp_path / "names.txt").write_text("\n".join(SEG_NAMES))
    assert load_dataset("segment", pairs, names=tmp_path / "names.txt").names == SEG_NAMES


def test_coco_captions_and_a_vocabulary_from_train_only(tmp_path: Path) -> None:
    ds = load_dataset("caption", write_coco_captions(tmp_path, val_only_word=True))
    assert ds.names == () and (len(ds.train), len(ds.val)) == (40, 10)
    for sample in ds.train:
        assert list(sample.captions) == caption_texts(scene_of(sample.path))
    assert ds.vocab is not None and ds.vocab[:4] == SPECIALS == ("<pad>", "<bos>", "<eos>", "<unk>")
    assert VAL_ONLY_WORD not in ds.vocab and "large" in ds.vocab
    assert any(VAL_ONLY_WORD in c for s in ds.val for c in s.captions)
    rare = load_dataset("caption", tmp_path / "annotations" / "captions_train.json", min_word_count=30).vocab
    assert rare is not None and set(rare) < set(ds.vocab)


def test_tokenize_and_build_vocab() -> None:
    assert tokenize("A large, red STAR -- left of a (small) circle!") == [
        "a", "large", "red", "star", "left", "of", "a", "small", "circle",
    ]  # fmt: skip
    assert tokenize("Don't stop") == ["dont", "stop"]
    vocab = build_vocab(["a b b", "a b c", "d"], min_count=2)
    assert vocab == (*SPECIALS, "b", "a")  # most frequent first; c and d are too rare


# ---------------------------------------------------------------- decoding


def test_read_image_converts_to_rgb_like_the_server(tmp_path: Path) -> None:
    grey = np.arange(64 * 32, dtype=np.uint8).reshape(32, 64)
    Image.fromarray(grey, "L").save(tmp_path / "grey.png")
    assert read_image(tmp_path / "grey.png").shape == (32, 64, 3)
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "wide.png")  # 16-bit grey
    np.testing.assert_array_equal(read_image(tmp_path / "wide.png")[..., 0], grey)
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 0
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    assert read_image(tmp_path / "rgba.png")[0, 0].tolist() == [200, 0, 0]  # alpha dropped, as the server does
    palette = Image.fromarray(np.full((8, 8), 1, np.uint8), "P")
    palette.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    palette.save(tmp_path / "palette.png")
    assert read_image(tmp_path / "palette.png")[0, 0].tolist() == [10, 20, 30]
    assert read_mask(tmp_path / "palette.png")[0, 0] == 1


def test_exif_orientation_is_applied_to_pixels_and_sizes(tmp_path: Path) -> None:
    """A phone photo stored landscape with 'rotate 90' in EXIF: boxes must be in the upright image's pixels."""
    root = write_yolo(tmp_path, n_train=4, n_val=0).parent
    photo = root / "images" / "train" / "0000.png"
    image = Image.fromarray(np.zeros((40, 64, 3), np.uint8))
    exif = image.getexif()
    exif[0x0112] = 6
    photo.unlink()
    image.save(photo.with_suffix(".jpg"), exif=exif)
    (root / "labels" / "train" / "0000.txt").write_text("0 0.5 0.5 0.5 0.5\n")
    ds = load_dataset("detect", root / "data.yaml", val_fraction=0.25)
    sample = next(s for s in ds.train + ds.val if s.path.suffix == ".jpg")
    assert (sample.width, sample.height) == (40, 64)
    assert read_image(sample.path).shape == (64, 40, 3)
    np.testing.assert_allclose(sample.boxes, [[10, 16, 30, 48]])


# ---------------------------------------------------------------- bad datasets: one line naming the file


def _error(call) -> str:
    with pytest.raises(DatasetError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    return message


CASES = [
    # (writer, writer options, task, phrase, the file or folder the message must name)
    (write_imagefolder, {"defects": ["empty_class"]}, "classify", "class folder has no images", "empty_class"),
    (write_yolo, {"defects": ["missing_names"]}, "detect", "missing 'names'", "data.yaml"),
    (write_yolo, {"defects": ["missing_train"]}, "detect", "missing 'train'", "data.yaml"),
    (write_yolo, {"defects": ["bad_label_line"]}, "detect", "expected 5 numbers", "0001_bad_label_line.txt"),
    (write_yolo, {"defects": ["bad_class_id"]}, "detect", "not one of the 5 classes", "0001_bad_class_id.txt"),
    (write_yolo, {"defects": ["negative_class_id"]}, "detect", "class id -1", "0001_negative_class_id.txt"),
    (write_yolo, {"defects": ["box_out_of_range"]}, "detect", "outside the image", "0001_box_out_of_range.txt"),
    (write_coco_instances, {"defects": ["box_out_of_range"]}, "detect", "outside", "0001_box_out_of_range.png"),
    (write_coco_instances, {"defects": ["bad_category"]}, "detect", "not in 'categories'", "instances_train.json"),
    (write_coco_instances, {"defects": ["bad_json"]}, "detect", "not valid JSON", "instances_train.json"),
    (write_coco_instances, {"defects": ["missing_categories"]}, "detect", "'categories'", "instances_train.json"),
    (write_coco_instances, {"defects": ["size_mismatch"]}, "detect", "says 74x64", "0001_size_mismatch.png"),
    (write_voc, {"defects": ["mask_wrong_size"]}, "segment", "but its image", "0001_mask_wrong_size.png"),
    (write_voc, {"defects": ["mask_bad_value"]}, "segment", "mask values 9 are not class ids", "0001_mask_bad_value"),
    (write_mask_pairs, {"defects": ["rgb_mask"]}, "segment", "colour image", "0001_rgb_mask.png"),
    (write_voc, {"names_file": False}, "segment", "needs class names", "labels.txt"),
    (write_coco_captions, {"defects": ["no_captions"]}, "caption", "has no captions", "captions_train.json"),
    (write_coco_captions, {"defects": ["bad_json"]}, "caption", "not valid JSON", "captions_train.json"),
    (write_coco_captions, {}, "detect", "a COCO captions JSON", "captions_train.json"),
    (write_coco_instances, {}, "caption", "a COCO instances JSON", "instances_train.json"),
    (write_yolo, {}, "segment", "accepted layouts", "data.yaml"),
    (write_imagefolder, {}, "segment", "accepted layouts", "imagefolder"),
]


@pytest.mark.parametrize(
    ("writer", "options", "task", "phrase", "names"), CASES, ids=[f"{c[0].__name__}-{c[3]}" for c in CASES]
)
def test_bad_dataset_is_one_line_naming_the_file(
    tmp_path: Path, writer, options: dict, task: str, phrase: str, names: str
) -> None:
    path = writer(tmp_path / "imagefolder" if writer is write_imagefolder else tmp_path, n_train=8, n_val=2, **options)
    message = _error(lambda: load_dataset(task, path))
    assert phrase in message and names in message, message


def test_usage_errors_are_one_line(tmp_path: Path) -> None:
    assert "no such file" in _error(lambda: load_dataset("classify", tmp_path / "nowhere"))
    assert "unknown task 'pose'" in _error(lambda: load_dataset("pose", tmp_path))
    yolo = write_yolo(tmp_path / "y", n_train=4, n_val=2)
    assert "detection or segmentation layout" in _error(lambda: load_dataset("classify", yolo.parent))
    assert "only read for segmentation" in _error(lambda: load_dataset("detect", yolo, names=["a"]))
    assert "val_fraction" in _error(lambda: load_dataset("detect", yolo, val_fraction=1.0))
    captions = write_coco_captions(tmp_path / "c", n_train=4, n_val=2)
    message = _error(lambda: load_dataset("caption", captions, min_word_count=1000))
    assert "vocabulary is empty" in message and "captions_train.json" in message
    (tmp_path / "e" / "train" / "cat").mkdir(parents=True)
    (tmp_path / "e" / "train" / "cat" / "0.jpg").write_bytes(b"not a jpeg")
    message = _error(lambda: load_dataset("classify", tmp_path / "e"))
    assert "no usable training images" in message and "0.jpg" in message


# ---------------------------------------------------------------- counted warnings, and strict mode


def test_unreadable_images_are_skipped_and_counted_or_refused_in_strict_mode(tmp_path: Path) -> None:
    root = write_imagefolder(tmp_path, defects=["truncated_image", "not_an_image", "loose_image"])
    ds = load_dataset("classify", root)
    assert len(ds.train) == 38 and ds.report.skipped_files == 2
    assert ds.report.count("unreadable or truncated image") == 2
    summary = "\n".join(ds.summary())
    assert "0001_truncated_image.jpg" in summary and "0002_not_an_image.png" in summary
    assert "loose_image.png" in summary and ds.report.count("image outside any class folder, ignored") == 1
    message = _error(lambda: load_dataset("classify", root, strict=True))
    assert "strict" in message and "0001_truncated_image.jpg" in message


def test_yolo_warnings_are_counted(tmp_path: Path) -> None:
    defects = ["truncated_image", "box_slightly_outside", "zero_area_box", "missing_label"]
    ds = load_dataset("detect", write_yolo(tmp_path, defects=defects))
    report = ds.report
    assert report.count("unreadable or truncated image") == 1 and len(ds.train) == 39
    assert report.count("box slightly outside the image, clipped") == 1
    assert report.count("zero-area box skipped") == 1
    assert report.count("image without a label file (no objects)") == 1
    clipped = next(s for s in ds.train if "box_slightly_outside" in s.path.name)
    assert clipped.boxes[:, 2].max() == 64.0  # clipped to the image's right edge
    assert len(next(s for s in ds.train if "missing_label" in s.path.name).boxes) == 0
    lines = "\n".join(ds.summary())
    assert "0002_box_slightly_outside.txt" in lines and "0003_zero_area_box.txt" in lines


def test_coco_and_segmentation_and_caption_warnings_are_counted(tmp_path: Path) -> None:
    defects = ["crowd_box", "zero_area_box", "box_slightly_outside", "missing_image"]
    report = load_dataset("detect", write_coco_instances(tmp_path / "coco", defects=defects)).report
    assert [report.count(r) for r in ("iscrowd annotation skipped", "zero-area box skipped")] == [1, 1]
    assert report.count("box slightly outside the image, clipped") == 1
    assert report.count("image file missing") == 1 and "0004_missing_image.png" in "\n".join(report.summary())

    ds = load_dataset("segment", write_voc(tmp_path / "voc", defects=["missing_mask", "truncated_image"]))
    assert len(ds.train) == 38 and ds.report.count("image without a mask skipped") == 1
    message = _error(lambda: load_dataset("segment", tmp_path / "voc", strict=True))
    assert "0001_missing_mask" in message

    defects = ["image_without_captions", "empty_caption"]
    ds = load_dataset("caption", write_coco_captions(tmp_path / "cap", defects=defects))
    assert len(ds.train) == 39
    assert ds.report.count("image without captions skipped") == 1 and ds.report.count("empty caption skipped") == 1


def test_masks_keep_the_ignore_index_and_refuse_other_values(tmp_path: Path) -> None:
    root = write_mask_pairs(tmp_path, n_train=6, n_val=2)
    mask = read_mask(root / "masks" / "train" / "0000.png")
    mask[:2] = 200
    save_mask(mask, root / "masks" / "train" / "0000.png")
    assert "ignore index 255" in _error(lambda: load_dataset("segment", root))
    assert len(load_dataset("segment", root, ignore_index=200).train) == 6
