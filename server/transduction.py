"""Transductive prototype refinement: the images of one request help place the prototypes.

Soft k-means over the queries (Ren et al. 2018, "Meta-Learning for Semi-Supervised Few-Shot
Classification", section 4.1): each round scores the queries against the prototypes, and every
prototype becomes the mean of its supports and of the queries, each query weighted by its
probability of that class. The probabilities are the ones the server reports (softmax of
``logit_scale`` x score), so nothing new is tuned: for an l2 model served at logit scale 1 the
weights are softmax(-squared distance). Scores are then taken against the refined prototypes.

It helps when a request holds several images of the registered classes (a batch to label, the
20 test images of an Omniglot run) and changes nothing for a request of one image that is far
from every class. A result then depends on the other images of its request, so it is opt-in
(``ClassifyOptions.transductive``). docs/omniglot-model.md has the measurement.

Used by the server (``CollectionIndex.transductive_class_scores``, from its running support
sums) and, through ``refine_supports``, by ``protoserve train evaluate / eval-runs
--transductive``, so they all score the same way.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from server import kernels
from server.methods import softmax

__all__ = ["ROUNDS", "refine", "refine_supports"]

ROUNDS = 2  # measured: 2 rounds beat 1 on both held-out splits; more were not tried
F64 = npt.NDArray[np.float64]


def refine(
    sums: Any,
    counts: Any,
    queries: Any,
    metric: kernels.Metric,
    logit_scale: float,
    rounds: int = ROUNDS,
) -> npt.NDArray[np.float32]:
    """Refined prototypes [C, D] (float32) from the classes' support ``sums`` [C, D] and
    ``counts`` [C] and the request's ``queries`` [Q, D]. For cosine the sums are of unit
    supports (as ``server.registry`` keeps them), the queries are normalised here, and the
    refined rows are normalised again."""
    s = np.asarray(sums, np.float64)
    n = np.asarray(counts, np.float64)
    q = np.asarray(queries, np.float64)
    if s.ndim != 2 or n.shape != (s.shape[0],) or q.ndim != 2 or q.shape[1] != s.shape[1]:
        raise ValueError(
            f"need sums [C, D], counts [C], queries [Q, D]: {s.shape}, {n.shape}, {q.shape}"
        )
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if np.any(n <= 0):
        raise ValueError("every class needs at least one support")

    def finish(p: F64) -> npt.NDArray[np.float32]:
        return (_unit(p) if metric == "cosine" else p).astype(np.float32)

    if metric == "cosine":
        q = _unit(q)
    protos = finish(s / n[:, None])
    if q.shape[0] == 0 or s.shape[0] == 0:
        return protos
    q32 = q.astype(np.float32)
    for _ in range(rounds):
        w = softmax(logit_scale * kernels.scores(q32, protos, metric=metric).astype(np.float64))
        protos = finish((s + w.T @ q) / (n + w.sum(axis=0))[:, None])
    return protos


def refine_supports(
    supports: Any,
    labels: Any,
    n_classes: int,
    queries: Any,
    metric: kernels.Metric,
    logit_scale: float,
) -> npt.NDArray[np.float32]:
    """``refine`` from individual ``supports`` [S, D] with class ``labels`` [S] in
    0..n_classes-1 (normalised first for cosine, as the server stores them)."""
    x = np.asarray(supports, np.float64)
    y = np.asarray(labels, np.int64)
    if metric == "cosine":
        x = _unit(x)
    sums = np.zeros((n_classes, x.shape[1]), np.float64)
    np.add.at(sums, y, x)
    return refine(sums, np.bincount(y, minlength=n_classes), queries, metric, logit_scale)


def _unit(x: F64) -> F64:
    out: F64 = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return out
