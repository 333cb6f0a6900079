"""Classification: logits or probabilities -> the top-k labels."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from optic.proto.optic.v1 import vision_pb2 as pb
from optic.server.errors import InvalidArgument
from optic.server.metadata import TASK_NAMES, ModelMeta
from optic.server.tasks import draw
from optic.server.tasks.base import Option, Task, Work, label_of
from optic.server.tasks.image import Prepared

if TYPE_CHECKING:
    from PIL import Image as PILImage

    from optic.server.repository import ServedModel

DEFAULT_TOP_K = 5
MAX_TOP_K = 1000


@dataclass(frozen=True)
class Classification:
    class_id: int
    label: str
    score: float  # probability in [0, 1]


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - np.max(logits, axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def top_k(scores: np.ndarray, meta: ModelMeta, k: int) -> list[Classification]:
    """One sample's class scores -> best ``k`` labels (0 means the default)."""
    scores = scores.reshape(-1)
    probs = softmax(scores) if meta.output_kind == "logits" else scores.astype(np.float64)
    k = min(k or DEFAULT_TOP_K, probs.size)
    best = np.argpartition(-probs, k - 1)[:k]
    best = best[np.argsort(-probs[best], kind="stable")]
    return [Classification(int(i), label_of(meta.labels, int(i)), float(probs[i])) for i in best]


class Classify(Task[list[Classification]]):
    name = "classify"
    long_name = TASK_NAMES["classify"]
    rpc = "Classify"
    request_type = pb.ClassifyRequest
    response_type = pb.ClassifyResponse
    default_model = "classifier"
    options = (Option("top_k", "--top-k", int, "labels to return (default 5)"),)

    def validate(self, model: ServedModel, request: pb.ClassifyRequest) -> pb.ClassifyRequest:
        if request.top_k > MAX_TOP_K:
            raise InvalidArgument(f"top_k is {request.top_k}; at most {MAX_TOP_K}")
        return request

    def finish(
        self,
        work: Work,
        model: ServedModel,
        request: pb.ClassifyRequest,
        prepared: Prepared,
        outputs: dict[str, np.ndarray],
    ) -> pb.ClassifyResult:
        labels = top_k(outputs[model.outputs[0].name], model.meta, request.top_k)
        # Fields by name, not asdict(): asdict deep-copies each field (13 us of the event loop per answer).
        return pb.ClassifyResult(
            classes=[pb.Classification(class_id=x.class_id, label=x.label, score=x.score) for x in labels]
        )

    async def handle(self, work: Work, request: pb.ClassifyRequest, model: ServedModel) -> pb.ClassifyResponse:
        response: Any = await super().handle(work, request, model)
        response.classes.extend(response.results[0].classes)  # the first image's answer, as before `images`
        return response

    # ------------------------------------------------------------------ client side

    def result(self, message: pb.ClassifyResult) -> list[Classification]:
        return [Classification(c.class_id, c.label, c.score) for c in message.classes]

    def render(self, result: list[Classification]) -> str:
        return "\n".join(f"  {x.score:7.4f}  {x.label} ({x.class_id})" for x in result)

    def to_json(self, result: list[Classification]) -> object:
        return [asdict(x) for x in result]

    def draw(self, image: PILImage.Image, result: list[Classification]) -> PILImage.Image:
        return draw.with_caption(image, ", ".join(f"{c.label} {c.score:.2f}" for c in result[:3]))


TASK = Classify()
