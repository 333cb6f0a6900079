"""Rebuilding gRPC method handlers in interceptors, through grpc's public constructors only.

An interceptor that wraps or refuses a call returns a new handler of the same
kind (unary/stream in, unary/stream out) built with
``grpc.*_rpc_method_handler``, so it never touches grpc's private fields.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from optic.server.metrics import REQUESTS

Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]]
_CONSTRUCTORS = {
    (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
    (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
    (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
    (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler),
}


def behaviour_of(handler: grpc.RpcMethodHandler) -> Callable[..., Any]:
    """The servicer function of whichever kind the handler is."""
    return getattr(handler, _CONSTRUCTORS[handler.request_streaming, handler.response_streaming][0])


def rebuild(
    handler: grpc.RpcMethodHandler,
    behaviour: Callable[..., Any],
    request_deserializer: Callable[[bytes], Any] | None = None,
) -> grpc.RpcMethodHandler:
    """A handler of the same kind and serializers, with ``behaviour`` (and optionally another deserializer)."""
    constructor = _CONSTRUCTORS[handler.request_streaming, handler.response_streaming][1]
    return constructor(
        behaviour,
        request_deserializer=request_deserializer or handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _ignore(_: bytes) -> None:
    """A refused call's body is never parsed: what it holds costs the server nothing but its bytes."""


def refusal(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler that answers ``code`` at once, without parsing the request."""
    if handler.response_streaming:

        async def refuse_stream(_: Any, context: grpc.aio.ServicerContext) -> Any:
            await context.abort(code, message)
            yield  # pragma: no cover - an async generator for grpc, never reached

        return rebuild(handler, refuse_stream, _ignore)

    async def refuse(_: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    return rebuild(handler, refuse, _ignore)


def service_of(method: str) -> str:
    """``/pkg.Service/Method`` -> ``pkg.Service``."""
    return method.split("/")[1] if method.count("/") >= 2 else ""


def count_refusal(method: str, code: str) -> None:
    """Refusals before any servicer runs are counted like answered calls (model label "")."""
    REQUESTS.labels("", method.rsplit("/", 1)[-1], code).inc()
