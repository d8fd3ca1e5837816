from __future__ import annotations

import pytest

from server import kernels

LEVELS = ["portable", "avx2", "avx512", "avx512_bf16"]


def available_levels() -> list[str]:
    best = LEVELS.index(kernels.best_simd_level())
    return LEVELS[: best + 1]


@pytest.fixture(params=available_levels())
def simd(request: pytest.FixtureRequest):
    """Runs a test once per CPU path this machine can execute."""
    before = kernels.simd_level()
    kernels.set_simd_level(request.param)
    yield request.param
    kernels.set_simd_level(before)
