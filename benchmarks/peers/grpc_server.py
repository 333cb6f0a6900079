"""A plain grpcio server: what a user writes instead of adopting a serving framework, and the floor under any
gRPC server in Python.

gRPC's own quickstart pattern: ``grpc.server(ThreadPoolExecutor(max_workers=16))`` with a handler for the
served model's method, each request run through ``common.Pipeline`` on its own (decode, one ``session.run`` of
one image, post-process) in the pool thread that received it. No batching, no metrics, no limits; the only
check is "one encoded image". It speaks Optic's ``optic.v1.Vision`` ``Classify`` / ``Detect``: the same
request bytes, and the answer fields the runner compares (``results[0]``'s classes or detections; Optic's
answers also carry ``model_version``, the image's size and, for Classify, a copy of the first result).

Run: ``PEER_MODEL=classifier python grpc_server.py --port 8104`` (binds 127.0.0.1 only).
"""

from __future__ import annotations

import argparse
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Pipeline, model_from_env

from optic.proto.optic.v1 import vision_pb2 as vpb
from optic.server.errors import InvalidArgument

WORKERS = 16  # pool threads: requests in progress at once (the rest wait in gRPC's queue)


class Vision:
    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline

    def _answer(self, request: Any, context: grpc.ServicerContext) -> list[dict[str, Any]]:
        images = [request.image] if request.HasField("image") else list(request.images)
        if len(images) != 1 or not images[0].data:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "send one encoded image")
        try:
            return self.pipeline.run_batch([images[0].data])[0]
        except InvalidArgument as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            raise  # not reached: abort raises

    def classify(self, request: vpb.ClassifyRequest, context: grpc.ServicerContext) -> vpb.ClassifyResponse:
        classes = [vpb.Classification(**c) for c in self._answer(request, context)]
        return vpb.ClassifyResponse(model=self.pipeline.model, results=[vpb.ClassifyResult(classes=classes)])

    def detect(self, request: vpb.DetectRequest, context: grpc.ServicerContext) -> vpb.DetectResponse:
        found = [
            vpb.Detection(
                box=vpb.Box(x1=d["box"][0], y1=d["box"][1], x2=d["box"][2], y2=d["box"][3]),
                score=d["score"],
                class_id=d["class_id"],
                label=d["label"],
            )
            for d in self._answer(request, context)
        ]
        return vpb.DetectResponse(model=self.pipeline.model, results=[vpb.DetectResult(detections=found)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args()
    pipeline = Pipeline(model_from_env())
    pipeline.warmup()
    service = Vision(pipeline)
    method, request_type, response_type = (
        ("Classify", vpb.ClassifyRequest, vpb.ClassifyResponse)
        if pipeline.model == "classifier"
        else ("Detect", vpb.DetectRequest, vpb.DetectResponse)
    )
    handler = grpc.unary_unary_rpc_method_handler(
        service.classify if method == "Classify" else service.detect,
        request_deserializer=request_type.FromString,
        response_serializer=response_type.SerializeToString,
    )
    server = grpc.server(ThreadPoolExecutor(max_workers=WORKERS))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("optic.v1.Vision", {method: handler}),))
    server.add_insecure_port(f"127.0.0.1:{args.port}")
    server.start()
    signal.signal(signal.SIGTERM, lambda *_: server.stop(5))
    server.wait_for_termination()


if __name__ == "__main__":
    main()
