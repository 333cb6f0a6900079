"""Recipe: the FCN shape segmenter, gated on mean IoU over background + shape classes."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from optic.export.data import SHAPES, make_scenes
from optic.export.models import ShapeSegmenter
from optic.export.onnx_export import parity, to_onnx
from optic.export.onnx_io import ort_predict, session, set_metadata
from optic.export.recipe import ModelReport, eval_props, finish
from optic.export.train import seed_everything
from optic.server.metadata import InputSpec, ModelMeta
from optic.server.tasks.image import normalize

LABELS = ("background", *SHAPES)
INPUT_SPEC = InputSpec(size=(64, 64), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
TEST_SEED = 3_000_003


@dataclass(frozen=True)
class SegmenterRecipe:
    seed: int = 0
    epochs: int = 8
    train_size: int = 4096
    test_size: int = 500
    width: int = 12
    batch_size: int = 32
    lr: float = 4e-3
    gate: float = 0.80  # mean IoU over the 6 classes
    tolerance: float = 1e-3  # on logits


def mean_iou(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> tuple[float, np.ndarray]:
    """Dataset-level IoU per class (intersections and unions summed over all pixels), and their mean."""
    confusion = np.bincount(truth.ravel() * num_classes + pred.ravel(), minlength=num_classes**2)
    confusion = confusion.reshape(num_classes, num_classes)
    inter = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - inter
    iou = np.where(union > 0, inter / np.maximum(union, 1), np.nan)
    return float(np.nanmean(iou)), iou


def _data(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    scenes = make_scenes(count, seed, size=INPUT_SPEC.size[0])
    return normalize(np.stack([s.image for s in scenes]), INPUT_SPEC), np.stack([s.mask for s in scenes])


def build(out: Path, recipe: SegmenterRecipe | None = None, progress: bool = True) -> ModelReport:
    recipe = recipe or SegmenterRecipe()
    started = time.monotonic()
    seed_everything(recipe.seed)
    x_train, y_train = _data(recipe.train_size, recipe.seed)
    x_test, y_test = _data(recipe.test_size, TEST_SEED)
    x_all, y_all = torch.from_numpy(x_train), torch.from_numpy(y_train.astype(np.int64))
    model = ShapeSegmenter(len(LABELS), width=recipe.width)

    steps_per_epoch = recipe.train_size // recipe.batch_size
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, recipe.lr, total_steps=recipe.epochs * steps_per_epoch)
    bar = tqdm(total=recipe.epochs * steps_per_epoch, desc="segmenter", unit="step", disable=not progress)
    model.train()
    for _ in range(recipe.epochs):
        perm = torch.randperm(recipe.train_size)
        for k in range(steps_per_epoch):
            idx = perm[k * recipe.batch_size : (k + 1) * recipe.batch_size]
            x, y = x_all[idx], y_all[idx]
            flip = torch.rand(len(idx)) < 0.5  # masks flip with their images
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
            y = torch.where(flip.view(-1, 1, 1), y.flip(-1), y)
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    model.eval()

    proto = to_onnx(model, torch.from_numpy(x_test[:2]), "images", "logits")
    sess = session(proto)
    pred = np.concatenate([ort_predict(sess, x_test[i : i + 100]).argmax(1) for i in range(0, len(x_test), 100)])
    value, _ = mean_iou(pred, y_test, len(LABELS))
    rng = np.random.default_rng(recipe.seed)
    probes = [x_test[:1], x_test[:5], rng.normal(0, 1, (3, *x_test.shape[1:])).astype(np.float32)]
    check = parity(model, sess, probes, recipe.tolerance)
    split = f"{recipe.test_size} synthetic scenes, seed {TEST_SEED}"
    meta = ModelMeta(
        task="segmentation",
        labels=LABELS,
        input=INPUT_SPEC,
        output_kind="logits",
        extra=eval_props("mean_iou", value, split, check.max_abs_diff),
    )
    set_metadata(proto, meta.to_props(), doc="Optic shape segmenter (FCN, synthetic scenes)")
    return finish(
        "segmenter", out, {"segmenter": proto}, [model], "mean IoU", value, check.max_abs_diff, recipe, started
    )
