"""Few-shot methods over a shared base (``base.py``), one file each, and their factory."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from training.methods.base import FewShotClassifier, cosine_logits, l2_logits, prototypes
from training.methods.maml import MAML
from training.methods.matching import MatchingNetworks
from training.methods.protonet import PrototypicalNetworks
from training.methods.relation import RelationNetworks

__all__ = [
    "MAML",
    "METHODS",
    "FewShotClassifier",
    "MatchingNetworks",
    "PrototypicalNetworks",
    "RelationNetworks",
    "cosine_logits",
    "create_method",
    "feature_dim",
    "l2_logits",
    "prototypes",
]

METHODS = ("protonet", "matching", "relation", "maml", "fomaml")


def feature_dim(backbone: nn.Module, in_channels: int, size: tuple[int, int]) -> int:
    """The backbone's embedding width, from one dummy forward pass in eval mode."""
    was_training = backbone.training
    backbone.eval()
    dev = next(backbone.parameters()).device
    with torch.no_grad():
        dim = int(backbone(torch.zeros(1, in_channels, *size, device=dev)).shape[1])
    backbone.train(was_training)
    return dim


def create_method(
    name: str,
    backbone: nn.Module,
    *,
    in_channels: int,
    size: tuple[int, int],
    n_way: int,
    distance: str = "l2",
    **options: Any,
) -> FewShotClassifier:
    """``options``: ``scale`` (protonet/matching), ``hidden`` (relation), ``inner_lr`` and
    ``inner_steps`` (maml/fomaml)."""
    if name == "protonet":
        return PrototypicalNetworks(backbone, distance=distance, **options)
    if name == "matching":
        return MatchingNetworks(backbone, **options)
    dim = feature_dim(backbone, in_channels, size)
    if name == "relation":
        return RelationNetworks(backbone, dim, **options)
    if name in ("maml", "fomaml"):
        return MAML(backbone, dim, n_way, first_order=name == "fomaml", **options)
    raise ValueError(f"unknown method {name!r} (choose from {', '.join(METHODS)})")
