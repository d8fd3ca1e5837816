"""Relation Networks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from training.methods.base import FewShotClassifier, check_episode, prototypes


class RelationNetworks(FewShotClassifier):
    """Sung, Yang, Zhang, Xiang, Torr & Hospedales, "Learning to Compare: Relation Network for
    Few-Shot Learning", CVPR 2018 (arXiv:1711.06025).

    A learned relation module scores each (class, query) pair: it reads the concatenation of
    the class embedding (the mean of its support embeddings; the paper sums them) and the
    query embedding and outputs a relation score in [0, 1], trained by mean squared error
    against the one-hot match. Here the relation module is an MLP over the backbone's flat
    embedding (the paper convolves un-pooled feature maps; on 28x28 Conv-4 they are 1x1).
    The embedding alone, when served, is scored by the server's ``metric`` (cosine).
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, hidden: int = 8) -> None:
        super().__init__(backbone, distance="cosine")
        self.relation = nn.Sequential(
            nn.Linear(2 * feature_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 1)
        )
        self.feature_dim = feature_dim

    def forward(
        self, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor
    ) -> torch.Tensor:
        n_way = check_episode(support, support_labels, query)
        s, q = self.embed_episode(support, query)
        if s.shape[1] != self.feature_dim:
            raise ValueError(
                f"backbone gives {s.shape[1]}-d features, the relation module "
                f"was built for {self.feature_dim}"
            )
        protos = prototypes(s, support_labels, n_way)
        pairs = torch.cat(
            [protos.unsqueeze(0).expand(q.shape[0], -1, -1), q.unsqueeze(1).expand(-1, n_way, -1)],
            dim=2,
        )
        return torch.sigmoid(self.relation(pairs).squeeze(2))  # [Q, N]

    def loss(self, logits: torch.Tensor, query_labels: torch.Tensor) -> torch.Tensor:
        if logits.ndim != 2 or logits.shape[0] != query_labels.shape[0]:
            raise ValueError(
                f"scores {tuple(logits.shape)} do not match "
                f"{tuple(query_labels.shape)} query labels"
            )
        return F.mse_loss(logits, F.one_hot(query_labels, logits.shape[1]).to(logits.dtype))
