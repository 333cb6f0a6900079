"""The network ``optic export train`` fine-tunes: a backbone (ours, a torchvision one, or fresh), our pyramid and the
task's head from :mod:`optic.export.models`, so the export wrappers and the served layouts are those of the
default models.

Where the weights come from decides what phase 1 freezes: every module that arrived trained (our trunk: backbone
and pyramid; a torchvision network: its backbone) stays fixed while the new head learns, then everything is
fine-tuned at a lower learning rate.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from optic.export.importer import ExportError
from optic.export.models import CaptionHead, Pyramid, SegmentHead, ShapeNet

# torchvision backbones whose feature maps at strides 2..32 we know how to take (nothing is downloaded).
TORCHVISION_BACKBONES = ("resnet18", "resnet34", "resnet50", "mobilenet_v3_large", "mobilenet_v3_small",
                         "efficientnet_b0")  # fmt: skip
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
HEAD = {"classify": "classify", "detect": "detect", "segment": "segment", "caption": "caption"}


@dataclass(frozen=True)
class Source:
    """Where the starting weights come from: ``kind`` is ``optic`` (a trunk.pt), ``torchvision`` or ``none``."""

    kind: str
    name: str  # what the user named: "none", a path, an architecture
    path: Path | None = None  # the trunk or the torchvision weights file

    @property
    def pretrained(self) -> bool:
        return self.kind != "none"

    @property
    def label(self) -> str:
        """As the model's metadata records it: ``optic:trunk.pt``, ``torchvision:resnet18`` or ``none``."""
        if self.kind == "optic":
            return f"optic:{self.path.name if self.path else self.name}"
        return f"torchvision:{self.name}" if self.kind == "torchvision" else "none"


class ResNetFeatures(nn.Module):
    """torchvision ResNet -> maps at strides 2, 4, 8, 16, 32 (the stem, then layer1..4)."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.stem = nn.Sequential(model.conv1, model.bn1, model.relu)
        self.pool = model.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = model.layer1, model.layer2, model.layer3, model.layer4
        c = [m[-1].conv3.out_channels if hasattr(m[-1], "conv3") else m[-1].conv2.out_channels
             for m in (self.layer1, self.layer2, self.layer3, self.layer4)]  # fmt: skip
        self.widths = (model.conv1.out_channels, *c)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x2 = self.stem(x)
        x4 = self.layer1(self.pool(x2))
        x8 = self.layer2(x4)
        x16 = self.layer3(x8)
        return x2, x4, x8, x16, self.layer4(x16)


class SequentialFeatures(nn.Module):
    """A ``features`` Sequential (MobileNet, EfficientNet) cut after the last block of each stride 2..32."""

    def __init__(self, features: nn.Sequential) -> None:
        super().__init__()
        self.blocks = features
        probe = torch.zeros(1, 3, 64, 64)
        ends: dict[int, int] = {}
        widths: dict[int, int] = {}
        with torch.no_grad():
            for i, block in enumerate(features):
                probe = block(probe)
                stride = 64 // probe.shape[-1]
                ends[stride], widths[stride] = i, probe.shape[1]
        if any(s not in ends for s in (2, 4, 8, 16, 32)):
            raise ExportError("this torchvision network's features do not reach strides 2 to 32")
        self.ends = tuple(ends[s] for s in (2, 4, 8, 16, 32))
        self.widths = tuple(widths[s] for s in (2, 4, 8, 16, 32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.ends:
                out.append(x)
        return tuple(out)


def torchvision_backbone(arch: str, weights: Path) -> nn.Module:
    """The architecture with the user's ``state_dict`` (classification checkpoints; their classifier is dropped)."""
    from optic.export.torchvision_models import torchvision

    if arch not in TORCHVISION_BACKBONES:
        raise ExportError(f"--from {arch}: torchvision backbones are {', '.join(TORCHVISION_BACKBONES)}")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        raise ExportError(f"--weights {weights}: not a PyTorch state_dict ({type(exc).__name__})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ExportError(f"--weights {weights}: not a PyTorch state_dict")
    head = [k for k in state if k.startswith(("fc.", "classifier."))]
    classes = int(state[head[-1]].shape[0]) if head and state[head[-1]].ndim >= 1 else 1000
    model = torchvision().models.get_model(arch, weights=None, num_classes=classes)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if "\n" in str(exc) else str(exc)
        raise ExportError(f"--weights {weights} does not fit torchvision's {arch}: {first[:300]}") from None
    return ResNetFeatures(model) if arch.startswith("resnet") else SequentialFeatures(model.features)


def build_net(task: str, names: tuple[str, ...], vocab: tuple[str, ...], source: Source,
              width: int, depth: int, neck: int, seed: int) -> tuple[ShapeNet, list[nn.Module]]:
    """The network for ``task`` and the modules that arrived trained (phase 1 freezes them)."""
    from optic.export.train import load_trunk

    classes = len(names) - 1 if task == "segment" else len(names)  # segmentation: background is names[0]
    vocab_size = max(len(vocab), 4)
    if source.kind == "optic":
        assert source.path is not None
        try:
            trunk = load_trunk(source.path)
        except (ValueError, OSError, RuntimeError) as exc:
            raise ExportError(f"--from {source.name}: {exc}") from None
        width, depth, neck = int(trunk["width"]), int(trunk["depth"]), int(trunk["neck"])
    torch.manual_seed(seed)  # the new head's initial weights depend on the seed only
    net = ShapeNet(max(classes, 1), vocab_size, width, depth, neck)
    if source.kind == "optic":
        state = {k: v for k, v in trunk["state_dict"].items() if k.startswith(("backbone.", "neck."))}
        missing, unexpected = net.load_state_dict(state, strict=False)
        wanted = [k for k in missing if k.startswith(("backbone.", "neck."))]
        if wanted or unexpected:
            raise ExportError(f"--from {source.name}: the trunk does not fit ({(wanted or unexpected)[0]})")
        return net, [net.backbone, net.neck]
    if source.kind == "torchvision":
        assert source.path is not None
        backbone = torchvision_backbone(source.name, source.path)
        widths = tuple(int(w) for w in backbone.widths)  # type: ignore[union-attr]
        net.backbone = backbone  # type: ignore[assignment]
        net.neck = Pyramid(widths, neck)
        if task == "segment":
            net.segment = SegmentHead(neck, widths, classes + 1)
        if task == "caption":
            net.caption = CaptionHead(neck, widths[2])
        return net, [backbone]
    return net, []


def head_of(net: ShapeNet, task: str) -> list[nn.Module]:
    """The modules a task trains besides the trunk."""
    return [net.caption, net.decoder] if task == "caption" else [getattr(net, HEAD[task])]


def set_frozen(frozen: list[nn.Module], on: bool) -> None:
    """Frozen modules take no gradient and keep their BatchNorm statistics (eval mode): the features the head
    learns on must be the ones it will see."""
    for m in frozen:
        for p in m.parameters():
            p.requires_grad_(not on)
        m.train(not on)


def trainable(net: ShapeNet, task: str) -> list[nn.Parameter]:
    """The parameters this task's model uses that are not frozen (each once)."""
    seen: dict[int, nn.Parameter] = {}
    for m in (net.backbone, net.neck, *head_of(net, task)):
        for p in m.parameters():
            if p.requires_grad:
                seen[id(p)] = p
    return list(seen.values())


def modules_used(net: ShapeNet, task: str) -> nn.ModuleList:
    """What the exported model holds: the state a checkpoint keeps and best-epoch weights restore."""
    return nn.ModuleList([net.backbone, net.neck, *head_of(net, task)])


def masked_dice(logits: torch.Tensor, target: torch.Tensor, ignore: int) -> torch.Tensor:
    """1 - soft Dice per foreground class present, labelled pixels only (train.dice_loss with an ignore index)."""
    valid = (target != ignore).unsqueeze(1).float()
    safe = torch.where(target == ignore, torch.zeros_like(target), target)
    prob = logits.softmax(1)[:, 1:] * valid
    onehot = nn.functional.one_hot(safe, logits.shape[1]).permute(0, 3, 1, 2)[:, 1:].float() * valid
    inter = (prob * onehot).sum((0, 2, 3))
    total = prob.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
    present = onehot.sum((0, 2, 3)) > 0
    dice = 1 - (2 * inter + 1) / (total + 1)
    return dice[present].mean() if present.any() else dice.sum() * 0


def forward(net: ShapeNet, task: str, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The trunk and the task's head (the caption decoder's loop is the loss's): what training runs forward."""
    (x2, x4, x8), pyramid = net.trunk(images)
    if task == "classify":
        return (net.classify(pyramid[1], pyramid[2]),)
    if task == "detect":
        return net.detect(pyramid)
    if task == "segment":
        return (net.segment(x2, x4, pyramid),)
    return net.caption(pyramid[1], pyramid[2], x8, images)


def loss(net: ShapeNet, task: str, batch: dict[str, torch.Tensor], size: int, ignore: int) -> torch.Tensor:
    """The task's training loss on one batch (the same terms as the shared trunk's training)."""
    from optic.export.detector import detection_loss

    out = forward(net, task, batch["images"])
    if task == "classify":
        return nn.functional.cross_entropy(out[0], batch["labels"], label_smoothing=0.05)
    if task == "detect":  # on the CPU: the assigner's anchor points are CPU tensors (gradients cross devices)
        boxes = {k: batch[k].cpu() for k in ("boxes", "classes", "box_mask")}
        return detection_loss(net.detect, out[0].cpu(), out[1].cpu(), size, boxes)
    if task == "segment":
        target = batch["masks"][:, 1::2, 1::2]
        ce = nn.functional.cross_entropy(out[0], target, ignore_index=ignore)
        return ce + 0.5 * masked_dice(out[0], target, ignore)
    features, h, c = out
    tokens = batch["tokens"]
    total, count = torch.zeros((), device=tokens.device), (tokens[:, 1:] != 0).sum().clamp(min=1)
    for t in range(tokens.shape[1] - 1):
        if not (tokens[:, t + 1] != 0).any():
            break
        step_logits, h, c = net.decoder(tokens[:, t], h, c, features)
        total = total + nn.functional.cross_entropy(step_logits, tokens[:, t + 1], ignore_index=0, reduction="sum")
    return total / count


@torch.no_grad()
def precise_batchnorm(net: ShapeNet, task: str, batches: Callable[..., dict[str, torch.Tensor]], n: int,
                      batch_size: int, limit: int = 256) -> None:
    """Re-estimate the running statistics of every BatchNorm being trained, as equal-weight averages over (up to
    ``limit``) training images: with a few hundred images an epoch is a handful of steps, too few for the
    momentum average to forget its start, and evaluation would see stale statistics."""
    norms = [m for m in modules_used(net, task).modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             and m.training]  # fmt: skip
    if not norms:
        return
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    g = torch.Generator().manual_seed(0)
    # Mixed batches: the samples are sorted (by class, for an ImageFolder), and the average of per-batch variances
    # misses the spread between batches.
    order = np.random.default_rng(0).permutation(n)[:limit]
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        if len(idx) > 1:
            forward(net, task, batches(idx, g, augment=False)["images"])
    for m, momentum in zip(norms, saved, strict=True):
        m.momentum = momentum
