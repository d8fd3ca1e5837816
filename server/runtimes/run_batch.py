"""How many rows one onnxruntime run takes on the CPU: measured per session when it loads.

A CPU session's speed per image depends on the rows per run, and which is best depends on the
model and the session's threads. The bundled 27-view Omniglot tower shows both sides: with one
intra-op thread it serves 388 images/s one row at a time and 353-357 at 4-8 rows (each row is
27 views, and more of them fall out of the caches); with two threads, rows give the threads
work to share, and 4-8 rows beat one (365 against 341 images/s; ``bench/serving.py``'s
ceiling table, 2026-11-29). A fixed slice cannot be right for both, so ``tune_run_batch`` times
a few sizes once, at load, on zeros of the model's input shape (dense networks cost the same
on any values), and the session keeps the size with the most rows per second.

The measurement is bounded: each size runs once to warm up, then up to ``REPEATS`` times, and
the sizes stop growing once one run takes longer than a share of ``budget_s``. The fastest of
the repeats counts (a shared machine only ever slows a run down).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

__all__ = ["CANDIDATES", "best_run_batch", "tune_run_batch"]

CANDIDATES = (1, 2, 4, 8)
REPEATS = 3


def best_run_batch(seconds: dict[int, float]) -> int:
    """The rows per run with the most rows per second (``seconds``: rows -> one run's time);
    a tie goes to the fewer rows (less memory, and a batch's first rows finish no later)."""
    if not seconds:
        raise ValueError("no timings to choose from")
    return min(seconds, key=lambda n: (seconds[n] / n, n))


def tune_run_batch(
    run: Callable[[int], object],
    candidates: Sequence[int] = CANDIDATES,
    budget_s: float = 0.5,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[int, dict[int, float]]:
    """``(best rows per run, fastest seconds per run by rows)``: ``run(n)`` runs ``n`` rows."""
    share = budget_s / len(candidates)
    seconds: dict[int, float] = {}
    for n in sorted(candidates):
        run(n)  # warm-up: first-run allocations and kernel choices
        best = float("inf")
        spent = 0.0
        for _ in range(REPEATS):
            t0 = clock()
            run(n)
            took = clock() - t0
            best, spent = min(best, took), spent + took
            if spent > share:
                break
        seconds[n] = best
        if best > share:  # larger sizes would overrun the budget
            break
    return best_run_batch(seconds), seconds
