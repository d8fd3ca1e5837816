"""Prototype similarity kernels: the one public entry to ``server._kernels``.

``PrototypeMatrix`` holds class prototypes once, in the panel layout the CPU
scan reads, and ``topk`` / ``scores`` compare queries with them.

Input policy (docs/kernels.md):

* Arrays of any real floating dtype (float16/32/64) are converted to contiguous
  float32; integer, boolean, complex and object arrays raise ``TypeError``.
* Shapes are checked before anything crosses into C++: queries must be 2-D
  (a single 1-D query is accepted as one row), dimensions must match, ``k``
  must be a positive integer; violations raise ``ValueError`` naming them.
* NaN or infinity anywhere in queries or prototypes raises ``ValueError``
  with the first offending row: a non-finite value would otherwise poison
  every comparison silently.
* Cosine treats a zero vector as scoring 0 against everything.
* ``l2`` scores are negative squared distances, so larger is always better.
  Ties go to the lower index. ``k`` larger than the number of prototypes
  returns as many columns as there are prototypes.

A ``bfloat16`` matrix scans prototypes stored as bfloat16 (half the bytes
of float32) with bf16-rounded queries, keeps ``rerank`` candidates per query
and re-scores them exactly in float32 from a float32 copy of the rows, so
``topk`` returns exact float32 scores; the copy makes a bf16 matrix hold 6
bytes per element against float32's 4, while the hot scan reads 2.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from server import _kernels

Metric = Literal["cosine", "ip", "l2"]
Dtype = Literal["float32", "bfloat16"]

METRICS: dict[str, int] = {"ip": 0, "cosine": 1, "l2": 2}
DTYPES = ("float32", "bfloat16")
DEFAULT_RERANK = 32

FloatArray = npt.NDArray[np.float32]
IndexArray = npt.NDArray[np.int64]

__all__ = [
    "DEFAULT_RERANK",
    "HAS_CUDA",
    "PrototypeMatrix",
    "best_simd_level",
    "min_parallel_macs",
    "num_threads",
    "scores",
    "set_min_parallel_macs",
    "set_num_threads",
    "set_simd_level",
    "simd_level",
    "to_bfloat16",
    "topk",
]


def _cuda_device_count() -> int:
    try:
        from server import _kernels_cuda  # type: ignore[attr-defined]
    except ImportError:
        return 0
    try:
        return int(_kernels_cuda.device_count())
    except Exception:  # no driver: the module loads, the runtime refuses
        return 0


HAS_CUDA: bool = _cuda_device_count() > 0


def _as_float32(x: Any, what: str) -> FloatArray:
    arr = np.asarray(x)
    if arr.dtype.kind != "f":
        raise TypeError(f"{what} must be a floating-point array, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.float32)


def _check_finite(arr: FloatArray, what: str) -> None:
    if arr.size and not np.isfinite(arr).all():
        bad = np.flatnonzero(~np.isfinite(arr).reshape(arr.shape[0], -1).all(axis=1))
        raise ValueError(f"{what} contain NaN or infinity (first bad row: {int(bad[0])})")


def _rows(x: Any, what: str, dim: int | None = None) -> FloatArray:
    arr = _as_float32(x, what)
    if arr.ndim == 1:
        arr = arr.reshape(1, -1)
    if arr.ndim != 2:
        raise ValueError(f"{what} must be 2-D [n, dim], got shape {arr.shape}")
    if dim is not None and arr.shape[1] != dim:
        raise ValueError(f"{what} have dimension {arr.shape[1]}, prototypes have {dim}")
    _check_finite(arr, what)
    return arr


def _metric_code(metric: str) -> int:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {sorted(METRICS)}, got {metric!r}")
    return METRICS[metric]


class PrototypeMatrix:
    """Class prototypes stored once for the scan.

    ``array`` is [C, D] (C may be 0). Rows are normalised on the way in for
    ``cosine``. Edits never copy the whole matrix: ``append`` grows capacity
    geometrically, ``update`` rewrites one row, and ``remove`` swap-removes
    (the last row moves into the freed slot). ``ids`` follows every row, so
    callers may address rows by a stable id of their own.
    """

    def __init__(
        self,
        array: Any,
        dtype: Dtype = "float32",
        metric: Metric = "cosine",
        *,
        dim: int | None = None,
        rerank: int = DEFAULT_RERANK,
        ids: Any = None,
    ) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        if rerank < 1:
            raise ValueError(f"rerank must be positive, got {rerank}")
        arr = _as_float32(array, "prototypes")
        if arr.ndim != 2:
            raise ValueError(f"prototypes must be 2-D [C, D], got shape {arr.shape}")
        if dim is not None and arr.shape[1] not in (dim, 0):
            raise ValueError(f"prototypes have dimension {arr.shape[1]}, expected {dim}")
        d = dim if dim is not None else arr.shape[1]
        if d <= 0:
            raise ValueError("prototype dimension must be positive")
        self.dtype: Dtype = dtype
        self.metric: Metric = metric
        self.rerank = int(rerank)
        self._store = _kernels.Store(d, dtype, _metric_code(metric))
        self._ids = np.empty(0, dtype=np.int64)
        self._next_id = 0
        if arr.shape[0]:
            self.append(arr, ids=ids)

    # -- shape ----------------------------------------------------------
    @property
    def dim(self) -> int:
        return int(self._store.dim)

    def __len__(self) -> int:
        return len(self._store)

    def __repr__(self) -> str:
        return (
            f"PrototypeMatrix(rows={len(self)}, dim={self.dim}, dtype={self.dtype!r}, "
            f"metric={self.metric!r})"
        )

    @property
    def ids(self) -> IndexArray:
        """The id of each row, in row order (a read-only view)."""
        view = self._ids[: len(self)]
        view.flags.writeable = False
        return view

    @property
    def nbytes(self) -> int:
        """Bytes held, capacity included."""
        return int(self._store.bytes_held)

    # -- edits ----------------------------------------------------------
    def append(self, rows: Any, ids: Any = None) -> IndexArray:
        """Appends rows; returns their ids (given, or numbered on from the last)."""
        arr = _rows(rows, "rows", self.dim)
        n = arr.shape[0]
        if ids is None:
            new_ids = np.arange(self._next_id, self._next_id + n, dtype=np.int64)
        else:
            new_ids = np.asarray(ids, dtype=np.int64).reshape(-1)
            if new_ids.shape[0] != n:
                raise ValueError(f"got {new_ids.shape[0]} ids for {n} rows")
        self._store.append(arr)
        old = len(self) - n
        if self._ids.shape[0] < old + n:
            grown = np.empty(max(2 * self._ids.shape[0], old + n, 16), dtype=np.int64)
            grown[:old] = self._ids[:old]
            self._ids = grown
        self._ids[old : old + n] = new_ids
        if n:
            self._next_id = max(self._next_id, int(new_ids.max()) + 1)
        return new_ids

    def update(self, i: int, row: Any) -> None:
        """Replaces row ``i`` (its id is kept)."""
        arr = _rows(row, "row", self.dim)
        if arr.shape[0] != 1:
            raise ValueError(f"update takes one row, got {arr.shape[0]}")
        self._check_index(i)
        self._store.update(int(i), arr[0])

    def remove(self, i: int) -> int | None:
        """Swap-removes row ``i``; returns the old index of the row moved into ``i``."""
        self._check_index(i)
        moved = int(self._store.remove(int(i)))
        if moved >= 0:
            self._ids[i] = self._ids[moved]
            return moved
        return None

    def row_of(self, id_: int) -> int:
        """The current row of a stable id (linear in C: for occasional use)."""
        hits = np.flatnonzero(self.ids == id_)
        if hits.size == 0:
            raise KeyError(f"no prototype with id {id_}")
        return int(hits[0])

    def to_numpy(self) -> FloatArray:
        """The stored rows (normalised for cosine) as float32 [C, D]."""
        return np.asarray(self._store.rows())

    def _check_index(self, i: int) -> None:
        if not 0 <= int(i) < len(self):
            raise IndexError(f"row {i} out of range for {len(self)} prototypes")


def _matrix(prototypes: Any, metric: str | None) -> PrototypeMatrix:
    if isinstance(prototypes, PrototypeMatrix):
        if metric is not None and metric != prototypes.metric:
            raise ValueError(
                f"metric={metric!r} given for a PrototypeMatrix built with {prototypes.metric!r}"
            )
        return prototypes
    arr = _as_float32(prototypes, "prototypes")
    if arr.ndim != 2:
        raise ValueError(f"prototypes must be 2-D [C, D], got shape {arr.shape}")
    return PrototypeMatrix(arr, metric=metric or "cosine")  # type: ignore[arg-type]


def _is_cuda_tensor(x: Any) -> bool:
    dev = getattr(x, "__dlpack_device__", None)
    return dev is not None and int(dev()[0]) in (2, 3)  # kDLCUDA, kDLCUDAHost


def topk(
    queries: Any, prototypes: Any, k: int, *, metric: Metric | None = None
) -> tuple[FloatArray, IndexArray]:
    """Best-first top-``k`` (scores float32 [Q, k'], row indices int64 [Q, k']).

    ``k' = min(k, C)``. ``prototypes`` is a PrototypeMatrix or a 2-D float
    array (``metric`` defaults to cosine then). CUDA tensors (torch, cupy) go to
    the CUDA kernels and the result stays on the device.
    """
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k <= 0:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if _is_cuda_tensor(queries):
        from server import _cuda

        return _cuda.topk(queries, prototypes, int(k), metric)  # type: ignore[no-any-return]
    pm = _matrix(prototypes, metric)
    q = _rows(queries, "queries", pm.dim)
    s, i = _kernels.topk(pm._store, q, int(k), pm.rerank)
    return s, i


def scores(queries: Any, prototypes: Any, *, metric: Metric | None = None) -> FloatArray:
    """Every score, float32 [Q, C] (for softmax over all classes).

    Over a ``bfloat16`` matrix these are the scan's bf16 scores (no re-rank):
    relative error about 2**-8 of |q||p|.
    """
    if _is_cuda_tensor(queries):
        from server import _cuda

        return _cuda.scores(queries, prototypes, metric)  # type: ignore[no-any-return]
    pm = _matrix(prototypes, metric)
    q = _rows(queries, "queries", pm.dim)
    return np.asarray(_kernels.scores(pm._store, q))


def to_bfloat16(x: Any) -> npt.NDArray[np.uint16]:
    """bfloat16 bit patterns (round to nearest even), as the kernels store them."""
    return np.asarray(_kernels.float_to_bf16(_as_float32(x, "array")))


def set_num_threads(n: int) -> None:
    """Threads the CPU scan uses (default: all cores, or PROTOSERVE_NUM_THREADS)."""
    if n < 1:
        raise ValueError(f"thread count must be positive, got {n}")
    _kernels.set_num_threads(int(n))


def set_min_parallel_macs(macs: int) -> None:
    """Calls smaller than ``macs`` multiply-adds (queries x prototypes x dim; default 2**19)
    run in the calling thread instead of the thread pool; 0 always splits the work."""
    if isinstance(macs, bool) or not isinstance(macs, int | np.integer) or macs < 0:
        raise ValueError(f"min_parallel_macs must be a non-negative integer, got {macs!r}")
    _kernels.set_min_parallel_macs(int(macs))


def min_parallel_macs() -> int:
    return int(_kernels.min_parallel_macs())


def num_threads() -> int:
    return int(_kernels.num_threads())


def simd_level() -> str:
    """The active CPU path: portable, avx2, avx512 or avx512_bf16."""
    return str(_kernels.simd_level())


def best_simd_level() -> str:
    return str(_kernels.best_simd_level())


def set_simd_level(name: str) -> None:
    """Caps the CPU path (also PROTOSERVE_SIMD); ValueError above this CPU's best."""
    _kernels.set_simd_level(name)
