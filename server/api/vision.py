"""``optic.v1.Vision``: a thin dispatcher from each method to the task module of the model asked for.

Each unary method is served by the task(s) that claim it (``Task.rpc``); the
model's own ``optic.task`` picks which, so one method can serve related tasks.
Per-stage durations (decode, preprocess, inference, postprocess) go to
``optic_stage_duration_seconds``.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from optic.proto.optic.v1 import vision_pb2 as pb
from optic.server.admission import Admission, SizedRequest, Undecodable, sized_stream
from optic.server.api.common import CallInfo, counted, rpc
from optic.server.api.streams import StreamLimits, in_order
from optic.server.errors import InvalidArgument, NotFound, OpticError
from optic.server.handlers import fail
from optic.server.metrics import STAGE_TIME
from optic.server.repository import ModelRepository, ServedModel, printable
from optic.server.tasks import TASKS, task_of, tasks_of_rpc
from optic.server.tasks.base import Task, Work
from optic.server.tasks.fair import CallLimits, FairExecutor
from optic.server.tasks.image import ImageLimits

SERVICE = pb.DESCRIPTOR.services_by_name["Vision"]


def _observe(model: str, stage: str, seconds: float) -> None:
    STAGE_TIME.labels(model, stage).observe(seconds)


class VisionServicer:
    """Builds the service's method handlers from the task registry (see :meth:`handler`)."""

    def __init__(
        self,
        repo: ModelRepository,
        executor: FairExecutor,
        limits: ImageLimits,
        call_limits: CallLimits,
        admission: Admission,
        streams: StreamLimits,
    ) -> None:
        self.repo = repo
        self._executor = executor
        self._limits = limits
        self._call_limits = call_limits
        self._admission = admission
        self._streams = streams

    def handler(self) -> grpc.GenericRpcHandler:
        handlers: dict[str, grpc.RpcMethodHandler] = {}
        for method in SERVICE.methods:
            tasks = tasks_of_rpc(method.name)
            if tasks:
                handlers[method.name] = self._unary(method.name, tasks[0].request_type, tasks[0].response_type)
        handlers["ModelMetadata"] = self._unary(
            "ModelMetadata", pb.ModelMetadataRequest, pb.ModelMetadataResponse, self._metadata
        )
        handlers["DetectStream"] = grpc.stream_stream_rpc_method_handler(
            self._detect_stream,
            request_deserializer=pb.DetectFrame.FromString,
            response_serializer=pb.DetectFrameResult.SerializeToString,
        )
        return grpc.method_handlers_generic_handler(SERVICE.full_name, handlers)

    def _unary(
        self,
        method: str,
        request_type: Any,
        response_type: Any,
        call: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]] | None = None,
    ) -> grpc.RpcMethodHandler:
        @rpc(method, lambda r: r.model)
        async def behaviour(_: VisionServicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
            if call is not None:
                return await call(request, context)
            return await self._call(method, request, CallInfo.of(context))

        return grpc.unary_unary_rpc_method_handler(
            functools.partial(behaviour, self),
            request_deserializer=request_type.FromString,
            response_serializer=response_type.SerializeToString,
        )

    def _work(self, call: CallInfo) -> Work:
        limits = self._call_limits
        return Work(self.repo, self._executor, self._limits, limits, call.time_left(), _observe, call.peer)

    def _resolve(self, tasks: list[Task], name: str) -> str:
        for task in tasks:
            resolved = task.resolve(self.repo, name)
            if resolved != name:
                return resolved
        return name

    def public_names(self) -> list[str]:
        """The names the Vision API answers to, for messages: the captioner, not its encoder and decoder."""
        names = []
        for model in self.repo.models.values():
            task = task_of(model.meta)
            name = task.public_name(model) if task else None
            if name:
                names.append(name)
        return sorted(names)

    def _lookup(self, name: str, version: str) -> ServedModel:
        """The model a request names; NOT_FOUND lists the names this API knows."""
        try:
            return self.repo.get(name, version)
        except NotFound:
            if name in self.repo.versions:  # a known model without that version: the repository's message
                raise
            known = ", ".join(self.public_names()) or "none"
            raise NotFound(f"unknown model {printable(name)}; this server has: {known}") from None

    async def _call(self, method: str, request: Any, call: CallInfo) -> Any:
        tasks = tasks_of_rpc(method)
        name = self._resolve(tasks, request.model)
        self._lookup(name, request.model_version)
        with self.repo.use(name, request.model_version) as model:
            task = task_of(model.meta)
            if task is None or task.rpc != method:
                wanted = " or ".join(t.long_name for t in tasks)
                raise InvalidArgument(
                    f"model {model.name!r} is a {task.long_name if task else 'generic tensor'} model; "
                    f"{method} needs a {wanted} model"
                )
            task.check(model)
            return await task.handle(self._work(call), request, model)

    async def _metadata(self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext) -> Any:
        name = self._resolve(list(TASKS.values()), request.model)
        model = self._lookup(name, request.model_version)
        task = task_of(model.meta)
        spec = model.meta.input
        response = pb.ModelMetadataResponse(
            model=request.model,
            served_by=model.name,
            model_version=model.version,
            versions=sorted(self.repo.versions.get(model.name, {}), key=int),
            task=task.name if task else "",
            method=task.rpc if task else "",
            labels=model.meta.labels,
            defaults=task.defaults(model) if task else {},
        )
        if spec is not None:
            response.input.CopyFrom(
                pb.InputInfo(
                    height=spec.size[0],
                    width=spec.size[1],
                    resize=spec.resize,
                    pipeline=spec.pipeline,
                    color=spec.color,
                )
            )
        return response

    @sized_stream
    async def _detect_stream(
        self, frames: AsyncIterator[SizedRequest | Undecodable], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.DetectFrameResult]:
        """Frames are processed concurrently (a bounded window) and answered in arrival order, errors in-band."""
        call = CallInfo.of(context)  # read while the stream is live: frames may be handled after it ended

        def start(frame: pb.DetectFrame) -> Awaitable[pb.DetectResponse]:
            label = self.repo.metric_label(frame.request.model)
            return counted(label, "DetectStream", self._call("Detect", frame.request, call))

        answers = in_order(frames, start, self._streams, self._admission.enter, self._admission.leave)
        try:
            async for frame, answer in answers:
                if isinstance(answer, OpticError):
                    yield pb.DetectFrameResult(
                        frame_id=frame.frame_id, error_code=answer.code, error_message=answer.message
                    )
                else:
                    yield pb.DetectFrameResult(frame_id=frame.frame_id, response=answer)
        except OpticError as exc:  # the stream idled, or an item could not be parsed
            fail(context, grpc.StatusCode[exc.code], exc.message)
