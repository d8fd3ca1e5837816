"""What a ``CollectionIndex`` query returns: class scores, top-k classes, nearest supports."""

from __future__ import annotations

from dataclasses import dataclass

from server.registry.records import FloatArray, IndexArray

__all__ = ["ClassScores", "Neighbours", "TopK"]


@dataclass(frozen=True)
class ClassScores:
    """Scores of every class of one kind: ``scores[q, j]`` is for ``class_ids[j]``/``labels[j]``."""

    scores: FloatArray
    class_ids: IndexArray
    labels: tuple[str, ...]


@dataclass(frozen=True)
class TopK:
    """Best-first: ``scores``/``class_ids`` are [Q, k'] with ``k' = min(k, classes)``."""

    scores: FloatArray
    class_ids: IndexArray
    labels: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class Neighbours:
    """Nearest image supports, best first, [Q, k']; missing ones are id -1 with score -inf."""

    scores: FloatArray
    support_ids: IndexArray
    class_ids: IndexArray
