"""KServe v2 / Open Inference Protocol over gRPC (``inference.GRPCInferenceService``)."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import numpy as np

from server import __version__
from server.api.common import rpc, time_left
from server.errors import InvalidArgument
from server.proto.inference import grpc_service_pb2 as pb
from server.proto.inference import grpc_service_pb2_grpc as pb_grpc
from server.repository import ModelRepository, ServedModel
from server.tensors import CONTENTS_FIELD, DATATYPES, from_contents, from_raw, to_raw

PLATFORM = "onnxruntime_onnx"


def decode_inputs(request: pb.ModelInferRequest, model: ServedModel) -> dict[str, np.ndarray]:
    """Validate the request's tensors against the model's inputs and decode them."""
    specs = {s.name: s for s in model.inputs}
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgument(
            f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs; send one per input, in order"
        )
    decoded: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(request.inputs):
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
        if raw:
            decoded[tensor.name] = from_raw(tensor.name, tensor.datatype, shape, raw[i])
        else:
            field = CONTENTS_FIELD.get(tensor.datatype)
            if field is None:
                raise InvalidArgument(f"input {tensor.name!r}: {tensor.datatype} can only be sent as raw contents")
            decoded[tensor.name] = from_contents(tensor.name, tensor.datatype, shape, getattr(tensor.contents, field))
    missing = [n for n in specs if n not in decoded]
    if missing:
        raise InvalidArgument(f"model {model.name!r} needs input(s) {', '.join(missing)}")
    return decoded


def tensor_metadata(model: ServedModel, kind: str) -> list[pb.ModelMetadataResponse.TensorMetadata]:
    specs = model.inputs if kind == "inputs" else model.outputs
    return [pb.ModelMetadataResponse.TensorMetadata(name=s.name, datatype=s.datatype, shape=s.shape) for s in specs]


class KServeServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, repo: ModelRepository, draining: Callable[[], bool]) -> None:
        self.repo = repo
        self._draining = draining

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
        model = self.repo.models.get(request.name)
        ready = model is not None and request.version in ("", model.version) and not self._draining()
        return pb.ModelReadyResponse(ready=ready)

    @rpc("ServerMetadata")
    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="optic", version=__version__, extensions=[])

    @rpc("ModelMetadata", lambda r: r.name)
    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        model = self.repo.get(request.name, request.version)
        return pb.ModelMetadataResponse(
            name=model.name,
            versions=[model.version],
            platform=PLATFORM,
            inputs=tensor_metadata(model, "inputs"),
            outputs=tensor_metadata(model, "outputs"),
        )

    @rpc("ModelInfer", lambda r: r.model_name)
    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        model = self.repo.get(request.model_name, request.model_version)
        known = {s.name: s for s in model.outputs}
        wanted = [o.name for o in request.outputs] or list(known)
        unknown = [n for n in wanted if n not in known]
        if unknown:
            raise InvalidArgument(
                f"model {model.name!r} has no output {unknown[0][:64]!r}; its outputs are {', '.join(known)}"
            )
        inputs = decode_inputs(request, model)
        outputs = await model.batcher.infer(inputs, time_left(context))
        response = pb.ModelInferResponse(model_name=model.name, model_version=model.version, id=request.id)
        for name in wanted:
            array = outputs[name]
            response.outputs.add(name=name, datatype=known[name].datatype, shape=array.shape)
            response.raw_output_contents.append(to_raw(array))
        return response
