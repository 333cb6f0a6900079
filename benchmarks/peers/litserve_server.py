"""LitServe peer: a ``LitAPI`` with LitServe's documented dynamic batching.

Request: ``POST /predict``, ``multipart/form-data`` with the JPEG as the file field ``image`` -- LitServe's
documented way to upload a file (it keeps form files in memory so they can cross to the inference
worker), and binary, so no base64 inflation. Response: JSON ``{"model": ..., "result": [...]}``.

LitServe decodes each request in ``decode_request`` (here: Optic's decode + resize + normalise), stacks them
in ``batch``, runs ``predict`` once per batch (one ``session.run``), splits with ``unbatch`` and
post-processes per request in ``encode_response``.

Run: ``PEER_MODEL=classifier python litserve_server.py --port 8101`` (binds 127.0.0.1 only).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import litserve as ls
import numpy as np
from fastapi import HTTPException

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BATCH_WAIT_S, MAX_BATCH_SIZE, Pipeline, model_from_env

from optic.server.errors import InvalidArgument
from optic.server.tasks.image import Prepared


class VisionAPI(ls.LitAPI):
    """One model, one onnxruntime session per inference worker (LitServe calls ``setup`` in the worker)."""

    def setup(self, device: str) -> None:
        self.pipeline = Pipeline(model_from_env())
        self.pipeline.warmup()

    # No annotations on the request and response: LitServe reads them to choose FastAPI's parsing and
    # response validation, and unannotated is its plain (cheapest) path.
    def decode_request(self, request):
        upload = request["image"]
        data = upload.file.read() if hasattr(upload, "file") else upload
        try:
            return self.pipeline.preprocess(data)
        except InvalidArgument as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from None

    def batch(self, inputs: list[Prepared]) -> list[Prepared]:
        # The transforms travel with the tensors: encode_response needs them to map boxes back.
        return inputs

    def predict(self, x: list[Prepared]) -> list[tuple[np.ndarray, Prepared]]:
        outputs = self.pipeline.infer([p.tensor for p in x])
        return list(zip(outputs, x, strict=True))

    def unbatch(self, output: list[tuple[np.ndarray, Prepared]]) -> list[tuple[np.ndarray, Prepared]]:
        return output

    def encode_response(self, output: tuple[np.ndarray, Prepared]):
        return {"model": self.pipeline.model, "result": self.pipeline.postprocess(*output)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args()
    api = VisionAPI(max_batch_size=MAX_BATCH_SIZE, batch_timeout=BATCH_WAIT_S)
    server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=1, timeout=60)
    server.run(host="127.0.0.1", port=args.port, num_api_servers=1, log_level="warning", generate_client_file=False)


if __name__ == "__main__":
    main()
