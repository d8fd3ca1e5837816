"""CoMatch's graph-contrastive regularisation and memory-smoothed pseudo-labels (Li, Xiong and
Hoi, "CoMatch: Semi-supervised Learning with Contrastive Graph Regularization", ICCV 2021), as
an addition to FixMatch / FlexMatch (``training.fixmatch``, ``FixMatchConfig.lambda_c > 0``).

A projection head maps the backbone's features to a low-dimensional unit sphere. Each step:

* **memory smoothing** (``alpha < 1``): the weak view's class probabilities ``p`` are mixed with
  those of its neighbours in a queue of recent weak-view embeddings,
  ``q = alpha * p + (1 - alpha) * softmax(z_w . Z / t) @ P``, before thresholding; the queue
  holds the last ``queue_size`` unlabeled weak views (their own probabilities, unsmoothed) and
  labeled views (their one-hot labels);
* **the pseudo-label graph**: ``W = q q^T``, entries under ``threshold`` set to 0, ones on the
  diagonal, rows normalised;
* **the graph-contrastive loss**: the strong views' embeddings ``z_s`` are pulled towards the
  weak views' embeddings ``z_w`` (no gradient) of the same image and of the images the graph
  links it to: ``-sum_j W_ij log softmax_j(z_s_i . z_w_j / t)``. CoMatch contrasts two strong
  views with each other; contrasting the strong view with the weak one, whose forward pass the
  pseudo-labels already need (as SimMatch does, Zheng et al. 2022), costs no extra pass.

``graph_targets``, ``graph_contrastive_loss`` and ``smooth`` are pure functions that tests
check by hand.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def graph_targets(probs: torch.Tensor, threshold: float) -> torch.Tensor:
    """The row-normalised pseudo-label graph of ``[N, K]`` class probabilities: ``p_i . p_j``
    where at least ``threshold``, else 0, with ones on the diagonal."""
    w = probs @ probs.T
    w.fill_diagonal_(1.0)
    w = w * (w >= threshold).to(w.dtype)
    return w / w.sum(1, keepdim=True)


def graph_contrastive_loss(
    z_strong: torch.Tensor, z_weak: torch.Tensor, targets: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Cross-entropy between each row of ``targets`` and the softmax over the weak embeddings
    of its strong embedding's similarities (embeddings are unit vectors)."""
    logits = z_strong @ z_weak.T / temperature
    return -(targets * F.log_softmax(logits, 1)).sum(1).mean()


def smooth(
    probs: torch.Tensor,
    z: torch.Tensor,
    bank_z: torch.Tensor,
    bank_p: torch.Tensor,
    alpha: float,
    temperature: float,
) -> torch.Tensor:
    """``alpha * probs + (1 - alpha) * softmax(z . bank_z / t) @ bank_p`` (an empty bank leaves
    ``probs`` as they are)."""
    if len(bank_z) == 0 or alpha >= 1.0:
        return probs
    a = F.softmax(z @ bank_z.T / temperature, 1)
    return alpha * probs + (1.0 - alpha) * (a @ bank_p)


class CoMatch(nn.Module):
    """The projection head and the memory queue of one training run."""

    def __init__(
        self,
        feature_dim: int,
        n_classes: int,
        *,
        dim: int = 64,
        queue_size: int = 2560,
        threshold: float = 0.8,
        temperature: float = 0.2,
        alpha: float = 0.9,
    ) -> None:
        super().__init__()
        if dim < 1 or queue_size < 0 or not temperature > 0:
            raise ValueError(
                f"need dim >= 1, queue_size >= 0, temperature > 0: "
                f"{dim}, {queue_size}, {temperature}"
            )
        if not 0.0 <= threshold <= 1.0 or not 0.0 <= alpha <= 1.0:
            raise ValueError(f"threshold and alpha must be in [0, 1]: {threshold}, {alpha}")
        self.head = nn.Sequential(
            nn.Linear(feature_dim, feature_dim), nn.ReLU(), nn.Linear(feature_dim, dim)
        )
        self.n_classes, self.threshold = n_classes, threshold
        self.temperature, self.alpha = temperature, alpha
        self.register_buffer("bank_z", torch.zeros(queue_size, dim))
        self.register_buffer("bank_p", torch.zeros(queue_size, n_classes))
        self.register_buffer("filled", torch.zeros((), dtype=torch.int64))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.int64))

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(features), dim=1)

    def smooth(self, probs: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        n = int(self.filled)
        return smooth(probs, z, self.bank_z[:n], self.bank_p[:n], self.alpha, self.temperature)

    @torch.no_grad()
    def push(self, z: torch.Tensor, probs: torch.Tensor) -> None:
        """Writes rows into the queue, oldest first out."""
        size = len(self.bank_z)
        if size == 0:
            return
        z, probs = z[-size:], probs[-size:]
        idx = (int(self.ptr) + torch.arange(len(z), device=z.device)) % size
        self.bank_z[idx] = z
        self.bank_p[idx] = probs
        self.ptr.fill_((int(self.ptr) + len(z)) % size)
        self.filled.fill_(min(size, int(self.filled) + len(z)))

    def loss(
        self, z_strong: torch.Tensor, z_weak: torch.Tensor, probs: torch.Tensor
    ) -> torch.Tensor:
        targets = graph_targets(probs, self.threshold)
        return graph_contrastive_loss(z_strong, z_weak, targets, self.temperature)
