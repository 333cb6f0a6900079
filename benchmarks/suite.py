"""The benchmark suite (`make bench`): every default model, measured in one run on this machine.

For each model, over the Vision API with 640x480 JPEGs (what a camera sends):

1. served throughput (64 closed-loop callers, `optic bench`) vs the **in-process
   limit**: the same pipeline (decode -> preprocess -> onnxruntime ->
   postprocess) called in a loop in one process at its best batch size;
2. served throughput vs a **bare grpc.aio echo server** answering the same
   request bytes with as many bytes as a real answer (Python gRPC's ceiling);
3. dynamic batching on vs off (`--max-batch-size 0`), and p50/p99 latency of
   open-loop (Poisson) load at 50% and 90% of the peak, next to a lone
   request's latency;
4. for the detector, scaling with instance count and onnxruntime threads.

Writes benchmarks/results/suite.json and suite.png; the README summarises them.
Goals steered by: detector served >= 0.9x in-process; classifier >= 0.8x echo;
p99 at 50% load <= 2x lone-request latency.

    python benchmarks/suite.py [--seconds 6]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.classify_vs_echo import echo_server, free_port, wait_ready  # noqa: E402
from benchmarks.serving_core import start, stop  # noqa: E402
from optic.client import bench, load  # noqa: E402
from optic.server.metadata import ModelMeta  # noqa: E402
from optic.server.runtime import OnnxModel, RuntimeOptions  # noqa: E402
from optic.server.tasks import boxes, caption, classify, segment  # noqa: E402
from optic.server.tasks.image import ImageLimits, prepare  # noqa: E402

REPO = ROOT / "model_repo"
VISION_METHODS = ("Classify", "Detect", "Segment", "Caption")
RESULTS = ROOT / "benchmarks" / "results"
MODELS = ("classifier", "detector", "segmenter", "captioner")
TASK_OF = {"classifier": "classify", "detector": "detect", "segmenter": "segment", "captioner": "caption"}


# ---------------------------------------------------------------- in-process limit


def _images(n: int = 32) -> list[bytes]:
    return load.synthetic_images(n, bench.BenchConfig().image_size)


def in_process(model: str, seconds: float) -> dict:
    """Best images/s of the whole pipeline in one process, over batch sizes 1, 8 and 32."""
    limits = ImageLimits()
    images = _images()
    name = "captioner_encoder" if model == "captioner" else model
    runtime = OnnxModel(REPO / name / "1" / "model.onnx", RuntimeOptions())
    meta = ModelMeta.from_props(runtime.metadata_props)
    decoder = (
        OnnxModel(REPO / "captioner_decoder" / "1" / "model.onnx", RuntimeOptions()) if model == "captioner" else None
    )
    spec = meta.input
    assert spec is not None

    def pipeline(batch: list[bytes]) -> None:
        prepared = [prepare(d, spec, limits) for d in batch]
        outputs = runtime.run({runtime.inputs[0].name: np.stack([p.tensor for p in prepared])})
        if model == "classifier":
            for row in outputs["logits"]:
                classify.top_k(row, meta, 5)
        elif model == "detector":
            for p, pred in zip(prepared, outputs["detections"], strict=True):
                # The model's own layout, as the server reads it (the default detector is YOLOv8's [4+C, A]).
                found = boxes.detect(pred, boxes.layout_of(pred.shape, meta.output_layout, len(meta.labels)))
                p.transform.to_original(found.boxes)
        elif model == "segmenter":
            for p, logits in zip(prepared, outputs["logits"], strict=True):
                mask = segment.class_map(logits, p.transform)
                segment.png(mask)
                segment.summarise(mask, logits.shape[0], False)
        else:
            spec_c = caption.CaptionSpec.from_meta(meta, name)
            f, h, c = outputs["features"], outputs["h"], outputs["c"]
            token = np.full(len(batch), spec_c.bos, dtype=np.int64)
            done = np.zeros(len(batch), dtype=bool)
            for _ in range(spec_c.max_length):
                out = decoder.run({"token": token, "h": h, "c": c, "features": f})  # type: ignore[union-attr]
                token = caption.log_softmax(out["logits"]).argmax(1).astype(np.int64)
                h, c = out["h_out"], out["c_out"]
                done |= token == spec_c.eos
                if done.all():
                    break

    best: dict = {"images_per_s": 0.0}
    for size in (1, 8, 32):
        batch = [images[i % len(images)] for i in range(size)]
        pipeline(batch)
        count, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds / 3:
            pipeline(batch)
            count += size
        rate = count / (time.perf_counter() - started)
        best = max(best, {"images_per_s": rate, "batch_size": size}, key=lambda b: b["images_per_s"])
    return best


# ---------------------------------------------------------------- echo ceiling


def echo_ceiling(config: bench.BenchConfig, reply_size: int) -> dict:
    port = free_port()
    proc = mp.Process(target=echo_server, args=(port, reply_size, VISION_METHODS), daemon=True)
    proc.start()
    try:
        wait_ready(f"127.0.0.1:{port}")  # a fixed 1 s sleep lost the race on a busy machine (UNAVAILABLE)
        # The echo answers the task's RPC only: no ModelMetadata to look the task up from, so name it.
        result = bench.run(replace(config, url=f"127.0.0.1:{port}", task=config.task or TASK_OF[config.model]))
    finally:
        proc.terminate()
    return _brief(result)


# ---------------------------------------------------------------- served


def _brief(r: bench.BenchResult) -> dict:
    return {
        "throughput_rps": r.throughput_rps,
        "latency_ms": r.latency_ms,
        "errors": r.errors,
        "server": r.server,
        "requests": r.requests,
    }


def reply_size(url: str, model: str) -> int:
    method, payloads = load.vision_payloads(bench.BenchConfig(url=url, model=model), 1)
    with grpc.insecure_channel(url) as channel:
        return len(channel.unary_unary(method)(payloads[0], timeout=30))


def measure_model(model: str, args: argparse.Namespace) -> dict:
    print(f"== {model}", flush=True)
    out: dict = {"in_process": in_process(model, args.seconds)}
    print("  in-process", out["in_process"], flush=True)
    base = bench.BenchConfig(model=model, concurrency=64, duration=args.seconds, warmup=2.0, progress=False)
    proc, url = start(REPO)
    try:
        cfg = replace(base, url=url)
        out["served"] = _brief(bench.run(cfg))
        peak = out["served"]["throughput_rps"]
        out["lone"] = _brief(bench.run(replace(cfg, concurrency=1)))
        for share in (0.5, 0.9):
            out[f"open_loop_{int(share * 100)}pct"] = _brief(bench.run(replace(cfg, concurrency=0, rate=share * peak)))
        size = reply_size(url, model)
    finally:
        stop(proc)
    proc, url = start(REPO, "--max-batch-size", "0")
    try:
        out["batching_off"] = _brief(bench.run(replace(base, url=url)))
    finally:
        stop(proc)
    out["echo"] = echo_ceiling(base, size)
    out["echo"]["reply_bytes"] = size
    served = out["served"]["throughput_rps"]
    out["ratios"] = {
        "served_to_in_process": served / out["in_process"]["images_per_s"],
        "served_to_echo": served / out["echo"]["throughput_rps"],
        "batching_on_to_off": served / max(out["batching_off"]["throughput_rps"], 1e-9),
        "p99_at_50pct_to_lone_p99": out["open_loop_50pct"]["latency_ms"].get("p99", float("nan"))
        / out["lone"]["latency_ms"]["p99"],
    }
    print("  ", json.dumps({k: round(v, 3) for k, v in out["ratios"].items()}), flush=True)
    return out


def scaling(args: argparse.Namespace) -> list[dict]:
    """Detector throughput by instance count and onnxruntime intra-op threads (64 callers, KServe tensors); threads
    0 is the default: a batch alone on all the cores, one beside it on the narrow lane."""
    rows = []
    for instances, threads in ((1, 1), (1, 2), (2, 1), (4, 1), (2, 0)):
        proc, url = start(REPO, "--instances", str(instances), "--intra-op-threads", str(threads))
        try:
            cfg = bench.BenchConfig(
                url=url,
                api="kserve",
                model="detector",
                concurrency=64,
                duration=args.seconds,
                warmup=2.0,
                progress=False,
            )
            r = bench.run(cfg)
        finally:
            stop(proc)
        rows.append({"instances": instances, "intra_op_threads": threads, **_brief(r)})
        print(f"  detector instances={instances} threads={threads}: {r.throughput_rps:.0f} req/s", flush=True)
    return rows


def draw(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120)
    names = list(results["models"])
    x = np.arange(len(names))
    for i, (key, label) in enumerate(
        (
            ("in_process", "in-process limit"),
            ("served", "served"),
            ("batching_off", "served, no batching"),
            ("echo", "bare gRPC echo"),
        )
    ):
        values = [results["models"][m][key]["images_per_s" if key == "in_process" else "throughput_rps"] for m in names]
        axes[0].bar(x + (i - 1.5) * 0.2, values, 0.2, label=label)
    axes[0].set_xticks(x, names)
    axes[0].set_ylabel("images/s")
    axes[0].set_yscale("log")
    axes[0].set_title("throughput, 640x480 JPEG, 64 callers")
    axes[0].legend(fontsize=7)
    for key, label, marker in (
        ("lone", "lone", "o"),
        ("open_loop_50pct", "50% load", "s"),
        ("open_loop_90pct", "90% load", "^"),
    ):
        axes[1].scatter(
            names,
            [results["models"][m][key]["latency_ms"].get("p99", np.nan) for m in names],
            marker=marker,
            label=f"p99, {label}",
        )
    axes[1].set_ylabel("ms")
    axes[1].set_yscale("log")
    axes[1].set_title("p99 latency")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=6.0, help="measured seconds per run")
    parser.add_argument("--models", default=",".join(MODELS))
    args = parser.parse_args()
    results = {
        "benchmark": "suite",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "seconds_per_run": args.seconds,
        "models": {m: measure_model(m, args) for m in args.models.split(",")},
        "detector_scaling": scaling(args),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "suite.json").write_text(json.dumps(results, indent=2) + "\n")
    draw(results, RESULTS / "suite.png")
    print(f"-> {RESULTS / 'suite.json'}, {RESULTS / 'suite.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
