"""Pure pre/post-processing and tensor codecs: no server needed."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from PIL import Image

from optic.server.errors import InvalidArgument
from optic.server.metadata import InputSpec, MetadataError, ModelMeta
from optic.server.tasks import classify
from optic.server.tasks.image import ImageLimits, cheap_to_decode, decode_image, normalize, prepare
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


def test_large_jpeg_decodes_at_reduced_scale_to_the_same_tensor_shape():
    img = Image.new("RGB", (1920, 1080), (10, 200, 30))
    x = prepare(png(img, "JPEG"), SPEC, ImageLimits()).tensor
    assert x.shape == (3, 64, 64)


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
