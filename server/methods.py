"""The scoring methods: a collection's class distribution for embedded query images.

``score(coll, index, method, q, logit_scale, knn_k)`` gives, over every class of the collection,
the method's raw scores and its probabilities: a softmax of ``logit_scale * score`` for
``prototype`` (class prototypes), ``zero-shot`` (text class embeddings) and ``hybrid``
(zero-shot logits plus Tip-Adapter's cache term over the image supports), and the normalised
neighbour votes themselves for ``knn``. ``Distribution.result`` turns one row into the top k,
entropy, margin and open-set flag every front end returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from server.registry import Collection, FailedPrecondition, InvalidInput
from server.registry.records import Kind, Method

FloatArray = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Prediction:
    label: str
    score: float
    probability: float


@dataclass(frozen=True)
class ImageResult:
    predictions: tuple[Prediction, ...]
    entropy: float
    margin: float
    unknown: bool


@dataclass(frozen=True)
class Distribution:
    """``Pipeline.distribution``'s answer for N images over the collection's C classes."""

    collection: Collection
    labels: tuple[str, ...]  # the classes, in column order
    probs: F64  # [N, C]: softmax (knn: the normalised votes)
    scores: F64  # [N, C]: the method's raw scores
    embeddings: FloatArray  # [N, dim]: the images as the model embedded them

    @property
    def size(self) -> int:
        return int(self.embeddings.shape[0])

    def result(self, i: int, k: int) -> ImageResult:
        """Image ``i``'s top ``k``, entropy (nats), margin and open-set flag."""
        probs, scores, labels = self.probs[i], self.scores[i], self.labels
        order = np.argsort(-probs, kind="stable")
        top = order[:k]
        preds = tuple(Prediction(labels[j], float(scores[j]), float(probs[j])) for j in top)
        p = probs[probs > 0]
        entropy = float(-(p * np.log(p)).sum())
        p1 = float(probs[order[0]])
        p2 = float(probs[order[1]]) if len(order) > 1 else 0.0
        threshold = self.collection.threshold
        return ImageResult(preds, entropy, p1 - p2, threshold is not None and p1 < threshold)


def softmax(x: F64) -> F64:
    z = x - np.max(x, axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)  # type: ignore[no-any-return]


def check_transductive(method: Method, transductive: bool) -> None:
    if transductive and method != "prototype":
        raise InvalidInput(
            f"transductive refinement applies to the 'prototype' method, not {method!r}"
        )


def score(
    coll: Collection,
    index: Any,
    method: Method,
    q: FloatArray,
    logit_scale: float,
    knn_k: int,
    transductive: bool = False,
) -> tuple[tuple[str, ...], F64, F64]:
    """(class labels, probabilities [N, C], raw scores [N, C]) of ``method`` for queries ``q``;
    ``index`` is the collection's ``CollectionIndex``. ``transductive`` (prototype only, checked
    by the caller with ``check_transductive`` before embedding) refines the prototypes with
    ``q`` first (``server.transduction``)."""
    if method == "knn":
        cs = index.knn(q, knn_k)
        if not cs.labels:
            raise FailedPrecondition(
                f"collection {coll.name!r} has no image classes to score with 'knn'"
            )
        votes = cs.scores.astype(np.float64)
        return cs.labels, votes, votes
    kind: Kind = "image" if method == "prototype" else "text"
    if transductive:
        cs = index.transductive_class_scores(q, logit_scale)
    else:
        cs = index.class_scores(q, kind)
    scores = cs.scores.astype(np.float64)
    if not cs.labels:
        raise FailedPrecondition(
            f"collection {coll.name!r} has no {kind} classes to score with {method!r}"
        )
    logits = logit_scale * scores
    if method == "hybrid":
        logits = logits + cache_logits(coll, index, q, cs.class_ids)
    return cs.labels, softmax(logits), scores


def cache_logits(
    coll: Collection, index: Any, q: FloatArray, class_ids: npt.NDArray[np.int64]
) -> F64:
    """Tip-Adapter's cache term: alpha * exp(-beta * (1 - f K^T)) V over image supports."""
    out = np.zeros((q.shape[0], len(class_ids)), np.float64)
    n = index.num_supports()
    if n == 0 or len(class_ids) == 0:
        return out
    nb = index.nearest_supports(q, n)
    sims = np.asarray(nb.scores, np.float64)  # [N, n]
    ids = np.asarray(nb.class_ids, np.int64)  # -1 where there is no neighbour
    lut = np.full(int(max(class_ids.max(), ids.max())) + 1, -1, np.int64)
    lut[class_ids] = np.arange(len(class_ids))  # class id -> column of this distribution
    col = np.where(ids >= 0, lut[ids.clip(0)], -1)
    keep = (col >= 0) & np.isfinite(sims)
    rows = np.broadcast_to(np.arange(q.shape[0])[:, None], sims.shape)
    np.add.at(out, (rows[keep], col[keep]), np.exp(-coll.hybrid_beta * (1.0 - sims[keep])))
    return coll.hybrid_alpha * out


def check_hybrid_metric(method: str, metric: str) -> None:
    """Tip-Adapter's cache term needs cosine affinities between unit-norm image embeddings.

    An l2 collection's support index holds raw vectors and yields negative squared distances,
    where ``exp(-beta * (1 - score))`` all but vanishes, so ``hybrid`` would silently score
    as ``zero-shot``; refuse it instead.
    """
    if method == "hybrid" and metric == "l2":
        raise FailedPrecondition(
            f"method 'hybrid' needs metric 'cosine' (Tip-Adapter's cache term uses cosine "
            f"affinities), not {metric!r}; use 'zero-shot' or a cosine collection"
        )
