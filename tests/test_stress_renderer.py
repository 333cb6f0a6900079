"""The independent stress renderer (export/stress.py): determinism, label consistency, presets, COCO export.

These labels score models, so the checks are about the labels agreeing with the pixels: masks, visible boxes and
areas, the largest-shape definition, colour names, and the exact bytes a server would receive.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

# OpenCV is the stress renderer's only extra dependency; without it there is nothing to test.
cv2 = pytest.importorskip("cv2")

from export import stress as S  # noqa: E402

CLEAN = {"p_tone": 0.0, "p_blur": 0.0, "p_noise": 0.0, "jpeg_prob": 0.0, "shading": 0.0}


def _lab(rgb) -> np.ndarray:
    return cv2.cvtColor(np.asarray(rgb, np.float32).reshape(-1, 1, 3) / 255.0, cv2.COLOR_RGB2Lab).reshape(-1, 3)


def _scenes(n: int = 12) -> list[S.StressScene]:
    return [S.render(21, i, width=240 + 40 * (i % 3), height=180 + 50 * (i % 4), n_shapes=(1, 8),
                     radius=(0.05, 0.4), min_gap=0.4, border_cut=0.45) for i in range(n)]


def test_same_seed_and_index_give_identical_bytes():
    a = S.render(3, 5, width=200, height=150)
    b = S.render(3, 5, width=200, height=150)
    assert a.encoded == b.encoded and a.caption == b.caption and a.objects == b.objects
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    assert S.render(3, 6, width=200, height=150).encoded != a.encoded
    assert S.render(4, 5, width=200, height=150).encoded != a.encoded
    # A split is the same scenes however it is cut up.
    whole = S.detection_slice(9, 4)
    tail = S.detection_slice(9, 2, start=2)
    assert [s.encoded for s in whole[2:]] == [s.encoded for s in tail]


def test_masks_boxes_and_areas_agree():
    for sc in _scenes():
        h, w = sc.mask.shape
        assert sc.image.shape == (h, w, 3) and sc.image.dtype == np.uint8
        lut = np.array([0] + [o.class_id + 1 for o in sc.objects], np.uint8)
        assert np.array_equal(sc.mask, lut[sc.instances])
        for i, ob in enumerate(sc.objects):
            vis = sc.instances == i + 1
            ys, xs = np.nonzero(vis)
            assert ob.area == vis.sum() > 0
            assert ob.bbox == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            assert 0 <= ob.bbox[0] < ob.bbox[2] <= w and 0 <= ob.bbox[1] < ob.bbox[3] <= h
            assert ob.area <= ob.full_area
            assert S.SHAPES[ob.class_id] == ob.shape and ob.color in S.COLORS
            # Visible pixels lie inside the shape's own geometry (a pixel of slack for coverage rounding).
            x, y = ob.center
            assert np.hypot(xs + 0.5 - x, ys + 0.5 - y).max() <= ob.size + 1.0
            if ob.area == ob.full_area and ob.size + 2 < x < w - ob.size - 2 and ob.size + 2 < y < h - ob.size - 2:
                # Unoccluded and uncut: the pixel count matches the geometric area up to edge pixels.
                geom = math.pi * ob.size**2 if ob.polygon is None else cv2.contourArea(np.float32(ob.polygon))
                assert abs(ob.full_area - geom) <= 0.1 * geom + 4


def test_mask_is_aligned_with_the_pixels():
    """Without photometric damage, a shape's interior is exactly its recorded colour; background differs."""
    for i in range(6):
        sc = S.render(8, i, width=256, height=192, n_shapes=(2, 5), **CLEAN)
        assert sc.format == "PNG"
        for k, ob in enumerate(sc.objects):
            vis = (sc.instances == k + 1).astype(np.uint8)
            # Erode with a zero border: pixels on the canvas edge may be only partly covered.
            inner = cv2.erode(vis, np.ones((3, 3), np.uint8), borderType=cv2.BORDER_CONSTANT, borderValue=0) > 0
            if inner.sum() > 4:
                assert np.abs(sc.image[inner].astype(int) - ob.rgb).max() <= 1


def test_largest_is_largest_visible_area_and_named_in_caption():
    for sc in _scenes() + S.caption_slice(5, 10):
        areas = [o.area for o in sc.objects]
        assert sc.largest == int(np.argmax(areas))
        big = sc.objects[sc.largest]
        assert sc.caption == f"a {big.color} {big.shape}" or sc.caption.startswith(f"a {big.color} {big.shape} ")
    for sc in S.classification_slice(6, 15):
        areas = sorted((o.area for o in sc.objects), reverse=True)
        assert len(areas) == 1 or areas[0] >= 1.5 * areas[1]


def test_jpeg_and_png_bytes():
    for sc in S.jpeg_slice(2, 4):
        assert sc.format == "JPEG" and sc.encoded[:3] == b"\xff\xd8\xff"
        decoded = cv2.cvtColor(cv2.imdecode(np.frombuffer(sc.encoded, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        assert np.array_equal(decoded, sc.image)  # `image` is what a server decodes from `encoded`
    png = S.render(1, 1, width=100, height=80, jpeg_prob=0.0)
    assert png.format == "PNG" and png.encoded[:8] == b"\x89PNG\r\n\x1a\n"
    decoded = cv2.imdecode(np.frombuffer(png.encoded, np.uint8), cv2.IMREAD_COLOR)
    assert np.array_equal(cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB), png.image)


@pytest.mark.parametrize("preset", list(S.PRESETS))
def test_every_preset_makes_valid_scenes(preset):
    n = 2 if preset == "hd_frames" else 4
    slicer = {"classification": S.classification_slice, "single_centered": S.single_centered,
              "detection": S.detection_slice, "small_objects": S.small_objects_slice, "hd_frames": S.hd_frames,
              "segmentation": S.segmentation_slice, "caption": S.caption_slice, "jpeg": S.jpeg_slice}[preset]
    for sc in slicer(13, n):
        h, w = sc.mask.shape
        assert sc.image.shape == (h, w, 3) and min(w, h) >= 64 and 1 <= len(sc.objects) <= 8
        assert sc.background in S.BACKGROUNDS and sc.format in ("JPEG", "PNG") and sc.caption.startswith("a ")
        if preset == "single_centered":
            (ob,) = sc.objects
            assert ob.center == (w / 2, h / 2) and 0.1 <= ob.size / min(w, h) <= 0.4
        if preset == "small_objects":
            assert 320 <= max(w, h) <= 1280 and len(sc.objects) >= 3
            assert all(0.03 <= o.size / max(w, h) <= 0.06 for o in sc.objects)
        if preset == "hd_frames":
            assert (w, h) in ((1280, 720), (1920, 1080))
        if preset == "jpeg":
            assert sc.format == "JPEG"


@pytest.mark.parametrize(("w", "h"), [(64, 64), (1920, 1080), (120, 400), (1080, 1920)])
def test_canvas_sizes(w, h):
    sc = S.render(0, 0, width=w, height=h, n_shapes=8, radius=(0.02, 0.5))
    assert sc.image.shape == (h, w, 3) and sc.mask.shape == (h, w)
    assert all(o.size >= 5 for o in sc.objects)  # never below ~10 px across


def test_colour_samples_stay_nearest_their_name():
    rng = np.random.default_rng(0)
    refs = _lab(list(S.COLORS.values()))
    for name in S.COLORS:
        samples = _lab([S.sample_color(name, rng) for _ in range(400)])
        nearest = np.argmin(np.linalg.norm(samples[:, None] - refs[None], axis=2), axis=1)
        assert np.mean(nearest == list(S.COLORS).index(name)) >= 0.95, name
        assert len({tuple(s) for s in samples.round(1)}) > 50  # genuinely jittered


def test_polygon_construction():
    seen = set()
    for sc in S.detection_slice(4, 30, shapes=("triangle", "star", "square", "hexagon", "circle")):
        for ob in sc.objects:
            pts = None if ob.polygon is None else np.array(ob.polygon)
            seen.add(ob.shape)
            expected = {"circle": None, "square": 4, "triangle": 3, "star": 10, "hexagon": 6}[ob.shape]
            assert (pts is None) if expected is None else len(pts) == expected
            if pts is None:
                continue
            radii = np.hypot(*(pts - ob.center).T)
            if ob.shape == "star":
                assert np.allclose(radii[::2], ob.size, rtol=1e-3)
                assert 0.38 - 1e-3 <= radii[1::2].mean() / ob.size <= 0.55 + 1e-3
            else:
                assert np.allclose(radii, ob.size, rtol=1e-3)  # every vertex on the circumcircle
            if ob.shape == "triangle":
                sides = np.linalg.norm(pts - np.roll(pts, 1, axis=0), axis=1)
                angles = sorted(math.degrees(math.acos(np.clip(
                    (sides[(i + 1) % 3] ** 2 + sides[(i + 2) % 3] ** 2 - sides[i] ** 2)
                    / (2 * sides[(i + 1) % 3] * sides[(i + 2) % 3]), -1, 1))) for i in range(3))
                equilateral = np.allclose(angles, 60, atol=0.5)
                # Isosceles: two equal base angles, apex 40-80 degrees.
                isosceles = any(40 - 0.5 <= angles[k] <= 80 + 0.5 and np.isclose(*np.delete(angles, k), atol=0.5)
                                for k in range(3))
                assert equilateral or isosceles
    assert seen == set(S.SHAPES)


def test_coco_export_loads_and_scores_perfectly_against_itself():
    pytest.importorskip("pycocotools")
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    scenes = _scenes(5)
    gt = COCO()
    gt.dataset = S.to_coco(scenes)
    gt.createIndex()
    assert len(gt.getImgIds()) == 5 and len(gt.getAnnIds()) == sum(len(s.objects) for s in scenes)
    assert [c["name"] for c in gt.loadCats(gt.getCatIds())] == list(S.SHAPES)
    ann = gt.loadAnns(gt.getAnnIds(imgIds=[1]))[0]
    assert np.array_equal(gt.annToMask(ann).astype(bool), scenes[0].instances == 1)
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
            for a in gt.dataset["annotations"]]
    ev = COCOeval(gt, gt.loadRes(dets), "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)


def test_unknown_option_is_rejected():
    with pytest.raises(TypeError):
        S.render(0, 0, width=64, height=64, n_shape=3)
