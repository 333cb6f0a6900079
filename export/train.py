"""Training: one shared trunk learns every task at once, deterministic on CPU, with a progress bar.

The four default models share a backbone and feature pyramid (:class:`optic.export.models.ShapeNet`). It is
trained once, on the sum of the four tasks' losses, over scenes of the wide generator brought to the model's
input by the server's own ``preprocess``; each recipe then exports the trunk with its own head. ``trained``
memoises the result, so ``optic export all`` trains once and the single-model commands train the same weights.
"""

from __future__ import annotations

import copy
import hashlib
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from optic.export.data import SHAPES, WIDE, Style, TrainingSet, training_set
from optic.server.metadata import InputSpec


def seed_everything(seed: int, threads: int | None = None) -> None:
    """Same seed, same thread count -> the same weights, run after run on CPU."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.set_num_threads(threads or max(1, min(2, os.cpu_count() or 1)))


@dataclass(frozen=True)
class TrunkRecipe:
    """What the shared training does; every task recipe names one (equal recipes train once per process)."""

    seed: int = 0
    size: int = 256  # letterboxed square input
    scenes: int = 9000  # distinct training scenes (rendered once, then augmented by the 8 flips/rotations)
    epochs: float = 8.0
    batch_size: int = 32
    lr: float = 2.5e-3
    weight_decay: float = 5e-4
    width: int = 16
    depth: int = 2
    neck: int = 64
    hidden: int = 192
    loss_weights: tuple[float, float, float, float] = (1.0, 2.0, 0.5, 0.5)  # detect, segment, classify, caption
    label_margin: float = 1.3  # classifier/caption subjects only where the largest shape is this much larger
    ema: float = 0.998  # weight averaging (the exported weights are the average)
    bf16: bool = True  # autocast on CPUs with bfloat16 support (weights and the export stay float32)
    workers: int = 2
    threads: int = 2
    style: Style = field(default=WIDE, compare=True)

    @property
    def input_spec(self) -> InputSpec:
        return InputSpec(size=(self.size, self.size), resize="letterbox", scale=1.0 / 255.0)


@dataclass
class Trained:
    net: Any  # models.ShapeNet, in eval mode
    recipe: TrunkRecipe
    seconds: float
    history: list[dict[str, float]]


_TRAINED: dict[TrunkRecipe, Trained] = {}

# Relation words under the 8 flips/rotations of an image: transpose swaps the axes, flips reverse one.
_TRANSPOSE = {"left": "above", "right": "below", "above": "left", "below": "right"}
_FLIP_X = {"left": "right", "right": "left"}
_FLIP_Y = {"above": "below", "below": "above"}


def _relation_words(caption: str, transpose: bool, flip_x: bool, flip_y: bool) -> str:
    """Rewrite a caption's relation for a transformed image ('to the left of' <-> 'above', ...)."""
    for phrase, word in (("to the left of", "left"), ("to the right of", "right"), (" above ", "above"),
                         (" below ", "below")):
        if phrase in caption:
            head, tail = caption.split(phrase, 1)
            new = word
            if transpose:
                new = _TRANSPOSE[new]
            if flip_x:
                new = _FLIP_X.get(new, new)
            if flip_y:
                new = _FLIP_Y.get(new, new)
            text = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}[new]
            return f"{head.rstrip()} {text} {tail.lstrip()}"
    return caption


class Batches:
    """Random batches with one of the 8 flips/rotations per image, boxes, masks and captions following."""

    def __init__(self, data: TrainingSet, recipe: TrunkRecipe, encode: Any, max_tokens: int) -> None:
        self.data, self.recipe, self.encode, self.max_tokens = data, recipe, encode, max_tokens

    def __call__(self, idx: np.ndarray, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        d, size = self.data, self.recipe.size
        images = np.empty((len(idx), size, size, 3), np.uint8)
        masks = np.empty((len(idx), size, size), np.uint8)
        boxes: list[np.ndarray] = []
        tokens = np.zeros((len(idx), self.max_tokens), np.int64)
        ops = rng.integers(0, 8, len(idx))
        for j, (i, op) in enumerate(zip(idx, ops, strict=True)):
            transpose, flip_x, flip_y = bool(op & 4), bool(op & 1), bool(op & 2)
            img, msk, bx = d.images[i], d.masks[i], d.boxes[i].copy()
            if transpose:
                img, msk = img.transpose(1, 0, 2), msk.T
                bx = bx[:, [1, 0, 3, 2, 4]]
            if flip_x:
                img, msk = img[:, ::-1], msk[:, ::-1]
                bx[:, [0, 2]] = size - bx[:, [2, 0]]
            if flip_y:
                img, msk = img[::-1], msk[::-1]
                bx[:, [1, 3]] = size - bx[:, [3, 1]]
            images[j], masks[j] = img, msk
            boxes.append(bx)
            seq = self.encode(_relation_words(d.captions[i], transpose, flip_x, flip_y))
            tokens[j, : len(seq)] = seq
        m = max(1, max(len(b) for b in boxes))
        gt = np.zeros((len(idx), m, 4), np.float32)
        gt_cls = np.zeros((len(idx), m), np.int64)
        gt_mask = np.zeros((len(idx), m), bool)
        for j, b in enumerate(boxes):
            gt[j, : len(b)], gt_cls[j, : len(b)], gt_mask[j, : len(b)] = b[:, :4], b[:, 4], True
        labels = np.where(d.margins[idx] >= self.recipe.label_margin, d.labels[idx], -100)
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
        return {
            "images": x.contiguous(memory_format=torch.channels_last),
            "masks": torch.from_numpy(masks.astype(np.int64)),
            "boxes": torch.from_numpy(gt),
            "classes": torch.from_numpy(gt_cls),
            "box_mask": torch.from_numpy(gt_mask),
            "labels": torch.from_numpy(labels),
            "tokens": torch.from_numpy(tokens),
        }


def dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - soft Dice of each shape class over the batch, averaged over the classes present: an IoU-like term
    that weighs a small shape's pixels as much as the background's many."""
    prob = logits.softmax(1)[:, 1:]
    onehot = nn.functional.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2)[:, 1:].float()
    inter = (prob * onehot).sum((0, 2, 3))
    total = prob.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
    present = onehot.sum((0, 2, 3)) > 0
    dice = 1 - (2 * inter + 1) / (total + 1)
    return dice[present].mean() if present.any() else dice.sum() * 0


def losses(net: Any, batch: dict[str, torch.Tensor], recipe: TrunkRecipe) -> dict[str, torch.Tensor]:
    """Every task's loss on one batch."""
    from optic.export.detector import detection_loss

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe.bf16):
        (x2, x4, x8), pyramid = net.trunk(batch["images"])
        box, cls = net.detect(pyramid)
        seg = net.segment(x2, x4, pyramid)  # stride 2: scored against the class under each cell's centre
        logits = net.classify(pyramid[1], pyramid[2])
        features, h, c = net.caption(pyramid[1], pyramid[2], x8, batch["images"])
    out = {"detect": detection_loss(net.detect, box.float(), cls.float(), recipe.size, batch)}
    target = batch["masks"][:, 1::2, 1::2]
    out["segment"] = nn.functional.cross_entropy(seg.float(), target) + 0.5 * dice_loss(seg.float(), target)
    labels = batch["labels"]
    out["classify"] = (
        nn.functional.cross_entropy(logits.float(), labels, ignore_index=-100, label_smoothing=0.05)
        if (labels >= 0).any()
        else logits.float().sum() * 0
    )
    tokens = batch["tokens"]
    features, h, c = features.float(), h.float(), c.float()
    total, count = torch.zeros(()), (tokens[:, 1:] != 0).sum().clamp(min=1)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe.bf16):
        for t in range(tokens.shape[1] - 1):
            if not (tokens[:, t + 1] != 0).any():
                break
            step_logits, h, c = net.decoder(tokens[:, t], h, c, features)
            total = total + nn.functional.cross_entropy(
                step_logits.float(), tokens[:, t + 1], ignore_index=0, reduction="sum"
            )
            h, c = h.float(), c.float()
    out["caption"] = total / count
    return out


def train_trunk(recipe: TrunkRecipe, progress: bool = True) -> Trained:
    """Render the scenes, train the shared net on every task; the same recipe gives the same weights."""
    from optic.export.captioner import MAX_LENGTH, VOCAB, encode_caption
    from optic.export.models import ShapeNet

    started = time.monotonic()
    seed_everything(recipe.seed, recipe.threads)
    data = training_set(recipe.scenes, recipe.seed, recipe.input_spec, recipe.style, workers=recipe.workers,
                        progress=progress)
    seed_everything(recipe.seed, recipe.threads)
    net = ShapeNet(len(SHAPES), len(VOCAB), recipe.width, recipe.depth, recipe.neck, recipe.hidden)
    net = net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch's stubs omit it
    batches = Batches(data, recipe, encode_caption, MAX_LENGTH + 1)
    steps_per_epoch = max(1, len(data) // recipe.batch_size)
    steps = max(1, round(recipe.epochs * steps_per_epoch))
    decayed: list[torch.nn.Parameter] = []
    undecayed: list[torch.nn.Parameter] = []
    for name, p in net.named_parameters():
        (undecayed if p.ndim <= 1 or name.endswith(".bias") else decayed).append(p)
    opt = torch.optim.AdamW(
        [{"params": decayed, "weight_decay": recipe.weight_decay}, {"params": undecayed, "weight_decay": 0.0}],
        lr=recipe.lr,
        betas=(0.9, 0.99),
    )
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, recipe.lr, total_steps=steps, pct_start=0.1, div_factor=20)
    rng = np.random.default_rng([recipe.seed, 7])
    weights = dict(zip(("detect", "segment", "classify", "caption"), recipe.loss_weights, strict=True))
    history: list[dict[str, float]] = []
    running: dict[str, float] = {}
    bar = tqdm(total=steps, desc="trunk (all tasks)", unit="step", disable=not progress)
    ema = copy.deepcopy(net).eval()  # exponential moving average of the weights: what gets exported
    for p in ema.parameters():
        p.requires_grad_(False)
    net.train()
    order = np.concatenate([rng.permutation(len(data)) for _ in range(int(np.ceil(steps / steps_per_epoch)) + 1)])
    for step in range(steps):
        idx = order[step * recipe.batch_size : (step + 1) * recipe.batch_size]
        parts = losses(net, batches(idx, rng), recipe)
        loss = sum(weights[k] * v for k, v in parts.items())
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[union-attr]
        nn.utils.clip_grad_norm_(net.parameters(), 10.0)
        opt.step()
        sched.step()
        decay = recipe.ema * (1 - np.exp(-(step + 1) / max(1.0, 0.1 * steps)))
        with torch.no_grad():
            for e, p in zip(ema.state_dict().values(), net.state_dict().values(), strict=True):
                if e.dtype.is_floating_point:
                    e.mul_(decay).add_(p.detach(), alpha=1 - decay)
                else:
                    e.copy_(p)
        for k, v in parts.items():
            running[k] = 0.95 * running.get(k, float(v.detach())) + 0.05 * float(v.detach())
        bar.update(1)
        if step % 10 == 0 or step == steps - 1:
            bar.set_postfix({k[:3]: f"{v:.3f}" for k, v in running.items()}, refresh=False)
        if (step + 1) % steps_per_epoch == 0 or step == steps - 1:
            history.append({"step": step + 1, **running})
    bar.close()
    # The exported net is rebuilt from the averaged weights alone, exactly as a cached trunk is loaded, so a
    # fresh run and a cached one export the same bytes (memory format and module state cannot differ).
    net = _rebuilt(recipe, ema.state_dict())
    return Trained(net, recipe, time.monotonic() - started, history)


def _rebuilt(recipe: TrunkRecipe, state: dict[str, torch.Tensor]) -> Any:  # a models.ShapeNet, in eval mode
    from optic.export.captioner import VOCAB
    from optic.export.models import ShapeNet

    net = ShapeNet(len(SHAPES), len(VOCAB), recipe.width, recipe.depth, recipe.neck, recipe.hidden)
    net.load_state_dict({k: v.contiguous() for k, v in state.items()})
    return net.eval()


def _trunk_cache(recipe: TrunkRecipe) -> Path | None:
    """Where ``OPTIC_EXPORT_CACHE`` keeps a trained trunk: keyed by the recipe and by the source of every module
    that shapes training, so a code change never reuses stale weights (re-gating or re-exporting then costs
    minutes instead of a full training run)."""
    cache_dir = os.environ.get("OPTIC_EXPORT_CACHE")
    if not cache_dir:
        return None
    here = Path(__file__).parent
    key = hashlib.sha256(repr(recipe).encode() + torch.__version__.encode())
    for name in ("train.py", "models.py", "data.py", "detector.py", "captioner.py", "stress.py"):
        key.update((here / name).read_bytes())
    return Path(cache_dir) / f"trunk-{key.hexdigest()[:20]}.pt"


def _load_trunk(path: Path, recipe: TrunkRecipe) -> Trained:
    saved = torch.load(path, map_location="cpu", weights_only=True)
    return Trained(_rebuilt(recipe, saved["state_dict"]), recipe, float(saved["seconds"]), list(saved["history"]))


TRUNK_FORMAT = "optic-shapenet-trunk/1"


def save_trunk(trained: Trained, path: Path) -> Path:
    """The backbone and pyramid weights (BatchNorm unfused: the ONNX files have it folded into the convolutions)
    with what is needed to rebuild them: the start of transfer learning on a user's data."""
    r = trained.recipe
    state = {k: v for k, v in trained.net.state_dict().items() if k.startswith(("backbone.", "neck."))}
    payload = {
        "format": TRUNK_FORMAT,
        "width": r.width,
        "depth": r.depth,
        "neck": r.neck,
        "size": r.size,
        "state_dict": state,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def load_trunk(path: Path) -> dict[str, Any]:
    """What :func:`save_trunk` wrote (tensors only: ``weights_only`` loading)."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != TRUNK_FORMAT:
        raise ValueError(f"{path}: not an Optic trunk checkpoint ({TRUNK_FORMAT})")
    return dict(payload)


def trained(recipe: TrunkRecipe, progress: bool = True) -> Trained:
    """The trunk for ``recipe``, trained at most once per process."""
    if recipe not in _TRAINED:
        cached = _trunk_cache(recipe)
        if cached is not None and cached.exists():
            _TRAINED[recipe] = _load_trunk(cached, recipe)
        else:
            _TRAINED[recipe] = train_trunk(recipe, progress)
            if cached is not None:
                cached.parent.mkdir(parents=True, exist_ok=True)
                tmp = cached.with_suffix(".tmp")
                t = _TRAINED[recipe]
                torch.save({"state_dict": t.net.state_dict(), "seconds": t.seconds, "history": t.history}, tmp)
                tmp.replace(cached)
        keep = os.environ.get("OPTIC_EXPORT_SAVE_TRUNK")  # development: keep the weights for later analysis
        if keep:
            torch.save(_TRAINED[recipe].net.state_dict(), keep)
    return _TRAINED[recipe]


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    model.eval()
    return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]).numpy()
