"""An auxiliary all-class classifier trained next to the episodic loss.

Oreshkin, Rodriguez & Lacoste, "TADAM: Task dependent adaptive metric for improved few-shot
learning", NeurIPS 2018 (arXiv:1805.10123), co-train a few-shot learner with a classifier over
every training class: each episode then also learns from the classes it did not draw. The head
here is the cosine classifier of Chen et al., "A Closer Look at Few-shot Classification",
ICLR 2019 (arXiv:1904.04232, "Baseline++"): one learnt direction per class and a learnt scale
on the cosine similarity. Only the backbone is exported; the head is a training device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class CosineClassifier(nn.Module):
    """Scaled cosine similarity of features [B, D] to ``num_classes`` learnt directions."""

    def __init__(self, dim: int, num_classes: int, scale: float = 10.0) -> None:
        super().__init__()
        if dim < 1 or num_classes < 2:
            raise ValueError(f"need dim >= 1 and num_classes >= 2, got {dim}, {num_classes}")
        self.weight = nn.Parameter(torch.randn(num_classes, dim) / math.sqrt(dim))
        self.log_scale = nn.Parameter(torch.tensor(float(scale)).log())

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        w = F.normalize(self.weight, dim=1)
        return self.log_scale.exp() * F.normalize(features, dim=1) @ w.T

    def loss(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self(features), labels)
