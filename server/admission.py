"""Admission control for the gRPC port: bounded calls, request bytes, stream items and open streams.

Runs as a ``grpc.aio`` server interceptor, before a request reaches a servicer.
Three budgets, each with its own RESOURCE_EXHAUSTED message:

- unary calls and stream items in flight share ``max_inflight`` (a stream
  item takes its slot when it is read, not when the stream opens, so idle
  streams hold none), and their requests share ``max_inflight_bytes``, each
  counted at its serialised (decompressed) size as received (a lone call
  always fits: the message size limit bounds it);
- open streaming calls (ModelStreamInfer, DetectStream, health Watch,
  reflection) are bounded by ``max_streams``;
- health Check, reflection and KServe ServerLive/ServerReady never wait for
  a slot: probes must get through an overloaded server.

The counts are exported as ``optic_admission_inflight{kind}`` so exhaustion
shows on dashboards.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from optic.server.handlers import Continuation, behaviour_of, count_refusal, fail, rebuild
from optic.server.metrics import ADMISSION_INFLIGHT, ADMISSION_LIMIT

# Calls that never take a slot (method-name prefixes).
EXEMPT = (
    "/grpc.health.v1.Health/Check",
    "/grpc.reflection.",
    "/inference.GRPCInferenceService/ServerLive",
    "/inference.GRPCInferenceService/ServerReady",
)


@dataclass(frozen=True)
class Undecodable:
    """What a request (or a ``@sized_stream`` item) that is not a valid protobuf message parses to, instead of the
    exception grpcio would answer UNKNOWN to (or, in a stream, drop the rest of the stream on silently)."""

    message: str


@dataclass(frozen=True, slots=True)
class SizedRequest:
    """A parsed request (a unary call's, or a sized stream's item) and the size of the bytes it was parsed from
    (decompressed, if the client compressed), which the byte budgets count. ``ByteSize()`` encodes the whole
    message again: it was 1.4 ms of a lone 1.8 MB detector tensor's request (docs/benchmarks.md, serving core)."""

    message: Any
    size: int


SIZED_STREAM = "_optic_sized_stream"
F = TypeVar("F", bound=Callable[..., Any])


def sized_stream(method: F) -> F:
    """Marks a request-streaming servicer method that reads its requests through ``streams.in_order``: admission
    then hands it each item as a :class:`SizedRequest`, so no item is encoded again to be counted. Unmarked streams
    (reflection's) get plain messages."""
    setattr(method, SIZED_STREAM, True)
    return method


def _tolerant(deserializer: Callable[[bytes], Any] | None, sized: bool = False) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None
    owner = getattr(deserializer, "__self__", None)
    kind = getattr(getattr(owner, "DESCRIPTOR", None), "full_name", "request")

    def parse(data: bytes) -> Any:
        try:
            message = deserializer(data)
        except Exception as exc:  # protobuf's DecodeError, or anything a corrupt message provokes
            return Undecodable(f"the request is not a valid {kind} message ({type(exc).__name__})")
        return SizedRequest(message, len(data)) if sized else message

    return parse


class Admission(grpc.aio.ServerInterceptor):
    def __init__(self, max_inflight: int, max_streams: int, max_inflight_bytes: int = 1 << 62) -> None:
        self.max_inflight, self.max_streams, self.max_bytes = max_inflight, max_streams, max_inflight_bytes
        self.inflight = 0  # unary calls + stream items
        self.streams = 0
        self.bytes = 0  # request bytes of the unary calls and stream items in flight
        ADMISSION_LIMIT.labels("inflight").set(max_inflight)
        ADMISSION_LIMIT.labels("streams").set(max_streams)
        ADMISSION_LIMIT.labels("bytes").set(max_inflight_bytes)
        self._gauges = {k: ADMISSION_INFLIGHT.labels(k) for k in ("inflight", "streams", "bytes")}
        self._publish()

    def _publish(self) -> None:
        self._gauges["inflight"].set(self.inflight)
        self._gauges["streams"].set(self.streams)
        self._gauges["bytes"].set(self.bytes)

    # ------------------------------------------------------------------ slots (also used by stream items)

    def enter(self, size: int = 0) -> str | None:
        """Take a slot for a call (or stream item) whose request is ``size`` bytes; None, or why not."""
        if self.inflight and self.bytes + size > self.max_bytes:  # a lone call always fits (<= the message cap)
            return f"server holds its limit of {self.max_bytes / 2**20:g} MB of requests in flight (--max-inflight-mb)"
        if self.inflight >= self.max_inflight:
            return f"server is at its limit of {self.max_inflight} calls in flight (--max-inflight)"
        self.inflight += 1
        self.bytes += size
        self._publish()
        return None

    def leave(self, size: int = 0) -> None:
        self.inflight -= 1
        self.release(size)

    def hold(self, size: int) -> str | None:
        """Count ``size`` more bytes for a call already admitted (tensors it reads from shared memory); None, or why
        not. A call alone still fits: the caller bounds ``size`` by the message cap."""
        if self.inflight > 1 and self.bytes + size > self.max_bytes:
            return f"server holds its limit of {self.max_bytes / 2**20:g} MB of requests in flight (--max-inflight-mb)"
        self.bytes += size
        self._publish()
        return None

    def release(self, size: int) -> None:
        self.bytes -= size
        self._publish()

    # ------------------------------------------------------------------ the interceptor

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None:
            return handler
        streaming = handler.request_streaming or handler.response_streaming
        if method.startswith(EXEMPT) and not streaming:
            return handler
        behaviour = behaviour_of(handler)
        deserializer = handler.request_deserializer
        if not handler.request_streaming:
            deserializer = _tolerant(deserializer, sized=not streaming)
        elif getattr(behaviour, SIZED_STREAM, False):
            deserializer = _tolerant(deserializer, sized=True)  # an undecodable item ends its stream, named
        if streaming:
            return rebuild(handler, self._stream(method, behaviour), deserializer)

        async def admitted(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if self._undecodable(method, request, context):
                return None
            if isinstance(request, SizedRequest):
                request, size = request.message, request.size
            else:  # no deserializer: the handler takes the bytes themselves
                size = len(request) if isinstance(request, bytes) else 0
            refused = self.enter(size)
            if refused is not None:
                count_refusal(method, "RESOURCE_EXHAUSTED")
                fail(context, grpc.StatusCode.RESOURCE_EXHAUSTED, refused + "; retry with backoff")
                return None
            try:
                return await behaviour(request, context)
            finally:
                self.leave(size)

        return rebuild(handler, admitted, deserializer)

    def _stream(self, method: str, behaviour: Callable[..., Any]) -> Callable[..., Any]:
        """A streaming call holds a stream slot for its life (its items take call slots in the servicer)."""

        def opened(request: Any, context: grpc.aio.ServicerContext) -> bool:
            if self._undecodable(method, request, context):
                return False
            if self.streams >= self.max_streams:
                count_refusal(method, "RESOURCE_EXHAUSTED")
                message = f"server is at its limit of {self.max_streams} open streams (--max-streams); retry"
                fail(context, grpc.StatusCode.RESOURCE_EXHAUSTED, message + " with backoff")
                return False
            self.streams += 1
            self._publish()
            return True

        def closed() -> None:
            self.streams -= 1
            self._publish()

        if inspect.isasyncgenfunction(behaviour):

            async def admitted_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
                if not opened(request, context):
                    return
                try:
                    async for item in behaviour(request, context):
                        yield item
                finally:
                    closed()

            return admitted_stream

        async def admitted_unary_response(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if not opened(request, context):
                return None
            try:
                return await behaviour(request, context)
            finally:
                closed()

        return admitted_unary_response

    @staticmethod
    def _undecodable(method: str, request: Any, context: grpc.aio.ServicerContext) -> bool:
        if isinstance(request, Undecodable):
            count_refusal(method, "INVALID_ARGUMENT")
            fail(context, grpc.StatusCode.INVALID_ARGUMENT, request.message)
            return True
        return False
