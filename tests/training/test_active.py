"""training.active: scores against hand computations, k-center picks, select, the loop."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from training.active import (
    STRATEGIES,
    bald_score,
    entropy_score,
    k_center_greedy,
    least_confidence,
    margin_score,
    rank,
    select,
    simulate,
    uncertainty,
)

PROBS = np.array(
    [
        [0.7, 0.2, 0.1],
        [0.4, 0.4, 0.2],
        [1 / 3, 1 / 3, 1 / 3],
        [1.0, 0.0, 0.0],
    ]
)


def _h(*p: float) -> float:
    """Entropy by hand, 0 log 0 = 0."""
    return -sum(q * math.log(q) for q in p if q > 0)


def test_module_imports_no_torch() -> None:
    code = "import sys, training.active; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_least_confidence_by_hand() -> None:
    np.testing.assert_allclose(least_confidence(PROBS), [0.3, 0.6, 2 / 3, 0.0], atol=1e-12)


def test_margin_by_hand() -> None:
    # 1 - (p1 - p2): 1 - (0.7 - 0.2), 1 - (0.4 - 0.4), 1 - 0, 1 - (1 - 0)
    np.testing.assert_allclose(margin_score(PROBS), [0.5, 1.0, 1.0, 0.0], atol=1e-12)


def test_entropy_by_hand() -> None:
    want = [_h(0.7, 0.2, 0.1), _h(0.4, 0.4, 0.2), math.log(3), 0.0]
    np.testing.assert_allclose(entropy_score(PROBS), want, atol=1e-12)
    assert entropy_score([[0.5, 0.5]])[0] == pytest.approx(math.log(2), abs=1e-15)


def test_bald_by_hand() -> None:
    mc = np.array(
        [
            [[1.0, 0.0], [0.5, 0.5], [0.9, 0.1]],
            [[0.0, 1.0], [0.5, 0.5], [0.5, 0.5]],
        ]
    )  # [S=2, N=3, C=2]
    want = [
        math.log(2) - 0.0,  # confident samples that disagree: all epistemic
        math.log(2) - math.log(2),  # agree on 50/50: all aleatoric, BALD 0
        _h(0.7, 0.3) - (_h(0.9, 0.1) + _h(0.5, 0.5)) / 2,
    ]
    np.testing.assert_allclose(bald_score(mc), want, atol=1e-12)


def test_bald_zero_when_samples_agree() -> None:
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(5), size=7)
    mc = np.repeat(p[None], 4, axis=0)
    np.testing.assert_allclose(bald_score(mc), 0.0, atol=1e-12)
    assert np.all(bald_score(mc) >= 0)


def test_uncertainty_reads_mean_of_mc_probs() -> None:
    mc = np.stack([PROBS, PROBS[::-1]])
    np.testing.assert_allclose(
        uncertainty("entropy", mc_probs=mc), entropy_score(mc.mean(axis=0)), atol=1e-12
    )


def test_k_center_greedy_on_a_line() -> None:
    pts = np.array([[0.0], [1.0], [2.0], [10.0], [11.0]])
    # farthest from 0 is 11; then 2 (distance 2 to {0, 11}); then 1 and 10 tie at 1: lower index
    assert k_center_greedy(pts, 3, labeled=np.array([[0.0]])).tolist() == [4, 2, 1]
    assert k_center_greedy(pts, 3, first=0).tolist() == [0, 4, 2]
    # budget above N: every point, no repeats
    assert sorted(k_center_greedy(pts, 9, first=0).tolist()) == [0, 1, 2, 3, 4]


def test_k_center_greedy_square_corners() -> None:
    # four corners of a 10-square with a cluster near (0, 0); labeled = the origin
    pts = np.array([[0.1, 0.0], [0.0, 0.2], [10, 0], [0, 10], [10, 10], [5, 5]], float)
    picks = k_center_greedy(pts, 4, labeled=[[0.0, 0.0]])
    # (10,10) is farthest; then (10,0) and (0,10) tie at 10 -> index 2, then 3; then (5,5)
    assert picks.tolist() == [4, 2, 3, 5]


def test_k_center_greedy_chunks_and_duplicates() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 4))
    lab = rng.normal(size=(50, 4))
    a = k_center_greedy(x, 20, labeled=lab, chunk=7)
    b = k_center_greedy(x, 20, labeled=lab, chunk=4096)
    assert a.tolist() == b.tolist()
    dup = np.zeros((5, 2))  # all identical: still 5 distinct picks
    assert sorted(k_center_greedy(dup, 5, first=2).tolist()) == [0, 1, 2, 3, 4]
    # seeded first pick when nothing is labeled
    assert k_center_greedy(x, 3, seed=3).tolist() == k_center_greedy(x, 3, seed=3).tolist()


def test_select_ordering_and_ties() -> None:
    p = np.array([[0.9, 0.1], [0.5, 0.5], [0.6, 0.4], [0.5, 0.5], [0.8, 0.2]])
    assert select("margin", 5, probs=p).tolist() == [1, 3, 2, 4, 0]
    assert select("least-confidence", 2, probs=p).tolist() == [1, 3]
    assert select("entropy", 3, probs=p).tolist() == [1, 3, 2]
    assert select("margin", 0, probs=p).tolist() == []
    assert select("margin", 99, probs=p).tolist() == [1, 3, 2, 4, 0]
    assert rank([1.0, 3.0, 3.0, 2.0]).tolist() == [1, 2, 3, 0]
    mc = np.stack([p, p[:, ::-1]])
    # BALD ranks disagreement: row 0 (0.9 vs 0.1 swapped) first, rows 1 and 3 (agree) last
    assert select("bald", 5, mc_probs=mc).tolist() == [0, 4, 2, 1, 3]
    r = select("random", 5, probs=p, seed=4)
    assert sorted(r.tolist()) == [0, 1, 2, 3, 4]
    assert r.tolist() == select("random", 5, embeddings=np.zeros((5, 1)), seed=4).tolist()
    assert all(
        select(s, 2, probs=p, mc_probs=mc, embeddings=p).dtype == np.int64 for s in STRATEGIES
    )


def _clustered(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Three tight clusters of 10; cluster 0 is the most uncertain, cluster 2 the least."""
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    emb = np.concatenate([c + 0.1 * rng.normal(size=(10, 2)) for c in centres])
    top = np.concatenate([rng.uniform(0.50, 0.55, 10), rng.uniform(0.6, 0.65, 10), [0.7] * 10])
    probs = np.stack([top, 1 - top], axis=1)
    return emb, probs


def _min_pairwise(x: np.ndarray) -> float:
    d = np.linalg.norm(x[:, None] - x[None], axis=-1)
    return float(d[np.triu_indices(len(x), 1)].min())


def test_diverse_spreads_picks_over_clusters() -> None:
    emb, probs = _clustered(np.random.default_rng(0))
    plain = select("margin", 3, probs=probs)
    div = select("diverse", 3, probs=probs, embeddings=emb, candidates_factor=10)
    assert set(plain.tolist()) <= set(range(10))  # all from the uncertain cluster
    assert sorted(i // 10 for i in div.tolist()) == [0, 1, 2]  # one per cluster
    assert div[0] == plain[0]  # starts at the most uncertain point
    assert _min_pairwise(emb[div]) > 10 * _min_pairwise(emb[plain])
    # candidates_factor=1 leaves only the 3 most uncertain: no room to diversify
    assert sorted(select("diverse", 3, probs=probs, embeddings=emb, candidates_factor=1)) == sorted(
        plain
    )
    # labeled points in clusters 0 and 1: the first pick comes from cluster 2
    lab = np.array([[0.0, 0.0], [10.0, 0.0]])
    div2 = select("diverse", 3, probs=probs, embeddings=emb, labeled_embeddings=lab)
    assert div2[0] // 10 == 2


# --------------------------------------------------------------------------------------------
# the simulated loop with a numpy nearest-centroid model


def _blobs(n_per: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    centres = np.array([[0.0, 0.0], [3.0, 0.0], [0.0, 3.0], [3.0, 3.0]])
    x = np.concatenate([c + rng.normal(size=(n_per, 2)) for c in centres])
    y = np.repeat(np.arange(4), n_per)
    return x, y


class Centroids:
    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        self.c = np.stack([x[y == k].mean(axis=0) for k in range(4)])

    def proba(self, x: np.ndarray) -> np.ndarray:
        logits = -((x[:, None] - self.c[None]) ** 2).sum(-1)
        e = np.exp(logits - logits.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)


def _score(model: Centroids, x: np.ndarray, needs: frozenset[str]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    if "probs" in needs:
        out["probs"] = model.proba(x)
    if "mc_probs" in needs:  # an "ensemble" of jittered centroids
        rng = np.random.default_rng(0)
        out["mc_probs"] = np.stack(
            [model.proba(x + 0.3 * rng.normal(size=x.shape)) for _ in range(4)]
        )
    if "embeddings" in needs:
        out["embeddings"] = x
    return out


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_simulate_improves_accuracy(strategy: str) -> None:
    rng = np.random.default_rng(0)
    x, y = _blobs(100, rng)
    xt, yt = _blobs(200, np.random.default_rng(1))
    # a misleading start: per class, the point farthest toward the next class's centre
    start = []
    for k in range(4):
        idx = np.flatnonzero(y == k)
        start.append(idx[np.argmax(x[idx] @ np.array([1.0, 1.0]) * (1 if k == 0 else -1))])
    sim = simulate(
        strategy,
        x,
        y,
        start,
        budget_per_round=10,
        rounds=3,
        fit_fn=Centroids,
        eval_fn=lambda m: float((m.proba(xt).argmax(1) == yt).mean()),
        score_fn=_score,
        exclude=np.arange(0, 400, 100),
        seed=0,
    )
    assert sim.n_labeled == [4, 14, 24, 34]
    assert len(set(sim.labeled.tolist())) == 34
    assert not set(sim.labeled[4:].tolist()) & set(range(0, 400, 100))  # excluded never picked
    assert sim.accuracy[-1] > sim.accuracy[0] + 0.05, sim.accuracy
    assert sim.to_json()["n_labeled"] == [4, 14, 24, 34]


def test_simulate_subsample_and_exhausted_pool() -> None:
    x, y = _blobs(5, np.random.default_rng(0))
    sim = simulate(
        "margin",
        x,
        y,
        [0, 5, 10, 15],
        budget_per_round=6,
        rounds=10,
        fit_fn=Centroids,
        eval_fn=lambda m: 0.0,
        score_fn=_score,
        pool_subsample=8,
    )
    assert sim.n_labeled[:3] == [4, 10, 16]
    assert sim.n_labeled[-1] == 20  # stops when nothing is left
    assert sorted(sim.labeled.tolist()) == list(range(20))


# --------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: least_confidence([0.5, 0.5]), r"probs must be \[N, C\]"),
        (lambda: margin_score([[0.5, np.nan]]), "NaN"),
        (lambda: entropy_score([[2.0, -1.0]]), "negative"),
        (lambda: entropy_score([[1.0, 2.0]]), "sum to 1"),
        (lambda: bald_score(PROBS), r"mc_probs must be \[S, N, C\]"),
        (lambda: select("smart", 3, probs=PROBS), "choose one of random, least-confidence"),
        (lambda: select("margin", -1, probs=PROBS), "budget must be >= 0"),
        (lambda: select("margin", 1.5, probs=PROBS), "budget must be an integer"),
        (lambda: select("bald", 1, probs=PROBS), "needs mc_probs"),
        (lambda: select("diverse", 1, probs=PROBS), "needs embeddings"),
        (lambda: select("margin", 1, embeddings=np.zeros((4, 2))), "needs probs"),
        (lambda: select("random", 1), "at least one of"),
        (lambda: select("margin", 1, probs=PROBS, embeddings=np.zeros((3, 2))), "disagree"),
        (lambda: k_center_greedy(np.zeros((3, 2)), 1, labeled=np.zeros((2, 3))), "dimension"),
        (lambda: k_center_greedy(np.full((3, 2), np.inf), 1), "NaN or inf"),
        (lambda: rank([1.0, np.nan]), "NaN"),
    ],
)
def test_bad_input(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def test_simulate_bad_input() -> None:
    x, y = _blobs(5, np.random.default_rng(0))
    kw = dict(budget_per_round=2, rounds=1, fit_fn=Centroids, eval_fn=lambda m: 0.0)
    with pytest.raises(ValueError, match="needs a score_fn"):
        simulate("margin", x, y, [0, 5, 10, 15], **kw)
    with pytest.raises(ValueError, match="distinct indices"):
        simulate("random", x, y, [0, 0], **kw)
    with pytest.raises(ValueError, match="choose one of"):
        simulate("nope", x, y, [0], **kw)


# --------------------------------------------------------------------------------------------
# experiment 4's plumbing (training.experiments.fmnist_active) on tiny synthetic images


def _toy_images(n_per: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """10 classes of 28x28 uint8: a bright 6x6 square at a class-specific place, plus noise."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 40, size=(10 * n_per, 1, 28, 28)).astype(np.uint8)
    y = np.repeat(np.arange(10), n_per)
    for i, c in enumerate(y):
        r, col = 2 + 8 * (c // 4), 2 + 6 * (c % 4)
        x[i, 0, r : r + 6, col : col + 6] = 220
    return x, y


def test_experiment_scores_and_loop() -> None:
    pytest.importorskip("torch")
    from training.experiments.fmnist_active import Memo, Recipe, score_model
    from training.inference import predict_proba

    x, y = _toy_images()
    recipe = Recipe(epochs=1, steps_per_epoch=3, batch_size=16, mc_samples=3)
    memo = Memo()
    start = np.concatenate([np.flatnonzero(y == c)[:2] for c in range(10)])
    m0 = memo.fit(recipe, x[start], y[start], 0)
    assert memo.fit(recipe, x[start], y[start], 0) is m0  # round 0 shared across strategies
    assert memo.fit(recipe, x[start[:-1]], y[start[:-1]], 0) is not m0
    out = score_model(recipe, m0, x[:7], frozenset({"probs", "mc_probs", "embeddings"}))
    assert out["embeddings"].shape == (7, 128)
    assert out["mc_probs"].shape == (3, 7, 10)
    # probs through the head on the embeddings == the library's predict_proba
    np.testing.assert_allclose(out["probs"], predict_proba(m0, x[:7]), atol=1e-5)
    for strategy in ("bald", "diverse"):
        sim = simulate(
            strategy,
            x,
            y,
            start,
            budget_per_round=10,
            rounds=1,
            fit_fn=lambda a, b: memo.fit(recipe, a, b, 0),
            eval_fn=lambda m: memo.accuracy(m, x, y),
            score_fn=lambda m, a, needs: score_model(recipe, m, a, needs),
        )
        assert sim.n_labeled == [20, 30]
        assert 0.0 <= sim.accuracy[1] <= 1.0


class ImageSetLike:
    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)


def test_experiment_run_strategy_with_val_stop() -> None:
    pytest.importorskip("torch")
    from training.data.semisup import semisup_split
    from training.experiments.fmnist_active import Recipe, run_strategy

    x, y = _toy_images()
    train = ImageSetLike(x, y)
    data = (train, ImageSetLike(x[:30], y[:30]), semisup_split(y, per_class=2, n_val=20, seed=0))
    recipe = Recipe(epochs=2, steps_per_epoch=2, batch_size=16, mc_samples=2, val_stop=10)
    res = run_strategy("bald", 0, recipe, data, rounds=1)
    assert res["n_labeled"] == [20, 100]  # budget 100 > the 80 left: all of them
    assert len(res["val_accuracy"]) == 2
    assert res["pool"] == 120 - 20 - 20
    assert not set(res["labeled"]) & set(data[2].val.tolist())  # val never labeled


def test_experiment_summary(tmp_path) -> None:
    import json

    from training.experiments.fmnist_active import labels_to_reach, summarize

    assert labels_to_reach([100, 200, 300], [0.5, 0.7, 0.9], 0.7) == 200
    assert labels_to_reach([100, 200, 300], [0.5, 0.6, 0.65], 0.7) is None
    n = [100, 200, 300, 400]
    curves = {s: [0.5, 0.6, 0.7, 0.8] for s in STRATEGIES}
    curves["margin"] = [0.5, 0.7, 0.8, 0.85]
    for seed in (0, 1):
        for s, acc in curves.items():
            p = tmp_path / f"seed{seed}" / f"{s}.json"
            p.parent.mkdir(exist_ok=True)
            run = {"n_labeled": n, "accuracy": acc, "cpu_seconds": 1.0, "wall_seconds": 2.0}
            run["labeled"] = [0, 1, 2, 3]
            p.write_text(json.dumps({**run, "recipe": {}, "pool": 9}))
    labels = np.array([0, 0, 0, 9])
    summary = summarize(tmp_path, [0, 1], tmp_path / "plot.png", labels)
    assert summary["class_counts_final"]["margin"]["1"] == [3, 0, 0, 0, 0, 0, 0, 0, 0, 1]
    assert summary["random_final"] == pytest.approx(0.8)
    assert summary["labels_to_reach_random_final"]["margin"] == 300
    assert summary["labels_to_reach_random_final"]["random"] == 400
    assert summary["cpu_seconds"] == pytest.approx(12.0)
    assert (tmp_path / "plot.png").stat().st_size > 1000
    assert json.loads((tmp_path / "active.json").read_text())["seeds"] == [0, 1]
