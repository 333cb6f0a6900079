"""``/metrics`` over HTTP on the server's own event loop, with a connection cap and timeouts.

prometheus-client's own server gives every connection a thread and waits
forever for a request that is never finished: enough half-open connections
exhaust the process's file descriptors, and then the gRPC port cannot accept
either. Here a connection gets ``timeout`` seconds to send an 8 KiB request
head and to take the answer, at most ``max_connections`` are open at once
(more are closed on arrival), and a bearer token can be required.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

log = logging.getLogger(__name__)
_HEAD_LIMIT = 8192


class MetricsServer:
    def __init__(
        self,
        host: str,
        port: int,
        max_connections: int = 16,
        timeout: float = 5.0,
        tokens: tuple[bytes, ...] = (),
        registry: CollectorRegistry = REGISTRY,
    ) -> None:
        self.host, self.port, self.registry = host, port, registry
        self.max_connections, self.timeout, self.tokens = max_connections, timeout, tokens
        # One address may hold a quarter of the connections: a client that opens sockets and never finishes its
        # request cannot lock the scraper (another address) out.
        self.per_address = max(1, max_connections // 4)
        self.active = 0
        self._by_address: dict[str, int] = {}
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        """Bind (OSError when the port is taken) and serve in the background."""
        self._server = await asyncio.start_server(self._handle, self.host, self.port, limit=_HEAD_LIMIT)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), self.timeout)

    def _authorised(self, head: bytes) -> bool:
        if not self.tokens:
            return True
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"authorization":
                scheme, _, token = value.strip().partition(b" ")
                matched = False
                for known in self.tokens:  # every token, no early exit: timing says nothing
                    matched |= hmac.compare_digest(known, token.strip())
                return scheme.lower() == b"bearer" and matched
        return False

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        address = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        if self.active >= self.max_connections or self._by_address.get(address, 0) >= self.per_address:
            writer.close()  # over a cap: closed at once, costs nothing more
            return
        self.active += 1
        self._by_address[address] = self._by_address.get(address, 0) + 1
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.timeout)
            method, path, *_ = [*head.split(b"\r\n", 1)[0].split(b" "), b"", b""]
            if method not in (b"GET", b"HEAD"):
                status, body, kind = b"405 Method Not Allowed", b"only GET\n", b"text/plain"
            elif path.split(b"?", 1)[0] not in (b"/metrics", b"/"):
                status, body, kind = b"404 Not Found", b"see /metrics\n", b"text/plain"
            elif not self._authorised(head):
                status, body, kind = b"401 Unauthorized", b"send 'Authorization: Bearer <token>'\n", b"text/plain"
            else:
                status, body, kind = b"200 OK", generate_latest(self.registry), CONTENT_TYPE_LATEST.encode()
            writer.write(
                b"HTTP/1.1 " + status + b"\r\nContent-Type: " + kind + b"\r\nContent-Length: "
                + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + (body if method != b"HEAD" else b"")
            )  # fmt: skip
            await asyncio.wait_for(writer.drain(), self.timeout)
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ValueError):
            pass  # slow, oversized or broken requests are dropped without a word
        finally:
            self.active -= 1
            self._by_address[address] -= 1
            if not self._by_address[address]:
                del self._by_address[address]
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)
