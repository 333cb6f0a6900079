"""Deterministic synthetic scenes: coloured shapes on varied backgrounds.

One generator feeds all four tasks, so every scene carries everything a task
could want: the image, the main shape's label (classification), a box per
object (detection), a per-pixel class map (segmentation) and a sentence
(captioning). Scene ``i`` of seed ``s`` depends on ``(s, i)`` only, so splits
are reproducible, disjoint by seed, and can be generated in any order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

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
# Below this RGB distance a shape would blend into its background.
_MIN_CONTRAST = 110.0


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str  # "large" or "small", relative to the image
    center: tuple[float, float]  # (x, y) pixels
    radius: float
    angle: float  # degrees
    bbox: tuple[float, float, float, float]  # x1, y1, x2, y2 pixels

    @property
    def class_id(self) -> int:
        return SHAPES.index(self.shape)


@dataclass(frozen=True)
class Scene:
    image: np.ndarray  # H x W x 3, uint8, RGB
    mask: np.ndarray  # H x W, uint8: 0 background, 1 + shape class id elsewhere
    objects: tuple[SceneObject, ...]  # objects[0] is the main (largest) shape
    caption: str

    @property
    def label(self) -> int:
        """Class id of the main shape."""
        return self.objects[0].class_id


def _vertices(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "circle":
        count, radii = 48, [r]
    elif shape == "star":
        count, radii = 10, [r, 0.45 * r]
    else:
        count, radii = {"square": 4, "triangle": 3, "hexagon": 6}[shape], [r]
    theta0 = math.radians(angle)
    return [
        (
            cx + radii[k % len(radii)] * math.cos(theta0 + 2 * math.pi * k / count),
            cy + radii[k % len(radii)] * math.sin(theta0 + 2 * math.pi * k / count),
        )
        for k in range(count)
    ]


def _background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """A background image and the colours it is made of (for the contrast check)."""
    c1, c2 = rng.integers(0, 256, size=(2, 3)).astype(np.float32)
    kind = rng.integers(0, 4)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    if kind == 0:  # solid
        img = np.broadcast_to(c1, (size, size, 3)).copy()
        return img, [c1]
    if kind == 1:  # linear gradient in a random direction
        a = rng.uniform(0, 2 * math.pi)
        t = (np.cos(a) * xx + np.sin(a) * yy + 1.5) / 3.0
    elif kind == 2:  # stripes
        a = rng.uniform(0, math.pi)
        period = rng.uniform(0.15, 0.4)
        t = (np.sin((np.cos(a) * xx + np.sin(a) * yy) * 2 * math.pi / period) > 0).astype(np.float32)
        c2 = c1 + np.clip(rng.normal(0, 30, 3), -45, 45)  # low-contrast stripes
    else:  # smooth blotches: upsampled low-resolution noise
        low = rng.uniform(0, 1, size=(4, 4)).astype(np.float32)
        t = (
            np.asarray(
                Image.fromarray((low * 255).astype(np.uint8)).resize((size, size), Image.Resampling.BICUBIC),
                dtype=np.float32,
            )
            / 255.0
        )
    t = t[..., None]
    img = c1 * (1 - t) + c2 * t
    return img, [c1, np.clip(c2, 0, 255)]


def _pick_color(rng: np.random.Generator, background: Sequence[np.ndarray]) -> str:
    names = list(COLORS)
    for idx in rng.permutation(len(names)):
        rgb = np.array(COLORS[names[idx]], dtype=np.float32)
        if all(np.linalg.norm(rgb - bg) >= _MIN_CONTRAST for bg in background):
            return names[idx]
    # No palette colour contrasts with every background colour: take the best.
    dist = [min(np.linalg.norm(np.array(COLORS[n], np.float32) - bg) for bg in background) for n in names]
    return names[int(np.argmax(dist))]


def _overlaps(box: tuple[float, float, float, float], others: list[SceneObject], margin: float) -> bool:
    x1, y1, x2, y2 = box
    return any(
        x1 < o.bbox[2] + margin and o.bbox[0] - margin < x2 and y1 < o.bbox[3] + margin and o.bbox[1] - margin < y2
        for o in others
    )


def _relation(a: SceneObject, b: SceneObject) -> str:
    dx, dy = b.center[0] - a.center[0], b.center[1] - a.center[1]
    if abs(dy) >= abs(dx):
        return "above" if dy > 0 else "below"
    return "left of" if dx > 0 else "right of"


def caption_for(objects: Sequence[SceneObject]) -> str:
    """The scene's sentence: the main shape, and where it sits relative to the next one."""
    main = objects[0]
    text = f"a {main.size} {main.color} {main.shape}"
    if len(objects) > 1:
        other = objects[1]
        text += f" {_relation(main, other)} a {other.size} {other.color} {other.shape}"
    return text


def render_scene(
    rng: np.random.Generator,
    size: int = 64,
    max_distractors: int = 2,
    noise: float = 10.0,
    distractor_scale: tuple[float, float] = (0.08, 0.45),
) -> Scene:
    """One scene: a large main shape and up to ``max_distractors`` smaller ones.

    ``distractor_scale`` bounds a distractor's radius relative to the main shape's.
    """
    canvas, bg_colors = _background(rng, size)
    objects: list[SceneObject] = []
    n_distractors = int(rng.integers(0, max_distractors + 1))
    main_r = rng.uniform(0.2, 0.42) * size
    radii = [main_r] + [rng.uniform(*distractor_scale) * main_r for _ in range(n_distractors)]
    for i, r in enumerate(radii):
        for _ in range(30):  # rejection-sample a free spot
            cx, cy = rng.uniform(r + 1, size - r - 1, size=2)
            box = (max(cx - r, 0.0), max(cy - r, 0.0), min(cx + r, size - 1.0), min(cy + r, size - 1.0))
            if not _overlaps(box, objects, margin=2.0):
                break
        else:
            continue  # no room for this distractor
        shape = SHAPES[int(rng.integers(0, len(SHAPES)))]
        color = _pick_color(rng, bg_colors)
        angle = float(rng.uniform(0, 360))
        pts = np.array(_vertices(shape, cx, cy, r, angle))
        bbox = (
            float(max(pts[:, 0].min(), 0)),
            float(max(pts[:, 1].min(), 0)),
            float(min(pts[:, 0].max(), size - 1)),
            float(min(pts[:, 1].max(), size - 1)),
        )
        objects.append(
            SceneObject(shape, color, "large" if i == 0 else "small", (float(cx), float(cy)), float(r), angle, bbox)
        )
    img = Image.fromarray(canvas.clip(0, 255).astype(np.uint8))
    mask = Image.new("L", (size, size), 0)
    draw, mdraw = ImageDraw.Draw(img), ImageDraw.Draw(mask)
    for obj in objects:
        rgb = np.clip(np.array(COLORS[obj.color]) + rng.integers(-18, 19, size=3), 0, 255)
        vertices = _vertices(obj.shape, *obj.center, obj.radius, obj.angle)
        draw.polygon(vertices, fill=tuple(int(v) for v in rgb))
        mdraw.polygon(vertices, fill=obj.class_id + 1)
    arr = np.asarray(img, dtype=np.float32)
    sigma = rng.uniform(0, noise)
    arr = np.clip(arr + rng.normal(0, sigma, arr.shape), 0, 255).astype(np.uint8)
    return Scene(arr, np.asarray(mask, dtype=np.uint8), tuple(objects), caption_for(objects))


def make_scenes(count: int, seed: int, *, start: int = 0, size: int = 64, **kwargs: Any) -> list[Scene]:
    """Scenes ``start .. start+count-1`` of ``seed``; each is independent of the others."""
    return [render_scene(np.random.default_rng([seed, i]), size=size, **kwargs) for i in range(start, start + count)]


def classification_arrays(scenes: Sequence[Scene]) -> tuple[np.ndarray, np.ndarray]:
    """(N, H, W, 3) uint8 images and (N,) int64 main-shape labels."""
    images = np.stack([s.image for s in scenes])
    labels = np.array([s.label for s in scenes], dtype=np.int64)
    return images, labels
