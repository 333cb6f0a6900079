"""Resizing, exactly as each model was trained: ours, Ultralytics' predictor, torchvision's ``transforms()``.

Every function takes the decoded image (H x W x 3 uint8 RGB) and returns the
model-size image and the :class:`Transform` that maps answers back. Where a
framework defines the answer, its own library does the resampling (OpenCV's
``INTER_LINEAR`` for Ultralytics' letterbox, Pillow for torchvision's PIL
path) with the framework's own size and padding arithmetic, so the pixels are
the same bit for bit (``tests/fixtures/ultralytics/README.md`` has the
formulas; ``tests/test_pipelines.py`` checks them against the references).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, ImageOps

from optic.server.metadata import InputSpec

_PIL = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
}
_CV2 = {"bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC, "nearest": cv2.INTER_NEAREST}


@dataclass(frozen=True)
class Transform:
    """Where the model's input came from in the original image: input = original * scale + pad."""

    width: int  # original (after EXIF orientation)
    height: int
    scale_x: float
    scale_y: float
    pad_x: float
    pad_y: float

    def to_original(self, boxes: np.ndarray) -> np.ndarray:
        """(K, 4) xyxy boxes in model-input pixels -> original pixels, clipped to the image."""
        out = np.empty_like(boxes, dtype=np.float32)
        out[:, 0::2] = (boxes[:, 0::2] - self.pad_x) / self.scale_x
        out[:, 1::2] = (boxes[:, 1::2] - self.pad_y) / self.scale_y
        out[:, 0::2] = out[:, 0::2].clip(0, self.width)
        out[:, 1::2] = out[:, 1::2].clip(0, self.height)
        return out

    def scaled(self, dx: float, dy: float, width: int, height: int) -> Transform:
        """This transform applied after a decoder's own downscale by (dx, dy) from a ``width x height`` original."""
        return Transform(width, height, self.scale_x * dx, self.scale_y * dy, self.pad_x, self.pad_y)


def resize(pixels: np.ndarray, spec: InputSpec) -> tuple[np.ndarray, Transform]:
    """The decoded image (H, W, 3) uint8 RGB at the model's input size, by the model's pipeline."""
    if spec.pipeline == "ultralytics":
        if spec.resize in ("letterbox", "letterbox_auto"):
            return ultralytics_letterbox(pixels, spec)
        if spec.resize == "center_crop":
            return shorter_side(pixels, spec.size[0], spec.size, "bilinear")
        # classify_transforms with a non-square imgsz: torchvision's Resize((h, w)), exactly that size.
        return stretch(pixels, spec)
    if spec.pipeline == "torchvision":
        if spec.resize == "center_crop":
            return shorter_side(pixels, spec.resize_size or min(spec.size), spec.size, spec.interpolation)
        if spec.resize == "shorter_side":
            return shorter_side(pixels, spec.resize_size or min(spec.size), None, spec.interpolation)
        return stretch(pixels, spec)
    return optic(pixels, spec)


def resized_size(width: int, height: int, spec: InputSpec) -> tuple[int, int]:
    """(w, h) to which :func:`resize` scales a ``width x height`` image before it pads or crops, rounded up: a
    decoder may reduce the image to this and no further, and the resize stays a downscale. Mirrors resize()."""
    th, tw = spec.size

    def scaled(r: float) -> tuple[int, int]:
        return max(1, math.ceil(width * r)), max(1, math.ceil(height * r))

    if spec.pipeline == "ultralytics":
        if spec.resize in ("letterbox", "letterbox_auto"):
            return scaled(min(tw / width, th / height))
        if spec.resize == "center_crop":
            return scaled(spec.size[0] / min(width, height))
        return tw, th
    if spec.pipeline == "torchvision":
        if spec.resize in ("center_crop", "shorter_side"):
            return scaled((spec.resize_size or min(spec.size)) / min(width, height))
        return tw, th  # stretch (and anything else: resize() stretches it)
    if spec.resize == "stretch":
        return tw, th
    if spec.resize == "center_crop":
        return scaled(max(tw / width, th / height))
    return scaled(min(tw / width, th / height))  # optic() letterboxes every other mode


# ---------------------------------------------------------------- ours


def letterbox_geometry(width: int, height: int, size: tuple[int, int]) -> tuple[float, int, int, int, int]:
    """Scale keeping aspect ratio to fit ``size`` (h, w), centred: (scale, new_w, new_h, pad_x, pad_y)."""
    th, tw = size
    r = min(tw / width, th / height)
    nw, nh = max(1, round(width * r)), max(1, round(height * r))
    return r, nw, nh, (tw - nw) // 2, (th - nh) // 2


def optic(pixels: np.ndarray, spec: InputSpec) -> tuple[np.ndarray, Transform]:
    """Our own models' resize (Pillow bilinear): what the export stage trains through."""
    height, width = spec.size
    h0, w0 = pixels.shape[:2]
    if (w0, h0) == (width, height):
        return pixels, Transform(w0, h0, 1.0, 1.0, 0.0, 0.0)
    img = Image.fromarray(pixels)
    if spec.resize == "stretch":
        out = img.resize((width, height), _PIL[spec.interpolation])
        return np.asarray(out), Transform(w0, h0, width / w0, height / h0, 0.0, 0.0)
    if spec.resize == "center_crop":
        r = max(width / w0, height / h0)
        out = ImageOps.fit(img, (width, height), _PIL[spec.interpolation])
        return np.asarray(out), Transform(w0, h0, r, r, (width - w0 * r) / 2, (height - h0 * r) / 2)
    _, nw, nh, px, py = letterbox_geometry(w0, h0, spec.size)
    canvas = Image.new("RGB", (width, height), (spec.pad_value,) * 3)
    canvas.paste(img.resize((nw, nh), _PIL[spec.interpolation]), (px, py))
    return np.asarray(canvas), Transform(w0, h0, nw / w0, nh / h0, float(px), float(py))


def stretch(pixels: np.ndarray, spec: InputSpec) -> tuple[np.ndarray, Transform]:
    height, width = spec.size
    h0, w0 = pixels.shape[:2]
    out = Image.fromarray(pixels).resize((width, height), _PIL[spec.interpolation])
    return np.asarray(out), Transform(w0, h0, width / w0, height / h0, 0.0, 0.0)


# ---------------------------------------------------------------- Ultralytics


def ultralytics_letterbox(pixels: np.ndarray, spec: InputSpec) -> tuple[np.ndarray, Transform]:
    """Ultralytics' ``LetterBox`` at predict time: scale up or down to fit, ``INTER_LINEAR``, centred border of
    114, the odd pixel to the bottom/right; ``letterbox_auto`` (dynamic exports) pads each side only up to a
    multiple of the stride (the minimal rectangle)."""
    h0, w0 = pixels.shape[:2]
    height, width = spec.size
    r = min(height / h0, width / w0)
    nw, nh = max(round(w0 * r), 1), max(round(h0 * r), 1)
    dw, dh = width - nw, height - nh
    if spec.resize == "letterbox_auto":
        dw, dh = dw % spec.stride, dh % spec.stride
    top, bottom = round(dh / 2 - 0.1), round(dh / 2 + 0.1)
    left, right = round(dw / 2 - 0.1), round(dw / 2 + 0.1)
    img = pixels if (w0, h0) == (nw, nh) else cv2.resize(pixels, (nw, nh), interpolation=cv2.INTER_LINEAR)
    pad = (spec.pad_value,) * 3
    img = cv2.copyMakeBorder(img, top, bottom, left, right, cv2.BORDER_CONSTANT, value=pad)
    return img, Transform(w0, h0, nw / w0, nh / h0, float(left), float(top))


# ---------------------------------------------------------------- torchvision (and Ultralytics' classify)


def shorter_side(
    pixels: np.ndarray, side: int, crop: tuple[int, int] | None, interpolation: str
) -> tuple[np.ndarray, Transform]:
    """torchvision's ``Resize(side)`` on a PIL image (shorter side to ``side``, the longer one floored, Pillow's
    antialiased filter), then ``CenterCrop(crop)`` (offsets rounded half to even, zero padding if the crop is
    larger): ``weights.transforms()`` of the classification and segmentation weights, and Ultralytics'
    ``classify_transforms``."""
    h0, w0 = pixels.shape[:2]
    short, long = (w0, h0) if w0 <= h0 else (h0, w0)
    new_short, new_long = side, int(side * long / short)
    nw, nh = (new_short, new_long) if w0 <= h0 else (new_long, new_short)
    img = Image.fromarray(pixels).resize((nw, nh), _PIL[interpolation])
    out = np.asarray(img)
    top = left = 0
    if crop is not None:
        ch, cw = crop
        if ch > nh or cw > nw:  # torchvision pads with zeros first
            padded = np.zeros((max(ch, nh), max(cw, nw), 3), np.uint8)
            py, px = (max(ch, nh) - nh) // 2, (max(cw, nw) - nw) // 2
            padded[py : py + nh, px : px + nw] = out
            out, top, left = padded, -py, -px
        oh, ow = out.shape[:2]
        crop_top, crop_left = round((oh - ch) / 2.0), round((ow - cw) / 2.0)  # Python's round: half to even
        out = out[crop_top : crop_top + ch, crop_left : crop_left + cw]
        top, left = top + crop_top, left + crop_left
    return np.ascontiguousarray(out), Transform(w0, h0, nw / w0, nh / h0, float(-left), float(-top))
