"""Matching Networks."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from training.methods.base import FewShotClassifier, check_episode, cosine_logits


class MatchingNetworks(FewShotClassifier):
    """Vinyals, Blundell, Lillicrap, Kavukcuoglu & Wierstra, "Matching Networks for One Shot
    Learning", NeurIPS 2016 (arXiv:1606.04080).

    A query's label distribution is an attention-weighted vote of the support labels,
    ``p(y | x) = sum_i softmax_i(c(f(x), g(x_i))) * onehot(y_i)``, with cosine similarity
    ``c`` (times a learnable temperature). ``f = g`` is the shared backbone: the paper's
    optional fully conditional embeddings (the bidirectional-LSTM context) are not included.
    The logits returned are ``log p(y | x)``, so cross-entropy is the paper's NLL loss.
    """

    def __init__(self, backbone: torch.nn.Module, scale: float = 10.0) -> None:
        super().__init__(backbone, distance="cosine", scale=scale)

    def forward(
        self, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor
    ) -> torch.Tensor:
        n_way = check_episode(support, support_labels, query)
        s, q = self.embed_episode(support, query)
        attention = cosine_logits(q, s, self.log_scale.exp()).softmax(dim=1)  # [Q, S]
        probs = attention @ F.one_hot(support_labels, n_way).to(attention.dtype)  # [Q, N]
        return probs.clamp_min(1e-12).log()
