from __future__ import annotations

from collections.abc import Iterator

import pytest

torch = pytest.importorskip("torch")

from tests.training.glyphs import glyph_set  # noqa: E402
from training.data.imageset import ImageSet  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Training tests run on one thread (shared 2-core machines; determinism)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def glyphs() -> ImageSet:
    return glyph_set()


@pytest.fixture(scope="session")
def omniglot() -> ImageSet:
    from training.data.omniglot import default_sources, load_omniglot

    try:
        sources = default_sources()
    except FileNotFoundError as e:
        pytest.skip(f"no Omniglot data: {e}")
    return load_omniglot(sources)
