"""What every RPC shares: status mapping, metrics, deadlines."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from optic.server.errors import Internal, OpticError
from optic.server.handlers import fail, forget
from optic.server.metrics import INFLIGHT, REQUEST_LATENCY, REQUESTS
from optic.server.repository import ModelRepository

log = logging.getLogger(__name__)

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Handler = Callable[[Any, Req, grpc.aio.ServicerContext], Awaitable[Resp]]


def parameter_value(p: Any) -> int | str | bool | float | None:
    """The value of a KServe ``InferParameter`` (a oneof), or None when none is set."""
    choice = p.WhichOneof("parameter_choice")
    return getattr(p, choice) if choice else None


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
            message = ""
            try:
                return await fn(self, request, context)
            except OpticError as exc:
                code, message = exc.code, exc.message
                forget(exc)
            except asyncio.CancelledError:
                code = "CANCELLED"
                raise
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                code, message = "INTERNAL", f"internal error in {method}: {type(exc).__name__}"
                log.exception("%s failed", method)
                forget(exc)
            finally:
                inflight.dec()
                REQUESTS.labels(model, method, code).inc()
                REQUEST_LATENCY.labels(model, method).observe(time.perf_counter() - started)
            return fail(context, getattr(grpc.StatusCode, code), message)

        return wrapper

    return decorate


def time_left(context: grpc.aio.ServicerContext) -> float | None:
    """Seconds until the client's deadline, or None when it set none (a live call's context only)."""
    return context.time_remaining()


@dataclass(frozen=True)
class CallInfo:
    """What a call's context says about its client, read once while the call is live.

    A stream's items are handled after their stream may have ended (the client cancelled): its context must not
    be touched then. grpcio's ``context.peer()`` on a finished call crashes the process (SIGSEGV, found by a test
    that cancels streams mid-window).
    """

    peer: str
    deadline: float | None  # time.monotonic() at the client's deadline

    @classmethod
    def of(cls, context: grpc.aio.ServicerContext) -> CallInfo:
        remaining = context.time_remaining()
        return cls(context.peer(), None if remaining is None else time.monotonic() + remaining)

    def time_left(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())


async def counted(model: str, method: str, call: Awaitable[Resp]) -> Resp:
    """One request of a stream, counted as a unary call is; an unexpected error becomes INTERNAL, not its end."""
    started, code = time.perf_counter(), "OK"
    try:
        return await call
    except OpticError as exc:
        code = exc.code
        raise
    except Exception as exc:
        code = "INTERNAL"
        raise Internal(f"internal error in {method}: {type(exc).__name__}") from exc
    finally:
        REQUESTS.labels(model, method, code).inc()
        REQUEST_LATENCY.labels(model, method).observe(time.perf_counter() - started)
