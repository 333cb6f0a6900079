"""optic.v1.Vision/Classify against the real server and the committed classifier."""

from __future__ import annotations

import asyncio
import urllib.request

import grpc
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from optic.export.data import SHAPES, make_scenes
from optic.proto.optic.v1 import vision_pb2 as pb
from optic.proto.optic.v1 import vision_pb2_grpc as pb_grpc
from tests.conftest import encode

SCENES = make_scenes(64, seed=4242)


def classify(server, data: bytes, model: str = "classifier", top_k: int = 3, **kw) -> pb.ClassifyResponse:
    with grpc.insecure_channel(server.url) as ch:
        return pb_grpc.VisionStub(ch).Classify(
            pb.ClassifyRequest(model=model, image=pb.Image(data=data), top_k=top_k, **kw), timeout=30
        )


def scrape(server) -> dict:
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    return {m.name: m for m in text_string_to_metric_families(text)}


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP"])
def test_classify_formats(server, fmt):
    scene = SCENES[0]
    response = classify(server, encode(scene.image, fmt, **({"quality": 95} if fmt == "JPEG" else {})))
    assert response.model == "classifier" and response.model_version == "1"
    assert response.classes[0].label == SHAPES[scene.label]
    scores = [c.score for c in response.classes]
    assert len(scores) == 3 and scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1.0001


def test_classify_resizes_any_size_and_mode(server):
    scene = SCENES[1]
    big = np.asarray(Image.fromarray(scene.image).resize((300, 200), Image.BILINEAR))
    rgba = np.dstack([scene.image, np.full(scene.image.shape[:2], 255, np.uint8)])
    for data in (encode(big, "JPEG", quality=95), encode(rgba, "PNG")):
        assert classify(server, data).classes[0].label == SHAPES[scene.label]


def test_top_k_defaults_and_caps(server):
    data = encode(SCENES[2].image)
    assert len(classify(server, data, top_k=0).classes) == 5  # default
    assert len(classify(server, data, top_k=50).classes) == len(SHAPES)  # capped at the class count


def test_64_concurrent_classify_are_correct_and_batched(server):
    before = scrape(server)["optic_batch_size"]
    images = [encode(s.image) for s in SCENES]
    alone = [classify(server, data, top_k=5) for data in images[:8]]

    async def burst() -> list[pb.ClassifyResponse]:
        async with grpc.aio.insecure_channel(server.url) as ch:
            stub = pb_grpc.VisionStub(ch)
            calls = [
                stub.Classify(pb.ClassifyRequest(model="classifier", image=pb.Image(data=d), top_k=5), timeout=60)
                for d in images
            ]
            return await asyncio.gather(*calls)

    responses = asyncio.run(burst())
    predicted = [r.classes[0].label for r in responses]
    assert predicted == [SHAPES[s.label] for s in SCENES]
    # Batched answers are the same as lone ones (batching must not change results).
    for lone, batched in zip(alone, responses[:8], strict=True):
        assert [c.class_id for c in lone.classes] == [c.class_id for c in batched.classes]
        np.testing.assert_allclose([c.score for c in lone.classes], [c.score for c in batched.classes], atol=1e-5)

    after = scrape(server)["optic_batch_size"]

    def totals(family) -> tuple[float, float, float]:
        values = {
            (s.name, s.labels.get("le")): s.value for s in family.samples if s.labels.get("model") == "classifier"
        }
        return (
            values.get(("optic_batch_size_count", None), 0.0),
            values.get(("optic_batch_size_sum", None), 0.0),
            values.get(("optic_batch_size_bucket", "1.0"), 0.0),
        )

    (count0, sum0, single0), (count1, sum1, single1) = totals(before), totals(after)
    assert sum1 - sum0 == 64 + 8  # every sample went through the batcher exactly once
    multi = (count1 - count0) - (single1 - single0)
    assert multi >= 1, "no batch held more than one request"
    assert count1 - count0 < 64, "the 64 concurrent calls were not batched"


@pytest.mark.parametrize(
    ("data", "code", "needle"),
    [
        (b"definitely not an image", grpc.StatusCode.INVALID_ARGUMENT, "not a JPEG, PNG, WebP or BMP"),
        (b"", grpc.StatusCode.INVALID_ARGUMENT, "empty"),
        (encode(SCENES[3].image)[:200], grpc.StatusCode.INVALID_ARGUMENT, "could not be decoded"),
    ],
    ids=["garbage", "empty", "truncated-png"],
)
def test_bad_images(server, data, code, needle):
    with pytest.raises(grpc.RpcError) as err:
        classify(server, data)
    assert err.value.code() == code
    assert needle in err.value.details()


def test_unknown_model_and_version(server):
    data = encode(SCENES[0].image)
    with pytest.raises(grpc.RpcError) as err:
        classify(server, data, model="no-such-model")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no-such-model" in err.value.details() and "classifier" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        classify(server, data, model_version="7")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "version" in err.value.details()


def test_absurd_top_k(server):
    with pytest.raises(grpc.RpcError) as err:
        classify(server, encode(SCENES[0].image), top_k=10**9)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "top_k" in err.value.details()


def test_server_survives_bad_input(server):
    from grpc_health.v1 import health_pb2

    for _ in range(3):
        with pytest.raises(grpc.RpcError):
            classify(server, b"\x89PNG\r\n\x1a\n" + b"\x00" * 100)
    assert server.health() == health_pb2.HealthCheckResponse.SERVING
    assert classify(server, encode(SCENES[4].image)).classes[0].label == SHAPES[SCENES[4].label]
