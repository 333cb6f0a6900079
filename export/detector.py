"""Recipe: the anchor-free multi-stride shape detector, gated on pycocotools mAP over the stress set.

The detector is the shared trunk (:mod:`optic.export.train`) with a decoupled head on strides 8, 16 and 32
(box sides as distributions over 16 bins, DFL; class probabilities), trained with YOLOv8's task-aligned
assigner. The exported graph decodes in-graph to the ``yolov8`` layout ``[N, 4 + C, A]``: cx, cy, w, h in
input pixels and class probabilities; the server does NMS.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from optic.export import evaluate
from optic.export.data import SHAPES, Scene
from optic.export.models import ExportedDetector, anchor_points
from optic.export.onnx_export import parity, to_onnx
from optic.export.onnx_io import set_metadata
from optic.export.recipe import ModelReport, finish, gate_props, in_distribution, served_spec
from optic.export.train import TrunkRecipe, trained
from optic.server.metadata import DetectDefaults, ModelMeta

STRIDE = 8  # the finest of the three strides
# The trunk trains on 256 x 256 letterboxed scenes; the detector is exported at 384: the same fully
# convolutional weights see every shape 1.5x larger, which is what small shapes need (docs/models.md).
SIZE = 384
INPUT_SPEC = replace(TrunkRecipe().input_spec, size=(SIZE, SIZE))
TEST_SEED = 2_000_003
# The simple scenes the examples and end-to-end tests use for detection (96 x 96, up to 3 neighbours).
SCENE_ARGS: dict[str, Any] = {"size": 96, "max_distractors": 3, "distractor_scale": (0.35, 0.8)}
DEFAULTS = DetectDefaults(confidence_threshold=0.25, iou_threshold=0.5, max_detections=300)


@dataclass(frozen=True)
class DetectorRecipe:
    seed: int = 0
    trunk: TrunkRecipe = field(default_factory=TrunkRecipe)
    size: int | None = SIZE  # exported input side (None: the trunk's training size)
    test_size: int | None = None  # stress scenes per slice (None: evaluate.SLICES' counts)
    gate: float = 0.90  # mAP@0.5 on the stress detection slice
    gate_map: float = 0.70  # mAP@0.5:0.95 on the same slice
    gate_small: float = 0.80  # mAP@0.5 on the small-object slice
    tolerance: float = 1e-3  # pixels on box coordinates; scores are in [0, 1]


# ---------------------------------------------------------------- task-aligned assignment and the loss


def _iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of broadcastable (..., 4) xyxy boxes."""
    lt, rb = torch.max(a[..., :2], b[..., :2]), torch.min(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = (a[..., 2:] - a[..., :2]).clamp(min=0).prod(-1) + (b[..., 2:] - b[..., :2]).clamp(min=0).prod(-1)
    return inter / (union - inter + 1e-7)


def ciou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Complete IoU of matching rows of (K, 4) xyxy boxes: IoU, centre distance and aspect terms."""
    iou = _iou(a, b)
    wa, ha = (a[:, 2] - a[:, 0]).clamp(min=1e-6), (a[:, 3] - a[:, 1]).clamp(min=1e-6)
    wb, hb = (b[:, 2] - b[:, 0]).clamp(min=1e-6), (b[:, 3] - b[:, 1]).clamp(min=1e-6)
    hull = torch.max(a[:, 2:], b[:, 2:]) - torch.min(a[:, :2], b[:, :2])
    c2 = (hull**2).sum(1) + 1e-7
    rho2 = (((a[:, :2] + a[:, 2:]) - (b[:, :2] + b[:, 2:])) ** 2).sum(1) / 4
    v = (4 / math_pi2) * (torch.atan(wb / hb) - torch.atan(wa / ha)) ** 2
    with torch.no_grad():
        alpha = v / (v - iou + (1 + 1e-7))
    return iou - (rho2 / c2 + v * alpha)


math_pi2 = float(np.pi**2)


@torch.no_grad()
def assign(
    scores: torch.Tensor,
    pred: torch.Tensor,
    points: torch.Tensor,
    strides: torch.Tensor,
    gt: torch.Tensor,
    gt_cls: torch.Tensor,
    gt_mask: torch.Tensor,
    topk: int = 10,
    alpha: float = 0.5,
    beta: float = 6.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """YOLOv8's task-aligned assigner: each object takes the ``topk`` cells (near it) whose prediction best
    combines its class score and box IoU; returns target boxes (B, A, 4), soft class targets (B, A, C) and the
    foreground mask (B, A)."""
    b, a, c = scores.shape
    m = gt.shape[1]
    centre = (gt[..., :2] + gt[..., 2:]) / 2
    half = (gt[..., 2:] - gt[..., :2]) / 2
    # A cell is a candidate when its centre lies in the box, grown to half a cell for boxes smaller than one.
    reach = torch.max(half.unsqueeze(2), strides.view(1, 1, a, 1) / 2)
    inside = ((points.view(1, 1, a, 2) - centre.unsqueeze(2)).abs() < reach).all(-1) & gt_mask.unsqueeze(2)
    iou = _iou(gt.unsqueeze(2), pred.unsqueeze(1)).clamp(min=0)  # B, M, A
    cls_score = torch.gather(scores.transpose(1, 2), 1, gt_cls.unsqueeze(-1).expand(b, m, a))
    align = cls_score.pow(alpha) * iou.pow(beta) * inside
    k = min(topk, a)
    top = align.topk(k, dim=-1).indices
    chosen = torch.zeros_like(inside).scatter_(2, top, True) & inside
    many = chosen.sum(1) > 1  # B, A: a cell claimed by several objects goes to the one it overlaps most
    if many.any():
        best = nn.functional.one_hot((iou * inside).argmax(1), m).transpose(1, 2).bool()
        chosen = torch.where(many.unsqueeze(1), best & inside, chosen)
    fg = chosen.any(1)
    target = chosen.float().argmax(1)  # B, A
    boxes = torch.gather(gt, 1, target.unsqueeze(-1).expand(b, a, 4))
    labels = torch.gather(gt_cls, 1, target)
    align = align * chosen
    norm = (align * (iou * chosen).amax(-1, keepdim=True) / (align.amax(-1, keepdim=True) + 1e-9)).amax(1)
    soft = nn.functional.one_hot(labels, c).float() * (norm * fg).unsqueeze(-1)
    return boxes, soft, fg


def detection_loss(
    head: Any, box: torch.Tensor, cls: torch.Tensor, size: int, batch: dict[str, torch.Tensor]
) -> torch.Tensor:
    """YOLOv8's loss: BCE on task-aligned soft class targets, CIoU and DFL on the boxes of assigned cells."""
    points, strides = anchor_points((size, size))
    dist = head.distances(box)  # B, A, 4 in stride units
    d = dist * strides.view(1, -1, 1)
    pred = torch.cat([points - d[..., :2], points + d[..., 2:]], -1)
    target, soft, fg = assign(cls.detach().sigmoid(), pred.detach(), points, strides, batch["boxes"],
                              batch["classes"], batch["box_mask"])
    norm = soft.sum().clamp(min=1.0)
    cls_loss = nn.functional.binary_cross_entropy_with_logits(cls, soft, reduction="sum") / norm
    if not fg.any():
        return 0.5 * cls_loss + 0 * box.sum()
    weight = soft.sum(-1)[fg]
    box_loss = ((1 - ciou(pred[fg], target[fg])) * weight).sum() / norm
    # DFL: the two bins around each true side length (in stride units) share the probability.
    reg_max = head.reg_max
    s = strides.view(1, -1, 1).expand_as(d)[fg]
    p = points.unsqueeze(0).expand(fg.shape[0], -1, -1)[fg]
    t = target[fg]
    ltrb = (torch.cat([p - t[:, :2], t[:, 2:] - p], 1) / s).clamp(0, reg_max - 1.01)
    left = ltrb.floor().long()
    wl = left + 1 - ltrb
    logits = box[fg].view(-1, 4, reg_max)
    logp = logits.log_softmax(-1)
    at_left = logp.gather(-1, left.unsqueeze(-1)).squeeze(-1)
    at_right = logp.gather(-1, (left + 1).unsqueeze(-1)).squeeze(-1)
    dfl = -(at_left * wl + at_right * (1 - wl))
    dfl_loss = (dfl.mean(-1) * weight).sum() / norm
    return 7.5 * box_loss + 0.5 * cls_loss + 1.5 * dfl_loss


# ---------------------------------------------------------------- the recipe


def boxes_of(scene: Scene) -> np.ndarray:
    """(K, 5): x1, y1, x2, y2, class id."""
    return np.array([[*o.bbox, o.class_id] for o in scene.objects], dtype=np.float32).reshape(-1, 5)


def build(out: Path, recipe: DetectorRecipe | None = None, progress: bool = True) -> ModelReport:
    recipe = recipe or DetectorRecipe()
    started = time.monotonic()
    trunk = trained(recipe.trunk, progress)
    spec = served_spec(recipe.trunk.input_spec)
    if recipe.size is not None:
        spec = replace(spec, size=(recipe.size, recipe.size))
    exported = ExportedDetector(trunk.net, spec.size).eval()
    rng = np.random.default_rng(recipe.seed)
    sample = torch.from_numpy(rng.uniform(0, 1, (2, 3, *spec.size)).astype(np.float32))
    proto = to_onnx(exported, sample, "images", "detections")
    meta = ModelMeta(
        task="detection", labels=SHAPES, input=spec, output_kind="probabilities", output_layout="yolov8",
        detect=DEFAULTS,
        extra={"optic.detector.strides": "[8, 16, 32]", "optic.detector.head": "anchor-free, DFL (16 bins)"},
    )
    set_metadata(proto, meta.to_props())
    sess = evaluate.session(proto.SerializeToString())
    n = recipe.test_size
    results = {
        name: evaluate.detection(sess, evaluate.stress_samples(name, n)) for name in ("detection", "small_objects")
    }
    results["in_distribution"] = evaluate.detection(sess, in_distribution(n))
    probes = [rng.uniform(0, 1, (1, 3, *spec.size)).astype(np.float32),
              rng.uniform(-0.5, 1.5, (3, 3, *spec.size)).astype(np.float32)]
    check = parity(exported, sess, probes, recipe.tolerance)
    gates = {
        "map50": (results["detection"]["map50"], recipe.gate),
        "map50_95": (results["detection"]["map50_95"], recipe.gate_map),
        "small_map50": (results["small_objects"]["map50"], recipe.gate_small),
    }
    props = gate_props(gates, results, check.max_abs_diff, "stress detection + small_objects slices")
    set_metadata(proto, {**meta.to_props(), **props}, doc="Optic shape detector (anchor-free, strides 8/16/32)")
    return finish("detector", out, {"detector": proto}, [exported], gates, check.max_abs_diff, recipe, started,
                  results)
