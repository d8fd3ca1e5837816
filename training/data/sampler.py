"""Seeded N-way K-shot Q-query episodes over an ``ImageSet`` (rotated classes included).

Episode ``i`` is drawn from ``numpy.random.default_rng([seed, i])``: any episode can be
recreated on its own, so a sampler's whole state is ``(seed, next)`` and a resumed run sees
exactly the episodes an uninterrupted one would.

``within_superclass``: all N classes of an episode come from one superclass (alphabet), picked
uniformly among those with at least N usable classes -- the structure of the original 20-way
within-alphabet one-shot runs, harder than uniform sampling. ``split_drawers``: the K support
images and the Q queries come from K + Q distinct drawers shared by the whole episode (as in
the runs, where one person drew every training image), needs ``ImageSet.drawers``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from training.data.imageset import ImageSet


@dataclass(frozen=True)
class Episode:
    classes: np.ndarray  # [N] class ids (rotated classes included)
    support: np.ndarray  # [N*K] image indices, class-major: class 0's K shots first
    support_labels: np.ndarray  # [N*K] in 0..N-1
    support_turns: np.ndarray  # [N*K] quarter turns
    query: np.ndarray  # [N*Q]
    query_labels: np.ndarray
    query_turns: np.ndarray


class EpisodeSampler:
    def __init__(
        self,
        ds: ImageSet,
        n_way: int,
        k_shot: int,
        q_query: int,
        *,
        seed: int = 0,
        within_superclass: bool = False,
        split_drawers: bool = False,
    ) -> None:
        if min(n_way, k_shot) < 1 or q_query < 0:
            raise ValueError(
                f"need n_way, k_shot >= 1 and q_query >= 0, got {n_way}, {k_shot}, {q_query}"
            )
        if split_drawers and ds.drawers is None:
            raise ValueError("split_drawers needs an ImageSet with drawers")
        self.ds, self.n_way, self.k_shot, self.q_query = ds, n_way, k_shot, q_query
        self.seed, self.next = int(seed), 0
        self.within_superclass, self.split_drawers = within_superclass, split_drawers
        need = k_shot + q_query
        usable = [c for c in range(ds.num_classes) if len(ds.indices_of(c)) >= need]
        if len(usable) < n_way:
            raise ValueError(
                f"{n_way}-way episodes need {n_way} classes with >= {need} images, "
                f"the set has {len(usable)}"
            )
        self._usable = np.array(usable, dtype=np.int64)
        groups: dict[str, list[int]] = {}
        for c in usable:
            groups.setdefault(ds.superclass_of(c), []).append(c)
        self._groups = [np.array(g) for _, g in sorted(groups.items()) if len(g) >= n_way]
        if within_superclass and not self._groups:
            raise ValueError(f"no superclass has {n_way} classes with >= {need} images")

    def episode(self, i: int) -> Episode:
        rng = np.random.default_rng([self.seed, int(i)])
        pool = (
            self._groups[rng.integers(len(self._groups))]
            if self.within_superclass
            else self._usable
        )
        classes = rng.choice(pool, self.n_way, replace=False)
        k, q = self.k_shot, self.q_query
        if self.split_drawers:
            assert self.ds.drawers is not None
            drawers = rng.permutation(np.unique(self.ds.drawers))[: k + q]
        support, query = [], []
        for c in classes:
            idx = self.ds.indices_of(int(c))
            if self.split_drawers:
                by = {int(d): j for j, d in zip(idx, self.ds.drawers[idx], strict=True)}
                missing = [int(d) for d in drawers if int(d) not in by]
                if missing:
                    raise ValueError(f"class {self.ds.class_name(int(c))} lacks drawers {missing}")
                pick = np.array([by[int(d)] for d in drawers])
            else:
                pick = rng.choice(idx, k + q, replace=False)
            support.append(pick[:k])
            query.append(pick[k:])
        turns = np.array([self.ds.rotation(int(c)) for c in classes], dtype=np.int64)
        ways = np.arange(self.n_way, dtype=np.int64)
        return Episode(
            classes=classes,
            support=np.concatenate(support),
            support_labels=np.repeat(ways, k),
            support_turns=np.repeat(turns, k),
            query=np.concatenate(query),
            query_labels=np.repeat(ways, q),
            query_turns=np.repeat(turns, q),
        )

    def __iter__(self) -> Iterator[Episode]:
        while True:
            ep = self.episode(self.next)
            self.next += 1
            yield ep

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "next": self.next}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed, self.next = int(state["seed"]), int(state["next"])
