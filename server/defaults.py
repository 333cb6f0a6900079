"""Defaults that other tools rely on (ports) or that several modules share, defined once."""

GRPC_PORT = 8001
METRICS_PORT = 8002
MAX_INFLIGHT = 1024  # calls in flight before new ones get RESOURCE_EXHAUSTED
