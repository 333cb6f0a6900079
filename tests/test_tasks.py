"""optic.v1.Vision for every task, end to end through the real server on the committed models and known scenes."""

from __future__ import annotations

import asyncio
import io
import json
import math
import subprocess
import sys
import urllib.request

import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper
from PIL import Image

from optic.client.vision import VisionClient
from optic.export import captioner, detector, segmenter
from optic.export.data import SHAPES, make_scenes
from optic.proto.inference import grpc_service_pb2 as kpb
from optic.proto.optic.v1 import vision_pb2 as pb
from optic.proto.optic.v1 import vision_pb2_grpc as pb_grpc
from tests.conftest import MODEL_REPO, ROOT, SIDE, box_iou, encode, start_server

DET_SCENES = make_scenes(12, seed=detector.TEST_SEED + 1, **detector.SCENE_ARGS)
SEG_SCENES = make_scenes(8, seed=segmenter.TEST_SEED + 1, size=64)
CAP_SCENES = make_scenes(8, seed=captioner.TEST_SEED + 1, **captioner.SCENE_ARGS)


def stub(server) -> pb_grpc.VisionStub:
    return pb_grpc.VisionStub(grpc.insecure_channel(server.url))


def up(image: np.ndarray, factor: int) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((image.shape[1] * factor, image.shape[0] * factor)))


def truth_boxes(scene, factor: float = 1.0) -> np.ndarray:
    return np.array([o.bbox for o in scene.objects], np.float32) * factor


def matched(result, scene, factor: float = 1.0, min_iou: float = 0.6) -> float:
    """Share of ground-truth objects found with the right label and IoU >= min_iou."""
    truth = truth_boxes(scene, factor)
    found = np.array([[d.box.x1, d.box.y1, d.box.x2, d.box.y2] for d in result.detections], np.float32)
    if not len(found):
        return 0.0
    iou = box_iou(truth, found)
    hits = 0
    for i, obj in enumerate(scene.objects):
        j = int(iou[i].argmax())
        hits += iou[i, j] >= min_iou and result.detections[j].label == obj.shape
    return hits / len(truth)


# ---------------------------------------------------------------- Detect


def test_detect_finds_the_shapes_in_original_pixels(server):
    s = stub(server)
    for factor in (1, 3):  # 96x96 as trained, and 288x288 (boxes must scale back by 3)
        request = pb.DetectRequest(
            model="detector", images=[pb.Image(data=encode(up(x.image, factor))) for x in DET_SCENES]
        )
        response = s.Detect(request, timeout=60)
        assert response.model == "detector" and len(response.results) == len(DET_SCENES)
        recall = np.mean([matched(r, sc, factor) for r, sc in zip(response.results, DET_SCENES, strict=True)])
        assert recall >= 0.85, recall
        for r in response.results:
            assert (r.width, r.height) == (96 * factor, 96 * factor)
            assert all(
                0 <= d.box.x1 < d.box.x2 <= r.width and 0 <= d.box.y1 < d.box.y2 <= r.height for d in r.detections
            )
            scores = [d.score for d in r.detections]
            assert scores == sorted(scores, reverse=True)


def test_detect_letterboxes_non_square_images(server):
    # The scene in the middle of a wider canvas: letterboxing must map boxes back to the canvas.
    scene = DET_SCENES[0]
    canvas = np.zeros((96, 192, 3), np.uint8)
    canvas[:] = scene.image[:, :1].mean(0).astype(np.uint8)  # extend the background colour
    canvas[:, 48:144] = scene.image
    result = stub(server).Detect(pb.DetectRequest(model="detector", image=pb.Image(data=encode(canvas))), timeout=30)
    truth = truth_boxes(scene) + np.array([48, 0, 48, 0], np.float32)
    found = np.array([[d.box.x1, d.box.y1, d.box.x2, d.box.y2] for d in result.results[0].detections])
    assert len(found) and box_iou(truth, found).max(1).min() > 0.5


def test_detect_options(server):
    s = stub(server)
    image = pb.Image(data=encode(DET_SCENES[1].image))
    loose = s.Detect(pb.DetectRequest(model="detector", image=image, confidence_threshold=0.01), timeout=30)
    strict = s.Detect(pb.DetectRequest(model="detector", image=image, confidence_threshold=0.9), timeout=30)
    assert len(loose.results[0].detections) >= len(strict.results[0].detections)
    assert all(d.score >= 0.9 for d in strict.results[0].detections)
    one = s.Detect(
        pb.DetectRequest(model="detector", image=image, confidence_threshold=0.01, max_detections=1), timeout=30
    )
    assert len(one.results[0].detections) == 1
    only = s.Detect(
        pb.DetectRequest(model="detector", image=image, confidence_threshold=0.01, class_ids=[2]), timeout=30
    )
    assert {d.class_id for d in only.results[0].detections} <= {2}
    agnostic = s.Detect(
        pb.DetectRequest(model="detector", image=image, confidence_threshold=0.01, class_agnostic=True), timeout=30
    )
    assert len(agnostic.results[0].detections) <= len(loose.results[0].detections)


def test_detect_stream_in_order_with_bad_frames_in_band(server):
    frames = [encode(sc.image) for sc in DET_SCENES] * 2
    frames[5] = b"not an image"

    def requests():
        for i, data in enumerate(frames):
            yield pb.DetectFrame(
                frame_id=1000 + i, request=pb.DetectRequest(model="detector", image=pb.Image(data=data))
            )

    answers = list(stub(server).DetectStream(requests(), timeout=60))
    assert [a.frame_id for a in answers] == [1000 + i for i in range(len(frames))]
    assert answers[5].error_code == "INVALID_ARGUMENT" and "not a JPEG, PNG" in answers[5].error_message
    good = [a for i, a in enumerate(answers) if i != 5]
    assert all(not a.error_code and len(a.response.results) == 1 for a in good)
    assert matched(answers[0].response.results[0], DET_SCENES[0]) >= 0.5


@pytest.mark.parametrize("method", ["DetectStream", "ModelStreamInfer"])
def test_an_undecodable_stream_item_ends_its_stream_by_name(server, method):
    """A stream item that is not a valid message: the item before it is answered, then INVALID_ARGUMENT names
    it. (The stream used to end there with OK, the items after it dropped without a word.)"""
    if method == "DetectStream":
        image = pb.Image(data=encode(DET_SCENES[0].image))
        good = pb.DetectFrame(frame_id=7, request=pb.DetectRequest(model="detector", image=image))
        path, parse = "/optic.v1.Vision/DetectStream", pb.DetectFrameResult.FromString
    else:
        good = kpb.ModelInferRequest(model_name="classifier", id="7")
        good.inputs.add(name="images", datatype="FP32", shape=[1, 3, SIDE, SIDE])
        good.raw_input_contents.append(np.zeros((1, 3, SIDE, SIDE), np.float32).tobytes())
        path, parse = "/inference.GRPCInferenceService/ModelStreamInfer", kpb.ModelStreamInferResponse.FromString
    corrupt = b"\x0a\xff\xff\xff"  # field 1, length-delimited, then a length that never ends
    answers = []
    with grpc.insecure_channel(server.url) as ch:
        items = [good.SerializeToString(), corrupt, good.SerializeToString()]
        replies = ch.stream_stream(path)(iter(items), timeout=60)
        with pytest.raises(grpc.RpcError) as failed:
            answers.extend(parse(r) for r in replies)
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT, failed.value
    assert "stream item 1" in failed.value.details() and "not a valid" in failed.value.details()
    assert len(answers) == 1
    if method == "DetectStream":
        assert answers[0].frame_id == 7 and not answers[0].error_code and len(answers[0].response.results) == 1
    else:
        assert not answers[0].error_message and answers[0].infer_response.id == "7"


def yolov5_from_ours(path):
    """Our detector (YOLOv8 layout ``[N, 4+C, A]``) rewritten in the YOLOv5 layout ``[N, A, 5+C]`` with an
    objectness of 1: the same boxes through the other decoder."""
    model = onnx.load(str(MODEL_REPO / "detector" / "1" / "model.onnx"))
    graph = model.graph
    out = graph.output[0].name
    c = len(SHAPES)

    def const(name, values, kind=onnx.TensorProto.INT64):
        graph.initializer.append(helper.make_tensor(name, kind, [len(values)], values))

    const("s0", [0]), const("s1", [1]), const("s4", [4]), const("send", [4 + c]), const("ax", [2])
    const("one", [1.0], onnx.TensorProto.FLOAT), const("zero", [0.0], onnx.TensorProto.FLOAT)
    graph.node.extend(
        [
            helper.make_node("Transpose", [out], ["rows"], perm=[0, 2, 1]),
            helper.make_node("Slice", ["rows", "s0", "s4", "ax"], ["box"]),
            helper.make_node("Slice", ["rows", "s4", "send", "ax"], ["cls"]),
            helper.make_node("Slice", ["rows", "s0", "s1", "ax"], ["first"]),
            helper.make_node("Mul", ["first", "zero"], ["nothing"]),
            helper.make_node("Add", ["nothing", "one"], ["obj"]),
            helper.make_node("Concat", ["box", "obj", "cls"], ["output0"], axis=2),
        ]
    )
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("output0", onnx.TensorProto.FLOAT, ["batch", "anchors", 5 + c]))
    for p in model.metadata_props:
        if p.key == "optic.output.layout":
            p.value = "yolov5"
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True)
    onnx.save(model, str(path))


def test_yolov5_layout_detector_is_decoded_the_same(server, tmp_path):
    repo = tmp_path / "repo"
    yolov5_from_ours(repo / "yolo" / "1" / "model.onnx")
    assert ort.InferenceSession(str(repo / "yolo" / "1" / "model.onnx")).get_outputs()[0].shape[2] == 5 + len(SHAPES)
    other = start_server(tmp_path, repo=repo)
    try:
        images = [pb.Image(data=encode(sc.image)) for sc in DET_SCENES[:6]]
        theirs = stub(other).Detect(pb.DetectRequest(model="yolo", images=images), timeout=60).results
        ours = stub(server).Detect(pb.DetectRequest(model="detector", images=images), timeout=60).results
        for a, b in zip(theirs, ours, strict=True):
            assert [(d.label, round(d.score, 4)) for d in a.detections] == [
                (d.label, round(d.score, 4)) for d in b.detections
            ]
            for x, y in zip(a.detections, b.detections, strict=True):
                assert abs(x.box.x1 - y.box.x1) < 1e-3 and abs(x.box.y2 - y.box.y2) < 1e-3
    finally:
        assert other.stop() == 0


# ---------------------------------------------------------------- Segment


def decode_rle(counts, height, width):
    flat = np.zeros(height * width, np.uint8)
    pos, value = 0, 0
    for n in counts:
        flat[pos : pos + n] = value
        pos, value = pos + n, 1 - value
    return flat.reshape(width, height).T


def test_segment_mask_matches_the_scene(server):
    s = stub(server)
    response = s.Segment(
        pb.SegmentRequest(
            model="segmenter", images=[pb.Image(data=encode(sc.image)) for sc in SEG_SCENES], return_rle=True
        ),
        timeout=60,
    )
    ious = []
    for result, scene in zip(response.results, SEG_SCENES, strict=True):
        mask = np.asarray(Image.open(io.BytesIO(result.mask_png)))
        assert mask.shape == (64, 64) and (result.width, result.height) == (64, 64)
        fg_pred, fg_true = mask > 0, scene.mask > 0
        ious.append((fg_pred & fg_true).sum() / max(1, (fg_pred | fg_true).sum()))
        assert sum(c.pixel_count for c in result.classes) == 64 * 64
        for c in result.classes:
            assert c.label == segmenter.LABELS[c.class_id] and c.pixel_count == (mask == c.class_id).sum()
            np.testing.assert_array_equal(decode_rle(c.rle_counts, 64, 64), mask == c.class_id)
    assert np.mean(ious) > 0.85, ious


def test_segment_returns_the_original_size(server):
    scene = SEG_SCENES[0]
    wide = np.asarray(Image.fromarray(scene.image).resize((160, 96), Image.NEAREST))  # stretch: 2.5x, 1.5x
    result = stub(server).Segment(pb.SegmentRequest(model="segmenter", image=pb.Image(data=encode(wide))), timeout=30)
    mask = np.asarray(Image.open(io.BytesIO(result.results[0].mask_png)))
    assert mask.shape == (96, 160)
    truth = np.asarray(Image.fromarray(scene.mask).resize((160, 96), Image.NEAREST)) > 0
    # aligned with the stretched truth (a mask of the wrong size or offset by a few pixels scores far lower; the
    # 64x64 scene stretched 2.5x with nearest-neighbour edges is harder than the model's usual input)
    assert ((mask > 0) & truth).sum() / ((mask > 0) | truth).sum() > 0.7


# ---------------------------------------------------------------- Caption


def reference_captions(images: np.ndarray) -> list[str]:
    enc = ort.InferenceSession(str(MODEL_REPO / captioner.ENCODER / "1" / "model.onnx"))
    dec = ort.InferenceSession(str(MODEL_REPO / captioner.DECODER / "1" / "model.onnx"))
    return captioner.greedy_decode(enc, dec, images)


def test_caption_greedy_equals_the_reference_decoder(server):
    x, _ = captioner._data(8, captioner.TEST_SEED + 1)
    want = reference_captions(x)
    response = stub(server).Caption(
        pb.CaptionRequest(model="captioner", images=[pb.Image(data=encode(sc.image)) for sc in CAP_SCENES]), timeout=60
    )
    got = [r.text for r in response.results]
    assert got == want
    assert sum(g == sc.caption for g, sc in zip(got, CAP_SCENES, strict=True)) >= 5  # and mostly right
    for r in response.results:
        assert r.text == " ".join(t.text for t in r.tokens)
        assert all(t.log_prob <= 0 for t in r.tokens) and r.log_prob <= sum(t.log_prob for t in r.tokens) + 1e-6


def test_caption_beam_search(server):
    s = stub(server)
    for sc in CAP_SCENES[:4]:
        image = pb.Image(data=encode(sc.image))
        greedy = s.Caption(pb.CaptionRequest(model="captioner", image=image), timeout=30).results[0]
        one = s.Caption(pb.CaptionRequest(model="captioner", image=image, beam_size=1), timeout=30).results[0]
        beam = s.Caption(pb.CaptionRequest(model="captioner", image=image, beam_size=4), timeout=30).results[0]
        assert one.text == greedy.text
        assert all(w in captioner.VOCAB for w in beam.text.split())
        n_beam, n_greedy = len(beam.tokens) + 1, len(greedy.tokens) + 1
        assert beam.log_prob / n_beam >= greedy.log_prob / n_greedy - 1e-4  # at least as good per token
    short = s.Caption(pb.CaptionRequest(model="captioner", image=image, max_length=2), timeout=30).results[0]
    assert len(short.tokens) <= 2


def test_concurrent_captions_share_decoder_batches(server):
    def batches():
        text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
        rows = [
            line for line in text.splitlines() if line.startswith("optic_batch_size_") and "captioner_decoder" in line
        ]
        get = lambda suffix: sum(float(r.split()[-1]) for r in rows if r.startswith("optic_batch_size_" + suffix))  # noqa: E731
        ones = sum(float(r.split()[-1]) for r in rows if 'le="1.0"' in r)
        return get("count"), get("sum"), ones

    before = batches()

    async def run():
        async with grpc.aio.insecure_channel(server.url) as ch:
            s = pb_grpc.VisionStub(ch)
            calls = [
                s.Caption(pb.CaptionRequest(model="captioner", image=pb.Image(data=encode(sc.image))), timeout=60)
                for sc in CAP_SCENES * 3
            ]
            return await asyncio.gather(*calls)

    results = asyncio.run(run())
    assert all(r.results[0].text for r in results)
    count, total, _ = (a - b for a, b in zip(batches(), before, strict=True))
    assert total / count > 1.5, (count, total)  # steps of different requests ran together


# ---------------------------------------------------------------- shared: batch calls, raw pixels, client, CLI


def test_classify_several_images_and_raw_pixels(server):
    scenes = make_scenes(3, seed=99)
    raw = pb.Image(raw=pb.RawImage(height=64, width=64, channels=3, pixels=scenes[2].image.tobytes()))
    rgba = np.dstack([scenes[1].image, np.full((64, 64), 255, np.uint8)])
    response = stub(server).Classify(
        pb.ClassifyRequest(
            model="classifier",
            image=pb.Image(data=encode(scenes[0].image)),
            images=[pb.Image(raw=pb.RawImage(height=64, width=64, channels=4, pixels=rgba.tobytes())), raw],
            top_k=1,
        ),
        timeout=30,
    )
    assert [r.classes[0].label for r in response.results] == [SHAPES[s.label] for s in scenes]
    assert list(response.classes) == list(response.results[0].classes)


def test_typed_client(server):
    scene = DET_SCENES[2]
    with VisionClient(server.url) as client:
        found = client.detect(scene.image)  # raw pixels
        assert found and found[0].label in SHAPES and len(found[0].box) == 4
        seg = client.segment(encode(SEG_SCENES[0].image), rle=True)
        assert seg.mask.shape == (64, 64) and set(seg.rle) == set(seg.pixel_counts)
        cap = client.caption(encode(CAP_SCENES[0].image), beam_size=3)
        assert cap.text and all(p <= 0 for _, p in cap.tokens)
        frames = list(client.detect_stream([sc.image for sc in DET_SCENES[:4]]))
        assert [i for i, _ in frames] == [0, 1, 2, 3]
        assert client.classify_many([encode(s.image) for s in SEG_SCENES[:2]], top_k=2)[1][0].score > 0


@pytest.mark.parametrize("task", ["classify", "detect", "segment", "caption"])
def test_optic_infer_cli(server, tmp_path, task):
    image = tmp_path / "scene.png"
    scene = {"classify": SEG_SCENES[0], "detect": DET_SCENES[0], "segment": SEG_SCENES[0], "caption": CAP_SCENES[0]}[
        task
    ]
    image.write_bytes(encode(scene.image))
    vis = tmp_path / "vis"
    cmd = [sys.executable, "-m", "optic.server.cli", "infer", "--url", server.url, "--task", task, str(image), "--json"]
    result = subprocess.run([*cmd, "--save-vis", str(vis)], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)[str(image)]
    assert answer
    drawn = Image.open(vis / f"scene.{task}.png")
    assert drawn.width == 64 or drawn.width == 96
    if task == "caption":
        assert answer["text"] == scene.caption or answer["text"]


# ---------------------------------------------------------------- bad input


def _truncated_jpeg() -> bytes:
    return encode(DET_SCENES[0].image, "JPEG")[:300]


BAD = [
    ("Detect", pb.DetectRequest(model="detector"), "no image in the request"),
    ("Detect", pb.DetectRequest(model="detector", image=pb.Image()), "image 0 is empty"),
    ("Detect", pb.DetectRequest(model="detector", image=pb.Image(data=b"")), "image data is empty"),
    ("Detect", pb.DetectRequest(model="detector", image=pb.Image(data=_truncated_jpeg())), "could not be decoded"),
    (
        "Detect",
        pb.DetectRequest(model="detector", image=pb.Image(data=encode(np.zeros((1, 1, 3), np.uint8)))),
        "at least 8",
    ),
    (
        "Detect",
        pb.DetectRequest(model="detector", image=pb.Image(raw=pb.RawImage(height=100000, width=100000, channels=3))),
        "pixels; the limit",
    ),
    (
        "Detect",
        pb.DetectRequest(
            model="detector", image=pb.Image(raw=pb.RawImage(height=64, width=64, channels=1, pixels=bytes(4096)))
        ),
        "1 channel(s); models take RGB",
    ),
    (
        "Detect",
        pb.DetectRequest(
            model="detector", image=pb.Image(raw=pb.RawImage(height=64, width=64, channels=3, pixels=bytes(10)))
        ),
        "needs 12288 bytes, got 10",
    ),
    (
        "Detect",
        pb.DetectRequest(model="classifier", image=pb.Image(data=encode(DET_SCENES[0].image))),
        "Detect needs a detection model",
    ),
    (
        "Segment",
        pb.SegmentRequest(model="detector", image=pb.Image(data=encode(DET_SCENES[0].image))),
        "Segment needs a segmentation",
    ),
    (
        "Caption",
        pb.CaptionRequest(model="classifier", image=pb.Image(data=encode(DET_SCENES[0].image))),
        "Caption needs a captioning",
    ),
    (
        "Detect",
        pb.DetectRequest(model="detector", image=pb.Image(data=b"x"), confidence_threshold=1.5),
        "within [0, 1]",
    ),
    ("Detect", pb.DetectRequest(model="detector", image=pb.Image(data=b"x"), iou_threshold=-0.1), "within [0, 1]"),
    (
        "Detect",
        pb.DetectRequest(model="detector", image=pb.Image(data=b"x"), confidence_threshold=math.nan),
        "within [0, 1]",
    ),
    ("Detect", pb.DetectRequest(model="detector", image=pb.Image(data=b"x"), max_detections=0), "max_detections 0"),
    (
        "Detect",
        pb.DetectRequest(model="detector", image=pb.Image(data=b"x"), class_ids=[99]),
        "class id(s) [99] out of range",
    ),
    (
        "Caption",
        pb.CaptionRequest(model="captioner", image=pb.Image(data=b"x"), beam_size=0),
        "beam_size 0 must be 1 to 16",
    ),
    ("Caption", pb.CaptionRequest(model="captioner", image=pb.Image(data=b"x"), beam_size=99), "beam_size 99"),
    ("Caption", pb.CaptionRequest(model="captioner", image=pb.Image(data=b"x"), max_length=0), "max_length 0"),
    ("Caption", pb.CaptionRequest(model="captioner", image=pb.Image(data=b"x"), max_length=500), "max_length 500"),
    ("Classify", pb.ClassifyRequest(model="classifier", images=[pb.Image(data=b"x")] * 65), "65 images in one request"),
]


@pytest.mark.parametrize(("method", "request_", "needle"), BAD, ids=[f"{m}-{i}" for i, (m, _, _) in enumerate(BAD)])
def test_bad_vision_input(server, method, request_, needle):
    with pytest.raises(grpc.RpcError) as err:
        getattr(stub(server), method)(request_, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert needle in err.value.details()
    assert server.proc.poll() is None


def test_unknown_caption_model(server):
    with pytest.raises(grpc.RpcError) as err:
        stub(server).Caption(pb.CaptionRequest(model="poet", image=pb.Image(data=b"x")), timeout=30)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
