"""Classification: image -> tensor, and logits/probabilities -> top-k labels."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from server.errors import InvalidArgument
from server.metadata import ModelMeta
from server.tasks.image import ImageLimits, image_to_tensor

DEFAULT_TOP_K = 5


@dataclass(frozen=True)
class Label:
    class_id: int
    label: str
    score: float


def preprocess(data: bytes, meta: ModelMeta, limits: ImageLimits) -> np.ndarray:
    if meta.input is None:
        raise InvalidArgument("model has no input metadata; it cannot take images")
    return image_to_tensor(data, meta.input, limits)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - np.max(logits, axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def postprocess(scores: np.ndarray, meta: ModelMeta, top_k: int) -> list[Label]:
    """One sample's class scores -> best ``top_k`` labels (0 means the default)."""
    scores = scores.reshape(-1)
    probs = softmax(scores) if meta.output_kind == "logits" else scores.astype(np.float64)
    k = min(top_k or DEFAULT_TOP_K, probs.size)
    best = np.argpartition(-probs, k - 1)[:k]
    best = best[np.argsort(-probs[best], kind="stable")]
    labels = meta.labels
    return [Label(int(i), labels[i] if i < len(labels) else str(int(i)), float(probs[i])) for i in best]
