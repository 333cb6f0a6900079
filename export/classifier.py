"""Recipe: train the shape classifier on synthetic scenes, gate it, write it to a repository."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from optic.export.data import SHAPES, classification_arrays, make_scenes
from optic.export.models import ShapeClassifier
from optic.export.onnx_export import parity, to_onnx
from optic.export.onnx_io import ort_predict, session, set_metadata
from optic.export.recipe import ModelReport, eval_props, finish
from optic.export.train import TrainConfig, predict, seed_everything, train_classifier
from optic.server.metadata import InputSpec, ModelMeta
from optic.server.tasks.image import normalize

INPUT_SPEC = InputSpec(size=(64, 64), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
TEST_SEED = 1_000_003  # held-out scenes come from a seed training never uses


@dataclass(frozen=True)
class ClassifierRecipe:
    seed: int = 0
    epochs: int = 10
    train_per_epoch: int = 8192
    test_size: int = 2000
    width: int = 16
    gate: float = 0.95  # held-out accuracy below this: the model is not written
    tolerance: float = 1e-4  # max |torch - onnxruntime| on logits


def _tensors(count: int, seed: int, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    images, labels = classification_arrays(make_scenes(count, seed, start=start, size=INPUT_SPEC.size[0]))
    return normalize(images, INPUT_SPEC), labels


def build(out: Path, recipe: ClassifierRecipe | None = None, progress: bool = True) -> ModelReport:
    """Train, check and (if it passes) write ``out/classifier/1/model.onnx``."""
    recipe = recipe or ClassifierRecipe()
    started = time.monotonic()
    seed_everything(recipe.seed)
    x_test, y_test = _tensors(recipe.test_size, TEST_SEED)
    model = ShapeClassifier(len(SHAPES), width=recipe.width)

    def epoch_data(epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = _tensors(recipe.train_per_epoch, recipe.seed, start=epoch * recipe.train_per_epoch)
        return torch.from_numpy(x), torch.from_numpy(y)

    def accuracy(m: torch.nn.Module) -> float:
        return float((predict(m, torch.from_numpy(x_test)).argmax(1) == y_test).mean())

    train_classifier(
        model,
        epoch_data,
        steps_per_epoch=max(1, recipe.train_per_epoch // 128),
        config=TrainConfig(epochs=recipe.epochs),
        evaluate=accuracy,
        progress=progress,
    )

    proto = to_onnx(model, torch.from_numpy(x_test[:2]), "images", "logits")
    sess = session(proto)
    value = float((ort_predict(sess, x_test).argmax(1) == y_test).mean())  # what will be served
    rng = np.random.default_rng(recipe.seed)
    probes = [x_test[:1], x_test[:7], rng.normal(0, 1, (5, *x_test.shape[1:])).astype(np.float32)]
    check = parity(model, sess, probes, recipe.tolerance)
    split = f"{recipe.test_size} synthetic scenes, seed {TEST_SEED}"
    meta = ModelMeta(
        task="classification",
        labels=SHAPES,
        input=INPUT_SPEC,
        output_kind="logits",
        extra=eval_props("accuracy", value, split, check.max_abs_diff),
    )
    set_metadata(proto, meta.to_props(), doc="Optic shape classifier (synthetic scenes)")
    return finish(
        "classifier", out, {"classifier": proto}, [model], "accuracy", value, check.max_abs_diff, recipe, started
    )
