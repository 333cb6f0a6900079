"""Triton's system shared-memory extension, driven by the stock client's own shared-memory utilities
(``tritonclient.utils.shared_memory``) and checked against onnxruntime's answer for the same tensor."""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as tc
import tritonclient.utils.shared_memory as shm
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc
from tritonclient.utils import InferenceServerException

from optic.server.admission import Admission
from tests.conftest import MODEL_REPO, RunningServer, metric_values, scrape, start_server
from tests.test_workers import children, cpu_seconds, wait_for

SHM_DIR = Path("/dev/shm")
pytestmark = pytest.mark.skipif(not SHM_DIR.is_dir(), reason="needs POSIX shared memory (/dev/shm)")

DETECTOR = ort.InferenceSession(str(MODEL_REPO / "detector" / "1" / "model.onnx"))
SHAPE = [1, 3, 384, 384]
X = np.random.default_rng(5).random(SHAPE, dtype=np.float32)
OUT_SHAPE = [1, 9, 3024]
OUT_BYTES = 9 * 3024 * 4
REF = DETECTOR.run(None, {"images": X})[0]


def _private_dirs() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("optic-shm-*"))


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    before = _private_dirs()
    s = start_server(
        tmp_path_factory.mktemp("shm"),
        "--allow-client-shm",
        "--max-message-mb",
        "4",  # a batch of three detector images (5.3 MB) is more than a call may read
        "--max-inflight-mb",
        "3",  # one detector image (1.77 MB) fits, two at once do not
        "--max-shm-mb",
        "16",
        "--model-control-mode",
        "explicit",
        *("--load-model", "detector", "--load-model", "classifier", "--load-model", "captioner_decoder"),
    )
    (registry,) = _private_dirs() - before  # the server's own registry, private to it
    assert registry.stat().st_mode & 0o777 == 0o700
    yield s
    assert s.stop() == 0, s.log()
    assert not registry.exists()


@pytest.fixture
def client(srv: RunningServer) -> Iterator[tc.InferenceServerClient]:
    with tc.InferenceServerClient(srv.url) as c:
        yield c
        c.unregister_system_shared_memory()  # every region, whatever the test left


@pytest.fixture
def regions() -> Iterator[list]:
    """Shared-memory objects made with the client's utilities, destroyed (unlinked) after the test."""
    made: list = []
    yield made
    for handle in made:
        shm.destroy_shared_memory_region(handle)


def _key(tag: str) -> str:
    return f"/optic_test_{os.getpid()}_{tag}"


def _make(regions: list, tag: str, size: int):
    handle = shm.create_shared_memory_region(tag, _key(tag), size)
    regions.append(handle)
    return handle


def _code(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


@pytest.fixture
def stub(srv: RunningServer) -> Iterator[service_pb2_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(srv.url) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def _shm_input(region: str, size: int, offset: int = 0, shape: list[int] = SHAPE) -> tc.InferInput:
    inp = tc.InferInput("images", shape, "FP32")
    inp.set_shared_memory(region, size, offset)
    return inp


def test_input_and_output_in_shared_memory_match_onnxruntime(client, regions):
    assert "system_shared_memory" in client.get_server_metadata().extensions
    i, o = _make(regions, "in", X.nbytes), _make(regions, "out", OUT_BYTES)
    shm.set_shared_memory_region(i, [X])
    client.register_system_shared_memory("in", _key("in"), X.nbytes)
    client.register_system_shared_memory("out", _key("out"), OUT_BYTES)
    status = client.get_system_shared_memory_status(as_json=True)["regions"]
    assert status["in"] == {"name": "in", "key": _key("in"), "byte_size": str(X.nbytes)}
    assert status["out"]["byte_size"] == str(OUT_BYTES)

    out = tc.InferRequestedOutput("detections")
    out.set_shared_memory("out", OUT_BYTES)
    result = client.infer("detector", [_shm_input("in", X.nbytes)], outputs=[out])
    tensor = result.get_output("detections")
    assert list(tensor.shape) == OUT_SHAPE and tensor.datatype == "FP32"
    got = shm.get_contents_as_numpy(o, np.float32, OUT_SHAPE)
    np.testing.assert_allclose(got, REF, rtol=1e-4, atol=1e-4)
    # The same tensor sent in the message gives the same answer; an input in shared memory with the output in
    # the message too.
    plain = tc.InferInput("images", SHAPE, "FP32")
    plain.set_data_from_numpy(X)
    np.testing.assert_array_equal(client.infer("detector", [plain]).as_numpy("detections"), got)
    np.testing.assert_array_equal(client.infer("detector", [_shm_input("in", X.nbytes)]).as_numpy("detections"), got)

    client.unregister_system_shared_memory("in")
    assert list(client.get_system_shared_memory_status(as_json=True)["regions"]) == ["out"]
    with pytest.raises(InferenceServerException, match="no shared-memory region named 'in'"):
        client.infer("detector", [_shm_input("in", X.nbytes)])


def test_offsets_within_an_object_and_a_region(client, regions):
    """Two images in one object, a region that starts 4 kB into it, tensors at offsets within the region."""
    lead = 4096
    handle = _make(regions, "pair", lead + 2 * X.nbytes + OUT_BYTES)
    second = np.ascontiguousarray(X[:, :, ::-1])
    shm.set_shared_memory_region(handle, [X, second], offset=lead)
    client.register_system_shared_memory("pair", _key("pair"), 2 * X.nbytes + OUT_BYTES, offset=lead)
    for k, image in enumerate((X, second)):
        out = tc.InferRequestedOutput("detections")
        out.set_shared_memory("pair", OUT_BYTES, offset=2 * X.nbytes)
        client.infer("detector", [_shm_input("pair", X.nbytes, offset=k * X.nbytes)], outputs=[out])
        got = shm.get_contents_as_numpy(handle, np.float32, OUT_SHAPE, offset=lead + 2 * X.nbytes)
        np.testing.assert_allclose(got, DETECTOR.run(None, {"images": image})[0], rtol=1e-4, atol=1e-4)


def test_stream_items_use_shared_memory(client, regions, srv):
    """ModelStreamInfer items with inputs and outputs in shared memory: three classifier images (2.4 MB, inside
    this server's --max-inflight-mb 3 together), each answer written at its own offset."""
    classifier = ort.InferenceSession(str(MODEL_REPO / "classifier" / "1" / "model.onnx"))
    images = np.random.default_rng(6).random((3, 1, 3, 256, 256), dtype=np.float32)
    logits = 4 * classifier.get_outputs()[0].shape[1]
    handle = _make(regions, "stream", images.nbytes + 3 * logits)
    shm.set_shared_memory_region(handle, list(images))
    client.register_system_shared_memory("stream", _key("stream"), images.nbytes + 3 * logits)
    answers: list = []
    with tc.InferenceServerClient(srv.url) as streamer:
        streamer.start_stream(callback=lambda result, error: answers.append(error or result))
        for k in range(3):
            inp = tc.InferInput("images", [1, 3, 256, 256], "FP32")
            inp.set_shared_memory("stream", images[k].nbytes, offset=k * images[k].nbytes)
            out = tc.InferRequestedOutput("logits")
            out.set_shared_memory("stream", logits, offset=images.nbytes + k * logits)
            streamer.async_stream_infer("classifier", [inp], outputs=[out])
        streamer.stop_stream()
    assert len(answers) == 3 and not [a for a in answers if isinstance(a, InferenceServerException)], answers
    for k in range(3):
        got = shm.get_contents_as_numpy(handle, np.float32, [1, logits // 4], offset=images.nbytes + k * logits)
        np.testing.assert_allclose(got, classifier.run(None, {"images": images[k]})[0], rtol=1e-4, atol=1e-4)


def test_registration_errors(client, regions, stub):
    _make(regions, "small", 1000)
    register = lambda **kw: stub.SystemSharedMemoryRegister(pb.SystemSharedMemoryRegisterRequest(**kw))  # noqa: E731
    assert _code(lambda: register(name="a", key="/optic_no_such_object", byte_size=8)) == (
        grpc.StatusCode.NOT_FOUND,
        "no shared-memory object with key '/optic_no_such_object'",
    )
    os.symlink(SHM_DIR / _key("small").lstrip("/"), SHM_DIR / _key("link").lstrip("/"))
    os.mkfifo(SHM_DIR / _key("fifo").lstrip("/"))
    os.mkdir(SHM_DIR / _key("dir").lstrip("/"))
    try:
        for tag in ("link", "fifo", "dir"):  # O_NOFOLLOW, a FIFO opened without waiting, a directory: all refused
            code, message = _code(lambda tag=tag: register(name="a", key=_key(tag), byte_size=8))
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (tag, message)
    finally:
        for tag in ("link", "fifo"):
            os.unlink(SHM_DIR / _key(tag).lstrip("/"))
        os.rmdir(SHM_DIR / _key("dir").lstrip("/"))
    for key in ("/a/b", "/../etc/passwd", "..", ".", "/", "", "/" + "k" * 256, "/a\0b"):
        code, message = _code(lambda key=key: register(name="a", key=key, byte_size=8))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (key, message)
    code, message = _code(lambda: register(name="a", key=_key("small"), byte_size=1001))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "past the end" in message and "(1000 bytes)" in message
    code, message = _code(lambda: register(name="a", key=_key("small"), offset=900, byte_size=101))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "past the end" in message
    assert _code(lambda: register(name="a", key=_key("small"), byte_size=0))[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert _code(lambda: register(name="", key=_key("small"), byte_size=8))[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert (
        _code(lambda: register(name="n" * 256, key=_key("small"), byte_size=8))[0] == grpc.StatusCode.INVALID_ARGUMENT
    )
    _make(regions, "big", 17 << 20)
    code, message = _code(lambda: register(name="big", key=_key("big"), byte_size=17 << 20))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-shm-mb" in message, message
    register(name="a", key=_key("small"), byte_size=1000)
    assert _code(lambda: register(name="a", key=_key("small"), byte_size=10)) == (
        grpc.StatusCode.ALREADY_EXISTS,
        "shared-memory region 'a' is already registered",
    )
    status = lambda name: stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(name=name))  # noqa: E731
    assert _code(lambda: status("b"))[0] == grpc.StatusCode.NOT_FOUND
    stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name="b"))  # unknown: no error
    code, message = _code(
        lambda: stub.CudaSharedMemoryRegister(pb.CudaSharedMemoryRegisterRequest(name="c", byte_size=8))
    )
    assert code == grpc.StatusCode.UNIMPLEMENTED and "system shared memory" in message


def test_region_count_is_bounded(client, regions, stub):
    _make(regions, "many", 64)
    for n in range(256):
        client.register_system_shared_memory(f"r{n}", _key("many"), 64)
    code, message = _code(
        lambda: stub.SystemSharedMemoryRegister(
            pb.SystemSharedMemoryRegisterRequest(name="r256", key=_key("many"), byte_size=64)
        )
    )
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "256 shared-memory regions" in message
    client.unregister_system_shared_memory()
    client.register_system_shared_memory("r256", _key("many"), 64)


def test_infer_errors_name_what_is_wrong(client, regions, stub):
    handle = _make(regions, "in", 4 * X.nbytes)
    shm.set_shared_memory_region(handle, [X])
    client.register_system_shared_memory("in", _key("in"), 4 * X.nbytes)
    client.register_system_shared_memory("tiny", _key("in"), 64)

    def infer(inputs, outputs=None):
        with pytest.raises(InferenceServerException) as info:
            client.infer("detector", inputs, outputs=outputs)
        return info.value.status(), info.value.message()

    status, message = infer([_shm_input("in", X.nbytes - 4)])
    assert status == "StatusCode.INVALID_ARGUMENT" and "shared_memory_byte_size is 1769468" in message
    status, message = infer([_shm_input("in", X.nbytes, offset=3 * X.nbytes + 4)])
    assert status == "StatusCode.INVALID_ARGUMENT" and "past the end of region 'in'" in message
    status, message = infer([_shm_input("nope", X.nbytes)])
    assert status == "StatusCode.NOT_FOUND"
    # A batch of three is 5.3 MB: more than this server's 4 MB message cap, so more than a call may read.
    status, message = infer([_shm_input("in", 3 * X.nbytes, shape=[3, 3, 384, 384])])
    assert status == "StatusCode.RESOURCE_EXHAUSTED" and "--max-message-mb" in message
    out = tc.InferRequestedOutput("detections")
    out.set_shared_memory("tiny", 64)
    status, message = infer([_shm_input("in", X.nbytes)], [out])
    assert status == "StatusCode.INVALID_ARGUMENT" and f"is {OUT_BYTES} bytes" in message
    both = pb.ModelInferRequest(model_name="classifier")  # tritonclient refuses to build this one itself
    both.inputs.add(name="images", datatype="FP32", shape=[1, 3, 256, 256])
    both.raw_input_contents.append(np.zeros([1, 3, 256, 256], np.float32).tobytes())
    wanted = both.outputs.add(name="logits")
    wanted.parameters["classification"].int64_param = 2
    wanted.parameters["shared_memory_region"].string_param = "in"
    wanted.parameters["shared_memory_byte_size"].int64_param = 64
    code, message = _code(lambda: stub.ModelInfer(both))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "'classification' or shared memory" in message

    request = pb.ModelInferRequest(model_name="detector")
    tensor = request.inputs.add(name="images", datatype="FP32", shape=SHAPE)
    tensor.parameters["shared_memory_region"].string_param = "in"
    code, message = _code(lambda: stub.ModelInfer(request))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "needs both" in message
    tensor.parameters["shared_memory_byte_size"].string_param = "1769472"
    code, message = _code(lambda: stub.ModelInfer(request))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "must be a non-negative integer" in message
    tensor.parameters["shared_memory_byte_size"].int64_param = X.nbytes
    tensor.parameters["shared_memory_offset"].int64_param = -4
    code, message = _code(lambda: stub.ModelInfer(request))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "must be a non-negative integer" in message
    del tensor.parameters["shared_memory_offset"]
    tensor.contents.fp32_contents.extend([0.0])
    code, message = _code(lambda: stub.ModelInfer(request))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "typed contents" in message

    # A region that cannot take the output is refused before the model runs.
    runs = client.get_inference_statistics("detector").model_stats[0].inference_count
    out = tc.InferRequestedOutput("detections")
    out.set_shared_memory("tiny", OUT_BYTES)
    status, message = infer([_shm_input("in", X.nbytes)], [out])
    assert status == "StatusCode.INVALID_ARGUMENT" and "past the end of region 'tiny'" in message
    assert client.get_inference_statistics("detector").model_stats[0].inference_count == runs


def test_a_truncated_object_is_refused_and_the_server_lives(client, regions, srv):
    """A mapped object that its owner shrinks kills the mapper with SIGBUS; the server reads instead of mapping."""
    handle = _make(regions, "shrink", X.nbytes)
    shm.set_shared_memory_region(handle, [X])
    client.register_system_shared_memory("shrink", _key("shrink"), X.nbytes)
    client.infer("detector", [_shm_input("shrink", X.nbytes)])
    os.truncate(SHM_DIR / _key("shrink").lstrip("/"), 4096)
    with pytest.raises(InferenceServerException, match="now ends before the region"):
        client.infer("detector", [_shm_input("shrink", X.nbytes)])
    out = tc.InferRequestedOutput("detections")
    out.set_shared_memory("shrink", OUT_BYTES)
    plain = tc.InferInput("images", SHAPE, "FP32")
    plain.set_data_from_numpy(X)
    with pytest.raises(InferenceServerException, match="now ends before the region"):
        client.infer("detector", [plain], outputs=[out])
    assert os.path.getsize(SHM_DIR / _key("shrink").lstrip("/")) == 4096  # never grown by the server
    assert srv.proc.poll() is None and client.is_server_live()


def test_no_descriptor_or_byte_budget_is_left_behind(client, regions, srv):
    handle = _make(regions, "leak", X.nbytes + OUT_BYTES)
    shm.set_shared_memory_region(handle, [X])
    client.register_system_shared_memory("leak", _key("leak"), X.nbytes + OUT_BYTES)
    out = tc.InferRequestedOutput("detections")
    out.set_shared_memory("leak", OUT_BYTES, offset=X.nbytes)
    client.infer("detector", [_shm_input("leak", X.nbytes)], outputs=[out])
    fds = len(os.listdir(f"/proc/{srv.proc.pid}/fd"))
    for _ in range(50):
        client.infer("detector", [_shm_input("leak", X.nbytes)], outputs=[out])
    assert len(os.listdir(f"/proc/{srv.proc.pid}/fd")) <= fds
    text = scrape(srv.metrics_url)
    gauges = {kind: metric_values(text, "optic_admission_inflight", kind=kind) for kind in ("bytes", "inflight")}
    assert gauges == {"bytes": [0.0], "inflight": [0.0]}


def test_off_unless_allowed(server):
    """The default server (no --allow-client-shm) refuses every use, naming the flag."""
    with tc.InferenceServerClient(server.url) as c:
        assert "system_shared_memory" not in c.get_server_metadata().extensions
        assert not c.get_system_shared_memory_status().regions  # Triton answers an empty list too
        for call in (
            lambda: c.register_system_shared_memory("x", "/x", 8),
            lambda: c.unregister_system_shared_memory(),
            lambda: c.infer("detector", [_shm_input("x", X.nbytes)]),
        ):
            with pytest.raises(InferenceServerException) as info:
                call()
            assert info.value.status() == "StatusCode.UNIMPLEMENTED"
            assert "--allow-client-shm" in info.value.message()


def test_admission_counts_shared_memory_bytes():
    admission = Admission(max_inflight=4, max_streams=1, max_inflight_bytes=1000)
    assert admission.enter(10) is None
    assert admission.hold(5000) is None  # a call alone always fits (the caller caps it by the message size)
    assert "--max-inflight-mb" in (admission.enter(10) or "")  # its shared-memory bytes count for the next call
    admission.release(5000)
    assert admission.enter(10) is None
    assert "--max-inflight-mb" in (admission.hold(990) or "")
    assert admission.hold(900) is None
    admission.release(900)
    admission.leave(10)
    admission.leave(10)
    assert admission.bytes == 0 and admission.inflight == 0


def test_workers_share_one_registry(tmp_path, regions):
    """--workers 2: the kernel gives each connection to either worker; a region registered through one connection
    is usable, and unregistered, through every other."""
    s = start_server(
        tmp_path, "--workers", "2", "--allow-client-shm", "--model-control-mode", "explicit", "--load-model", "detector"
    )
    own_connection = [("grpc.use_local_subchannel_pool", 1)]  # a new TCP connection per client
    try:
        assert wait_for(lambda: len(children(s.proc.pid)) == 2, 30)
        workers = children(s.proc.pid)
        assert wait_for(lambda: "serving detector" in s.log().split("[worker 1]")[-1], 60)
        handle = _make(regions, "w", X.nbytes)
        shm.set_shared_memory_region(handle, [X])
        with tc.InferenceServerClient(s.url, channel_args=own_connection) as c:
            c.register_system_shared_memory("w", _key("w"), X.nbytes)
        time.sleep(1)
        before = {w: cpu_seconds(w) for w in workers}
        for _ in range(16):
            with tc.InferenceServerClient(s.url, channel_args=own_connection) as c:
                for _ in range(3):
                    result = c.infer("detector", [_shm_input("w", X.nbytes)])
                    np.testing.assert_allclose(result.as_numpy("detections"), REF, rtol=1e-4, atol=1e-4)
        used = {w: cpu_seconds(w) - before[w] for w in workers}
        assert all(u > 0.05 for u in used.values()), f"a worker served nothing: CPU seconds {used}"
        with tc.InferenceServerClient(s.url, channel_args=own_connection) as c:
            c.unregister_system_shared_memory("w")
        for _ in range(8):
            with (
                tc.InferenceServerClient(s.url, channel_args=own_connection) as c,
                pytest.raises(InferenceServerException, match="no shared-memory region named 'w'"),
            ):
                c.infer("detector", [_shm_input("w", X.nbytes)])
    finally:
        assert s.stop() == 0, s.log()


def test_some_inputs_in_shared_memory_the_rest_raw_or_typed(client, regions, stub):
    """The captioner's decoder step has four inputs: ``features`` in shared memory, the others in the message
    (raw_input_contents then holds one entry per input not in shared memory, in order, as in Triton)."""
    decoder = ort.InferenceSession(str(MODEL_REPO / "captioner_decoder" / "1" / "model.onnx"))
    rng = np.random.default_rng(9)
    feeds = {
        "token": np.array([1, 2], dtype=np.int64),
        "h": rng.standard_normal((2, 192)).astype(np.float32),
        "c": rng.standard_normal((2, 192)).astype(np.float32),
        "features": rng.standard_normal((2, 320, 96)).astype(np.float32),
    }
    want = dict(zip(["logits", "h_out", "c_out"], decoder.run(None, feeds), strict=True))
    handle = _make(regions, "feat", feeds["features"].nbytes)
    shm.set_shared_memory_region(handle, [feeds["features"]])
    client.register_system_shared_memory("feat", _key("feat"), feeds["features"].nbytes)

    made = []
    for name in ("features", "token", "h", "c"):  # the shared-memory input first: raw entries skip it
        array = feeds[name]
        inp = tc.InferInput(name, list(array.shape), "INT64" if name == "token" else "FP32")
        if name == "features":
            inp.set_shared_memory("feat", array.nbytes)
        else:
            inp.set_data_from_numpy(array)  # raw_input_contents
        made.append(inp)
    result = client.infer("captioner_decoder", made)
    for name, array in want.items():
        np.testing.assert_allclose(result.as_numpy(name), array, rtol=1e-4, atol=1e-4)

    # The others as typed contents (tritonclient always sends raw, so the request is built by hand).
    request = pb.ModelInferRequest(model_name="captioner_decoder")
    for name in ("token", "h", "c", "features"):
        array = feeds[name]
        tensor = request.inputs.add(name=name, datatype="INT64" if name == "token" else "FP32", shape=array.shape)
        if name == "features":
            tensor.parameters["shared_memory_region"].string_param = "feat"
            tensor.parameters["shared_memory_byte_size"].int64_param = array.nbytes
        else:
            field = tensor.contents.int64_contents if name == "token" else tensor.contents.fp32_contents
            field.extend(array.ravel().tolist())
    reply = stub.ModelInfer(request)
    for k, output in enumerate(reply.outputs):
        got = np.frombuffer(reply.raw_output_contents[k], np.float32).reshape(output.shape)
        np.testing.assert_allclose(got, want[output.name], rtol=1e-4, atol=1e-4)

    # Typed contents on an input that is also in shared memory are refused, whichever input it is.
    request.inputs[3].contents.fp32_contents.extend(feeds["features"].ravel().tolist())
    code, message = _code(lambda: stub.ModelInfer(request))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "'features' has typed contents" in message


def test_shared_memory_bytes_count_in_the_inflight_budget(client, regions, srv):
    """--max-inflight-mb 3: one 1.77 MB detector input in shared memory fits, two at once do not. The messages
    are a few hundred bytes, so only the shared-memory bytes can cause the refusals."""
    handle = _make(regions, "budget", X.nbytes)
    shm.set_shared_memory_region(handle, [X])
    client.register_system_shared_memory("budget", _key("budget"), X.nbytes)
    outcomes: list[str] = []

    def caller() -> None:
        with tc.InferenceServerClient(srv.url) as own:
            for _ in range(15):
                try:
                    own.infer("detector", [_shm_input("budget", X.nbytes)])
                    outcomes.append("ok")
                except InferenceServerException as exc:
                    outcomes.append(f"{exc.status()} {exc.message()}")

    threads = [threading.Thread(target=caller) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    refused = [o for o in outcomes if o != "ok"]
    assert refused and all("RESOURCE_EXHAUSTED" in o and "--max-inflight-mb" in o for o in refused), refused[:3]
    assert "ok" in outcomes
    client.infer("detector", [_shm_input("budget", X.nbytes)])  # nothing held back: a lone call fits again
