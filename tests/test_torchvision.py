"""torchvision checkpoints converted with `optic export convert --arch ...` see their weights' own pixels.

The reference is torchvision itself: ``weights.transforms()(pil_image)`` for
the input tensor, the torch model in this process for the logits. The
checkpoints are randomly initialised ``state_dict`` files, as a user's would
sit in their torch cache; nothing is downloaded.
"""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from optic.export import torchvision_models as tvm
from optic.server.metadata import ModelMeta
from optic.server.tasks.image import ImageLimits, prepare
from tests.conftest import ROOT, encode, start_server

tv = tvm.torchvision()
SERVED = ("resnet18", "mobilenet_v3_large", "efficientnet_b0", "vit_b_16", "lraspp_mobilenet_v3_large", "fcn_resnet50")


def photos() -> list[bytes]:
    """JPEG and PNG images of awkward sizes: landscape, portrait, odd, smaller than the crop."""
    rng = np.random.default_rng(5)
    out = []
    for h, w, fmt in ((480, 640, "JPEG"), (517, 333, "PNG"), (301, 999, "JPEG"), (150, 120, "PNG")):
        low = rng.integers(0, 256, (8, 10, 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(low).resize((w, h), Image.Resampling.BICUBIC))
        out.append(encode(img, fmt, **({"quality": 90} if fmt == "JPEG" else {})))
    return out


@pytest.mark.parametrize("arch", tvm.ARCHS)
def test_input_tensor_equals_the_weights_transforms(arch):
    weights = tvm.weights_of(arch)
    spec = tvm.input_spec(weights)
    reference = weights.transforms()
    for data in photos():
        ours = prepare(data, spec, ImageLimits()).tensor
        theirs = reference(Image.open(io.BytesIO(data)).convert("RGB")).numpy()
        assert ours.shape == theirs.shape
        assert np.abs(ours - theirs).max() <= 1e-6, f"{arch}: {np.abs(ours - theirs).max()}"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Random-weight checkpoints of the served architectures, converted into one repository and served."""
    tmp = tmp_path_factory.mktemp("torchvision")
    repo = tmp / "repo"
    models = {}
    for i, arch in enumerate(SERVED):
        torch.manual_seed(i)
        kwargs = {"weights_backbone": None} if arch in tvm.SEGMENTATION else {}
        model = tv.models.get_model(arch, weights=None, **kwargs).eval()
        torch.save(model.state_dict(), tmp / f"{arch}.pth")
        done = subprocess.run(
            [sys.executable, "-m", "optic.server.cli", "export", "convert", str(tmp / f"{arch}.pth"), "--arch", arch,
             "--out", str(repo)],
            capture_output=True, text=True, timeout=300, cwd=ROOT,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        models[arch] = model
    srv = start_server(tmp, "--max-batch-size", "2", repo=repo)
    yield srv, repo, models
    assert srv.stop() == 0, srv.log()


@pytest.mark.parametrize("arch", SERVED)
def test_served_logits_equal_torch(converted, arch):
    import tritonclient.grpc as tc

    srv, repo, models = converted
    import onnxruntime as ort

    meta = ModelMeta.from_props(
        ort.InferenceSession(str(repo / arch / "1" / "model.onnx")).get_modelmeta().custom_metadata_map
    )
    assert meta.input is not None and meta.input.pipeline == "torchvision"
    client = tc.InferenceServerClient(srv.url)
    for data in photos()[:2]:
        x = prepare(data, meta.input, ImageLimits()).tensor[None]
        inp = tc.InferInput("images", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        served = client.infer(arch, [inp]).as_numpy("logits")
        with torch.no_grad():
            out = models[arch](torch.from_numpy(x))
        expected = (out["out"] if isinstance(out, dict) else out).numpy()
        scale = max(1.0, float(np.abs(expected).max()))
        assert np.abs(served - expected).max() <= 1e-4 * scale, f"{arch}: {np.abs(served - expected).max()}"


def test_classify_answers_torchvision_top5_with_its_categories(converted):
    from optic.client.vision import VisionClient

    srv, _, models = converted
    categories = tvm.weights_of("resnet18").meta["categories"]
    reference = tvm.weights_of("resnet18").transforms()
    data = photos()[0]
    with VisionClient(srv.url) as client:
        top = client.classify(data, model="resnet18", top_k=5)
    with torch.no_grad():
        probs = torch.softmax(models["resnet18"](reference(Image.open(io.BytesIO(data)).convert("RGB"))[None]), 1)[0]
    best = torch.argsort(probs, descending=True)[:5].tolist()
    assert [c.class_id for c in top] == best
    assert [c.label for c in top] == [categories[i] for i in best]
    np.testing.assert_allclose([c.score for c in top], probs[best].numpy(), atol=1e-5)


def test_segmentation_answers_at_the_image_size(converted):
    from optic.client.vision import VisionClient

    srv, _, _ = converted
    data = photos()[2]  # 999 x 301
    with VisionClient(srv.url) as client:
        seg = client.segment(data, model="lraspp_mobilenet_v3_large")
        info = client.model_info("lraspp_mobilenet_v3_large")
    assert seg.mask.shape == (301, 999)
    assert info.labels[0] == "__background__" and len(info.labels) == 21


def test_convert_refuses_a_checkpoint_of_another_architecture(tmp_path):
    torch.save(tv.models.get_model("resnet18", weights=None).state_dict(), tmp_path / "r18.pth")
    done = subprocess.run(
        [sys.executable, "-m", "optic.server.cli", "export", "convert", str(tmp_path / "r18.pth"), "--arch",
         "mobilenet_v3_large", "--out", str(tmp_path / "repo")],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "does not fit torchvision's mobilenet_v3_large" in done.stderr
    assert not (tmp_path / "repo").exists()
