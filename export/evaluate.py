"""Stress-set evaluation: the exported graphs, through the server's own pre- and post-processing.

Every figure here is what a client of the Vision API would get: the scene's encoded bytes go through
``prepare`` (decode + the model's resize + normalise), the exported ONNX graph runs in onnxruntime, and the
server's post-processing turns the output into an answer (``classify.top_k``, ``boxes.detect`` +
``Transform.to_original``, ``segment.class_map``, greedy caption decoding as ``tasks/caption.py``).
Detection is scored by pycocotools on ``stress.to_coco``.

The stress scenes come from :mod:`optic.export.stress`, a renderer that shares no code with our training
generator, on seeds listed in :data:`SLICES`; training never calls it. The same metric functions score our own
generator's held-out scenes (the "in-distribution" figures), adapted by :func:`from_scene`.
"""

from __future__ import annotations

import contextlib
import io
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from optic.server.metadata import ModelMeta
from optic.server.tasks.boxes import detect
from optic.server.tasks.classify import top_k
from optic.server.tasks.image import ImageLimits, Transform, image_size, prepare
from optic.server.tasks.segment import class_map

SHAPES = ("circle", "square", "triangle", "star", "hexagon")
COLOR_NAMES = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")

# slice name -> (stress preset, seed, scenes at export time). Seeds are far from every training seed, and the
# training generator never calls the stress renderer at all. tests/test_gates.py re-checks the first scenes of
# the same splits.
SLICES: dict[str, tuple[str, int, int]] = {
    "classification": ("classification", 9_100_003, 1000),
    "single_centered": ("single_centered", 9_200_003, 400),
    "detection": ("detection", 9_300_003, 500),
    "small_objects": ("small_objects", 9_400_003, 300),
    "hd_frames": ("hd_frames", 9_500_003, 60),
    "segmentation": ("segmentation", 9_600_003, 400),
    "caption": ("caption", 9_700_003, 1000),
    "jpeg": ("jpeg", 9_800_003, 300),
}
LIMITS = ImageLimits()
# Detection scoring: every candidate above a low threshold (COCO practice), the server's NMS.
EVAL_CONFIDENCE, EVAL_IOU, EVAL_MAX_DET = 0.001, 0.6, 100


@dataclass(frozen=True, eq=False)
class Sample:
    """One labelled image, renderer-neutral: what the metrics need and nothing else."""

    encoded: bytes  # what a client sends (PNG or JPEG)
    mask: np.ndarray  # (H, W) uint8: 0 background, 1 + class id
    boxes: np.ndarray  # (K, 4) float32 x1, y1, x2, y2, pixel edges (x2 = last column + 1)
    classes: np.ndarray  # (K,) int64
    areas: np.ndarray  # (K,) visible pixels
    largest: int  # index of the object with the largest visible area
    largest_color: str
    caption: str

    @property
    def largest_class(self) -> int:
        return int(self.classes[self.largest])


def from_stress(scene: Any) -> Sample:
    obs = scene.objects
    return Sample(
        scene.encoded,
        scene.mask,
        np.array([o.bbox for o in obs], np.float32).reshape(-1, 4),
        np.array([o.class_id for o in obs], np.int64),
        np.array([o.area for o in obs], np.int64),
        int(scene.largest),
        obs[scene.largest].color,
        scene.caption,
    )


def from_scene(scene: Any) -> Sample:
    """A scene of our own generator (:mod:`optic.export.data`)."""
    return Sample(
        scene.encoded,
        scene.mask,
        np.array([o.bbox for o in scene.objects], np.float32).reshape(-1, 4),
        np.array([o.class_id for o in scene.objects], np.int64),
        np.array([o.area for o in scene.objects], np.int64),
        int(scene.largest),
        scene.objects[scene.largest].color,
        scene.caption,
    )


@lru_cache(maxsize=32)
def _stress_scenes(preset: str, seed: int, n: int, start: int) -> tuple[Any, ...]:
    from optic.export import stress

    return tuple(stress.make_split(preset, seed, n, start))


def stress_split(name: str, n: int | None = None, start: int = 0) -> list[Any]:
    """The first ``n`` (default: the export-time count) StressScenes of a named slice."""
    preset, seed, default = SLICES[name]
    return list(_stress_scenes(preset, seed, default if n is None else n, start))


def stress_samples(name: str, n: int | None = None) -> list[Sample]:
    return [from_stress(s) for s in stress_split(name, n)]


# ---------------------------------------------------------------- running a graph the way the server does


def session(path_or_bytes: str | bytes | Path, threads: int = 2) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = threads
    source = str(path_or_bytes) if isinstance(path_or_bytes, Path) else path_or_bytes
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])


def meta_of(sess: ort.InferenceSession) -> ModelMeta:
    return ModelMeta.from_props(sess.get_modelmeta().custom_metadata_map)


def prepared(samples: Sequence[Sample], meta: ModelMeta) -> tuple[np.ndarray, list[Transform]]:
    assert meta.input is not None
    out = [prepare(s.encoded, meta.input, LIMITS) for s in samples]
    return np.stack([p.tensor for p in out]), [p.transform for p in out]


def run(sess: ort.InferenceSession, x: np.ndarray, batch: int = 32) -> list[np.ndarray]:
    name = sess.get_inputs()[0].name
    parts = [sess.run(None, {name: x[i : i + batch]}) for i in range(0, len(x), batch)]
    return [np.concatenate([p[k] for p in parts]) for k in range(len(parts[0]))]


# ---------------------------------------------------------------- metrics


def classification(sess: ort.InferenceSession, samples: Sequence[Sample]) -> dict[str, float]:
    meta = meta_of(sess)
    x, _ = prepared(samples, meta)
    logits = run(sess, x)[0]
    answers = np.array([top_k(row, meta, 1)[0].class_id for row in logits])
    truth = np.array([s.largest_class for s in samples])
    counts = np.bincount(answers, minlength=len(SHAPES)) / max(1, len(answers))
    return {
        "accuracy": float((answers == truth).mean()),
        "n": len(samples),
        "most_common_answer_share": float(counts.max()),
    }


def _coco_truth(samples: Sequence[Sample]) -> dict[str, Any]:
    images: list[dict[str, Any]] = []
    anns: list[dict[str, Any]] = []
    for img_id, s in enumerate(samples, start=1):
        h, w = s.mask.shape
        images.append({"id": img_id, "width": w, "height": h})
        for (x1, y1, x2, y2), c, a in zip(s.boxes, s.classes, s.areas, strict=True):
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": img_id,
                    "category_id": int(c) + 1,
                    "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
                    "area": float(a),
                    "iscrowd": 0,
                }
            )
    cats = [{"id": i + 1, "name": n} for i, n in enumerate(SHAPES)]
    return {"images": images, "annotations": anns, "categories": cats}


def coco_map(truth: dict[str, Any], results: list[dict[str, Any]], agnostic: bool = False) -> tuple[float, float]:
    """(mAP@0.5, mAP@0.5:0.95) by pycocotools."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not results:
        return 0.0, 0.0
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = truth
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(results), "bbox")
        if agnostic:
            ev.params.useCats = 0
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[1]), float(ev.stats[0])


def detections(sess: ort.InferenceSession, samples: Sequence[Sample]) -> list[dict[str, Any]]:
    """COCO results: the server's decode + NMS, boxes mapped back to the client's pixels."""
    meta = meta_of(sess)
    x, transforms = prepared(samples, meta)
    raw = run(sess, x, batch=16)[0]
    layout = meta.output_layout or "yolov5"
    results: list[dict[str, Any]] = []
    for i, (pred, t) in enumerate(zip(raw, transforms, strict=True), start=1):
        det = detect(pred, layout, EVAL_CONFIDENCE, EVAL_IOU, max_det=EVAL_MAX_DET)
        boxes = t.to_original(det.boxes)
        for (x1, y1, x2, y2), score, c in zip(boxes, det.scores, det.class_ids, strict=True):
            results.append(
                {
                    "image_id": i,
                    "category_id": int(c) + 1,
                    "score": float(score),
                    "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
                }
            )
    return results


def detection(
    sess: ort.InferenceSession, samples: Sequence[Sample], truth: dict[str, Any] | None = None
) -> dict[str, float]:
    truth = truth or _coco_truth(samples)
    results = detections(sess, samples)
    map50, map5095 = coco_map(truth, results)
    agn50, _ = coco_map(truth, results, agnostic=True)
    # Recall at the model's own serving threshold, matched at IoU >= 0.5 with the right class.
    conf = meta_of(sess).detect.confidence_threshold
    hit = total = 0
    by_image: dict[int, list[dict[str, Any]]] = {}
    for r in results:
        if r["score"] >= conf:
            by_image.setdefault(r["image_id"], []).append(r)
    for img_id, s in enumerate(samples, start=1):
        found = by_image.get(img_id, [])
        total += len(s.boxes)
        if not found:
            continue
        fb = np.array([[*r["bbox"][:2], r["bbox"][0] + r["bbox"][2], r["bbox"][1] + r["bbox"][3]] for r in found])
        fc = np.array([r["category_id"] - 1 for r in found])
        iou = _box_iou(s.boxes, fb)
        hit += int(((iou >= 0.5) & (s.classes[:, None] == fc[None, :])).any(1).sum())
    return {
        "map50": map50,
        "map50_95": map5095,
        "map50_agnostic": agn50,
        "recall_at_default_conf": hit / max(1, total),
        "n": len(samples),
    }


def _box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(2)
    area_a = np.clip(a[:, 2:] - a[:, :2], 0, None).prod(1)
    area_b = np.clip(b[:, 2:] - b[:, :2], 0, None).prod(1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def mean_iou(confusion: np.ndarray) -> tuple[float, np.ndarray]:
    inter = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - inter
    iou = np.where(union > 0, inter / np.maximum(union, 1), np.nan)
    return float(np.nanmean(iou)), iou


def segmentation(sess: ort.InferenceSession, samples: Sequence[Sample]) -> dict[str, Any]:
    """Dataset-level mIoU (background + 5 shapes) of the class map at the client's size."""
    meta = meta_of(sess)
    k = len(meta.labels)
    confusion = np.zeros((k, k), np.int64)
    for i in range(0, len(samples), 16):
        chunk = samples[i : i + 16]
        x, transforms = prepared(chunk, meta)
        logits = run(sess, x, batch=16)[0]
        for s, lg, t in zip(chunk, logits, transforms, strict=True):
            pred = class_map(lg, t)
            confusion += np.bincount(s.mask.ravel().astype(np.int64) * k + pred.ravel(), minlength=k * k).reshape(k, k)
    miou, per_class = mean_iou(confusion)
    fg = confusion[1:, 1:].sum()
    fg_iou = fg / max(1, confusion.sum() - confusion[0, 0])
    return {
        "miou": miou,
        "per_class_iou": [round(float(v), 4) for v in per_class],
        "shape_vs_background_iou": float(fg_iou),
        "class_right_on_shape_pixels": float(np.trace(confusion[1:, 1:]) / max(1, confusion[1:, 1:].sum())),
        "n": len(samples),
    }


def greedy_captions(enc: ort.InferenceSession, dec: ort.InferenceSession, x: np.ndarray) -> list[str]:
    """Batched greedy decoding with the pair, as the server's ``greedy`` (argmax, stop at the end token)."""
    meta = meta_of(enc)
    vocab = meta.vocab
    bos, eos = vocab.index(meta.extra["optic.caption.bos"]), vocab.index(meta.extra["optic.caption.eos"])
    max_len = int(meta.extra["optic.caption.max_length"])
    texts: list[str] = []
    for i in range(0, len(x), 64):
        f, h, c = enc.run(None, {enc.get_inputs()[0].name: x[i : i + 64]})
        n = len(f)
        token = np.full(n, bos, np.int64)
        done = np.zeros(n, bool)
        words: list[list[str]] = [[] for _ in range(n)]
        for _ in range(max_len):
            logits, h, c = dec.run(None, {"token": token, "h": h, "c": c, "features": f})
            token = logits.argmax(1).astype(np.int64)
            for j in np.flatnonzero(~done):
                if token[j] == eos:
                    done[j] = True
                else:
                    words[j].append(vocab[token[j]])
            if done.all():
                break
        texts.extend(" ".join(w) for w in words)
    return texts


def named_largest(caption: str) -> tuple[str | None, str | None]:
    """The first colour and the first shape a caption names: its subject, the largest shape."""
    words = caption.split()
    color = next((w for w in words if w in COLOR_NAMES), None)
    shape = next((w for w in words if w in SHAPES), None)
    return color, shape


def stress_wording(caption: str) -> str:
    """Our sentence in the stress renderer's words (it has no size adjectives)."""
    return " ".join(w for w in caption.split() if w not in ("large", "small"))


def bleu4(hypotheses: list[str], references: list[list[str]]) -> float:
    """Corpus BLEU-4 (sacrebleu) against every reference of each image (one or more each), in [0, 1]."""
    import sacrebleu

    most = max(len(r) for r in references)
    streams = [[r[k] if k < len(r) else r[0] for r in references] for k in range(most)]
    return float(sacrebleu.corpus_bleu(hypotheses, streams).score / 100.0)


def captioning(enc: ort.InferenceSession, dec: ort.InferenceSession, samples: Sequence[Sample]) -> dict[str, Any]:
    x, _ = prepared(samples, meta_of(enc))
    hyps = greedy_captions(enc, dec, x)
    named = [named_largest(h) for h in hyps]
    shape_ok = np.array([n[1] == SHAPES[s.largest_class] for n, s in zip(named, samples, strict=True)])
    color_ok = np.array([n[0] == s.largest_color for n, s in zip(named, samples, strict=True)])
    refs = [s.caption for s in samples]
    return {
        "named_largest": float((shape_ok & color_ok).mean()),
        "largest_shape": float(shape_ok.mean()),
        "largest_color": float(color_ok.mean()),
        "bleu4": bleu4(hyps, [[r] for r in refs]),
        "bleu4_stress_wording": bleu4([stress_wording(h) for h in hyps], [[r] for r in refs]),
        "examples": [[h, r] for h, r in zip(hyps[:3], refs[:3], strict=True)],
        "n": len(samples),
    }


# ---------------------------------------------------------------- agreement of two models (int8 vs fp32)


def agreement_argmax(ref: ort.InferenceSession, new: ort.InferenceSession, samples: Sequence[Sample]) -> float:
    """Share of answers on which two models' argmax over the class axis agree: top-1 labels for classifiers,
    pixel classes (at the model's resolution) for segmenters."""
    x, _ = prepared(samples, meta_of(ref))
    return float((run(ref, x)[0].argmax(1) == run(new, x)[0].argmax(1)).mean())


def agreement_boxes(ref: ort.InferenceSession, new: ort.InferenceSession, samples: Sequence[Sample]) -> float:
    """mAP@0.5 of ``new``'s boxes scored against ``ref``'s confident boxes (score >= 0.25) as the truth."""
    images = []
    for img_id, sample in enumerate(samples, start=1):
        size = image_size(sample.encoded)
        if size is None:
            raise ValueError(f"image {img_id}: the header cannot be read")
        images.append({"id": img_id, "width": size[0], "height": size[1]})
    anns = [
        {**r, "id": k, "area": r["bbox"][2] * r["bbox"][3], "iscrowd": 0}
        for k, r in enumerate((r for r in detections(ref, samples) if r["score"] >= 0.25), start=1)
    ]
    if not anns:
        return 1.0
    categories = [{"id": c + 1} for c in range(len(meta_of(ref).labels))]
    return coco_map({"images": images, "annotations": anns, "categories": categories}, detections(new, samples))[0]


# ---------------------------------------------------------------- latency


def latency_ms(fn: Callable[[], object], repeat: int = 30) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1000)


def model_latency(sess: ort.InferenceSession) -> float:
    """Median ms per image, batch 1, onnxruntime CPU (the session's thread count)."""
    meta = meta_of(sess)
    assert meta.input is not None
    x = np.random.default_rng(0).normal(0, 1, (1, 3, *meta.input.size)).astype(np.float32)
    name = sess.get_inputs()[0].name
    return latency_ms(lambda: sess.run(None, {name: x}))


def caption_latency(enc: ort.InferenceSession, dec: ort.InferenceSession, sample: Sample) -> float:
    x, _ = prepared([sample], meta_of(enc))
    return latency_ms(lambda: greedy_captions(enc, dec, x))


# ---------------------------------------------------------------- a whole repository


def evaluate_repository(
    repo: Path, sizes: dict[str, int] | None = None, threads: int = 2, in_distribution: int = 300
) -> dict[str, Any]:
    """Every default model of ``repo`` on every stress slice it is scored on."""
    sizes = sizes or {}

    def split(name: str) -> list[Sample]:
        return stress_samples(name, sizes.get(name, SLICES[name][2]))

    def load(name: str) -> ort.InferenceSession:
        return session(repo / name / "1" / "model.onnx", threads)

    out: dict[str, Any] = {}
    cls = load("classifier")
    out["classifier"] = {
        "classification": classification(cls, split("classification")),
        "single_centered": classification(cls, split("single_centered")),
        "jpeg": classification(cls, split("jpeg")),
        "latency_ms": model_latency(cls),
    }
    det = load("detector")
    out["detector"] = {
        name: detection(det, split(name)) for name in ("detection", "small_objects", "hd_frames", "jpeg")
    }
    out["detector"]["latency_ms"] = model_latency(det)
    seg = load("segmenter")
    out["segmenter"] = {
        "segmentation": segmentation(seg, split("segmentation")),
        "jpeg": segmentation(seg, split("jpeg")),
        "latency_ms": model_latency(seg),
    }
    enc, dec = load("captioner_encoder"), load("captioner_decoder")
    caps = split("caption")
    out["captioner"] = {"caption": captioning(enc, dec, caps), "latency_ms": caption_latency(enc, dec, caps[0])}
    if in_distribution:  # our own generator's held-out scenes, scored the same way
        from optic.export.recipe import in_distribution as held_out

        ours = held_out(in_distribution)
        clear = [s for s in ours if len(s.areas) < 2 or np.sort(s.areas)[-1] >= 1.5 * np.sort(s.areas)[-2]]
        out["classifier"]["in_distribution"] = classification(cls, clear)
        out["detector"]["in_distribution"] = detection(det, ours)
        out["segmenter"]["in_distribution"] = segmentation(seg, ours)
        out["captioner"]["in_distribution"] = captioning(enc, dec, ours)
    for name in ("classifier", "detector", "segmenter", "captioner_encoder", "captioner_decoder"):
        sess = load(name)
        props = sess.get_modelmeta().custom_metadata_map
        out.setdefault("recorded", {})[name] = {k: v for k, v in props.items() if k.startswith("optic.eval")}
    for name in ("classifier", "detector", "segmenter", "captioner_encoder", "captioner_decoder"):
        path = repo / name / "1" / "model.onnx"
        import onnx

        from optic.export.recipe import onnx_params

        out.setdefault("files", {})[name] = {"bytes": path.stat().st_size, "params": onnx_params(onnx.load(str(path)))}
    return out


def main() -> None:  # pragma: no cover - a developer tool: python -m optic.export.evaluate REPO [OUT.json]
    import json
    import sys

    repo = Path(sys.argv[1] if len(sys.argv) > 1 else "model_repo")
    result = evaluate_repository(repo)
    text = json.dumps(result, indent=1)
    if len(sys.argv) > 2:
        Path(sys.argv[2]).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
