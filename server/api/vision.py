"""``optic.v1.Vision``: image in, task answer out; pre/post-processing off the event loop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor

import grpc
import numpy as np

from server.api.common import rpc, time_left
from server.errors import InvalidArgument
from server.proto.optic.v1 import vision_pb2 as pb
from server.proto.optic.v1 import vision_pb2_grpc as pb_grpc
from server.repository import ModelRepository, ServedModel
from server.tasks import classification
from server.tasks.image import ImageLimits, cheap_to_decode

MAX_TOP_K = 1000


def _require_task(model: ServedModel, task: str, rpc_name: str) -> None:
    if model.meta.task != task:
        raise InvalidArgument(
            f"model {model.name!r} is a {model.meta.task or 'generic tensor'} model; {rpc_name} needs a {task} model"
        )


class VisionServicer(pb_grpc.VisionServicer):
    def __init__(self, repo: ModelRepository, executor: Executor, limits: ImageLimits) -> None:
        self.repo = repo
        self._executor = executor
        self._limits = limits

    async def _preprocess(self, fn: Callable[..., np.ndarray], data: bytes, model: ServedModel) -> np.ndarray:
        """Small images inline; large ones in the worker pool so decoding never stalls the loop."""
        if cheap_to_decode(data, self._limits):
            return fn(data, model.meta, self._limits)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, data, model.meta, self._limits)

    @rpc("Classify", lambda r: r.model)
    async def Classify(self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext) -> pb.ClassifyResponse:
        with self.repo.use(request.model, request.model_version) as model:
            _require_task(model, "classification", "Classify")
            if request.top_k > MAX_TOP_K:
                raise InvalidArgument(f"top_k is {request.top_k}; at most {MAX_TOP_K}")
            tensor = await self._preprocess(classification.preprocess, request.image.data, model)
            name = model.inputs[0].name
            outputs = await model.infer({name: tensor[None]}, time_left(context))
        scores = outputs[model.outputs[0].name][0]
        labels = classification.postprocess(scores, model.meta, request.top_k)
        return pb.ClassifyResponse(
            model=model.name,
            model_version=model.version,
            classes=[pb.Classification(class_id=x.class_id, label=x.label, score=x.score) for x in labels],
        )
