"""Image decoding and the resize/normalise steps every vision task shares.

Runs in a worker thread: Pillow and numpy release the GIL, so decoding one
request overlaps with inference on another.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from server.errors import InvalidArgument
from server.metadata import InputSpec

FORMATS = ("JPEG", "PNG", "WEBP", "BMP")


@dataclass(frozen=True)
class ImageLimits:
    """Per-image bounds that keep a hostile upload from exhausting memory."""

    max_bytes: int = 32 * 1024 * 1024
    max_pixels: int = 40_000_000
    # Images up to this many pixels are decoded on the event loop: for them the hop to a
    # worker thread costs more than the decode (measured: +33% Classify throughput at 64x64).
    inline_pixels: int = 128 * 128


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


def decode_image(data: bytes, limits: ImageLimits, target: tuple[int, int] | None = None) -> Image.Image:
    """Decode, apply EXIF orientation and convert to RGB; ``target`` (h, w) lets JPEG decode at reduced scale."""
    if not data:
        raise InvalidArgument("image data is empty")
    if len(data) > limits.max_bytes:
        raise InvalidArgument(f"image is {len(data)} bytes; the limit is {limits.max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=FORMATS)
            width, height = img.size
            if width * height > limits.max_pixels:
                raise InvalidArgument(
                    f"image is {width}x{height} = {width * height} pixels; the limit is {limits.max_pixels}"
                )
            if target is not None and img.format == "JPEG":
                # DCT-domain downscale by 1/2, 1/4 or 1/8 while staying >= the target size
                # (either orientation, since EXIF may rotate it afterwards).
                side = max(target)
                img.draft("RGB", (side, side))
            img.load()
    except InvalidArgument:
        raise
    except UnidentifiedImageError:
        raise InvalidArgument(
            f"image data ({len(data)} bytes, starting {data[:8]!r}) is not a JPEG, PNG, WebP or BMP image"
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidArgument(f"image rejected as a decompression bomb: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidArgument(f"image could not be decoded ({type(exc).__name__}: {exc})") from None
    img = ImageOps.exif_transpose(img)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img


def resize(img: Image.Image, spec: InputSpec) -> Image.Image:
    """Bring the image to the model's input size by the model's resize mode."""
    height, width = spec.size
    if img.size == (width, height):
        return img
    if spec.resize == "stretch":
        return img.resize((width, height), Image.BILINEAR)
    if spec.resize == "center_crop":
        return ImageOps.fit(img, (width, height), Image.BILINEAR)
    raise InvalidArgument(f"resize mode {spec.resize!r} is not supported for this task yet")


def normalize(pixels: np.ndarray, spec: InputSpec) -> np.ndarray:
    """(..., H, W, 3) uint8 RGB -> float32 in the model's layout, scaled and standardised.

    The export stage trains through this same function, so serving cannot drift
    from training.
    """
    x = pixels.astype(np.float32)
    if spec.color == "BGR":
        x = x[..., ::-1]
    x *= np.float32(spec.scale)
    x -= np.asarray(spec.mean, dtype=np.float32)
    x /= np.asarray(spec.std, dtype=np.float32)
    if spec.layout == "NCHW":
        x = np.moveaxis(x, -1, -3)
    return np.ascontiguousarray(x)


def image_to_tensor(data: bytes, spec: InputSpec, limits: ImageLimits) -> np.ndarray:
    """Encoded bytes -> one (C, H, W) float32 model input."""
    img = resize(decode_image(data, limits, spec.size), spec)
    return normalize(np.asarray(img), spec)
