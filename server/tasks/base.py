"""What a task is: one object that owns a request's whole life, server side and client side.

A task (in the spirit of LitServe's ``LitAPI`` stages) reads its request's
fields, checks them against the model, turns every image into the model's
input, post-processes the outputs and builds the response; on the client side
it builds requests, turns answers into plain dataclasses, prints and draws
them. The Vision API looks the task up by the model's ``optic.task`` and
dispatches to it; adding a task is one module and its proto messages.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

import numpy as np
from google.protobuf.message import Message

from optic.proto.optic.v1 import vision_pb2 as pb
from optic.server.errors import InvalidArgument
from optic.server.tasks.fair import CallBudget, CallLimits, FairExecutor
from optic.server.tasks.image import (
    ImageLimits,
    ImageSource,
    Prepared,
    RawPixels,
    cheap_to_decode,
    image_size,
    prepare,
)

if TYPE_CHECKING:  # the client side imports tasks without the server's runtime
    from PIL import Image as PILImage

    from optic.server.repository import ModelRepository, ServedModel

MAX_IMAGES = 64  # images per call
R = TypeVar("R")  # a client-side result


class Work:
    """What the server lends a task for one call: the repository, the worker pool, limits, the deadline."""

    def __init__(
        self,
        repo: ModelRepository,
        executor: FairExecutor,
        limits: ImageLimits,
        call_limits: CallLimits,
        timeout: float | None,
        observe: Callable[[str, str, float], None],
        peer: str = "",
    ) -> None:
        self.repo = repo
        self.peer = peer or self  # the client's connection (gRPC's peer address), for fair turns in the pool
        self.executor = executor
        self.limits = limits
        self.budget = CallBudget(call_limits)
        self.timeout = timeout  # seconds left of the client's deadline, None for none
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._observe = observe  # (model, stage, seconds) -> metrics

    def remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def observe(self, model: str, stage: str, seconds: float) -> None:
        self._observe(model, stage, seconds)

    async def prepare(self, source: ImageSource, model: ServedModel) -> Prepared:
        """Decode + resize + normalise: small images inline, larger ones in the worker pool."""
        spec = model.meta.input
        assert spec is not None
        if isinstance(source, bytes) and cheap_to_decode(source, self.limits):
            prepared = prepare(source, spec, self.limits)
        else:
            prepared = await self.executor.run(self, prepare, source, spec, self.limits, connection=self.peer)
        self.observe(model.name, "decode", prepared.decode_seconds)
        self.observe(model.name, "preprocess", prepared.preprocess_seconds)
        return prepared

    async def infer(self, model: ServedModel, tensor: np.ndarray) -> dict[str, np.ndarray]:
        """One image's tensor through the model's batcher; its own outputs, batch axis removed."""
        started = time.perf_counter()
        outputs = await model.infer({model.inputs[0].name: tensor[None]}, self.remaining())
        self.observe(model.name, "inference", time.perf_counter() - started)
        return {k: v[0] for k, v in outputs.items()}

    def check(self, sources: Sequence[ImageSource], masks: bool = False) -> None:
        """The call's pixels (and mask pixels) against its budget, from the headers alone: before any decoding."""
        sizes = [s for s in map(image_size, sources) if s is not None]
        for w, h in sizes:  # one image over its own limit: say so, as decoding it would
            if w * h > self.limits.max_pixels:
                raise InvalidArgument(f"image is {w}x{h} = {w * h} pixels; the limit is {self.limits.max_pixels}")
        self.budget.check_pixels(sizes, masks)

    async def each(
        self,
        model: ServedModel,
        sources: Sequence[ImageSource],
        finish: Callable[[Prepared, dict[str, np.ndarray]], Message],
        at_image_size: bool = False,
    ) -> list[Message]:
        """Prepare, infer and post-process every image concurrently; results in request order.

        ``at_image_size``: the answers are built at the image's own size (masks), so large images are
        post-processed in the worker pool; other answers (labels, boxes, captions) cost the same whatever the
        image's size and are built at once, without a second turn in the pool's queue."""

        def finished(prepared: Prepared, outputs: dict[str, np.ndarray]) -> Message:
            result = finish(prepared, outputs)
            self.budget.take_bytes(result.ByteSize())
            return result

        async def one(source: ImageSource) -> Message:
            prepared = await self.prepare(source, model)
            outputs = await self.infer(model, prepared.tensor)
            started = time.perf_counter()
            if at_image_size and prepared.transform.width * prepared.transform.height > self.limits.inline_pixels:
                # Work at the original size (a mask resampled and PNG-encoded: ~20 ms at 1080p) would stall
                # the event loop, and with it every other call, including the cheap refusals under overload.
                result = await self.executor.run(self, finished, prepared, outputs, connection=self.peer)
            else:
                result = finished(prepared, outputs)
            self.observe(model.name, "postprocess", time.perf_counter() - started)
            return result

        return list(await asyncio.gather(*(one(s) for s in sources)))


def sources_of(request: Any) -> list[ImageSource]:
    """The request's ``image`` and ``images``, checked, as bytes or raw pixels."""
    found = ([request.image] if request.HasField("image") else []) + list(request.images)
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


def label_of(labels: Sequence[str], class_id: int) -> str:
    return labels[class_id] if 0 <= class_id < len(labels) else str(int(class_id))


@dataclass(frozen=True)
class Option:
    """A request option as the command line offers it (``optic infer``): flag, type, help."""

    field: str  # the request message's field
    flag: str
    type: type
    help: str


class Task(Generic[R]):
    """One task's whole life. Subclasses set the class attributes and override the hooks they need."""

    name: ClassVar[str]  # the short name: classify, detect, segment, caption, ...
    long_name: ClassVar[str]  # the name written in ``optic.task`` metadata
    rpc: ClassVar[str]  # the Vision method that serves it
    request_type: ClassVar[type[Message]]
    response_type: ClassVar[type[Message]]
    default_model: ClassVar[str]
    options: ClassVar[tuple[Option, ...]] = ()  # request fields ``optic infer`` exposes as flags
    masks: ClassVar[bool] = False  # answers carry masks at the image size (their pixels count as output)

    # ------------------------------------------------------------------ server side

    def resolve(self, repo: ModelRepository, name: str) -> str:
        """The repository model a client-facing name stands for (the captioner: its encoder)."""
        return name

    def public_name(self, model: ServedModel) -> str | None:
        """The name clients call a loaded model by (None: not called directly, e.g. a caption decoder)."""
        return model.name

    def check(self, model: ServedModel) -> None:
        if model.meta.input is None:
            raise InvalidArgument(f"model {model.name!r} has no input metadata (optic.input.*); it cannot take images")

    def defaults(self, model: ServedModel) -> dict[str, str]:
        """Per-model request defaults, shown by the Vision ModelMetadata RPC."""
        return {}

    def finish(
        self, work: Work, model: ServedModel, params: Any, prepared: Prepared, outputs: dict[str, np.ndarray]
    ) -> Message:
        """One image's outputs -> its result message (runs in a worker thread for large images)."""
        raise NotImplementedError

    def validate(self, model: ServedModel, request: Any) -> Any:
        """Check the request's options against the model before any image is decoded; returns what ``finish``
        receives as ``request`` (the request itself, or parsed parameters)."""
        return request

    async def handle(self, work: Work, request: Any, model: ServedModel) -> Message:
        """The default life: every image prepared, inferred and finished on its own, answers in order."""
        params = self.validate(model, request)
        sources = sources_of(request)
        work.check(sources, masks=self.masks)
        finish = lambda p, o: self.finish(work, model, params, p, o)  # noqa: E731
        results = await work.each(model, sources, finish, at_image_size=self.masks)
        return self.response_type(model=model.name, model_version=model.version, results=results)

    # ------------------------------------------------------------------ client side

    def request(self, model: str, images: Sequence[pb.Image], version: str = "", **options: Any) -> Message:
        """The request message; ``options`` are its fields (unknown ones: TypeError)."""
        unknown = set(options) - set(self.request_type.DESCRIPTOR.fields_by_name)
        if unknown:
            raise TypeError(f"{self.rpc} takes no option(s) {', '.join(sorted(unknown))}")
        given = {k: v for k, v in options.items() if v is not None}
        return self.request_type(model=model, model_version=version, images=list(images), **given)

    def result(self, message: Any) -> R:
        """One result message -> the client's dataclass."""
        raise NotImplementedError

    def render(self, result: R) -> str:
        """A few human-readable lines for ``optic infer``."""
        raise NotImplementedError

    def to_json(self, result: R) -> object:
        raise NotImplementedError

    def draw(self, image: PILImage.Image, result: R) -> PILImage.Image:
        """The image annotated with the result, for ``optic infer --save-vis``."""
        raise NotImplementedError
