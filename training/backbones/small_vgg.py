"""SmallVGG: a VGG-style (Simonyan & Zisserman 2015) conv net with batch norm (Ioffe & Szegedy
2015) for small grayscale images such as Fashion-MNIST, cheap enough for a 2-core CPU.

Three stages of 3x3 conv + BN + ReLU: two convs at ``width`` channels, 2x2 max-pool, two at
``2 * width``, 2x2 max-pool, one at ``4 * width``, then global average pooling: a ``4 * width``
embedding for any input size (28x28 -> 14x14 -> 7x7 -> pooled).
"""

from __future__ import annotations

import torch
from torch import nn


def _conv(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True)]


class SmallVGG(nn.Module):
    def __init__(self, in_channels: int = 1, width: int = 32) -> None:
        super().__init__()
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        self.in_channels, self.width, self.out_dim = in_channels, width, 4 * width
        w = width
        self.encoder = nn.Sequential(
            *_conv(in_channels, w),
            *_conv(w, w),
            nn.MaxPool2d(2),
            *_conv(w, 2 * w),
            *_conv(2 * w, 2 * w),
            nn.MaxPool2d(2),
            *_conv(2 * w, 4 * w),
            nn.AdaptiveAvgPool2d(1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_tracing() and (x.ndim != 4 or x.shape[1] != self.in_channels):
            raise ValueError(
                f"SmallVGG expects [B, {self.in_channels}, H, W], got {tuple(x.shape)}"
            )
        return self.encoder(x).flatten(1)
