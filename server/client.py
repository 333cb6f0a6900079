"""A small typed client for the vision API (``optic infer`` uses it).

Imports only the ``optic.v1`` protos, so it can live in one process with
tritonclient (whose generated ``inference`` module clashes with ours).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
import numpy as np

from server.proto.optic.v1 import vision_pb2 as pb
from server.proto.optic.v1 import vision_pb2_grpc as pb_grpc

ImageInput = bytes | np.ndarray  # encoded bytes, or HxWx3 / HxWx4 uint8 pixels


@dataclass(frozen=True)
class Classification:
    class_id: int
    label: str
    score: float


@dataclass(frozen=True)
class Detection:
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in original pixels
    score: float
    class_id: int
    label: str


@dataclass(frozen=True)
class Segmentation:
    mask: np.ndarray  # (H, W) uint8 class ids at the original size
    labels: dict[int, str]  # classes present
    pixel_counts: dict[int, int]
    rle: dict[int, tuple[int, ...]]  # COCO RLE counts, when asked for


@dataclass(frozen=True)
class Caption:
    text: str
    tokens: tuple[tuple[str, float], ...]  # (token, log-probability)
    log_prob: float


def to_image(image: ImageInput) -> pb.Image:
    if isinstance(image, bytes | bytearray):
        return pb.Image(data=bytes(image))
    array = np.ascontiguousarray(image, dtype=np.uint8)
    if array.ndim != 3:
        raise ValueError(f"pixels must be HxWxC, got shape {array.shape}")
    h, w, c = array.shape
    return pb.Image(raw=pb.RawImage(height=h, width=w, channels=c, pixels=array.tobytes()))


def _detections(result: pb.DetectResult) -> list[Detection]:
    return [
        Detection((d.box.x1, d.box.y1, d.box.x2, d.box.y2), d.score, d.class_id, d.label) for d in result.detections
    ]


@dataclass(frozen=True)
class Credentials:
    """How to reach a server started with TLS, mutual TLS and/or a bearer token (all optional)."""

    tls: bool = False  # TLS with the system's roots (or ``ca``)
    ca: Path | None = None  # PEM roots that signed the server's certificate
    cert: Path | None = None  # mutual TLS: this client's certificate chain (PEM)
    key: Path | None = None  # mutual TLS: this client's private key (PEM)
    token: str | None = None  # sent as ``authorization: Bearer <token>``

    @property
    def secure(self) -> bool:
        return self.tls or any(p is not None for p in (self.ca, self.cert, self.key))

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def channel_credentials(self) -> grpc.ChannelCredentials:
        def read(p: Path | None) -> bytes | None:
            return p.read_bytes() if p is not None else None

        return grpc.ssl_channel_credentials(read(self.ca), read(self.key), read(self.cert))


class _Metadata(grpc.UnaryUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds fixed metadata (the bearer token) to every call; works on plaintext channels too,
    where gRPC refuses call credentials (a mesh or ingress may terminate TLS in front of the server)."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    def _details(self, details: Any) -> Any:
        return details._replace(metadata=(*(details.metadata or ()), *self._metadata))

    def intercept_unary_unary(self, continuation: Callable, client_call_details: Any, request: Any) -> Any:
        return continuation(self._details(client_call_details), request)

    def intercept_stream_stream(self, continuation: Callable, client_call_details: Any, request_iterator: Any) -> Any:
        return continuation(self._details(client_call_details), request_iterator)


def open_channel(url: str, credentials: Credentials | None = None, options: list | None = None) -> grpc.Channel:
    """A blocking channel to ``url``: plaintext, TLS or mutual TLS, with the token on every call."""
    credentials = credentials or Credentials()
    if credentials.secure:
        channel = grpc.secure_channel(url, credentials.channel_credentials(), options=options)
    else:
        channel = grpc.insecure_channel(url, options=options)
    metadata = credentials.metadata()
    return grpc.intercept_channel(channel, _Metadata(metadata)) if metadata else channel


class VisionClient:
    """Blocking client; ``url`` is ``host:port``. Every method takes one image or a list of them."""

    def __init__(
        self,
        url: str,
        timeout: float = 30.0,
        max_message_bytes: int = 64 * 1024 * 1024,
        credentials: Credentials | None = None,
    ) -> None:
        self._channel = open_channel(
            url,
            credentials,
            options=[
                ("grpc.max_send_message_length", max_message_bytes),
                ("grpc.max_receive_message_length", max_message_bytes),
            ],
        )
        self._stub = pb_grpc.VisionStub(self._channel)
        self.timeout = timeout

    def classify(
        self, image: ImageInput, model: str = "classifier", top_k: int = 5, version: str = ""
    ) -> list[Classification]:
        return self.classify_many([image], model, top_k, version)[0]

    def classify_many(
        self, images: list[ImageInput], model: str = "classifier", top_k: int = 5, version: str = ""
    ) -> list[list[Classification]]:
        response = self._stub.Classify(
            pb.ClassifyRequest(model=model, model_version=version, images=[to_image(i) for i in images], top_k=top_k),
            timeout=self.timeout,
        )
        return [[Classification(c.class_id, c.label, c.score) for c in r.classes] for r in response.results]

    def detect(self, image: ImageInput, model: str = "detector", **options: object) -> list[Detection]:
        return self.detect_many([image], model, **options)[0]

    def detect_many(
        self, images: list[ImageInput], model: str = "detector", **options: object
    ) -> list[list[Detection]]:
        """``options``: confidence_threshold, iou_threshold, class_agnostic, max_detections, class_ids, version."""
        version = str(options.pop("version", ""))
        request = pb.DetectRequest(model=model, model_version=version, images=[to_image(i) for i in images], **options)
        return [_detections(r) for r in self._stub.Detect(request, timeout=self.timeout).results]

    def detect_stream(
        self, frames: Iterable[ImageInput], model: str = "detector", **options: object
    ) -> Iterator[tuple[int, list[Detection]]]:
        """Frames in, (frame index, detections) out in order; a failed frame raises at its turn."""

        def requests() -> Iterator[pb.DetectFrame]:
            for i, frame in enumerate(frames):
                yield pb.DetectFrame(
                    frame_id=i, request=pb.DetectRequest(model=model, image=to_image(frame), **options)
                )

        for answer in self._stub.DetectStream(requests(), timeout=self.timeout):
            if answer.error_code:
                raise RuntimeError(f"frame {answer.frame_id}: {answer.error_code}: {answer.error_message}")
            yield answer.frame_id, _detections(answer.response.results[0])

    def segment(
        self, image: ImageInput, model: str = "segmenter", rle: bool = False, version: str = ""
    ) -> Segmentation:
        from PIL import Image

        request = pb.SegmentRequest(model=model, model_version=version, image=to_image(image), return_rle=rle)
        result = self._stub.Segment(request, timeout=self.timeout).results[0]
        mask = np.asarray(Image.open(io.BytesIO(result.mask_png)))
        return Segmentation(
            mask,
            {c.class_id: c.label for c in result.classes},
            {c.class_id: c.pixel_count for c in result.classes},
            {c.class_id: tuple(c.rle_counts) for c in result.classes if c.rle_counts},
        )

    def caption(
        self,
        image: ImageInput,
        model: str = "captioner",
        beam_size: int | None = None,
        max_length: int | None = None,
        version: str = "",
    ) -> Caption:
        request = pb.CaptionRequest(model=model, model_version=version, image=to_image(image))
        if beam_size is not None:
            request.beam_size = beam_size
        if max_length is not None:
            request.max_length = max_length
        result = self._stub.Caption(request, timeout=self.timeout).results[0]
        return Caption(result.text, tuple((t.text, t.log_prob) for t in result.tokens), result.log_prob)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> VisionClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
