"""Recipe: the YOLO-style shape detector, gated on mAP@0.5 computed by pycocotools."""

from __future__ import annotations

import contextlib
import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from optic.export.data import SHAPES, Scene, make_scenes
from optic.export.models import DecodedDetector, ShapeDetector
from optic.export.onnx_export import parity, to_onnx
from optic.export.onnx_io import ort_predict, session, set_metadata
from optic.export.recipe import ModelReport, eval_props, finish
from optic.export.train import seed_everything
from optic.server.metadata import InputSpec, ModelMeta
from optic.server.tasks.boxes import detect
from optic.server.tasks.image import normalize

SIZE = 96
INPUT_SPEC = InputSpec(size=(SIZE, SIZE), resize="letterbox", scale=1.0 / 255.0)
SCENE_ARGS: dict[str, Any] = {"size": SIZE, "max_distractors": 3, "distractor_scale": (0.35, 0.8)}
TEST_SEED = 2_000_003
STRIDE = 8
NUM_ANCHORS = 3


@dataclass(frozen=True)
class DetectorRecipe:
    seed: int = 0
    epochs: int = 12
    train_size: int = 6144
    test_size: int = 500
    width: int = 16
    batch_size: int = 64
    lr: float = 4e-3
    gate: float = 0.80  # mAP@0.5, pycocotools, after NMS
    tolerance: float = 1e-3  # pixels on box coordinates; scores are in [0, 1]


def boxes_of(scene: Scene) -> np.ndarray:
    """(K, 5): x1, y1, x2, y2, class id."""
    return np.array([[*o.bbox, o.class_id] for o in scene.objects], dtype=np.float32).reshape(-1, 5)


def kmeans_anchors(wh: np.ndarray, k: int, iterations: int = 50) -> np.ndarray:
    """k-means on box sizes with 1 - IoU as the distance (YOLOv2), deterministic quantile start."""
    wh = wh[np.argsort(wh.prod(1))]
    centers = wh[np.linspace(0, len(wh) - 1, k).astype(int)].copy()
    for _ in range(iterations):
        inter = np.minimum(wh[:, None, 0], centers[None, :, 0]) * np.minimum(wh[:, None, 1], centers[None, :, 1])
        iou = inter / (wh.prod(1)[:, None] + centers.prod(1)[None, :] - inter)
        nearest = iou.argmax(1)
        new = np.array([wh[nearest == j].mean(0) if (nearest == j).any() else centers[j] for j in range(k)])
        if np.allclose(new, centers):
            break
        centers = new
    return centers[np.argsort(centers.prod(1))].astype(np.float32)


def build_targets(boxes: list[np.ndarray], anchors: np.ndarray, grid: int) -> tuple[torch.Tensor, ...]:
    """Dense targets: positive mask (N, S, S, B), GT boxes (N, S, S, B, 4) xyxy, class ids (N, S, S, B)."""
    n, b = len(boxes), len(anchors)
    pos = np.zeros((n, grid, grid, b), dtype=bool)
    gt = np.zeros((n, grid, grid, b, 4), dtype=np.float32)
    cls = np.zeros((n, grid, grid, b), dtype=np.int64)
    for i, bx in enumerate(boxes):
        for x1, y1, x2, y2, c in bx:
            w, h = max(x2 - x1, 1.0), max(y2 - y1, 1.0)
            gx = min(int((x1 + x2) / 2 / STRIDE), grid - 1)
            gy = min(int((y1 + y2) / 2 / STRIDE), grid - 1)
            ratio = np.maximum(np.array([w, h]) / anchors, anchors / np.array([w, h])).max(1)
            chosen = np.flatnonzero(ratio < 4.0)  # YOLOv5's rule: anchors within 4x either way...
            if chosen.size == 0:
                chosen = np.array([ratio.argmin()])  # ...or at least the closest one
            pos[i, gy, gx, chosen] = True
            gt[i, gy, gx, chosen] = (x1, y1, x2, y2)
            cls[i, gy, gx, chosen] = int(c)
    return torch.from_numpy(pos), torch.from_numpy(gt), torch.from_numpy(cls)


def giou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Generalised IoU of matching rows of (K, 4) xyxy boxes."""
    lt, rb = torch.max(a[:, :2], b[:, :2]), torch.min(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(1)
    area_a, area_b = (a[:, 2:] - a[:, :2]).prod(1), (b[:, 2:] - b[:, :2]).prod(1)
    union = area_a + area_b - inter + 1e-7
    hull = (torch.max(a[:, 2:], b[:, 2:]) - torch.min(a[:, :2], b[:, :2])).prod(1) + 1e-7
    iou = inter / union
    return iou - (hull - union) / hull


def detection_loss(
    model: ShapeDetector, raw: torch.Tensor, pos: torch.Tensor, gt: torch.Tensor, cls: torch.Tensor
) -> torch.Tensor:
    n, _, s, _ = raw.shape
    b, c = int(model.anchors.shape[0]), model.num_classes
    logits = raw.view(n, b, 5 + c, s, s).permute(0, 3, 4, 1, 2)  # N, S, S, B, 5+C (decode's order)
    decoded = model.decode(raw).view(n, s, s, b, 5 + c)
    obj_target = pos.float()
    obj_all = nn.functional.binary_cross_entropy_with_logits(logits[..., 4], obj_target)
    if not pos.any():
        return obj_all
    p = decoded[pos][:, :4]
    pred_xyxy = torch.cat([p[:, :2] - p[:, 2:] / 2, p[:, :2] + p[:, 2:] / 2], 1)
    box = (1 - giou(pred_xyxy, gt[pos])).mean()
    obj_pos = nn.functional.binary_cross_entropy_with_logits(logits[..., 4][pos], obj_target[pos])
    onehot = nn.functional.one_hot(cls[pos], c).float()
    cls_loss = nn.functional.binary_cross_entropy_with_logits(logits[..., 5:][pos], onehot)
    return 2.0 * box + obj_all * 4.0 + obj_pos + cls_loss


def coco_map50(preds: np.ndarray, truth: list[np.ndarray], layout: str = "yolov5") -> float:
    """mAP@0.5 over all classes, by pycocotools, after NMS."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images: list[dict] = []
    annotations: list[dict] = []
    results: list[dict] = []
    for i, (pred, boxes) in enumerate(zip(preds, truth, strict=True)):
        images.append({"id": i, "width": SIZE, "height": SIZE})
        for x1, y1, x2, y2, c in boxes:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i,
                    "category_id": int(c) + 1,
                    "iscrowd": 0,
                    "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
                    "area": float((x2 - x1) * (y2 - y1)),
                }
            )
        det = detect(pred, layout, conf_threshold=0.001, iou_threshold=0.6, max_det=100)
        for (x1, y1, x2, y2), score, c in zip(det.boxes, det.scores, det.class_ids, strict=True):
            results.append(
                {
                    "image_id": i,
                    "category_id": int(c) + 1,
                    "score": float(score),
                    "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
                }
            )
    if not results:
        return 0.0
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {
            "images": images,
            "annotations": annotations,
            "categories": [{"id": k + 1, "name": n} for k, n in enumerate(SHAPES)],
        }
        gt.createIndex()
        evaluator = COCOeval(gt, gt.loadRes(results), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return float(evaluator.stats[1])


def _data(count: int, seed: int) -> tuple[np.ndarray, list[np.ndarray]]:
    scenes = make_scenes(count, seed, **SCENE_ARGS)
    return normalize(np.stack([s.image for s in scenes]), INPUT_SPEC), [boxes_of(s) for s in scenes]


def build(out: Path, recipe: DetectorRecipe | None = None, progress: bool = True) -> ModelReport:
    recipe = recipe or DetectorRecipe()
    started = time.monotonic()
    seed_everything(recipe.seed)
    x_train, boxes_train = _data(recipe.train_size, recipe.seed)
    x_test, boxes_test = _data(recipe.test_size, TEST_SEED)
    wh = np.concatenate([b[:, 2:4] - b[:, :2] for b in boxes_train])
    anchors = kmeans_anchors(wh, NUM_ANCHORS)
    model = ShapeDetector(len(SHAPES), torch.from_numpy(anchors), width=recipe.width, stride=STRIDE)
    grid = SIZE // STRIDE
    pos, gt, cls = build_targets(boxes_train, anchors, grid)
    # Horizontal flips double the data; their targets are built once, up front.
    flipped = [np.stack([SIZE - 1 - b[:, 2], b[:, 1], SIZE - 1 - b[:, 0], b[:, 3], b[:, 4]], 1) for b in boxes_train]
    pos_f, gt_f, cls_f = build_targets(flipped, anchors, grid)
    x_all = torch.from_numpy(x_train)

    steps = recipe.epochs * (recipe.train_size // recipe.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, recipe.lr, total_steps=steps, pct_start=0.15)
    bar = tqdm(total=steps, desc="detector", unit="step", disable=not progress)
    model.train()
    for _ in range(recipe.epochs):
        perm = torch.randperm(recipe.train_size)
        for k in range(recipe.train_size // recipe.batch_size):
            idx = perm[k * recipe.batch_size : (k + 1) * recipe.batch_size]
            flip = torch.rand(len(idx)) < 0.5
            x = x_all[idx].clone()
            x[flip] = x[flip].flip(-1)
            f = flip.view(-1, 1, 1, 1)
            t_pos = torch.where(f, pos_f[idx], pos[idx])
            t_gt = torch.where(f.unsqueeze(-1), gt_f[idx], gt[idx])
            t_cls = torch.where(f, cls_f[idx], cls[idx])
            loss = detection_loss(model, model(x), t_pos, t_gt, t_cls)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    model.eval()

    exported = DecodedDetector(model).eval()
    proto = to_onnx(exported, torch.from_numpy(x_test[:2]), "images", "detections")
    sess = session(proto)
    value = coco_map50(ort_predict(sess, x_test), boxes_test)
    rng = np.random.default_rng(recipe.seed)
    probes = [x_test[:1], x_test[:7], rng.uniform(-0.5, 1.5, (3, *x_test.shape[1:])).astype(np.float32)]
    check = parity(exported, sess, probes, recipe.tolerance)
    split = f"{recipe.test_size} synthetic scenes, seed {TEST_SEED}"
    meta = ModelMeta(
        task="detection",
        labels=SHAPES,
        input=INPUT_SPEC,
        output_kind="probabilities",
        output_layout="yolov5",
        extra={
            "optic.detector.anchors": str(anchors.round(2).tolist()),
            "optic.detector.stride": str(STRIDE),
            **eval_props("map50", value, split, check.max_abs_diff),
        },
    )
    set_metadata(proto, meta.to_props(), doc="Optic shape detector (YOLO-style, synthetic scenes)")
    return finish("detector", out, {"detector": proto}, [model], "mAP@0.5", value, check.max_abs_diff, recipe, started)
