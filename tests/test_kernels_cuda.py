"""CUDA kernels (server._kernels_cuda, through server.kernels) against the CPU path.

The ``gpu`` tests need a visible CUDA device and torch or cupy; they skip
cleanly otherwise. The tests at the end run anywhere the CUDA module was
built: they check that it imports without a driver and that the DLPack layer
validates capsules (hand-made with ctypes, never launched) and releases each
one exactly once.
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
import sys
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


# ---------------------------------------------------------------- CPU-runnable

_CUDA_BUILT = importlib.util.find_spec("server._kernels_cuda") is not None
requires_module = pytest.mark.skipif(not _CUDA_BUILT, reason="CUDA module not built")


@requires_module
def test_cuda_module_imports_and_counts_devices():
    m = importlib.import_module("server._kernels_cuda")
    n = m.device_count()
    assert isinstance(n, int) and n >= 0
    assert (n > 0) == K.HAS_CUDA
    assert m.MAX_FUSED_K == 256
    assert m.topk_workspace_bytes(0, 100, 10) == 0  # nothing to compute
    assert m.topk_workspace_bytes(4, 50, 10) == 256  # one chunk: the two flags only
    assert m.topk_workspace_bytes(1, 100_000, 10) > 256  # chunks + merge pass
    assert m.topk_workspace_bytes(64, 100_000, 10) > 256  # the tiled kernel's chunks
    assert m.scores_workspace_bytes() == 256


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", _DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", _DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


_DELETER = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


class _DLManagedTensor(ctypes.Structure):
    _fields_ = [("dl_tensor", _DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", _DELETER)]


_CAPSULE_NAME = ctypes.create_string_buffer(b"dltensor")  # must outlive the capsules
_PyCapsule_New = ctypes.pythonapi.PyCapsule_New
_PyCapsule_New.restype = ctypes.py_object
_PyCapsule_New.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
_PyCapsule_IsValid = ctypes.pythonapi.PyCapsule_IsValid
_PyCapsule_IsValid.restype = ctypes.c_int
_PyCapsule_IsValid.argtypes = [ctypes.py_object, ctypes.c_char_p]

_FLOAT32, _BF16, _INT64, _INT32 = (2, 32), (4, 16), (0, 64), (0, 32)


class FakeTensors:
    """Hand-made DLPack capsules over host memory that claim to be on a CUDA
    device. Only for calls that must fail validation (or are empty), so the
    kernels never touch them; counts every deleter call."""

    def __init__(self) -> None:
        self.deleted: list[int] = []
        self._keep: list[Any] = []
        self._buf = ctypes.create_string_buffer(1 << 16)
        self._deleter = _DELETER(self.deleted.append)

    def capsule(
        self,
        shape: tuple[int, ...],
        dtype: tuple[int, int] = _FLOAT32,
        device: tuple[int, int] = (2, 0),
        strides: tuple[int, ...] | None = None,
    ) -> Any:
        mt = _DLManagedTensor()
        shp = (ctypes.c_int64 * len(shape))(*shape)
        std = (ctypes.c_int64 * len(shape))(*strides) if strides is not None else None
        mt.dl_tensor.data = ctypes.addressof(self._buf)
        mt.dl_tensor.device = _DLDevice(*device)
        mt.dl_tensor.ndim = len(shape)
        mt.dl_tensor.dtype = _DLDataType(dtype[0], dtype[1], 1)
        mt.dl_tensor.shape = ctypes.cast(shp, ctypes.POINTER(ctypes.c_int64))
        if std is not None:
            mt.dl_tensor.strides = ctypes.cast(std, ctypes.POINTER(ctypes.c_int64))
        mt.deleter = self._deleter
        self._keep += [mt, shp, std]
        return _PyCapsule_New(ctypes.addressof(mt), ctypes.addressof(_CAPSULE_NAME), None)

    def topk_args(self, q=(2, 8), p=(5, 8), k=3, out=(2, 3), **over: Any) -> dict[str, Any]:
        args = {
            "queries": self.capsule(q),
            "prototypes": self.capsule(p),
            "k": k,
            "metric": 1,
            "out_scores": self.capsule(out),
            "out_index": self.capsule(out, _INT64),
        }
        args.update(over)
        return args


@requires_module
def test_dlpack_capsules_are_validated_and_released():
    m = importlib.import_module("server._kernels_cuda")
    f = FakeTensors()
    cases: list[tuple[type[Exception], str, dict[str, Any]]] = [
        (TypeError, "queries must be float32", {"queries": f.capsule((2, 8), _INT32)}),
        (
            TypeError,
            "prototypes must be float32 or bfloat16",
            {"prototypes": f.capsule((5, 8), _INT64)},
        ),
        (ValueError, "CUDA device", {"prototypes": f.capsule((5, 8), device=(1, 0))}),
        (ValueError, "cuda:1", {"prototypes": f.capsule((5, 8), device=(2, 1))}),
        (ValueError, "2-D", {"queries": f.capsule((2, 8, 1))}),
        (ValueError, "C-contiguous", {"queries": f.capsule((2, 8), strides=(1, 2))}),
        (ValueError, "dimension", {"prototypes": f.capsule((5, 9), _BF16)}),
        (ValueError, "out_scores must have shape", {"out_scores": f.capsule((2, 4))}),
        (TypeError, "out_index must be int64", {"out_index": f.capsule((2, 3), _INT32)}),
        (ValueError, "metric", {"metric": 7}),
        (ValueError, "k must be positive", {"k": 0}),
        (
            ValueError,
            "exceeds",
            {
                "prototypes": f.capsule((300, 8)),
                "k": 257,
                "out_scores": f.capsule((2, 257)),
                "out_index": f.capsule((2, 257), _INT64),
            },
        ),
        (TypeError, "DLPack capsule", {"queries": object()}),
    ]
    for exc, match, over in cases:
        args = f.topk_args(**over)
        capsules = [v for v in args.values() if type(v).__name__ == "PyCapsule"]
        before = len(f.deleted)
        with pytest.raises(exc, match=match):
            m.topk(**args)
        # Every capsule the call consumed was released exactly once.
        consumed = [c for c in capsules if _PyCapsule_IsValid(c, b"used_dltensor")]
        assert len(f.deleted) - before == len(consumed), match
        assert len(set(f.deleted)) == len(f.deleted)
    # A consumed capsule cannot be used again.
    q = f.capsule((2, 8))
    with pytest.raises(ValueError, match="CUDA device"):
        m.scores(q, f.capsule((5, 8), device=(1, 0)), 0, f.capsule((2, 5)))
    with pytest.raises(ValueError, match="already consumed"):
        m.scores(q, f.capsule((5, 8)), 0, f.capsule((2, 5)))
    # Empty shapes validate and return before any CUDA call.
    n = len(f.deleted)
    m.topk(**f.topk_args(q=(0, 8), out=(0, 3)))
    m.scores(f.capsule((2, 8)), f.capsule((0, 8), _BF16), 2, f.capsule((2, 0)))
    assert len(f.deleted) == n + 7


@requires_module
def test_numpy_capsule_is_rejected_and_released():
    m = importlib.import_module("server._kernels_cuda")
    f = FakeTensors()
    a = np.zeros((2, 8), np.float32)
    refs = sys.getrefcount(a)
    cap = a.__dlpack__()
    assert sys.getrefcount(a) > refs
    with pytest.raises(ValueError, match="CUDA device"):
        m.scores(cap, f.capsule((5, 8)), 0, f.capsule((2, 5)))
    assert _PyCapsule_IsValid(cap, b"used_dltensor")
    del cap
    assert sys.getrefcount(a) == refs  # numpy's deleter ran


def test_host_queries_are_refused_by_the_cuda_path():
    from server import _cuda

    with pytest.raises(TypeError, match="torch tensor or a cupy array"):
        _cuda.topk(np.zeros((2, 3), np.float32), np.zeros((4, 3), np.float32), 2)
    try:
        import torch
    except ImportError:
        return
    with pytest.raises(ValueError, match="CUDA device memory"):
        _cuda.scores(torch.zeros(2, 3), np.zeros((4, 3), np.float32))
