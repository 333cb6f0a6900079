"""Ray Serve peer: one deployment behind Serve's HTTP proxy, with ``@serve.batch`` dynamic batching.

Request: ``POST /predict`` with the JPEG itself as the body (``Content-Type: image/jpeg``), read with
``await request.body()`` as Ray's HTTP guides do. Response: JSON ``{"model": ..., "result": [...]}``.

The batched method gets the bodies of up to 32 requests waiting at most 2 ms, decodes each with Optic's
decoder, runs one ``session.run`` and post-processes each. ``max_ongoing_requests`` is raised from Serve's
default of 5 to 64, as Ray's batching guide asks (it must exceed ``max_batch_size``, or batches never fill).

This script is the driver: it starts a local single-node Ray (dashboard, usage stats and metrics export
off; everything on 127.0.0.1), deploys, and stays until SIGTERM/SIGINT, then shuts Serve and Ray down.
Run: ``PEER_MODEL=classifier python ray_server.py --port 8103``.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DISABLE_DOCKER_CPU_WARNING", "1")

import ray
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import BATCH_WAIT_S, MAX_BATCH_SIZE, Pipeline, model_from_env  # noqa: E402

from optic.server.errors import InvalidArgument  # noqa: E402


@serve.deployment(num_replicas=1, max_ongoing_requests=64, ray_actor_options={"num_cpus": 1})
class Vision:
    """One model, one onnxruntime session in the deployment's one replica."""

    def __init__(self, model: str) -> None:
        self.pipeline = Pipeline(model)
        self.pipeline.warmup()

    @serve.batch(max_batch_size=MAX_BATCH_SIZE, batch_wait_timeout_s=BATCH_WAIT_S)
    async def predict(self, images: list[bytes]) -> list[Any]:
        try:
            return self.pipeline.run_batch(images)
        except InvalidArgument:  # one bad image: answer each request on its own
            return [self._one(b) for b in images]

    def _one(self, data: bytes) -> Any:
        try:
            return self.pipeline.run_batch([data])[0]
        except InvalidArgument as exc:
            return exc

    async def __call__(self, request: Request) -> JSONResponse:
        result = await self.predict(await request.body())
        if isinstance(result, Exception):
            return JSONResponse({"error": str(result)}, status_code=400)
        return JSONResponse({"model": self.pipeline.model, "result": result})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args()
    model = model_from_env()
    # Replicas run in Ray's worker processes, which inherit this environment: they import `common` from here.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, (str(HERE), os.environ.get("PYTHONPATH"))))
    ray.init(
        num_cpus=1,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
    )
    serve.start(
        http_options={"host": "127.0.0.1", "port": args.port},
        logging_config={"log_level": "WARNING", "enable_access_log": False},
    )
    serve.run(Vision.bind(model), name="vision", route_prefix="/predict")
    print(f"ray serve: {model} on http://127.0.0.1:{args.port}/predict", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
