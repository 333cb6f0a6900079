"""Scoring a fine-tuned model on the validation split the way the server would answer.

The same code scores the torch model after every epoch (early stopping) and the exported ONNX graph in
onnxruntime at the end (the gate): inputs are the server's ``preprocess`` of each image, outputs go through the
server's post-processing (``boxes.detect`` + ``Transform.to_original``, ``segment.class_map``, greedy caption
decoding), and the answers are compared with the dataset's labels in the image's own pixels. Detection is scored
by pycocotools, captions by sacrebleu (every reference of an image counts).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from optic.export.datasets import read_mask, tokenize
from optic.export.datasets.text import BOS, EOS
from optic.export.evaluate import EVAL_CONFIDENCE, EVAL_IOU, EVAL_MAX_DET, bleu4, coco_map, mean_iou
from optic.export.finetune_data import Split
from optic.export.report import Evaluation
from optic.server.metadata import InputSpec
from optic.server.tasks.boxes import detect
from optic.server.tasks.image import normalize
from optic.server.tasks.segment import class_map

METRIC = {"classify": "accuracy", "detect": "map50", "segment": "mean_iou", "caption": "bleu4"}
METRIC_WORDS = {"accuracy": "accuracy", "map50": "mAP@0.5", "mean_iou": "mIoU", "bleu4": "BLEU-4"}
Run = Callable[[np.ndarray], list[np.ndarray]]
Step = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], list[np.ndarray]]


@dataclass(frozen=True)
class Predictor:
    """A model as functions of numpy arrays: ``run`` the image model (the caption encoder), ``step`` one decoder
    step (captioning only)."""

    run: Run
    step: Step | None = None


def torch_predictor(model: nn.Module, decoder: nn.Module | None = None) -> Predictor:
    @torch.no_grad()
    def run(x: np.ndarray) -> list[np.ndarray]:
        out = model(torch.from_numpy(x))
        return [t.numpy() for t in (out if isinstance(out, tuple) else (out,))]

    @torch.no_grad()
    def step(token: np.ndarray, h: np.ndarray, c: np.ndarray, f: np.ndarray) -> list[np.ndarray]:
        assert decoder is not None
        args = (torch.from_numpy(token), torch.from_numpy(h), torch.from_numpy(c), torch.from_numpy(f))
        return [t.numpy() for t in decoder(*args)]

    return Predictor(run, step if decoder is not None else None)


def ort_predictor(sess: Any, decoder: Any = None) -> Predictor:
    name = sess.get_inputs()[0].name

    def run(x: np.ndarray) -> list[np.ndarray]:
        return list(sess.run(None, {name: x}))

    def step(token: np.ndarray, h: np.ndarray, c: np.ndarray, f: np.ndarray) -> list[np.ndarray]:
        return list(decoder.run(None, {"token": token, "h": h, "c": c, "features": f}))

    return Predictor(run, step if decoder is not None else None)


def _batched(run: Run, x: np.ndarray, batch: int = 16) -> list[np.ndarray]:
    parts = [run(x[i : i + batch]) for i in range(0, len(x), batch)]
    return [np.concatenate([p[k] for p in parts]) for k in range(len(parts[0]))]


class Evaluator:
    """The validation split's inputs and truths, prepared once; :meth:`score` rates a :class:`Predictor`."""

    def __init__(self, task: str, names: tuple[str, ...], spec: InputSpec, split: Split, samples: Sequence[Any],
                 ignore: int, vocab: tuple[str, ...], max_length: int) -> None:  # fmt: skip
        self.task, self.names, self.split, self.samples = task, names, split, samples
        self.ignore, self.vocab, self.max_length = ignore, vocab, max_length
        self.x = normalize(split.images, spec)  # the server's normalisation of the server's resize
        self.metric = METRIC[task]
        self.masks = [read_mask(s.mask_path) for s in samples] if task == "segment" else []

    def score(self, model: Predictor, full: bool = False) -> Evaluation:
        """The val metric; ``full`` adds what the report shows (confusion, PR curves, IoU per class, captions)."""
        if self.task == "classify":
            return self._classify(model, full)
        if self.task == "detect":
            return self._detect(model, full)
        if self.task == "segment":
            return self._segment(model, full)
        return self._caption(model, full)

    def _classify(self, model: Predictor, full: bool) -> Evaluation:
        pred = _batched(model.run, self.x)[0].argmax(1)
        assert self.split.labels is not None
        truth = self.split.labels
        k = len(self.names)
        confusion = np.bincount(truth * k + pred, minlength=k * k).reshape(k, k)
        ev = Evaluation("accuracy", float((pred == truth).mean()))
        ev.extra["chance (most common class)"] = float(np.bincount(truth, minlength=k).max() / len(truth))
        if full:
            ev.confusion = confusion.tolist()
        return ev

    def _coco(self, model: Predictor) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        raw = _batched(model.run, self.x)[0]
        images: list[dict[str, Any]] = []
        truth: list[dict[str, Any]] = []
        results: list[dict[str, Any]] = []
        for i, (s, pred, t) in enumerate(zip(self.samples, raw, self.split.transforms, strict=True), start=1):
            images.append({"id": i, "width": s.width, "height": s.height})
            for (x1, y1, x2, y2), c in zip(s.boxes, s.classes, strict=True):
                w, h = float(x2 - x1), float(y2 - y1)
                truth.append({"id": len(truth) + 1, "image_id": i, "category_id": int(c) + 1,
                              "bbox": [float(x1), float(y1), w, h], "area": w * h, "iscrowd": 0})  # fmt: skip
            det = detect(pred, "yolov8", EVAL_CONFIDENCE, EVAL_IOU, max_det=EVAL_MAX_DET)
            for (x1, y1, x2, y2), score, c in zip(t.to_original(det.boxes), det.scores, det.class_ids, strict=True):
                results.append({"image_id": i, "category_id": int(c) + 1, "score": float(score),
                                "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)]})  # fmt: skip
        cats = [{"id": i + 1, "name": n} for i, n in enumerate(self.names)]
        return {"images": images, "annotations": truth, "categories": cats}, results

    def _detect(self, model: Predictor, full: bool) -> Evaluation:
        truth, results = self._coco(model)
        map50, map5095 = coco_map(truth, results)
        ev = Evaluation("map50", map50, {"map50_95": map5095})
        if full:
            ev.pr_curves = pr_curves(truth, results, self.names)
        return ev

    def _segment(self, model: Predictor, full: bool) -> Evaluation:
        k = len(self.names)
        confusion = np.zeros((k, k), np.int64)
        for i in range(0, len(self.x), 16):
            logits = model.run(self.x[i : i + 16])[0]
            for j, lg in enumerate(logits, start=i):
                pred = class_map(lg, self.split.transforms[j])
                truth = self.masks[j]
                keep = truth != self.ignore
                confusion += np.bincount(truth[keep].astype(np.int64) * k + pred[keep], minlength=k * k).reshape(k, k)
        miou, per_class = mean_iou(confusion)
        ev = Evaluation("mean_iou", 0.0 if np.isnan(miou) else miou)
        ev.extra["pixel accuracy"] = float(np.trace(confusion) / max(1, confusion.sum()))
        if full:
            ev.class_iou = {n: float(v) for n, v in zip(self.names, per_class, strict=True) if not np.isnan(v)}
        return ev

    def captions(self, model: Predictor) -> list[str]:
        """Greedy decoding, as the server's default: argmax each step, stop at ``<eos>``."""
        assert model.step is not None
        bos, eos = self.vocab.index(BOS), self.vocab.index(EOS)
        texts: list[str] = []
        for i in range(0, len(self.x), 32):
            f, h, c = model.run(self.x[i : i + 32])
            token = np.full(len(f), bos, np.int64)
            words: list[list[str]] = [[] for _ in range(len(f))]
            done = np.zeros(len(f), bool)
            for _ in range(self.max_length):
                logits, h, c = model.step(token, h, c, f)
                token = logits.argmax(1).astype(np.int64)
                for j in np.flatnonzero(~done):
                    if token[j] == eos:
                        done[j] = True
                    else:
                        words[j].append(self.vocab[token[j]])
                if done.all():
                    break
            texts += [" ".join(w) for w in words]
        return texts

    def _caption(self, model: Predictor, full: bool) -> Evaluation:
        hyps = self.captions(model)
        refs = [[" ".join(tokenize(c)) for c in caps] for caps in self.split.captions]
        ev = Evaluation("bleu4", bleu4(hyps, refs))
        if full:
            ev.captions = [(s.path.name, h, r[0]) for s, h, r in zip(self.samples[:12], hyps, refs, strict=False)]
        return ev


def pr_curves(truth: dict[str, Any], results: list[dict[str, Any]], names: Sequence[str]
              ) -> dict[str, tuple[list[float], list[float]]]:  # fmt: skip
    """Per class, pycocotools' interpolated precision at the 101 recall points, IoU 0.5, every area, 100 boxes."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not results:
        return {}
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = truth
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(results), "bbox")
        ev.evaluate()
        ev.accumulate()
    precision = ev.eval["precision"][0, :, :, 0, -1]  # recall points x classes
    recall = [float(r) for r in ev.params.recThrs]
    curves = {}
    for k, name in enumerate(names):
        p = precision[:, k]
        if (p >= 0).any():
            curves[name] = (recall, [float(v) for v in p.clip(min=0)])
    return curves
