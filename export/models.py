"""PyTorch modules for the default models (course-style architectures, small enough for CPU training)."""

from __future__ import annotations

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
