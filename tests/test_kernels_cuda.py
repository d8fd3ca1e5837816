"""CUDA kernels (server._kernels_cuda, through server.kernels) against the CPU path.

The ``gpu`` tests need a visible CUDA device and torch or cupy; they skip
cleanly otherwise. The module's host side (imports without a driver, DLPack
validation) is tested without a GPU in test_kernels_cuda_dlpack.py.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from server import kernels as K
from tests.kernel_reference import check_topk, ref_scores, tolerance

METRICS = ["cosine", "ip", "l2"]
DTYPES = ["float32", "bfloat16"]

requires_gpu = pytest.mark.skipif(not K.HAS_CUDA, reason="no CUDA device visible")


def gpu_test(f: Any) -> Any:
    """Marks a test ``gpu`` and skips it without a CUDA device."""
    return pytest.mark.gpu(requires_gpu(f))


def gaussian(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    return rng.standard_normal((n, d)).astype(np.float32)


def bf16_round(x: np.ndarray) -> np.ndarray:
    """float32 values of the bf16-rounded array (what the kernel reads)."""
    bits = K.to_bfloat16(x).astype(np.uint32) << 16
    return bits.view(np.float32).reshape(x.shape)


# ---------------------------------------------------------------- device helpers


class Device:
    """Moves numpy arrays to and from the device with torch (preferred) or cupy."""

    def __init__(self, fw: str) -> None:
        self.fw = fw

    def put(self, a: np.ndarray, dtype: str = "float32") -> Any:
        """float32 array on the device; dtype 'bfloat16' rounds it to bf16
        (torch.bfloat16, or uint16 bit patterns under cupy); 'uint16' bits."""
        if self.fw == "torch":
            import torch

            if dtype == "float32":
                return torch.from_numpy(np.ascontiguousarray(a)).cuda()
            bits = torch.from_numpy(K.to_bfloat16(a).view(np.int16)).cuda()
            return bits.view(torch.bfloat16) if dtype == "bfloat16" else bits.view(torch.uint16)
        import cupy

        if dtype == "float32":
            return cupy.asarray(a)
        return cupy.asarray(K.to_bfloat16(a))

    def get(self, t: Any) -> np.ndarray:
        if self.fw == "torch":
            return t.cpu().numpy()
        import cupy

        return cupy.asnumpy(t)

    def is_native(self, t: Any) -> bool:
        return type(t).__module__.split(".")[0] == self.fw


def _find_framework() -> str | None:
    try:
        import torch

        if torch.cuda.is_available():
            return "torch"
    except ImportError:
        pass
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:
            return "cupy"
    except Exception:  # ImportError, or cupy without a usable runtime
        pass
    return None


@pytest.fixture(scope="module")
def dev() -> Device:
    fw = _find_framework() if K.HAS_CUDA else None
    if fw is None:
        pytest.skip("needs torch or cupy with CUDA")
    return Device(fw)


@pytest.fixture(params=["auto", "always", "never"])
def kernel_choice(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a test with the kernels' own choice, then forcing the tiled kernels, then the
    per-query ones (PROTOSERVE_CUDA_TILED), so both paths see every shape."""
    monkeypatch.setenv("PROTOSERVE_CUDA_TILED", request.param)
    return str(request.param)


def assert_topk_like_cpu(
    dev: Device, q: np.ndarray, p_ref: np.ndarray, k: int, metric: str, s: Any, i: Any
) -> None:
    """GPU top-k vs the float64 reference and the CPU path on the same values."""
    assert dev.is_native(s) and dev.is_native(i)
    gs, gi = dev.get(s), dev.get(i)
    check_topk(q, p_ref, k, metric, gs, gi)
    cs, _ = K.topk(q, p_ref, k, metric=metric)
    np.testing.assert_allclose(gs, cs, atol=tolerance(q, p_ref, metric), rtol=0)


# ---------------------------------------------------------------- GPU tests

SHAPES = [
    (0, 10, 8, 3),  # Q = 0
    (3, 0, 8, 3),  # C = 0
    (1, 1, 1, 1),  # D = 1
    (1, 1, 17, 5),  # k > C = 1
    (5, 33, 3, 40),  # k > C, D not a multiple of 4
    (13, 100, 31, 7),
    (3, 515, 130, 10),
    (2, 64, 4097, 5),  # D = 4097: odd, past the 4096 mark
    (2, 40, 8192, 256),  # D = 8192, k' = C
    (1, 300, 8192, 256),  # D = 8192 with k' = 256: over 48 KiB of shared memory
    (2, 3000, 64, 16),  # several chunks and the merge pass
    (1, 20000, 16, 1),
    (2, 2000, 32, 256),  # the fused kernel's largest k
    (3, 700, 40, 300),  # k > 256: scores + stable sort
    (300, 400, 24, 9),  # many queries, one chunk each
    # The tiled kernel (Q >= 16, k' <= 64): partial tiles, chunks of tiles + merge.
    (16, 50, 4097, 5),
    (17, 129, 33, 64),
    (64, 3000, 64, 16),
    (130, 5000, 130, 1),
    (1000, 300, 16, 3),
    (40, 1000, 8, 65),  # k' = 65: back to the per-query kernel
]


@gpu_test
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("q", "c", "d", "k"), SHAPES)
def test_topk_matches_cpu(dev, kernel_choice, metric, dtype, q, c, d, k):
    rng = np.random.default_rng(q * 1000 + c + d)
    queries, protos = gaussian(rng, q, d), gaussian(rng, c, d)
    p_ref = bf16_round(protos) if dtype == "bfloat16" else protos
    s, i = K.topk(dev.put(queries), dev.put(protos, dtype), k, metric=metric)
    assert tuple(s.shape) == (q, min(k, c)) and tuple(i.shape) == (q, min(k, c))
    assert_topk_like_cpu(dev, queries, p_ref, k, metric, s, i)


@gpu_test
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("q", "c", "d"),
    [
        (14, 50, 45),
        (1, 1, 1),
        (3, 700, 4097),
        (2, 9, 4096),
        (40, 300, 45),
        (64, 129, 4097),
        (17, 1, 3),
        (200, 1000, 32),
    ],
)
def test_scores_match_cpu(dev, kernel_choice, metric, dtype, q, c, d):
    rng = np.random.default_rng(7 + d)
    queries, protos = gaussian(rng, q, d), gaussian(rng, c, d)
    p_ref = bf16_round(protos) if dtype == "bfloat16" else protos
    out = K.scores(dev.put(queries), dev.put(protos, dtype), metric=metric)
    assert dev.is_native(out)
    got = dev.get(out)
    assert got.shape == (q, c) and got.dtype == np.float32
    tol = tolerance(queries, p_ref, metric)
    np.testing.assert_allclose(got, ref_scores(queries, p_ref, metric), atol=tol, rtol=0)
    np.testing.assert_allclose(got, K.scores(queries, p_ref, metric=metric), atol=tol, rtol=0)


@gpu_test
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [5, 20])  # the per-query and the tiled kernel
def test_ties_go_to_the_lower_index(dev, kernel_choice, metric, dtype, n):
    rng = np.random.default_rng(3)
    base = gaussian(rng, n, 19)
    protos = np.concatenate([base, base, base, base[::-1]])  # every row 4 times
    s, i = K.topk(dev.put(base), dev.put(protos, dtype), 8, metric=metric)
    s, i = dev.get(s), dev.get(i)
    for qi in range(n):
        copies = sorted([qi, qi + n, qi + 2 * n, 3 * n + (n - 1 - qi)])
        assert i[qi, :4].tolist() == copies
        assert np.all(s[qi, :4] == s[qi, 0])


@gpu_test
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize(
    ("nq", "c", "k"),
    [(2, 3000, 10), (2, 5000, 256), (2, 600, 300), (2, 100, 100), (33, 5000, 10), (20, 700, 64)],
)
def test_identical_rows_across_chunks_keep_index_order(dev, kernel_choice, metric, nq, c, k):
    rng = np.random.default_rng(c + k)
    row = gaussian(rng, 1, 37)
    queries = gaussian(rng, nq, 37)
    s, i = K.topk(dev.put(queries), dev.put(np.repeat(row, c, axis=0)), k, metric=metric)
    s, i = dev.get(s), dev.get(i)
    assert (i == np.arange(min(k, c))[None, :]).all()
    assert (s == s[:, :1]).all()


@gpu_test
def test_uint16_bit_patterns_are_bfloat16(dev):
    rng = np.random.default_rng(11)
    queries, protos = gaussian(rng, 4, 40), gaussian(rng, 300, 40)
    s_bits, i_bits = K.topk(dev.put(queries), dev.put(protos, "uint16"), 7, metric="ip")
    s_bf, i_bf = K.topk(dev.put(queries), dev.put(protos, "bfloat16"), 7, metric="ip")
    assert (dev.get(i_bits) == dev.get(i_bf)).all()
    assert (dev.get(s_bits) == dev.get(s_bf)).all()


@gpu_test
def test_zero_vectors_under_cosine_score_zero(dev):
    protos = np.eye(4, 6, dtype=np.float32)
    protos[2] = 0.0
    queries = np.zeros((2, 6), np.float32)
    queries[1, 0] = 3.0
    out = dev.get(K.scores(dev.put(queries), dev.put(protos), metric="cosine"))
    assert (out[0] == 0).all()
    np.testing.assert_allclose(out[1], [1, 0, 0, 0], atol=1e-6)


@gpu_test
def test_host_prototypes_and_matrix_are_uploaded(dev):
    rng = np.random.default_rng(5)
    queries, protos = gaussian(rng, 3, 20), gaussian(rng, 90, 20)
    dq = dev.put(queries)
    s, i = K.topk(dq, protos, 6, metric="l2")  # a numpy array
    assert_topk_like_cpu(dev, queries, protos, 6, "l2", s, i)
    pm = K.PrototypeMatrix(protos, metric="cosine")
    s, i = K.topk(dq, pm, 6)
    assert_topk_like_cpu(dev, queries, protos, 6, "cosine", s, i)


@gpu_test
def test_inputs_are_made_contiguous_and_float32(dev):
    rng = np.random.default_rng(9)
    queries, protos = gaussian(rng, 33, 6), gaussian(rng, 50, 33)
    dq = dev.put(queries).T  # [6, 33], not contiguous
    dp = dev.put(protos)
    dp = dp.double() if dev.fw == "torch" else dp.astype("float64")
    s, i = K.topk(dq, dp, 5, metric="ip")
    assert_topk_like_cpu(dev, np.ascontiguousarray(queries.T), protos, 5, "ip", s, i)
    one = K.topk(dev.put(queries[:, 0].copy()), protos, 5, metric="ip")
    assert tuple(one[0].shape) == (1, 5)  # a 1-D query is one row


@gpu_test
@pytest.mark.parametrize("nq", [2, 40])  # the per-query and the tiled kernels
def test_bad_input_raises_clear_errors(dev, kernel_choice, nq):
    rng = np.random.default_rng(1)
    dq = dev.put(gaussian(rng, nq, 8))
    with pytest.raises(ValueError, match="dimension"):
        K.topk(dq, dev.put(gaussian(rng, 5, 9)), 3)
    nan_q = gaussian(rng, nq, 8)
    nan_q[nq - 1, 2] = np.nan
    with pytest.raises(ValueError, match=f"queries contain NaN.*first bad row: {nq - 1}"):
        K.topk(dev.put(nan_q), dev.put(gaussian(rng, 5, 8)), 3)
    bad = gaussian(rng, 300, 8)
    bad[3, 1] = np.inf
    for dtype in DTYPES:
        with pytest.raises(ValueError, match="prototypes contain NaN.*first bad row: 3"):
            K.scores(dq, dev.put(bad, dtype))
        with pytest.raises(ValueError, match="first bad row: 3"):
            K.topk(dq, dev.put(bad, dtype), 4, metric="ip")
        with pytest.raises(ValueError, match="first bad row: 3"):
            K.topk(dq, dev.put(bad, dtype), 290, metric="ip")  # the sort path
    with pytest.raises(ValueError, match="metric"):
        K.topk(dq, dev.put(gaussian(rng, 5, 8)), 3, metric="hamming")
    with pytest.raises(ValueError, match="2-D"):
        K.topk(dq, dev.put(gaussian(rng, 5, 8)).reshape(5, 2, 4), 3)
    with pytest.raises(ValueError, match="k must be"):
        K.topk(dq, dev.put(gaussian(rng, 5, 8)), 0)


@gpu_test
@pytest.mark.parametrize("nq", [2, 40])
def test_overflowing_norms_are_not_errors(dev, nq):
    """The kernels flag a non-finite squared norm; finite values whose square
    overflows are no error (as on the CPU path), only NaN and infinity are."""
    rng = np.random.default_rng(8)
    queries = np.full((nq, 8), 1e20, np.float32)
    protos = gaussian(rng, 50, 8)
    _, i = K.topk(dev.put(queries), dev.put(protos), 3, metric="ip")
    ci = K.topk(queries, protos, 3, metric="ip")[1]
    assert (dev.get(i) == ci).all()


@gpu_test
def test_side_stream_is_ordered(dev):
    if dev.fw != "torch":
        pytest.skip("torch streams")
    import torch

    rng = np.random.default_rng(2)
    queries, protos = gaussian(rng, 64, 128), gaussian(rng, 4000, 128)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        dq = torch.from_numpy(queries).cuda() * 1.0  # produced on the side stream
        dp = torch.from_numpy(protos).cuda() * 1.0
        s, i = K.topk(dq, dp, 10, metric="cosine")
    torch.cuda.synchronize()
    assert_topk_like_cpu(dev, queries, protos, 10, "cosine", s, i)


@gpu_test
def test_second_device(dev):
    if K._cuda_device_count() < 2:
        pytest.skip("needs two CUDA devices")
    if dev.fw != "torch":
        pytest.skip("torch device placement")
    import torch

    rng = np.random.default_rng(4)
    queries, protos = gaussian(rng, 5, 30), gaussian(rng, 700, 30)
    dq = torch.from_numpy(queries).to("cuda:1")
    dp = torch.from_numpy(protos).to("cuda:1")
    before = torch.cuda.current_device()
    s, i = K.topk(dq, dp, 4, metric="l2")
    assert torch.cuda.current_device() == before
    assert s.device == dq.device and i.device == dq.device
    assert_topk_like_cpu(dev, queries, protos, 4, "l2", s, i)
    with pytest.raises(ValueError, match="cuda"):
        K.topk(dq, dp.to("cuda:0"), 4)
