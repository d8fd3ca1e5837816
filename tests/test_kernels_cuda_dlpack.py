"""The CUDA module's host side, runnable without a GPU wherever it was built: it imports
without a driver, its DLPack layer validates capsules (hand-made with ctypes, never
launched) and releases each one exactly once, and the CUDA path refuses host queries.
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
