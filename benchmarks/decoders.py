"""Which JPEG decoder and resize path per image, and what each costs in fidelity (issue 18, item 3).

Every candidate turns a JPEG into a model's input-sized RGB image; the time is
the median of single-threaded runs, the fidelity is the mean absolute
difference (0-255) from the reference pipeline's pixels (Pillow decode +
Pillow bilinear for our models and torchvision's, OpenCV for Ultralytics'),
so "faster" is never read without "how different". Optional decoders
(simplejpeg) are measured when importable: ``pip install simplejpeg``.

    python benchmarks/decoders.py [--reps 30] [--json benchmarks/results/decoders.json]
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import platform
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

Decoder = Callable[[bytes, int], np.ndarray]  # (jpeg, target side) -> (H, W, 3) uint8 RGB at any size >= target


def photo_like(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A JPEG-realistic scene: smooth gradients, shapes with edges and sensor-like noise (not flat colour, which
    JPEG compresses to nothing, nor white noise, which no camera produces)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack([128 + 100 * np.sin(xx / 97), 128 + 100 * np.cos(yy / 71), 128 + 80 * np.sin((xx + yy) / 53)], -1)
    for _ in range(25):
        cx, cy, r = rng.integers(0, width), rng.integers(0, height), rng.integers(height // 30, height // 6)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        cv2.circle(img, (int(cx), int(cy)), int(r), colour, -1, lineType=cv2.LINE_AA)
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def jpeg(pixels: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


# ------------------------------------------------------------------ decoders


def pillow_full(data: bytes, side: int) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


def pillow_draft(data: bytes, side: int) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        img.draft("RGB", (side, side))
        return np.asarray(img.convert("RGB"))


def opencv_full(data: bytes, side: int) -> np.ndarray:
    return cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


_REDUCED = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}


def opencv_reduced(data: bytes, side: int) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as header:  # the size from the header, no pixels decoded
        w, h = header.size
    factor = 1
    while factor < 8 and min(h, w) // (factor * 2) >= side:
        factor *= 2
    flag = _REDUCED.get(factor, cv2.IMREAD_COLOR)
    return cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), flag), cv2.COLOR_BGR2RGB)


def simplejpeg_decoders() -> dict[str, Decoder]:
    try:
        import simplejpeg
    except ImportError:
        return {}

    def full(data: bytes, side: int) -> np.ndarray:
        return simplejpeg.decode_jpeg(data, colorspace="RGB")

    def scaled(data: bytes, side: int) -> np.ndarray:
        return simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=side, min_width=side)

    return {"simplejpeg": full, "simplejpeg (DCT scaled)": scaled}


# ------------------------------------------------------------------ resizers (RGB uint8 -> (side, side))


def pillow_bilinear(pixels: np.ndarray, side: int) -> np.ndarray:
    return np.asarray(Image.fromarray(pixels).resize((side, side), Image.Resampling.BILINEAR))


def pillow_reducing_gap(pixels: np.ndarray, side: int) -> np.ndarray:
    return np.asarray(Image.fromarray(pixels).resize((side, side), Image.Resampling.BILINEAR, reducing_gap=2.0))


def opencv_linear(pixels: np.ndarray, side: int) -> np.ndarray:
    return cv2.resize(pixels, (side, side), interpolation=cv2.INTER_LINEAR)


def opencv_area(pixels: np.ndarray, side: int) -> np.ndarray:
    return cv2.resize(pixels, (side, side), interpolation=cv2.INTER_AREA)


RESIZERS = {"Pillow bilinear": pillow_bilinear, "Pillow bilinear, reducing_gap=2": pillow_reducing_gap,
            "OpenCV INTER_LINEAR": opencv_linear, "OpenCV INTER_AREA": opencv_area}  # fmt: skip


def timed(fn: Callable[[], object], reps: int, calls: int = 1) -> float:
    """Median ms per call over ``reps`` rounds of ``calls`` calls, after one unmeasured call (the benchmarks'
    one timer: a round of many calls smooths a call shorter than the clock's noise)."""
    fn()
    rounds = []
    for _ in range(reps):
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        rounds.append((time.perf_counter() - started) / calls)
    return statistics.median(rounds) * 1e3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--json", type=Path, default=Path("benchmarks/results/decoders.json"))
    args = p.parse_args(argv)
    cv2.setNumThreads(1)
    decoders: dict[str, Decoder] = {"Pillow": pillow_full, "Pillow draft": pillow_draft, "OpenCV": opencv_full,
                                    "OpenCV IMREAD_REDUCED": opencv_reduced, **simplejpeg_decoders()}  # fmt: skip
    rows = []
    for height, width in ((480, 640), (1080, 1920)):
        data = jpeg(photo_like(height, width))
        for side in (224, 256, 640):  # torchvision crops, our default models, Ultralytics
            reference = pillow_bilinear(pillow_full(data, side), side).astype(np.float32)
            ultralytics = opencv_linear(opencv_full(data, side), side).astype(np.float32)
            for dname, decode in decoders.items():
                decode_ms = timed(functools.partial(decode, data, side), args.reps)
                decoded = decode(data, side)
                for rname, resize in RESIZERS.items():
                    resize_ms = timed(functools.partial(resize, decoded, side), args.reps)
                    out = resize(decoded, side).astype(np.float32)
                    rows.append({
                        "image": f"{width}x{height}", "target": side, "decoder": dname, "resize": rname,
                        "decoded": f"{decoded.shape[1]}x{decoded.shape[0]}", "decode_ms": round(decode_ms, 3),
                        "resize_ms": round(resize_ms, 3), "total_ms": round(decode_ms + resize_ms, 3),
                        "mad_vs_pillow_reference": round(float(np.abs(out - reference).mean()), 3),
                        "mad_vs_ultralytics_reference": round(float(np.abs(out - ultralytics).mean()), 3),
                    })  # fmt: skip
                    print(f"{width}x{height} -> {side}: {dname:24s} {rname:32s} {decode_ms:7.2f} + {resize_ms:6.2f} ms"
                          f"  MAD vs Pillow {rows[-1]['mad_vs_pillow_reference']:.2f}")  # fmt: skip
    meta = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": platform.machine(),
            "python": platform.python_version(), "opencv": cv2.__version__, "pillow": Image.__version__,
            "threads": 1, "reps": args.reps}  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
