"""Test-time shift averaging: an image's embedding is the mean of the backbone's embeddings of
the image moved by ``-r``, ``0`` and ``+r`` pixels along each axis (a 3x3 grid, 9 views; edges
replicated). Exported as part of the image tower, so every runtime (onnxruntime, Triton, torch)
serves the same averaged embedding and the server needs nothing new. It costs 9 backbone
passes per image; on Omniglot alphabets held out from training it lowers one-shot error
(docs/omniglot-model.md has the measurement)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ShiftAverage(nn.Module):
    def __init__(self, backbone: nn.Module, radius: int = 1) -> None:
        super().__init__()
        if radius < 1:
            raise ValueError(f"radius must be >= 1 pixel, got {radius}")
        self.backbone, self.radius = backbone, radius

    def views(self, x: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] -> [9N, C, H, W], view-major (all images shifted one way, then the next)."""
        r = self.radius
        h, w = x.shape[2], x.shape[3]
        padded = F.pad(x, (r, r, r, r), mode="replicate")
        return torch.cat(
            [
                padded[:, :, r + dy : r + dy + h, r + dx : r + dx + w]
                for dy in (-r, 0, r)
                for dx in (-r, 0, r)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"ShiftAverage expects [B, C, H, W], got {tuple(x.shape)}")
        emb = self.backbone(self.views(x))
        return emb.reshape(9, -1, emb.shape[-1]).mean(0)
