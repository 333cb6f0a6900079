"""Drawing helpers the task modules share for ``optic infer --save-vis``: a fixed palette and a text band."""

from __future__ import annotations

import io
import textwrap

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

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
    """The image as the server sees it: EXIF orientation applied, RGB."""
    return ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")


def boxes(img: Image.Image, items: list[tuple[tuple[float, float, float, float], int, str]]) -> Image.Image:
    """Outlined boxes with a label tab: (box, class id, text) each."""
    out = img.copy()
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default()
    for box, class_id, text in items:
        c = colour(class_id)
        draw.rectangle(box, outline=c, width=max(1, round(min(img.size) / 150)))
        x, y = box[0], max(0, box[1] - 11)
        draw.rectangle(draw.textbbox((x, y), text, font=font), fill=c)
        draw.text((x, y), text, fill=(255, 255, 255), font=font)
    return out


def tint(img: Image.Image, painted: np.ndarray, colours: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """Blend ``colours`` (H, W, 3) over the pixels where ``painted`` (H, W) is set."""
    base = np.asarray(img, dtype=np.float32).copy()
    base[painted] = (1 - alpha) * base[painted] + alpha * colours[painted]
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
