"""A user's dataset in memory at the model's input size, and the augmented batches ``optic export train`` trains on.

Every image goes once through the server's own resize (:func:`optic.server.tasks.pipelines.resize`), so training
sees the pixels serving will; boxes and masks go through the same letterbox geometry. Augmentation (flip, scale
jitter with translation, colour) runs per batch on those arrays, boxes and masks transformed with the image, drawn
from a generator seeded by (seed, epoch, step): an interrupted run resumes with the very same batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from optic.export.datasets import Dataset, read_image, read_mask
from optic.export.datasets.text import EOS, encode
from optic.server.metadata import InputSpec
from optic.server.tasks.pipelines import Transform, letterbox_geometry, resize

MIN_BOX_SIDE = 2.0  # input pixels: what is left of a box cut by the jitter is dropped below this
MIN_BOX_KEPT = 0.25  # share of a jittered box that must stay inside the image


@dataclass(frozen=True)
class Augment:
    """Per-task augmentation: what a label survives (a caption's "left" flips with the image, see ``swap``)."""

    flip: bool = True
    scale: tuple[float, float] = (0.75, 1.25)  # zoom (>1 in, <1 out), around a random shift
    shift: float = 0.1  # of the side
    colour: float = 0.25  # brightness / contrast / saturation spread
    swap: tuple[tuple[int, int], ...] = ()  # token ids exchanged under a horizontal flip


AUGMENT = {
    "classify": Augment(scale=(0.85, 1.2)),
    "detect": Augment(),
    "segment": Augment(),
    "caption": Augment(scale=(0.9, 1.1), shift=0.05),
}


@dataclass
class Split:
    """One split at the model's input: uint8 letterboxed images and the labels in input pixels."""

    images: np.ndarray  # (N, S, S, 3) uint8
    transforms: list[Transform]
    labels: np.ndarray | None = None  # classify: (N,)
    boxes: list[np.ndarray] = field(default_factory=list)  # detect: (K, 4) xyxy input pixels
    classes: list[np.ndarray] = field(default_factory=list)  # detect: (K,)
    masks: np.ndarray | None = None  # segment: (N, S, S) uint8, padding = ignore index
    tokens: list[np.ndarray] = field(default_factory=list)  # caption: (captions, L) int64 per image
    captions: list[tuple[str, ...]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)


def _mask_at_input(mask: np.ndarray, spec: InputSpec, ignore: int) -> np.ndarray:
    """The mask through the images' letterbox, nearest neighbour; padding is unlabelled."""
    h0, w0 = mask.shape
    _, nw, nh, px, py = letterbox_geometry(w0, h0, spec.size)
    out = np.full(spec.size, ignore, np.uint8)
    out[py : py + nh, px : px + nw] = np.asarray(Image.fromarray(mask).resize((nw, nh), Image.Resampling.NEAREST))
    return out


def token_rows(captions: Sequence[str], index: dict[str, int], length: int) -> np.ndarray:
    """``<bos> words <eos>`` per caption, cut to ``length`` tokens and padded with 0."""
    rows = np.zeros((len(captions), length), np.int64)
    for i, caption in enumerate(captions):
        seq = encode(caption, index)[:length]
        if seq[-1] != index[EOS]:
            seq[-1] = index[EOS]
        rows[i, : len(seq)] = seq
    return rows


def load_split(
    ds: Dataset[Any], split: str, spec: InputSpec, ignore: int, max_tokens: int, progress: bool
) -> Split:
    """Decode and resize every image of ``split`` once (the server's resize), labels following."""
    samples = ds.train if split == "train" else ds.val
    n, (h, w) = len(samples), spec.size
    images = np.empty((n, h, w, 3), np.uint8)
    out = Split(images, [])
    index = {word: i for i, word in enumerate(ds.vocab or ())}
    labels, masks = [], []
    for i, s in enumerate(tqdm(samples, desc=f"reading {split}", unit="img", disable=not progress, leave=False)):
        images[i], t = resize(read_image(s.path), spec)
        out.transforms.append(t)
        if ds.task == "classify":
            labels.append(s.label)
        elif ds.task == "detect":
            b = np.asarray(s.boxes, np.float32).copy()
            b[:, 0::2] = b[:, 0::2] * t.scale_x + t.pad_x
            b[:, 1::2] = b[:, 1::2] * t.scale_y + t.pad_y
            out.boxes.append(b)
            out.classes.append(np.asarray(s.classes, np.int64))
        elif ds.task == "segment":
            masks.append(_mask_at_input(read_mask(s.mask_path), spec, ignore))
        else:
            out.captions.append(tuple(s.captions))
            out.tokens.append(token_rows(s.captions, index, max_tokens))
    if labels:
        out.labels = np.asarray(labels, np.int64)
    if masks:
        out.masks = np.stack(masks)
    return out


def _affine(n: int, aug: Augment, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample ``grid_sample`` matrices (output -> input, normalised coordinates) and the flip signs."""
    flip = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0) if aug.flip else torch.ones(n)
    lo, hi = aug.scale
    zoom = torch.exp(torch.empty(n).uniform_(float(np.log(lo)), float(np.log(hi)), generator=g))
    shift = (torch.rand(n, 2, generator=g) * 2 - 1) * aug.shift * 2
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = flip / zoom
    theta[:, 1, 1] = 1 / zoom
    theta[:, :, 2] = shift
    return theta, flip


def _move_boxes(boxes: np.ndarray, theta: torch.Tensor, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Boxes (K, 4) under one sample's affine; cut to the image, dropped when mostly outside or too thin."""
    if not len(boxes):
        return np.zeros(0, bool), boxes
    h, w = size
    ax, tx, ay, ty = float(theta[0, 0]), float(theta[0, 2]), float(theta[1, 1]), float(theta[1, 2])
    ux = (2 * boxes[:, [0, 2]] / w - 1 - tx) / ax  # grid_sample reads u_in = a * u_out + t
    uy = (2 * boxes[:, [1, 3]] / h - 1 - ty) / ay
    x, y = (ux + 1) * w / 2, (uy + 1) * h / 2
    moved = np.stack([x.min(1), y.min(1), x.max(1), y.max(1)], 1)
    area = (moved[:, 2] - moved[:, 0]) * (moved[:, 3] - moved[:, 1])
    cut = moved.copy()
    cut[:, 0::2], cut[:, 1::2] = cut[:, 0::2].clip(0, w), cut[:, 1::2].clip(0, h)
    sides = cut[:, 2:] - cut[:, :2]
    keep = (sides.min(1) >= MIN_BOX_SIDE) & (sides.prod(1) >= MIN_BOX_KEPT * np.maximum(area, 1e-6))
    return keep, cut.astype(np.float32)


def _colour(x: torch.Tensor, spread: float, g: torch.Generator) -> torch.Tensor:
    """Brightness, contrast and saturation jitter on [0, 1] images."""
    n = x.shape[0]

    def factor() -> torch.Tensor:
        return (1 + (torch.rand(n, 1, 1, 1, generator=g) * 2 - 1) * spread).to(x.dtype)

    x = x * factor()
    mean = x.mean((1, 2, 3), keepdim=True)
    x = (x - mean) * factor() + mean
    grey = x.mean(1, keepdim=True)
    return ((x - grey) * factor() + grey).clamp(0, 1)


class Batches:
    """Augmented training batches of one split for one task, as the dict the losses take."""

    def __init__(self, task: str, data: Split, spec: InputSpec, ignore: int, pad_value: int, aug: Augment) -> None:
        self.task, self.data, self.spec, self.ignore, self.aug = task, data, spec, ignore, aug
        self.pad = pad_value / 255.0
        self.mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] pixels -> the model's input (the server's ``normalize`` for ``scale`` 1/255)."""
        return (x - self.mean) / self.std

    def __call__(self, idx: np.ndarray, g: torch.Generator, augment: bool = True) -> dict[str, torch.Tensor]:
        d, n = self.data, len(idx)
        x = torch.from_numpy(d.images[idx]).permute(0, 3, 1, 2).float().div_(255.0)
        theta, flip = _affine(n, self.aug, g) if augment else (None, torch.ones(n))
        out: dict[str, torch.Tensor] = {}
        if theta is not None:
            grid = nn.functional.affine_grid(theta, [n, 3, *self.spec.size], align_corners=False)
            x = nn.functional.grid_sample(x - self.pad, grid, "bilinear", "zeros", align_corners=False) + self.pad
            x = _colour(x, self.aug.colour, g)
        out["images"] = self.normalise(x)
        if self.task == "classify":
            assert d.labels is not None
            out["labels"] = torch.from_numpy(d.labels[idx])
        elif self.task == "segment":
            assert d.masks is not None
            m = torch.from_numpy(d.masks[idx]).float().unsqueeze(1)
            if theta is not None:
                m = nn.functional.grid_sample(m - self.ignore, grid, "nearest", "zeros", align_corners=False)
                m = m + self.ignore
            out["masks"] = m.squeeze(1).round().long()
        elif self.task == "detect":
            boxes, classes = [], []
            for j, i in enumerate(idx):
                b, c = d.boxes[i], d.classes[i]
                if theta is not None:
                    keep, b = _move_boxes(b, theta[j], self.spec.size)
                    b, c = b[keep], c[keep]
                boxes.append(b)
                classes.append(c)
            most = max(1, max(len(b) for b in boxes))
            gt, gt_cls = np.zeros((n, most, 4), np.float32), np.zeros((n, most), np.int64)
            gt_mask = np.zeros((n, most), bool)
            for j, (b, c) in enumerate(zip(boxes, classes, strict=True)):
                gt[j, : len(b)], gt_cls[j, : len(b)], gt_mask[j, : len(b)] = b, c, True
            out |= {"boxes": torch.from_numpy(gt), "classes": torch.from_numpy(gt_cls),
                    "box_mask": torch.from_numpy(gt_mask)}  # fmt: skip
        else:
            pick = torch.randint(0, 1 << 30, (n,), generator=g).numpy()
            rows = np.stack([d.tokens[i][p % len(d.tokens[i])] for i, p in zip(idx, pick, strict=True)])
            for k in np.flatnonzero(flip.numpy() < 0):
                for left, right in self.aug.swap:
                    row = rows[k].copy()
                    rows[k][row == left], rows[k][row == right] = right, left
            out["tokens"] = torch.from_numpy(rows)
        return out


def caption_swaps(vocab: Sequence[str]) -> tuple[tuple[int, int], ...]:
    """Token pairs a mirror image exchanges ("left" <-> "right"), where the vocabulary has both."""
    index = {w: i for i, w in enumerate(vocab)}
    return tuple((index[a], index[b]) for a, b in (("left", "right"),) if a in index and b in index)


