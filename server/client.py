"""A small typed client for the vision API (``optic infer`` uses it)."""

from __future__ import annotations

from dataclasses import dataclass
from types import TracebackType

import grpc

from server.proto.optic.v1 import vision_pb2 as pb
from server.proto.optic.v1 import vision_pb2_grpc as pb_grpc


@dataclass(frozen=True)
class Classification:
    class_id: int
    label: str
    score: float


class VisionClient:
    """Blocking client; ``url`` is ``host:port``."""

    def __init__(self, url: str, timeout: float = 30.0, max_message_bytes: int = 64 * 1024 * 1024) -> None:
        self._channel = grpc.insecure_channel(
            url,
            options=[
                ("grpc.max_send_message_length", max_message_bytes),
                ("grpc.max_receive_message_length", max_message_bytes),
            ],
        )
        self._stub = pb_grpc.VisionStub(self._channel)
        self.timeout = timeout

    def classify(
        self, image: bytes, model: str = "classifier", top_k: int = 5, version: str = ""
    ) -> list[Classification]:
        response = self._stub.Classify(
            pb.ClassifyRequest(model=model, model_version=version, image=pb.Image(data=image), top_k=top_k),
            timeout=self.timeout,
        )
        return [Classification(c.class_id, c.label, c.score) for c in response.classes]

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> VisionClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
