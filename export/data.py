"""Deterministic synthetic scenes: coloured shapes on varied backgrounds, at any canvas size.

One generator feeds all four tasks, so every scene carries everything a task could want: the image (after the
JPEG round trip a client's upload would have had), its encoded bytes, a per-pixel class map and instance map, a
box per object, and a sentence. Scene ``i`` of seed ``s`` depends on ``(s, i)`` and the style only, so splits are
reproducible, disjoint by seed, and can be generated in any order (and in parallel).

Definitions (docs/models.md):

- an object's *visible area* is the number of pixels it covers (at least half of the pixel) after the shapes
  drawn over it; its box is the extent of those pixels, in pixel-edge coordinates (``x2`` = last column + 1);
- the scene's *largest shape* is the object with the largest visible area; ``objects`` are sorted by visible
  area, so ``objects[0]`` is the largest (the classifier's label and the caption's subject);
- the caption is ``a large <colour> <shape>``, followed, when there is a second shape whose centre (of its
  visible pixels) is at least 5 % of the short side away, by ``to the left of`` / ``to the right of`` / ``above``
  / ``below`` ``a small <colour> <shape>`` for the second largest (the dominant axis of the offset decides).

Two styles: :data:`WIDE`, the training distribution (canvases from 64 px to 1920x1080 at any aspect ratio,
shapes from 10 px across to filling the frame, overlap and border cuts, gradient/textured/striped/cluttered
backgrounds, colour shades, shading, blur, noise, JPEG quality 35-95), and :data:`SIMPLE`, small square scenes
with one large shape and a few smaller ones (the examples and tests use these).
"""

from __future__ import annotations

import colorsys
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from optic.server.metadata import InputSpec

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (45, 85, 220),
    "yellow": (235, 205, 45),
    "purple": (135, 60, 175),
    "orange": (240, 135, 30),
    "white": (240, 240, 240),
    "black": (25, 25, 25),
}
BACKGROUNDS = ("plain", "gradient", "radial", "texture", "stripes", "checker", "blotches")
MIN_RADIUS = 5.0  # 10 px across: the smallest shape a scene holds
_RELATION_MIN_OFFSET = 0.05  # of the short side: closer centres get no relation clause


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str  # "large" for the largest shape, "small" for the others
    center: tuple[float, float]  # (x, y) pixels
    radius: float  # circumradius, pixels
    angle: float  # degrees
    bbox: tuple[float, float, float, float]  # x1, y1, x2, y2 of the visible pixels (pixel edges)
    area: int = 0  # visible pixels
    rgb: tuple[int, int, int] = (0, 0, 0)  # the fill actually drawn

    @property
    def class_id(self) -> int:
        return SHAPES.index(self.shape)


@dataclass(frozen=True, eq=False)
class Scene:
    image: np.ndarray  # H x W x 3, uint8, RGB: what a client would upload, after any JPEG round trip
    mask: np.ndarray  # H x W, uint8: 0 background, 1 + shape class id elsewhere
    objects: tuple[SceneObject, ...]  # sorted by visible area: objects[0] is the largest shape
    caption: str
    instances: np.ndarray | None = None  # H x W, uint8: 0 background, 1 + index into objects
    jpeg: bytes | None = None  # the encoded bytes when the scene went through JPEG
    background: str = "plain"

    @property
    def label(self) -> int:
        """Class id of the largest shape."""
        return self.objects[0].class_id

    @property
    def largest(self) -> int:
        return 0

    @property
    def margin(self) -> float:
        """Visible area of the largest shape over the second's (inf with one shape): how clear 'largest' is."""
        if len(self.objects) < 2:
            return math.inf
        return self.objects[0].area / max(1, self.objects[1].area)

    @property
    def encoded(self) -> bytes:
        """The bytes a client would send: the JPEG, else a PNG of the pixels."""
        if self.jpeg is not None:
            return self.jpeg
        buf = io.BytesIO()
        Image.fromarray(self.image).save(buf, "PNG", compress_level=1)
        return buf.getvalue()


@dataclass(frozen=True)
class Style:
    """How scenes are drawn. ``canvas`` None draws ``size`` x ``size`` squares; "wide" samples canvas sizes."""

    canvas: str | None = None
    size: int = 64
    layouts: tuple[tuple[str, float], ...] = (("main", 1.0),)
    backgrounds: tuple[str, ...] = BACKGROUNDS
    clutter: float = 0.0  # probability of clutter over the background
    max_distractors: int = 2  # "main" layout: smaller shapes beside the main one
    distractor_scale: tuple[float, float] = (0.08, 0.45)  # "main": their radius / the main one's
    noise: tuple[float, float] = (0.0, 10.0)  # sensor noise sigma range (applied with p_noise)
    p_noise: float = 1.0
    p_blur: float = 0.0
    p_tone: float = 0.0
    p_shading: float = 0.0
    jpeg: float = 0.0  # probability of a JPEG round trip
    jpeg_quality: tuple[int, int] = (35, 95)
    shade: float = 0.4  # 0: the reference colours; 1: the full range of shades around each
    contrast: tuple[float, float] = (70.0, 70.0)  # RGB distance a shape keeps from its surroundings
    same_color: float = 0.0  # probability that a shape takes the previous shape's colour


SIMPLE = Style()
WIDE = Style(
    canvas="wide",
    layouts=(("few", 0.33), ("mixed", 0.34), ("small", 0.2), ("single", 0.13)),
    clutter=0.3,
    noise=(1.0, 12.0),
    p_noise=0.45,
    p_blur=0.3,
    p_tone=0.35,
    p_shading=0.6,
    jpeg=0.55,
    shade=1.0,
    contrast=(25.0, 75.0),
    same_color=0.25,
)

# ---------------------------------------------------------------- colour


def shade_of(name: str, rng: np.random.Generator, amount: float = 1.0) -> tuple[int, int, int]:
    """A shade of a named colour: hue, saturation and brightness moved around the reference, in HSV."""
    r, g, b = (c / 255.0 for c in COLORS[name])
    h, s, v = colorsys.rgb_to_hsv(r, g, b)
    if name == "white":
        s, v = rng.uniform(0, 0.1) * amount, 1.0 - rng.uniform(0, 0.2) * amount
        h = rng.uniform(0, 1)
    elif name == "black":
        s, v = rng.uniform(0, 0.35) * amount, 0.1 + rng.uniform(-0.08, 0.1) * amount
        h = rng.uniform(0, 1)
    else:
        h = (h + rng.uniform(-10, 10) / 360.0 * amount) % 1.0
        s = float(np.clip(s * (1 + rng.uniform(-0.4, 0.15) * amount), 0.4, 1.0))
        low = 0.75 if name in ("yellow", "orange") else 0.4
        v = float(np.clip(v * (1 + rng.uniform(-0.3, 0.15) * amount), low, 1.0))
    rgb = colorsys.hsv_to_rgb(h, s, v)
    return tuple(int(round(c * 255)) for c in rgb)  # type: ignore[return-value]  # noqa: RUF046 (numpy scalars)


def _bg_rgb(rng: np.random.Generator) -> np.ndarray:
    """A background colour: mostly muted, sometimes saturated."""
    sat = rng.uniform(0, 0.35) if rng.random() < 0.8 else rng.uniform(0.35, 0.7)
    rgb = colorsys.hsv_to_rgb(rng.uniform(0, 1), sat, rng.uniform(0.08, 0.97))
    return np.array(rgb, np.float32) * 255


# ---------------------------------------------------------------- backgrounds


def _low_res(t: np.ndarray, w: int, h: int) -> Image.Image:
    """A small float map in [0, 1] upsampled smoothly to an h x w 8-bit map."""
    img = Image.fromarray(np.clip(np.rint(t * 255), 0, 255).astype(np.uint8))
    return img.resize((w, h), Image.Resampling.BICUBIC)


def _colorize(t: Image.Image, c1: np.ndarray, c2: np.ndarray) -> Image.Image:
    """An 8-bit map t -> the RGB image c1 * (1 - t) + c2 * t, by lookup tables."""
    ramp = np.arange(256, dtype=np.float32) / 255.0
    bands = [t.point(np.clip(np.rint(c1[k] * (1 - ramp) + c2[k] * ramp), 0, 255).astype(np.uint8).tolist())
             for k in range(3)]
    return Image.merge("RGB", bands)


def _background(kind: str, rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """An h x w RGB background."""
    c1, c2 = _bg_rgb(rng), _bg_rgb(rng)
    if kind == "plain":
        return Image.new("RGB", (w, h), tuple(int(round(v)) for v in c1))  # noqa: RUF046 (numpy scalars round to numpy floats)
    lw, lh = min(w, 64), min(h, 64)  # smooth maps are computed small and upsampled
    if kind == "gradient":
        a = rng.uniform(0, 2 * math.pi)
        t = np.add.outer(np.linspace(-1, 1, lh) * math.sin(a), np.linspace(-1, 1, lw) * math.cos(a))
        tmap = _low_res((t - t.min()) / max(float(np.ptp(t)), 1e-6), w, h)
    elif kind == "radial":
        cx, cy = rng.uniform(-0.2, 1.2, 2)
        ys, xs = np.linspace(0, 1, lh), np.linspace(0, 1, lw)
        low = np.hypot(xs[None, :] - cx, (ys[:, None] - cy) * h / w) / rng.uniform(0.5, 1.5)
        tmap = _low_res(np.clip(low, 0, 1), w, h)
    elif kind == "texture":  # value noise at two or three octaves
        acc = np.zeros((h, w), np.float32)
        for cell, weight in ((rng.uniform(2.5, 6), 0.3), (rng.uniform(10, 40), 0.6), (max(w, h) / 3, 1.0)):
            if rng.random() < 0.8:
                grid = rng.uniform(0, 1, (max(2, int(h / cell) + 2), max(2, int(w / cell) + 2)))
                acc += weight * np.asarray(_low_res(grid, w, h), np.float32)
        acc -= acc.min()
        acc *= 255.0 / max(float(acc.max()), 1e-6)
        tmap = Image.fromarray(acc.astype(np.uint8))
    elif kind == "blotches":
        tmap = _low_res(rng.uniform(0, 1, (int(rng.integers(2, 7)), int(rng.integers(2, 7)))), w, h)
    elif kind in ("stripes", "checker"):
        period = rng.uniform(3, max(4, min(w, h) / 6))
        a = rng.uniform(0, math.pi)
        u = np.floor(np.add.outer(np.arange(h, dtype=np.float32) * np.float32(math.sin(a) / period),
                                  np.arange(w, dtype=np.float32) * np.float32(math.cos(a) / period)))
        if kind == "checker":
            u += np.floor(np.add.outer(np.arange(h, dtype=np.float32) * np.float32(math.cos(a) / period),
                                       np.arange(w, dtype=np.float32) * np.float32(-math.sin(a) / period)))
        tmap = Image.fromarray(((u.astype(np.int64) & 1) * 255).astype(np.uint8))
        c2 = np.clip(c1 * rng.uniform(0.65, 1.35) + rng.uniform(-15, 15, 3), 0, 255)  # moderate texture contrast
    else:
        raise ValueError(f"unknown background {kind!r}")
    return _colorize(tmap, c1, c2)


def _clutter(img: Image.Image, rng: np.random.Generator) -> None:
    """Lines, arcs, thin bars and slivers in muted colours: things that are not one of the five shapes."""
    w, h = img.size
    draw = ImageDraw.Draw(img)
    short = min(w, h)
    for _ in range(int(min(400, 15 + w * h / rng.uniform(2500, 8000)))):
        rgb = colorsys.hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0, 0.45), rng.uniform(0.15, 0.85))
        fill = tuple(int(c * 255) for c in rgb)
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        length = rng.uniform(0.02, 0.3) * short
        a = rng.uniform(0, 2 * math.pi)
        kind = rng.integers(4)
        width = max(1, int(rng.uniform(0.5, 0.012 * short + 1.5)))
        if kind == 0:
            draw.line([(x, y), (x + length * math.cos(a), y + length * math.sin(a))], fill=fill, width=width)
        elif kind == 1:
            box = [x - length / 2, y - length / 2, x + length / 2, y + length / 2]
            start = rng.uniform(0, 360)
            draw.arc(box, start, start + rng.uniform(40, 200), fill=fill, width=width)
        elif kind == 2:  # a thin bar
            thick = length * rng.uniform(0.06, 0.2)
            dx, dy = math.cos(a), math.sin(a)
            pts = [
                (x - dx * length / 2 - dy * thick, y - dy * length / 2 + dx * thick),
                (x + dx * length / 2 - dy * thick, y + dy * length / 2 + dx * thick),
                (x + dx * length / 2 + dy * thick, y + dy * length / 2 - dx * thick),
                (x - dx * length / 2 + dy * thick, y - dy * length / 2 - dx * thick),
            ]
            draw.polygon(pts, fill=fill)
        else:  # a sliver: a long, thin ellipse, rotated
            k = np.arange(16) * 2 * math.pi / 16
            ex, ey = length / 2 * np.cos(k), length * rng.uniform(0.08, 0.25) / 2 * np.sin(k)
            pts = list(
                zip(x + ex * math.cos(a) - ey * math.sin(a), y + ex * math.sin(a) + ey * math.cos(a), strict=True)
            )
            draw.polygon(pts, fill=fill)


# ---------------------------------------------------------------- geometry


def vertices(shape: str, cx: float, cy: float, r: float, angle: float, variant: float = 0.5) -> np.ndarray | None:
    """(K, 2) polygon of a shape with circumradius r (None: a circle). ``variant`` in [0, 1) picks the
    triangle's apex angle and the star's inner radius."""
    t0 = math.radians(angle)
    if shape == "circle":
        return None
    if shape == "square":
        ang = t0 + np.arange(4) * math.pi / 2
        radii: np.ndarray | float = r
    elif shape == "hexagon":
        ang = t0 + np.arange(6) * math.pi / 3
        radii = r
    elif shape == "triangle":
        if variant < 0.5:
            ang = t0 + np.arange(3) * 2 * math.pi / 3  # equilateral
        else:  # isosceles, apex angle 35-85 degrees
            apex = math.radians(35 + (variant - 0.5) * 2 * 50)
            ang = t0 + np.array([0.0, math.pi - apex, math.pi + apex])
        radii = r
    elif shape == "star":
        ang = t0 + np.arange(10) * math.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, r * (0.36 + 0.22 * variant))
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return np.stack([cx + radii * np.cos(ang), cy + radii * np.sin(ang)], 1)


def _coverage(
    poly: np.ndarray | None, cx: float, cy: float, r: float, w: int, h: int
) -> tuple[int, int, np.ndarray]:
    """Anti-aliased coverage (0..1) of a shape in its canvas-clipped window: (x0, y0, alpha).

    Drawn by Pillow at up to 4x and box-filtered down; coordinates are pixel edges (pixel i covers [i, i+1)).
    """
    lo = np.array([cx - r, cy - r]) if poly is None else poly.min(0)
    hi = np.array([cx + r, cy + r]) if poly is None else poly.max(0)
    x0, y0 = max(int(math.floor(lo[0])), 0), max(int(math.floor(lo[1])), 0)  # noqa: RUF046 (numpy scalars round to numpy floats)
    x1, y1 = min(int(math.ceil(hi[0])) + 1, w), min(int(math.ceil(hi[1])) + 1, h)  # noqa: RUF046 (numpy scalars round to numpy floats)
    if x1 <= x0 or y1 <= y0:
        return 0, 0, np.zeros((0, 0), np.float32)
    bw, bh = x1 - x0, y1 - y0
    ss = 4 if bw * bh <= 40_000 else 2 if bw * bh <= 400_000 else 1
    big = Image.new("L", (bw * ss, bh * ss), 0)
    draw = ImageDraw.Draw(big)
    # Pillow fills the pixels whose centres lie inside: shift pixel-edge coordinates by half a (big) pixel.
    if poly is None:
        box = [(cx - r - x0) * ss - 0.5, (cy - r - y0) * ss - 0.5, (cx + r - x0) * ss - 0.5, (cy + r - y0) * ss - 0.5]
        draw.ellipse(box, fill=255)
    else:
        pts = (poly - (x0, y0)) * ss - 0.5
        draw.polygon([tuple(p) for p in pts.tolist()], fill=255)
    if ss > 1:
        big = big.reduce(ss)
    return x0, y0, np.asarray(big, np.float32) / 255.0


@dataclass
class _Placed:
    shape: str
    cx: float
    cy: float
    r: float
    angle: float
    poly: np.ndarray | None
    x0: int
    y0: int
    alpha: np.ndarray
    full: int = 0  # covered pixels without occlusion

    def window(self) -> tuple[slice, slice]:
        return slice(self.y0, self.y0 + self.alpha.shape[0]), slice(self.x0, self.x0 + self.alpha.shape[1])


def _radii(rng: np.random.Generator, layout: str, w: int, h: int, style: Style) -> list[float]:
    short, long = min(w, h), max(w, h)

    def logu(lo: float, hi: float, n: int) -> np.ndarray:
        lo, hi = max(lo, MIN_RADIUS), max(hi, MIN_RADIUS + 0.5)
        return np.exp(rng.uniform(math.log(lo), math.log(hi), n))

    if layout == "main":  # one large shape and smaller ones beside it
        main = rng.uniform(0.2, 0.42) * short
        n = int(rng.integers(0, style.max_distractors + 1))
        return [main, *(rng.uniform(*style.distractor_scale) * main for _ in range(n))]
    if layout == "few":
        return list(logu(0.1 * short, 0.6 * short, int(rng.integers(1, 4))))
    if layout == "mixed":
        return list(logu(0.03 * short, 0.35 * short, int(rng.integers(2, 9))))
    if layout == "small":
        return list(logu(MIN_RADIUS, 0.07 * long, int(rng.integers(3, 13))))
    if layout == "single":
        return list(logu(0.06 * short, 0.48 * short, 1))
    raise ValueError(f"unknown layout {layout!r}")


def _layout(rng: np.random.Generator, w: int, h: int, layout: str, style: Style) -> list[_Placed]:
    radii = sorted(_radii(rng, layout, w, h, style), reverse=True)
    simple = layout == "main"
    # Centres stay >= gap * (r_i + r_j) apart: below 1 shapes overlap; half the scenes overlap heavily.
    gap = 1.0 if simple else rng.uniform(0.3, 0.6) if rng.random() < 0.5 else rng.uniform(0.6, 1.05)
    cut = 0.0 if simple else rng.uniform(0.0, 0.8)  # how far a shape may reach past the border, in radii
    placed: list[_Placed] = []
    owner = np.zeros((h, w), np.int16)  # which placed shape owns each pixel (drawn later = on top)
    for r in radii:
        r = float(min(r, 0.65 * min(w, h) if not simple else r))
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        angle = float(rng.uniform(0, 360))
        variant = float(rng.uniform(0, 1))
        for _ in range(25):
            if layout == "single":
                cx, cy = w / 2 + rng.normal(0, 0.05) * w, h / 2 + rng.normal(0, 0.05) * h
            else:  # the centre stays at least (1 - cut) radii inside the frame
                reach = r * (1 - cut) + (1.0 if simple else 0.0)
                cx = rng.uniform(reach, w - reach) if w > 2 * reach else w / 2
                cy = rng.uniform(reach, h - reach) if h > 2 * reach else h / 2
            if simple:  # disjoint boxes, as the simple scenes always were
                ok = all(abs(cx - p.cx) > r + p.r + 2 or abs(cy - p.cy) > r + p.r + 2 for p in placed)
            else:
                ok = all(math.hypot(cx - p.cx, cy - p.cy) >= gap * (r + p.r) for p in placed)
            if ok:
                break
        else:
            continue
        poly = vertices(shape, cx, cy, r, angle, variant)
        x0, y0, alpha = _coverage(poly, cx, cy, r, w, h)
        if alpha.size == 0:
            continue
        hard = alpha >= 0.5
        full = int(hard.sum())
        if poly is None:
            geometric = math.pi * r * r
        else:  # the shoelace formula (np.cross of 2-vectors is deprecated)
            nxt = np.roll(poly, -1, 0)
            geometric = 0.5 * abs(float((poly[:, 0] * nxt[:, 1] - poly[:, 1] * nxt[:, 0]).sum()))
        if full < 12 or full < 0.35 * min(geometric, 0.5 * w * h):  # mostly outside the frame: not a scene object
            continue
        window = (slice(y0, y0 + alpha.shape[0]), slice(x0, x0 + alpha.shape[1]))
        # Placing this shape on top must leave every earlier shape at least 35 % visible.
        under = owner[window][hard]
        if under.any():
            lost = np.bincount(under, minlength=len(placed) + 1)[1:]
            visible = np.bincount(owner.ravel(), minlength=len(placed) + 1)[1:]
            if any(v - lo < 0.35 * p.full or v - lo < 12 for v, lo, p in zip(visible, lost, placed, strict=True) if lo):
                continue
        owner[window][hard] = len(placed) + 1
        placed.append(_Placed(shape, cx, cy, r, angle, poly, x0, y0, alpha, full))
    return placed


def _canvas_size(rng: np.random.Generator, style: Style) -> tuple[int, int]:
    if style.canvas is None:
        return style.size, style.size
    long = math.exp(rng.uniform(math.log(64), math.log(1920)))
    aspect = 1.0 if rng.random() < 0.25 else float(rng.choice([4 / 3, 16 / 9, 3 / 2])) if rng.random() < 0.3 else 0.0
    if aspect == 0.0:
        aspect = math.exp(rng.uniform(0, math.log(2.2)))
    w, h = long, long / aspect
    w, h = min(w, 1920), min(h, 1080)
    w, h = max(48, round(w)), max(48, round(h))
    return (w, h) if rng.random() < 0.7 else (h, w)  # landscape or portrait


# ---------------------------------------------------------------- photometric damage


@lru_cache(maxsize=1)
def _noise_bank() -> np.ndarray:
    """A fixed field of unit Gaussian noise that scenes crop from (cheaper than fresh noise per pixel)."""
    return np.random.default_rng(12345).standard_normal((512, 512, 3)).astype(np.float32)


def _noise(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """h x w x 3 unit noise: a wrapped crop of the bank at a random offset, channels shuffled."""
    bank = _noise_bank()[:, :, rng.permutation(3)]
    oy, ox = int(rng.integers(512)), int(rng.integers(512))
    if h + oy > 512 or w + ox > 512:
        bank = np.pad(bank, ((0, max(0, h + oy - 512)), (0, max(0, w + ox - 512)), (0, 0)), mode="wrap")
    return bank[oy : oy + h, ox : ox + w]


def _photometric(img: np.ndarray, rng: np.random.Generator, style: Style) -> np.ndarray:
    """uint8 canvas -> tone change, blur and noise, each with its own probability."""
    out = img
    if rng.random() < style.p_tone:
        lut = (np.arange(256, dtype=np.float32) - 128.0) * rng.uniform(0.75, 1.25) + 128.0 + rng.uniform(-25, 25)
        out = np.clip(np.rint(lut), 0, 255).astype(np.uint8)[out]
    if rng.random() < style.p_blur:
        pil = Image.fromarray(out)
        kind = rng.random()
        if kind < 0.6:
            pil = pil.filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 1.6)))
        elif kind < 0.8:
            pil = pil.filter(ImageFilter.BoxBlur(rng.uniform(0.5, 1.5)))
        else:  # motion blur along a random axis
            k = np.zeros((5, 5), np.float32)
            if rng.random() < 0.5:
                k[2, :] = 1
            else:
                k[:, 2] = 1
            if rng.random() < 0.5:
                k = np.eye(5, dtype=np.float32)[:: int(rng.choice([-1, 1]))]
            pil = pil.filter(ImageFilter.Kernel((5, 5), k.ravel().tolist(), scale=float(k.sum())))
        out = np.asarray(pil)
    if rng.random() < style.p_noise:
        sigma = rng.uniform(*style.noise)
        noisy = _noise(rng, *out.shape[:2]) * np.float32(sigma)
        noisy += out
        out = np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
    elif style.canvas is None and style.noise[1] > 0:  # simple scenes: always a little noise, as they always had
        sigma = rng.uniform(*style.noise)
        out = np.clip(out + rng.normal(0, sigma, out.shape), 0, 255).astype(np.uint8)
    return out


# ---------------------------------------------------------------- scenes


def _relation(inst: np.ndarray, a: int, b: int, short: int) -> str | None:
    """Where object a sits relative to object b (centres of their visible pixels), or None when too close."""
    (ay, ax), (by, bx) = (np.argwhere(inst == k + 1).mean(0) for k in (a, b))
    dx, dy = ax - bx, ay - by
    if max(abs(dx), abs(dy)) < _RELATION_MIN_OFFSET * short:
        return None
    if abs(dx) >= abs(dy):
        return "to the left of" if dx < 0 else "to the right of"
    return "above" if dy < 0 else "below"


def caption_for(objects: Sequence[SceneObject], relation: str | None) -> str:
    main = objects[0]
    text = f"a large {main.color} {main.shape}"
    if relation is not None and len(objects) > 1:
        other = objects[1]
        text += f" {relation} a small {other.color} {other.shape}"
    return text


def _pick_color(
    rng: np.random.Generator, canvas: np.ndarray, p: _Placed, style: Style, previous: str | None = None
) -> tuple[str, tuple[int, int, int]]:
    """A named colour whose shade stands out from what surrounds the shape (a ring just outside it, RGB
    distance at the 20th percentile above a threshold drawn from ``style.contrast``); sometimes
    (``style.same_color``) simply the previous shape's colour, so touching shapes of one colour occur."""
    h, w = canvas.shape[:2]
    k = np.arange(24) * 2 * math.pi / 24
    ring = 1.12 * p.r + 2
    xs = np.clip((p.cx + ring * np.cos(k)).astype(int), 0, w - 1)
    ys = np.clip((p.cy + ring * np.sin(k)).astype(int), 0, h - 1)
    around = canvas[ys, xs].astype(np.float32)
    inside = canvas[int(np.clip(p.cy, 0, h - 1)), int(np.clip(p.cx, 0, w - 1))][None].astype(np.float32)
    around = np.concatenate([around, inside])
    names = list(COLORS)
    if previous is not None and rng.random() < style.same_color:  # a neighbour of the same colour, as it comes
        return previous, shade_of(previous, rng, style.shade)
    threshold = rng.uniform(*style.contrast)
    best: tuple[float, str, tuple[int, int, int]] | None = None
    for _attempt in range(6):
        name = names[int(rng.integers(len(names)))]
        rgb = shade_of(name, rng, style.shade)
        score = float(np.percentile(np.linalg.norm(around - np.array(rgb, np.float32), axis=1), 20))
        if score >= threshold:
            return name, rgb
        if best is None or score > best[0]:
            best = (score, name, rgb)
    assert best is not None
    return best[1], best[2]


def render_scene(rng: np.random.Generator, style: Style = SIMPLE) -> Scene:
    """One scene drawn with ``style``; the result depends only on the generator's state and the style."""
    w, h = _canvas_size(rng, style)
    names, weights = zip(*style.layouts, strict=True)
    layout = names[int(rng.choice(len(names), p=np.array(weights) / sum(weights)))]
    placed: list[_Placed] = []
    for _ in range(10):
        placed = _layout(rng, w, h, layout, style)
        if placed:
            break
    bg_kind = style.backgrounds[int(rng.integers(len(style.backgrounds)))]
    pil = _background(bg_kind, rng, w, h)
    if style.clutter and rng.random() < style.clutter:
        _clutter(pil, rng)
    canvas = np.array(pil)  # uint8, writable
    inst = np.zeros((h, w), np.uint8)
    drawn: list[tuple[_Placed, str, tuple[int, int, int]]] = []
    for i, p in enumerate(placed):
        name, rgb = _pick_color(rng, canvas, p, style, drawn[-1][1] if drawn else None)
        win = p.window()
        a = p.alpha[..., None]
        fill = np.array(rgb, np.float32)
        if rng.random() < style.p_shading:  # a gentle linear shading across the shape
            hh, ww = p.alpha.shape
            ang = rng.uniform(0, 2 * math.pi)
            g = np.add.outer(np.arange(hh) * math.sin(ang), np.arange(ww) * math.cos(ang))
            g = (g - g.mean()) / max(hh, ww, 1)
            fill = fill * (1 + rng.uniform(0.05, 0.3) * g)[..., None]
        canvas[win] = np.rint(canvas[win] * (1 - a) + np.clip(fill, 0, 255) * a).astype(np.uint8)
        inst[win][p.alpha >= 0.5] = i + 1
        drawn.append((p, name, rgb))
    image = _photometric(canvas, rng, style)
    jpeg = None
    if style.jpeg and rng.random() < style.jpeg:
        buf = io.BytesIO()
        quality = int(rng.integers(style.jpeg_quality[0], style.jpeg_quality[1] + 1))
        subsampling = 0 if rng.random() < 0.2 else 2  # 4:4:4 sometimes, 4:2:0 mostly
        Image.fromarray(image).save(buf, "JPEG", quality=quality, subsampling=subsampling)
        jpeg = buf.getvalue()
        image = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
    # Objects by visible area, largest first; the instance map follows the new order.
    areas = np.bincount(inst.ravel(), minlength=len(drawn) + 1)[1:]
    order = [int(i) for i in np.argsort(-areas, kind="stable") if areas[i] > 0]
    remap = np.zeros(len(drawn) + 1, np.uint8)
    objects: list[SceneObject] = []
    for new, old in enumerate(order):
        remap[old + 1] = new + 1
        p, name, rgb = drawn[old]
        ys, xs = np.nonzero(inst[p.window()] == old + 1)
        bbox = (
            float(p.x0 + xs.min()),
            float(p.y0 + ys.min()),
            float(p.x0 + xs.max() + 1),
            float(p.y0 + ys.max() + 1),
        )
        objects.append(
            SceneObject(
                p.shape, name, "large" if new == 0 else "small", (p.cx, p.cy), p.r, p.angle, bbox, int(areas[old]), rgb
            )
        )
    inst = remap[inst]
    lut = np.array([0] + [o.class_id + 1 for o in objects], np.uint8)
    relation = _relation(inst, 0, 1, min(w, h)) if len(objects) > 1 else None
    return Scene(image, lut[inst], tuple(objects), caption_for(objects, relation), inst, jpeg, bg_kind)


def scene_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, index])


def make_scenes(
    count: int, seed: int, *, start: int = 0, size: int = 64, style: Style | None = None, **overrides: Any
) -> list[Scene]:
    """Scenes ``start .. start+count-1`` of ``seed``; each is independent of the others.

    The default style is :data:`SIMPLE` at ``size`` x ``size``; ``overrides`` replace fields of the style
    (e.g. ``max_distractors=3``).
    """
    style = replace(style or replace(SIMPLE, size=size), **overrides)
    return [render_scene(scene_rng(seed, i), style) for i in range(start, start + count)]


def classification_arrays(scenes: Sequence[Scene]) -> tuple[np.ndarray, np.ndarray]:
    """(N, H, W, 3) uint8 images and (N,) int64 largest-shape labels (scenes of one size)."""
    images = np.stack([s.image for s in scenes])
    labels = np.array([s.label for s in scenes], dtype=np.int64)
    return images, labels


# ---------------------------------------------------------------- training arrays (through the server's resize)


@dataclass(frozen=True, eq=False)
class TrainingSet:
    """Scenes as one model input size sees them, after the server's own ``preprocess``."""

    images: np.ndarray  # (N, H, W, 3) uint8: the model input before scaling by 1/255
    masks: np.ndarray  # (N, H, W) uint8 class ids at input resolution (0 also in letterbox padding)
    boxes: list[np.ndarray]  # per scene (K, 5): x1, y1, x2, y2 in input pixels, class id
    labels: np.ndarray  # (N,) largest shape's class id
    margins: np.ndarray  # (N,) float32 largest / second-largest visible area (inf: one shape)
    captions: list[str]

    def __len__(self) -> int:
        return len(self.images)


def to_input(scene: Scene, spec: InputSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image uint8 HxWx3, class map HxW, boxes (K, 5)) of one scene at the model's input, by ``preprocess``.

    The class map holds the class under each input pixel's centre (the inverse of ``segment.class_map``).
    """
    from optic.server.tasks.image import preprocess

    if spec.scale != 1.0 / 255.0 or spec.mean != (0.0, 0.0, 0.0) or spec.std != (1.0, 1.0, 1.0):
        raise ValueError("training arrays are stored as uint8: the input spec must be x / 255")
    tensor, t = preprocess(scene.image, spec)
    image = np.rint(np.moveaxis(tensor, 0, -1) * 255.0).astype(np.uint8)
    height, width = spec.size
    h0, w0 = scene.mask.shape
    cols = np.floor((np.arange(width) + 0.5 - t.pad_x) / t.scale_x).astype(np.int64)
    rows = np.floor((np.arange(height) + 0.5 - t.pad_y) / t.scale_y).astype(np.int64)
    inside = ((rows >= 0) & (rows < h0))[:, None] & ((cols >= 0) & (cols < w0))[None, :]
    mask = scene.mask[rows.clip(0, h0 - 1)[:, None], cols.clip(0, w0 - 1)[None, :]]
    mask = np.where(inside, mask, 0).astype(np.uint8)
    boxes = np.array(
        [
            [o.bbox[0] * t.scale_x + t.pad_x, o.bbox[1] * t.scale_y + t.pad_y,
             o.bbox[2] * t.scale_x + t.pad_x, o.bbox[3] * t.scale_y + t.pad_y, o.class_id]
            for o in scene.objects
        ],
        np.float32,
    ).reshape(-1, 5)
    return image, mask, boxes


def _render_chunk(args: tuple[int, int, int, Style, InputSpec]) -> list[tuple[Any, ...]]:
    seed, start, count, style, spec = args
    out = []
    for i in range(start, start + count):
        scene = render_scene(scene_rng(seed, i), style)
        image, mask, boxes = to_input(scene, spec)
        out.append((image, mask, boxes, scene.label, scene.margin, scene.caption))
    return out


def training_set(
    count: int,
    seed: int,
    spec: InputSpec,
    style: Style = WIDE,
    *,
    start: int = 0,
    workers: int = 2,
    progress: bool = True,
) -> TrainingSet:
    """Scenes ``start .. start+count-1`` of ``seed`` rendered and brought to ``spec``, ``workers`` processes at a
    time (the result does not depend on ``workers``). With ``OPTIC_EXPORT_CACHE`` set to a folder, the arrays
    are kept there between runs (development only: keyed by this file's source and the arguments)."""
    import hashlib
    import os
    import pickle
    from pathlib import Path

    from tqdm.auto import tqdm

    cache_dir = os.environ.get("OPTIC_EXPORT_CACHE")
    cache: Path | None = None
    if cache_dir:
        key = hashlib.sha256(Path(__file__).read_bytes() + repr((count, seed, spec, style, start)).encode())
        cache = Path(cache_dir) / f"scenes-{key.hexdigest()[:20]}.pkl"
        if cache.exists():
            with cache.open("rb") as f:
                cached: TrainingSet = pickle.load(f)
            return cached
    chunk = 64
    jobs = [(seed, s, min(chunk, start + count - s), style, spec) for s in range(start, start + count, chunk)]
    rows: list[tuple[Any, ...]] = []
    bar = tqdm(total=count, desc="scenes", unit="scene", disable=not progress)
    if workers > 1 and len(jobs) > 1:
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(workers) as pool:
            for part in pool.imap(_render_chunk, jobs):
                rows.extend(part)
                bar.update(len(part))
    else:
        for job in jobs:
            part = _render_chunk(job)
            rows.extend(part)
            bar.update(len(part))
    bar.close()
    result = TrainingSet(
        np.stack([r[0] for r in rows]),
        np.stack([r[1] for r in rows]),
        [r[2] for r in rows],
        np.array([r[3] for r in rows], np.int64),
        np.array([r[4] for r in rows], np.float32),
        [r[5] for r in rows],
    )
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        with tmp.open("wb") as f:
            pickle.dump(result, f, protocol=pickle.HIGHEST_PROTOCOL)
        tmp.replace(cache)
    return result


__all__ = [
    "BACKGROUNDS",
    "COLORS",
    "SHAPES",
    "SIMPLE",
    "WIDE",
    "Scene",
    "SceneObject",
    "Style",
    "TrainingSet",
    "caption_for",
    "classification_arrays",
    "make_scenes",
    "render_scene",
    "scene_rng",
    "shade_of",
    "to_input",
    "training_set",
    "vertices",
]
