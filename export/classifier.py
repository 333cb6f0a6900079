"""Recipe: the shape classifier -- the class of the largest shape -- gated on the stress set.

"The largest shape" is the object with the most visible pixels (docs/models.md). The classifier is the shared
trunk (:mod:`optic.export.train`) with an attention-pooling head over the pyramid's tokens: it learns where the
largest shape is and reads its class there.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from optic.export import evaluate
from optic.export.data import SHAPES
from optic.export.models import ExportedClassifier
from optic.export.onnx_export import parity, to_onnx
from optic.export.onnx_io import set_metadata
from optic.export.recipe import ModelReport, finish, gate_props, in_distribution, served_spec
from optic.export.train import TrunkRecipe, trained
from optic.server.metadata import ModelMeta

INPUT_SPEC = TrunkRecipe().input_spec
TEST_SEED = 1_000_003


@dataclass(frozen=True)
class ClassifierRecipe:
    seed: int = 0
    trunk: TrunkRecipe = field(default_factory=TrunkRecipe)
    test_size: int | None = None  # stress scenes per slice (None: evaluate.SLICES' counts)
    gate: float = 0.95  # accuracy on the largest shape, stress classification slice
    tolerance: float = 1e-4  # max |torch - onnxruntime| on logits
    # Quick trials: shrink the shared trunk's training (None keeps the trunk recipe's value).
    epochs: float | None = None
    train_per_epoch: int | None = None
    width: int | None = None

    def trunk_recipe(self) -> TrunkRecipe:
        return shrink(self.trunk, self.epochs, self.train_per_epoch, self.width)


def shrink(trunk: TrunkRecipe, epochs: float | None, scenes: int | None, width: int | None) -> TrunkRecipe:
    if epochs is not None:
        trunk = replace(trunk, epochs=epochs)
    if scenes is not None:
        trunk = replace(trunk, scenes=scenes)
    if width is not None:
        trunk = replace(trunk, width=width)
    return trunk


def build(out: Path, recipe: ClassifierRecipe | None = None, progress: bool = True) -> ModelReport:
    """Train (or reuse) the trunk, check and (if it passes) write ``out/classifier/1/model.onnx``."""
    recipe = recipe or ClassifierRecipe()
    started = time.monotonic()
    trunk_recipe = recipe.trunk_recipe()
    trunk = trained(trunk_recipe, progress)
    spec = served_spec(trunk_recipe.input_spec)
    model = ExportedClassifier(trunk.net).eval()
    rng = np.random.default_rng(recipe.seed)
    sample = rng.uniform(0, 1, (2, 3, *spec.size)).astype(np.float32)
    proto = to_onnx(model, torch.from_numpy(sample), "images", "logits")
    meta = ModelMeta(task="classification", labels=SHAPES, input=spec, output_kind="logits")
    set_metadata(proto, meta.to_props())
    sess = evaluate.session(proto.SerializeToString())
    n = recipe.test_size
    results = {name: evaluate.classification(sess, evaluate.stress_samples(name, n))
               for name in ("classification", "single_centered")}
    # The generator's scenes where "the largest shape" is clear, as in the stress slice (>= 1.5x the next area).
    clear = [s for s in in_distribution(n) if len(s.areas) < 2 or np.sort(s.areas)[-1] >= 1.5 * np.sort(s.areas)[-2]]
    results["in_distribution"] = evaluate.classification(sess, clear)
    probes = [sample[:1], rng.uniform(0, 1, (5, 3, *spec.size)).astype(np.float32),
              rng.normal(0.5, 1, (3, 3, *spec.size)).astype(np.float32)]
    check = parity(model, sess, probes, recipe.tolerance)
    gates = {"accuracy": (results["classification"]["accuracy"], recipe.gate)}
    props = gate_props(gates, results, check.max_abs_diff, "stress classification slice (label: the largest shape)")
    set_metadata(proto, {**meta.to_props(), **props}, doc="Optic shape classifier: the largest shape's class")
    return finish("classifier", out, {"classifier": proto}, [model], gates, check.max_abs_diff, recipe, started,
                  results)
