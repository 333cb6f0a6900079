"""Triton's shared-memory RPCs for the KServe servicer (the work is in :mod:`optic.server.shm`)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import grpc
import numpy as np

from optic.proto.inference import grpc_service_pb2 as pb
from optic.server.admission import Admission
from optic.server.api.common import parameter_value, rpc
from optic.server.errors import InvalidArgument, ResourceExhausted, Unimplemented
from optic.server.shm import DISABLED, Placed, SharedMemoryRegistry, TensorRef
from optic.server.tensors import DATATYPES, check_shape, raw_size

PARAMETERS = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")
NO_CUDA_SHM = "CUDA shared memory is not offered: pass tensors in system shared memory (--allow-client-shm) instead"


def tensor_refs(kind: str, tensors: Iterable[Any]) -> dict[str, TensorRef]:
    """The inputs or requested outputs (``kind``) that name a shared-memory region, by tensor name.

    Triton's rules: ``shared_memory_region`` and ``shared_memory_byte_size`` come together, the offset is optional.
    """
    refs: dict[str, TensorRef] = {}
    for tensor in tensors:
        params = tensor.parameters
        if not any(p in params for p in PARAMETERS):
            continue
        region, size, offset = (parameter_value(params[p]) if p in params else None for p in PARAMETERS)
        name = tensor.name[:64]
        if region is None or size is None:
            raise InvalidArgument(
                f"{kind} {name!r}: shared memory needs both 'shared_memory_region' and 'shared_memory_byte_size'"
            )
        offset = 0 if offset is None else offset
        if not isinstance(region, str) or not region:
            raise InvalidArgument(f"{kind} {name!r}: 'shared_memory_region' must be a region name")
        numbers = []
        for label, number in (("shared_memory_byte_size", size), ("shared_memory_offset", offset)):
            if not isinstance(number, int) or isinstance(number, bool) or number < 0:
                raise InvalidArgument(f"{kind} {name!r}: {label!r} must be a non-negative integer, got {number!r}")
            numbers.append(number)
        refs[tensor.name] = TensorRef(tensor.name, region, offset=numbers[1], byte_size=numbers[0])
    return refs


def check_shm_sizes(request: pb.ModelInferRequest, refs: Mapping[str, TensorRef]) -> None:
    """Each input's ``shared_memory_byte_size`` against its shape, before any read or byte budget: the size is the
    client's word, and a wrong one is INVALID_ARGUMENT, not a retryable RESOURCE_EXHAUSTED."""
    for tensor in request.inputs:
        ref = refs.get(tensor.name)
        if ref is None or tensor.datatype not in DATATYPES or tensor.datatype == "BYTES":
            continue  # unknown datatypes are refused while decoding; BYTES elements have their own lengths
        needed = raw_size(check_shape(tensor.name, tensor.shape), tensor.datatype)
        if ref.byte_size != needed:
            raise InvalidArgument(
                f"input {tensor.name[:64]!r}: shared_memory_byte_size is {ref.byte_size}, but shape "
                f"{list(tensor.shape)[:16]} of {tensor.datatype} needs {needed}"
            )


class SharedMemoryRpcs:
    """Mixed into the KServe servicer, which sets these three."""

    _shm: SharedMemoryRegistry | None  # None: --allow-client-shm is off
    _admission: Admission
    _max_shm_read: int  # a call reads no more from shared memory than a message may hold

    def _placed(
        self, request: pb.ModelInferRequest, top_k: dict[str, int]
    ) -> tuple[dict[str, Placed], dict[str, Placed]]:
        """The request's inputs and outputs in shared memory, each resolved to its region once, before any work:
        a missing or too small region is refused before the model runs."""
        inputs, outputs = tensor_refs("input", request.inputs), tensor_refs("output", request.outputs)
        if not inputs and not outputs:
            return {}, {}
        shm = self._registry()
        both = next((n for n in outputs if top_k.get(n)), None)
        if both is not None:
            raise InvalidArgument(f"output {both[:64]!r}: set 'classification' or shared memory, not both")
        check_shm_sizes(request, inputs)
        return (
            {n: shm.place(r, "input") for n, r in inputs.items()},
            {n: shm.place(r, "output") for n, r in outputs.items()},
        )

    @contextmanager
    def _shm_inputs(self, placed: Mapping[str, Placed]) -> Iterator[dict[str, np.ndarray]]:
        """Read a call's shared-memory inputs, counted like a message's bytes (capped per call, in the in-flight
        budget) until the call is done; their buffers are kept for reuse only once its model run succeeded."""
        if not placed:
            yield {}
            return
        shm = self._registry()
        size = sum(p.ref.byte_size for p in placed.values())
        if size > self._max_shm_read:
            raise ResourceExhausted(
                f"the request's inputs in shared memory hold {size / 2**20:.1f} MB; a call may read at most "
                f"{self._max_shm_read / 2**20:g} MB (--max-message-mb)"
            )
        refused = self._admission.hold(size)
        if refused is not None:
            raise ResourceExhausted(refused)
        try:
            data = {name: shm.read(p) for name, p in placed.items()}
            yield data
            shm.recycle(data.values())  # not reached when the body raised: its batch may still be running
        finally:
            self._admission.release(size)

    # ------------------------------------------------------------------ shared memory (server/shm.py)

    def _registry(self) -> SharedMemoryRegistry:
        if self._shm is None:
            raise Unimplemented(DISABLED)
        return self._shm

    @rpc("SystemSharedMemoryStatus")
    async def SystemSharedMemoryStatus(
        self, request: pb.SystemSharedMemoryStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.SystemSharedMemoryStatusResponse:
        status = pb.SystemSharedMemoryStatusResponse.RegionStatus
        if self._shm is None:  # Triton answers an empty list when client shared memory is off
            return pb.SystemSharedMemoryStatusResponse()
        regions = await asyncio.to_thread(self._shm.status, request.name)
        return pb.SystemSharedMemoryStatusResponse(
            regions={r.name: status(name=r.name, key=r.key, offset=r.offset, byte_size=r.byte_size) for r in regions}
        )

    @rpc("SystemSharedMemoryRegister")
    async def SystemSharedMemoryRegister(
        self, request: pb.SystemSharedMemoryRegisterRequest, context: grpc.aio.ServicerContext
    ) -> pb.SystemSharedMemoryRegisterResponse:
        # Off the event loop: registering waits for the registry's lock, which another worker may hold.
        shm = self._registry()
        await asyncio.to_thread(shm.register, request.name, request.key, request.offset, request.byte_size)
        return pb.SystemSharedMemoryRegisterResponse()

    @rpc("SystemSharedMemoryUnregister")
    async def SystemSharedMemoryUnregister(
        self, request: pb.SystemSharedMemoryUnregisterRequest, context: grpc.aio.ServicerContext
    ) -> pb.SystemSharedMemoryUnregisterResponse:
        await asyncio.to_thread(self._registry().unregister, request.name)
        return pb.SystemSharedMemoryUnregisterResponse()

    @rpc("CudaSharedMemoryStatus")
    async def CudaSharedMemoryStatus(self, request: object, context: grpc.aio.ServicerContext) -> object:
        raise Unimplemented(NO_CUDA_SHM)

    @rpc("CudaSharedMemoryRegister")
    async def CudaSharedMemoryRegister(self, request: object, context: grpc.aio.ServicerContext) -> object:
        raise Unimplemented(NO_CUDA_SHM)

    @rpc("CudaSharedMemoryUnregister")
    async def CudaSharedMemoryUnregister(self, request: object, context: grpc.aio.ServicerContext) -> object:
        raise Unimplemented(NO_CUDA_SHM)
