"""Pure pre/post-processing and tensor codecs: no server needed."""

from __future__ import annotations

import io
import struct
from dataclasses import astuple, replace

import numpy as np
import pytest
from PIL import Image

from optic.server.errors import InvalidArgument
from optic.server.metadata import InputSpec, MetadataError, ModelMeta
from optic.server.tasks import classify
from optic.server.tasks.image import ImageLimits, cheap_to_decode, decode_image, normalize, prepare, preprocess
from optic.server.tensors import from_contents, from_raw, to_raw

SPEC = InputSpec(size=(64, 64), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def png(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_normalize_matches_the_formula():
    pixels = np.random.default_rng(0).integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    x = normalize(pixels, SPEC)
    assert x.shape == (2, 3, 5, 7) and x.dtype == np.float32 and x.flags.c_contiguous
    np.testing.assert_allclose(x, (pixels.transpose(0, 3, 1, 2) / 255.0 - 0.5) / 0.25, atol=1e-6)


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    decoded = decode_image(png(img, "JPEG", exif=exif), ImageLimits())
    assert decoded.pixels.shape[:2] == (40, 20) and (decoded.width, decoded.height) == (20, 40)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16"])
def test_modes_become_rgb(mode):
    img = Image.new(mode, (10, 10))
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    pixels = decode_image(png(img, fmt), ImageLimits()).pixels
    assert pixels.shape == (10, 10, 3) and pixels.dtype == np.uint8


def test_pixel_bomb_is_refused_before_decoding():
    data = png(Image.new("L", (3000, 3000)))
    with pytest.raises(InvalidArgument, match=r"9000000 pixels"):
        decode_image(data, ImageLimits(max_pixels=1_000_000))
    with pytest.raises(InvalidArgument, match=r"bytes; the limit"):
        decode_image(data, ImageLimits(max_bytes=100))


@pytest.mark.parametrize(
    "layout, color, scale, mean, std",
    [
        ("NCHW", "RGB", 1 / 255, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
        ("NCHW", "RGB", 1 / 255, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # torchvision's ImageNet
        ("NHWC", "BGR", 1 / 255, (0.1, 0.2, 0.3), (0.5, 0.25, 0.125)),
        ("NCHW", "BGR", 1 / 127.5, (1.0, 1.0, 1.0), (1.0, 1.0, 1.0)),  # not 1/N: multiplied, not divided
        ("NHWC", "RGB", 1.0, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    ],
)
def test_normalize_is_bit_identical_to_the_per_pixel_arithmetic(layout, color, scale, mean, std):
    """The lookup table must give exactly what ``x / 255 - mean) / std`` in float32 gives (torchvision's order),
    for every byte, every channel order and layout, batched or not, and on a non-contiguous crop."""
    spec = InputSpec(size=(8, 8), layout=layout, color=color, scale=scale, mean=mean, std=std)
    rng = np.random.default_rng(1)
    every_byte = np.arange(256 * 3, dtype=np.int64).reshape(16, 16, 3) % 256
    for pixels in (
        every_byte.astype(np.uint8),
        rng.integers(0, 256, (2, 5, 7, 3), dtype=np.uint8),
        rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)[3:15:2, 2:9],
    ):
        x = pixels.astype(np.float32)
        if color == "BGR":
            x = x[..., ::-1]
        inverse = 1.0 / scale
        x = x / np.float32(inverse) if inverse == round(inverse) else x * np.float32(scale)
        x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
        if layout == "NCHW":
            x = np.moveaxis(x, -1, -3)
        got = normalize(pixels, spec)
        assert got.dtype == np.float32 and got.flags.c_contiguous
        np.testing.assert_array_equal(got, x)
    floats = rng.random((4, 4, 3), dtype=np.float32) * 255  # not bytes: the arithmetic itself
    assert normalize(floats, spec).shape == ((3, 4, 4) if layout == "NCHW" else (4, 4, 3))


def textured(width: int, height: int) -> Image.Image:
    """A JPEG-worthy image with detail at every scale (a flat one would hide a wrong decode scale)."""
    rng = np.random.default_rng(width * height)
    coarse = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR)


LETTERBOX_256 = InputSpec(size=(256, 256), resize="letterbox", decode="draft")


@pytest.mark.parametrize(
    "spec, size, decoded",
    [
        # letterbox: the model sees 256x192 of a 640x480 JPEG, so 1/2 scale (320x240) still downscales
        (LETTERBOX_256, (640, 480), (320, 240)),
        (LETTERBOX_256, (1920, 1080), (480, 270)),  # 1/4; 1/8 (240x135) would be below 256x144
        (LETTERBOX_256, (500, 500), (500, 500)),  # 1/2 would be 250 < 256
        (replace(LETTERBOX_256, decode="exact"), (640, 480), (640, 480)),
        # a centre crop covers the target: 640x480 scales to 342x256, so 1/2 (320x240) is too small
        (replace(LETTERBOX_256, resize="center_crop"), (640, 480), (640, 480)),
        (replace(LETTERBOX_256, size=(128, 128), resize="stretch"), (640, 480), (320, 240)),
        # torchvision's Resize(256) + CenterCrop(224): the shorter side must stay >= 256
        (
            InputSpec(size=(224, 224), resize="center_crop", resize_size=256, pipeline="torchvision", decode="draft"),
            (1024, 768),
            (512, 384),
        ),
        # Ultralytics' letterbox through OpenCV's IMREAD_REDUCED_COLOR_2: 640x360 is needed of 1920x1080
        (
            InputSpec(size=(640, 640), resize="letterbox", pipeline="ultralytics", decode="draft"),
            (1920, 1080),
            (960, 540),
        ),
    ],
)
def test_draft_decode_stops_at_the_size_the_resize_scales_to(spec, size, decoded):
    got = decode_image(png(textured(*size), "JPEG", quality=90), ImageLimits(), spec)
    assert (got.pixels.shape[1], got.pixels.shape[0]) == decoded
    assert (got.width, got.height) == size  # the client's size, for mapping answers back


PIPELINE_RESIZES = [
    ("optic", "letterbox"), ("optic", "stretch"), ("optic", "center_crop"),
    ("torchvision", "center_crop"), ("torchvision", "shorter_side"), ("torchvision", "stretch"),
    ("torchvision", "letterbox"),  # not a torchvision transform: resize() stretches it
    ("ultralytics", "letterbox"), ("ultralytics", "letterbox_auto"), ("ultralytics", "center_crop"),
    ("ultralytics", "stretch"),  # classify_transforms with a non-square imgsz
]  # fmt: skip


@pytest.mark.parametrize("pipeline, resize", PIPELINE_RESIZES)
def test_draft_decode_never_makes_a_resize_scale_up(pipeline, resize):
    """Whatever the pipeline, resize mode, aspect and EXIF orientation, the drafted pixels are never smaller than
    what the model's resize scales them to (every scale <= 1), and the tensor has the model's size."""
    size = (48, 48) if resize == "center_crop" and pipeline == "ultralytics" else (48, 64)  # (h, w); a square crop
    spec = InputSpec(size=size, resize=resize, pipeline=pipeline, resize_size=56 if pipeline == "torchvision" else 0,
                     stride=16, decode="draft")  # fmt: skip
    rng = np.random.default_rng(hash((pipeline, resize)) % 2**32)
    for orientation in (1, 6, 3, 8):
        width, height = int(rng.integers(100, 700)), int(rng.integers(100, 700))
        exif = Image.Exif()
        exif[0x0112] = orientation
        decoded = decode_image(png(textured(width, height), "JPEG", exif=exif), ImageLimits(), spec)
        _, transform = preprocess(decoded.pixels, spec)
        case = (width, height, orientation, decoded.pixels.shape)
        assert transform.scale_x <= 1 + 1e-9 and transform.scale_y <= 1 + 1e-9, case
        tensor = prepare(png(textured(width, height), "JPEG", exif=exif), spec, ImageLimits()).tensor
        if resize not in ("letterbox_auto", "shorter_side"):  # those two keep the image's own aspect
            assert tensor.shape == (3, *size), case


def test_draft_decode_of_a_turned_jpeg_reduces_in_its_stored_orientation():
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 640x480, shown 480x640
    got = decode_image(png(textured(640, 480), "JPEG", exif=exif), ImageLimits(), LETTERBOX_256)
    assert got.pixels.shape[:2] == (320, 240) and (got.width, got.height) == (480, 640)


def test_draft_decode_changes_the_pixels_a_little_and_the_geometry_not_at_all():
    data = png(textured(640, 480), "JPEG", quality=90)
    exact = prepare(data, replace(LETTERBOX_256, decode="exact"), ImageLimits())
    draft = prepare(data, LETTERBOX_256, ImageLimits())
    assert exact.tensor.shape == draft.tensor.shape == (3, 256, 256)
    # Boxes and masks map back to the same pixels.
    assert astuple(exact.transform) == pytest.approx(astuple(draft.transform))
    difference = np.abs(exact.tensor - draft.tensor)
    assert 0 < difference.mean() < 2 / 255 and np.percentile(difference, 99) < 10 / 255


def test_top_k_softmax():
    meta = ModelMeta(labels=("a", "b", "c"), output_kind="logits")
    out = classify.top_k(np.array([1.0, 3.0, 2.0]), meta, 2)
    assert [x.label for x in out] == ["b", "c"]
    e = np.exp([1.0, 3.0, 2.0])
    assert out[0].score == pytest.approx(e[1] / e.sum())
    probs = classify.top_k(np.array([0.2, 0.5, 0.3]), ModelMeta(output_kind="probabilities"), 0)
    assert [x.label for x in probs] == ["1", "2", "0"] and probs[0].score == pytest.approx(0.5)


def test_metadata_round_trip_and_errors():
    meta = ModelMeta(task="classification", labels=("x", "y"), input=SPEC)
    assert ModelMeta.from_props(meta.to_props()) == meta
    with pytest.raises(MetadataError, match=r"optic\.task"):
        ModelMeta.from_props({"optic.task": "poetry"})
    with pytest.raises(MetadataError, match=r"optic\.input\.size"):
        ModelMeta.from_props({"optic.input.size": "[0, 64]"})


def test_ultralytics_metadata_is_understood():
    meta = ModelMeta.from_props({"names": "{0: 'person', 1: 'bicycle'}", "imgsz": "[640, 640]", "task": "detect"})
    assert meta.task == "detection" and meta.labels == ("person", "bicycle")
    assert meta.input == InputSpec(size=(640, 640), resize="letterbox", pipeline="ultralytics")
    assert meta.output_layout == "yolov8" and meta.detect.iou_threshold == 0.7  # Ultralytics' defaults


def test_tensor_codecs():
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(from_raw("a", "FP32", [2, 3], to_raw(a)), a)
    np.testing.assert_array_equal(from_contents("a", "INT8", [3], [1, -2, 3]), np.array([1, -2, 3], np.int8))
    words = np.array([b"ab", b"", b"xyz"], dtype=np.object_)
    assert list(from_raw("w", "BYTES", [3], to_raw(words))) == list(words)
    with pytest.raises(InvalidArgument, match="runs past"):
        from_raw("w", "BYTES", [1], struct.pack("<I", 10) + b"abc")
    with pytest.raises(InvalidArgument, match="does not fit INT8"):
        from_contents("a", "INT8", [1], [300])
    with pytest.raises(InvalidArgument, match="negative"):
        from_raw("a", "FP32", [-1, 3], b"")
    with pytest.raises(InvalidArgument, match="dimensions"):
        from_raw("a", "FP32", [1] * 10_000, b"\x00" * 4)


def test_only_small_images_decode_inline():
    limits = ImageLimits()
    assert cheap_to_decode(png(Image.new("RGB", (64, 64))), limits)
    assert not cheap_to_decode(png(Image.new("RGB", (1920, 1080)), "JPEG"), limits)
    assert not cheap_to_decode(b"garbage", limits)  # errors are reported by the full decoder
