"""``optic.v1.Vision``: image in, task answer out.

Small images are decoded on the event loop, larger ones in the worker pool;
each image of a call is queued on the model's batcher on its own, so images of
one call and of concurrent calls share batches. Per-stage durations (decode,
preprocess, inference, postprocess) go to ``optic_stage_duration_seconds``.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Executor
from contextlib import ExitStack
from typing import TypeVar

import grpc
import numpy as np

from server.api.common import counted, in_order, rpc, time_left
from server.errors import InvalidArgument, OpticError
from server.metrics import STAGE_TIME
from server.proto.optic.v1 import vision_pb2 as pb
from server.proto.optic.v1 import vision_pb2_grpc as pb_grpc
from server.repository import ModelRepository, ServedModel
from server.tasks import captioning, classification, detection, segmentation
from server.tasks.image import ImageLimits, ImageSource, Prepared, RawPixels, cheap_to_decode, prepare

MAX_TOP_K = 1000
MAX_IMAGES = 64  # images per call
STREAM_WINDOW = 8  # frames of one DetectStream in flight
T = TypeVar("T")


def _require_task(model: ServedModel, task: str, rpc_name: str) -> None:
    if model.meta.task != task:
        raise InvalidArgument(
            f"model {model.name!r} is a {model.meta.task or 'generic tensor'} model; {rpc_name} needs a {task} model"
        )
    if model.meta.input is None:
        raise InvalidArgument(f"model {model.name!r} has no input metadata (optic.input.*); it cannot take images")


def _sources(image: pb.Image, images: list[pb.Image], has_image: bool) -> list[ImageSource]:
    found = ([image] if has_image else []) + list(images)
    if not found:
        raise InvalidArgument("no image in the request: set `image` (or `images`)")
    if len(found) > MAX_IMAGES:
        raise InvalidArgument(f"{len(found)} images in one request; at most {MAX_IMAGES}")
    out: list[ImageSource] = []
    for i, img in enumerate(found):
        kind = img.WhichOneof("source")
        if kind == "raw":
            out.append(RawPixels(img.raw.height, img.raw.width, img.raw.channels, img.raw.pixels))
        elif kind == "data":
            out.append(img.data)
        else:
            raise InvalidArgument(f"image {i} is empty: set `data` (encoded) or `raw` (pixels)")
    return out


class VisionServicer(pb_grpc.VisionServicer):
    def __init__(self, repo: ModelRepository, executor: Executor, limits: ImageLimits) -> None:
        self.repo = repo
        self._executor = executor
        self._limits = limits

    # ------------------------------------------------------------------ shared steps

    async def _prepare(self, source: ImageSource, model: ServedModel) -> Prepared:
        spec = model.meta.input
        assert spec is not None
        if isinstance(source, bytes) and cheap_to_decode(source, self._limits):
            prepared = prepare(source, spec, self._limits)
        else:
            loop = asyncio.get_running_loop()
            prepared = await loop.run_in_executor(self._executor, prepare, source, spec, self._limits)
        STAGE_TIME.labels(model.name, "decode").observe(prepared.decode_seconds)
        STAGE_TIME.labels(model.name, "preprocess").observe(prepared.preprocess_seconds)
        return prepared

    async def _infer(self, model: ServedModel, tensor: np.ndarray, timeout: float | None) -> dict[str, np.ndarray]:
        started = time.perf_counter()
        outputs = await model.infer({model.inputs[0].name: tensor[None]}, timeout)
        STAGE_TIME.labels(model.name, "inference").observe(time.perf_counter() - started)
        return {k: v[0] for k, v in outputs.items()}

    async def _each(
        self,
        model: ServedModel,
        sources: list[ImageSource],
        context: grpc.aio.ServicerContext,
        finish: Callable[[Prepared, dict[str, np.ndarray]], T],
    ) -> list[T]:
        """Prepare, infer and post-process every image concurrently; results in request order."""
        timeout = time_left(context)

        async def one(source: ImageSource) -> T:
            prepared = await self._prepare(source, model)
            outputs = await self._infer(model, prepared.tensor, timeout)
            started = time.perf_counter()
            if prepared.transform.width * prepared.transform.height > self._limits.inline_pixels:
                # Work at the original size (a mask resampled and PNG-encoded: ~20 ms at 1080p) would stall
                # the event loop, and with it every other call, including the cheap refusals under overload.
                loop = asyncio.get_running_loop()
                result = await loop.run_in_executor(self._executor, finish, prepared, outputs)
            else:
                result = finish(prepared, outputs)
            STAGE_TIME.labels(model.name, "postprocess").observe(time.perf_counter() - started)
            return result

        return list(await asyncio.gather(*(one(s) for s in sources)))

    # ------------------------------------------------------------------ Classify

    @rpc("Classify", lambda r: r.model)
    async def Classify(self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext) -> pb.ClassifyResponse:
        with self.repo.use(request.model, request.model_version) as model:
            _require_task(model, "classification", "Classify")
            if request.top_k > MAX_TOP_K:
                raise InvalidArgument(f"top_k is {request.top_k}; at most {MAX_TOP_K}")
            sources = _sources(request.image, request.images, request.HasField("image"))
            output = model.outputs[0].name

            def finish(_: Prepared, outputs: dict[str, np.ndarray]) -> pb.ClassifyResult:
                labels = classification.postprocess(outputs[output], model.meta, request.top_k)
                return pb.ClassifyResult(
                    classes=[pb.Classification(class_id=x.class_id, label=x.label, score=x.score) for x in labels]
                )

            results = await self._each(model, sources, context, finish)
        return pb.ClassifyResponse(
            model=model.name, model_version=model.version, classes=results[0].classes, results=results
        )

    # ------------------------------------------------------------------ Detect

    def _detect_params(self, request: pb.DetectRequest, model: ServedModel) -> detection.DetectParams:
        defaults = detection.DetectParams()
        params = detection.DetectParams(
            conf_threshold=request.confidence_threshold
            if request.HasField("confidence_threshold")
            else defaults.conf_threshold,
            iou_threshold=request.iou_threshold if request.HasField("iou_threshold") else defaults.iou_threshold,
            agnostic=request.class_agnostic,
            max_det=request.max_detections if request.HasField("max_detections") else defaults.max_det,
            classes=tuple(request.class_ids),
        )
        return params.check(len(model.meta.labels) or 1 << 30)

    async def _detect(self, request: pb.DetectRequest, context: grpc.aio.ServicerContext) -> pb.DetectResponse:
        with self.repo.use(request.model, request.model_version) as model:
            _require_task(model, "detection", "Detect")
            params = self._detect_params(request, model)
            sources = _sources(request.image, request.images, request.HasField("image"))
            output = model.outputs[0].name
            labels = model.meta.labels
            classes = np.asarray(params.classes, dtype=np.int64) if params.classes else None

            def finish(prepared: Prepared, outputs: dict[str, np.ndarray]) -> pb.DetectResult:
                pred = outputs[output]
                if pred.ndim != 2:
                    raise InvalidArgument(f"model {model.name!r} output has shape {pred.shape}; expected 2-D per image")
                layout = detection.layout_of(pred.shape, model.meta.output_layout, len(labels))
                found = detection.detect(
                    pred, layout, params.conf_threshold, params.iou_threshold, params.agnostic, params.max_det, classes
                )
                boxes = prepared.transform.to_original(found.boxes)
                return pb.DetectResult(
                    width=prepared.transform.width,
                    height=prepared.transform.height,
                    detections=[
                        pb.Detection(
                            box=pb.Box(x1=b[0], y1=b[1], x2=b[2], y2=b[3]),
                            score=float(s),
                            class_id=int(c),
                            label=labels[c] if c < len(labels) else str(int(c)),
                        )
                        for b, s, c in zip(boxes, found.scores, found.class_ids, strict=True)
                    ],
                )

            results = await self._each(model, sources, context, finish)
        return pb.DetectResponse(model=model.name, model_version=model.version, results=results)

    @rpc("Detect", lambda r: r.model)
    async def Detect(self, request: pb.DetectRequest, context: grpc.aio.ServicerContext) -> pb.DetectResponse:
        return await self._detect(request, context)

    async def DetectStream(
        self, frames: AsyncIterator[pb.DetectFrame], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.DetectFrameResult]:
        """Frames are processed concurrently (a window of 8) and answered in arrival order, errors in-band."""

        def start(frame: pb.DetectFrame) -> Awaitable[pb.DetectResponse]:
            label = self.repo.metric_label(frame.request.model)
            return counted(label, "DetectStream", self._detect(frame.request, context))

        async for frame, answer in in_order(frames, start, STREAM_WINDOW):
            if isinstance(answer, OpticError):
                yield pb.DetectFrameResult(
                    frame_id=frame.frame_id, error_code=answer.code, error_message=answer.message
                )
            else:
                yield pb.DetectFrameResult(frame_id=frame.frame_id, response=answer)

    # ------------------------------------------------------------------ Segment

    @rpc("Segment", lambda r: r.model)
    async def Segment(self, request: pb.SegmentRequest, context: grpc.aio.ServicerContext) -> pb.SegmentResponse:
        with self.repo.use(request.model, request.model_version) as model:
            _require_task(model, "segmentation", "Segment")
            sources = _sources(request.image, request.images, request.HasField("image"))
            output = model.outputs[0].name
            labels = model.meta.labels

            def finish(prepared: Prepared, outputs: dict[str, np.ndarray]) -> pb.SegmentResult:
                logits = outputs[output]
                if logits.ndim != 3:
                    raise InvalidArgument(f"model {model.name!r} output has shape {logits.shape}; expected [C, H, W]")
                mask = segmentation.class_map(logits, prepared.transform)
                summary = segmentation.summarise(mask, logits.shape[0], request.return_rle)
                return pb.SegmentResult(
                    mask_png=segmentation.png(mask),
                    width=prepared.transform.width,
                    height=prepared.transform.height,
                    classes=[
                        pb.ClassMask(
                            class_id=m.class_id,
                            label=labels[m.class_id] if m.class_id < len(labels) else str(m.class_id),
                            pixel_count=m.pixel_count,
                            rle_counts=m.rle_counts,
                        )
                        for m in summary
                    ],
                )

            results = await self._each(model, sources, context, finish)
        return pb.SegmentResponse(model=model.name, model_version=model.version, results=results)

    # ------------------------------------------------------------------ Caption

    def _encoder_of(self, name: str) -> str:
        """The client-facing name ("captioner") or the encoder's own -> the encoder model's name.

        Anything else is returned as it is, for the repository and the task check to refuse.
        """
        for candidate in (name, f"{name}_encoder"):
            loaded = self.repo.versions.get(candidate)
            if loaded and self.repo.get(candidate).meta.extra.get("optic.caption.role") == "encoder":
                return candidate
        return name

    @rpc("Caption", lambda r: r.model)
    async def Caption(self, request: pb.CaptionRequest, context: grpc.aio.ServicerContext) -> pb.CaptionResponse:
        with ExitStack() as stack:
            encoder = stack.enter_context(self.repo.use(self._encoder_of(request.model), request.model_version))
            _require_task(encoder, "captioning", "Caption")
            spec = captioning.CaptionSpec.from_meta(encoder.meta, encoder.name)
            decoder = stack.enter_context(self.repo.use(spec.decoder))
            beams = request.beam_size if request.HasField("beam_size") else 1
            if not 1 <= beams <= captioning.MAX_BEAMS:
                raise InvalidArgument(f"beam_size {beams} must be 1 to {captioning.MAX_BEAMS}")
            max_len = request.max_length if request.HasField("max_length") else spec.max_length
            if not 1 <= max_len <= spec.max_length:
                raise InvalidArgument(f"max_length {max_len} must be 1 to {spec.max_length} for this model")
            sources = _sources(request.image, request.images, request.HasField("image"))
            timeout = time_left(context)

            async def step(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
                remaining = None if timeout is None else max(0.0, deadline - time.monotonic())
                return await decoder.infer(feeds, remaining)

            deadline = time.monotonic() + (timeout if timeout is not None else math.inf)

            async def one(source: ImageSource) -> pb.CaptionResult:
                prepared = await self._prepare(source, encoder)
                started = time.perf_counter()
                enc = await encoder.infer({encoder.inputs[0].name: prepared.tensor[None]}, timeout)
                f, h, c = enc["features"], enc["h"], enc["c"]
                if beams == 1:
                    caption = await captioning.greedy(spec, step, f, h, c, max_len)
                else:
                    caption = await captioning.beam_search(spec, step, f, h, c, max_len, beams)
                STAGE_TIME.labels(encoder.name, "inference").observe(time.perf_counter() - started)
                return pb.CaptionResult(
                    text=caption.text,
                    tokens=[
                        pb.Token(text=t, log_prob=p) for t, p in zip(caption.tokens, caption.log_probs, strict=True)
                    ],
                    log_prob=caption.total_log_prob,
                )

            results = await asyncio.gather(*(one(s) for s in sources))
        return pb.CaptionResponse(model=request.model, model_version=encoder.version, results=results)
