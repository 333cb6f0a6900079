"""PyTorch modules for the default models (course-style architectures, small enough for CPU training)."""

from __future__ import annotations

import math
from typing import cast

import torch
from torch import nn


class ConvBlock(nn.Sequential):
    """3x3 conv -> BatchNorm -> ReLU."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ResidualBlock(nn.Module):
    """Two 3x3 convs with an identity skip: depth without the vanishing gradient."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
        )
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.body(x))


class SeparableBlock(nn.Sequential):
    """Depthwise 3x3 + pointwise 1x1: a conv's reach at a fraction of its cost."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(
            nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False),
            nn.Conv2d(cin, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class ShapeClassifier(nn.Module):
    """Conv->Pool blocks with growing filters, then a dense head; outputs logits."""

    def __init__(self, num_classes: int, width: int = 16) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            ConvBlock(3, w),
            nn.MaxPool2d(2),
            ConvBlock(w, 2 * w),
            nn.MaxPool2d(2),
            ResidualBlock(2 * w),
            ConvBlock(2 * w, 4 * w),
            nn.MaxPool2d(2),
            SeparableBlock(4 * w, 8 * w),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8 * w, 64),
            nn.ReLU(inplace=True),
            nn.Dropout(0.2),
            nn.Linear(64, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class ShapeDetector(nn.Module):
    """YOLO-style single-stage detector: conv backbone, then per grid cell and anchor (5+C) numbers.

    ``forward`` returns the raw grid ``[N, B*(5+C), S, S]`` for training;
    :class:`DecodedDetector` wraps it for export.
    """

    def __init__(self, num_classes: int, anchors: torch.Tensor, width: int = 16, stride: int = 8) -> None:
        super().__init__()
        w = width
        self.num_classes = num_classes
        self.stride = stride
        self.anchors: torch.Tensor
        self.register_buffer("anchors", anchors.float().reshape(-1, 2))  # (B, 2) w, h in input pixels
        self.backbone = nn.Sequential(
            ConvBlock(3, w),
            nn.MaxPool2d(2),
            ConvBlock(w, 2 * w),
            nn.MaxPool2d(2),
            ResidualBlock(2 * w),
            ConvBlock(2 * w, 4 * w),
            nn.MaxPool2d(2),
            ResidualBlock(4 * w),
            ConvBlock(4 * w, 8 * w),
            SeparableBlock(8 * w, 8 * w),
        )
        self.head = nn.Conv2d(8 * w, len(self.anchors) * (5 + num_classes), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def decode(self, raw: torch.Tensor) -> torch.Tensor:
        """Grid -> YOLOv5 layout ``[N, S*S*B, 5+C]``: cx, cy, w, h (input pixels), objectness, class scores."""
        n, _, s_y, s_x = raw.shape
        b = int(self.anchors.shape[0])
        p = raw.view(n, b, 5 + self.num_classes, s_y, s_x).permute(0, 3, 4, 1, 2).sigmoid()  # N, Sy, Sx, B, 5+C
        gy = torch.arange(s_y, dtype=raw.dtype).view(1, s_y, 1, 1)
        gx = torch.arange(s_x, dtype=raw.dtype).view(1, 1, s_x, 1)
        cx = (p[..., 0] * 2 - 0.5 + gx) * self.stride
        cy = (p[..., 1] * 2 - 0.5 + gy) * self.stride
        wh = (p[..., 2:4] * 2) ** 2 * self.anchors.view(1, 1, 1, b, 2)
        out = torch.cat([cx.unsqueeze(-1), cy.unsqueeze(-1), wh, p[..., 4:]], dim=-1)
        return out.reshape(n, s_y * s_x * b, 5 + self.num_classes)


class DecodedDetector(nn.Module):
    """What gets exported: image -> decoded boxes, so served models need no grid knowledge."""

    def __init__(self, detector: ShapeDetector) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.detector.decode(self.detector(x))


class ShapeSegmenter(nn.Module):
    """FCN: conv encoder down to 1/8, transposed-conv decoder back up, with skip connections.

    Outputs ``[N, C, H, W]`` logits (class 0 is background), like torchvision's segmentation models.
    """

    def __init__(self, num_classes: int, width: int = 12) -> None:
        super().__init__()
        w = width
        self.enc1 = ConvBlock(3, w)
        self.enc2 = ConvBlock(w, 2 * w)
        self.enc3 = nn.Sequential(ConvBlock(2 * w, 4 * w), ResidualBlock(4 * w))
        self.bottleneck = nn.Sequential(ConvBlock(4 * w, 8 * w), SeparableBlock(8 * w, 8 * w))
        self.pool = nn.MaxPool2d(2)
        self.up3 = nn.ConvTranspose2d(8 * w, 4 * w, 2, stride=2)
        self.fuse3 = ConvBlock(8 * w, 4 * w)
        self.up2 = nn.ConvTranspose2d(4 * w, 2 * w, 2, stride=2)
        self.fuse2 = ConvBlock(4 * w, 2 * w)
        self.up1 = nn.ConvTranspose2d(2 * w, w, 2, stride=2)
        self.fuse1 = ConvBlock(2 * w, w)
        self.classifier = nn.Conv2d(w, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)  # 1
        e2 = self.enc2(self.pool(e1))  # 1/2
        e3 = self.enc3(self.pool(e2))  # 1/4
        b = self.bottleneck(self.pool(e3))  # 1/8
        d3 = self.fuse3(torch.cat([self.up3(b), e3], 1))
        d2 = self.fuse2(torch.cat([self.up2(d3), e2], 1))
        d1 = self.fuse1(torch.cat([self.up1(d2), e1], 1))
        return self.classifier(d1)


class CaptionEncoder(nn.Module):
    """CNN image encoder -> (features, h0, c0) for the LSTM decoder.

    Keeps a 4x4 spatial map before the dense layer so that "above"/"left of"
    survive into the features.
    """

    def __init__(self, feature_dim: int = 192, hidden: int = 192, width: int = 16) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            ConvBlock(3, w),
            nn.MaxPool2d(2),
            ConvBlock(w, 2 * w),
            nn.MaxPool2d(2),
            ResidualBlock(2 * w),
            ConvBlock(2 * w, 4 * w),
            nn.MaxPool2d(2),
            SeparableBlock(4 * w, 8 * w),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(8 * w * 16, feature_dim),
            nn.ReLU(inplace=True),
        )
        self.init_h = nn.Linear(feature_dim, hidden)
        self.init_c = nn.Linear(feature_dim, hidden)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        f = self.features(x)
        return f, torch.tanh(self.init_h(f)), self.init_c(f)


class CaptionDecoderStep(nn.Module):
    """One LSTM step: (token, h, c, features) -> (next-token logits, h', c')."""

    def __init__(self, vocab_size: int, feature_dim: int = 192, hidden: int = 192, embed: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed)
        self.cell = nn.LSTMCell(embed + feature_dim, hidden)
        self.out = nn.Linear(hidden, vocab_size)

    def forward(
        self, token: torch.Tensor, h: torch.Tensor, c: torch.Tensor, features: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h, c = self.cell(torch.cat([self.embed(token), features], 1), (h, c))
        return self.out(h), h, c


# ================================================================ the shared trunk (v2)
#
# One backbone and feature pyramid, trained once on every task's loss, then exported as four models that each
# carry the trunk and their own head: the detector (anchor-free, three strides, DFL boxes), the segmenter
# (full-resolution decoder with skips down to stride 2), the classifier (attention pooling over the pyramid)
# and the captioner (spatial tokens + an attention LSTM decoder).


class Conv(nn.Sequential):
    """Conv -> BatchNorm -> SiLU."""

    def __init__(self, cin: int, cout: int, k: int = 3, s: int = 1) -> None:
        super().__init__(nn.Conv2d(cin, cout, k, s, k // 2, bias=False), nn.BatchNorm2d(cout), nn.SiLU(inplace=True))


class CSPBlock(nn.Module):
    """Cross-stage partial block (YOLOv8's C2f): split, a chain of residual 3x3 pairs on one half, concat all."""

    def __init__(self, c: int, n: int = 1) -> None:
        super().__init__()
        h = c // 2
        self.split = Conv(c, 2 * h, 1)
        self.blocks = nn.ModuleList(nn.Sequential(Conv(h, h), Conv(h, h)) for _ in range(n))
        self.merge = Conv((2 + n) * h, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.split(x).chunk(2, 1)
        ys = [a, b]
        for block in self.blocks:
            ys.append(ys[-1] + block(ys[-1]))
        return self.merge(torch.cat(ys, 1))


class Backbone(nn.Module):
    """Strides 2, 4, 8, 16, 32 with widths w, 2w, 4w, 6w, 8w."""

    def __init__(self, w: int = 16, depth: int = 2) -> None:
        super().__init__()
        self.widths = (w, 2 * w, 4 * w, 6 * w, 8 * w)
        self.stem = Conv(3, w, 3, 2)
        self.s4 = nn.Sequential(Conv(w, 2 * w, 3, 2), CSPBlock(2 * w, 1))
        self.s8 = nn.Sequential(Conv(2 * w, 4 * w, 3, 2), CSPBlock(4 * w, depth))
        self.s16 = nn.Sequential(Conv(4 * w, 6 * w, 3, 2), CSPBlock(6 * w, depth))
        self.s32 = nn.Sequential(Conv(6 * w, 8 * w, 3, 2), CSPBlock(8 * w, 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x2 = self.stem(x)
        x4 = self.s4(x2)
        x8 = self.s8(x4)
        x16 = self.s16(x8)
        return x2, x4, x8, x16, self.s32(x16)


class Pyramid(nn.Module):
    """PAN neck: top-down then bottom-up fusion; three maps (strides 8, 16, 32) of ``c`` channels."""

    def __init__(self, widths: tuple[int, ...], c: int) -> None:
        super().__init__()
        self.lat32, self.lat16, self.lat8 = Conv(widths[4], c, 1), Conv(widths[3], c, 1), Conv(widths[2], c, 1)
        self.top16, self.top8 = CSPBlock(c), CSPBlock(c)
        self.down8, self.down16 = Conv(c, c, 3, 2), Conv(c, c, 3, 2)
        self.out16, self.out32 = CSPBlock(c), CSPBlock(c)
        self.up = nn.Upsample(scale_factor=2.0, mode="nearest")

    def forward(self, x8: torch.Tensor, x16: torch.Tensor, x32: torch.Tensor) -> tuple[torch.Tensor, ...]:
        p32 = self.lat32(x32)
        p16 = self.top16(self.lat16(x16) + self.up(p32))
        p8 = self.top8(self.lat8(x8) + self.up(p16))
        n16 = self.out16(p16 + self.down8(p8))
        n32 = self.out32(p32 + self.down16(n16))
        return p8, n16, n32


STRIDES = (8, 16, 32)


def anchor_points(size: tuple[int, int], strides: tuple[int, ...] = STRIDES) -> tuple[torch.Tensor, torch.Tensor]:
    """Cell centres (A, 2) in input pixels and their strides (A,), level by level, row-major."""
    points, steps = [], []
    for s in strides:
        ny, nx = size[0] // s, size[1] // s
        ys, xs = torch.meshgrid(torch.arange(ny), torch.arange(nx), indexing="ij")
        points.append((torch.stack([xs, ys], -1).reshape(-1, 2).float() + 0.5) * s)
        steps.append(torch.full((ny * nx,), float(s)))
    return torch.cat(points), torch.cat(steps)


class DetectHead(nn.Module):
    """Anchor-free decoupled head per level: box distances as distributions over ``reg_max`` bins (DFL) and
    class logits. ``forward`` gives raw ``[N, A, 4*reg_max]`` and ``[N, A, C]``."""

    def __init__(self, c: int, num_classes: int, reg_max: int = 16) -> None:
        super().__init__()
        self.reg_max, self.num_classes = reg_max, num_classes
        box_out = [nn.Conv2d(c, 4 * reg_max, 1) for _ in STRIDES]
        cls_out = [nn.Conv2d(c, num_classes, 1) for _ in STRIDES]
        for conv, s in zip(cls_out, STRIDES, strict=True):  # YOLO's prior: few objects per cell
            nn.init.constant_(cast(torch.Tensor, conv.bias), math.log(5 / num_classes / (640 / s) ** 2))
        for conv in box_out:
            nn.init.constant_(cast(torch.Tensor, conv.bias), 1.0)
        self.box = nn.ModuleList(nn.Sequential(Conv(c, c), Conv(c, c), out) for out in box_out)
        self.cls = nn.ModuleList(nn.Sequential(Conv(c, c), Conv(c, c), out) for out in cls_out)

    def forward(self, feats: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        n = feats[0].shape[0]
        box = torch.cat([b(f).reshape(n, 4 * self.reg_max, -1) for b, f in zip(self.box, feats, strict=True)], 2)
        cls = torch.cat([c(f).reshape(n, self.num_classes, -1) for c, f in zip(self.cls, feats, strict=True)], 2)
        return box.transpose(1, 2), cls.transpose(1, 2)

    def distances(self, box: torch.Tensor) -> torch.Tensor:
        """[N, A, 4*reg_max] -> expected (l, t, r, b) in stride units."""
        n, a, _ = box.shape
        prob = box.reshape(n, a, 4, self.reg_max).softmax(-1)
        return prob @ torch.arange(self.reg_max, dtype=box.dtype, device=box.device)


class SegmentHead(nn.Module):
    """Semantic FPN: the three pyramid levels summed at stride 8 (what the shape is), refined with the backbone's
    stride-4 and stride-2 maps (where its edges are). Logits at stride 2; the exported model upsamples them."""

    def __init__(self, c: int, widths: tuple[int, ...], num_classes: int, d: int = 32) -> None:
        super().__init__()
        self.levels = nn.ModuleList(Conv(c, d, 1) for _ in STRIDES)
        self.context = Conv(d, d)
        self.s4 = Conv(widths[1], d, 1)
        self.fuse4 = Conv(d, d)
        self.s2 = Conv(widths[0], d // 2, 1)
        self.reduce = Conv(d, d // 2, 1)
        self.fuse2 = Conv(d // 2, d // 2)
        self.out = nn.Conv2d(d // 2, num_classes, 1)

    def forward(self, x2: torch.Tensor, x4: torch.Tensor, pyramid: tuple[torch.Tensor, ...]) -> torch.Tensor:
        y = self.levels[0](pyramid[0])
        for k, (conv, f) in enumerate(zip(self.levels[1:], pyramid[1:], strict=True), start=1):
            y = y + nn.functional.interpolate(conv(f), scale_factor=float(2**k), mode="bilinear", align_corners=False)
        y = self.context(y)
        y = self.fuse4(self.s4(x4) + _up(y))
        y = self.fuse2(self.s2(x2) + _up(self.reduce(y)))
        return self.out(y)


def _up(x: torch.Tensor) -> torch.Tensor:
    return nn.functional.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)


def _coords(f: torch.Tensor) -> torch.Tensor:
    """(x, y) in [-1, 1] of every cell of a [N, C, H, W] map, as [1, 2, H, W]: where things are."""
    h, w = f.shape[2], f.shape[3]
    ys = (torch.arange(h, dtype=f.dtype, device=f.device) + 0.5) / h * 2 - 1
    xs = (torch.arange(w, dtype=f.dtype, device=f.device) + 0.5) / w * 2 - 1
    return torch.stack([xs.view(1, w).expand(h, w), ys.view(h, 1).expand(h, w)]).unsqueeze(0)


class Tokens(nn.Module):
    """Pyramid maps (strides 16 and 32) -> [N, T, d] tokens that know their position and level; with
    ``colour`` they also carry the stride-8 backbone features and the image's mean colour over each cell
    (the pyramid, trained mostly on shape tasks, keeps little of a shape's colour)."""

    def __init__(self, c: int, d: int, low: int = 0) -> None:
        super().__init__()
        extra = 2 + (low + 3 if low else 0)
        self.low = low
        self.proj16 = nn.Conv2d(c + extra, d, 1)
        self.proj32 = nn.Conv2d(c + extra, d, 1)

    def forward(
        self, n16: torch.Tensor, n32: torch.Tensor, x8: torch.Tensor | None = None, image: torch.Tensor | None = None
    ) -> torch.Tensor:
        out = []
        for k, (proj, f) in enumerate(((self.proj16, n16), (self.proj32, n32)), start=1):
            parts = [f, _coords(f).expand(f.shape[0], -1, -1, -1)]
            if self.low:
                assert x8 is not None and image is not None
                parts += [nn.functional.avg_pool2d(x8, 2**k), nn.functional.avg_pool2d(image, 8 * 2**k)]
            out.append(proj(torch.cat(parts, 1)).flatten(2))
        return torch.cat(out, 2).transpose(1, 2)


class ClassifyHead(nn.Module):
    """Multi-head attention pooling over the pyramid's tokens (the model learns to look at the largest shape),
    with the pooled global context, then a small MLP -> logits."""

    def __init__(self, c: int, num_classes: int, d: int = 96, heads: int = 4) -> None:
        super().__init__()
        self.tokens = Tokens(c, d)
        self.score = nn.Linear(d, heads)
        self.heads = heads
        self.mlp = nn.Sequential(nn.Linear(2 * d, 128), nn.SiLU(inplace=True), nn.Linear(128, num_classes))

    def forward(self, n16: torch.Tensor, n32: torch.Tensor) -> torch.Tensor:
        t = self.tokens(n16, n32)  # N, T, d
        n, length, d = t.shape
        attn = self.score(t).softmax(1)  # N, T, heads: where each head looks
        values = t.reshape(n, length, self.heads, d // self.heads)
        pooled = (attn.unsqueeze(-1) * values).sum(1).reshape(n, d)
        return self.mlp(torch.cat([pooled, t.mean(1)], 1))


class CaptionHead(nn.Module):
    """Tokens for the decoder's attention, and its initial LSTM state from their mean."""

    def __init__(self, c: int, low: int, d: int = 96, hidden: int = 192) -> None:
        super().__init__()
        self.tokens = Tokens(c, d, low)
        self.init_h = nn.Linear(d, hidden)
        self.init_c = nn.Linear(d, hidden)

    def forward(
        self, n16: torch.Tensor, n32: torch.Tensor, x8: torch.Tensor, image: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        t = self.tokens(n16, n32, x8, image)
        g = t.mean(1)
        return t, torch.tanh(self.init_h(g)), self.init_c(g)


class AttentionDecoderStep(nn.Module):
    """One step of Show, Attend and Tell: additive attention over the image tokens, then an LSTM cell.

    (token, h, c, features [N, T, d]) -> (logits, h', c'), the server's one-step decoder contract.
    """

    def __init__(self, vocab_size: int, d: int = 96, hidden: int = 192, embed: int = 48, attn: int = 96) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed)
        self.key = nn.Linear(d, attn)
        self.query = nn.Linear(hidden, attn)
        self.energy = nn.Linear(attn, 1)
        self.cell = nn.LSTMCell(embed + d, hidden)
        self.out = nn.Linear(hidden + d, vocab_size)

    def forward(
        self, token: torch.Tensor, h: torch.Tensor, c: torch.Tensor, features: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        e = self.energy(torch.tanh(self.key(features) + self.query(h).unsqueeze(1)))  # N, T, 1
        context = (e.softmax(1) * features).sum(1)
        h, c = self.cell(torch.cat([self.embed(token), context], 1), (h, c))
        return self.out(torch.cat([h, context], 1)), h, c


class ShapeNet(nn.Module):
    """The trunk and every task's head; the export wrappers below each take the part their model needs."""

    def __init__(
        self, num_classes: int, vocab_size: int, width: int = 16, depth: int = 2, neck: int = 64, hidden: int = 192
    ) -> None:
        super().__init__()
        self.backbone = Backbone(width, depth)
        self.neck = Pyramid(self.backbone.widths, neck)
        self.detect = DetectHead(neck, num_classes)
        self.segment = SegmentHead(neck, self.backbone.widths, num_classes + 1)
        self.classify = ClassifyHead(neck, num_classes)
        self.caption = CaptionHead(neck, self.backbone.widths[2], hidden=hidden)
        self.decoder = AttentionDecoderStep(vocab_size, hidden=hidden)

    def trunk(self, x: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """(backbone maps at strides 2, 4, 8), (pyramid at strides 8, 16, 32)."""
        x2, x4, x8, x16, x32 = self.backbone(x)
        return (x2, x4, x8), self.neck(x8, x16, x32)


class ExportedDetector(nn.Module):
    """Image -> ``[N, 4 + C, A]`` (cx, cy, w, h in input pixels; class probabilities): the yolov8 layout."""

    def __init__(self, net: ShapeNet, size: tuple[int, int]) -> None:
        super().__init__()
        self.net = net
        points, strides = anchor_points(size)
        self.points: torch.Tensor
        self.strides: torch.Tensor
        self.register_buffer("points", points, persistent=False)
        self.register_buffer("strides", strides, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, pyramid = self.net.trunk(x)
        box, cls = self.net.detect(pyramid)
        d = self.net.detect.distances(box) * self.strides.view(1, -1, 1)
        lt, rb = self.points - d[..., :2], self.points + d[..., 2:]
        xywh = torch.cat([(lt + rb) / 2, rb - lt], -1)
        return torch.cat([xywh, cls.sigmoid()], -1).transpose(1, 2)


class ExportedSegmenter(nn.Module):
    """Image -> ``[N, 1 + C, H, W]`` class scores at the input resolution.

    ``views`` > 1 averages the class probabilities over the image and its mirror images (left-right, then
    up-down and transposed with 4): the shapes' classes do not change under them, so the average is a cheap
    ensemble baked into the graph. The output is then log-probabilities (argmax is all the server uses)."""

    def __init__(self, net: ShapeNet, views: int = 1) -> None:
        super().__init__()
        if views not in (1, 2, 4):
            raise ValueError("views must be 1, 2 or 4")
        self.net, self.views = net, views

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        (x2, x4, _), pyramid = self.net.trunk(x)
        return _up(self.net.segment(x2, x4, pyramid))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.views == 1:
            return self.logits(x)
        p = self.logits(x).softmax(1) + self.logits(x.flip(-1)).softmax(1).flip(-1)
        if self.views == 4:
            p = p + self.logits(x.flip(-2)).softmax(1).flip(-2)
            p = p + self.logits(x.transpose(-1, -2)).softmax(1).transpose(-1, -2)
        return (p / self.views).clamp(min=1e-6).log()


class ExportedClassifier(nn.Module):
    def __init__(self, net: ShapeNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, (_, n16, n32) = self.net.trunk(x)
        return self.net.classify(n16, n32)


class ExportedCaptionEncoder(nn.Module):
    def __init__(self, net: ShapeNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        (_, _, x8), (_, n16, n32) = self.net.trunk(x)
        return self.net.caption(n16, n32, x8, x)


def shapenet_from_state(state: dict[str, torch.Tensor]) -> ShapeNet:
    """A :class:`ShapeNet` shaped like ``state`` (hyper-parameters read back from tensor shapes), weights loaded:
    what ``optic export convert`` needs to turn a trunk checkpoint into any of the four models (wrap it in
    ``ExportedClassifier``, ``ExportedDetector(net, size)``, ``ExportedSegmenter``, or ``ExportedCaptionEncoder``
    + ``net.decoder``)."""
    width = state["backbone.stem.0.weight"].shape[0]
    depth = sum(1 for k in state if k.startswith("backbone.s8.1.blocks.") and k.endswith(".0.0.weight"))
    neck = state["neck.lat8.0.weight"].shape[0]
    classes = state["classify.mlp.2.weight"].shape[0]
    vocab, hidden = state["decoder.out.weight"].shape[0], state["decoder.cell.weight_hh"].shape[1]
    net = ShapeNet(classes, vocab, width, depth, neck, hidden)
    net.load_state_dict(state)
    return net.eval()
