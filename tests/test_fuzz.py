"""Property-based fuzzing of request messages against a live server (hypothesis).

Whatever the fields hold, the server answers with a status a client can act
on (never INTERNAL or UNKNOWN: those would mean we crashed on the input),
and stays up. Runs are derandomized so CI is reproducible; set
``OPTIC_FUZZ_EXAMPLES`` to fuzz longer locally.
"""

from __future__ import annotations

import os

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2 as kpb

from optic.export.data import make_scenes
from optic.proto.optic.v1 import vision_pb2 as vpb
from tests.conftest import RunningServer, encode, start_server

EXAMPLES = int(os.environ.get("OPTIC_FUZZ_EXAMPLES", "200"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
# Statuses that describe the request, not a server failure.
EXPECTED = {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "UNAVAILABLE", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION"}
PNG = encode(make_scenes(1, seed=9)[0].image)
MODELS = ["classifier", "detector", "segmenter", "captioner", "captioner_encoder", "captioner_decoder"]


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory):
    srv = start_server(tmp_path_factory.mktemp("fuzz"), "--max-message-mb", "8")
    yield srv
    assert srv.stop() == 0, srv.log()
    assert srv.proc.returncode == 0


@pytest.fixture(scope="module")
def channel(fuzz_server: RunningServer):
    with grpc.insecure_channel(fuzz_server.url) as ch:
        yield ch


def _status(channel: grpc.Channel, method: str, payload: bytes) -> tuple[str, str]:
    call = channel.unary_unary(method)  # bytes in, bytes out: the fuzzer controls every byte
    try:
        call(payload, timeout=60)
    except grpc.RpcError as err:
        return err.code().name, err.details() or ""
    return "OK", ""


# Mostly real names, so that most requests get past the lookup and exercise what follows.
hostile_names = st.one_of(st.text(max_size=40), st.sampled_from(["", "../classifier", "a/b"]))
names = st.one_of(*[st.sampled_from(MODELS)] * 4, hostile_names)
TASK_MODEL = {"Classify": "classifier", "Detect": "detector", "Segment": "segmenter", "Caption": "captioner"}
dims = st.one_of(st.integers(-3, 70), st.integers(-(2**63), 2**63 - 1), st.sampled_from([1, 3, 64, 96]))
datatypes = st.one_of(st.sampled_from(["FP32", "FP64", "INT64", "UINT8", "BYTES", "FP16", "BOOL"]), st.text(max_size=8))


def _mostly(draw: st.DrawFn, usual: str, other: st.SearchStrategy[str]) -> str:
    """``usual`` four times in five, else a draw from ``other``: most requests get past the model lookup."""
    return draw(other) if draw(st.sampled_from(range(5))) == 4 else usual


@st.composite
def infer_requests(draw: st.DrawFn) -> bytes:
    request = kpb.ModelInferRequest(
        model_name=_mostly(draw, "classifier", names),
        model_version=_mostly(draw, "", st.sampled_from(["1", "2", "-1", "x"])),
        id=draw(st.text(max_size=8)),
    )
    for _ in range(draw(st.sampled_from([1, 1, 1, 0, 2, 3]))):
        good = [st.just([1, 3, 64, 64]), st.just([2, 3, 64, 64]), st.just([1, 3, 96, 96])]
        shape = draw(st.one_of(st.lists(dims, max_size=6), *good))
        tensor = request.inputs.add(
            name=draw(st.one_of(st.just("images"), st.sampled_from(["images", "token", "h", "c", "features", "x"]))),
            datatype=draw(st.one_of(st.just("FP32"), datatypes)),
            shape=shape,
        )
        if draw(st.integers(0, 3)):  # mostly raw contents, mostly of the right size
            count = int(np.prod(shape)) if shape and all(0 <= d <= 100_000 for d in shape) else 0
            if 0 < count <= 200_000 and draw(st.integers(0, 3)):
                floats = st.floats(width=32, allow_nan=True, allow_infinity=True)
                fill = draw(floats)
                request.raw_input_contents.append(np.full(count, fill, np.float32).tobytes())
            else:
                request.raw_input_contents.append(draw(st.binary(max_size=4096)))
        else:
            tensor.contents.fp32_contents.extend(draw(st.lists(st.floats(width=32), max_size=64)))
            tensor.contents.int64_contents.extend(draw(st.lists(st.integers(-(2**63), 2**63 - 1), max_size=8)))
    for _ in range(draw(st.integers(0, 2))):
        out = request.outputs.add(name=draw(st.sampled_from(["logits", "pred", "nope", ""])))
        if draw(st.booleans()):
            out.parameters["classification"].int64_param = draw(st.integers(-5, 2**40))
    if draw(st.booleans()):
        request.parameters["timeout"].int64_param = draw(st.integers(-(2**63), 2**63 - 1))
    return request.SerializeToString()


@st.composite
def images(draw: st.DrawFn) -> vpb.Image:
    kind = draw(st.sampled_from(["png", "png", "mutated", "bytes", "raw"]))
    if kind == "png":
        return vpb.Image(data=PNG)
    if kind == "mutated":  # a real PNG with a few bytes overwritten: exercises the decoders' error paths
        data = bytearray(PNG)
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        return vpb.Image(data=bytes(data[: draw(st.integers(1, len(data)))]))
    if kind == "bytes":
        return vpb.Image(data=draw(st.binary(max_size=512)))
    h, w, c = draw(st.integers(0, 2**32 - 1)), draw(st.integers(0, 2**32 - 1)), draw(st.integers(0, 6))
    small = draw(st.booleans())
    if small:
        h, w = draw(st.integers(0, 80)), draw(st.integers(0, 80))
    size = h * w * c if small and draw(st.booleans()) else draw(st.integers(0, 5000))
    return vpb.Image(raw=vpb.RawImage(height=h, width=w, channels=c, pixels=bytes(size)))


@st.composite
def vision_requests(draw: st.DrawFn) -> tuple[str, bytes]:
    method = draw(st.sampled_from(["Classify", "Detect", "Segment", "Caption"]))
    common = {
        "model": _mostly(draw, TASK_MODEL[method], names),
        "model_version": _mostly(draw, "", st.sampled_from(["1", "9"])),
    }
    if draw(st.booleans()):
        common["image"] = draw(images())
    common["images"] = draw(st.lists(images(), max_size=3))
    floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
    u32 = st.integers(0, 2**32 - 1)
    if method == "Classify":
        request = vpb.ClassifyRequest(top_k=draw(st.one_of(u32, st.integers(0, 20))), **common)
    elif method == "Detect":
        request = vpb.DetectRequest(class_agnostic=draw(st.booleans()), **common)
        if draw(st.booleans()):
            request.confidence_threshold = draw(floats)
        if draw(st.booleans()):
            request.iou_threshold = draw(floats)
        if draw(st.booleans()):
            request.max_detections = draw(st.one_of(u32, st.integers(0, 500)))
        request.class_ids.extend(draw(st.lists(st.one_of(u32, st.integers(0, 5)), max_size=5)))
    elif method == "Segment":
        request = vpb.SegmentRequest(return_rle=draw(st.booleans()), **common)
    else:
        request = vpb.CaptionRequest(**common)
        if draw(st.booleans()):
            request.beam_size = draw(st.one_of(u32, st.integers(0, 20)))
        if draw(st.booleans()):
            request.max_length = draw(st.one_of(u32, st.integers(0, 30)))
    return f"/optic.v1.Vision/{method}", request.SerializeToString()


@FUZZ
@given(payload=infer_requests())
def test_fuzz_model_infer(channel: grpc.Channel, payload: bytes) -> None:
    code, message = _status(channel, "/inference.GRPCInferenceService/ModelInfer", payload)
    event(code)
    assert code in EXPECTED, f"{code}: {message}"


@FUZZ
@given(call=vision_requests())
def test_fuzz_vision(channel: grpc.Channel, call: tuple[str, bytes]) -> None:
    code, message = _status(channel, *call)
    event(f"{call[0].rsplit('/', 1)[1]} {code}")
    assert code in EXPECTED, f"{code}: {message}"


@FUZZ
@given(data=st.data())
def test_fuzz_mutated_wire_bytes(channel: grpc.Channel, data: st.DataObject) -> None:
    """Valid requests with bytes overwritten on the wire: either they still parse, or they are refused as
    INVALID_ARGUMENT (grpcio alone would answer UNKNOWN)."""
    method, payload = data.draw(
        st.one_of(
            vision_requests(),
            infer_requests().map(lambda p: ("/inference.GRPCInferenceService/ModelInfer", p)),
        )
    )
    mutated = bytearray(payload)
    for _ in range(data.draw(st.integers(1, 6))):
        if mutated:
            mutated[data.draw(st.integers(0, len(mutated) - 1))] = data.draw(st.integers(0, 255))
    code, message = _status(channel, method, bytes(mutated))
    event(code)
    assert code in EXPECTED, f"{code}: {message}"


def test_server_is_healthy_after_fuzzing(fuzz_server: RunningServer) -> None:
    assert fuzz_server.proc.poll() is None
    assert fuzz_server.health() == health_pb2.HealthCheckResponse.SERVING
    assert "Traceback" not in fuzz_server.log(), fuzz_server.log()[-3000:]
