"""Ultralytics exports answer through Optic exactly as through Ultralytics' own predictor.

The references (tests/fixtures/ultralytics/, made by Ultralytics 8.4 itself in
its own venv; see its README) are the exported ONNX files, the images, the
arrays its predictor fed to onnxruntime, and its answers. Here each model is
imported with `optic export import` (no hand-written config), served, and
asked through the Vision API; nothing from Ultralytics is imported.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from optic.proto.optic.v1 import vision_pb2 as pb
from optic.proto.optic.v1 import vision_pb2_grpc as pb_grpc
from optic.server.metadata import ModelMeta
from optic.server.tasks.image import ImageLimits, decode_image
from optic.server.tasks.pipelines import resize
from tests.conftest import ROOT, box_iou, start_server

FIXTURES = ROOT / "tests" / "fixtures" / "ultralytics"
DETECTORS = ("det_v8_static", "det_v8_dynamic", "det_v8_nms", "det_y26_e2e", "det_y26_default")
MODELS = (*DETECTORS, "seg_v8_static", "cls_v8_static")


def reference(model: str) -> dict:
    return json.loads((FIXTURES / f"{model}.json").read_text())


@pytest.fixture(scope="module")
def ultralytics_server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("ultralytics_repo")
    for model in MODELS:
        done = subprocess.run(
            [sys.executable, "-m", "optic.server.cli", "export", "import", str(FIXTURES / "models" / f"{model}.onnx"),
             "--out", str(repo)],
            capture_output=True, text=True, timeout=120, cwd=ROOT,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
    srv = start_server(tmp_path_factory.mktemp("ultralytics_log"), repo=repo)
    yield srv, repo
    assert srv.stop() == 0, srv.log()


def stub(srv) -> pb_grpc.VisionStub:
    return pb_grpc.VisionStub(grpc.insecure_channel(srv.url, options=[("grpc.max_receive_message_length", 1 << 26)]))


def matched_share(a_boxes, a_cls, a_conf, b_boxes, b_cls, b_conf) -> float:
    """Share of a's boxes with a box in b of the same class, IoU >= 0.99 and |score difference| <= 1e-3.

    Random-weight heads also emit degenerate boxes (x2 < x1, or no height once clipped); those have no IoU
    with anything, themselves included, so they match by coordinates (within 0.01 px).
    """
    if len(a_boxes) == 0:
        return 1.0
    if len(b_boxes) == 0:
        return 0.0
    a, b = np.asarray(a_boxes, np.float32), np.asarray(b_boxes, np.float32)
    iou = np.maximum(box_iou(a, b), np.abs(a[:, None] - b[None]).max(-1) <= 0.01)
    same = (np.asarray(a_cls)[:, None] == np.asarray(b_cls)[None, :]) & (
        np.abs(np.asarray(a_conf)[:, None] - np.asarray(b_conf)[None, :]) <= 1e-3
    )
    return float(((iou >= 0.99) & same).any(1).mean())


# ---------------------------------------------------------------- the pixels


@pytest.mark.parametrize("model", [*DETECTORS, "seg_v8_static", "cls_v8_static"])
def test_network_input_is_ultralytics_own_bit_for_bit(ultralytics_server, model):
    """Decode + letterbox (or classify transforms) give exactly the array Ultralytics fed onnxruntime."""
    _, repo = ultralytics_server
    import onnxruntime as ort

    props = ort.InferenceSession(str(repo / model / "1" / "model.onnx")).get_modelmeta().custom_metadata_map
    spec = ModelMeta.from_props(props).input
    arrays = np.load(FIXTURES / "inputs.npz")
    run = reference(model)["runs"]["conf0.001_retina" if model.startswith("seg") else "conf0.001"]
    for image, record in run["images"].items():
        if record["pre_key"] is None:
            continue
        decoded = decode_image((FIXTURES / "images" / image).read_bytes(), ImageLimits(), spec)
        assert decoded.pixels.shape[:2] == tuple(record["orig_shape_hw"]), image
        ours, _ = resize(decoded.pixels, spec)
        theirs = arrays[record["pre_key"]][..., ::-1]  # theirs is BGR
        assert ours.shape == theirs.shape, image
        assert np.array_equal(ours, theirs), f"{model} {image}: {np.count_nonzero(ours != theirs)} values differ"


# ---------------------------------------------------------------- detect


@pytest.mark.parametrize("model", DETECTORS)
def test_detect_reproduces_ultralytics_boxes(ultralytics_server, model):
    srv, _ = ultralytics_server
    run = reference(model)["runs"]["conf0.001"]
    args = run["effective_args"]
    forward, backward, total = [], [], 0
    for image, record in run["images"].items():
        request = pb.DetectRequest(
            model=model,
            image=pb.Image(data=(FIXTURES / "images" / image).read_bytes()),
            confidence_threshold=args["conf"],
            iou_threshold=args["iou"],
            max_detections=args["max_det"],
        )
        result = stub(srv).Detect(request, timeout=60).results[0]
        assert (result.height, result.width) == tuple(record["orig_shape_hw"])
        ours = [[d.box.x1, d.box.y1, d.box.x2, d.box.y2] for d in result.detections]
        our_cls = [d.class_id for d in result.detections]
        our_conf = [d.score for d in result.detections]
        theirs, their_cls, their_conf = record["boxes_xyxy"], record["cls"], record["conf"]
        total += len(theirs)
        forward.append(matched_share(theirs, their_cls, their_conf, ours, our_cls, our_conf) * len(theirs))
        backward.append(matched_share(ours, our_cls, our_conf, theirs, their_cls, their_conf) * len(ours))
        assert abs(len(ours) - len(theirs)) <= max(1, 0.01 * len(theirs)), image
    assert total > 20, "the fixture should hold boxes (nms=True exports keep only those above their baked 0.25)"
    print(f"{model}: {total} Ultralytics boxes, matched {sum(forward) / total:.4f} forward, "
          f"{sum(backward) / total:.4f} backward")  # the figures, with -s
    assert sum(forward) / total >= 0.99
    assert sum(backward) / total >= 0.99


def test_detector_defaults_are_ultralytics(ultralytics_server):
    srv, _ = ultralytics_server
    info = stub(srv).ModelMetadata(pb.ModelMetadataRequest(model="det_v8_static"), timeout=10)
    assert info.task == "detect" and info.input.pipeline == "ultralytics"
    assert dict(info.defaults) == {"confidence_threshold": "0.25", "iou_threshold": "0.7", "max_detections": "300"}


def test_default_request_matches_ultralytics_default_predict(ultralytics_server):
    """No thresholds in the request: the model's defaults, the same boxes as Ultralytics' plain predict()."""
    srv, _ = ultralytics_server
    record = reference("det_v8_static")["runs"]["default"]["images"]["fhd_1920x1080.jpg"]
    data = (FIXTURES / "images" / "fhd_1920x1080.jpg").read_bytes()
    request = pb.DetectRequest(model="det_v8_static", image=pb.Image(data=data))
    result = stub(srv).Detect(request, timeout=60).results[0]
    assert len(result.detections) == len(record["boxes_xyxy"])


# ---------------------------------------------------------------- segment


def rle_decode(rle: dict) -> np.ndarray:
    h, w = rle["size"]
    flat = np.zeros(h * w, bool)
    pos, value = 0, False
    for count in rle["counts"]:
        flat[pos : pos + count] = value
        pos, value = pos + count, not value
    return flat.reshape(w, h).T


@pytest.mark.parametrize("run_name", ["conf0.25_retina", "conf0.001_retina"])
def test_segment_masks_match_ultralytics_retina_masks(ultralytics_server, run_name):
    srv, _ = ultralytics_server
    run = reference("seg_v8_static")["runs"][run_name]
    args = run["effective_args"]
    ious, boxes_total, boxes_matched = [], 0, 0
    for image, record in run["images"].items():
        request = pb.SegmentRequest(
            model="seg_v8_static",
            image=pb.Image(data=(FIXTURES / "images" / image).read_bytes()),
            confidence_threshold=args["conf"],
            iou_threshold=args["iou"],
            max_detections=args["max_det"],
        )
        result = stub(srv).Segment(request, timeout=60).results[0]
        h, w = record["orig_shape_hw"]
        ours = list(result.instances)
        assert abs(len(ours) - len(record["boxes_xyxy"])) <= max(1, 0.01 * len(record["boxes_xyxy"])), image
        our_boxes = np.array([[i.box.x1, i.box.y1, i.box.x2, i.box.y2] for i in ours], np.float32).reshape(-1, 4)
        for k, (box, cls) in enumerate(zip(record["boxes_xyxy"], record["cls"], strict=True)):
            boxes_total += 1
            if not len(our_boxes):
                continue
            iou = box_iou(np.array([box], np.float32), our_boxes)[0]
            j = int(iou.argmax())
            if iou[j] < 0.99 or ours[j].class_id != cls:
                continue
            boxes_matched += 1
            if k >= len(record.get("masks_rle", [])):
                continue  # the fixture keeps masks for the first instances only
            theirs = rle_decode(record["masks_rle"][k])
            mine = np.zeros((h, w), bool)
            m = np.asarray(Image.open(__import__("io").BytesIO(ours[j].mask_png))).astype(bool)
            mine[ours[j].mask_y : ours[j].mask_y + m.shape[0], ours[j].mask_x : ours[j].mask_x + m.shape[1]] = m
            union = np.logical_or(mine, theirs).sum()
            ious.append(np.logical_and(mine, theirs).sum() / union if union else 1.0)
            assert ours[j].pixel_count == int(m.sum())
    print(f"seg {run_name}: boxes matched {boxes_matched}/{boxes_total}, {len(ious)} masks, IoU min "
          f"{min(ious):.4f} mean {float(np.mean(ious)):.4f}")  # the figures, with -s
    assert boxes_matched / boxes_total >= 0.99
    assert len(ious) > 20 and min(ious) >= 0.98, sorted(ious)[:5]


# ---------------------------------------------------------------- classify


def test_classify_top5_is_ultralytics_own(ultralytics_server):
    srv, _ = ultralytics_server
    run = reference("cls_v8_static")["runs"]["conf0.001"]
    for image, record in run["images"].items():
        request = pb.ClassifyRequest(
            model="cls_v8_static", image=pb.Image(data=(FIXTURES / "images" / image).read_bytes()), top_k=5
        )
        classes = stub(srv).Classify(request, timeout=30).classes
        assert [c.class_id for c in classes] == record["top5"], image
        np.testing.assert_allclose([c.score for c in classes], record["top5conf"], atol=1e-5)


# ---------------------------------------------------------------- import never guesses


def test_ultralytics_task_names_are_accepted(tmp_path):
    for task in ("detect", "detection"):
        source = FIXTURES / "models" / "det_v8_static.onnx"
        done = subprocess.run(
            [sys.executable, "-m", "optic.server.cli", "export", "import", str(source), "--task", task,
             "--out", str(tmp_path / task)],
            capture_output=True, text=True, timeout=120, cwd=ROOT,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr


def write_labels(path: Path, n: int) -> Path:
    path.write_text("\n".join(f"c{i}" for i in range(n)))
    return path


def yolo_like(path: Path, out_dims: tuple[int, int], names: int, extra: dict[str, str] | None = None) -> Path:
    """A tiny graph with a symbolic batch and an output of ``[N, *out_dims]`` sliced from its input, and
    Ultralytics-style metadata for ``names`` classes."""
    import onnx
    from onnx import TensorProto, helper

    a, b = out_dims
    need = a * b
    side = int(np.ceil(np.sqrt(need / 3)))
    init = [
        helper.make_tensor("starts", TensorProto.INT64, [4], [0, 0, 0, 0]),
        helper.make_tensor("ends", TensorProto.INT64, [4], [2**62, 3, side, side]),
        helper.make_tensor("flat", TensorProto.INT64, [2], [0, -1]),
        helper.make_tensor("first", TensorProto.INT64, [1], [0]),
        helper.make_tensor("count", TensorProto.INT64, [1], [need]),
        helper.make_tensor("axis", TensorProto.INT64, [1], [1]),
        helper.make_tensor("shape", TensorProto.INT64, [3], [0, a, b]),
    ]
    nodes = [
        helper.make_node("Slice", ["images", "starts", "ends"], ["crop"]),
        helper.make_node("Reshape", ["crop", "flat"], ["rows"]),
        helper.make_node("Slice", ["rows", "first", "count", "axis"], ["cut"]),
        helper.make_node("Reshape", ["cut", "shape"], ["output0"]),
    ]
    graph = helper.make_graph(
        nodes, "yolo_like",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 64, 64])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, ["batch", "d1", "d2"])],
        init,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    meta = {"names": str({i: f"c{i}" for i in range(names)}), "imgsz": "[64, 64]", "task": "detect", **(extra or {})}
    for k, v in meta.items():
        model.metadata_props.add(key=k, value=v)
    onnx.save(model, str(path))
    return path


BAD_MODELS = {
    # name: (output dims, classes, extra metadata, phrase of the refusal)
    "wrong_class_count": (
        (6, 32),
        3,
        {},
        "output [1, 6, 32] does not fit the yolov8 layout for 3 labels (expected [N, 7, A])",
    ),
    "wrong_layout": (
        (7, 32),
        3,
        {"optic.output.layout": "yolov5"},
        "does not fit the yolov5 layout for 3 labels (expected [N, A, 8]; it fits yolov8)",
    ),
    "classify_labels": ((5, 1), 3, {"task": "classify"}, "has no axis of 3 classes for 3 labels"),
}


@pytest.mark.parametrize("case", sorted(BAD_MODELS))
def test_import_refuses_outputs_that_do_not_fit_in_one_line(tmp_path, case):
    dims, names, extra, phrase = BAD_MODELS[case]
    source = yolo_like(tmp_path / f"{case}.onnx", dims, names, extra)
    done = subprocess.run(
        [sys.executable, "-m", "optic.server.cli", "export", "import", str(source), "--out", str(tmp_path / "repo")],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and phrase in done.stderr, done.stderr
    assert not (tmp_path / "repo").exists(), "nothing is written on refusal"


def test_symbolic_yolov8_output_is_read_the_right_way_round(tmp_path):
    """The issue's case: [N, 6, 64] with 2 labels is YOLOv8's [N, 4+C, A], not YOLOv5's [N, A, 5+C]."""
    source = yolo_like(tmp_path / "two.onnx", (6, 64), 2)
    done = subprocess.run(
        [sys.executable, "-m", "optic.server.cli", "export", "import", str(source), "--out", str(tmp_path / "repo")],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    import onnxruntime as ort

    props = ort.InferenceSession(str(tmp_path / "repo" / "two" / "1" / "model.onnx")).get_modelmeta()
    assert ModelMeta.from_props(props.custom_metadata_map).output_layout == "yolov8"


def test_load_refuses_the_same_models_and_serves_the_rest(tmp_path):
    """Dropped straight into a repository (no import), each bad model is UNAVAILABLE with the reason."""
    repo = tmp_path / "repo"
    for case, (dims, names, extra, _) in BAD_MODELS.items():
        (repo / case / "1").mkdir(parents=True)
        yolo_like(repo / case / "1" / "model.onnx", dims, names, extra)
    good = repo / "good" / "1"
    good.mkdir(parents=True)
    yolo_like(good / "model.onnx", (7, 32), 3)
    srv = start_server(tmp_path, repo=repo)
    try:
        from optic.proto.inference import grpc_service_pb2 as kpb
        from optic.proto.inference import grpc_service_pb2_grpc as kpb_grpc

        channel = grpc.insecure_channel(srv.url)
        index = kpb_grpc.GRPCInferenceServiceStub(channel).RepositoryIndex(kpb.RepositoryIndexRequest(), timeout=10)
        states = {m.name: (m.state, m.reason) for m in index.models}
        assert states["good"][0] == "READY"
        for case, (*_, phrase) in BAD_MODELS.items():
            state, reason = states[case]
            assert state == "UNAVAILABLE" and phrase in reason, (case, reason)
        with pytest.raises(grpc.RpcError) as err:
            request = pb.DetectRequest(
                model="wrong_layout", image=pb.Image(data=(FIXTURES / "images" / "tiny_97x61.png").read_bytes())
            )
            stub(srv).Detect(request, timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "the yolov5 layout" in err.value.details()
    finally:
        assert srv.stop() == 0, srv.log()
