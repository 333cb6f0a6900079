"""KServe v2 over gRPC, driven by the stock Triton client (tritonclient.grpc)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as tc
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from optic.export.data import SHAPES, make_scenes
from optic.server.metadata import ModelMeta
from optic.server.tasks.image import ImageLimits, prepare
from tests.conftest import MODEL_REPO, SIDE

MODEL_FILE = MODEL_REPO / "classifier" / "1" / "model.onnx"


@pytest.fixture(scope="module")
def client(server):
    with tc.InferenceServerClient(server.url) as c:
        yield c


@pytest.fixture(scope="module")
def batch() -> tuple[np.ndarray, np.ndarray]:
    meta = ModelMeta.from_props(ort.InferenceSession(str(MODEL_FILE)).get_modelmeta().custom_metadata_map)
    assert meta.input is not None
    scenes = make_scenes(8, seed=777)
    x = np.stack([prepare(s.encoded, meta.input, ImageLimits()).tensor for s in scenes])  # the server's own path
    return x, np.array([s.label for s in scenes])


def test_health_and_server_metadata(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("classifier")
    assert client.is_model_ready("classifier", "1")
    assert not client.is_model_ready("classifier", "2")
    assert not client.is_model_ready("nope")
    meta = client.get_server_metadata()
    assert meta.name == "optic" and meta.version


def test_model_metadata(client):
    meta = client.get_model_metadata("classifier")
    assert meta.name == "classifier" and list(meta.versions) == ["1"]
    assert meta.platform == "onnxruntime_onnx"
    (inp,) = meta.inputs
    assert (inp.name, inp.datatype, list(inp.shape)) == ("images", "FP32", [-1, 3, SIDE, SIDE])
    (out,) = meta.outputs
    assert (out.name, out.datatype, list(out.shape)) == ("logits", "FP32", [-1, len(SHAPES)])
    as_json = client.get_model_metadata("classifier", as_json=True)
    assert as_json["inputs"][0]["shape"] == ["-1", "3", str(SIDE), str(SIDE)]


def test_infer_matches_onnxruntime(client, batch):
    x, labels = batch
    inp = tc.InferInput("images", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer("classifier", [inp], outputs=[tc.InferRequestedOutput("logits")], request_id="abc")
    logits = result.as_numpy("logits")
    expected = ort.InferenceSession(str(MODEL_FILE)).run(None, {"images": x})[0]
    np.testing.assert_allclose(logits, expected, atol=1e-5)
    assert (logits.argmax(1) == labels).all()
    response = result.get_response()
    assert response.id == "abc" and response.model_name == "classifier" and response.model_version == "1"


def test_infer_typed_contents(server, batch):
    """A request with fp32_contents instead of raw bytes (tritonclient only sends raw)."""
    import grpc

    x, _ = batch
    request = service_pb2.ModelInferRequest(model_name="classifier")
    tensor = request.inputs.add(name="images", datatype="FP32", shape=[2, 3, SIDE, SIDE])
    tensor.contents.fp32_contents.extend(x[:2].ravel().tolist())
    with grpc.insecure_channel(server.url) as ch:
        response = service_pb2_grpc.GRPCInferenceServiceStub(ch).ModelInfer(request, timeout=30)
    got = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(list(response.outputs[0].shape))
    expected = ort.InferenceSession(str(MODEL_FILE)).run(None, {"images": x[:2]})[0]
    np.testing.assert_allclose(got, expected, atol=1e-5)


def _infer_error(
    client, array: np.ndarray, datatype: str = "FP32", name: str = "images", model: str = "classifier", **kwargs
) -> InferenceServerException:
    inp = tc.InferInput(name, list(array.shape), datatype)
    inp.set_data_from_numpy(array)
    with pytest.raises(InferenceServerException) as err:
        client.infer(model, [inp], **kwargs)
    return err.value


@pytest.mark.parametrize(
    ("array", "datatype", "needle"),
    [
        (np.zeros((1, 3, 32, SIDE), np.float32), "FP32", f"expects [-1, 3, {SIDE}, {SIDE}]"),
        (np.zeros((1, SIDE, SIDE), np.float32), "FP32", f"expects [-1, 3, {SIDE}, {SIDE}]"),
        (np.zeros((1, 3, SIDE, SIDE), np.float64), "FP64", "expects FP32"),
        (np.zeros((1, 3, SIDE, SIDE), np.int32), "INT32", "expects FP32"),
        (np.zeros((0, 3, SIDE, SIDE), np.float32), "FP32", "batch of 0"),
        (np.zeros((33, 3, SIDE, SIDE), np.float32), "FP32", "batch of 33"),
    ],
    ids=["wrong-dims", "wrong-rank", "fp64", "int32", "empty-batch", "over-max-batch"],
)
def test_infer_rejects_bad_tensors(client, array, datatype, needle):
    err = _infer_error(client, array, datatype)
    assert err.status() == "StatusCode.INVALID_ARGUMENT", err
    assert needle in err.message()


def test_infer_wrong_byte_length(server):
    import grpc

    request = service_pb2.ModelInferRequest(model_name="classifier")
    request.inputs.add(name="images", datatype="FP32", shape=[1, 3, SIDE, SIDE])
    request.raw_input_contents.append(b"\x00" * (3 * SIDE * SIDE * 4 - 4))
    with grpc.insecure_channel(server.url) as ch, pytest.raises(grpc.RpcError) as err:
        service_pb2_grpc.GRPCInferenceServiceStub(ch).ModelInfer(request, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    need = 3 * SIDE * SIDE * 4
    assert f"{need - 4} bytes" in err.value.details() and f"needs {need}" in err.value.details()


def test_infer_unknown_names(client):
    x = np.zeros((1, 3, SIDE, SIDE), np.float32)
    err = _infer_error(client, x, model="missing")
    assert err.status() == "StatusCode.NOT_FOUND" and "missing" in err.message()
    err = _infer_error(client, x, name="pixels")
    assert err.status() == "StatusCode.INVALID_ARGUMENT" and "no input 'pixels'" in err.message()
    err = _infer_error(client, x, outputs=[tc.InferRequestedOutput("probs")])
    assert err.status() == "StatusCode.INVALID_ARGUMENT" and "no output 'probs'" in err.message()
    err = _infer_error(client, x, model_version="3")
    assert err.status() == "StatusCode.NOT_FOUND" and "version" in err.message()


def test_model_metadata_unknown(client):
    with pytest.raises(InferenceServerException) as err:
        client.get_model_metadata("../../etc/passwd")
    assert err.value.status() == "StatusCode.NOT_FOUND"
    assert client.is_server_live()


@pytest.mark.parametrize("name", ["detector", "segmenter", "captioner_encoder", "captioner_decoder"])
def test_every_default_model_serves_tensors(client, name):
    """Each exported model answers KServe v2 exactly as onnxruntime does in-process, batch of 3."""
    sess = ort.InferenceSession(str(MODEL_REPO / name / "1" / "model.onnx"))
    rng = np.random.default_rng(5)
    feeds, inputs = {}, []
    for arg in sess.get_inputs():
        shape = [3, *arg.shape[1:]]
        value = rng.integers(0, 20, shape) if arg.type == "tensor(int64)" else rng.normal(0, 1, shape)
        feeds[arg.name] = value.astype(np.int64 if arg.type == "tensor(int64)" else np.float32)
        inp = tc.InferInput(arg.name, shape, "INT64" if arg.type == "tensor(int64)" else "FP32")
        inp.set_data_from_numpy(feeds[arg.name])
        inputs.append(inp)
    assert client.is_model_ready(name)
    result = client.infer(name, inputs)
    for arg, want in zip(sess.get_outputs(), sess.run(None, feeds), strict=True):
        np.testing.assert_allclose(result.as_numpy(arg.name), want, rtol=1e-4, atol=1e-4)
