"""Image decoding and the resize/normalise steps every vision task shares.

Runs in a worker thread: Pillow and numpy release the GIL, so decoding one
request overlaps with inference on another.
"""

from __future__ import annotations

import io
import time
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from optic.server.errors import InvalidArgument
from optic.server.metadata import InputSpec

FORMATS = ("JPEG", "PNG", "WEBP", "BMP")


@dataclass(frozen=True)
class ImageLimits:
    """Per-image bounds that keep a hostile upload from exhausting memory."""

    max_bytes: int = 32 * 1024 * 1024
    max_pixels: int = 40_000_000
    # Images up to this many pixels are decoded on the event loop: for them the hop to a
    # worker thread costs more than the decode (measured: +33% Classify throughput at 64x64).
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


def decode_image(data: bytes, limits: ImageLimits, target: tuple[int, int] | None = None) -> Image.Image:
    """Decode, apply EXIF orientation and convert to RGB; ``target`` (h, w) lets JPEG decode at reduced scale."""
    if not data:
        raise InvalidArgument("image data is empty")
    if len(data) > limits.max_bytes:
        raise InvalidArgument(f"image is {len(data)} bytes; the limit is {limits.max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img: Image.Image = Image.open(io.BytesIO(data), formats=FORMATS)
            width, height = img.size
            if min(width, height) < limits.min_side:
                raise InvalidArgument(
                    f"image is {width}x{height}; both sides must be at least {limits.min_side} pixels"
                )
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
    rotated = img.getexif().get(0x0112, 1) in (5, 6, 7, 8)  # EXIF orientations that swap the sides
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        # 16-bit grey (PNG): keep the high byte, as Pillow itself does for 16-bit RGB; convert() would clip
        # every value above 255 to white.
        wide = np.asarray(img).astype(np.int64).clip(0, 65535)
        img = Image.fromarray((wide >> 8).astype(np.uint8), "L")
    if img.mode != "RGB":
        img = img.convert("RGB")
    # The size before any JPEG draft downscale, as the client sees the image (after orientation).
    img.info["optic.original_size"] = (height, width) if rotated else (width, height)
    return img


@dataclass(frozen=True)
class RawPixels:
    """Already-decoded HWC uint8 pixels from a client (RGB, or RGBA whose alpha is dropped)."""

    height: int
    width: int
    channels: int
    pixels: bytes


ImageSource = bytes | RawPixels


def decode_raw(raw: RawPixels, limits: ImageLimits) -> Image.Image:
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
    return Image.fromarray(np.ascontiguousarray(array[..., :3]), "RGB")


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



def letterbox_geometry(width: int, height: int, size: tuple[int, int]) -> tuple[float, int, int, int, int]:
    """Scale keeping aspect ratio to fit ``size`` (h, w), centred: (scale, new_w, new_h, pad_x, pad_y)."""
    th, tw = size
    r = min(tw / width, th / height)
    nw, nh = max(1, round(width * r)), max(1, round(height * r))
    return r, nw, nh, (tw - nw) // 2, (th - nh) // 2


def resize_with_transform(img: Image.Image, spec: InputSpec) -> tuple[Image.Image, Transform]:
    """Bring the image to the model's input size by the model's resize mode, remembering how."""
    height, width = spec.size
    w0, h0 = img.size
    if (w0, h0) == (width, height):
        return img, Transform(w0, h0, 1.0, 1.0, 0.0, 0.0)
    if spec.resize == "stretch":
        stretched = img.resize((width, height), Image.Resampling.BILINEAR)
        return stretched, Transform(w0, h0, width / w0, height / h0, 0.0, 0.0)
    if spec.resize == "center_crop":
        r = max(width / w0, height / h0)
        out = ImageOps.fit(img, (width, height), Image.Resampling.BILINEAR)
        return out, Transform(w0, h0, r, r, (width - w0 * r) / 2, (height - h0 * r) / 2)
    r, nw, nh, px, py = letterbox_geometry(w0, h0, spec.size)
    canvas = Image.new("RGB", (width, height), (spec.pad_value,) * 3)
    canvas.paste(img.resize((nw, nh), Image.Resampling.BILINEAR), (px, py))
    return canvas, Transform(w0, h0, nw / w0, nh / h0, float(px), float(py))



@dataclass(frozen=True)
class Prepared:
    """One image ready for the model, with what is needed to map answers back and the time it took."""

    tensor: np.ndarray
    transform: Transform
    decode_seconds: float
    preprocess_seconds: float


def prepare(source: ImageSource, spec: InputSpec, limits: ImageLimits) -> Prepared:
    """Encoded bytes or raw pixels -> model input tensor (C, H, W) and its transform."""
    started = time.perf_counter()
    img = decode_raw(source, limits) if isinstance(source, RawPixels) else decode_image(source, limits, spec.size)
    decoded = time.perf_counter()
    resized, t = resize_with_transform(img, spec)
    w0, h0 = img.info.get("optic.original_size", img.size)
    # Compose with the decoder's own downscale, so answers map back to the client's pixels.
    dx, dy = img.width / w0, img.height / h0
    transform = Transform(w0, h0, t.scale_x * dx, t.scale_y * dy, t.pad_x, t.pad_y)
    tensor = normalize(np.asarray(resized), spec)
    return Prepared(tensor, transform, decoded - started, time.perf_counter() - decoded)


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
