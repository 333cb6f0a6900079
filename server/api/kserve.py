"""KServe v2 / Open Inference Protocol over gRPC (``inference.GRPCInferenceService``)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping

import grpc
import numpy as np

from optic.proto.inference import grpc_service_pb2 as pb
from optic.proto.inference import grpc_service_pb2_grpc as pb_grpc
from optic.server import __version__, overrides
from optic.server.admission import Admission, SizedRequest, Undecodable, sized_stream
from optic.server.api.common import CallInfo, counted, parameter_value, rpc, time_left
from optic.server.api.kserve_shm import SharedMemoryRpcs
from optic.server.api.streams import StreamLimits, in_order
from optic.server.config import PLATFORM
from optic.server.errors import FailedPrecondition, InvalidArgument, NotFound, OpticError
from optic.server.handlers import fail
from optic.server.metadata import MODEL_NAME
from optic.server.metrics import Duration, ModelStats
from optic.server.repository import ModelRepository, ServedModel, printable
from optic.server.shm import SharedMemoryRegistry
from optic.server.tensors import CONTENTS_FIELD, DATATYPES, from_contents, from_raw, to_raw

EXTENSIONS = ["classification", "model_configuration", "model_repository", "statistics"]
MAX_CLASSIFICATION = 1000


def decode_inputs(
    request: pb.ModelInferRequest,
    model: ServedModel,
    allow_non_finite: bool = False,
    shm_data: Mapping[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Validate the request's tensors against the model's inputs and decode them.

    ``shm_data``: the bytes of the inputs in shared memory, already read; ``raw_input_contents`` holds the others,
    in order.
    NaN and infinity are refused unless allowed: in an image model's input they are a client bug
    (a division by zero in normalisation), and would come back as NaN scores that look like answers.
    """
    specs = {s.name: s for s in model.inputs}
    shm_data = shm_data or {}
    raw = request.raw_input_contents
    typed = next((t.name for t in request.inputs if t.HasField("contents") and (raw or t.name in shm_data)), None)
    if typed is not None:  # one way per input (Triton refuses the same)
        raise InvalidArgument(
            f"input {typed[:64]!r} has typed contents while the request also has "
            f"{'shared memory' if typed in shm_data else 'raw_input_contents'} for it; send every input one way"
        )
    sent = len(request.inputs) - len(shm_data)
    if raw and len(raw) != sent:
        raise InvalidArgument(
            f"{len(raw)} raw_input_contents for {sent} inputs not in shared memory; send one per input, in order"
        )
    decoded: dict[str, np.ndarray] = {}
    raw_index = 0
    for tensor in request.inputs:
        spec = specs.get(tensor.name)
        if spec is None:
            raise InvalidArgument(
                f"model {model.name!r} has no input {tensor.name[:64]!r}; its inputs are {', '.join(specs)}"
            )
        if tensor.name in decoded:
            raise InvalidArgument(f"input {tensor.name!r} is given twice")
        if tensor.datatype not in DATATYPES:
            raise InvalidArgument(f"input {tensor.name!r}: unknown datatype {tensor.datatype[:32]!r}")
        if tensor.datatype != spec.datatype:
            raise InvalidArgument(
                f"input {tensor.name!r} has datatype {tensor.datatype}; model {model.name!r} expects {spec.datatype}"
            )
        shape = list(tensor.shape)
        if len(shape) != len(spec.shape) or any(
            want != -1 and got != want for got, want in zip(shape, spec.shape, strict=False)
        ):
            raise InvalidArgument(
                f"input {tensor.name!r} has shape {shape[:16]}; model {model.name!r} expects "
                f"{list(spec.shape)} (-1: any size)"
            )
        data = shm_data.get(tensor.name)
        if data is not None:
            decoded[tensor.name] = from_raw(tensor.name, tensor.datatype, shape, data.data)
        elif raw:
            decoded[tensor.name] = from_raw(tensor.name, tensor.datatype, shape, raw[raw_index])
            raw_index += 1
        else:
            field = CONTENTS_FIELD.get(tensor.datatype)
            if field is None:
                raise InvalidArgument(f"input {tensor.name!r}: {tensor.datatype} can only be sent as raw contents")
            decoded[tensor.name] = from_contents(tensor.name, tensor.datatype, shape, getattr(tensor.contents, field))
        array = decoded[tensor.name]
        finite = np.isfinite(array) if array.dtype.kind == "f" and not allow_non_finite else None
        if finite is not None and not finite.all():
            bad = int(array.size - np.count_nonzero(finite))
            raise InvalidArgument(
                f"input {tensor.name!r} holds {bad} NaN or infinite value(s); send finite numbers "
                "(or start the server with --allow-non-finite)"
            )
    missing = [n for n in specs if n not in decoded]
    if missing:
        raise InvalidArgument(f"model {model.name!r} needs input(s) {', '.join(missing)}")
    return decoded


def tensor_metadata(model: ServedModel, kind: str) -> list[pb.ModelMetadataResponse.TensorMetadata]:
    specs = model.inputs if kind == "inputs" else model.outputs
    return [pb.ModelMetadataResponse.TensorMetadata(name=s.name, datatype=s.datatype, shape=s.shape) for s in specs]


class KServeServicer(SharedMemoryRpcs, pb_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self,
        repo: ModelRepository,
        draining: Callable[[], bool],
        admission: Admission,
        streams: StreamLimits,
        allow_non_finite: bool = False,
        shm: SharedMemoryRegistry | None = None,
        max_message_bytes: int = 64 << 20,
    ) -> None:
        self.repo = repo
        self._draining = draining
        self._admission = admission
        self._streams = streams
        self._allow_non_finite = allow_non_finite
        self._shm = shm  # None: --allow-client-shm is off
        self._max_shm_read = max_message_bytes  # a call reads no more from shared memory than a message may hold

    @rpc("ServerLive")
    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @rpc("ServerReady")
    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.repo.ready and not self._draining())

    @rpc("ModelReady", lambda r: r.name)
    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self.repo.is_ready(request.name, request.version) and not self._draining())

    @rpc("ServerMetadata")
    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        extensions = EXTENSIONS + (["system_shared_memory"] if self._shm is not None else [])
        return pb.ServerMetadataResponse(name="optic", version=__version__, extensions=extensions)

    @rpc("ModelMetadata", lambda r: r.name)
    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        model = self.repo.get(request.name, request.version)
        return pb.ModelMetadataResponse(
            name=model.name,
            versions=sorted(self.repo.versions.get(model.name, {}), key=int),
            platform=PLATFORM,
            inputs=tensor_metadata(model, "inputs"),
            outputs=tensor_metadata(model, "outputs"),
        )

    @rpc("ModelInfer", lambda r: r.model_name)
    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        return await self._infer(request, time_left(context))

    async def _infer(self, request: pb.ModelInferRequest, timeout: float | None) -> pb.ModelInferResponse:
        with self.repo.use(request.model_name, request.model_version) as model:
            known = {s.name: s for s in model.outputs}
            wanted = [o.name for o in request.outputs] or list(known)
            unknown = [n for n in wanted if n not in known]
            if unknown:
                raise InvalidArgument(
                    f"model {model.name!r} has no output {unknown[0][:64]!r}; its outputs are {', '.join(known)}"
                )
            top_k = {o.name: _classification_k(o) for o in request.outputs}
            queue_timeout = _queue_timeout(request, model)
            in_shm, out_shm = self._placed(request, top_k)
            with self._shm_inputs(in_shm) as shm_data:
                inputs = decode_inputs(request, model, self._allow_non_finite, shm_data)
                outputs = await model.infer(inputs, timeout, queue_timeout)
        response = pb.ModelInferResponse(model_name=model.name, model_version=model.version, id=request.id)
        for name in wanted:
            array = outputs[name]
            datatype = known[name].datatype
            if top_k.get(name):
                array, datatype = classify(array, top_k[name], model.meta.labels, model.max_batch_size > 0), "BYTES"
            response.outputs.add(name=name, datatype=datatype, shape=array.shape)
            if name in out_shm:  # Triton's layout: an empty entry keeps the order
                self._registry().write(out_shm[name], to_raw(array))
                response.raw_output_contents.append(b"")
            else:
                response.raw_output_contents.append(to_raw(array))
        return response

    @sized_stream
    async def ModelStreamInfer(
        self, requests: AsyncIterator[SizedRequest | Undecodable], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Requests run concurrently (so they batch); responses come back in request order, errors in-band."""
        call = CallInfo.of(context)  # the stream's deadline, read while it is live

        def start(request: pb.ModelInferRequest) -> Awaitable[pb.ModelInferResponse]:
            label = self.repo.metric_label(request.model_name)
            return counted(label, "ModelStreamInfer", self._infer(request, call.time_left()))

        answers = in_order(requests, start, self._streams, self._admission.enter, self._admission.leave)
        try:
            async for request, answer in answers:
                if isinstance(answer, OpticError):
                    yield pb.ModelStreamInferResponse(
                        error_message=answer.message, infer_response=pb.ModelInferResponse(id=request.id)
                    )
                else:
                    yield pb.ModelStreamInferResponse(infer_response=answer)
        except OpticError as exc:  # the stream idled, or an item could not be parsed
            fail(context, grpc.StatusCode[exc.code], exc.message)

    @rpc("ModelConfig", lambda r: r.name)
    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelConfigResponse:
        return pb.ModelConfigResponse(config=self.repo.get(request.name, request.version).config)

    @rpc("ModelStatistics", lambda r: r.name)
    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelStatisticsResponse:
        if request.name:
            self.repo.get(request.name, request.version)  # NOT_FOUND / UNAVAILABLE as for inference
        response = pb.ModelStatisticsResponse()
        for name, versions in sorted(self.repo.versions.items()):
            if request.name and name != request.name:
                continue
            for version, model in sorted(versions.items(), key=lambda kv: int(kv[0])):
                if request.version and version != request.version:
                    continue
                response.model_stats.append(statistics(model.stats))
        return response

    @rpc("RepositoryIndex")
    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        entries = self.repo.index(ready_only=request.ready)
        return pb.RepositoryIndexResponse(
            models=[
                pb.RepositoryIndexResponse.ModelIndex(name=e.name, version=e.version, state=e.state, reason=e.reason)
                for e in entries
            ]
        )

    @rpc("RepositoryModelLoad", lambda r: r.model_name)
    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelLoadResponse:
        self._require_explicit("load")
        if not MODEL_NAME.match(request.model_name):
            raise NotFound(f"no model {printable(request.model_name)} in the repository")
        await self.repo.load(request.model_name, overrides.parse(request.model_name, request.parameters))
        return pb.RepositoryModelLoadResponse()

    @rpc("RepositoryModelUnload", lambda r: r.model_name)
    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelUnloadResponse:
        self._require_explicit("unload")
        await self.repo.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    def _require_explicit(self, action: str) -> None:
        if self.repo.control_mode != "explicit":
            raise FailedPrecondition(
                f"model {action} requests need --model-control-mode explicit (this server runs "
                f"{self.repo.control_mode!r})"
            )


def _duration(d: Duration) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=d.count, ns=d.ns)


def statistics(stats: ModelStats) -> pb.ModelStatistics:
    """Triton's ModelStatistics from our counters."""
    return pb.ModelStatistics(
        name=stats.model,
        version=stats.version,
        last_inference=stats.last_inference_ms,
        inference_count=stats.inference_count,
        execution_count=stats.execution_count,
        inference_stats=pb.InferStatistics(
            success=_duration(stats.success),
            fail=_duration(stats.fail),
            queue=_duration(stats.queue),
            compute_input=_duration(stats.compute.compute_input),
            compute_infer=_duration(stats.compute.compute_infer),
            compute_output=_duration(stats.compute.compute_output),
        ),
        batch_stats=[
            pb.InferBatchStatistics(
                batch_size=size,
                compute_input=_duration(b.compute_input),
                compute_infer=_duration(b.compute_infer),
                compute_output=_duration(b.compute_output),
            )
            for size, b in sorted(stats.batches.items())
        ],
    )


def _classification_k(output: pb.ModelInferRequest.InferRequestedOutputTensor) -> int:
    if "classification" not in output.parameters:
        return 0
    k = parameter_value(output.parameters["classification"])
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_CLASSIFICATION:
        raise InvalidArgument(
            f"output {output.name[:64]!r}: 'classification' must be an integer 1 to {MAX_CLASSIFICATION}, got {k!r}"
        )
    return k


def _queue_timeout(request: pb.ModelInferRequest, model: ServedModel) -> float | None:
    """Triton's ``timeout`` request parameter (microseconds): replaces the queue policy's default if allowed."""
    if "timeout" not in request.parameters:
        return None
    value = parameter_value(request.parameters["timeout"])
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InvalidArgument(f"parameter 'timeout' must be a non-negative integer of microseconds, got {value!r}")
    if not model.config.dynamic_batching.default_queue_policy.allow_timeout_override or value == 0:
        return None
    return value / 1e6


def classify(scores: np.ndarray, k: int, labels: tuple[str, ...], batched: bool) -> np.ndarray:
    """Triton's classification extension: top-k per sample as BYTES ``"score:index:label"``."""
    rows = scores.reshape(scores.shape[0], -1) if batched else scores.reshape(1, -1)
    k = min(k, rows.shape[1])
    top = np.argsort(-rows, axis=1, kind="stable")[:, :k]
    out = np.empty((rows.shape[0], k), dtype=object)
    for i, row in enumerate(top):
        for j, c in enumerate(row):
            label = labels[c] if c < len(labels) else ""
            out[i, j] = f"{rows[i, c]:f}:{c}:{label}".encode()
    return out if batched else out[0]
