"""What every RPC shares: status mapping, metrics, deadlines."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from server.errors import OpticError
from server.metrics import INFLIGHT, REQUEST_LATENCY, REQUESTS
from server.repository import ModelRepository

log = logging.getLogger(__name__)

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Handler = Callable[[Any, Req, grpc.aio.ServicerContext], Awaitable[Resp]]


def rpc(method: str, model_of: Callable[[Any], str] | None = None) -> Callable[[Handler], Handler]:
    """Wrap a servicer method: engine errors become their gRPC status, every outcome is counted.

    Unexpected exceptions become INTERNAL with the exception type in the
    message (details go to the log), so the process never dies of a request.
    """

    def decorate(fn: Handler) -> Handler:
        @functools.wraps(fn)
        async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
            repo: ModelRepository = self.repo
            model = repo.metric_label(model_of(request)) if model_of else ""
            code = "OK"
            started = time.perf_counter()
            inflight = INFLIGHT.labels(model)
            inflight.inc()
            try:
                return await fn(self, request, context)
            except OpticError as exc:
                code = exc.code
                await context.abort(getattr(grpc.StatusCode, exc.code), exc.message)
            except asyncio.CancelledError:
                code = "CANCELLED"
                raise
            except Exception as exc:
                if isinstance(exc, grpc.aio.AbortError):
                    raise
                code = "INTERNAL"
                log.exception("%s failed", method)
                await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}: {type(exc).__name__}")
            finally:
                inflight.dec()
                REQUESTS.labels(model, method, code).inc()
                REQUEST_LATENCY.labels(model, method).observe(time.perf_counter() - started)

        return wrapper

    return decorate


def time_left(context: grpc.aio.ServicerContext) -> float | None:
    """Seconds until the client's deadline, or None when it set none."""
    return context.time_remaining()
