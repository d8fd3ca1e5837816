"""Conv-4 (Vinyals et al. 2016; Snell et al. 2017): four blocks of 3x3 conv, batch norm, ReLU
and 2x2 max-pool. On 28x28 Omniglot the output is 64 x 1 x 1, a 64-d embedding; on 84x84
images it is 64 x 5 x 5 = 1,600-d.

``pools`` (default 4) is how many of the blocks end with the max-pool, counted from the first:
``pools=3`` keeps the last block's 3 x 3 map on 28x28 input, a 576-d embedding that keeps
where each stroke is, for the same convolution cost."""

from __future__ import annotations

import torch
from torch import nn


def conv_block(cin: int, cout: int, pool: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class Conv4(nn.Module):
    def __init__(
        self, in_channels: int = 1, hidden: int = 64, out: int | None = None, pools: int = 4
    ) -> None:
        super().__init__()
        if not 0 <= pools <= 4:
            raise ValueError(f"Conv4 pools must be 0..4, got {pools}")
        out = out or hidden
        self.in_channels = in_channels
        channels = [in_channels, hidden, hidden, hidden, out]
        self.encoder = nn.Sequential(
            *(conv_block(channels[i], channels[i + 1], pool=i < pools) for i in range(4))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_tracing() and (x.ndim != 4 or x.shape[1] != self.in_channels):
            raise ValueError(f"Conv4 expects [B, {self.in_channels}, H, W], got {tuple(x.shape)}")
        return self.encoder(x).flatten(1)
