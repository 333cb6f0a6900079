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
