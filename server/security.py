"""Transport security, bearer-token auth and admission control for the gRPC port.

Both checks run as ``grpc.aio`` server interceptors, before a request reaches
a servicer: a refused call costs no decoding, no queue slot and no inference.
Health checking stays open by default (kubelet's gRPC probes can send neither
a token nor a client certificate), reflection is closed unless opened.
"""

from __future__ import annotations

import hmac
import inspect
import logging
import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from server.metrics import REQUESTS

log = logging.getLogger(__name__)

# Groups of services that --auth-open can exempt from the token check, by service-name prefix.
OPEN_GROUPS: dict[str, tuple[str, ...]] = {
    "health": ("grpc.health.v1.Health",),
    "reflection": ("grpc.reflection.",),
}
# Never counted against --max-inflight: probes and tooling must get through an overloaded server.
_ADMISSION_EXEMPT = OPEN_GROUPS["health"] + OPEN_GROUPS["reflection"]
MIN_TOKEN_LENGTH = 16


class SecurityError(ValueError):
    """A TLS or token file that cannot be used: the server refuses to start."""


@dataclass(frozen=True)
class SecurityConfig:
    tls_cert: Path | None = None  # PEM certificate chain of the server
    tls_key: Path | None = None  # PEM private key of the server
    tls_client_ca: Path | None = None  # PEM CA bundle: clients must present a certificate it signed (mTLS)
    token_file: Path | None = None  # bearer tokens, one per line (several: rotation without downtime)
    open_services: tuple[str, ...] = ("health",)  # groups of OPEN_GROUPS reachable without a token

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None


def _read(path: Path, what: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SecurityError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if not data.strip():
        raise SecurityError(f"{what} {path} is empty")
    return data


def server_credentials(config: SecurityConfig) -> grpc.ServerCredentials | None:
    """TLS (and client-certificate) credentials from PEM files, or None for plaintext."""
    if config.tls_cert is None and config.tls_key is None:
        if config.tls_client_ca is not None:
            raise SecurityError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if config.tls_cert is None or config.tls_key is None:
        raise SecurityError("TLS needs both --tls-cert and --tls-key")
    cert, key = _read(config.tls_cert, "TLS certificate"), _read(config.tls_key, "TLS key")
    if b"-----BEGIN" not in cert or b"-----BEGIN" not in key:
        raise SecurityError("--tls-cert and --tls-key must be PEM files")
    client_ca = _read(config.tls_client_ca, "client CA") if config.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def load_tokens(path: Path) -> tuple[bytes, ...]:
    """Non-empty lines of the token file that are not ``#`` comments."""
    lines = _read(path, "token file").decode("utf-8", errors="strict").splitlines()
    tokens = tuple(t.strip().encode() for t in lines if t.strip() and not t.strip().startswith("#"))
    if not tokens:
        raise SecurityError(f"token file {path} holds no token")
    short = [i for i, t in enumerate(tokens) if len(t) < MIN_TOKEN_LENGTH]
    if short:
        raise SecurityError(f"token file {path}: token {short[0] + 1} is shorter than {MIN_TOKEN_LENGTH} characters")
    return tokens


def _service(method: str) -> str:
    return method.split("/")[1] if method.count("/") >= 2 else ""


def _count(method: str, code: str) -> None:
    REQUESTS.labels("", method.rsplit("/", 1)[-1], code).inc()


def _kind(handler: grpc.RpcMethodHandler) -> str:
    streaming = (handler.request_streaming, handler.response_streaming)
    return {
        (False, False): "unary_unary",
        (False, True): "unary_stream",
        (True, False): "stream_unary",
        (True, True): "stream_stream",
    }[streaming]


def _refuse(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    async def refuse(_: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    return handler._replace(**{_kind(handler): refuse})  # type: ignore[attr-defined]


Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]]


class TokenAuth(grpc.aio.ServerInterceptor):
    """``authorization: Bearer <token>`` on every call outside the open services, compared in constant time."""

    def __init__(self, tokens: Iterable[bytes], open_services: Iterable[str]) -> None:
        self._tokens = tuple(tokens)
        self._open = tuple(prefix for group in open_services for prefix in OPEN_GROUPS[group])

    def _valid(self, header: str | bytes | None) -> bool:
        if header is None:
            return False
        value = header.encode() if isinstance(header, str) else header
        scheme, _, token = value.partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        token = token.strip()
        # Compare against every token, without stopping early: timing says nothing about which matched.
        matched = False
        for known in self._tokens:
            matched |= hmac.compare_digest(known, token)
        return matched

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or _service(method).startswith(self._open):
            return handler
        metadata = handler_call_details.invocation_metadata or ()
        header = next((value for key, value in metadata if key == "authorization"), None)
        if self._valid(header):
            return handler
        _count(method, "UNAUTHENTICATED")
        reason = "missing" if header is None else "invalid"
        return _refuse(
            handler,
            grpc.StatusCode.UNAUTHENTICATED,
            f"{reason} bearer token: send metadata 'authorization: Bearer <token>'",
        )


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
        if handler is None or _service(method).startswith(_ADMISSION_EXEMPT):
            return handler
        kind = _kind(handler)
        behaviour = getattr(handler, kind)
        if not handler.request_streaming:
            handler = handler._replace(request_deserializer=_tolerant(handler.request_deserializer))  # type: ignore[attr-defined]

        if inspect.isasyncgenfunction(behaviour):

            async def admitted_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
                await self._admit(method, request, context)
                try:
                    async for item in behaviour(request, context):
                        yield item
                finally:
                    self.inflight -= 1

            return handler._replace(**{kind: admitted_stream})  # type: ignore[attr-defined]

        async def admitted(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await self._admit(method, request, context)
            try:
                return await behaviour(request, context)
            finally:
                self.inflight -= 1

        return handler._replace(**{kind: admitted})  # type: ignore[attr-defined]

    async def _admit(self, method: str, request: Any, context: grpc.aio.ServicerContext) -> None:
        """Take an in-flight slot (released by the caller) or abort the call."""
        if isinstance(request, _Undecodable):
            _count(method, "INVALID_ARGUMENT")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        if not self._enter():
            _count(method, "RESOURCE_EXHAUSTED")
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"server is at its limit of {self.limit} calls in flight (--max-inflight); retry with backoff",
            )

    def _enter(self) -> bool:
        if self.inflight >= self.limit:
            return False
        self.inflight += 1
        return True


# C0/C1 controls except tab and newline, DEL, and the Unicode line/paragraph separators.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


class EscapingFormatter(logging.Formatter):
    """Log records that no request can forge or garble: control characters (ANSI escapes, carriage
    returns) are written as ``\\xNN``, and every continuation line (tracebacks) is indented, so only a
    real record starts a line with its timestamp."""

    def format(self, record: logging.LogRecord) -> str:
        text = _CONTROL.sub(_escape, super().format(record))
        return text.replace("\n", "\n    ")
