"""What a new user meets first: `optic infer` without --task, `optic serve` mistakes, `optic bench` exit codes
and secrets, every client method with every optional argument, and the one-package layout."""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from optic.client.vision import Caption, Classification, Detection, ModelInfo, Segmentation, VisionClient
from optic.export import captioner, detector
from optic.export.data import make_scenes
from optic.server.cli import RANGES, build_parser
from tests.conftest import ROOT, encode

SCENE = make_scenes(1, seed=detector.TEST_SEED + 7, **detector.SCENE_ARGS)[0]


def optic(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "optic.server.cli", *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout
    )


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("images")
    good = d / "scene.png"
    good.write_bytes(encode(SCENE.image))
    bad = d / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    return {"good": good, "bad": bad, "missing": d / "nope.png"}


# ---------------------------------------------------------------- optic infer


@pytest.mark.parametrize(
    ("model", "expect"),
    [("detector", "["), ("segmenter", "background"), ("captioner", "log p"), ("classifier", "(")],
)
def test_infer_takes_the_task_from_the_model(server, images, model, expect):
    done = optic("infer", "--url", server.url, "--model", model, str(images["good"]))
    assert done.returncode == 0, done.stderr
    assert str(images["good"]) in done.stdout and expect in done.stdout


def test_infer_prints_good_images_and_one_error_line_per_bad_one(server, images):
    paths = [images["good"], images["bad"], images["missing"], images["good"]]
    done = optic("infer", "--url", server.url, "--model", "detector", "--json", *map(str, paths))
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("optic infer:")]
    assert len(errors) == 2, done.stderr
    assert "broken.jpg: INVALID_ARGUMENT" in errors[0] and "nope.png" in errors[1]
    answers = json.loads(done.stdout)
    assert list(answers) == [str(images["good"])] and answers[str(images["good"])][0]["label"]


def test_infer_unknown_model_lists_the_names_clients_use(server, images):
    done = optic("infer", "--url", server.url, "--model", "nosuch", str(images["good"]))
    assert done.returncode == 1 and "NOT_FOUND" in done.stderr
    listed = done.stderr.split("this server has:")[1]
    assert "captioner" in listed.split(", ")[0] + listed and "captioner_encoder" not in listed
    assert "captioner_decoder" not in listed


def test_infer_options_come_from_the_task_modules(server, images, tmp_path):
    done = optic(
        "infer", "--url", server.url, "--model", "detector", "--conf", "0.9", "--max-det", "1",
        "--save-vis", str(tmp_path), str(images["good"]),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert len([line for line in done.stdout.splitlines() if line.startswith("  ")]) <= 1
    assert (tmp_path / "scene.detect.png").stat().st_size > 0


# ---------------------------------------------------------------- optic serve mistakes


def serve_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["serve"]


def test_serve_help_shows_defaults_and_every_flag_has_help():
    serve = serve_parser()
    for action in serve._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{action.option_strings} has no help"
    text = serve.format_help()
    assert "(default: 8001)" in text and "(default: 1024)" in text


@pytest.mark.parametrize(
    ("args", "phrase"),
    [
        (["--grpc-port", "-1"], "--grpc-port -1 is out of range: choose 0 to 65535"),
        (["--instances", "65"], "--instances 65 is out of range: choose 0 to 64"),
        (["--max-inflight", "0"], "--max-inflight 0 is out of range: choose 1 to"),
        (["--log-level", "LOUD"], "--log-level 'LOUD' is not a level: choose one of DEBUG, INFO"),
        (["--max-queue-delay-ms", "nan"], "--max-queue-delay-ms nan is out of range"),
    ],
)
def test_serve_refuses_bad_flags_in_one_line(args, phrase):
    done = optic("serve", "--metrics-port", "0", *args, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and phrase in done.stderr, done.stderr


def test_every_range_names_a_real_flag():
    dests = {a.dest for a in serve_parser()._actions}
    assert set(RANGES) <= dests


def test_serve_on_a_port_in_use_says_so_in_one_line():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        done = optic("serve", "--host", "127.0.0.1", "--grpc-port", str(port), "--metrics-port", "0", timeout=60)
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("optic serve: cannot listen on 127.0.0.1:") and "in use" in last
    assert "Traceback" not in done.stderr


def test_the_tests_own_server_start_picks_again_when_its_port_is_taken(tmp_path, monkeypatch):
    """The harness, not the server: a port taken between the pick and the server's bind (CI saw it) costs a
    retry, not a failed module; ports are picked below the kernel's ephemeral range, where no outgoing
    connection takes them."""
    from tests import conftest

    low, _ = conftest._ephemeral_range()
    assert all(conftest.free_port() < low for _ in range(20))
    picks: list[int] = []
    pick = conftest.free_port
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        taken = held.getsockname()[1]
        # The first server's metrics port (the second pick) is one another process holds.
        monkeypatch.setattr(conftest, "free_port", lambda: picks.append(1) or (taken if len(picks) == 2 else pick()))
        srv = conftest.start_server(tmp_path)
    try:
        assert len(picks) >= 4 and taken not in (srv.grpc_port, srv.metrics_port)
        assert srv.health() == 1
    finally:
        assert srv.stop() == 0
    logs = sorted(tmp_path.glob("server-*.log"))
    assert any("in use" in log.read_text() for log in logs), [log.read_text()[-300:] for log in logs]


# ---------------------------------------------------------------- optic bench


def test_bench_exits_1_above_the_error_rate_and_keeps_secrets_out_of_json(server, tmp_path):
    secret = "s3cr3t-token-never-written-anywhere"
    token = tmp_path / "token"
    token.write_text(secret + "\n")
    out = tmp_path / "run.json"
    done = optic(
        "bench", "--url", server.url, "--model", "classifier", "--duration", "1", "--warmup", "0",
        "--concurrency", "2", "--timeout", "0.000001", "--no-progress", "--token-file", str(token),
        "--json", str(out),
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "above --max-error-rate 1.00%" in done.stderr
    text = out.read_text()
    assert secret not in text and str(token) not in text
    assert json.loads(text)["config"]["credentials"] == {"tls": False, "client_certificate": False, "token": True}
    ok = optic("bench", "--url", server.url, "--duration", "1", "--warmup", "0", "--concurrency", "2",
               "--no-progress", "--max-error-rate", "1")  # fmt: skip
    assert ok.returncode == 0, ok.stderr


def test_bench_plot_checks_matplotlib_before_running(tmp_path):
    code = (
        "import sys; sys.modules['matplotlib'] = None; from optic.server.cli import main; "
        "sys.exit(main(['bench', '--url', '127.0.0.1:9', '--sweep', '1,2', '--concurrency', '1', "
        f"'--plot', {str(tmp_path / 'p.png')!r}]))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--plot needs matplotlib" in done.stderr


# ---------------------------------------------------------------- the typed client


def test_every_client_method_with_every_optional_argument(server):
    image = encode(SCENE.image)
    pixels = SCENE.image
    with VisionClient(server.url, timeout=30) as client:
        top = client.classify(image, model="classifier", top_k=3, version="1")
        assert len(top) == 3 and isinstance(top[0], Classification)
        many = client.classify_many([image, pixels], model="classifier", top_k=2, version="1")
        assert [len(m) for m in many] == [2, 2]
        options = dict(confidence_threshold=0.2, iou_threshold=0.5, class_agnostic=True, max_detections=5,
                       class_ids=[0, 1, 2, 3, 4])  # fmt: skip
        found = client.detect(image, model="detector", version="1", **options)
        assert found and all(isinstance(d, Detection) for d in found) and len(found) <= 5
        both = client.detect_many([image, pixels], model="detector", version="1", **options)
        assert len(both) == 2 and both[0] == found
        streamed = list(client.detect_stream([image, pixels, image], model="detector", version="1", **options))
        assert [i for i, _ in streamed] == [0, 1, 2] and streamed[0][1] == found
        seg = client.segment(image, model="segmenter", rle=True, version="1")
        assert isinstance(seg, Segmentation) and seg.rle and seg.mask.shape == SCENE.image.shape[:2]
        cap_scene = make_scenes(1, seed=captioner.TEST_SEED + 3, **captioner.SCENE_ARGS)[0]
        cap = client.caption(encode(cap_scene.image), model="captioner", beam_size=2, max_length=6, version="1")
        assert isinstance(cap, Caption) and 0 < len(cap.tokens) <= 5
        info = client.model_info("captioner")
        assert isinstance(info, ModelInfo) and info.task == "caption" and info.served_by == "captioner_encoder"
        assert client.model_info("detector").defaults["max_detections"] == "300"
        generic = client.call("detect", [image], "detector", "1", max_detections=2)
        assert len(generic[0]) <= 2
        with pytest.raises(TypeError, match="takes no option"):
            client.detect(image, model="detector", beam_size=3)
        with pytest.raises(TypeError, match="takes no option"):
            list(client.detect_stream([image], model="detector", nonsense=1))
        with pytest.raises(grpc.RpcError) as err:
            client.classify(image, model="classifier", version="7")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


# ---------------------------------------------------------------- the layout


def test_one_import_package_named_optic():
    """Everything installs under `optic`; the repository folders map onto it."""
    code = (
        "import importlib, optic.server, optic.export, optic.client, optic.proto; "
        "print(sorted(m.__name__ for m in (optic.server, optic.export, optic.client, optic.proto)))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=60)
    assert done.returncode == 0, done.stderr
    top = subprocess.run(
        [sys.executable, "-c", "import importlib.util as u; print(u.find_spec('server'), u.find_spec('export'))"],
        capture_output=True, text=True, cwd="/", timeout=60,
    )  # fmt: skip
    assert top.stdout.strip() == "None None", "nothing but `optic` may land at the top level"


def test_bench_and_client_never_import_export_or_torch():
    code = (
        "import sys, optic.client.bench, optic.client.infer, optic.client.vision; "
        "sys.exit(any(m.split('.')[0] == 'torch' or m.startswith('optic.export') or m.startswith('optic.server.api')"
        " for m in sys.modules))"
    )
    assert subprocess.run([sys.executable, "-c", code], cwd="/", timeout=60).returncode == 0


def test_kserve_protos_share_a_process_with_tritonclient():
    """Our generated KServe modules live in their own descriptor pool, so Triton's client can sit beside them."""
    import tritonclient.grpc  # noqa: F401

    from optic.proto.inference import grpc_service_pb2, model_config_pb2

    assert model_config_pb2.ModelConfig(name="x").name == "x"
    assert grpc_service_pb2.ModelInferRequest(model_name="y").model_name == "y"
