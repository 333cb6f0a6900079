"""Annotated images for ``optic infer --save-vis``: boxes with labels, translucent masks, captions."""

from __future__ import annotations

import io
import textwrap

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from server.client import Classification, Detection, Segmentation

# A fixed palette (class id -> colour), so the same class looks the same everywhere.
PALETTE = np.array(
    [
        (0, 0, 0),
        (230, 25, 75),
        (60, 180, 75),
        (255, 225, 25),
        (0, 130, 200),
        (245, 130, 48),
        (145, 30, 180),
        (70, 240, 240),
        (240, 50, 230),
        (210, 245, 60),
        (250, 190, 190),
        (0, 128, 128),
    ],
    dtype=np.uint8,
)


def colour(class_id: int) -> tuple[int, int, int]:
    r, g, b = PALETTE[1 + class_id % (len(PALETTE) - 1)]
    return int(r), int(g), int(b)


def load(data: bytes) -> Image.Image:
    return ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")


def boxes(img: Image.Image, detections: list[Detection]) -> Image.Image:
    out = img.copy()
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default()
    for d in detections:
        c = colour(d.class_id)
        draw.rectangle(d.box, outline=c, width=max(1, round(min(img.size) / 150)))
        text = f"{d.label} {d.score:.2f}"
        x, y = d.box[0], max(0, d.box[1] - 11)
        draw.rectangle(draw.textbbox((x, y), text, font=font), fill=c)
        draw.text((x, y), text, fill=(255, 255, 255), font=font)
    return out


def mask_overlay(img: Image.Image, seg: Segmentation, alpha: float = 0.5) -> Image.Image:
    colours = np.array([(0, 0, 0)] + [colour(i) for i in range(255)], dtype=np.float32)[:256]
    base = np.asarray(img, dtype=np.float32)
    tint = colours[seg.mask.astype(np.int64)]
    painted = seg.mask > 0  # class 0 is background: left as it is
    base[painted] = (1 - alpha) * base[painted] + alpha * tint[painted]
    return Image.fromarray(base.astype(np.uint8))


def with_caption(img: Image.Image, text: str) -> Image.Image:
    """The image with ``text`` written under it on a white band."""
    font = ImageFont.load_default()
    lines = textwrap.wrap(text, width=max(10, img.width // 7)) or [""]
    band = 14 * len(lines) + 8
    out = Image.new("RGB", (img.width, img.height + band), (255, 255, 255))
    out.paste(img, (0, 0))
    draw = ImageDraw.Draw(out)
    for i, line in enumerate(lines):
        draw.text((4, img.height + 4 + 14 * i), line, fill=(0, 0, 0), font=font)
    return out


def labels(img: Image.Image, classes: list[Classification]) -> Image.Image:
    return with_caption(img, ", ".join(f"{c.label} {c.score:.2f}" for c in classes[:3]))
