"""Episode evaluation: the 95% interval formula and the scoring on hand-built embeddings."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from training.backbones import Conv4
from training.data import EpisodeSampler, ImageSet
from training.evaluate import (
    embed_all,
    evaluate_embeddings,
    evaluate_method,
    mean_ci95,
    score_episode,
    torch_encoder,
)
from training.methods import PrototypicalNetworks


def test_ci95_formula() -> None:
    mean, ci = mean_ci95([1.0, 0.0, 1.0, 0.0])
    # sample std of (1, 0, 1, 0) is sqrt(1/3); 1.96 * sqrt(1/3) / sqrt(4)
    assert mean == 0.5 and ci == pytest.approx(1.96 * math.sqrt(1 / 3) / 2)
    assert mean_ci95([0.8] * 1000) == (pytest.approx(0.8), pytest.approx(0.0))
    assert mean_ci95([0.25]) == (0.25, 0.0)
    with pytest.raises(ValueError):
        mean_ci95([])


def class_embeddings(ds: ImageSet, noise: float = 0.0) -> np.ndarray:
    """[1, N, D] embeddings: each image is its class's one-hot row (plus noise)."""
    emb = np.eye(len(ds.classes), dtype=np.float32)[ds.labels]
    emb += noise * np.random.default_rng(0).standard_normal(emb.shape).astype(np.float32)
    return emb[None]


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_perfect_and_chance_embeddings(glyphs: ImageSet, metric: str) -> None:
    perfect = evaluate_embeddings(class_embeddings(glyphs), glyphs, metric, 5, 1, 3, episodes=50)
    assert perfect.accuracy == 1.0 and perfect.ci95 == 0.0 and perfect.episodes == 50
    chance = np.random.default_rng(1).standard_normal((1, len(glyphs), 16)).astype(np.float32)
    res = evaluate_embeddings(chance, glyphs, metric, 4, 1, 4, episodes=400)
    assert abs(res.accuracy - 0.25) < 3 * res.ci95 + 0.02
    assert "4-way 1-shot" in str(res)


def test_score_episode_hand_built(glyphs: ImageSet) -> None:
    """Query 0 of class 0 sits nearer class 1's prototype: exactly one miss of six."""
    ep = EpisodeSampler(glyphs, 3, 2, 2, seed=0).episode(0)
    emb = class_embeddings(glyphs)
    wrong = ep.query[0]
    emb[0, wrong] = np.eye(len(glyphs.classes))[ep.classes[1]]
    assert score_episode(emb, glyphs, ep, "l2") == pytest.approx(5 / 6)
    # prototypes are support means: a shot halfway moves its class's prototype halfway
    emb2 = class_embeddings(glyphs)
    emb2[0, ep.support[0]] = np.eye(len(glyphs.classes))[ep.classes[2]]  # class 0 proto mixed
    emb2[0, ep.query[0]] = 0.5 * (emb2[0, ep.support[0]] + emb2[0, ep.support[1]])
    assert score_episode(emb2, glyphs, ep, "l2") == 1.0


def test_server_scoring_equals_the_method(glyphs: ImageSet) -> None:
    """ProtoNet's own forward and the embed-once + kernels.topk path give the same accuracy."""
    torch.manual_seed(0)
    net = PrototypicalNetworks(Conv4(1, hidden=8))
    kw = {"n_way": 5, "k_shot": 2, "q_query": 3, "episodes": 30}
    direct = evaluate_method(net, glyphs, **kw)
    served = evaluate_embeddings(embed_all(glyphs, torch_encoder(net), batch=7), glyphs, "l2", **kw)
    assert direct.accuracy == pytest.approx(served.accuracy)
    rot = glyphs.with_rotations([0, 2])
    emb = embed_all(rot, torch_encoder(net))
    assert emb.shape == (2, len(glyphs), 8)
    kw["within_superclass"] = True
    kw["n_way"] = 4
    assert evaluate_method(net, rot, **kw).accuracy == pytest.approx(
        evaluate_embeddings(emb, rot, "l2", **kw).accuracy
    )
