"""Finding, checking and decoding image and mask files.

Checking happens when the dataset is read, decoding when training asks: a truncated file should stop (or be
counted) before an hour of training, not in the middle of it, yet reading 100k headers must stay cheap.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from optic.export.datasets.base import DatasetError, Notes

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
UNREADABLE = "unreadable or truncated image"
MISSING_IMAGE = "image file missing"
_EXIF_ORIENTATION = 0x0112
_SWAPS_SIDES = (5, 6, 7, 8)  # EXIF orientations that turn the image by 90 degrees
_WIDE_GREY = ("I", "I;16", "I;16B", "I;16L", "I;16N")


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def list_images(folder: Path) -> list[Path]:
    """Every image under ``folder``, recursively, in sorted order; hidden files and folders (``.ipynb_checkpoints``,
    ``.DS_Store``) are not data."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(p for name in filenames if is_image_file(p := Path(dirpath, name)))
    return sorted(found)


def subfolders(folder: Path) -> list[Path]:
    """Visible sub-folders, sorted: the order class ids are given in."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _ends_with_eoi(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-2, os.SEEK_END)
        return f.read(2) == b"\xff\xd9"


def probe_image(path: Path) -> tuple[int, int]:
    """(width, height) after EXIF orientation, raising ``OSError``/``ValueError`` for a file that will not decode.

    PNG chunks are CRC-checked by ``verify()`` without decompressing; a JPEG is decoded only when it does not end in
    its end-of-image marker (truncated, or trailing bytes); other formats are decoded, being rare in datasets.
    """
    with Image.open(path) as img:
        width, height = img.size
        rotated = img.getexif().get(_EXIF_ORIENTATION, 1) in _SWAPS_SIDES
        if img.format == "JPEG" and _ends_with_eoi(path):
            pass
        elif img.format != "PNG":
            img.load()
    if img.format == "PNG":
        with Image.open(path) as fresh:  # verify() must come straight after open, before getexif()
            fresh.verify()
    if width < 1 or height < 1:
        raise ValueError(f"image is {width}x{height}")
    return (height, width) if rotated else (width, height)


def check_image(path: Path, notes: Notes) -> tuple[int, int] | None:
    """The image's (width, height), or None after noting it as skipped (an error in strict mode)."""
    if not path.is_file():
        notes.skip(MISSING_IMAGE, path)
        return None
    try:
        return probe_image(path)
    except Exception as exc:  # Pillow raises many types for bad files; any of them means "cannot train on this"
        notes.skip(UNREADABLE, path, f"{type(exc).__name__}: {exc}")
        return None


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """H x W x 3 uint8 RGB, EXIF orientation applied: the same conversions the server applies to a request
    (``optic.server.tasks.image.decode_image``), so a model trains on what it will be served."""
    with Image.open(path) as opened:
        img = ImageOps.exif_transpose(opened)
    if img.mode in _WIDE_GREY:
        # 16-bit grey: keep the high byte; convert() would clip every value above 255 to white.
        wide = np.asarray(img).astype(np.int64).clip(0, 65535)
        img = Image.fromarray((wide >> 8).astype(np.uint8), "L")
    elif img.mode == "F":
        img = Image.fromarray(np.asarray(img).clip(0, 255).astype(np.uint8), "L")
    if img.mode != "RGB":
        img = img.convert("RGB")  # grey, palette, CMYK; alpha is dropped, as the server does
    return np.array(img, dtype=np.uint8)


def read_mask(path: str | os.PathLike[str]) -> np.ndarray:
    """H x W uint8 class ids. A palette ('P') PNG gives its indices, not the palette's colours (VOC's masks are
    coloured only for people to look at); a grey image saved as RGB is accepted when its channels agree."""
    with Image.open(path) as img:
        img.load()
        mode = img.mode
        values = np.array(img)
    if mode in ("P", "L", "1") or (mode in _WIDE_GREY and values.size and values.min() >= 0 and values.max() <= 255):
        return values.astype(np.uint8)
    if mode in ("RGB", "RGBA") and values.size and (values[..., 0:1] == values[..., 1:3]).all():
        return np.ascontiguousarray(values[..., 0], dtype=np.uint8)
    if mode in _WIDE_GREY:
        raise DatasetError(f"{path}: mask values up to {int(values.max())} do not fit class ids 0..255")
    raise DatasetError(
        f"{path}: the mask is a colour image (mode {mode}); masks must be single-channel index PNGs (mode P or L) "
        "whose values are class ids"
    )


def iter_existing(paths: list[Path], notes: Notes) -> Iterator[tuple[Path, tuple[int, int]]]:
    """(path, (width, height)) of every listed image that exists and decodes; the rest are noted as skipped."""
    for path in paths:
        size = check_image(path, notes)
        if size is not None:
            yield path, size
