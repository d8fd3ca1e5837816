"""Label suggestions (issue 7, "Label suggestions"): the images a user should label next.

The ranking is ``training.active``'s, not a copy of it: that module is pure numpy at module
level, so the serving path imports it without pulling torch. The images go through the same
``Pipeline.distribution`` as Classify (decode, batch, embed, score), so each image's class
distribution is exactly the one its Classify probabilities come from.

- ``margin``, ``entropy``, ``least-confidence``: ``active.select`` on the probabilities; each
  suggestion's ``score`` is ``active.uncertainty`` (higher = more worth labeling).
- ``diverse``: ``active.select("diverse", ...)``: the ``CANDIDATES_FACTOR * budget`` most
  uncertain by margin, then k-center greedy among them. The space is the one the collection's
  support index searches (unit-norm embeddings for cosine, raw for l2). The already covered
  points (``labeled_embeddings``) are each image's nearest registered image support: k-center
  only ever needs a candidate's distance to its nearest covered point, so these few vectors
  give the same picks as every support of the collection (exactly, below the index's flat
  limit) at a cost bounded by the request, not by the collection. ``score`` is the margin score.

``score_images`` is the per-image half for clients that send a large input in chunks and run
``active.select`` once at the end (``server.suggest_cli``): each image's score, and for
``diverse`` also its point, its nearest support and its full distribution.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from server.pipeline import Distribution, Pipeline, Prediction
from server.registry import FailedPrecondition, InvalidInput
from training import active

__all__ = [
    "CANDIDATES_FACTOR",
    "STRATEGIES",
    "Scored",
    "Suggestion",
    "check_budget",
    "check_strategy",
    "score_images",
    "suggest",
]

STRATEGIES: tuple[str, ...] = ("margin", "entropy", "least-confidence", "diverse")
CANDIDATES_FACTOR = 10  # diverse: k-center among the CANDIDATES_FACTOR * budget most uncertain
# the active.uncertainty behind each strategy's score (diverse: what select ranks candidates by)
_UNCERTAINTY = {s: s for s in ("margin", "entropy", "least-confidence")} | {"diverse": "margin"}

FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True)
class Suggestion:
    """One image: ``index`` into the request, its ``score`` and current top prediction; with
    ``score_images(..., "diverse")`` also what ``active.select`` needs about it."""

    index: int
    score: float
    prediction: Prediction
    embedding: FloatArray | None = None  # the point k-center sees
    nearest_support: FloatArray | None = None  # the nearest image support's (None: none)
    nearest_support_id: int = 0  # 0: none registered
    probabilities: npt.NDArray[np.float64] | None = None  # the full distribution


@dataclass(frozen=True)
class Scored:
    """``score_images``' answer: one ``Suggestion`` per image in request order."""

    labels: tuple[str, ...]  # the probabilities' classes (diverse only; else empty)
    items: list[Suggestion]


def check_strategy(strategy: str) -> str:
    if strategy not in STRATEGIES:
        raise InvalidInput(f"strategy: unknown {strategy!r} (one of {', '.join(STRATEGIES)})")
    return strategy


def check_budget(budget: int) -> int:
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise InvalidInput(f"budget must be a positive number of images, got {budget!r}")
    return budget


def _distribution(pipeline: Pipeline, collection: str, images: Sequence[bytes]) -> Distribution:
    pipeline.registry.collection(collection)  # NOT_FOUND before the request's own errors
    if not images:
        raise InvalidInput("images: none given; there is nothing to rank")
    d = pipeline.distribution(collection, images)
    if len(d.labels) < 2:
        raise FailedPrecondition(
            f"collection {collection!r} has {len(d.labels)} class(es); ranking by uncertainty "
            "needs at least 2: register another class first"
        )
    return d


def _space(
    pipeline: Pipeline, d: Distribution
) -> tuple[FloatArray, npt.NDArray[np.int64], FloatArray]:
    """(points [N, D], nearest image support ids [N] (-1: none), their vectors [N, D])."""
    x = d.embeddings
    if d.collection.metric == "cosine":
        norms = np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
        x = (x / np.where(norms > 0, norms, 1.0)).astype(np.float32)
    ids, vecs = pipeline.registry.index(d.collection.name).nearest_support_vectors(x)
    return x, ids, vecs


def _top(d: Distribution, i: int) -> Prediction:
    return d.result(i, 1).predictions[0]


def suggest(
    pipeline: Pipeline,
    collection: str,
    images: Sequence[bytes],
    budget: int,
    strategy: str = "margin",
    *,
    seed: int = 0,
) -> list[Suggestion]:
    """The ``budget`` images (all, if fewer) most worth labeling, best first."""
    check_strategy(strategy)
    check_budget(budget)
    d = _distribution(pipeline, collection, images)
    scores = active.uncertainty(_UNCERTAINTY[strategy], probs=d.probs)
    if strategy == "diverse":
        points, ids, vecs = _space(pipeline, d)
        _, first = np.unique(ids, return_index=True)  # each covered support once
        covered = vecs[np.sort(first[ids[first] >= 0])]
        order = active.select(
            "diverse",
            budget,
            probs=d.probs,
            embeddings=points,
            labeled_embeddings=covered,
            candidates_factor=CANDIDATES_FACTOR,
            seed=seed,
        )
    else:
        order = active.select(strategy, budget, probs=d.probs, seed=seed)
    return [Suggestion(int(i), float(scores[i]), _top(d, int(i))) for i in order]


def score_images(
    pipeline: Pipeline, collection: str, images: Sequence[bytes], strategy: str = "margin"
) -> Scored:
    """Every image's score in request order (no choice made); see the module docstring."""
    check_strategy(strategy)
    d = _distribution(pipeline, collection, images)
    scores = active.uncertainty(_UNCERTAINTY[strategy], probs=d.probs)
    if strategy != "diverse":
        return Scored((), [Suggestion(i, float(scores[i]), _top(d, i)) for i in range(d.size)])
    points, ids, vecs = _space(pipeline, d)
    items = [
        Suggestion(
            i,
            float(scores[i]),
            _top(d, i),
            embedding=points[i],
            nearest_support=vecs[i] if ids[i] >= 0 else None,
            nearest_support_id=int(ids[i]) if ids[i] >= 0 else 0,
            probabilities=d.probs[i],
        )
        for i in range(d.size)
    ]
    return Scored(d.labels, items)
