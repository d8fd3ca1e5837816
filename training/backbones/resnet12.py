"""ResNet-12 as used in few-shot learning (Oreshkin et al., TADAM, NeurIPS 2018; Lee et al.,
MetaOptNet, CVPR 2019): four residual blocks of three 3x3 conv + BN + LeakyReLU(0.1) with a
1x1 conv shortcut, each followed by 2x2 max-pool; global average pooling at the end.
The standard widths are (64, 160, 320, 640); DropBlock is left out."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import nn


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()

        def conv(a: int, b: int) -> list[nn.Module]:
            return [nn.Conv2d(a, b, 3, padding=1, bias=False), nn.BatchNorm2d(b)]

        act = nn.LeakyReLU(0.1)
        self.body = nn.Sequential(*conv(cin, cout), act, *conv(cout, cout), act, *conv(cout, cout))
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.out = nn.Sequential(nn.LeakyReLU(0.1), nn.MaxPool2d(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(x) + self.shortcut(x))


class ResNet12(nn.Module):
    def __init__(self, in_channels: int = 3, widths: Sequence[int] = (64, 160, 320, 640)) -> None:
        super().__init__()
        if len(widths) != 4:
            raise ValueError(f"ResNet-12 has four blocks, got widths {tuple(widths)}")
        self.in_channels = in_channels
        chans = [in_channels, *widths]
        self.blocks = nn.Sequential(*(ResBlock(a, b) for a, b in itertools.pairwise(chans)))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_tracing() and (x.ndim != 4 or x.shape[1] != self.in_channels):
            raise ValueError(
                f"ResNet12 expects [B, {self.in_channels}, H, W], got {tuple(x.shape)}"
            )
        return self.blocks(x).mean(dim=(2, 3))
