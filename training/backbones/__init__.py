"""Backbones by name: ``conv4``, ``resnet12``, ``small_vgg``, ``strided``,
``open_clip:<arch>[@<pretrained>]``, ``timm:<name>``. Options (``hidden``, ``widths``,
``width``) come as keyword arguments."""

from __future__ import annotations

from typing import Any

from torch import nn

from training.backbones.conv4 import Conv4
from training.backbones.resnet12 import ResNet12
from training.backbones.small_vgg import SmallVGG
from training.backbones.strided import StridedCNN
from training.backbones.towers import ImageTower, open_clip_tower, timm_tower

__all__ = ["BACKBONES", "Conv4", "ImageTower", "ResNet12", "SmallVGG", "create_backbone"]

BACKBONES = (
    "conv4",
    "resnet12",
    "small_vgg",
    "strided",
    "open_clip:<arch>[@<pretrained>]",
    "timm:<name>",
)


def create_backbone(name: str, in_channels: int = 1, **options: Any) -> nn.Module:
    if name == "conv4":
        return Conv4(in_channels, **options)
    if name == "resnet12":
        return ResNet12(in_channels, **options)
    if name == "small_vgg":
        return SmallVGG(in_channels, **options)
    if name == "strided":
        return StridedCNN(in_channels, **options)
    if name.startswith("open_clip:"):
        arch, _, pretrained = name.removeprefix("open_clip:").partition("@")
        return open_clip_tower(arch, pretrained or None, in_channels)
    if name.startswith("timm:"):
        return timm_tower(name.removeprefix("timm:"), in_channels=in_channels, **options)
    raise ValueError(f"unknown backbone {name!r} (choose from {', '.join(BACKBONES)})")
