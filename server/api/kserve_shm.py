"""Triton's shared-memory RPCs for the KServe servicer (the work is in :mod:`optic.server.shm`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import grpc

from optic.proto.inference import grpc_service_pb2 as pb
from optic.server.admission import Admission
from optic.server.api.common import rpc
from optic.server.errors import ResourceExhausted, Unimplemented
from optic.server.shm import DISABLED, SharedMemoryRegistry

NO_CUDA_SHM = "CUDA shared memory is not offered: pass tensors in system shared memory (--allow-client-shm) instead"


class SharedMemoryRpcs:
    """Mixed into the KServe servicer, which sets these three."""

    _shm: SharedMemoryRegistry | None  # None: --allow-client-shm is off
    _admission: Admission
    _max_shm_read: int  # a call reads no more from shared memory than a message may hold

    @contextmanager
    def _shm_bytes(self, size: int) -> Iterator[None]:
        """Count a call's shared-memory inputs like a message's bytes: capped per call, in the in-flight budget."""
        if not size:
            yield
            return
        if size > self._max_shm_read:
            raise ResourceExhausted(
                f"the request's inputs in shared memory hold {size / 2**20:.1f} MB; a call may read at most "
                f"{self._max_shm_read / 2**20:g} MB (--max-message-mb)"
            )
        refused = self._admission.hold(size)
        if refused is not None:
            raise ResourceExhausted(refused)
        try:
            yield
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
        regions = self._registry().status(request.name)
        return pb.SystemSharedMemoryStatusResponse(
            regions={r.name: status(name=r.name, key=r.key, offset=r.offset, byte_size=r.byte_size) for r in regions}
        )

    @rpc("SystemSharedMemoryRegister")
    async def SystemSharedMemoryRegister(
        self, request: pb.SystemSharedMemoryRegisterRequest, context: grpc.aio.ServicerContext
    ) -> pb.SystemSharedMemoryRegisterResponse:
        self._registry().register(request.name, request.key, request.offset, request.byte_size)
        return pb.SystemSharedMemoryRegisterResponse()

    @rpc("SystemSharedMemoryUnregister")
    async def SystemSharedMemoryUnregister(
        self, request: pb.SystemSharedMemoryUnregisterRequest, context: grpc.aio.ServicerContext
    ) -> pb.SystemSharedMemoryUnregisterResponse:
        self._registry().unregister(request.name)
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
