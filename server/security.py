"""Transport security and bearer-token auth for the gRPC port.

The token check runs as a ``grpc.aio`` server interceptor, before a request
reaches a servicer and before its body is parsed: a refused call costs no
decoding, no queue slot and no inference. Health checking stays open by
default (kubelet's gRPC probes can send neither a token nor a client
certificate), reflection is closed unless opened.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc

from optic.server.handlers import Continuation, count_refusal, refusal

log = logging.getLogger(__name__)

# Groups of methods that --auth-open can exempt from the token check, by method-name prefix. Health means
# Check (what kubelet's gRPC probe sends); Watch is a stream that holds server resources, so it needs a token.
OPEN_GROUPS: dict[str, tuple[str, ...]] = {
    "health": ("/grpc.health.v1.Health/Check",),
    "reflection": ("/grpc.reflection.",),
}
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
        if handler is None or method.startswith(self._open):
            return handler
        metadata = handler_call_details.invocation_metadata or ()
        header = next((value for key, value in metadata if key == "authorization"), None)
        if self._valid(header):
            return handler
        count_refusal(method, "UNAUTHENTICATED")
        reason = "missing" if header is None else "invalid"
        return refusal(
            handler,
            grpc.StatusCode.UNAUTHENTICATED,
            f"{reason} bearer token: send metadata 'authorization: Bearer <token>'",
        )
