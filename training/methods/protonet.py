"""Prototypical Networks."""

from __future__ import annotations

import torch

from training.methods.base import FewShotClassifier, check_episode, prototypes


class PrototypicalNetworks(FewShotClassifier):
    """Snell, Swersky & Zemel, "Prototypical Networks for Few-shot Learning", NeurIPS 2017
    (arXiv:1703.05175).

    Each class is the mean embedding of its support images (its prototype); a query scores
    each class by the negative squared Euclidean distance to the prototype (``distance="l2"``,
    the paper's choice) or by a scaled cosine similarity. This is exactly what the server does
    with a registered class, so an exported ProtoNet backbone serves unchanged.
    """

    def forward(
        self, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor
    ) -> torch.Tensor:
        return self.forward_features(support, support_labels, query)[0]

    def forward_features(
        self, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [Q, N], the support then query features [S + Q, D]) from one pass."""
        n_way = check_episode(support, support_labels, query)
        s, q = self.embed_episode(support, query)
        return self.similarity(q, prototypes(s, support_labels, n_way)), torch.cat([s, q])
