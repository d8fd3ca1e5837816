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


@pytest.fixture(scope="session")
def tritonserver(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest):
    """A real tritonserver (from the nvidia-pytriton wheel) on loopback ports, for the session.

    Yields a ``tests.triton.fixture.TritonServer``: ``.url`` is its gRPC address and
    ``.serve(model_folder)`` serves a protoserve model folder's towers on it. Skips only
    when the binary cannot be fetched; any other problem fails the test.
    """
    from tests.triton.fixture import TritonServer
    from tests.triton.install import TritonUnavailable, ensure_tritonserver

    try:
        binary = ensure_tritonserver()
    except TritonUnavailable as e:
        pytest.skip(f"no tritonserver: {e}")
    server = TritonServer(binary, tmp_path_factory.mktemp("tritonserver")).start()
    try:
        yield server
    finally:
        server.stop()
        reporter = request.config.pluginmanager.get_plugin("terminalreporter")
        if request.session.testsfailed and reporter is not None:
            reporter.write_sep("-", f"tritonserver log: {server.log_path}")
            reporter.write_line(server.log_tail(80))
