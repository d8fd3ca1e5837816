"""The episode sampler: counts, label layout, determinism, within-superclass, drawers, resume."""

from __future__ import annotations

import numpy as np
import pytest

from training.data import EpisodeSampler, ImageSet


@pytest.mark.parametrize(("n", "k", "q"), [(5, 1, 3), (4, 3, 2), (12, 2, 0)])
def test_class_and_shot_counts(glyphs: ImageSet, n: int, k: int, q: int) -> None:
    ds = glyphs.with_rotations([0, 1, 2, 3])
    smp = EpisodeSampler(ds, n, k, q, seed=3)
    for i in range(20):
        ep = smp.episode(i)
        assert len(set(ep.classes.tolist())) == n
        assert ep.support.shape == (n * k,) and ep.query.shape == (n * q,)
        assert ep.support_labels.tolist() == np.repeat(np.arange(n), k).tolist()
        assert ep.query_labels.tolist() == np.repeat(np.arange(n), q).tolist()
        for way, cls in enumerate(ep.classes):
            members = set(ds.indices_of(int(cls)).tolist())
            shots = ep.support[ep.support_labels == way].tolist()
            queries = ep.query[ep.query_labels == way].tolist()
            assert set(shots) <= members and set(queries) <= members
            assert len(set(shots) | set(queries)) == k + q  # no image twice in an episode
            turns = ep.support_turns[ep.support_labels == way]
            assert set(turns.tolist()) == {ds.rotation(int(cls))}


def test_seeded_and_reproducible(glyphs: ImageSet) -> None:
    a = EpisodeSampler(glyphs, 5, 1, 2, seed=0)
    b = EpisodeSampler(glyphs, 5, 1, 2, seed=0)
    c = EpisodeSampler(glyphs, 5, 1, 2, seed=1)
    first = [a.episode(i).support.tolist() for i in range(10)]
    assert first == [b.episode(i).support.tolist() for i in range(10)]
    assert first != [c.episode(i).support.tolist() for i in range(10)]
    assert len({tuple(s) for s in first}) > 1  # episodes differ from each other


def test_iteration_and_resume(glyphs: ImageSet) -> None:
    smp = EpisodeSampler(glyphs, 3, 1, 1, seed=5)
    it = iter(smp)
    seen = [next(it).support.tolist() for _ in range(4)]
    state = smp.state_dict()
    assert state == {"seed": 5, "next": 4}
    later = [next(it).support.tolist() for _ in range(3)]
    fresh = EpisodeSampler(glyphs, 3, 1, 1, seed=0)
    fresh.load_state_dict(state)
    resumed = iter(fresh)
    assert [next(resumed).support.tolist() for _ in range(3)] == later
    assert seen[0] == smp.episode(0).support.tolist()


def test_within_superclass(glyphs: ImageSet) -> None:
    ds = glyphs.with_rotations([0, 1])
    smp = EpisodeSampler(ds, 4, 1, 1, seed=0, within_superclass=True)
    groups = set()
    for i in range(30):
        ep = smp.episode(i)
        sups = {ds.superclass_of(int(c)) for c in ep.classes}
        assert len(sups) == 1
        groups |= sups
    assert len(groups) > 2  # different superclasses across episodes
    uniform = [EpisodeSampler(ds, 4, 1, 1, seed=0).episode(i) for i in range(30)]
    assert any(len({ds.superclass_of(int(c)) for c in ep.classes}) > 1 for ep in uniform)
    with pytest.raises(ValueError, match="no superclass"):
        EpisodeSampler(glyphs, 5, 1, 1, within_superclass=True)  # superclasses of 4


def test_split_drawers(glyphs: ImageSet) -> None:
    assert glyphs.drawers is not None
    smp = EpisodeSampler(glyphs, 5, 1, 3, seed=2, split_drawers=True)
    for i in range(10):
        ep = smp.episode(i)
        support_drawers = set(glyphs.drawers[ep.support].tolist())
        query_drawers = glyphs.drawers[ep.query]
        assert len(support_drawers) == 1  # one person drew every support image
        assert not support_drawers & set(query_drawers.tolist())


def test_too_few_classes(glyphs: ImageSet) -> None:
    with pytest.raises(ValueError, match="13-way"):
        EpisodeSampler(glyphs, 13, 1, 1)
    with pytest.raises(ValueError, match=">= 9 images"):
        EpisodeSampler(glyphs, 2, 4, 5)
