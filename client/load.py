"""The load ``optic bench`` sends: request payloads, the worker processes that send them, and the
server's own statistics (KServe ModelStatistics) read before and after a run.

Requests are serialised once, up front, and sent as raw bytes, so a worker
spends its CPU on gRPC, not on protobuf.
"""

from __future__ import annotations

import asyncio
import io
import math
import time
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np

from optic.client.vision import Credentials, open_channel
from optic.proto.inference import grpc_service_pb2 as kpb
from optic.proto.optic.v1 import vision_pb2 as vpb
from optic.server.tasks import TASKS, task_named
from optic.server.tasks.base import Task
from optic.server.tensors import DATATYPES

if TYPE_CHECKING:
    from optic.client.bench import BenchConfig

KSERVE = "/inference.GRPCInferenceService/"
SETUP_TIMEOUT = 30.0  # seconds for the calls that prepare a run (metadata), whatever --timeout says


# ---------------------------------------------------------------- payloads


def _jpeg(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def synthetic_images(count: int, size: tuple[int, int], seed: int = 31) -> list[bytes]:
    """JPEGs of coloured shapes on textured backgrounds, ``size`` (h, w), as a camera would send them."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    h, w = size
    out = []
    for _ in range(count):
        low = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        img = Image.fromarray(low).resize((w, h), Image.Resampling.BICUBIC)
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(1, 5))):
            r = float(rng.uniform(0.08, 0.3)) * min(h, w)
            cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
            box = (cx - r, cy - r, cx + r, cy + r)
            fill = tuple(int(v) for v in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
        out.append(_jpeg(np.asarray(img)))
    return out


def payloads(config: BenchConfig) -> tuple[str, list[bytes]]:
    """The method and the serialised requests a run sends, for its API."""
    return vision_payloads(config) if config.api == "vision" else kserve_payloads(config)


def vision_payloads(config: BenchConfig, count: int = 32) -> tuple[str, list[bytes]]:
    """One request per synthetic image, built by the task's own module (the model's task unless --task)."""
    task = task_named(config.task) if config.task else task_of_model(config)
    return f"/optic.v1.Vision/{task.rpc}", [
        task.request(config.model, [vpb.Image(data=d)]).SerializeToString()
        for d in synthetic_images(count, config.image_size)
    ]


def task_of_model(config: BenchConfig) -> Task:
    """The model's task, from the server's Vision ModelMetadata."""
    with open_channel(config.url, config.credentials) as channel:
        call = channel.unary_unary(
            "/optic.v1.Vision/ModelMetadata",
            request_serializer=vpb.ModelMetadataRequest.SerializeToString,
            response_deserializer=vpb.ModelMetadataResponse.FromString,
        )
        info = call(vpb.ModelMetadataRequest(model=config.model), timeout=SETUP_TIMEOUT)
    if info.task not in TASKS:
        raise ValueError(f"model {config.model!r} has no vision task; use --api kserve")
    return TASKS[info.task]


def kserve_payloads(config: BenchConfig, count: int = 16) -> tuple[str, list[bytes]]:
    """Random tensors shaped from the model's own metadata (open dims: 1; batch axis: --batch)."""
    with open_channel(config.url, config.credentials) as channel:
        call = channel.unary_unary(
            KSERVE + "ModelMetadata",
            request_serializer=kpb.ModelMetadataRequest.SerializeToString,
            response_deserializer=kpb.ModelMetadataResponse.FromString,
        )
        meta = call(kpb.ModelMetadataRequest(name=config.model), timeout=SETUP_TIMEOUT)
    rng = np.random.default_rng(0)
    payloads = []
    for _ in range(count):
        request = kpb.ModelInferRequest(model_name=config.model)
        for tensor in meta.inputs:
            dtype = DATATYPES.get(tensor.datatype)
            if dtype is None or tensor.datatype == "BYTES":
                raise ValueError(f"input {tensor.name!r} is {tensor.datatype}; bench sends numeric tensors only")
            shape = [config.batch if i == 0 and d == -1 else (d if d > 0 else 1) for i, d in enumerate(tensor.shape)]
            value = (rng.random(shape) * 4).astype(dtype)
            request.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=shape)
            request.raw_input_contents.append(value.tobytes())
        payloads.append(request.SerializeToString())
    return KSERVE + "ModelInfer", payloads


# ---------------------------------------------------------------- workers


def worker(
    config: BenchConfig, method: str, payloads: list[bytes], index: int, start_at: float, sent: Any, out: Any
) -> None:
    """One load process: returns (send offsets, latencies, codes) of the requests it measured."""

    async def main() -> tuple[list[float], list[float], list[str]]:
        starts: list[float] = []
        latencies: list[float] = []
        codes: list[str] = []
        options = [("grpc.max_send_message_length", 256 << 20), ("grpc.max_receive_message_length", 256 << 20)]
        creds = config.credentials
        if creds.secure:
            channel_cm = grpc.aio.secure_channel(config.url, creds.channel_credentials(), options=options)
        else:
            channel_cm = grpc.aio.insecure_channel(config.url, options=options)
        metadata = creds.metadata() or None
        async with channel_cm as channel:
            call: Any = channel.unary_unary(method)
            measure_from = start_at + config.warmup
            stop_at = measure_from + (config.duration if not config.requests else 1e9)
            quota = math.ceil(config.requests / config.workers) if config.requests else 0
            outstanding = 0

            def done() -> bool:
                return time.monotonic() >= stop_at or (quota > 0 and len(latencies) >= quota)

            async def one(n: int) -> None:
                nonlocal outstanding
                begun = time.monotonic()
                code = "OK"
                try:
                    await call(payloads[n % len(payloads)], timeout=config.timeout, metadata=metadata)
                except grpc.aio.AioRpcError as exc:
                    code = exc.code().name
                finally:
                    outstanding -= 1
                if begun >= measure_from and not (quota and len(latencies) >= quota):
                    starts.append(begun - measure_from)
                    latencies.append(time.monotonic() - begun)
                    codes.append(code)
                    with sent.get_lock():
                        sent.value += 1

            await asyncio.sleep(max(0.0, start_at - time.monotonic()))
            if config.concurrency:
                callers = max(1, config.concurrency // config.workers + (index < config.concurrency % config.workers))

                async def caller(i: int) -> None:
                    nonlocal outstanding
                    n = i + index * 7919
                    while not done():
                        outstanding += 1
                        await one(n)
                        n += callers

                await asyncio.gather(*(caller(i) for i in range(callers)))
            else:
                rng = np.random.default_rng(index + 1)
                rate = config.rate / config.workers
                tasks: set[asyncio.Task[None]] = set()
                next_at, n = time.monotonic(), index * 7919
                while not done():
                    next_at += rng.exponential(1.0 / rate)
                    await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                    if outstanding >= config.max_outstanding:
                        if next_at >= measure_from:
                            starts.append(next_at - measure_from)
                            latencies.append(0.0)
                            codes.append("CLIENT_OVERLOAD")
                        continue
                    outstanding += 1
                    task = asyncio.ensure_future(one(n))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                    n += 1
                if tasks:
                    await asyncio.wait(tasks, timeout=config.timeout)
        return starts, latencies, codes

    out.put((index, *asyncio.run(main())))


# ---------------------------------------------------------------- server statistics


def server_statistics(
    url: str, model: str, timeout: float = 10.0, credentials: Credentials | None = None
) -> dict[str, dict] | None:
    """Cumulative KServe ModelStatistics per model version, or None when the server has none for ``model``."""
    try:
        with open_channel(url, credentials) as channel:
            call = channel.unary_unary(
                KSERVE + "ModelStatistics",
                request_serializer=kpb.ModelStatisticsRequest.SerializeToString,
                response_deserializer=kpb.ModelStatisticsResponse.FromString,
            )
            stats = call(kpb.ModelStatisticsRequest(name=model), timeout=timeout)
    except grpc.RpcError:
        return None
    out = {}
    for s in stats.model_stats:
        i = s.inference_stats
        out[f"{s.name}:{s.version}"] = {
            "inference_count": s.inference_count,
            "execution_count": s.execution_count,
            "success": (i.success.count, i.success.ns),
            "queue": (i.queue.count, i.queue.ns),
            "compute_infer": (i.compute_infer.count, i.compute_infer.ns),
            "compute_input": (i.compute_input.count, i.compute_input.ns),
            "compute_output": (i.compute_output.count, i.compute_output.ns),
        }
    return out


def stats_delta(before: dict | None, after: dict | None) -> dict:
    if not before or not after:
        return {}
    out = {}
    for key, a in after.items():
        b = before.get(key)
        if b is None:
            continue
        executions = a["execution_count"] - b["execution_count"]
        inferences = a["inference_count"] - b["inference_count"]
        if executions <= 0:
            continue

        def mean_ms(name: str, a: dict = a, b: dict = b) -> float:
            count = a[name][0] - b[name][0]
            return (a[name][1] - b[name][1]) / max(1, count) / 1e6

        out[key] = {
            "inferences": inferences,
            "executions": executions,
            "mean_batch_size": inferences / executions,
            "queue_ms_per_request": mean_ms("queue"),
            "compute_infer_ms_per_batch": mean_ms("compute_infer"),
            "compute_input_ms_per_batch": mean_ms("compute_input"),
            "compute_output_ms_per_batch": mean_ms("compute_output"),
        }
    return out
