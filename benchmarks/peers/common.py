"""The one pipeline every peer server runs: Optic's own decode, pre- and post-processing around one
onnxruntime session.

Built only from Optic's functions (``optic.server.tasks.image.prepare``, ``classify.top_k``,
``boxes.detect``), so per image the peers do exactly the work Optic does and the comparison measures the
serving frameworks, not the image code. Imported by the peer servers in ``.venv-peers`` (never by Optic
or its tests).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from optic.server.metadata import ModelMeta
from optic.server.tasks import boxes, classify
from optic.server.tasks.base import label_of
from optic.server.tasks.image import ImageLimits, Prepared, prepare

ROOT = Path(__file__).resolve().parents[2]
MODEL_REPO = ROOT / "model_repo"
MODELS = ("classifier", "detector")
MODEL_ENV = "PEER_MODEL"  # how the runner tells a peer which model to serve
BATCH_LOG_ENV = "PEER_BATCH_LOG"  # a file to which every batch appends its size: the runner's mean batch size
MAX_BATCH_SIZE = 32  # every system's largest dynamic batch (Optic's default --max-batch-size)
BATCH_WAIT_S = 0.002  # every system's batch window where it has one (Optic's default --max-queue-delay-ms 2)
TOP_K = 5  # Optic's default when a Classify request leaves top_k unset
# Optic's detector defaults (DetectParams): a Detect request without thresholds gets these.
CONF, IOU, AGNOSTIC, MAX_DET = 0.25, 0.45, False, 300

Answer = list[dict[str, Any]]


def model_from_env(default: str = "classifier") -> str:
    """The model a peer serves: ``$PEER_MODEL`` (the runner sets it), checked."""
    name = os.environ.get(MODEL_ENV, default)
    if name not in MODELS:
        raise SystemExit(f"{MODEL_ENV}={name!r}: expected one of {', '.join(MODELS)}")
    return name


def session_options() -> ort.SessionOptions:
    """One intra-op thread, no spin-waiting: the server has one core, and a spinning pool would steal it from
    the HTTP stack (Optic turns spinning off for the same reason)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return so


class Pipeline:
    """One model, one onnxruntime session (one per server process): bytes in, plain JSON-able answers out."""

    def __init__(self, model: str, repo: Path = MODEL_REPO) -> None:
        if model not in MODELS:
            raise ValueError(f"model {model!r}: expected one of {', '.join(MODELS)}")
        self.model = model
        self.session = ort.InferenceSession(
            str(repo / model / "1" / "model.onnx"), session_options(), providers=["CPUExecutionProvider"]
        )
        self.meta = ModelMeta.from_props(self.session.get_modelmeta().custom_metadata_map)
        if self.meta.input is None:
            raise ValueError(f"model {model!r} has no optic.input.* metadata")
        self.spec = self.meta.input
        self.limits = ImageLimits()
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name  # Optic post-processes the first output too
        log = os.environ.get(BATCH_LOG_ENV)
        # Line-buffered and kept open: one small write per batch (microseconds, against milliseconds of work).
        self._batch_log = open(log, "a", buffering=1) if log else None  # noqa: SIM115 - lives as long as the server

    # The three stages, separately, so each framework can place them where its documentation puts them.

    def preprocess(self, data: bytes) -> Prepared:
        """JPEG bytes -> (C, H, W) float32 tensor and its transform; Optic's ``prepare``, same limits."""
        return prepare(data, self.spec, self.limits)

    def infer(self, tensors: Sequence[np.ndarray]) -> np.ndarray:
        """One batched ``session.run`` over the stacked tensors; the first output, batch axis first."""
        batch = np.stack(tensors) if len(tensors) > 1 else tensors[0][None]
        if self._batch_log is not None:
            self._batch_log.write(f"{len(tensors)}\n")
        return self.session.run([self.output_name], {self.input_name: batch})[0]

    def postprocess(self, output: np.ndarray, prepared: Prepared) -> Answer:
        """One image's output (batch axis removed) -> its answer, as Optic's Classify/Detect builds it."""
        if self.model == "classifier":
            return [
                {"class_id": c.class_id, "label": c.label, "score": c.score}
                for c in classify.top_k(output, self.meta, TOP_K)
            ]
        layout = boxes.layout_of(output.shape, self.meta.output_layout, len(self.meta.labels))
        found = boxes.detect(output, layout, CONF, IOU, AGNOSTIC, MAX_DET)
        mapped = prepared.transform.to_original(found.boxes)
        return [
            {
                "box": [float(v) for v in box],
                "score": float(score),
                "class_id": int(cid),
                "label": label_of(self.meta.labels, int(cid)),
            }
            for box, score, cid in zip(mapped, found.scores, found.class_ids, strict=True)
        ]

    def run_batch(self, images: Sequence[bytes]) -> list[Answer]:
        """All three stages for a batch of encoded images, answers in order."""
        prepared = [self.preprocess(b) for b in images]
        outputs = self.infer([p.tensor for p in prepared])
        return [self.postprocess(o, p) for o, p in zip(outputs, prepared, strict=True)]

    def warmup(self) -> None:
        """Run zeros through the graph at batch 1 and the largest batch, as Optic warms its sessions."""
        shape = self.session.get_inputs()[0].shape[1:]
        for n in (1, MAX_BATCH_SIZE):
            self.session.run([self.output_name], {self.input_name: np.zeros((n, *shape), np.float32)})
