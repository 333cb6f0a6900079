"""Independent stress-scene renderer for Optic's shape vocabulary.

Optic's models are trained on scenes from its own generator; scoring them only on that generator's output hides how
much they lean on its drawing quirks. This module draws the same vocabulary with none of that code: OpenCV
rasterisation with supersampled coverage, its own polygon construction, HSV colour jitter, textured and cluttered
backgrounds and photometric damage. It imports only numpy, cv2 and the standard library, so it keeps working however
the repository is rearranged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

SHAPES = ("circle", "square", "triangle", "star", "hexagon")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40), "green": (40, 165, 60), "blue": (45, 85, 220), "yellow": (235, 205, 45),
    "purple": (135, 60, 175), "orange": (240, 135, 30), "white": (240, 240, 240), "black": (25, 25, 25),
}
BACKGROUNDS = ("plain", "linear", "radial", "noise", "stripes", "checker", "clutter")
_MIN_RADIUS = 5.0  # 10 px across: smaller shapes are not reliably nameable, even by people.


@dataclass(frozen=True)
class StressObject:
    """One drawn shape. `bbox`/`area` cover VISIBLE pixels only (pixel-edge coords, x2 = max col + 1)."""

    shape: str
    class_id: int
    color: str
    rgb: tuple[int, int, int]
    center: tuple[float, float]
    size: float  # circumradius, px
    rotation: float  # degrees
    polygon: tuple[tuple[float, float], ...] | None  # None for a true circle
    bbox: tuple[int, int, int, int]
    area: int
    full_area: int  # unoccluded pixels inside the canvas


@dataclass(frozen=True, eq=False)
class StressScene:
    """A rendered scene: `image` is what a client sees after any JPEG round trip; `encoded` are its exact bytes."""

    seed: int
    index: int
    image: np.ndarray  # HxWx3 uint8 RGB
    encoded: bytes
    format: str  # "JPEG" or "PNG"
    mask: np.ndarray  # HxW uint8: 0 background, 1 + class id
    instances: np.ndarray  # HxW uint8: 0 background, 1 + object index
    objects: tuple[StressObject, ...]
    largest: int  # object with the largest visible area
    caption: str
    background: str


# ---------------------------------------------------------------- colour


def _to_lab(rgb: np.ndarray) -> np.ndarray:
    """RGB (0..255, any leading shape) -> CIE Lab rows, for perceptual distances."""
    flat = (np.asarray(rgb, np.float32).reshape(-1, 1, 3) / 255.0).astype(np.float32)
    return cv2.cvtColor(flat, cv2.COLOR_RGB2Lab).reshape(-1, 3)


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    hsv = np.array([[[h % 360.0, s, v]]], np.float32)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0] * 255.0


def sample_color(name: str, rng: np.random.Generator) -> tuple[int, int, int]:
    """A jittered instance of a named colour, sampled in HSV so hue, saturation and value vary independently."""
    if name == "white":
        rgb = _hsv_to_rgb(rng.uniform(0, 360), rng.uniform(0.0, 0.06), rng.uniform(0.86, 1.0))
    elif name == "black":
        rgb = _hsv_to_rgb(rng.uniform(0, 360), rng.uniform(0.0, 0.3), rng.uniform(0.03, 0.17))
    else:
        ref = np.array([[COLORS[name]]], np.float32) / 255.0
        h, s, v = cv2.cvtColor(ref, cv2.COLOR_RGB2HSV)[0, 0]
        s = float(np.clip(s * rng.uniform(0.75, 1.1), 0.45, 1.0))
        # Darkened yellow turns olive and darkened orange brown, so those two keep their brightness.
        v = float(np.clip(v * rng.uniform(0.8, 1.12), 0.8 if name in ("yellow", "orange") else 0.4, 1.0))
        rgb = _hsv_to_rgb(h + rng.uniform(-7.0, 7.0), s, v)
    return tuple(int(c) for c in np.clip(np.rint(rgb), 0, 255))  # type: ignore[return-value]


def nearest_color(rgb: Sequence[int]) -> str:
    """The reference colour nearest in CIE Lab (used by tests and to sanity-check samples)."""
    d = np.linalg.norm(_to_lab(np.array(list(COLORS.values()))) - _to_lab(np.array(rgb)), axis=1)
    return list(COLORS)[int(np.argmin(d))]


def _bg_color(rng: np.random.Generator, max_s: float = 0.3) -> np.ndarray:
    """Backgrounds stay fairly unsaturated, so they never read as one of the shape colours."""
    return _hsv_to_rgb(rng.uniform(0, 360), rng.uniform(0, max_s), rng.uniform(0.12, 0.95))


# ---------------------------------------------------------------- backgrounds


def _clutter(img: np.ndarray, rng: np.random.Generator) -> None:
    """Thin lines, elongated blobs and bars in grey/brown or muted teal (no shape class uses these), drawn in place.

    Blobs and bars are kept thin so that none of them reads as a circle or square a detector could rightly report.
    """
    h, w = img.shape[:2]
    short = min(w, h)
    for _ in range(int(min(600, 40 + w * h / 3000))):
        hue, sat = (rng.uniform(170, 195), rng.uniform(0.25, 0.5)) if rng.random() < 0.3 else (rng.uniform(0, 360),
                                                                                                rng.uniform(0, 0.2))
        c = tuple(float(x) for x in _hsv_to_rgb(hue, sat, rng.uniform(0.3, 0.65)))
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        ang, ln = rng.uniform(0, 2 * math.pi), rng.uniform(0.01, 0.04) * short
        kind = rng.integers(3)
        if kind == 0:
            ln = rng.uniform(0.05, 0.35) * short
            end = (int(x + ln * math.cos(ang)), int(y + ln * math.sin(ang)))
            cv2.line(img, (x, y), end, c, int(rng.integers(1, 3)), cv2.LINE_AA)
        elif kind == 1:
            axes = (max(2, int(ln / 2)), max(1, int(ln / 2 * rng.uniform(0.2, 0.45))))
            cv2.ellipse(img, (x, y), axes, math.degrees(ang), 0, 360, c, -1, cv2.LINE_AA)
        else:
            box = cv2.boxPoints(((x, y), (max(3.0, ln), max(1.0, ln * rng.uniform(0.1, 0.3))), math.degrees(ang)))
            cv2.fillPoly(img, [np.rint(box).astype(np.int32)], c, cv2.LINE_AA)


def _background(kind: str, rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """An HxWx3 float32 RGB background of the given kind."""
    c1, c2 = _bg_color(rng), _bg_color(rng)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == "plain":
        return np.broadcast_to(c1, (h, w, 3)).astype(np.float32)
    if kind in ("linear", "clutter"):
        a = rng.uniform(0, 2 * math.pi)
        t = xx * math.cos(a) + yy * math.sin(a)
        t = (t - t.min()) / max(float(np.ptp(t)), 1.0)
    elif kind == "radial":
        cx, cy, rad = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.4, 1.2) * math.hypot(w, h)
        t = np.clip(np.hypot(xx - cx, yy - cy) / rad, 0, 1)
    elif kind == "noise":
        t = np.zeros((h, w), np.float32)
        scales = ((rng.uniform(2, 4), 0.25), (rng.uniform(8, 24), 0.5), (max(w, h) / rng.uniform(2, 6), 1.0))
        for cell, weight in scales:  # value noise at three scales: grain, blotches, broad shading
            grid = rng.standard_normal((int(h / cell) + 2, int(w / cell) + 2)).astype(np.float32)
            t += weight * cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)
        t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
    elif kind in ("stripes", "checker"):
        d = math.ceil(math.hypot(w, h)) + 2
        p = max(2, int(rng.uniform(4, max(6, min(w, h) / 8))))
        v = np.arange(d) // p
        pat = (v[:, None] % 2 if kind == "stripes" else (v[:, None] + v[None, :]) % 2).astype(np.float32)
        m = cv2.getRotationMatrix2D((d / 2, d / 2), rng.uniform(0, 180), 1.0)
        # Rotate about the pattern's centre, crop the canvas from its middle.
        m[:, 2] -= np.array(((d - w) / 2, (d - h) / 2))
        t = cv2.warpAffine(np.broadcast_to(pat, (d, d)).copy(), m, (w, h), flags=cv2.INTER_LINEAR)
        # Keep texture contrast moderate: c2 is c1 moved in value, so shapes still stand out.
        c2 = np.clip(c1 * rng.uniform(0.6, 1.4), 0, 255)
    else:
        raise ValueError(f"unknown background {kind!r}")
    img = (c1 * (1 - t[..., None]) + c2 * t[..., None]).astype(np.float32)
    if kind == "clutter":
        u8 = np.clip(img, 0, 255).astype(np.uint8)
        _clutter(u8, rng)
        img = u8.astype(np.float32)
    return img


# ---------------------------------------------------------------- geometry


def _polygon(shape: str, cx: float, cy: float, r: float, rot: float, rng: np.random.Generator) -> np.ndarray | None:
    """Float vertices (N x 2) of a shape with circumradius r, or None for a circle."""
    if shape == "circle":
        return None
    if shape == "square":  # a rotated rectangle, OpenCV's way
        return cv2.boxPoints(((cx, cy), (r * math.sqrt(2), r * math.sqrt(2)), rot)).astype(np.float64)
    t = math.radians(rot)
    radii: np.ndarray | float = r
    if shape == "hexagon":
        ang = t + np.arange(6) * math.pi / 3
    elif shape == "triangle":
        if rng.random() < 0.5:
            ang = t + np.arange(3) * 2 * math.pi / 3
        else:  # isosceles, apex angle a: base vertices at pi +- a (inscribed-angle theorem)
            a = math.radians(rng.uniform(40, 80))
            ang = t + np.array([0.0, math.pi - a, math.pi + a])
    elif shape == "star":
        ang = t + np.arange(10) * math.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, r * rng.uniform(0.38, 0.55))
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return np.stack([cx + radii * np.cos(ang), cy + radii * np.sin(ang)], axis=1)


def _coverage(poly: np.ndarray | None, cx: float, cy: float, r: float, w: int, h: int, pad: int
              ) -> tuple[int, int, np.ndarray]:
    """Supersampled pixel coverage (0..1) of a shape in its canvas-clipped box: (x0, y0, alpha)."""
    lo = np.array([cx - r, cy - r]) if poly is None else poly.min(0)
    hi = np.array([cx + r, cy + r]) if poly is None else poly.max(0)
    x0, y0 = max(math.floor(lo[0]) - pad, 0), max(math.floor(lo[1]) - pad, 0)
    x1, y1 = min(math.ceil(hi[0]) + pad, w), min(math.ceil(hi[1]) + pad, h)
    if x1 <= x0 or y1 <= y0:
        return 0, 0, np.zeros((0, 0), np.float32)
    bw, bh = x1 - x0, y1 - y0
    s = int(np.clip(math.sqrt(4e6 / (bw * bh)), 2, 8))  # supersampling factor, memory-bounded
    big = np.zeros((bh * s, bw * s), np.uint8)
    frac = 16  # shift=4: 1/16 sub-pixel vertex precision
    # Pixel-edge coordinates -> OpenCV pixel-centre coordinates at the supersampled scale.
    if poly is None:
        c = (round(((cx - x0) * s - 0.5) * frac), round(((cy - y0) * s - 0.5) * frac))
        cv2.circle(big, c, round(r * s * frac), 255, -1, cv2.LINE_8, 4)
    else:
        pts = np.rint(((poly - (x0, y0)) * s - 0.5) * frac).astype(np.int32)
        cv2.fillPoly(big, [pts], 255, cv2.LINE_8, 4)
    return x0, y0, cv2.resize(big, (bw, bh), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0


@dataclass
class _Placed:
    shape: str
    cx: float
    cy: float
    r: float
    rot: float
    poly: np.ndarray | None
    x0: int
    y0: int
    alpha: np.ndarray

    @property
    def hard(self) -> np.ndarray:
        return self.alpha >= 0.5  # a pixel belongs to a shape when at least half of it is covered

    def window(self) -> tuple[slice, slice]:
        return slice(self.y0, self.y0 + self.alpha.shape[0]), slice(self.x0, self.x0 + self.alpha.shape[1])


def _layout(rng: np.random.Generator, w: int, h: int, n: int, o: dict[str, Any]
            ) -> tuple[list[_Placed], np.ndarray, np.ndarray] | None:
    """Sample n shapes; return (placed, instance map, visible areas) or None when a constraint fails."""
    ref = min(w, h) if o["radius_ref"] == "short" else max(w, h)
    lo, hi = (max(_MIN_RADIUS, f * ref) for f in o["radius"])
    radii = np.exp(rng.uniform(math.log(lo), math.log(max(hi, lo)), n))
    margin = o["largest_margin"]
    if margin and n > 1:  # shrink the others so the biggest can be `margin` times larger in area
        k = int(np.argmax(radii))
        cap = radii[k] / (math.sqrt(margin) * 1.15)
        radii = np.where(np.arange(n) == k, radii, np.maximum(np.minimum(radii, cap), _MIN_RADIUS))
    placed: list[_Placed] = []
    for r in radii:
        shape = o["shapes"][int(rng.integers(len(o["shapes"])))]
        rot = rng.uniform(0, 360) if o["rotate"] else 0.0
        for _ in range(30):
            if o["centered"]:
                cx, cy = w / 2, h / 2
            else:
                reach = r * (1 - 2 * o["border_cut"])  # how far inside the border the centre must stay
                cx = rng.uniform(reach, w - reach) if w > 2 * reach else rng.uniform(0, w)
                cy = rng.uniform(reach, h - reach) if h > 2 * reach else rng.uniform(0, h)
            if all(math.hypot(cx - p.cx, cy - p.cy) >= o["min_gap"] * (r + p.r) for p in placed):
                break
        poly = _polygon(shape, cx, cy, float(r), rot, rng)
        x0, y0, alpha = _coverage(poly, cx, cy, float(r), w, h, _ring_width(r) + 1)  # room for the contrast ring
        placed.append(_Placed(shape, cx, cy, float(r), rot, poly, x0, y0, alpha))
    inst = np.zeros((h, w), np.uint8)
    for i, p in enumerate(placed):
        if p.alpha.size:
            inst[p.window()][p.hard] = i + 1
    areas = np.bincount(inst.ravel(), minlength=n + 1)[1:]
    for p, a in zip(placed, areas, strict=True):
        geom = math.pi * p.r**2 if p.poly is None else cv2.contourArea(p.poly.astype(np.float32))
        if a < max(8, o["min_visible"] * min(geom, 0.5 * w * h)):
            return None
    top = np.sort(areas)[::-1]
    if margin and n > 1 and top[0] < margin * top[1]:
        return None
    return placed, inst, areas


# ---------------------------------------------------------------- rendering


def _ring_width(r: float) -> int:
    return int(np.clip(r * 0.25, 2, 12))


def _pick_color(rng: np.random.Generator, names: Sequence[str], ring: np.ndarray | None, min_contrast: float
                ) -> tuple[str, tuple[int, int, int]]:
    """Choose a colour that stands out from the surrounding pixels (20th-percentile CIE76 distance)."""
    first = names[int(rng.integers(len(names)))]
    order = [first] * 3 + [names[i] for i in rng.permutation(len(names)) if names[i] != first]
    best: tuple[float, str, tuple[int, int, int]] | None = None
    for name in order:
        rgb = sample_color(name, rng)
        if ring is None or len(ring) == 0:
            return name, rgb
        score = float(np.percentile(np.linalg.norm(ring - _to_lab(np.array(rgb)), axis=1), 20))
        if score >= min_contrast:
            return name, rgb
        if best is None or score > best[0]:
            best = (score, name, rgb)
    assert best is not None
    return best[1], best[2]


def _photometric(img: np.ndarray, rng: np.random.Generator, o: dict[str, Any]) -> np.ndarray:
    """Tone change, blur and sensor noise, each with its own probability."""
    if rng.random() < o["p_tone"]:
        img = (img - 128.0) * rng.uniform(0.8, 1.2) + 128.0 + rng.uniform(-20, 20)
    if rng.random() < o["p_blur"]:
        if rng.random() < 0.5:
            img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.5, 1.4))
        else:  # motion blur: a short line kernel at a random angle
            k = int(rng.choice([3, 5, 7]))
            ker = np.zeros((k, k), np.float32)
            a = rng.uniform(0, math.pi)
            dx, dy = round(k // 2 * math.cos(a)), round(k // 2 * math.sin(a))
            cv2.line(ker, (k // 2 - dx, k // 2 - dy), (k // 2 + dx, k // 2 + dy), 1.0, 1)
            img = cv2.filter2D(img, -1, ker / ker.sum())
    if rng.random() < o["p_noise"]:
        img = img + rng.standard_normal(img.shape, dtype=np.float32) * rng.uniform(*o["noise_sigma"])
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def render(seed: int, index: int, *, width: int, height: int, n_shapes: int | tuple[int, int] = (1, 4),
           radius: tuple[float, float] = (0.08, 0.4), radius_ref: str = "short", shapes: Sequence[str] = SHAPES,
           colors: Sequence[str] = tuple(COLORS), largest_margin: float | None = None, min_gap: float = 0.6,
           border_cut: float = 0.3, min_visible: float = 0.35, centered: bool = False, rotate: bool = True,
           background: str | Sequence[str] = BACKGROUNDS, min_contrast: float = 22.0, shading: float = 0.1,
           p_tone: float = 0.3, p_blur: float = 0.25, p_noise: float = 0.3,
           noise_sigma: tuple[float, float] = (2.0, 8.0), jpeg_prob: float = 0.5,
           jpeg_quality: tuple[int, int] = (40, 95), relation_prob: float = 0.0) -> StressScene:
    """Render scene `index` of `seed`; the result depends only on (seed, index) and the options.

    radius: circumradius range as fractions of the short (or long, `radius_ref`) side, sampled log-uniformly.
    min_gap: centres are kept >= min_gap * (r_i + r_j) apart (1.0 = disjoint circumcircles; lower = overlap).
    border_cut: 0 keeps shapes inside the frame, 0.5 lets centres reach the border. min_visible: every shape keeps at
    least this fraction of its area visible. largest_margin: largest visible area >= margin x the second's.
    """
    o = dict(locals())
    rng = np.random.default_rng([seed, index])
    lo_n, hi_n = (n_shapes, n_shapes) if isinstance(n_shapes, int) else n_shapes
    n = int(rng.integers(lo_n, hi_n + 1))
    for attempt in range(60):
        got = _layout(rng, width, height, n if attempt < 40 else 1, o)  # fall back to one shape rather than fail
        if got is not None:
            break
    else:
        raise RuntimeError(f"no valid layout for seed={seed} index={index}")
    placed, inst, areas = got
    bg_kind = background if isinstance(background, str) else background[int(rng.integers(len(background)))]
    canvas = _background(bg_kind, rng, width, height)
    names = list(colors)
    objects: list[StressObject] = []
    for i, p in enumerate(placed):
        win, hard = p.window(), p.hard
        kernel = np.ones((2 * _ring_width(p.r) + 1,) * 2, np.uint8)
        ring = cv2.dilate(hard.astype(np.uint8), kernel).astype(bool) & ~hard  # the surroundings the shape must beat
        name, rgb = _pick_color(rng, names, _to_lab(canvas[win][ring]) if ring.any() else None, min_contrast)
        # Gentle linear shading across the shape: flat fills are a training-side habit worth breaking.
        hh, ww = p.alpha.shape
        a = rng.uniform(0, 2 * math.pi)
        g = (np.arange(ww)[None, :] - ww / 2) * math.cos(a) + (np.arange(hh)[:, None] - hh / 2) * math.sin(a)
        fill = np.array(rgb, np.float32) * (1 + rng.uniform(0, shading) * g / max(hh, ww, 1) * 2)[..., None]
        al = p.alpha[..., None]
        canvas[win] = canvas[win] * (1 - al) + np.clip(fill, 0, 255) * al
        vis = inst[win] == i + 1
        ys, xs = np.nonzero(vis)
        bbox = (p.x0 + int(xs.min()), p.y0 + int(ys.min()), p.x0 + int(xs.max()) + 1, p.y0 + int(ys.max()) + 1)
        poly = None if p.poly is None else tuple((float(x), float(y)) for x, y in p.poly)
        objects.append(StressObject(p.shape, SHAPES.index(p.shape), name, rgb, (p.cx, p.cy), p.r, p.rot, poly, bbox,
                                    int(areas[i]), int(hard.sum())))
    image = _photometric(canvas, rng, o)
    bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    if rng.random() < jpeg_prob:
        ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(jpeg_quality[0],
                                                                                          jpeg_quality[1] + 1))])
        fmt = "JPEG"
        image = cv2.cvtColor(np.asarray(cv2.imdecode(buf, cv2.IMREAD_COLOR)), cv2.COLOR_BGR2RGB)
    else:
        ok, buf = cv2.imencode(".png", bgr, [cv2.IMWRITE_PNG_COMPRESSION, 3])
        fmt = "PNG"
    assert ok
    lut = np.array([0] + [1 + SHAPES.index(p.shape) for p in placed], np.uint8)
    largest = int(np.argmax(areas))
    caption = _caption(objects, inst, largest, rng.random() < relation_prob, min(width, height))
    return StressScene(seed, index, image, buf.tobytes(), fmt, lut[inst], inst, tuple(objects), largest, caption,
                       bg_kind)


def _caption(objects: Sequence[StressObject], inst: np.ndarray, largest: int, relate: bool, short: int) -> str:
    """'a {color} {shape}' for the largest shape, optionally placed relative to the second largest."""
    big = objects[largest]
    text = f"a {big.color} {big.shape}"
    if not relate or len(objects) < 2:
        return text
    other = sorted(range(len(objects)), key=lambda i: -objects[i].area)[1]
    (ay, ax), (by, bx) = (np.argwhere(inst == i + 1).mean(0) for i in (largest, other))
    dx, dy = ax - bx, ay - by
    if max(abs(dx), abs(dy)) < 0.05 * short:
        return text
    horizontal = abs(dx) >= abs(dy)
    rel = ("to the left of" if dx < 0 else "to the right of") if horizontal else ("above" if dy < 0 else "below")
    return f"{text} {rel} a {objects[other].color} {objects[other].shape}"


# ---------------------------------------------------------------- presets and splits

_ASPECTS = (1.0, 1.0, 4 / 3, 16 / 9, 3 / 4, 9 / 16, 2.0, 0.5)


def _canvas(rng: np.random.Generator, lo: int, hi: int) -> dict[str, int]:
    """Long side log-uniform in [lo, hi], a random (landscape or portrait) aspect, both sides >= 64."""
    long_side = math.exp(rng.uniform(math.log(lo), math.log(hi)))
    a = float(rng.choice(_ASPECTS))
    w, h = (long_side, long_side / a) if a >= 1 else (long_side * a, long_side)
    return {"width": max(64, round(w)), "height": max(64, round(h))}


PRESETS: dict[str, Callable[[np.random.Generator], dict[str, Any]]] = {
    "classification": lambda r: {**_canvas(r, 64, 512), "n_shapes": (1, 4), "radius": (0.12, 0.42),
                                 "largest_margin": 1.5, "min_gap": 0.5, "border_cut": 0.15},
    "single_centered": lambda r: {**_canvas(r, 64, 640), "n_shapes": 1, "radius": (0.1, 0.4), "centered": True},
    "detection": lambda r: {**_canvas(r, 160, 1024), "n_shapes": (1, 8), "radius": (0.04, 0.35), "min_gap": 0.55,
                            "border_cut": 0.4},
    "small_objects": lambda r: {**_canvas(r, 320, 1280), "n_shapes": (3, 8), "radius": (0.03, 0.06),
                                "radius_ref": "long", "min_gap": 1.0, "border_cut": 0.0},
    "hd_frames": lambda r: {"width": 1280 + 640 * (k := int(r.integers(2))), "height": 720 + 360 * k,
                            "n_shapes": (1, 8), "radius": (0.03, 0.35), "border_cut": 0.4},
    "segmentation": lambda r: {**_canvas(r, 128, 640), "n_shapes": (1, 6), "radius": (0.08, 0.45), "min_gap": 0.35,
                               "border_cut": 0.4},
    "caption": lambda r: {**_canvas(r, 96, 512), "n_shapes": (1, 4), "radius": (0.1, 0.4), "largest_margin": 1.5,
                          "relation_prob": 0.5},
    "jpeg": lambda r: {**_canvas(r, 160, 1024), "n_shapes": (1, 6), "radius": (0.05, 0.35), "jpeg_prob": 1.0,
                       "jpeg_quality": (40, 60)},
}


def preset_kwargs(preset: str, seed: int, index: int) -> dict[str, Any]:
    """render() keywords for one scene of a preset; canvas size comes from its own (seed, index) stream."""
    return PRESETS[preset](np.random.default_rng([seed, index, 0x5EED]))


def make_split(preset: str, seed: int, n: int, start: int = 0, **overrides: Any) -> list[StressScene]:
    """Scenes start..start+n-1 of a preset. Use a different seed per slice to keep slices uncorrelated."""
    return [render(seed, i, **{**preset_kwargs(preset, seed, i), **overrides}) for i in range(start, start + n)]


def _slice(preset: str, doc: str) -> Callable[..., list[StressScene]]:
    def make(seed: int, n: int, start: int = 0, **overrides: Any) -> list[StressScene]:
        return make_split(preset, seed, n, start, **overrides)

    make.__name__, make.__doc__ = f"{preset}_slice", doc
    return make


classification_slice = _slice("classification", "1-4 shapes; the largest has >= 1.5x the next one's visible area.")
single_centered = _slice("single_centered", "One shape at the centre, circumradius 0.1-0.4 of the short side.")
detection_slice = _slice("detection", "1-8 shapes of mixed sizes, cut by the border and overlapping.")
small_objects_slice = _slice("small_objects", "3-8 shapes, circumradius 3-6 % of the long side, 320-1280 px canvases.")
hd_frames = _slice("hd_frames", "1280x720 and 1920x1080 frames with 1-8 shapes.")
segmentation_slice = _slice("segmentation", "1-6 shapes with heavier overlap, for mask quality under occlusion.")
caption_slice = _slice("caption", "Unambiguous largest shape; half the captions relate it to the second largest.")
jpeg_slice = _slice("jpeg", "Detection-like scenes, always JPEG at quality 40-60.")


def _rle(binary: np.ndarray) -> dict[str, Any]:
    """Uncompressed COCO RLE (column-major runs, starting with background)."""
    flat = binary.ravel(order="F").astype(bool)
    cuts = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate([[0], cuts, [flat.size]]))
    counts = ([0] if flat.size and flat[0] else []) + [int(c) for c in runs]
    return {"counts": counts, "size": list(binary.shape)}


def to_coco(scenes: Sequence[StressScene], segmentation: bool = True) -> dict[str, Any]:
    """COCO instances dict (visible-pixel boxes and areas; category_id = class id + 1) for pycocotools."""
    images: list[dict[str, Any]] = []
    anns: list[dict[str, Any]] = []
    for img_id, sc in enumerate(scenes, start=1):
        h, w = sc.mask.shape
        ext = "jpg" if sc.format == "JPEG" else "png"
        images.append({"id": img_id, "width": w, "height": h, "file_name": f"{sc.seed}_{sc.index}.{ext}"})
        for i, ob in enumerate(sc.objects):
            x1, y1, x2, y2 = ob.bbox
            ann = {"id": len(anns) + 1, "image_id": img_id, "category_id": ob.class_id + 1,
                   "bbox": [x1, y1, x2 - x1, y2 - y1], "area": ob.area, "iscrowd": 0}
            if segmentation:
                ann["segmentation"] = _rle(sc.instances == i + 1)
            anns.append(ann)
    cats = [{"id": i + 1, "name": s, "supercategory": "shape"} for i, s in enumerate(SHAPES)]
    return {"images": images, "annotations": anns, "categories": cats}
