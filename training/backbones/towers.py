"""Any open_clip or timm image tower as a backbone ([B, C, H, W] -> [B, D]).

open_clip and timm are imported only when asked for; a missing one raises ImportError saying
what to install. One-channel inputs are repeated to three for towers that want RGB.
"""

from __future__ import annotations

import torch
from torch import nn


def _require(module: str, pip_name: str) -> object:
    try:
        return __import__(module)
    except ImportError as e:
        raise ImportError(f"this backbone needs {module} (pip install {pip_name}): {e}") from e


class ImageTower(nn.Module):
    def __init__(self, tower: nn.Module, in_channels: int, tower_channels: int = 3) -> None:
        super().__init__()
        self.tower, self.in_channels, self.tower_channels = tower, in_channels, tower_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_tracing() and (x.ndim != 4 or x.shape[1] != self.in_channels):
            raise ValueError(f"tower expects [B, {self.in_channels}, H, W], got {tuple(x.shape)}")
        if self.in_channels == 1 and self.tower_channels == 3:
            x = x.expand(-1, 3, -1, -1)
        out = self.tower(x)
        return out.flatten(1) if out.ndim > 2 else out


def open_clip_tower(arch: str, pretrained: str | None = None, in_channels: int = 3) -> ImageTower:
    """The image tower (``model.visual``) of an open_clip architecture."""
    open_clip = _require("open_clip", "open_clip_torch")
    model = open_clip.create_model(arch, pretrained=pretrained)  # type: ignore[attr-defined]
    return ImageTower(model.visual, in_channels)


def timm_tower(name: str, pretrained: bool = False, in_channels: int = 3) -> ImageTower:
    """A timm model without its classifier (``num_classes=0``: pooled features)."""
    timm = _require("timm", "timm")
    model = timm.create_model(  # type: ignore[attr-defined]
        name, pretrained=pretrained, num_classes=0, in_chans=in_channels
    )
    return ImageTower(model, in_channels, tower_channels=in_channels)
