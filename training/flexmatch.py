"""Curriculum pseudo-labelling: FlexMatch's class-wise thresholds (Zhang et al. 2021,
"FlexMatch: Boosting Semi-Supervised Learning with Curriculum Pseudo Labeling").

A fixed threshold (FixMatch's 0.95) keeps few pseudo-labels of the classes the model is
still bad at, so those classes learn slowest. FlexMatch scales the threshold per class by
how well that class is being learnt, estimated from the unlabeled data itself:

* each unlabeled image remembers the class it was last confidently (``> tau``) predicted as,
  or none;
* the learning effect of class c is ``sigma(c)``, the number of images remembered as c;
* ``beta(c) = sigma(c) / max(max_c sigma, n_unused)`` (with threshold warm-up: while most
  images are still unused, every class counts as barely learnt);
* the class threshold is ``M(beta(c)) * tau`` with the convex map ``M(x) = x / (2 - x)``,
  so a well-learnt class keeps a threshold near ``tau`` and a lagging one a lower threshold.
"""

from __future__ import annotations

import torch


def convex_map(x: torch.Tensor) -> torch.Tensor:
    """FlexMatch's non-linear mapping ``x / (2 - x)`` (0 -> 0, 1 -> 1, convex)."""
    return x / (2.0 - x)


class ClassThresholds:
    """The per-image memory and the class thresholds it implies."""

    def __init__(self, n_unlabeled: int, n_classes: int, warmup: bool = True) -> None:
        if n_unlabeled <= 0 or n_classes <= 0:
            raise ValueError("need at least one unlabeled image and one class")
        self.selected = torch.full((n_unlabeled,), -1, dtype=torch.int64)
        self.n_classes = n_classes
        self.warmup = warmup

    def learning_effect(self) -> torch.Tensor:
        """``beta(c)`` for every class, in [0, 1]."""
        kept = self.selected[self.selected >= 0]
        sigma = torch.bincount(kept, minlength=self.n_classes).to(torch.float32)
        denom = sigma.max()
        if self.warmup:
            denom = torch.maximum(denom, torch.tensor(float(len(self.selected) - len(kept))))
        return sigma / denom if denom > 0 else torch.zeros(self.n_classes)

    def thresholds(self, tau: float) -> torch.Tensor:
        """Per-class confidence thresholds, float32 ``[n_classes]``."""
        return convex_map(self.learning_effect()) * tau

    def update(
        self, index: torch.Tensor, label: torch.Tensor, conf: torch.Tensor, tau: float
    ) -> None:
        """Remembers the images of this batch predicted above the fixed ``tau``."""
        sure = conf > tau
        self.selected[index[sure]] = label[sure]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"selected": self.selected.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state["selected"].shape != self.selected.shape:
            raise ValueError("FlexMatch state is for another number of unlabeled images")
        self.selected = state["selected"].clone()
