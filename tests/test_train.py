"""`optic export train`: datasets on disk in the formats users have -> gated, self-describing models a real server
answers with; transfer from our trunk or a torchvision backbone; resume and seeds giving the same bytes; bad
datasets and flags answered in one line with nothing written."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import torch

from optic.export import cli
from optic.export import finetune_loop as loop
from optic.export.models import ShapeNet
from optic.export.train import Trained, TrunkRecipe, save_trunk
from optic.proto.optic.v1 import vision_pb2 as pb
from optic.proto.optic.v1 import vision_pb2_grpc as pb_grpc
from optic.server.metadata import ModelMeta
from optic.server.tasks.image import ImageLimits, prepare
from tests.conftest import RunningServer, encode, start_server
from tests.dataset_writers import (
    save_image,
    scenes,
    write_coco_captions,
    write_coco_instances,
    write_imagefolder,
    write_voc,
    write_yolo,
)
from tests.test_datasets import CASES

FAST = ("--size", "64", "--threads", "1", "--batch-size", "16", "--no-progress")
TINTS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 70, 230)}


def export(capsys: Any, *argv: str) -> tuple[int, str, str]:
    """``optic export ARGV`` in this process: (exit status, stdout, stderr)."""
    parser = argparse.ArgumentParser(prog="optic export")
    cli.add_arguments(parser)
    status = cli.run(parser.parse_args(list(argv)))
    out = capsys.readouterr()
    return status, out.out, out.err


def train(capsys: Any, task: str, data: Path, repo: Path, name: str, *extra: str
          ) -> tuple[int, str, str]:  # fmt: skip
    return export(capsys, "train", task, "--data", str(data), "--out", str(repo), "--name", name, *FAST, *extra)


def tiny_trunk(repo: Path) -> Path:
    """A trunk.pt as `optic export all` writes it, from a small untrained net (the real one is minutes of CPU)."""
    torch.manual_seed(0)
    net = ShapeNet(5, 30, width=8, depth=1, neck=32).eval()
    return save_trunk(Trained(net, TrunkRecipe(width=8, depth=1, neck=32), 0.0, []), repo / "trunk.pt")


def tinted_imagefolder(root: Path, n_train: int = 48, n_val: int = 24) -> Path:
    """Three classes a few epochs can learn: the scenes tinted red, green or blue (ImageFolder, train/ + val/)."""
    train, val = scenes(n_train, n_val, seed=3, size=64)
    for split, items in (("train", train), ("val", val)):
        for i, scene in enumerate(items):
            name = list(TINTS)[i % 3]
            tinted = (scene.image * 0.4 + np.array(TINTS[name]) * 0.6).astype(np.uint8)
            save_image(tinted, root / split / name / f"{i:04d}.png")
    return root


def onnx_meta(path: Path) -> tuple[ort.InferenceSession, ModelMeta]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess, ModelMeta.from_props(sess.get_modelmeta().custom_metadata_map)


def written(repo: Path) -> list[str]:
    """Everything the server would look at: entries outside dot-folders."""
    if not repo.exists():
        return []
    return sorted(str(p.relative_to(repo)) for p in repo.rglob("*") if not any(
        part.startswith(".") for part in p.relative_to(repo).parts) and p.name != "trunk.pt")  # fmt: skip


# ---------------------------------------------------------------- the four tasks, end to end, served


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningServer, Path]]:
    """One repository with a model of each task trained from the trunk (the default --from), and a server on it."""
    root = tmp_path_factory.mktemp("served")
    repo = root / "repo"
    tiny_trunk(repo)
    data = {
        "classify": tinted_imagefolder(root / "tinted"),
        "detect": write_yolo(root / "yolo", n_train=24, n_val=8),
        "segment": write_voc(root / "voc", n_train=24, n_val=8, void_border=True),
        "caption": write_coco_captions(root / "captions", n_train=24, n_val=8),
    }
    for task, path in data.items():
        status, _, _ = train(_Printed(), task, path, repo, f"my_{task}", "--head-epochs", "2", "--epochs", "1",
                             "--gate", "0")  # fmt: skip
        assert status == 0, task
    server = start_server(root, repo=repo)
    yield server, repo
    assert server.stop() == 0, server.log()


class _Printed:
    """In place of capsys in a module fixture: the output stays on the test's stdout (pytest shows it on failure)."""

    def readouterr(self) -> argparse.Namespace:
        return argparse.Namespace(out="", err="")


def test_the_four_tasks_train_from_the_trunk_and_are_written_with_a_report(served, capsys) -> None:
    _, repo = served
    for task in ("classify", "detect", "segment", "caption"):
        entry = repo / (f"my_{task}_encoder" if task == "caption" else f"my_{task}")
        assert (entry / "1" / "model.onnx").is_file()
        report = entry / "report"
        assert (report / "report.md").is_file() and (report / "curves.png").stat().st_size > 1000
        figure = {"classify": "confusion.png", "detect": "pr.png", "segment": "iou.png"}.get(task)
        if figure:
            assert (report / figure).is_file(), task
        data = json.loads((report / "report.json").read_text())
        assert [h["phase"] for h in data["history"]] == ["head", "head", "finetune"]
    assert (repo / "my_caption_decoder" / "1" / "model.onnx").is_file()
    assert "| image | predicted | a reference |" in (repo / "my_caption_encoder" / "report" / "report.md").read_text()


def test_written_models_describe_themselves(served) -> None:
    _, repo = served
    _, meta = onnx_meta(repo / "my_classify" / "1" / "model.onnx")
    assert meta.task == "classification" and meta.labels == ("blue", "green", "red")
    assert meta.input is not None and meta.input.size == (64, 64) and meta.input.resize == "letterbox"
    assert meta.extra["optic.train.from"] == "optic:trunk.pt" and "optic.eval.accuracy" in meta.extra
    assert meta.extra["optic.gate.accuracy"] == "0.00" and float(meta.extra["optic.export.parity_max_abs_diff"]) < 1e-3
    assert "val split of tinted" in meta.extra["optic.eval.split"]
    _, meta = onnx_meta(repo / "my_detect" / "1" / "model.onnx")
    assert meta.task == "detection" and meta.output_layout == "yolov8" and len(meta.labels) == 5
    assert "optic.eval.map50" in meta.extra and "optic.eval.map50_95" in meta.extra
    _, meta = onnx_meta(repo / "my_segment" / "1" / "model.onnx")
    assert meta.task == "segmentation" and meta.labels[0] == "background" and "optic.eval.mean_iou" in meta.extra
    _, meta = onnx_meta(repo / "my_caption_encoder" / "1" / "model.onnx")
    assert meta.extra["optic.caption.decoder"] == "my_caption_decoder" and meta.vocab[:4][0] == "<pad>"


def test_the_server_answers_with_each_trained_model(served) -> None:
    server, repo = served
    train, _ = scenes(24, 8, seed=3, size=64)
    image = encode((train[0].image * 0.4 + np.array(TINTS["red"]) * 0.6).astype(np.uint8))
    with grpc.insecure_channel(server.url) as ch:
        stub = pb_grpc.VisionStub(ch)
        got = stub.Classify(pb.ClassifyRequest(model="my_classify", image=pb.Image(data=image), top_k=3), timeout=30)
        # The served answer is the exported graph's, through the server's pre-processing.
        sess, meta = onnx_meta(repo / "my_classify" / "1" / "model.onnx")
        assert meta.input is not None
        logits = sess.run(None, {"images": prepare(image, meta.input, ImageLimits()).tensor[None]})[0][0]
        assert got.classes[0].label == meta.labels[int(logits.argmax())]
        assert [c.label for c in got.classes] != [] and abs(sum(c.score for c in got.classes) - 1) < 1e-4
        scene = encode(scenes(1, 1, seed=0)[1][0].image)
        det = stub.Detect(pb.DetectRequest(model="my_detect", image=pb.Image(data=scene), confidence_threshold=0.0,
                                           max_detections=5), timeout=30)  # fmt: skip
        result = det.results[0]
        assert (result.width, result.height) == (64, 64) and len(result.detections) == 5
        assert all(d.label in ("circle", "square", "triangle", "star", "hexagon") for d in result.detections)
        seg = stub.Segment(pb.SegmentRequest(model="my_segment", image=pb.Image(data=scene)), timeout=30)
        assert (seg.results[0].width, seg.results[0].height) == (64, 64)
        assert sum(c.pixel_count for c in seg.results[0].classes) == 64 * 64
        cap = stub.Caption(pb.CaptionRequest(model="my_caption", image=pb.Image(data=scene)), timeout=30)
        assert cap.model == "my_caption" and cap.results[0].text.split()  # words of the dataset's vocabulary
        _, enc_meta = onnx_meta(repo / "my_caption_encoder" / "1" / "model.onnx")
        assert set(cap.results[0].text.split()) <= set(enc_meta.vocab)


def test_a_learnable_dataset_is_learned_above_chance(tmp_path: Path, capsys) -> None:
    status, out, err = train(capsys, "classify", tinted_imagefolder(tmp_path / "d"), tmp_path / "repo", "tint",
                             "--from", "none", "--width", "8", "--neck", "32", "--epochs", "8", "--head-epochs", "0",
                             "--batch-size", "8")  # fmt: skip
    assert status == 0, out + err
    _, meta = onnx_meta(tmp_path / "repo" / "tint" / "1" / "model.onnx")
    assert float(meta.extra["optic.eval.accuracy"]) >= 0.9, out  # chance: 1/3; the default gate: 0.5
    assert "epoch 8/8 scratch" in out and "written to" in out


# ---------------------------------------------------------------- transfer learning sources


def test_torchvision_backbones_with_user_weights(tmp_path: Path, capsys) -> None:
    from optic.export.torchvision_models import torchvision

    weights = tmp_path / "resnet18.pth"
    torch.manual_seed(0)
    torch.save(torchvision().models.resnet18(weights=None).state_dict(), weights)
    data = write_imagefolder(tmp_path / "d", n_train=20, n_val=10)
    status, out, err = train(capsys, "classify", data, tmp_path / "repo", "rn", "--from", "resnet18", "--weights",
                             str(weights), "--head-epochs", "1", "--epochs", "1", "--neck", "32", "--gate", "0")
    assert status == 0, out + err
    _, meta = onnx_meta(tmp_path / "repo" / "rn" / "1" / "model.onnx")
    assert meta.extra["optic.train.from"] == "torchvision:resnet18"
    assert meta.input is not None and meta.input.mean == (0.485, 0.456, 0.406)
    assert "head 1 epochs" in out and "finetune 1 epochs" in out
    # A backbone of another family, under our pyramid and the segmentation head.
    torch.save(torchvision().models.mobilenet_v3_small(weights=None).state_dict(), weights)
    voc = write_voc(tmp_path / "voc", n_train=12, n_val=4)
    status, out, err = train(capsys, "segment", voc, tmp_path / "repo", "mn", "--from", "mobilenet_v3_small",
                             "--weights", str(weights), "--head-epochs", "1", "--epochs", "0", "--neck", "32",
                             "--gate", "0")  # fmt: skip
    assert status == 0, out + err
    _, meta = onnx_meta(tmp_path / "repo" / "mn" / "1" / "model.onnx")
    assert meta.task == "segmentation" and meta.extra["optic.train.from"] == "torchvision:mobilenet_v3_small"


def test_bad_sources_are_one_line_errors(tmp_path: Path, capsys) -> None:
    data = write_imagefolder(tmp_path / "d", n_train=10, n_val=5)
    repo = tmp_path / "repo"
    cases = [
        (("--from", "resnet18"), "needs --weights"),
        (("--from", "optic"), "trunk.pt does not exist"),
        (("--from", "vgg99"), "--from vgg99"),
        (("--from", "none", "--weights", str(data)), "--weights is for a torchvision"),
        (("--size", "100"), "multiple of 32"),
        (("--resume",), "no checkpoint"),
        (("--device", "cuda"), "--device cuda"),  # no CUDA here; classify on CUDA also waits on models._coords
    ]
    for flags, phrase in cases:
        status, _, err = train(capsys, "classify", data, repo, "m", *flags)
        assert status == 2 and err.startswith("optic export: error:") and phrase in err, (flags, err)
        assert err.count("\n") == 1
    not_a_trunk = tmp_path / "bad.pt"
    torch.save({"format": "something else"}, not_a_trunk)
    status, _, err = train(capsys, "classify", data, repo, "m", "--from", str(not_a_trunk))
    assert status == 2 and "not an Optic trunk checkpoint" in err
    assert written(repo) == []


# ---------------------------------------------------------------- trust: gate, resume, determinism


def test_a_model_below_its_gate_is_not_written(tmp_path: Path, capsys) -> None:
    repo = tmp_path / "repo"
    data = write_imagefolder(tmp_path / "d", n_train=20, n_val=10)
    status, out, _ = train(capsys, "classify", data, repo, "m", "--from", "none", "--width", "8", "--neck", "32",
                           "--epochs", "1", "--head-epochs", "0", "--gate", "1.0")  # fmt: skip
    assert status == 1 and "NOT written" in out and "< gate 1.00" in out
    assert written(repo) == []
    assert (repo / ".train" / "m" / "report" / "report.md").is_file()  # the report stays with the checkpoints


class _StopAt:
    """Ctrl-C in the middle of an epoch: the ``n``-th training step raises KeyboardInterrupt."""

    def __init__(self, n: int) -> None:
        self.n, self.calls, self.real = n, 0, loop.loss

    def __call__(self, *a, **k):
        self.calls += 1
        if self.calls == self.n:
            raise KeyboardInterrupt
        return self.real(*a, **k)


def test_resume_after_ctrl_c_and_a_second_run_give_the_same_bytes(tmp_path: Path, capsys, monkeypatch) -> None:
    data = write_imagefolder(tmp_path / "d", n_train=32, n_val=10)
    tiny_trunk(tmp_path / "a")
    tiny_trunk(tmp_path / "b")
    flags = ("--head-epochs", "1", "--epochs", "2", "--gate", "0", "--batch-size", "8")
    status, out, err = train(capsys, "classify", data, tmp_path / "a", "m", *flags)
    assert status == 0, out + err
    with monkeypatch.context() as m:
        m.setattr(loop, "loss", _StopAt(10))  # 4 steps an epoch: in the middle of epoch 3
        status, _, err = train(capsys, "classify", data, tmp_path / "b", "m", *flags)
    assert status == 130 and "interrupted after epoch 2 of 3" in err and "--resume" in err
    assert err.strip().count("\n") == 0
    assert written(tmp_path / "b") == []
    status, out, err = train(capsys, "classify", data, tmp_path / "b", "m", *flags, "--resume")
    assert status == 0, out + err
    assert "resuming after epoch 2" in out and "epoch 3/3 finetune" in out and "epoch 1/3" not in out
    a = (tmp_path / "a" / "m" / "1" / "model.onnx").read_bytes()
    assert a == (tmp_path / "b" / "m" / "1" / "model.onnx").read_bytes()
    status, out, err = train(capsys, "classify", data, tmp_path / "a", "m", *flags)  # again, from the start
    assert status == 0, out + err
    assert a == (tmp_path / "a" / "m" / "1" / "model.onnx").read_bytes()
    status, _, err = train(capsys, "classify", data, tmp_path / "b", "m", *flags[:-2], "--batch-size", "4",
                           "--resume")  # fmt: skip
    assert status == 2 and "another run" in err


def test_early_stopping_ends_a_phase_without_progress(tmp_path: Path, capsys) -> None:
    data = write_imagefolder(tmp_path / "d", n_train=16, n_val=6)
    status, out, err = train(capsys, "classify", data, tmp_path / "repo", "m", "--from", "none", "--width", "8",
                             "--neck", "32", "--epochs", "8", "--head-epochs", "0", "--patience", "1", "--lr",
                             "1e-9", "--gate", "0")  # fmt: skip
    assert status == 0, out + err
    assert "early stop" in out and "epoch 8/8" not in out


# ---------------------------------------------------------------- bad datasets through the command


@pytest.mark.parametrize(("writer", "options", "task", "phrase", "names"), CASES,
                         ids=[f"{c[0].__name__}-{c[3]}" for c in CASES])  # fmt: skip
def test_a_bad_dataset_is_one_line_and_writes_nothing(tmp_path: Path, capsys, writer, options, task, phrase, names):
    path = writer(tmp_path / "imagefolder" if writer is write_imagefolder else tmp_path / "data", n_train=8,
                  n_val=2, **options)  # fmt: skip
    repo = tmp_path / "repo"
    status, _, err = train(capsys, task, path, repo, "m", "--from", "none")
    assert status == 2 and err.startswith("optic export: error:") and err.count("\n") == 1, err
    assert phrase in err and names in err
    assert not repo.exists()


def test_skipped_files_are_counted_by_name_or_refused_with_strict(tmp_path: Path, capsys) -> None:
    data = write_yolo(tmp_path / "y", n_train=16, n_val=4, defects=["truncated_image", "zero_area_box"])
    repo = tmp_path / "repo"
    status, _, err = train(capsys, "detect", data, repo, "m", "--from", "none", "--strict")
    assert status == 2 and "0001_truncated_image.jpg" in err and "strict" in err
    assert not repo.exists()
    status, out, err = train(capsys, "detect", data, repo, "m", "--from", "none", "--width", "8", "--neck", "32",
                             "--epochs", "1", "--head-epochs", "0", "--gate", "0")  # fmt: skip
    assert status == 0, out + err
    assert "skipped 1 file(s)" in out and "0001_truncated_image.jpg" in out
    assert "zero-area box skipped" in out and "0002_zero_area_box.txt" in out


def test_coco_instances_and_the_long_task_name(tmp_path: Path, capsys) -> None:
    data = write_coco_instances(tmp_path / "coco", n_train=16, n_val=4)
    status, out, err = train(capsys, "detection", data, tmp_path / "repo", "m", "--from", "none", "--width", "8",
                             "--neck", "32", "--epochs", "1", "--head-epochs", "0", "--gate", "0")  # fmt: skip
    assert status == 0, out + err
    _, meta = onnx_meta(tmp_path / "repo" / "m" / "1" / "model.onnx")
    assert meta.labels == ("circle", "square", "triangle", "star", "hexagon")  # COCO ids 10..50, remapped
