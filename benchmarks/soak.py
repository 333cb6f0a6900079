"""Soak: a server under steady mixed load, with a sprinkling of bad requests, watched for errors and leaks.

    python benchmarks/soak.py --minutes 10 --rate 80

Starts ``optic serve`` on the default repository (logging warnings and
errors), then sends Poisson arrivals at ``--rate`` requests/s: Classify, Detect, Segment, Caption (greedy and beam
3) with 640x480 JPEGs, KServe ModelInfer tensors, and one bad request in
``--bad-every`` (garbage image, unknown model, NaN tensor, 1x1 image,
absurd beam size, bytes that are not protobuf), each of which must get its
own status. Every 5 s it records the server's RSS and the interval's
latency. Passes (exit 0) when no request got an unexpected answer and the
RSS of the last minute is within ``--max-growth`` percent of the first
minute after the warm-up; writes JSON and, unless ``--no-plot``, the curve.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.serving_core import start, stop  # noqa: E402
from optic.export.data import make_scenes  # noqa: E402  (numpy + Pillow only)
from optic.proto.inference import grpc_service_pb2 as kpb  # noqa: E402
from optic.proto.optic.v1 import vision_pb2 as vpb  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
VISION = "/optic.v1.Vision/"
KSERVE = "/inference.GRPCInferenceService/"


@dataclass(frozen=True)
class Kind:
    name: str
    method: str
    payloads: tuple[bytes, ...]
    expect: str  # the status this kind must get
    weight: float


def _jpeg(image: np.ndarray, size: tuple[int, int] = (640, 480)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).resize(size, Image.BILINEAR).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _classifier_side() -> int:
    """The committed classifier's square input side, from its own metadata."""
    import onnx

    model = onnx.load(str(ROOT / "model_repo" / "classifier" / "1" / "model.onnx"), load_external_data=False)
    size = json.loads({p.key: p.value for p in model.metadata_props}["optic.input.size"])
    return int(size[0])


def _tensor(value: float | None = None) -> bytes:
    side = _classifier_side()
    x = np.random.default_rng(1).random((1, 3, side, side), dtype=np.float32)
    if value is not None:
        x[0, 0, 0, 0] = value
    request = kpb.ModelInferRequest(model_name="classifier")
    request.inputs.add(name="images", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    return request.SerializeToString()


def workload() -> list[Kind]:
    images = [vpb.Image(data=_jpeg(s.image)) for s in make_scenes(8, seed=21, size=96, max_distractors=2)]
    tiny = vpb.Image(data=_jpeg(np.zeros((8, 8, 3), np.uint8), (1, 1)))

    def each(make: type, **fields: object) -> tuple[bytes, ...]:
        return tuple(make(image=img, **fields).SerializeToString() for img in images)

    good = [
        Kind("classify", VISION + "Classify", each(vpb.ClassifyRequest, model="classifier"), "OK", 0.33),
        Kind("detect", VISION + "Detect", each(vpb.DetectRequest, model="detector"), "OK", 0.25),
        Kind("segment", VISION + "Segment", each(vpb.SegmentRequest, model="segmenter"), "OK", 0.15),
        Kind("caption", VISION + "Caption", each(vpb.CaptionRequest, model="captioner"), "OK", 0.07),
        Kind("caption-beam", VISION + "Caption", each(vpb.CaptionRequest, model="captioner", beam_size=3), "OK", 0.05),
        Kind("kserve", KSERVE + "ModelInfer", (_tensor(),), "OK", 0.15),
    ]
    bad = [
        Kind("bad-image", VISION + "Classify",
             (vpb.ClassifyRequest(model="classifier", image=vpb.Image(data=b"nope" * 50)).SerializeToString(),),
             "INVALID_ARGUMENT", 1),
        Kind("bad-model", VISION + "Detect", each(vpb.DetectRequest, model="../detector"), "NOT_FOUND", 1),
        Kind("bad-nan", KSERVE + "ModelInfer", (_tensor(float("nan")),), "INVALID_ARGUMENT", 1),
        Kind("bad-tiny", VISION + "Segment",
             (vpb.SegmentRequest(model="segmenter", image=tiny).SerializeToString(),), "INVALID_ARGUMENT", 1),
        Kind("bad-beam", VISION + "Caption", each(vpb.CaptionRequest, model="captioner", beam_size=99),
             "INVALID_ARGUMENT", 1),
        Kind("bad-protobuf", KSERVE + "ModelInfer", (b"\x0a\xff\xff\xff\xff\x0f",), "INVALID_ARGUMENT", 1),
    ]  # fmt: skip
    return good + bad


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def drive(url: str, pid: int, args: argparse.Namespace) -> dict:
    kinds = workload()
    good = [k for k in kinds if k.expect == "OK"]
    bad = [k for k in kinds if k.expect != "OK"]
    weights = np.array([k.weight for k in good]) / sum(k.weight for k in good)
    rng = np.random.default_rng(0)
    counts: dict[str, dict[str, int]] = {k.name: {} for k in kinds}
    unexpected: list[str] = []
    window: list[float] = []
    samples: list[dict] = []
    total = 0
    started = time.monotonic()
    stop_at = started + args.minutes * 60

    async with grpc.aio.insecure_channel(url) as channel:
        calls = {k.method: channel.unary_unary(k.method) for k in kinds}

        async def one(kind: Kind, payload: bytes) -> None:
            nonlocal total
            begun = time.monotonic()
            try:
                await calls[kind.method](payload, timeout=30)
                code, detail = "OK", ""
            except grpc.aio.AioRpcError as exc:
                code, detail = exc.code().name, exc.details() or ""
            counts[kind.name][code] = counts[kind.name].get(code, 0) + 1
            total += 1
            if code != kind.expect:
                unexpected.append(f"{kind.name}: {code} {detail[:200]}")
            elif kind.expect == "OK":
                window.append(time.monotonic() - begun)

        async def sample() -> None:
            while time.monotonic() < stop_at:
                await asyncio.sleep(5.0)
                lat = np.array(window) * 1e3 if window else np.zeros(1)
                samples.append(
                    {
                        "t": round(time.monotonic() - started, 1),
                        "rss_mb": round(rss_mb(pid), 2),
                        "requests": total,
                        "unexpected": len(unexpected),
                        "p50_ms": round(float(np.percentile(lat, 50)), 2),
                        "p99_ms": round(float(np.percentile(lat, 99)), 2),
                    }
                )
                window.clear()
                if args.progress:
                    s = samples[-1]
                    print(
                        f"\r  {s['t']:6.0f}s  {s['requests']:7d} requests  RSS {s['rss_mb']:7.1f} MB  "
                        f"p99 {s['p99_ms']:7.1f} ms  unexpected {s['unexpected']}",
                        end="",
                        file=sys.stderr,
                        flush=True,
                    )

        sampler = asyncio.ensure_future(sample())
        tasks: set[asyncio.Task[None]] = set()
        next_at, n = time.monotonic(), 0
        while time.monotonic() < stop_at:
            next_at += rng.exponential(1.0 / args.rate)
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            n += 1
            kind = (
                bad[n // args.bad_every % len(bad)]
                if n % args.bad_every == 0
                else good[rng.choice(len(good), p=weights)]
            )
            task = asyncio.ensure_future(one(kind, kind.payloads[n % len(kind.payloads)]))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)
        await sampler
    if args.progress:
        print(file=sys.stderr)
    return {"counts": counts, "unexpected": unexpected, "samples": samples, "requests": total}


def growth(samples: list[dict], warmup: float) -> tuple[float, float, float]:
    """(first-minute RSS after warm-up, last-minute RSS, growth %), medians over each minute."""
    after = [s for s in samples if s["t"] > warmup]
    if len(after) < 2:
        return float("nan"), float("nan"), float("nan")
    span = max(1, min(12, len(after) // 4))  # a minute of 5 s samples, less on short runs
    first = float(np.median([s["rss_mb"] for s in after[:span]]))
    last = float(np.median([s["rss_mb"] for s in after[-span:]]))
    return first, last, 100.0 * (last - first) / first


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s["t"] / 60 for s in report["samples"]]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(t, [s["rss_mb"] for s in report["samples"]], color="tab:blue", label="server RSS (MB)")
    ax.axvline(report["config"]["warmup"] / 60, color="grey", linestyle=":", label="end of warm-up")
    ax.set_xlabel("minutes")
    ax.set_ylabel("RSS (MB)")
    ax2 = ax.twinx()
    ax2.plot(t, [s["p99_ms"] for s in report["samples"]], color="tab:orange", alpha=0.7, label="p99 latency (ms)")
    ax2.set_ylabel("p99 latency per 5 s (ms)")
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(lines, [str(line.get_label()) for line in lines], loc="lower right")
    r = report["result"]
    ax.set_title(
        f"Soak: {report['requests']} requests at {report['config']['rate']:g}/s, "
        f"{len(report['unexpected'])} unexpected, RSS growth {r['rss_growth_percent']:+.2f}%"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--rate", type=float, default=40.0, help="requests per second (Poisson arrivals)")
    p.add_argument("--warmup", type=float, default=60.0, help="seconds before RSS is compared")
    p.add_argument("--bad-every", type=int, default=20, help="one bad request in this many")
    p.add_argument("--max-growth", type=float, default=5.0, help="allowed RSS growth after warm-up, percent")
    p.add_argument("--out", type=Path, default=RESULTS / "soak.json")
    p.add_argument("--plot", type=Path, default=RESULTS / "soak.png")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "server.log"
        proc, url = start(ROOT / "model_repo", log=log)
        try:
            report = asyncio.run(drive(url, proc.pid, args))
        finally:
            exit_code = stop(proc)
        server_log = log.read_text(errors="replace")
    first, last, pct = growth(report["samples"], args.warmup)
    report["config"] = {k: v for k, v in vars(args).items() if k in ("minutes", "rate", "warmup", "bad_every")}
    report["result"] = {
        "rss_after_warmup_mb": round(first, 2),
        "rss_last_minute_mb": round(last, 2),
        "rss_growth_percent": round(pct, 3),
        "server_exit_code": exit_code,
        "server_tracebacks": server_log.count("Traceback"),
        "passed": not report["unexpected"] and pct < args.max_growth and exit_code == 0,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    if not args.no_plot:
        plot(report, args.plot)
    r = report["result"]
    print(
        f"soak: {report['requests']} requests in {args.minutes:g} min, {len(report['unexpected'])} unexpected; "
        f"RSS {r['rss_after_warmup_mb']:.1f} -> {r['rss_last_minute_mb']:.1f} MB ({r['rss_growth_percent']:+.2f}%); "
        f"server exit {exit_code}"
    )
    for line in report["unexpected"][:10]:
        print("  unexpected:", line)
    return 0 if r["passed"] else 1


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.exit(main())
