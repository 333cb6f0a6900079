"""KServe v2 tensor datatypes: names, numpy dtypes and the wire encodings.

Pure functions on bytes and numpy arrays; the gRPC layer passes message fields
in and gets validated arrays out.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence

import numpy as np

from optic.server.errors import InvalidArgument

# KServe v2 datatype name -> numpy dtype (little-endian, as the wire format is).
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(np.object_),
}

# onnxruntime's type strings -> KServe datatype.
ORT_DATATYPES: dict[str, str] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}

# Datatype -> Triton's model-configuration type name (config.pbtxt `data_type`, ModelConfig's enum).
TRITON_TYPES: dict[str, str] = {d: "TYPE_" + ("STRING" if d == "BYTES" else d) for d in DATATYPES}

# Datatype -> field of InferTensorContents that carries it (FP16 has none).
CONTENTS_FIELD: dict[str, str] = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}

MAX_RANK = 16


def check_shape(name: str, shape: Sequence[int]) -> tuple[int, ...]:
    if len(shape) > MAX_RANK:
        raise InvalidArgument(f"input {name!r}: shape has {len(shape)} dimensions (at most {MAX_RANK})")
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"input {name!r}: shape {list(shape)} has a negative dimension")
    return tuple(int(d) for d in shape)


def raw_size(dims: Sequence[int], datatype: str) -> int:
    """Bytes a tensor of a fixed-size ``datatype`` (not BYTES) takes as raw contents."""
    return math.prod(dims) * DATATYPES[datatype].itemsize


def from_raw(name: str, datatype: str, shape: Sequence[int], raw: bytes | memoryview) -> np.ndarray:
    """Decode one entry of ``raw_input_contents`` (or a tensor read from shared memory); its length must match the
    shape exactly."""
    dims = check_shape(name, shape)
    count = math.prod(dims)
    if datatype == "BYTES":
        return _bytes_from_raw(name, dims, count, bytes(raw))  # no copy when it already is bytes
    dtype = DATATYPES[datatype]
    expected = raw_size(dims, datatype)
    if len(raw) != expected:
        raise InvalidArgument(
            f"input {name!r}: raw contents hold {len(raw)} bytes, but shape {list(dims)} of {datatype} needs {expected}"
        )
    return np.frombuffer(raw, dtype=dtype).reshape(dims)


def _bytes_from_raw(name: str, dims: tuple[int, ...], count: int, raw: bytes) -> np.ndarray:
    items: list[bytes] = []
    offset = 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise InvalidArgument(f"input {name!r}: BYTES raw contents end inside a length prefix")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise InvalidArgument(f"input {name!r}: BYTES element {len(items)} runs past the data")
        items.append(raw[offset : offset + length])
        offset += length
    if len(items) != count:
        raise InvalidArgument(f"input {name!r}: {len(items)} BYTES elements for shape {list(dims)}")
    out = np.empty(count, dtype=np.object_)
    out[:] = items
    return out.reshape(dims)


def from_contents(name: str, datatype: str, shape: Sequence[int], values: Sequence) -> np.ndarray:
    """Decode typed ``InferTensorContents`` (the field already chosen by datatype)."""
    dims = check_shape(name, shape)
    count = math.prod(dims)
    if len(values) != count:
        raise InvalidArgument(
            f"input {name!r}: contents hold {len(values)} elements, but shape {list(dims)} needs {count}"
        )
    if datatype == "BYTES":
        out = np.empty(count, dtype=np.object_)
        out[:] = list(values)
        return out.reshape(dims)
    try:
        return np.asarray(values, dtype=DATATYPES[datatype]).reshape(dims)
    except OverflowError as exc:  # e.g. 300 in int_contents for an INT8 tensor
        raise InvalidArgument(f"input {name!r}: a value does not fit {datatype}: {exc}") from exc


def to_raw(array: np.ndarray) -> bytes:
    """Encode an output tensor for ``raw_output_contents``."""
    if array.dtype == np.object_ or array.dtype.kind in "SU":
        parts = []
        for item in array.reshape(-1):
            data = item if isinstance(item, bytes) else str(item).encode()
            parts.append(struct.pack("<I", len(data)) + data)
        return b"".join(parts)
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
