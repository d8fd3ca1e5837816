"""Active learning: which unlabeled images are most worth labeling next.

Pure numpy at module level: the server's label-suggestion RPC imports this module and must never
import torch. Every score follows one convention, *higher = more worth labeling*, and every
ranking is best first with ties broken by the lower index (a stable sort).

Uncertainty scores on softmax outputs ``probs`` [N, C] (Settles 2009, "Active Learning Literature
Survey", section 3.1):

- ``least_confidence``: ``1 - max_c p``.
- ``margin_score``: ``1 - (p1 - p2)`` with p1 >= p2 the two largest probabilities (the server's
  ``margin`` field is ``p1 - p2``; this is one minus it, so higher = more uncertain).
- ``entropy_score``: ``-sum_c p log p`` (natural log, ``0 log 0 = 0``).

An uncertainty estimate that is not the raw softmax, on ``mc_probs`` [S, N, C] (S stochastic
forward passes with MC dropout, Gal & Ghahramani 2016, or the S members of an ensemble):

- ``bald_score``: the mutual information between the prediction and the model parameters,
  ``H(mean_s p_s) - mean_s H(p_s)`` (BALD, Houlsby et al. 2011; Gal, Islam & Ghahramani 2017).
  Zero when all samples agree, whatever their entropy.

Diversity: ``k_center_greedy`` is the core-set greedy of Sener & Savarese 2018 (each pick is the
point farthest from everything labeled or picked so far), in O(N) memory per step. ``select``'s
``"diverse"`` strategy takes the ``candidates_factor * budget`` most uncertain points by margin
and runs k-center greedy among them, so a batch is both uncertain and spread out.

``simulate`` is the pool-based loop of experiment 4: fit on the labeled set, score the pool,
label the top ``b``, refit, record accuracy per round. It is generic: the caller supplies the
fit, score and evaluation functions (torch or not).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

STRATEGIES = ("random", "least-confidence", "margin", "entropy", "bald", "diverse")
# What each strategy needs from a model: the keys select() reads.
NEEDS: dict[str, frozenset[str]] = {
    "random": frozenset(),
    "least-confidence": frozenset({"probs"}),
    "margin": frozenset({"probs"}),
    "entropy": frozenset({"probs"}),
    "bald": frozenset({"mc_probs"}),
    "diverse": frozenset({"probs", "embeddings"}),
}
PROB_ATOL = 1e-3  # rows of probs must sum to 1 within this (float32 softmax is well inside it)


# --------------------------------------------------------------------------------------------
# input checks


def _check_probs(probs: Any, name: str = "probs", ndim: int = 2) -> np.ndarray:
    p = np.asarray(probs, dtype=np.float64)
    shape = "[N, C]" if ndim == 2 else "[S, N, C]"
    if p.ndim != ndim:
        raise ValueError(f"{name} must be {shape}, got shape {p.shape}")
    if p.shape[-1] < 2:
        raise ValueError(f"{name} needs at least 2 classes, got shape {p.shape}")
    if not np.all(np.isfinite(p)):
        raise ValueError(f"{name} contains NaN or inf")
    if np.any(p < -PROB_ATOL):
        raise ValueError(f"{name} has negative entries (min {p.min():.3g})")
    sums = p.sum(axis=-1)
    if sums.size and np.max(np.abs(sums - 1.0)) > PROB_ATOL:
        worst = float(sums.flat[np.argmax(np.abs(sums - 1.0))])
        raise ValueError(
            f"{name} rows must sum to 1 within {PROB_ATOL} (one sums to {worst:.6g}): "
            "pass softmax probabilities, not logits"
        )
    return np.clip(p, 0.0, 1.0)


def _check_embeddings(x: Any, name: str) -> np.ndarray:
    e = np.asarray(x, dtype=np.float64)
    if e.ndim != 2:
        raise ValueError(f"{name} must be [N, D], got shape {e.shape}")
    if not np.all(np.isfinite(e)):
        raise ValueError(f"{name} contains NaN or inf")
    return e


def _check_budget(budget: Any) -> int:
    if isinstance(budget, bool) or not isinstance(budget, int | np.integer):
        raise ValueError(f"budget must be an integer, got {budget!r}")
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    return int(budget)


# --------------------------------------------------------------------------------------------
# scores (higher = more worth labeling)


def _entropy(p: np.ndarray) -> np.ndarray:
    """Natural-log entropy over the last axis, 0 log 0 = 0."""
    safe = np.where(p > 0, p, 1.0)
    return -(p * np.log(safe)).sum(axis=-1)


def least_confidence(probs: Any) -> np.ndarray:
    """``1 - max_c p`` per row of ``probs`` [N, C]."""
    p = _check_probs(probs)
    return 1.0 - p.max(axis=1)


def margin_score(probs: Any) -> np.ndarray:
    """``1 - (p1 - p2)`` per row, p1 >= p2 the two largest probabilities (1 = a tie)."""
    p = _check_probs(probs)
    top2 = -np.partition(-p, 1, axis=1)[:, :2]
    return 1.0 - (top2[:, 0] - top2[:, 1])


def entropy_score(probs: Any) -> np.ndarray:
    """Predictive entropy ``-sum_c p log p`` (nats) per row of ``probs`` [N, C]."""
    return _entropy(_check_probs(probs))


def bald_score(mc_probs: Any) -> np.ndarray:
    """BALD mutual information ``H(mean_s p_s) - mean_s H(p_s)`` from ``mc_probs`` [S, N, C].

    The S slices are stochastic forward passes (MC dropout) or ensemble members. The result is
    clipped at 0 (it is >= 0 by Jensen; float rounding can make it -1e-16).
    """
    p = _check_probs(mc_probs, "mc_probs", ndim=3)
    mi = _entropy(p.mean(axis=0)) - _entropy(p).mean(axis=0)
    return np.maximum(mi, 0.0)


def rank(scores: Any) -> np.ndarray:
    """Indices of ``scores`` [N], highest first, ties by the lower index (stable)."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1:
        raise ValueError(f"scores must be [N], got shape {s.shape}")
    if np.any(np.isnan(s)):
        raise ValueError("scores contain NaN")
    return np.argsort(-s, kind="stable").astype(np.int64)


# --------------------------------------------------------------------------------------------
# diversity


def _sq_dists_to(x: np.ndarray, xx: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Squared distances [N, m] from rows of x (norms xx) to m centres; clipped at 0."""
    cc = (centres * centres).sum(axis=1)
    d = xx[:, None] - 2.0 * (x @ centres.T) + cc[None, :]
    return np.maximum(d, 0.0)


def k_center_greedy(
    embeddings: Any,
    budget: int,
    *,
    labeled: Any = None,
    seed: int = 0,
    first: int | None = None,
    chunk: int | None = None,
) -> np.ndarray:
    """Core-set greedy (Sener & Savarese 2018): ``budget`` indices into ``embeddings`` [N, D].

    Each pick is the point whose distance to its nearest centre (the ``labeled`` [M, D] points
    and the picks so far) is largest; ties go to the lower index. With no labeled points the
    first pick is ``first`` if given, else a seeded random draw. Memory is O(N * chunk): the
    distances to the labeled set are taken ``chunk`` centres at a time (default: blocks of
    about 4M distances, at most 1,024 centres), then one centre per pick, never an N x N (or
    N x M) matrix. Returns int64 indices in pick order; a budget above N returns all N.
    """
    x = _check_embeddings(embeddings, "embeddings")
    budget = _check_budget(budget)
    n, d = x.shape
    budget = min(budget, n)
    if budget == 0:
        return np.zeros(0, dtype=np.int64)
    if chunk is None:
        chunk = max(1, min(1024, (1 << 22) // max(n, 1)))
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    xx = (x * x).sum(axis=1)
    min_d = np.full(n, np.inf)
    if labeled is not None:
        lab = _check_embeddings(labeled, "labeled")
        if lab.shape[0] and lab.shape[1] != d:
            raise ValueError(f"labeled has dimension {lab.shape[1]}, embeddings have {d}")
        for s in range(0, lab.shape[0], chunk):
            min_d = np.minimum(min_d, _sq_dists_to(x, xx, lab[s : s + chunk]).min(axis=1))
    picks = np.empty(budget, dtype=np.int64)
    start = 0
    if not np.isfinite(min_d).any():  # nothing covered yet: the first centre is a choice
        if first is None:
            first = int(np.random.default_rng(seed).integers(n))
        if not 0 <= first < n:
            raise ValueError(f"first must be in [0, {n}), got {first}")
        picks[0] = first
        start = 1
        min_d = _sq_dists_to(x, xx, x[first : first + 1])[:, 0]
        min_d[first] = -np.inf
    for i in range(start, budget):
        j = int(np.argmax(min_d))  # first maximum: ties to the lower index
        picks[i] = j
        min_d = np.minimum(min_d, _sq_dists_to(x, xx, x[j : j + 1])[:, 0])
        min_d[picks[: i + 1]] = -np.inf
    return picks


# --------------------------------------------------------------------------------------------
# one entry point


def uncertainty(strategy: str, *, probs: Any = None, mc_probs: Any = None) -> np.ndarray:
    """The per-image score [N] of an uncertainty strategy (higher = more worth labeling).

    ``"least-confidence"``, ``"margin"`` and ``"entropy"`` read ``probs`` (or, if only
    ``mc_probs`` is given, its mean over samples); ``"bald"`` reads ``mc_probs``.
    """
    if strategy not in ("least-confidence", "margin", "entropy", "bald"):
        raise ValueError(
            f"unknown uncertainty strategy {strategy!r}; choose one of "
            "least-confidence, margin, entropy, bald"
        )
    if strategy == "bald":
        if mc_probs is None:
            raise ValueError("strategy 'bald' needs mc_probs [S, N, C] (MC dropout or ensemble)")
        return bald_score(mc_probs)
    if probs is None:
        if mc_probs is None:
            raise ValueError(f"strategy {strategy!r} needs probs [N, C]")
        probs = _check_probs(mc_probs, "mc_probs", ndim=3).mean(axis=0)
    fn = {
        "least-confidence": least_confidence,
        "margin": margin_score,
        "entropy": entropy_score,
    }[strategy]
    return fn(probs)


def _pool_size(probs: Any, mc_probs: Any, embeddings: Any) -> int:
    given = {
        "probs": (probs, 2, 0, "[N, C]"),
        "mc_probs": (mc_probs, 3, 1, "[S, N, C]"),
        "embeddings": (embeddings, 2, 0, "[N, D]"),
    }
    sizes: dict[str, int] = {}
    for name, (a, ndim, axis, want) in given.items():
        if a is None:
            continue
        if np.ndim(a) != ndim:
            raise ValueError(f"{name} must be {want}, got shape {np.shape(a)}")
        sizes[name] = int(np.shape(a)[axis])
    if not sizes:
        raise ValueError("select needs at least one of probs, mc_probs, embeddings (for N)")
    if len(set(sizes.values())) > 1:
        raise ValueError(f"inputs disagree on the pool size N: {sizes}")
    return next(iter(sizes.values()))


def select(
    strategy: str,
    budget: int,
    *,
    probs: Any = None,
    mc_probs: Any = None,
    embeddings: Any = None,
    labeled_embeddings: Any = None,
    candidates_factor: int = 10,
    seed: int = 0,
) -> np.ndarray:
    """The ``budget`` pool indices to label next, best first (int64; all N if budget > N).

    - ``"random"``: a seeded permutation (needs any input, for N).
    - ``"least-confidence"``, ``"margin"``, ``"entropy"``: ``probs`` [N, C].
    - ``"bald"``: ``mc_probs`` [S, N, C].
    - ``"diverse"``: ``probs`` (or ``mc_probs``) and ``embeddings`` [N, D]; the top
      ``candidates_factor * budget`` by margin, then k-center greedy among them, away from
      ``labeled_embeddings`` [M, D] when given (else starting at the most uncertain candidate).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    budget = _check_budget(budget)
    n = _pool_size(probs, mc_probs, embeddings)
    k = min(budget, n)
    if strategy == "random":
        return np.random.default_rng(seed).permutation(n)[:k].astype(np.int64)
    if strategy != "diverse":
        return rank(uncertainty(strategy, probs=probs, mc_probs=mc_probs))[:k]
    if embeddings is None:
        raise ValueError("strategy 'diverse' needs embeddings [N, D]")
    if candidates_factor < 1:
        raise ValueError(f"candidates_factor must be >= 1, got {candidates_factor}")
    emb = _check_embeddings(embeddings, "embeddings")
    order = rank(uncertainty("margin", probs=probs, mc_probs=mc_probs))
    cand = order[: min(n, candidates_factor * k)]
    picks = k_center_greedy(
        emb[cand], k, labeled=labeled_embeddings, seed=seed, first=0 if k else None
    )
    return cand[picks]


# --------------------------------------------------------------------------------------------
# the simulated loop


@dataclass
class Round:
    """One round of the simulated loop: the model fit on ``n_labeled`` labels and its score."""

    n_labeled: int
    accuracy: float
    picked: np.ndarray  # pool indices labeled just before this fit (empty in round 0)
    fit_cpu_s: float
    select_cpu_s: float
    wall_s: float


@dataclass
class Simulation:
    strategy: str
    rounds: list[Round] = field(default_factory=list)
    labeled: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def n_labeled(self) -> list[int]:
        return [r.n_labeled for r in self.rounds]

    @property
    def accuracy(self) -> list[float]:
        return [r.accuracy for r in self.rounds]

    def to_json(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "n_labeled": self.n_labeled,
            "accuracy": self.accuracy,
            "fit_cpu_s": [r.fit_cpu_s for r in self.rounds],
            "select_cpu_s": [r.select_cpu_s for r in self.rounds],
            "wall_s": [r.wall_s for r in self.rounds],
            "labeled": self.labeled.tolist(),
        }


def simulate(
    strategy: str,
    pool_x: Any,
    pool_y: np.ndarray,
    start_idx: Sequence[int] | np.ndarray,
    budget_per_round: int,
    rounds: int,
    fit_fn: Callable[[Any, np.ndarray], Any],
    eval_fn: Callable[[Any], float],
    *,
    score_fn: Callable[[Any, Any, frozenset[str]], Mapping[str, np.ndarray]] | None = None,
    exclude: Sequence[int] | np.ndarray | None = None,
    pool_subsample: int | None = None,
    candidates_factor: int = 10,
    seed: int = 0,
    on_round: Callable[[Round], None] | None = None,
) -> Simulation:
    """Pool-based active learning with an oracle: ``rounds`` rounds of ``budget_per_round``.

    Round 0 fits on ``start_idx``; each later round scores the unlabeled pool with the last
    model, labels the top ``budget_per_round`` by ``strategy`` (their labels come from
    ``pool_y``), and fits again, so there are ``rounds + 1`` records.

    - ``fit_fn(x, y) -> model``: trains on ``pool_x[labeled], pool_y[labeled]``. Train a fresh
      model each call for the usual retrain-from-scratch protocol (a closure may warm-start).
    - ``eval_fn(model) -> accuracy`` on held-out data.
    - ``score_fn(model, x, needs) -> {"probs", "mc_probs", "embeddings"}``: the keys in
      ``needs`` (``NEEDS[strategy]``) for the rows ``x``; not called for ``"random"``.
    - ``exclude``: pool indices never offered (e.g. a validation split used for early
      stopping); ``pool_subsample``: score only a seeded random subset of this many unlabeled
      images per round (cheaper MC dropout on a large pool).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    budget_per_round = _check_budget(budget_per_round)
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    pool_y = np.asarray(pool_y)
    n = len(pool_y)
    if len(pool_x) != n:
        raise ValueError(f"pool_x has {len(pool_x)} rows, pool_y {n}")
    labeled = np.asarray(start_idx, dtype=np.int64)
    if labeled.ndim != 1 or labeled.size == 0:
        raise ValueError("start_idx must be a non-empty 1-D index array")
    if labeled.min() < 0 or labeled.max() >= n or np.unique(labeled).size != labeled.size:
        raise ValueError(f"start_idx must be distinct indices in [0, {n})")
    if strategy != "random" and score_fn is None:
        raise ValueError(f"strategy {strategy!r} needs a score_fn")
    offered = np.ones(n, dtype=bool)
    offered[labeled] = False
    if exclude is not None:
        offered[np.asarray(exclude, dtype=np.int64)] = False
    rng = np.random.default_rng(seed)
    sim = Simulation(strategy)

    def fit_and_eval(picked: np.ndarray, select_cpu: float, wall0: float) -> Any:
        c0 = time.process_time()
        model = fit_fn(pool_x[labeled], pool_y[labeled])
        fit_cpu = time.process_time() - c0
        r = Round(
            int(labeled.size),
            float(eval_fn(model)),
            picked,
            fit_cpu,
            select_cpu,
            time.perf_counter() - wall0,
        )
        sim.rounds.append(r)
        if on_round is not None:
            on_round(r)
        return model

    model = fit_and_eval(np.zeros(0, dtype=np.int64), 0.0, time.perf_counter())
    for r in range(1, rounds + 1):
        wall0, c0 = time.perf_counter(), time.process_time()
        cand = np.flatnonzero(offered)
        if cand.size == 0:
            break
        if pool_subsample is not None and cand.size > pool_subsample:
            cand = np.sort(rng.choice(cand, size=pool_subsample, replace=False))
        if strategy == "random":
            picked = cand[rng.permutation(cand.size)[:budget_per_round]]
        else:
            assert score_fn is not None
            out = score_fn(model, pool_x[cand], NEEDS[strategy])
            lab_emb = None
            if strategy == "diverse":
                lab_emb = score_fn(model, pool_x[labeled], frozenset({"embeddings"}))
                lab_emb = lab_emb["embeddings"]
            picked = cand[
                select(
                    strategy,
                    budget_per_round,
                    probs=out.get("probs"),
                    mc_probs=out.get("mc_probs"),
                    embeddings=out.get("embeddings") if strategy == "diverse" else None,
                    labeled_embeddings=lab_emb,
                    candidates_factor=candidates_factor,
                    seed=seed * 1_000_003 + r,
                )
            ]
        offered[picked] = False
        picked = picked.astype(np.int64)
        labeled = np.concatenate([labeled, picked])
        model = fit_and_eval(picked, time.process_time() - c0, wall0)
    sim.labeled = labeled
    return sim
