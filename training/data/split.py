"""Train/validation split by class, seeded and documented, so validation classes are unseen.

``by="characters"`` (default): for each superclass in sorted order, its classes sorted by name
are shuffled with one ``numpy.random.default_rng(seed)`` and the first
``round(val_fraction * n)`` go to validation (at least one when ``val_fraction > 0`` and
``n > 1``). Every alphabet keeps most of its characters for training.

``by="superclasses"``: the sorted superclasses are shuffled with the same rng and whole
superclasses move to validation until it holds ``val_fraction`` of the classes: closer to
the one-shot runs (their alphabets are new) at the price of less training data.

Validation is for choosing a recipe; the sample runs (``sample_run/``) are never used for that.
"""

from __future__ import annotations

import numpy as np

from training.data.imageset import ImageSet

SPLITS = ("characters", "superclasses")


def split_classes(
    ds: ImageSet, val_fraction: float = 0.2, seed: int = 0, by: str = "characters"
) -> tuple[ImageSet, ImageSet]:
    """(train, val) subsets of ``ds`` over disjoint base classes."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if by not in SPLITS:
        raise ValueError(f"by must be one of {SPLITS}, got {by!r}")
    rng = np.random.default_rng(seed)
    groups: dict[str, list[int]] = {}
    for c, sup in enumerate(ds.superclasses):
        groups.setdefault(sup, []).append(c)
    val: list[int] = []
    if by == "characters":
        for sup in sorted(groups):
            members = sorted(groups[sup], key=lambda c: ds.classes[c])
            n_val = round(val_fraction * len(members))
            if val_fraction > 0 and len(members) > 1:
                n_val = max(1, n_val)
            val += [members[i] for i in rng.permutation(len(members))[:n_val]]
    else:
        target = val_fraction * len(ds.classes)
        for i in rng.permutation(len(groups)):
            if len(val) >= target:
                break
            val += groups[sorted(groups)[i]]
    val_set = set(val)
    train = [c for c in range(len(ds.classes)) if c not in val_set]
    return ds.subset(train), ds.subset(sorted(val))
