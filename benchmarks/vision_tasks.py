"""Vision API figures, one run on one machine (issue 5).

1. Decode + preprocess per image for a 640x480 and a 1920x1080 JPEG into the
   default classifier and detector (their own input specs, read from the models) and the Ultralytics and
   torchvision reference pipelines, with the JPEG ``draft`` decode (DCT-domain downscale, what the default models
   declare) and without.
2. NMS on 8,400 candidates (the Ultralytics 640x640 count), ours (vectorised
   numpy) vs onnxruntime's NonMaxSuppression operator, kept sets compared.
3. Per task, a lone request's p50 split into decode / preprocess / inference /
   postprocess, read from the server's own ``optic_stage_duration_seconds``.

    python benchmarks/vision_tasks.py
"""

from __future__ import annotations

import io
import json
import os
import platform
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.classify_vs_echo import free_port, wait_ready  # noqa: E402
from benchmarks.decoders import timed  # noqa: E402
from optic.export import evaluate  # noqa: E402
from optic.export.data import make_scenes  # noqa: E402
from optic.proto.optic.v1 import vision_pb2 as pb  # noqa: E402
from optic.proto.optic.v1 import vision_pb2_grpc as pb_grpc  # noqa: E402
from optic.server.metadata import InputSpec  # noqa: E402
from optic.server.tasks.boxes import non_max_suppression  # noqa: E402
from optic.server.tasks.image import ImageLimits, prepare  # noqa: E402
from tests.test_detection import ort_nms, ort_nms_session  # noqa: E402


def served_spec(model: str) -> InputSpec:
    """A default model's input spec as the server reads it (sizes change with the models: issue 16's outlived a
    hard-coded 64x64 here)."""
    spec = evaluate.meta_of(evaluate.session(ROOT / "model_repo" / model / "1" / "model.onnx")).input
    assert spec is not None
    return spec


SPECS = {
    "classifier": served_spec("classifier"),
    "detector": served_spec("detector"),
    # The reference pipelines: Ultralytics' predictor (OpenCV decode + INTER_LINEAR letterbox) and
    # torchvision's ResNet-50 IMAGENET1K_V2 transforms (shorter side 232, crop 224, Pillow bilinear).
    "ultralytics-640": InputSpec(size=(640, 640), resize="letterbox", pipeline="ultralytics"),
    "ultralytics-320": InputSpec(size=(320, 320), resize="letterbox", pipeline="ultralytics"),
    "torchvision-resnet50": InputSpec(
        size=(224, 224), resize="center_crop", pipeline="torchvision", resize_size=232,
        mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
    ),
}  # fmt: skip


def photo(width: int, height: int) -> bytes:
    """A synthetic scene scaled up to camera size, JPEG quality 90."""
    scene = make_scenes(1, seed=5, size=96, max_distractors=3)[0].image
    img = Image.fromarray(scene).resize((width, height), Image.BILINEAR)
    noise = np.random.default_rng(0).integers(-8, 8, (height, width, 3))
    img = Image.fromarray(np.clip(np.asarray(img) + noise, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def decode_figures() -> dict:
    limits = ImageLimits()
    out = {}
    for w, h in ((640, 480), (1920, 1080)):
        data = photo(w, h)
        for model, spec in SPECS.items():
            draft, exact = replace(spec, decode="draft"), replace(spec, decode="exact")

            key = f"{w}x{h}->{model}"
            out[key] = {
                "jpeg_bytes": len(data),
                "with_draft_ms": timed(lambda spec=draft, data=data: prepare(data, spec, limits), 30),
                "full_decode_ms": timed(lambda spec=exact, data=data: prepare(data, spec, limits), 30),
                "exact_pipeline": spec.pipeline,
            }
            out[key]["speedup"] = out[key]["full_decode_ms"] / out[key]["with_draft_ms"]
            print(key, out[key], flush=True)
    return out


def nms_figures() -> dict:
    rng = np.random.default_rng(0)
    n, classes = 8400, 80
    xy = rng.uniform(0, 640, (n, 2))
    wh = rng.uniform(4, 200, (n, 2))
    boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    scores = rng.uniform(0, 1, n).astype(np.float32)
    cls = rng.integers(0, classes, n)
    result = {"candidates": n, "classes": classes}
    cases = (("all_8400", 0.0, False), ("after_conf_0.25", 0.25, False), ("class_agnostic_8400", 0.0, True))
    for label, conf, agnostic in cases:
        keep = scores >= conf
        b, s, c = boxes[keep], scores[keep], cls[keep] * (0 if agnostic else 1)
        k = 1 if agnostic else classes
        sess = ort_nms_session(k)
        ours = timed(lambda b=b, s=s, c=c: non_max_suppression(b, s, 0.45, c, max_det=len(b)), 10)
        theirs = timed(lambda b=b, s=s, c=c, k=k, sess=sess: ort_nms(sess, b, s, c, k, 0.45), 10)
        same = set(non_max_suppression(b, s, 0.45, c, max_det=len(b)).tolist()) == ort_nms(sess, b, s, c, k, 0.45)
        result[label] = {"boxes": len(b), "ours_ms": ours, "onnxruntime_op_ms": theirs, "same_kept": same}
        print("nms", label, result[label], flush=True)
    return result


def stage_figures(requests: int) -> dict:
    port, metrics = free_port(), free_port()
    cmd = [sys.executable, "-m", "optic.server.cli", "serve", "--host", "127.0.0.1", "--grpc-port", str(port)]
    cmd += ["--metrics-port", str(metrics), "--metrics-host", "127.0.0.1", "--log-level", "WARNING"]
    proc = subprocess.Popen(cmd, cwd=ROOT)
    url = f"127.0.0.1:{port}"
    try:
        wait_ready(url)
        time.sleep(2)
        stub = pb_grpc.VisionStub(grpc.insecure_channel(url))
        image = pb.Image(data=photo(640, 480))
        calls = {
            "classifier": lambda: stub.Classify(pb.ClassifyRequest(model="classifier", image=image), timeout=30),
            "detector": lambda: stub.Detect(pb.DetectRequest(model="detector", image=image), timeout=30),
            "segmenter": lambda: stub.Segment(pb.SegmentRequest(model="segmenter", image=image), timeout=30),
            "captioner_encoder": lambda: stub.Caption(pb.CaptionRequest(model="captioner", image=image), timeout=30),
        }
        out = {}
        for model, call in calls.items():
            latencies = []
            for _ in range(requests):
                t = time.perf_counter()
                call()
                latencies.append(time.perf_counter() - t)
            text = urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10).read().decode()
            out[model] = {"request_p50_ms": float(np.median(latencies) * 1e3)}
            for stage in ("decode", "preprocess", "inference", "postprocess"):
                out[model][f"{stage}_p50_ms"] = _histogram_p50(text, model, stage)
            # Inference split exactly, from the KServe ModelStatistics of the model(s) involved.
            for name in (model, "captioner_decoder") if model == "captioner_encoder" else (model,):
                stats = _statistics(url, name)
                out[model][f"{name}_mean_queue_ms"] = stats["queue"]
                out[model][f"{name}_mean_compute_ms"] = stats["compute_infer"]
                out[model][f"{name}_executions"] = stats["executions"]
            print("stages", model, out[model], flush=True)
        return out
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def _statistics(url: str, model: str) -> dict:
    from optic.proto.inference import grpc_service_pb2 as kpb

    with grpc.insecure_channel(url) as ch:
        call = ch.unary_unary("/inference.GRPCInferenceService/ModelStatistics")
        raw = call(kpb.ModelStatisticsRequest(name=model).SerializeToString(), timeout=10)
    s = kpb.ModelStatisticsResponse.FromString(raw).model_stats[0]
    inf = s.inference_stats

    def mean(d) -> float:
        return d.ns / max(1, d.count) / 1e6

    return {"queue": mean(inf.queue), "compute_infer": mean(inf.compute_infer), "executions": s.execution_count}


def _histogram_p50(text: str, model: str, stage: str) -> float | None:
    """Median from Prometheus buckets, interpolated linearly within the bucket (as histogram_quantile does)."""
    rows = []
    for line in text.splitlines():
        if (
            line.startswith("optic_stage_duration_seconds_bucket")
            and f'model="{model}"' in line
            and f'stage="{stage}"' in line
        ):
            le = line.split('le="')[1].split('"')[0]
            rows.append((float("inf") if le == "+Inf" else float(le), float(line.split()[-1])))
    if not rows or rows[-1][1] == 0:
        return None
    rows.sort()
    half = rows[-1][1] / 2
    lower, below = 0.0, 0.0
    for le, count in rows:
        if count >= half:
            return (lower + (le - lower) * (half - below) / max(count - below, 1e-9)) * 1e3
        lower, below = le, count
    return None


def main() -> int:
    summary = {
        "benchmark": "vision_tasks",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "decode_preprocess": decode_figures(),
        "nms": nms_figures(),
        "stages_lone_request_640x480_jpeg": stage_figures(200),
    }
    path = ROOT / "benchmarks" / "results" / "vision_tasks.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
