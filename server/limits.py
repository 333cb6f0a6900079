"""Connection-level bounds on the gRPC port, as gRPC channel options.

Every HTTP/2 connection may carry at most ``max_streams_per_connection``
concurrent calls (further ones wait in the client); idle connections are
pinged and closed when the peer is gone; every connection is closed after
``max_age_seconds`` (with a grace period for its calls) so long-lived streams
such as health Watch are recycled and load spreads again. Envoy and Triton
set the same knobs (``max_concurrent_streams``, ``idle_timeout``,
``max_connection_duration``); see docs/operations.md.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ConnectionLimits:
    # Above any honest client's concurrency on one connection: gRPC counts a finished stream until its call object
    # is released, so a client that keeps exactly this many calls busy sees some refused (REFUSED_STREAM ->
    # UNAVAILABLE) as calls finish: measured 200 of 3,596 calls at 64 with a limit of 64.
    max_streams_per_connection: int = 256
    keepalive_seconds: float = 60.0  # ping a connection that carried nothing for this long
    keepalive_timeout_seconds: float = 20.0  # and close it when the ping is not answered within this
    max_idle_seconds: float = 300.0  # close a connection with no call for this long
    max_age_seconds: float = 3600.0  # close every connection after this long (GOAWAY; clients reconnect)
    age_grace_seconds: float = 30.0  # calls on an aged connection get this long to finish

    def grpc_options(self) -> list[tuple[str, int]]:
        ms = lambda seconds: int(seconds * 1000)  # noqa: E731
        return [
            ("grpc.max_concurrent_streams", self.max_streams_per_connection),
            ("grpc.keepalive_time_ms", ms(self.keepalive_seconds)),
            ("grpc.keepalive_timeout_ms", ms(self.keepalive_timeout_seconds)),
            ("grpc.max_connection_idle_ms", ms(self.max_idle_seconds)),
            ("grpc.max_connection_age_ms", ms(self.max_age_seconds)),
            ("grpc.max_connection_age_grace_ms", ms(self.age_grace_seconds)),
            # Clients may keep their connections alive with pings, but not flood the server with them.
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.http2.max_ping_strikes", 2),
        ]


# Calls (probes included) gRPC may have open beyond --max-inflight + --max-streams: room for health probes and
# for calls that admission is about to refuse. Past the sum gRPC answers RESOURCE_EXHAUSTED before reading the
# request, so the calls being received are bounded too.
PROBE_HEADROOM = 16

# Bytes per pixel an image in a worker may take at its original size: decoded RGB (3), the decoder's and
# resizer's conversions (up to 6 more), and for masks the class map, its per-class booleans and the PNG encoder.
IMAGE_BYTES_PER_PIXEL = 16
RLE_BYTES_PER_RUN = 40  # a run count as a Python int in a list, before it is sent
MESSAGE_COPIES = 3  # a request as gRPC's slices, as Python bytes and parsed (or copied into a batch)


def max_concurrent_rpcs(max_inflight: int, max_streams: int) -> int:
    """gRPC's own cap on open calls: what admission allows, plus :data:`PROBE_HEADROOM`."""
    return max_inflight + max_streams + PROBE_HEADROOM


def worst_case_memory(
    *,
    max_inflight: int,
    max_inflight_bytes: int,
    max_message_bytes: int,
    max_streams: int,
    stream_window_bytes: int,
    workers: int,
    max_image_pixels: int,
    max_rle_runs: int,
    receiving: int | None = None,
    shm_bytes: int = 0,
) -> dict[str, int]:
    """The most memory (bytes, above the idle process) the flags let clients make the server hold at once.

    - calls: the requests admitted (unary calls and stream items, at most ``--max-inflight-mb`` together, or one
      message), each held as received, parsed and batched: 3x;
    - receiving: calls still being received and parsed, before admission counts them (those it refuses
      included), 3x a message each. gRPC reads at most :func:`max_concurrent_rpcs` calls at once; ``receiving``
      overrides that count with the number of calls clients actually send at once (the usual case is far
      below the cap);
    - streams: per open stream, its window of answers written to a client that does not read them, and one
      more answer in gRPC's send buffer;
    - images: each worker holds one image (decoding, or post-processing a mask) at its original size;
    - rle: each worker may build one answer's run-length counts;
    - shm: with ``--allow-client-shm``, ``--max-shm-mb``: outputs written into sparse shared-memory objects allocate
      their pages, charged to the server; plus the read buffers kept for reuse (inputs being read are in ``calls``).
    """
    in_receipt = max_concurrent_rpcs(max_inflight, max_streams) if receiving is None else receiving
    terms = {
        "calls": MESSAGE_COPIES * max(max_inflight_bytes, max_message_bytes),
        "receiving": MESSAGE_COPIES * in_receipt * max_message_bytes,
        "streams": max_streams * (stream_window_bytes + max_message_bytes),
        "images": workers * max_image_pixels * IMAGE_BYTES_PER_PIXEL,
        "rle": workers * max_rle_runs * RLE_BYTES_PER_RUN,
        "shm": shm_bytes,
    }
    return terms | {"total": sum(terms.values())}
