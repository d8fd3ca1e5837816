"""The shared maths of the few-shot methods: episode checks, prototypes, distances.

Every method is an ``nn.Module`` with ``forward(support, support_labels, query) -> logits``
of shape [Q, N] (larger is better) and ``loss(logits, query_labels)``. ``support`` and
``query`` are image batches [S, C, H, W] and [Q, C, H, W]; ``support_labels`` is int [S] with
every class 0..N-1 present. ``embed`` is the backbone alone: what gets exported and served.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from training.devices import autocast_call

DISTANCES = ("l2", "cosine")


def check_episode(support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor) -> int:
    """Validates an episode's shapes and labels; returns N (the number of ways)."""
    if support.ndim != 4 or query.ndim != 4:
        raise ValueError(
            f"support and query must be [B, C, H, W], got {tuple(support.shape)} "
            f"and {tuple(query.shape)}"
        )
    if support.shape[1:] != query.shape[1:]:
        raise ValueError(
            f"support images {tuple(support.shape[1:])} and query images "
            f"{tuple(query.shape[1:])} differ"
        )
    if support_labels.ndim != 1 or support_labels.shape[0] != support.shape[0]:
        raise ValueError(
            f"support_labels must be [{support.shape[0]}], got {tuple(support_labels.shape)}"
        )
    if support_labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"support_labels must be integers, got {support_labels.dtype}")
    n_way = int(support_labels.max()) + 1 if support_labels.numel() else 0
    present = torch.bincount(support_labels, minlength=n_way)
    if n_way == 0 or int(support_labels.min()) < 0 or bool((present == 0).any()):
        raise ValueError(
            f"support_labels must cover 0..N-1 with no gaps, got counts {present.tolist()}"
        )
    return n_way


def prototypes(features: torch.Tensor, labels: torch.Tensor, n_way: int) -> torch.Tensor:
    """Mean feature of each class: [S, D] -> [N, D]."""
    one_hot = F.one_hot(labels, n_way).to(features.dtype)  # [S, N]
    return (one_hot.T @ features) / one_hot.sum(0).unsqueeze(1)


def l2_logits(queries: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
    """Negative squared Euclidean distance [Q, N] (the server's ``l2`` score)."""
    q2 = (queries * queries).sum(1, keepdim=True)
    p2 = (protos * protos).sum(1).unsqueeze(0)
    return -(q2 - 2 * queries @ protos.T + p2).clamp_min(0)


def cosine_logits(
    queries: torch.Tensor, protos: torch.Tensor, scale: torch.Tensor | float = 1.0
) -> torch.Tensor:
    """Scaled cosine similarity [Q, N]."""
    return scale * F.normalize(queries, dim=1) @ F.normalize(protos, dim=1).T


class FewShotClassifier(nn.Module):
    """A backbone plus a way of scoring queries against a labelled support set."""

    def __init__(self, backbone: nn.Module, distance: str = "l2", scale: float = 10.0) -> None:
        super().__init__()
        if distance not in DISTANCES:
            raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
        self.backbone = backbone
        self.distance = distance
        # a learnable temperature for cosine scores (Oreshkin et al. 2018); unused for l2
        self.log_scale = nn.Parameter(
            torch.tensor(float(scale)).log(), requires_grad=distance == "cosine"
        )
        # a dtype (torch.bfloat16) runs the backbone under autocast; its features come back as
        # float32, so prototypes, distances and losses never lose precision (a training setting,
        # not saved with the weights)
        self.autocast_dtype: torch.dtype | None = None

    @property
    def metric(self) -> str:
        """The server scoring metric that ranks like this method's distance."""
        return self.distance

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = autocast_call(self.backbone, x, self.autocast_dtype)
        if out.ndim != 2:
            raise ValueError(f"the backbone must return [B, D], got {tuple(out.shape)}")
        return out

    def embed_episode(
        self, support: torch.Tensor, query: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Support and query features from one backbone pass (shared batch statistics)."""
        feats = self.embed(torch.cat([support, query]))
        return feats[: support.shape[0]], feats[support.shape[0] :]

    def similarity(self, queries: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
        if self.distance == "l2":
            return l2_logits(queries, protos)
        return cosine_logits(queries, protos, self.log_scale.exp())

    def forward(
        self, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor
    ) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, logits: torch.Tensor, query_labels: torch.Tensor) -> torch.Tensor:
        if logits.ndim != 2 or logits.shape[0] != query_labels.shape[0]:
            raise ValueError(
                f"logits {tuple(logits.shape)} do not match "
                f"{tuple(query_labels.shape)} query labels"
            )
        return F.cross_entropy(logits, query_labels)
