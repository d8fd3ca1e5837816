"""server.transduction.refine against a hand computation, and what it is for."""

from __future__ import annotations

import math

import numpy as np
import pytest

from server import kernels
from server.transduction import refine


def by_hand(sums: list[list[float]], counts: list[int], queries: list[list[float]], rounds: int):
    """Soft k-means in plain Python, l2 metric, logit scale 1 (weights: softmax(-d^2))."""
    protos = [[v / n for v in s] for s, n in zip(sums, counts, strict=True)]
    for _ in range(rounds):
        weights = []
        for q in queries:
            e = [math.exp(-sum((a - b) ** 2 for a, b in zip(q, p, strict=True))) for p in protos]
            weights.append([x / sum(e) for x in e])
        protos = []
        for c, (s, n) in enumerate(zip(sums, counts, strict=True)):
            mass = n + sum(w[c] for w in weights)
            protos.append(
                [
                    (s[d] + sum(w[c] * q[d] for w, q in zip(weights, queries, strict=True))) / mass
                    for d in range(len(s))
                ]
            )
    return np.array(protos)


def test_matches_a_hand_computation() -> None:
    sums = [[0.0, 0.0], [8.0, 2.0]]  # class 1: two supports, mean (4, 1)
    counts = [1, 2]
    queries = [[1.5, 0.2], [2.6, 0.9], [3.9, 1.1]]
    for rounds in (1, 2, 3):
        got = refine(np.array(sums), np.array(counts), np.array(queries), "l2", 1.0, rounds)
        np.testing.assert_allclose(got, by_hand(sums, counts, queries, rounds), rtol=1e-5)


def test_logit_scale_sharpens_the_weights() -> None:
    sums, counts, q = np.array([[0.0], [4.0]]), np.array([1, 1]), np.array([[1.0]])
    soft = refine(sums, counts, q, "l2", 1.0, 1)
    # scale 10: the query's weight on class 0 is ~1, so class 0 moves to (0 + 1) / 2
    sharp = refine(sums, counts, q, "l2", 10.0, 1)
    np.testing.assert_allclose(sharp[:, 0], [0.5, 4.0], atol=1e-6)
    assert soft[1, 0] < 4.0  # the soft weights pull class 1 a little too


def test_queries_of_a_class_pull_an_ambiguous_one_over() -> None:
    sums, counts = np.array([[0.0, 0.0], [4.0, 0.0]]), np.array([1, 1])
    queries = np.array([[2.1, 0.0], [1.4, 0.0], [1.5, 0.3], [1.6, -0.3]])
    plain = kernels.scores(queries, (sums / counts[:, None]).astype(np.float32), metric="l2")
    assert plain[0].argmax() == 1  # alone, the first query is nearer class 1
    refined = refine(sums, counts, queries, "l2", 1.0)
    scores = kernels.scores(queries, refined, metric="l2")
    assert (scores.argmax(1) == 0).all()  # with the others, class 0 has moved towards them


def test_cosine_rows_stay_unit_and_no_queries_gives_the_means() -> None:
    rng = np.random.default_rng(0)
    unit = rng.normal(size=(6, 8))
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    sums = np.stack([unit[:3].sum(0), unit[3:].sum(0)])
    q = unit[[0, 4]]
    out = refine(sums, [3, 3], q, "cosine", 20.0)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    means = refine(sums, [3, 3], np.zeros((0, 8)), "cosine", 20.0)
    want = sums / np.linalg.norm(sums, axis=1, keepdims=True)
    np.testing.assert_allclose(means, want, rtol=1e-5)


@pytest.mark.parametrize(
    ("sums", "counts", "queries", "rounds", "message"),
    [
        (np.zeros((2, 3)), [1], np.zeros((1, 3)), 2, "counts"),
        (np.zeros((2, 3)), [1, 1], np.zeros((1, 4)), 2, "queries"),
        (np.zeros((2, 3)), [1, 0], np.zeros((1, 3)), 2, "at least one support"),
        (np.zeros((2, 3)), [1, 1], np.zeros((1, 3)), 0, "rounds"),
    ],
)
def test_bad_input_is_named(sums, counts, queries, rounds, message) -> None:
    with pytest.raises(ValueError, match=message):
        refine(sums, counts, queries, "l2", 1.0, rounds)
