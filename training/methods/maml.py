"""Model-Agnostic Meta-Learning, second- and first-order."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from training.methods.base import FewShotClassifier, check_episode


class MAML(FewShotClassifier):
    """Finn, Abbeel & Levine, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep
    Networks", ICML 2017 (arXiv:1703.03400); first-order MAML is the approximation in its
    section 5.2 (gradients of the inner updates are not differentiated).

    The network is the backbone plus an ``n_way`` linear head. For each episode it takes
    ``inner_steps`` SGD steps of size ``inner_lr`` on the support loss, starting from the
    meta-learned weights, and scores the queries with the adapted weights; the outer loss is
    the adapted query loss. Batch norm uses the episode's batch statistics, as in the paper.
    Served on its own, the backbone's embedding is scored by cosine.
    """

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        n_way: int,
        inner_lr: float = 0.4,
        inner_steps: int = 1,
        first_order: bool = False,
    ) -> None:
        super().__init__(backbone, distance="cosine")
        self.head = nn.Linear(feature_dim, n_way)
        self.n_way, self.inner_lr, self.inner_steps = n_way, inner_lr, inner_steps
        self.first_order = first_order

    def _logits(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        feats = functional_call(self.backbone, _prefixed(params, "backbone."), (x,))
        return functional_call(self.head, _prefixed(params, "head."), (feats,))

    def forward(
        self, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor
    ) -> torch.Tensor:
        n_way = check_episode(support, support_labels, query)
        if n_way != self.n_way:
            raise ValueError(f"this MAML head has {self.n_way} ways, the episode has {n_way}")
        params = {n: p for n, p in self.named_parameters() if n != "log_scale"}
        create_graph = self.training and not self.first_order
        with torch.enable_grad(), _batch_stats(self):  # adaptation needs gradients at eval too
            for _ in range(self.inner_steps):
                loss = F.cross_entropy(self._logits(params, support), support_labels)
                grads = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph)
                params = {
                    n: p - self.inner_lr * g
                    for (n, p), g in zip(params.items(), grads, strict=True)
                }
            logits = self._logits(params, query)
        return logits if self.training else logits.detach()


@contextlib.contextmanager
def _batch_stats(model: nn.Module) -> Iterator[None]:
    """Outside training, batch norm still normalises with the episode's statistics (as MAML
    is trained) while its running statistics stay untouched (momentum 0)."""
    if model.training:
        yield
        return
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.train()
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in zip(norms, saved, strict=True):
            m.eval()
            m.momentum = momentum


def _prefixed(params: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {n.removeprefix(prefix): p for n, p in params.items() if n.startswith(prefix)}
