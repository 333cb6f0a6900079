"""The bad-input matrix: every RPC against malformed and hostile requests, on a live server.

``MATRIX`` is the table docs/operations.md's "Bad-input matrix" section reproduces
(a test keeps the two in step). After the whole matrix, three times over,
the server must still be SERVING, answer correctly, have logged nothing a
client could forge, and its memory must not have grown.
"""

from __future__ import annotations

import io
import math
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from PIL import Image
from tritonclient.grpc import service_pb2 as kpb
from tritonclient.grpc import service_pb2_grpc as kpb_grpc

from optic.export.data import make_scenes
from optic.proto.optic.v1 import vision_pb2 as vpb
from optic.proto.optic.v1 import vision_pb2_grpc as vpb_grpc
from tests.conftest import ROOT, SIDE, RunningServer, encode, start_server

MAX_MESSAGE_MB = 32  # above a full batch of the committed classifier (32 x 3 x 256 x 256 floats: 25 MB)
SCENE = make_scenes(1, seed=5)[0].image  # 64x64 RGB


def _save(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_raw(width: int, height: int, depth: int = 8, colour: int = 2, fill: int = 0) -> bytes:
    """A PNG written by hand: any header (pixel bombs), 16-bit RGB (which Pillow cannot write)."""
    channels = {0: 1, 2: 3}[colour]
    row = b"\x00" + bytes([fill]) * (width * channels * depth // 8)
    compressor = zlib.compressobj(9)
    body = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", body) + _png_chunk(b"IEND", b"")


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims a size its (empty) data never delivers."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def animated(fmt: str) -> bytes:
    frames = [Image.fromarray(SCENE), Image.new("RGB", (64, 64), (0, 255, 0))]
    return _save(frames[0], fmt, save_all=True, append_images=frames[1:])


JPEG = encode(np.asarray(Image.fromarray(SCENE).resize((640, 480))), "JPEG", quality=90)
IMAGES: dict[str, Callable[[], bytes]] = {
    "empty": lambda: b"",
    "garbage": lambda: b"definitely not an image" * 10,
    "truncated-jpeg": lambda: JPEG[: len(JPEG) // 2],
    "truncated-png": lambda: encode(SCENE)[:200],
    "corrupt-header": lambda: JPEG[:2] + b"\x00" * 30 + JPEG[32:],
    "header-bomb": lambda: png_header_only(100_000, 100_000),
    "decompression-bomb": lambda: png_raw(7_000, 7_000),  # 49 Mpx of zeros in ~150 kB
    "one-pixel": lambda: encode(np.zeros((1, 1, 3), np.uint8)),
    "gif": lambda: animated("GIF"),
    "tiff": lambda: _save(Image.fromarray(SCENE), "TIFF"),
    "animated-png": lambda: animated("PNG"),
    "animated-webp": lambda: animated("WEBP"),
    "16-bit-grey-png": lambda: encode((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)),
    "16-bit-rgb-png": lambda: png_raw(64, 64, depth=16, fill=150),
    "cmyk-jpeg": lambda: _save(Image.fromarray(SCENE).convert("CMYK"), "JPEG"),
    "palette-png-with-alpha": lambda: _save(Image.fromarray(SCENE).convert("P"), "PNG", transparency=0),
}


def tensor_request(
    model: str = "classifier",
    shape: list[int] | None = None,
    datatype: str = "FP32",
    name: str = "images",
    raw: bytes | None = None,
    **fields: object,
) -> kpb.ModelInferRequest:
    shape = [1, 3, SIDE, SIDE] if shape is None else shape
    request = kpb.ModelInferRequest(model_name=model, **fields)
    request.inputs.add(name=name, datatype=datatype, shape=shape)
    count = math.prod(shape) if shape and all(0 <= d < 1 << 20 for d in shape) else 0
    request.raw_input_contents.append(raw if raw is not None else np.zeros(count, np.float32).tobytes())
    return request


def with_value(value: float) -> kpb.ModelInferRequest:
    x = np.zeros((1, 3, SIDE, SIDE), np.float32)
    x[0, 1, 2, 3] = value
    return tensor_request(raw=x.tobytes())


def typed_contents(values: list[float]) -> kpb.ModelInferRequest:
    request = kpb.ModelInferRequest(model_name="classifier")
    tensor = request.inputs.add(name="images", datatype="FP32", shape=[1, 3, SIDE, SIDE])
    tensor.contents.fp32_contents.extend(values)
    return request


def requested_output(name: str, **params: object) -> kpb.ModelInferRequest:
    request = tensor_request()
    out = request.outputs.add(name=name)
    for key, value in params.items():
        field = "int64_param" if isinstance(value, int) else "string_param"
        setattr(out.parameters[key], field, value)
    return request


def infer_param(key: str, value: object) -> kpb.ModelInferRequest:
    request = tensor_request()
    field = "int64_param" if isinstance(value, int) else "string_param"
    setattr(request.parameters[key], field, value)
    return request


def image(data: bytes) -> vpb.Image:
    return vpb.Image(data=data)


def raw(height: int, width: int, channels: int, size: int | None = None) -> vpb.Image:
    pixels = b"\x00" * (height * width * channels if size is None else size)
    return vpb.Image(raw=vpb.RawImage(height=height, width=width, channels=channels, pixels=pixels))


OK_IMAGE = image(encode(SCENE))


@dataclass(frozen=True)
class Case:
    id: str
    rpc: str  # "kserve.<Method>" or "vision.<Method>"
    what: str  # the README's description
    request: Callable[[], object]
    code: str  # expected gRPC status name; for streams the in-band one
    needle: str = ""  # must appear in the status message


def _images(kind: str, code: str, needle: str, what: str) -> Case:
    return Case(
        f"image-{kind}",
        "vision.Classify",
        what,
        lambda: vpb.ClassifyRequest(model="classifier", image=image(IMAGES[kind]())),
        code,
        needle,
    )


NAMES = {
    "path": "../../../../etc/passwd",
    "absolute-path": "/etc/shadow",
    "unicode": "модель-模型-\u202egnp.exe",
    "control-chars": "classifier\n2026-01-01 00:00:00 ERROR forged\x1b[2J\r",
    "nul": "classifier\x00",
    "100k-chars": "x" * 100_000,
}

MATRIX: list[Case] = [
    # ---- names: never joined onto a path, echoed escaped and truncated
    *(
        Case(
            f"model-name-{k}",
            "kserve.ModelInfer",
            f"model name: {k}",
            lambda v=v: tensor_request(model=v),
            "NOT_FOUND",
            "unknown model",
        )
        for k, v in NAMES.items()
    ),
    *(
        Case(
            f"vision-model-name-{k}",
            "vision.Detect",
            f"model name: {k}",
            lambda v=v: vpb.DetectRequest(model=v, image=OK_IMAGE),
            "NOT_FOUND",
            "unknown model",
        )
        for k, v in NAMES.items()
        if k in ("path", "control-chars")
    ),
    Case(
        "version-unknown",
        "kserve.ModelInfer",
        "version that does not exist",
        lambda: tensor_request(model_version="99"),
        "NOT_FOUND",
        "no version",
    ),
    Case(
        "version-path",
        "kserve.ModelInfer",
        "version `../1`",
        lambda: tensor_request(model_version="../1"),
        "NOT_FOUND",
        "no version",
    ),
    Case(
        "metadata-path",
        "kserve.ModelMetadata",
        "ModelMetadata of `../x`",
        lambda: kpb.ModelMetadataRequest(name="../x"),
        "NOT_FOUND",
        "unknown model",
    ),
    Case(
        "config-unknown",
        "kserve.ModelConfig",
        "ModelConfig of an unknown model",
        lambda: kpb.ModelConfigRequest(name="nope"),
        "NOT_FOUND",
        "unknown model",
    ),
    Case(
        "statistics-unknown",
        "kserve.ModelStatistics",
        "ModelStatistics of an unknown model",
        lambda: kpb.ModelStatisticsRequest(name="nope"),
        "NOT_FOUND",
        "unknown model",
    ),
    Case(
        "ready-unknown",
        "kserve.ModelReady",
        "ModelReady of an unknown model (answers ready=false)",
        lambda: kpb.ModelReadyRequest(name="../nope"),
        "OK",
    ),
    Case(
        "load-path",
        "kserve.RepositoryModelLoad",
        "RepositoryModelLoad `../model_repo` (not explicit mode)",
        lambda: kpb.RepositoryModelLoadRequest(model_name="../model_repo"),
        "FAILED_PRECONDITION",
        "explicit",
    ),
    Case(
        "unload-unicode",
        "kserve.RepositoryModelUnload",
        "RepositoryModelUnload of a unicode name",
        lambda: kpb.RepositoryModelUnloadRequest(model_name=NAMES["unicode"]),
        "FAILED_PRECONDITION",
        "explicit",
    ),
    Case(
        "not-protobuf",
        "kserve.ModelInfer",
        "bytes that do not parse as the request message",
        lambda: b"\x0a\xff\xff\xff\xff\x0f garbage",
        "INVALID_ARGUMENT",
        "not a valid inference.ModelInferRequest",
    ),
    Case(
        "not-protobuf-vision",
        "vision.Detect",
        "bytes that do not parse as the request message",
        lambda: b"\x1a\x80\x80\x80\x80\x10",
        "INVALID_ARGUMENT",
        "not a valid optic.v1.DetectRequest",
    ),
    # ---- tensors
    Case(
        "no-inputs",
        "kserve.ModelInfer",
        "no inputs",
        lambda: kpb.ModelInferRequest(model_name="classifier"),
        "INVALID_ARGUMENT",
        "needs input",
    ),
    Case(
        "input-unknown",
        "kserve.ModelInfer",
        "unknown input name",
        lambda: tensor_request(name="x"),
        "INVALID_ARGUMENT",
        "has no input",
    ),
    Case(
        "input-twice",
        "kserve.ModelInfer",
        "the same input twice",
        lambda: (
            lambda r: (
                r.inputs.add(name="images", datatype="FP32", shape=[1, 3, SIDE, SIDE]),
                r.raw_input_contents.append(r.raw_input_contents[0]),
                r,
            )[-1]
        )(tensor_request()),
        "INVALID_ARGUMENT",
        "given twice",
    ),
    Case(
        "datatype-unknown",
        "kserve.ModelInfer",
        "datatype `FP128`",
        lambda: tensor_request(datatype="FP128"),
        "INVALID_ARGUMENT",
        "unknown datatype",
    ),
    Case(
        "datatype-wrong",
        "kserve.ModelInfer",
        "FP64 for an FP32 input",
        lambda: tensor_request(datatype="FP64"),
        "INVALID_ARGUMENT",
        "expects FP32",
    ),
    Case(
        "rank-wrong",
        "kserve.ModelInfer",
        "rank 3 for rank 4",
        lambda: tensor_request(shape=[1, 3, SIDE]),
        "INVALID_ARGUMENT",
        "expects",
    ),
    Case(
        "dim-wrong",
        "kserve.ModelInfer",
        "a fixed dimension wrong",
        lambda: tensor_request(shape=[1, 3, SIDE, SIDE + 1]),
        "INVALID_ARGUMENT",
        "expects",
    ),
    Case(
        "dim-negative",
        "kserve.ModelInfer",
        "negative batch dimension",
        lambda: tensor_request(shape=[-1, 3, SIDE, SIDE]),
        "INVALID_ARGUMENT",
        "negative dimension",
    ),
    Case(
        "batch-zero",
        "kserve.ModelInfer",
        "zero-size batch",
        lambda: tensor_request(shape=[0, 3, SIDE, SIDE]),
        "INVALID_ARGUMENT",
        "batch of 0",
    ),
    Case(
        "batch-over-max",
        "kserve.ModelInfer",
        "batch over the maximum",
        lambda: tensor_request(shape=[33, 3, SIDE, SIDE]),
        "INVALID_ARGUMENT",
        "it takes 1 to",
    ),
    Case(
        "shape-10k-dims",
        "kserve.ModelInfer",
        "a shape list of 10,000 dimensions",
        lambda: tensor_request(shape=[1] * 10_000, raw=b"\x00" * 4),
        "INVALID_ARGUMENT",
        "expects",
    ),
    Case(
        "shape-huge",
        "kserve.ModelInfer",
        "batch dimension 2^62 (no allocation follows)",
        lambda: tensor_request(shape=[1 << 62, 3, SIDE, SIDE], raw=b"\x00" * 64),
        "INVALID_ARGUMENT",
        "raw contents hold",
    ),
    Case(
        "raw-short",
        "kserve.ModelInfer",
        "raw bytes shorter than the shape needs",
        lambda: tensor_request(raw=b"\x00" * 100),
        "INVALID_ARGUMENT",
        "raw contents hold 100 bytes",
    ),
    Case(
        "raw-count",
        "kserve.ModelInfer",
        "two raw_input_contents for one input",
        lambda: (lambda r: (r.raw_input_contents.append(b""), r)[-1])(tensor_request()),
        "INVALID_ARGUMENT",
        "raw_input_contents for 1 inputs",
    ),
    Case(
        "typed-and-raw",
        "kserve.ModelInfer",
        "typed contents and raw_input_contents together (the protocol allows one or the other)",
        lambda: (lambda r: (r.inputs[0].contents.fp32_contents.append(0.0), r)[-1])(tensor_request()),
        "INVALID_ARGUMENT",
        "has typed contents while the request also has raw_input_contents",
    ),
    Case(
        "typed-count",
        "kserve.ModelInfer",
        "typed contents with too few values",
        lambda: typed_contents([0.0] * 5),
        "INVALID_ARGUMENT",
        "contents hold 5 elements",
    ),
    Case(
        "nan",
        "kserve.ModelInfer",
        "a NaN in a float tensor",
        lambda: with_value(math.nan),
        "INVALID_ARGUMENT",
        "NaN or infinite",
    ),
    Case(
        "inf",
        "kserve.ModelInfer",
        "+Inf in a float tensor",
        lambda: with_value(math.inf),
        "INVALID_ARGUMENT",
        "NaN or infinite",
    ),
    Case(
        "nan-typed",
        "kserve.ModelInfer",
        "-Inf in typed contents",
        lambda: typed_contents([-math.inf] + [0.0] * (3 * SIDE * SIDE - 1)),
        "INVALID_ARGUMENT",
        "NaN or infinite",
    ),
    Case(
        "output-unknown",
        "kserve.ModelInfer",
        "unknown requested output",
        lambda: requested_output("nope"),
        "INVALID_ARGUMENT",
        "has no output",
    ),
    Case(
        "classification-zero",
        "kserve.ModelInfer",
        "`classification` parameter 0",
        lambda: requested_output("logits", classification=0),
        "INVALID_ARGUMENT",
        "'classification' must be",
    ),
    Case(
        "classification-string",
        "kserve.ModelInfer",
        "`classification` parameter a string",
        lambda: requested_output("logits", classification="all"),
        "INVALID_ARGUMENT",
        "'classification' must be",
    ),
    Case(
        "timeout-negative",
        "kserve.ModelInfer",
        "`timeout` parameter -1",
        lambda: infer_param("timeout", -1),
        "INVALID_ARGUMENT",
        "'timeout' must be",
    ),
    Case(
        "message-oversized",
        "kserve.ModelInfer",
        f"a message over --max-message-mb ({MAX_MESSAGE_MB} MB here)",
        lambda: tensor_request(raw=b"\x00" * ((MAX_MESSAGE_MB + 1) << 20)),
        "RESOURCE_EXHAUSTED",
        "larger than max",
    ),
    Case(
        "stream-bad-request",
        "kserve.ModelStreamInfer",
        "a bad request inside a stream (answered in-band)",
        lambda: [tensor_request(), tensor_request(datatype="FP64"), tensor_request()],
        "INVALID_ARGUMENT",
        "expects FP32",
    ),
    # ---- images
    _images("empty", "INVALID_ARGUMENT", "empty", "empty image bytes"),
    _images("garbage", "INVALID_ARGUMENT", "not a JPEG, PNG, WebP or BMP", "bytes that are not an image"),
    _images("truncated-jpeg", "INVALID_ARGUMENT", "could not be decoded", "JPEG cut in half"),
    _images("truncated-png", "INVALID_ARGUMENT", "could not be decoded", "PNG cut after 200 bytes"),
    _images("corrupt-header", "INVALID_ARGUMENT", "not a JPEG, PNG, WebP or BMP", "JPEG with a zeroed header"),
    _images("header-bomb", "INVALID_ARGUMENT", "decompression bomb", "PNG header claiming 100,000 x 100,000"),
    _images("decompression-bomb", "INVALID_ARGUMENT", "the limit is", "49 Mpx PNG in 150 kB (over --max-image-pixels)"),
    _images("one-pixel", "INVALID_ARGUMENT", "at least 8 pixels", "1x1 image"),
    _images("gif", "INVALID_ARGUMENT", "not a JPEG, PNG, WebP or BMP", "GIF (not a served format)"),
    _images("tiff", "INVALID_ARGUMENT", "not a JPEG, PNG, WebP or BMP", "TIFF (not a served format)"),
    _images("animated-png", "OK", "", "animated PNG (first frame is used)"),
    _images("animated-webp", "OK", "", "animated WebP (first frame is used)"),
    _images("16-bit-grey-png", "OK", "", "16-bit greyscale PNG (scaled to 8 bits, not clipped)"),
    _images("16-bit-rgb-png", "OK", "", "16-bit RGB PNG"),
    _images("cmyk-jpeg", "OK", "", "CMYK JPEG (converted to RGB)"),
    _images("palette-png-with-alpha", "OK", "", "palette PNG with transparency"),
    Case(
        "no-image",
        "vision.Classify",
        "no image at all",
        lambda: vpb.ClassifyRequest(model="classifier"),
        "INVALID_ARGUMENT",
        "no image in the request",
    ),
    Case(
        "empty-image-message",
        "vision.Classify",
        "an `Image` with neither data nor raw",
        lambda: vpb.ClassifyRequest(model="classifier", images=[vpb.Image()]),
        "INVALID_ARGUMENT",
        "is empty",
    ),
    Case(
        "too-many-images",
        "vision.Classify",
        "65 images in one call",
        lambda: vpb.ClassifyRequest(model="classifier", images=[OK_IMAGE] * 65),
        "INVALID_ARGUMENT",
        "at most 64",
    ),
    Case(
        "raw-one-channel",
        "vision.Classify",
        "raw pixels with 1 channel",
        lambda: vpb.ClassifyRequest(model="classifier", image=raw(64, 64, 1)),
        "INVALID_ARGUMENT",
        "channel",
    ),
    Case(
        "raw-byte-count",
        "vision.Classify",
        "raw pixels with the wrong byte count",
        lambda: vpb.ClassifyRequest(model="classifier", image=raw(64, 64, 3, size=100)),
        "INVALID_ARGUMENT",
        "needs 12288 bytes",
    ),
    Case(
        "raw-huge-dims",
        "vision.Classify",
        "raw 4,294,967,295 x 4,294,967,295 (no allocation follows)",
        lambda: vpb.ClassifyRequest(model="classifier", image=raw(2**32 - 1, 2**32 - 1, 3, size=16)),
        "INVALID_ARGUMENT",
        "the limit is",
    ),
    Case(
        "raw-zero-dims",
        "vision.Classify",
        "raw 0 x 0",
        lambda: vpb.ClassifyRequest(model="classifier", image=raw(0, 0, 3)),
        "INVALID_ARGUMENT",
        "at least 8",
    ),
    # ---- task options
    Case(
        "top-k-huge",
        "vision.Classify",
        "`top_k` 4,294,967,295",
        lambda: vpb.ClassifyRequest(model="classifier", image=OK_IMAGE, top_k=2**32 - 1),
        "INVALID_ARGUMENT",
        "top_k",
    ),
    Case(
        "task-mismatch",
        "vision.Detect",
        "Detect on the classifier",
        lambda: vpb.DetectRequest(model="classifier", image=OK_IMAGE),
        "INVALID_ARGUMENT",
        "needs a detection",
    ),
    *(
        Case(
            f"threshold-{k}",
            "vision.Detect",
            f"`{field}` {v!r}",
            lambda field=field, v=v: vpb.DetectRequest(model="detector", image=OK_IMAGE, **{field: v}),
            "INVALID_ARGUMENT",
            "within [0, 1]",
        )
        for k, field, v in (
            ("nan", "confidence_threshold", math.nan),
            ("inf", "iou_threshold", math.inf),
            ("negative", "confidence_threshold", -1e30),
            ("over-one", "iou_threshold", 1.5),
        )
    ),
    Case(
        "max-detections-zero",
        "vision.Detect",
        "`max_detections` 0",
        lambda: vpb.DetectRequest(model="detector", image=OK_IMAGE, max_detections=0),
        "INVALID_ARGUMENT",
        "max_detections 0",
    ),
    Case(
        "max-detections-huge",
        "vision.Detect",
        "`max_detections` 4,294,967,295",
        lambda: vpb.DetectRequest(model="detector", image=OK_IMAGE, max_detections=2**32 - 1),
        "INVALID_ARGUMENT",
        "must be 1 to",
    ),
    Case(
        "class-id-huge",
        "vision.Detect",
        "class id 4,294,967,295",
        lambda: vpb.DetectRequest(model="detector", image=OK_IMAGE, class_ids=[2**32 - 1]),
        "INVALID_ARGUMENT",
        "out of range",
    ),
    Case(
        "class-ids-10k",
        "vision.Detect",
        "10,000 class ids",
        lambda: vpb.DetectRequest(model="detector", image=OK_IMAGE, class_ids=list(range(10_000))),
        "INVALID_ARGUMENT",
        "out of range",
    ),
    Case(
        "beam-zero",
        "vision.Caption",
        "`beam_size` 0",
        lambda: vpb.CaptionRequest(model="captioner", image=OK_IMAGE, beam_size=0),
        "INVALID_ARGUMENT",
        "beam_size 0",
    ),
    Case(
        "beam-huge",
        "vision.Caption",
        "`beam_size` 4,294,967,295",
        lambda: vpb.CaptionRequest(model="captioner", image=OK_IMAGE, beam_size=2**32 - 1),
        "INVALID_ARGUMENT",
        "must be 1 to 16",
    ),
    Case(
        "max-length-huge",
        "vision.Caption",
        "`max_length` 4,294,967,295",
        lambda: vpb.CaptionRequest(model="captioner", image=OK_IMAGE, max_length=2**32 - 1),
        "INVALID_ARGUMENT",
        "max_length",
    ),
    Case(
        "caption-unknown",
        "vision.Caption",
        "Caption with an unknown model",
        lambda: vpb.CaptionRequest(model="poet", image=OK_IMAGE),
        "NOT_FOUND",
        "unknown model",
    ),
    Case(
        "segment-on-detector",
        "vision.Segment",
        "Segment on the detector",
        lambda: vpb.SegmentRequest(model="detector", image=OK_IMAGE),
        "INVALID_ARGUMENT",
        "needs a segmentation",
    ),
    Case(
        "stream-bad-frame",
        "vision.DetectStream",
        "a bad frame inside a DetectStream (answered in-band)",
        lambda: [
            vpb.DetectFrame(frame_id=i, request=vpb.DetectRequest(model="detector", image=img))
            for i, img in enumerate([OK_IMAGE, image(b"junk"), OK_IMAGE])
        ],
        "INVALID_ARGUMENT",
        "not a JPEG",
    ),
]


def call(srv: RunningServer, case: Case, request: object) -> tuple[str, str]:
    """(status name, message); a stream answers OK overall and carries the bad item's error in-band."""
    api, method = case.rpc.split(".")
    options = [("grpc.max_send_message_length", 64 << 20)]
    with grpc.insecure_channel(srv.url, options=options) as ch:
        stub = kpb_grpc.GRPCInferenceServiceStub(ch) if api == "kserve" else vpb_grpc.VisionStub(ch)
        try:
            if isinstance(request, bytes):  # not a protobuf message at all
                path = f"/inference.GRPCInferenceService/{method}" if api == "kserve" else f"/optic.v1.Vision/{method}"
                ch.unary_unary(path)(request, timeout=60)
                return "OK", ""
            if method == "ModelStreamInfer":
                answers = list(stub.ModelStreamInfer(iter(request), timeout=60))
                assert len(answers) == 3 and not answers[0].error_message and not answers[2].error_message
                return "INVALID_ARGUMENT", answers[1].error_message
            if method == "DetectStream":
                answers = list(stub.DetectStream(iter(request), timeout=60))
                assert [a.frame_id for a in answers] == [0, 1, 2] and not answers[2].error_code
                return answers[1].error_code, answers[1].error_message
            getattr(stub, method)(request, timeout=60)
        except grpc.RpcError as err:
            return err.code().name, err.details() or ""
    return "OK", ""


@pytest.fixture(scope="module")
def hostile_server(tmp_path_factory: pytest.TempPathFactory):
    srv = start_server(tmp_path_factory.mktemp("hostile"), "--max-message-mb", str(MAX_MESSAGE_MB))
    yield srv
    assert srv.stop() == 0, srv.log()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.parametrize("case", MATRIX, ids=[c.id for c in MATRIX])
def test_bad_input_matrix(hostile_server: RunningServer, case: Case) -> None:
    code, message = call(hostile_server, case, case.request())
    assert code == case.code, f"{case.id}: {code}: {message}"
    assert case.needle in message, f"{case.id}: {message!r}"
    # Messages stay short and printable, whatever the request carried.
    assert len(message) < 600, f"{case.id}: {len(message)} characters"
    assert "\n" not in message and "\x1b" not in message and "\x00" not in message, repr(message)


def test_matrix_leaves_the_server_serving_correct_and_bounded(hostile_server: RunningServer) -> None:
    requests = [(case, case.request()) for case in MATRIX]
    call(hostile_server, MATRIX[0], requests[0][1])
    rounds = []
    for _ in range(3):
        for case, request in requests:
            call(hostile_server, case, request)
        rounds.append(rss_mb(hostile_server.proc.pid))
    assert hostile_server.health() == health_pb2.HealthCheckResponse.SERVING
    assert hostile_server.proc.poll() is None
    # Every round allocates the same transient buffers: after the first, memory must not keep growing.
    assert rounds[2] - rounds[0] < 25, f"RSS after each round (MB): {rounds}"
    with grpc.insecure_channel(hostile_server.url) as ch:
        answer = vpb_grpc.VisionStub(ch).Classify(vpb.ClassifyRequest(model="classifier", image=OK_IMAGE), timeout=30)
    assert answer.classes and 0.0 <= answer.classes[0].score <= 1.0
    log = hostile_server.log()
    assert "\x1b" not in log and "\r" not in log and "\x00" not in log
    assert not any(line.startswith("2026-01-01") for line in log.splitlines()), "a request forged a log line"


def test_docs_reproduce_the_matrix() -> None:
    """docs/operations.md's table lists every case with the status the test demands, and nothing else."""
    text = (ROOT / "docs" / "operations.md").read_text()
    section = text.split("### Bad-input matrix", 1)[1].split("\n#", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = cells[3].strip("`")
    assert rows == {c.id: c.code for c in MATRIX}


def readme_table() -> str:
    """The docs' rows from MATRIX (``from tests.test_hostile import readme_table``)."""
    lines = ["| case | RPC | input | status |", "|---|---|---|---|"]
    lines += [f"| `{c.id}` | {c.rpc.split('.')[1]} | {c.what} | `{c.code}` |" for c in MATRIX]
    return "\n".join(lines)
