"""Recipe: the shape segmenter, gated on mean IoU (background + 5 shapes) over the stress set.

The shared trunk (:mod:`optic.export.train`) with a decoder from the pyramid's stride-8 map back to the full
input resolution (skips at strides 4 and 2), so a 10 px shape keeps its pixels. The server maps the class map
back to the client's image size (``segment.class_map``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from optic.export import evaluate
from optic.export.data import SHAPES
from optic.export.models import ExportedSegmenter
from optic.export.onnx_export import parity, to_onnx
from optic.export.onnx_io import set_metadata
from optic.export.recipe import ModelReport, finish, gate_props, in_distribution, served_spec
from optic.export.train import TrunkRecipe, trained
from optic.server.metadata import ModelMeta

LABELS = ("background", *SHAPES)
INPUT_SPEC = TrunkRecipe().input_spec
TEST_SEED = 3_000_003


@dataclass(frozen=True)
class SegmenterRecipe:
    seed: int = 0
    trunk: TrunkRecipe = field(default_factory=TrunkRecipe)
    views: int = 4  # mirror images averaged in the graph (1: none)
    test_size: int | None = None
    gate: float = 0.85  # mean IoU over the 6 classes, stress segmentation slice
    tolerance: float = 1e-3  # on logits


def mean_iou(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> tuple[float, np.ndarray]:
    """Dataset-level IoU per class (intersections and unions summed over all pixels), and their mean."""
    confusion = np.bincount(truth.ravel() * num_classes + pred.ravel(), minlength=num_classes**2)
    return evaluate.mean_iou(confusion.reshape(num_classes, num_classes))


def build(out: Path, recipe: SegmenterRecipe | None = None, progress: bool = True) -> ModelReport:
    recipe = recipe or SegmenterRecipe()
    started = time.monotonic()
    trunk = trained(recipe.trunk, progress)
    spec = served_spec(recipe.trunk.input_spec)
    model = ExportedSegmenter(trunk.net, recipe.views).eval()
    rng = np.random.default_rng(recipe.seed)
    sample = rng.uniform(0, 1, (2, 3, *spec.size)).astype(np.float32)
    proto = to_onnx(model, torch.from_numpy(sample), "images", "logits")
    meta = ModelMeta(task="segmentation", labels=LABELS, input=spec, output_kind="logits",
                     extra={"optic.segmenter.views": str(recipe.views)})
    set_metadata(proto, meta.to_props())
    sess = evaluate.session(proto.SerializeToString())
    n = recipe.test_size
    results = {"segmentation": evaluate.segmentation(sess, evaluate.stress_samples("segmentation", n))}
    results["in_distribution"] = evaluate.segmentation(sess, in_distribution(n))
    probes = [sample[:1], rng.uniform(0, 1, (3, 3, *spec.size)).astype(np.float32)]
    check = parity(model, sess, probes, recipe.tolerance)
    gates = {"mean_iou": (results["segmentation"]["miou"], recipe.gate)}
    results["in_distribution"]["mean_iou"] = results["in_distribution"]["miou"]
    props = gate_props(gates, results, check.max_abs_diff, "stress segmentation slice")
    doc = "Optic shape segmenter (shared trunk, full-resolution decoder)"
    set_metadata(proto, {**meta.to_props(), **props}, doc=doc)
    return finish("segmenter", out, {"segmenter": proto}, [model], gates, check.max_abs_diff, recipe, started,
                  results)
