"""Timing helpers shared by the benchmarks (run as ``python bench/NAME.py``, so this
folder is on ``sys.path``)."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

GEMM_N = 2048


def best_of(fn: Callable[[], object], repeats: int, settle_s: float = 0.0) -> float:
    """Fastest of ``repeats`` timed calls in seconds, after one warm-up call. ``settle_s``
    sleeps before each call, so BLAS/OpenMP pools spinning from the previous method park."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if settle_s:
            time.sleep(settle_s)
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def gemm_gflops(repeats: int, settle_s: float = 0.0, with_torch: bool = False) -> float:
    """The float32 GEMM ceiling: GFLOP/s of a GEMM_N^3 matmul by numpy's BLAS, or the
    better of numpy's and torch's with ``with_torch``."""
    a = np.random.default_rng(1).standard_normal((GEMM_N, GEMM_N), dtype=np.float32)
    seconds = best_of(lambda: a @ a, repeats, settle_s)
    if with_torch:
        import torch

        ta = torch.from_numpy(a)
        seconds = min(seconds, best_of(lambda: ta @ ta, repeats, settle_s))
    return 2 * GEMM_N**3 / seconds / 1e9
