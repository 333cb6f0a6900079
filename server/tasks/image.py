"""Image decoding and the normalise step every vision task shares.

Runs in a worker thread: Pillow, OpenCV and numpy release the GIL, so decoding
one request overlaps with inference on another. Every image's header is read
(and its size checked against the limits) before any pixel is decoded. The
decoder is the model's reference: OpenCV's ``imdecode`` for the
``ultralytics`` pipeline (what its predictor uses), Pillow otherwise; both
honour EXIF orientation. Resizing is in :mod:`pipelines`.
"""

from __future__ import annotations

import functools
import io
import time
import warnings
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from optic.server.errors import InvalidArgument
from optic.server.metadata import InputSpec
from optic.server.tasks.pipelines import Transform, resize, resized_size

FORMATS = ("JPEG", "PNG", "WEBP", "BMP")
_WIDE = ("I", "I;16", "I;16B", "I;16L", "I;16N")  # 16/32-bit grey
_REDUCED = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}

__all__ = ["Transform", "decode_image", "normalize", "prepare", "preprocess"]


@dataclass(frozen=True)
class ImageLimits:
    """Per-image bounds that keep a hostile upload from exhausting memory."""

    max_bytes: int = 32 * 1024 * 1024
    max_pixels: int = 40_000_000
    # Images up to this many pixels are decoded on the event loop: for them the hop to a
    # worker thread costs more than the decode (measured with the previous 64x64 classifier: +33% Classify
    # throughput on 64x64 images).
    inline_pixels: int = 128 * 128
    min_side: int = 8  # smaller images carry no usable signal at any model size


def cheap_to_decode(data: bytes, limits: ImageLimits) -> bool:
    """Whether the header says the image is small enough to decode without leaving the event loop."""
    if len(data) > 4 * limits.inline_pixels:  # more bytes than a small image needs: not small
        return False
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as img:
            width, height = img.size
    except Exception:  # let the full decoder produce the precise error, off the loop
        return False
    return width * height <= limits.inline_pixels


def image_size(source: ImageSource) -> tuple[int, int] | None:
    """(width, height) from the header alone (raw pixels: as declared); None when the header cannot be read, for
    the decoder to report precisely."""
    if isinstance(source, RawPixels):
        return source.width, source.height
    try:
        with Image.open(io.BytesIO(source), formats=FORMATS) as img:
            return img.size
    except Exception:
        return None


@dataclass(frozen=True)
class Decoded:
    """Decoded pixels (H, W, 3) uint8 RGB, and the size the client's image has (after EXIF orientation),
    which differs from the pixels' when a JPEG was decoded at reduced scale."""

    pixels: np.ndarray
    width: int
    height: int


def _open(data: bytes, limits: ImageLimits) -> Image.Image:
    """The image's header, checked against the limits; no pixel is decoded yet."""
    if not data:
        raise InvalidArgument("image data is empty")
    if len(data) > limits.max_bytes:
        raise InvalidArgument(f"image is {len(data)} bytes; the limit is {limits.max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img: Image.Image = Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        raise InvalidArgument(
            f"image data ({len(data)} bytes, starting {data[:8]!r}) is not a JPEG, PNG, WebP or BMP image"
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidArgument(f"image rejected as a decompression bomb: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidArgument(f"image could not be decoded ({type(exc).__name__}: {exc})") from None
    width, height = img.size
    if min(width, height) < limits.min_side:
        raise InvalidArgument(f"image is {width}x{height}; both sides must be at least {limits.min_side} pixels")
    if width * height > limits.max_pixels:
        raise InvalidArgument(f"image is {width}x{height} = {width * height} pixels; the limit is {limits.max_pixels}")
    return img


def _draft_factor(width: int, height: int, need: tuple[int, int]) -> int:
    """The largest JPEG DCT downscale (1, 2, 4 or 8) whose decode is still at least ``need`` (w, h), so the
    model's resize stays a downscale; Pillow's ``draft`` chooses by the same rule."""
    factor = 1
    while factor < 8 and width // (factor * 2) >= need[0] and height // (factor * 2) >= need[1]:
        factor *= 2
    return factor


def decode_image(data: bytes, limits: ImageLimits, spec: InputSpec | None = None) -> Decoded:
    """Check, then decode with the model's reference decoder; ``spec.decode == "draft"`` allows a JPEG to decode
    at reduced scale (never below the size the model's resize scales it to: a 640x480 JPEG for a 256x256
    letterbox decodes at 320x240, for a 256-pixel centre crop at full size)."""
    img = _open(data, limits)
    draft = spec is not None and spec.decode == "draft" and img.format == "JPEG"
    try:
        orientation = img.getexif().get(0x0112, 1)
        rotated = orientation in (5, 6, 7, 8)  # EXIF orientations that swap the sides
        width, height = (img.height, img.width) if rotated else (img.width, img.height)
        need = (1, 1)
        if draft:
            assert spec is not None
            need_w, need_h = resized_size(width, height, spec)
            need = (need_h, need_w) if rotated else (need_w, need_h)  # in the stored orientation, as decoded
        if spec is not None and spec.pipeline == "ultralytics":
            factor = _draft_factor(img.width, img.height, need) if draft else 1
            bgr = cv2.imdecode(np.frombuffer(data, np.uint8), _REDUCED.get(factor, cv2.IMREAD_COLOR))  # EXIF applied
            if bgr is None:
                raise InvalidArgument(f"image could not be decoded by OpenCV, this model's decoder ({img.format})")
            return Decoded(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), width, height)
        if img.format == "PNG" and img.mode in _WIDE:
            # 16-bit PNG: OpenCV decodes straight to 8 bits (the high byte, as below), without the wide plane.
            bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
            if bgr is not None:
                return Decoded(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), width, height)
        if draft:
            img.draft("RGB", need)  # DCT-domain downscale, staying >= what the model's resize scales it to
        img.load()
        if orientation != 1:  # exif_transpose copies the image even when there is nothing to turn
            img = ImageOps.exif_transpose(img)
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidArgument(f"image could not be decoded ({type(exc).__name__}: {exc})") from None
    if img.mode in _WIDE:
        # 16-bit grey (PNG): keep the high byte, as Pillow itself does for 16-bit RGB; convert() would clip
        # every value above 255 to white. In place, on the 16/32-bit plane Pillow gives: no wider copy.
        plane = np.array(img)
        np.clip(plane, 0, 65535, out=plane)
        np.right_shift(plane, 8, out=plane)
        img = Image.fromarray(plane.astype(np.uint8), "L")
    if img.mode != "RGB":
        img = img.convert("RGB")
    return Decoded(np.asarray(img), width, height)


@dataclass(frozen=True)
class RawPixels:
    """Already-decoded HWC uint8 pixels from a client (RGB, or RGBA whose alpha is dropped)."""

    height: int
    width: int
    channels: int
    pixels: bytes


ImageSource = bytes | RawPixels


def decode_raw(raw: RawPixels, limits: ImageLimits) -> Decoded:
    if raw.channels not in (3, 4):
        raise InvalidArgument(
            f"raw image has {raw.channels} channel(s); models take RGB, so send 3 (RGB) or 4 (RGBA) channels"
        )
    if min(raw.height, raw.width) < limits.min_side:
        raise InvalidArgument(
            f"raw image is {raw.width}x{raw.height}; both sides must be at least {limits.min_side} pixels"
        )
    if raw.height * raw.width > limits.max_pixels:
        raise InvalidArgument(
            f"raw image is {raw.width}x{raw.height} = {raw.width * raw.height} pixels; the limit is {limits.max_pixels}"
        )
    expected = raw.height * raw.width * raw.channels
    if len(raw.pixels) != expected:
        raise InvalidArgument(
            f"raw image {raw.height}x{raw.width}x{raw.channels} needs {expected} bytes, got {len(raw.pixels)}"
        )
    array = np.frombuffer(raw.pixels, np.uint8).reshape(raw.height, raw.width, raw.channels)
    return Decoded(np.ascontiguousarray(array[..., :3]), raw.width, raw.height)


@dataclass(frozen=True)
class Prepared:
    """One image ready for the model, with what is needed to map answers back and the time it took."""

    tensor: np.ndarray
    transform: Transform
    decode_seconds: float
    preprocess_seconds: float


def preprocess(pixels: np.ndarray, spec: InputSpec) -> tuple[np.ndarray, Transform]:
    """Decoded (H, W, 3) uint8 RGB -> the model's input tensor (C, H, W) and its transform.

    The export stage trains through this same function, so serving cannot
    drift from training.
    """
    resized, transform = resize(pixels, spec)
    return normalize(resized, spec), transform


def prepare(source: ImageSource, spec: InputSpec, limits: ImageLimits) -> Prepared:
    """Encoded bytes or raw pixels -> model input tensor (C, H, W) and its transform."""
    started = time.perf_counter()
    decoded = decode_raw(source, limits) if isinstance(source, RawPixels) else decode_image(source, limits, spec)
    done = time.perf_counter()
    tensor, t = preprocess(decoded.pixels, spec)
    h, w = decoded.pixels.shape[:2]
    # Compose with the decoder's own downscale, so answers map back to the client's pixels.
    transform = t.scaled(w / decoded.width, h / decoded.height, decoded.width, decoded.height)
    return Prepared(tensor, transform, done - started, time.perf_counter() - done)


def normalize(pixels: np.ndarray, spec: InputSpec) -> np.ndarray:
    """(..., H, W, 3) uint8 RGB -> float32 in the model's layout, scaled and standardised.

    A byte has 256 values, so each channel's answer is looked up in a table computed once per spec with the
    arithmetic below (bit-identical to doing it per pixel) and written straight into the model's layout: one
    pass instead of five over a float image (0.14 ms instead of 0.46 ms at 256x256). Anything but uint8
    takes the arithmetic itself.
    """
    if pixels.dtype != np.uint8:
        return _normalize_arith(pixels, spec)
    table = _table(spec.scale, spec.mean, spec.std)
    lead, (h, w) = pixels.shape[:-3], pixels.shape[-3:-1]
    out = np.empty((*lead, 3, h, w) if spec.layout == "NCHW" else (*lead, h, w, 3), np.float32)
    for c in range(3):
        src = 2 - c if spec.color == "BGR" else c
        # mode="clip" cannot clip a byte (the table has 256 rows) and lets take write into ``out`` directly.
        view = out[..., c, :, :] if spec.layout == "NCHW" else out[..., c]
        np.take(table[c], pixels[..., src], out=view, mode="clip")
    return out


@functools.lru_cache(maxsize=64)
def _table(scale: float, mean: tuple[float, float, float], std: tuple[float, float, float]) -> np.ndarray:
    """(3, 256) float32: channel c's normalised value of each byte, by :func:`_normalize_arith`'s arithmetic."""
    byte = np.broadcast_to(np.arange(256, dtype=np.uint8)[:, None], (256, 3))
    spec = InputSpec((1, 1), scale=scale, mean=mean, std=std, layout="NHWC")
    table = np.ascontiguousarray(_normalize_arith(byte, spec).T)
    table.flags.writeable = False  # shared by every call (and thread) with this spec
    return table


def _normalize_arith(pixels: np.ndarray, spec: InputSpec) -> np.ndarray:
    """The normalisation itself. A scale of 1/N is applied as a division by N, as torchvision and Ultralytics
    do (``x / 255``): multiplying by the rounded reciprocal differs in the last bit for some values."""
    x = pixels.astype(np.float32)
    if spec.color == "BGR":
        x = x[..., ::-1]
    inverse = 1.0 / spec.scale
    if inverse == round(inverse):
        x /= np.float32(inverse)
    else:
        x *= np.float32(spec.scale)
    x -= np.asarray(spec.mean, dtype=np.float32)
    x /= np.asarray(spec.std, dtype=np.float32)
    if spec.layout == "NCHW":
        x = np.moveaxis(x, -1, -3)
    return np.ascontiguousarray(x)
