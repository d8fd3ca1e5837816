"""The CPU slice size measured at load (server.runtimes.run_batch), on a fake clock."""

from __future__ import annotations

import pytest

from server.runtimes.run_batch import REPEATS, best_run_batch, tune_run_batch


class FakeModel:
    """``run(n)`` advances a fake clock by ``cost[n]`` (the first run of a size: twice that)."""

    def __init__(self, cost: dict[int, float]) -> None:
        self.cost, self.now, self.runs = cost, 0.0, []  # type: dict[int, float], float, list[int]

    def clock(self) -> float:
        return self.now

    def run(self, n: int) -> None:
        first = n not in self.runs
        self.runs.append(n)
        self.now += self.cost[n] * (2 if first else 1)


def test_best_is_the_fewest_seconds_per_row() -> None:
    assert best_run_batch({1: 1.0, 2: 1.8, 4: 3.8, 8: 8.0}) == 2  # 0.9 s per row
    assert best_run_batch({1: 1.0, 2: 2.2, 4: 3.2, 8: 6.8}) == 4  # 0.8 s per row
    assert best_run_batch({1: 1.0, 2: 2.0}) == 1  # a tie: fewer rows
    with pytest.raises(ValueError, match="no timings"):
        best_run_batch({})


def test_tune_times_each_size_and_keeps_the_fastest_per_row() -> None:
    model = FakeModel({1: 0.010, 2: 0.016, 4: 0.036, 8: 0.080})
    best, seconds = tune_run_batch(model.run, budget_s=10.0, clock=model.clock)
    assert best == 2
    assert seconds == pytest.approx({1: 0.010, 2: 0.016, 4: 0.036, 8: 0.080})
    # each size: one warm-up run (not timed: it costs double here), then REPEATS timed runs
    assert model.runs == [n for n in (1, 2, 4, 8) for _ in range(1 + REPEATS)]


def test_tune_stops_growing_past_the_budget() -> None:
    model = FakeModel({1: 0.1, 2: 0.3, 4: 0.5, 8: 1.0})
    best, seconds = tune_run_batch(model.run, budget_s=1.0, clock=model.clock)  # 0.25 s a size
    assert list(seconds) == [1, 2]  # one run of 2 rows took 0.3 s: 4 and 8 are not tried
    assert best == 1  # 0.1 s per row against 0.15
    assert model.runs == [1] * (1 + REPEATS) + [2, 2]  # 2: warm-up, then one run over the share
