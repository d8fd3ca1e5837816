"""Label-scarce splits of one labelled pool, for semi-supervised and active-learning runs.

``semisup_split(labels, per_class=10, n_val=5000, seed=0)`` carves, with one
``numpy.random.default_rng(seed)``:

- ``val``: ``n_val`` indices, stratified by class (``n_val // C`` per class, the remainder to
  the lowest classes). Their labels are for choosing a recipe and early stopping only.
- ``labeled``: ``per_class`` indices per class, drawn from the images not in ``val``.
- ``unlabeled``: every index not in ``labeled`` (``val`` included: its images may be used
  without labels, as any unlabeled image, so Fashion-MNIST gives the 59,900 of the protocol).

The test split is never touched here. Indices are sorted int64 arrays, so two runs with the
same seed see exactly the same images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SemiSupSplit:
    labeled: np.ndarray
    val: np.ndarray
    unlabeled: np.ndarray
    seed: int

    def describe(self) -> str:
        return (
            f"seed {self.seed}: {self.labeled.size} labeled, {self.unlabeled.size} unlabeled "
            f"(val {self.val.size} among them, labels for selection only)"
        )


def semisup_split(
    labels: np.ndarray, per_class: int = 10, n_val: int = 5000, seed: int = 0
) -> SemiSupSplit:
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    if per_class < 1 or n_val < 0:
        raise ValueError(f"per_class must be >= 1 and n_val >= 0, got {per_class}, {n_val}")
    classes = np.unique(labels)
    rng = np.random.default_rng(seed)
    base, extra = divmod(n_val, classes.size)
    val: list[np.ndarray] = []
    labeled: list[np.ndarray] = []
    for i, c in enumerate(classes):
        members = rng.permutation(np.flatnonzero(labels == c))
        n_c = base + (1 if i < extra else 0)
        if members.size < n_c + per_class:
            raise ValueError(
                f"class {c} has {members.size} images: fewer than {n_c} val + {per_class} labeled"
            )
        val.append(members[:n_c])
        labeled.append(members[n_c : n_c + per_class])
    lab = np.sort(np.concatenate(labeled)).astype(np.int64)
    unl = np.setdiff1d(np.arange(labels.size, dtype=np.int64), lab)
    return SemiSupSplit(lab, np.sort(np.concatenate(val)).astype(np.int64), unl, seed)
