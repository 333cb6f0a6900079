"""Admission control for the gRPC port: a bounded number of calls in flight, and undecodable requests refused.

Runs as a ``grpc.aio`` server interceptor, before a request reaches a servicer.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from optic.server.handlers import Continuation, behaviour_of, count_refusal, rebuild, service_of
from optic.server.security import OPEN_GROUPS

# Never counted against --max-inflight: probes and tooling must get through an overloaded server.
EXEMPT = OPEN_GROUPS["health"] + OPEN_GROUPS["reflection"]


@dataclass(frozen=True)
class _Undecodable:
    """What a request that is not a valid protobuf message parses to (grpcio would answer UNKNOWN)."""

    message: str


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None
    owner = getattr(deserializer, "__self__", None)
    kind = getattr(getattr(owner, "DESCRIPTOR", None), "full_name", "request")

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # protobuf's DecodeError, or anything a corrupt message provokes
            return _Undecodable(f"the request is not a valid {kind} message ({type(exc).__name__})")

    return parse


class Admission(grpc.aio.ServerInterceptor):
    """At most ``limit`` calls in flight; more get RESOURCE_EXHAUSTED at once instead of queueing unseen.

    The per-model queues bound what waits for a model; this bounds everything
    before them (requests decoding images, waiting for a worker thread), so
    memory under overload is bounded by ``limit`` times the message limit.
    Unary requests that are not valid protobuf get INVALID_ARGUMENT here.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.inflight = 0

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or service_of(method).startswith(EXEMPT):
            return handler
        behaviour = behaviour_of(handler)
        deserializer = handler.request_deserializer
        if not handler.request_streaming:
            deserializer = _tolerant(deserializer)

        if inspect.isasyncgenfunction(behaviour):

            async def admitted_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
                await self._admit(method, request, context)
                try:
                    async for item in behaviour(request, context):
                        yield item
                finally:
                    self.inflight -= 1

            return rebuild(handler, admitted_stream, deserializer)

        async def admitted(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await self._admit(method, request, context)
            try:
                return await behaviour(request, context)
            finally:
                self.inflight -= 1

        return rebuild(handler, admitted, deserializer)

    async def _admit(self, method: str, request: Any, context: grpc.aio.ServicerContext) -> None:
        """Take an in-flight slot (released by the caller) or abort the call."""
        if isinstance(request, _Undecodable):
            count_refusal(method, "INVALID_ARGUMENT")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        if not self._enter():
            count_refusal(method, "RESOURCE_EXHAUSTED")
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"server is at its limit of {self.limit} calls in flight (--max-inflight); retry with backoff",
            )

    def _enter(self) -> bool:
        if self.inflight >= self.limit:
            return False
        self.inflight += 1
        return True
