"""BentoML peer: a ``@bentoml.service`` whose ``@bentoml.api(batchable=True)`` method is fed by BentoML's
adaptive batching.

Request: ``POST /predict``, ``multipart/form-data`` with the JPEG as the file field ``images`` (a batchable
API takes a list; a client sends a list of one). ``pathlib.Path`` is BentoML's documented file type: BentoML
writes the upload to a per-request temporary file and passes its path, which the API reads back as bytes
for Optic's decoder. Response: JSON, a list with one answer per image sent.

Adaptive batching has no fixed wait window: BentoML learns one from measured batch times, bounded by
``max_latency_ms``. That bound is also a shedding limit -- a queued request predicted to miss it is
answered 503 -- so it is set well above any closed-loop latency at concurrency 64 on one core
(``$PEER_BENTOML_MAX_LATENCY_MS``, default 10000), or the run would measure shedding, not serving.

Run: ``PEER_MODEL=classifier bentoml serve bentoml_service:VisionService --host 127.0.0.1 --port 8102``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import bentoml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import MAX_BATCH_SIZE, Pipeline, model_from_env

MAX_LATENCY_MS = int(os.environ.get("PEER_BENTOML_MAX_LATENCY_MS", "10000"))


# One worker process (the server has one core); no per-request access log line (Optic writes none either).
@bentoml.service(workers=1, traffic={"timeout": 60}, logging={"access": {"enabled": False}})
class VisionService:
    """One model, one onnxruntime session in the service's one worker process."""

    def __init__(self) -> None:
        self.pipeline = Pipeline(model_from_env())
        self.pipeline.warmup()

    @bentoml.api(batchable=True, max_batch_size=MAX_BATCH_SIZE, max_latency_ms=MAX_LATENCY_MS)
    def predict(self, images: list[Path]) -> list[Any]:
        """A batch gathered across requests: decode each, one ``session.run``, post-process each."""
        return self.pipeline.run_batch([p.read_bytes() for p in images])
