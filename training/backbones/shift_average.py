"""Test-time view averaging: an image's embedding is the mean of the backbone's embeddings of
the image moved by ``-r``, ``0`` and ``+r`` pixels along each axis (a 3x3 grid, 9 views; edges
replicated), optionally each also turned by a few small angles (``angles``: 9 shifts x the
angles, e.g. -6, 0 and +6 degrees for 27 views). Exported as part of the image tower, so every
runtime (onnxruntime, Triton, torch) serves the same averaged embedding and the server needs
nothing new. It costs one backbone pass per view; on Omniglot alphabets held out from training
it lowers one-shot error (docs/omniglot-model.md has the measurement)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def rotation_taps(h: int, w: int, degrees: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear taps of an image turned ``degrees`` counter-clockwise about its centre, edges
    replicated: output pixel ``p`` = sum over k of ``weights[k, p] * input[index[k, p]]`` on the
    flattened ``h * w`` image. Fixed for a fixed size, so the rotation exports as four Gathers."""
    t = math.radians(degrees)
    cos, sin = math.cos(t), math.sin(t)
    cy, cx = (h - 1) / 2, (w - 1) / 2
    y, x = torch.meshgrid(
        torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij"
    )
    # where each output pixel comes from: the inverse rotation (y grows downwards)
    sx = (cos * (x - cx) - sin * (y - cy) + cx).clamp(0, w - 1)
    sy = (sin * (x - cx) + cos * (y - cy) + cy).clamp(0, h - 1)
    x0, y0 = sx.floor(), sy.floor()
    fx, fy = sx - x0, sy - y0
    x0, y0 = x0.long(), y0.long()
    x1, y1 = (x0 + 1).clamp(max=w - 1), (y0 + 1).clamp(max=h - 1)
    index = torch.stack([y0 * w + x0, y0 * w + x1, y1 * w + x0, y1 * w + x1]).reshape(4, -1)
    weights = torch.stack([(1 - fy) * (1 - fx), (1 - fy) * fx, fy * (1 - fx), fy * fx])
    return index, weights.reshape(4, -1).float()


class ShiftAverage(nn.Module):
    def __init__(
        self,
        backbone: nn.Module,
        radius: int = 1,
        angles: tuple[float, ...] = (),
        size: tuple[int, int] | None = None,
    ) -> None:
        """``angles`` (degrees; 0 for the unturned image) needs the input ``size`` (H, W)."""
        super().__init__()
        if radius < 1:
            raise ValueError(f"radius must be >= 1 pixel, got {radius}")
        if angles and size is None:
            raise ValueError("rotated views need the input size (H, W)")
        self.backbone, self.radius = backbone, radius
        self.angles, self.size = tuple(float(a) for a in angles), size
        taps = [rotation_taps(*size, a) for a in self.angles] if size else []
        self.register_buffer("tap_index", torch.stack([i for i, _ in taps]) if taps else None)
        self.register_buffer("tap_weight", torch.stack([w for _, w in taps]) if taps else None)

    @property
    def num_views(self) -> int:
        return 9 * max(1, len(self.angles))

    def turned(self, x: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] -> [A*N, C, H, W], angle-major (the input as is without ``angles``)."""
        if self.tap_index is None:
            return x
        if not torch.jit.is_tracing() and tuple(x.shape[2:]) != self.size:
            raise ValueError(f"rotated views are built for {self.size}, got {tuple(x.shape[2:])}")
        taps = x.flatten(2)[:, :, self.tap_index] * self.tap_weight  # [N, C, A, 4, H*W]
        return taps.sum(3).movedim(2, 0).reshape(-1, *x.shape[1:])

    def views(self, x: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] -> [V*N, C, H, W], view-major (all images moved one way, then the next)."""
        r = self.radius
        x = self.turned(x)
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
        return emb.reshape(self.num_views, -1, emb.shape[-1]).mean(0)
