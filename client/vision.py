"""A small typed client for the Vision API (``optic infer`` uses it); results are the task modules' dataclasses.

Imports only the ``optic.v1`` protos, so it can live in one process with
tritonclient (whose generated ``inference`` module clashes with ours).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
import numpy as np

from optic.proto.optic.v1 import vision_pb2 as pb
from optic.server.tasks import task_named
from optic.server.tasks.caption import Caption
from optic.server.tasks.classify import Classification
from optic.server.tasks.detect import Detection
from optic.server.tasks.instances import InstanceMask
from optic.server.tasks.segment import Segmentation

__all__ = [
    "Caption",
    "Classification",
    "Credentials",
    "Detection",
    "InstanceMask",
    "ModelInfo",
    "Segmentation",
    "VisionClient",
    "open_channel",
]

ImageInput = bytes | np.ndarray  # encoded bytes, or HxWx3 / HxWx4 uint8 pixels


def to_image(image: ImageInput) -> pb.Image:
    if isinstance(image, bytes | bytearray):
        return pb.Image(data=bytes(image))
    array = np.ascontiguousarray(image, dtype=np.uint8)
    if array.ndim != 3:
        raise ValueError(f"pixels must be HxWxC, got shape {array.shape}")
    h, w, c = array.shape
    return pb.Image(raw=pb.RawImage(height=h, width=w, channels=c, pixels=array.tobytes()))


@dataclass(frozen=True)
class ModelInfo:
    """What the server says about a model (Vision ModelMetadata)."""

    model: str
    served_by: str
    version: str
    versions: tuple[str, ...]
    task: str  # classify, detect, segment, caption
    labels: tuple[str, ...]
    input_size: tuple[int, int]  # (height, width)
    defaults: dict[str, str]


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
        self.timeout = timeout

    def call(
        self, task: str, images: list[ImageInput], model: str | None = None, version: str = "", **options: Any
    ) -> list[Any]:
        """Any task by name: one result per image (the task module's dataclass). ``options`` are request fields."""
        t = task_named(task)
        request = t.request(model or t.default_model, [to_image(i) for i in images], version, **options)
        response = self._stub(t.rpc, type(request), t.response_type)(request, timeout=self.timeout)
        return [t.result(r) for r in response.results]

    def model_info(self, model: str, version: str = "") -> ModelInfo:
        call = self._stub("ModelMetadata", pb.ModelMetadataRequest, pb.ModelMetadataResponse)
        m = call(pb.ModelMetadataRequest(model=model, model_version=version), timeout=self.timeout)
        return ModelInfo(
            m.model,
            m.served_by,
            m.model_version,
            tuple(m.versions),
            m.task,
            tuple(m.labels),
            (m.input.height, m.input.width),
            dict(m.defaults),
        )

    def classify(
        self, image: ImageInput, model: str = "classifier", top_k: int = 5, version: str = ""
    ) -> list[Classification]:
        return self.classify_many([image], model, top_k, version)[0]

    def classify_many(
        self, images: list[ImageInput], model: str = "classifier", top_k: int = 5, version: str = ""
    ) -> list[list[Classification]]:
        return self.call("classify", images, model, version, top_k=top_k)

    def detect(self, image: ImageInput, model: str = "detector", version: str = "", **options: Any) -> list[Detection]:
        return self.detect_many([image], model, version, **options)[0]

    def detect_many(
        self, images: list[ImageInput], model: str = "detector", version: str = "", **options: Any
    ) -> list[list[Detection]]:
        """``options``: confidence_threshold, iou_threshold, class_agnostic, max_detections, class_ids."""
        return self.call("detect", images, model, version, **options)

    def detect_stream(
        self, frames: Iterable[ImageInput], model: str = "detector", version: str = "", **options: Any
    ) -> Iterator[tuple[int, list[Detection]]]:
        """Frames in, (frame index, detections) out in order; a failed frame raises at its turn."""
        task = task_named("detect")
        first = task.request(model, [], version, **options)  # bad options fail here, not inside gRPC's thread

        def requests() -> Iterator[pb.DetectFrame]:
            for i, frame in enumerate(frames):
                request = pb.DetectRequest.FromString(first.SerializeToString())
                request.image.CopyFrom(to_image(frame))
                yield pb.DetectFrame(frame_id=i, request=request)

        stream = self._channel.stream_stream(
            "/optic.v1.Vision/DetectStream",
            request_serializer=pb.DetectFrame.SerializeToString,
            response_deserializer=pb.DetectFrameResult.FromString,
        )
        for answer in stream(requests(), timeout=self.timeout):
            if answer.error_code:
                raise RuntimeError(f"frame {answer.frame_id}: {answer.error_code}: {answer.error_message}")
            yield answer.frame_id, task.result(answer.response.results[0])

    def segment(
        self, image: ImageInput, model: str = "segmenter", rle: bool = False, version: str = ""
    ) -> Segmentation:
        return self.call("segment", [image], model, version, return_rle=rle)[0]

    def segment_instances(
        self, image: ImageInput, model: str = "segmenter", version: str = "", rle: bool = False, **options: Any
    ) -> list[InstanceMask]:
        """An instance model's objects (box, score, class, mask in the box); ``options`` as :meth:`detect`'s."""
        return self.call("instance-segment", [image], model, version, return_rle=rle, **options)[0]

    def caption(
        self,
        image: ImageInput,
        model: str = "captioner",
        beam_size: int | None = None,
        max_length: int | None = None,
        version: str = "",
    ) -> Caption:
        return self.call("caption", [image], model, version, beam_size=beam_size, max_length=max_length)[0]

    def _stub(self, method: str, request_type: Any, response_type: Any) -> grpc.UnaryUnaryMultiCallable:
        return self._channel.unary_unary(
            f"/optic.v1.Vision/{method}",
            request_serializer=request_type.SerializeToString,
            response_deserializer=response_type.FromString,
        )

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> VisionClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
