"""Merging label suggestions over an input too large for one request (``protoserve suggest``).

The client sends the images in chunks and keeps, in bounded memory, only what the final
choice can need; ``training.active`` makes that choice, as the server does for one request.
Positions are the images' places in the whole input, so ties go to the earlier image, as
``active.rank`` breaks them within one request.

- ``TopUncertain`` (margin, entropy, least-confidence): each image's score depends on that
  image alone, so every chunk's own top ``budget`` (the server's ``Suggest``) holds all of the
  global top ``budget`` that fall in it; a heap of ``budget`` entries merges them. Exact.
- ``Diverse``: ``active.select("diverse", budget)`` looks only at the ``CANDIDATES_FACTOR *
  budget`` images most uncertain by margin. Each chunk is scored (``Suggest`` with
  ``scores_only``: margin score, embedding, nearest support, distribution) and a heap keeps the
  ``K = CANDIDATES_FACTOR * budget`` best so far; at the end ``active.select`` runs once on
  those K, with their nearest supports as the covered points. It picks what one request with
  every image would pick, holding K * (dim + classes) numbers instead of N * that.
- ``rank_columns``: a ``protoserve score`` output holds each image's top-1 probability,
  margin (p1 - p2) and entropy (nats), which fix the three uncertainty scores exactly as
  ``training.active`` defines them: least confidence ``1 - p1``, margin score ``1 - margin``,
  entropy as is. Diversity needs embeddings, which a score file does not have.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from server.client import Suggestion, Suggestions
from server.suggest import CANDIDATES_FACTOR
from training import active

__all__ = ["COLUMN_STRATEGIES", "Diverse", "Pick", "TopUncertain", "rank_columns"]

COLUMN_STRATEGIES = ("margin", "entropy", "least-confidence")


@dataclass(frozen=True)
class Pick:
    """One chosen image: its path (the input's key), score and current top prediction."""

    path: str
    score: float
    label: str
    probability: float


def _pick(key: str, s: Suggestion) -> Pick:
    return Pick(key, s.score, s.prediction.label, s.prediction.probability)


class _Best:
    """The ``size`` best (score, earliest position) entries seen, in bounded memory.

    A key offered again (a path listed twice in a manifest) counts once: its first offer
    ranks at least as high as any later one with the same score, so once that is out of the
    heap the later ones cannot get in, and while it is in they are refused here.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._heap: list[tuple[float, int, str, Any]] = []  # min-heap on (score, -position)
        self._keys: set[str] = set()  # the keys in the heap

    def offer(self, score: float, position: int, key: str, item: Any) -> None:
        if key in self._keys:
            return
        entry = (score, -position, key, item)
        if len(self._heap) < self.size:
            heapq.heappush(self._heap, entry)
        elif entry[:2] > self._heap[0][:2]:
            self._keys.discard(heapq.heapreplace(self._heap, entry)[2])
        else:
            return
        self._keys.add(key)

    def best_first(self) -> list[Any]:
        """The items, highest score first, ties to the earlier position."""
        return [e[3] for e in sorted(self._heap, key=lambda e: (-e[0], -e[1]))]

    def by_position(self) -> list[Any]:
        return [e[3] for e in sorted(self._heap, key=lambda e: -e[1])]


class TopUncertain:
    """margin / entropy / least-confidence: feed each chunk's ``Suggest`` answer."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self._best = _Best(budget)

    def add(self, positions: list[int], keys: list[str], answer: Suggestions) -> None:
        for s in answer.items:
            key = keys[s.index]
            self._best.offer(s.score, positions[s.index], key, _pick(key, s))

    def result(self) -> list[Pick]:
        return list(self._best.best_first())


class Diverse:
    """diverse: feed each chunk's ``Suggest(scores_only=True)`` answer, then ``result``."""

    def __init__(self, budget: int, seed: int = 0) -> None:
        self.budget = budget
        self.seed = seed
        self._best = _Best(CANDIDATES_FACTOR * budget)
        self._labels: tuple[str, ...] | None = None

    def add(self, positions: list[int], keys: list[str], answer: Suggestions) -> None:
        if self._labels is None:
            self._labels = answer.labels
        elif answer.labels != self._labels:
            raise ValueError(
                "the collection's classes changed while the input was being scored "
                f"({len(self._labels)} classes, then {len(answer.labels)}): run again"
            )
        for s in answer.items:
            key = keys[s.index]
            self._best.offer(s.score, positions[s.index], key, (key, s))

    def result(self) -> list[Pick]:
        kept = self._best.by_position()  # position order: select's ties go to the earlier
        if not kept:
            return []
        items: list[tuple[str, Suggestion]] = kept
        covered: dict[int, tuple[float, ...]] = {
            s.nearest_support_id: s.nearest_support for _, s in items if s.nearest_support
        }
        order = active.select(
            "diverse",
            self.budget,
            probs=np.array([s.probabilities for _, s in items], np.float64),
            embeddings=np.array([s.embedding for _, s in items], np.float32),
            labeled_embeddings=(np.array(list(covered.values()), np.float32) if covered else None),
            candidates_factor=CANDIDATES_FACTOR,
            seed=self.seed,
        )
        return [_pick(*items[int(i)]) for i in order]


def _float(value: Any, what: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what}: not a number: {value!r}") from None


def _column_score(strategy: str, row: Mapping[str, Any]) -> float:
    if strategy == "entropy":
        return _float(row.get("entropy"), "entropy")
    if strategy == "margin":
        return 1.0 - _float(row.get("margin"), "margin")
    probs = row.get("probabilities") or []
    return 1.0 - _float(probs[0] if probs else None, "probabilities[0]")


def rank_columns(
    rows: Iterable[Mapping[str, Any]], strategy: str, budget: int
) -> tuple[list[Pick], int, int]:
    """(the ``budget`` best rows of a score output, rows ranked, error rows skipped)."""
    if strategy not in COLUMN_STRATEGIES:
        raise ValueError(
            f"strategy {strategy!r} needs the images (their embeddings); a score output has "
            "only top-k probabilities, entropy and margin: give the folder or manifest it "
            "was scored from as --input"
        )
    best = _Best(budget)
    ranked = skipped = 0
    for n, row in enumerate(rows):
        if row.get("error"):
            skipped += 1
            continue
        key = str(row.get("path"))
        try:
            score = _column_score(strategy, row)
        except ValueError as e:
            raise ValueError(f"row {n + 1} ({key}): {e}") from None
        probs = row.get("probabilities") or [float("nan")]
        best.offer(score, n, key, Pick(key, score, str(row.get("label")), float(probs[0])))
        ranked += 1
    return list(best.best_first()), ranked, skipped
