"""Segmentation post-processing: logits -> class map at the original image size, PNG, counts, RLE."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from server.tasks.image import Transform


@dataclass(frozen=True)
class ClassMask:
    class_id: int
    pixel_count: int
    rle_counts: tuple[int, ...] = ()


def class_map(logits: np.ndarray, transform: Transform) -> np.ndarray:
    """(C, h, w) logits at model size -> (H, W) uint8 class ids at the original size, nearest sampling.

    Each original pixel centre is mapped through the resize transform into the
    model's grid, so stretch, letterbox (padding cut away) and centre-crop
    (outside the crop: class 0) are all handled by one rule.
    """
    labels = logits.argmax(0).astype(np.uint8)
    h_in, w_in = labels.shape
    cols = np.floor((np.arange(transform.width) + 0.5) * transform.scale_x + transform.pad_x).astype(np.int64)
    rows = np.floor((np.arange(transform.height) + 0.5) * transform.scale_y + transform.pad_y).astype(np.int64)
    col_ok, row_ok = (cols >= 0) & (cols < w_in), (rows >= 0) & (rows < h_in)
    out = labels[rows.clip(0, h_in - 1)[:, None], cols.clip(0, w_in - 1)[None, :]]
    out[~(row_ok[:, None] & col_ok[None, :])] = 0
    return out


def png(mask: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(mask, "L").save(buf, "PNG", optimize=False, compress_level=1)
    return buf.getvalue()


def rle(binary: np.ndarray) -> tuple[int, ...]:
    """COCO uncompressed RLE: column-major run lengths, beginning with a (possibly empty) run of zeros."""
    flat = binary.T.ravel().astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0] == 1:
        counts.insert(0, 0)
    return tuple(int(c) for c in counts)


def summarise(mask: np.ndarray, num_classes: int, with_rle: bool) -> list[ClassMask]:
    counts = np.bincount(mask.ravel(), minlength=num_classes)
    return [ClassMask(c, int(n), rle(mask == c) if with_rle else ()) for c, n in enumerate(counts.tolist()) if n > 0]
