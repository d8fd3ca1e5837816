"""CUDA path of ``server.kernels``: torch or cupy device tensors in, same out.

``server.kernels.topk`` / ``scores`` call these when the queries live on a CUDA
device; use those, not this module. The kernels (``server._kernels_cuda``)
read DLPack capsules; this side prepares the tensors, allocates the outputs
with the queries' framework on the queries' device and hands everything over.

Input policy (as on the CPU path, docs/kernels.md):

* queries: a torch tensor or cupy array of any real floating dtype, 1-D (one
  query) or 2-D, converted to contiguous float32.
* prototypes: a device tensor on the queries' device - float32 and bfloat16
  are used as they are (uint16 is taken as bfloat16 bit patterns, as
  ``server.kernels.to_bfloat16`` returns, since cupy has no bfloat16), other
  floating dtypes are converted to float32 - or host data (a numpy array, a
  CPU torch tensor, a ``PrototypeMatrix``), copied to the device on each call.
* integer (other than uint16 on the device), boolean and complex data raise
  ``TypeError``; shape mismatches and NaN/infinity raise ``ValueError``.
* Results are float32 scores and int64 indices of the queries' framework on
  their device, best first, ties to the lower index, ``k' = min(k, C)``
  columns. The kernels compute cosine from raw dot products and norms (a zero
  vector scores 0), so unnormalised tensors are fine.

``min(k, C)`` up to ``MAX_FUSED_K`` (256) runs the fused kernel; above it
every score is computed ([Q, C] on the device) and sorted stably.
The kernels run on the caller's current stream of the queries' device
(``torch.cuda.current_stream()`` / cupy's current stream), so they are
ordered after whatever produced the inputs there, and synchronise that
stream before returning. Tensors are handed over as plain DLPack capsules
(``torch.utils.dlpack.to_dlpack`` / ``cupy.ndarray.toDlpack``): the stream
is passed once per call instead of a stream handshake per tensor.
"""

from __future__ import annotations

import contextlib
import importlib
from typing import Any

import numpy as np

from server import kernels as _k

MAX_FUSED_K = 256  # server._kernels_cuda.MAX_FUSED_K

_KDL_CUDA = 2

__all__ = ["MAX_FUSED_K", "scores", "topk"]


def _ext() -> Any:
    try:
        return importlib.import_module("server._kernels_cuda")
    except ImportError as e:
        raise RuntimeError(
            "CUDA tensors given, but protoserve was built without its CUDA kernels "
            "(rebuild with PROTOSERVE_CUDA=ON)"
        ) from e


def _framework(x: Any) -> str | None:
    root = type(x).__module__.split(".", 1)[0]
    return root if root in ("torch", "cupy") else None


def _device_of(x: Any) -> int | None:
    """The CUDA ordinal of a DLPack producer on a CUDA device, else None."""
    dev = getattr(x, "__dlpack_device__", None)
    if dev is None:
        return None
    kind, ordinal = dev()
    return int(ordinal) if int(kind) == _KDL_CUDA else None


class _Frame:
    """The queries' framework and device: allocation and export happen here."""

    def __init__(self, queries: Any) -> None:
        fw = _framework(queries)
        if fw is None:
            raise TypeError(
                f"CUDA queries must be a torch tensor or a cupy array, got {type(queries).__name__}"
            )
        device = _device_of(queries)
        if device is None:
            raise ValueError(
                "queries must be in CUDA device memory (pinned or managed host memory "
                "is not supported)"
            )
        self.fw = fw
        self.device = device

    def context(self) -> Any:
        """Makes the queries' device current (torch exports and cupy allocates there)."""
        if self.fw == "torch":
            import torch

            if torch.cuda.current_device() == self.device:
                return contextlib.nullcontext()
            return torch.cuda.device(self.device)
        import cupy

        return cupy.cuda.Device(self.device)

    def stream(self) -> int:
        """The caller's current stream on the queries' device (a cudaStream_t)."""
        if self.fw == "torch":
            import torch

            return int(torch.cuda.current_stream(self.device).cuda_stream)
        import cupy

        with cupy.cuda.Device(self.device):
            return int(cupy.cuda.get_current_stream().ptr)

    def capsule(self, x: Any) -> Any:
        """A DLPack capsule of a device tensor of this framework."""
        if self.fw == "torch":
            from torch.utils.dlpack import to_dlpack  # type: ignore[attr-defined]

            return to_dlpack(x)
        return x.toDlpack()

    def empty(self, shape: tuple[int, ...], dtype: str) -> Any:
        if self.fw == "torch":
            import torch

            return torch.empty(shape, dtype=getattr(torch, dtype), device=f"cuda:{self.device}")
        import cupy

        return cupy.empty(shape, dtype=dtype)

    def upload(self, arr: np.ndarray) -> Any:
        if self.fw == "torch":
            import torch

            return torch.as_tensor(arr, device=f"cuda:{self.device}")
        import cupy

        return cupy.asarray(arr)


# ---------------------------------------------------------------- preparation


def _prepare_device(x: Any, what: str, prototypes: bool) -> Any:
    """A contiguous 2-D float32 device tensor; bf16/uint16 kept for prototypes.

    1-D queries are one row; prototypes must be 2-D.
    """
    fw = _framework(x)
    if fw == "torch":
        import torch

        x = x.detach()
        if x.dtype in (torch.bfloat16, torch.uint16) and prototypes:
            pass
        elif x.is_floating_point():
            x = x.to(torch.float32)
        else:
            raise TypeError(f"{what} must be a floating-point tensor, got dtype {x.dtype}")
    elif fw == "cupy":
        import cupy

        if not (x.dtype.kind == "f" or (prototypes and x.dtype == np.uint16)):
            raise TypeError(f"{what} must be a floating-point array, got dtype {x.dtype}")
        if x.dtype.kind == "f":
            x = x.astype(cupy.float32, copy=False)
    else:
        raise TypeError(
            f"CUDA {what} must be a torch tensor or a cupy array, got {type(x).__name__}"
        )
    if x.ndim == 1 and not prototypes:
        x = x.reshape(1, -1)
    if x.ndim != 2:
        shape = "[C, D]" if prototypes else "[n, dim]"
        raise ValueError(f"{what} must be 2-D {shape}, got shape {tuple(x.shape)}")
    if fw == "torch":
        return x.contiguous()
    import cupy

    return cupy.ascontiguousarray(x)


def _is_bits(x: Any) -> bool:
    """uint16 bfloat16 bit patterns (cupy, or torch.uint16)."""
    return str(x.dtype).rsplit(".", 1)[-1] == "uint16"


def _check_finite(x: Any, what: str) -> None:
    """NaN or infinity raises ValueError naming the first bad row (one device sync)."""
    if x.shape[0] == 0 or x.shape[1] == 0:
        return
    if _framework(x) == "torch":
        import torch

        if _is_bits(x):
            ok = ((x.view(torch.int16) & 0x7F80) != 0x7F80).all(dim=1)
        else:
            ok = torch.isfinite(x).all(dim=1)
        if not bool(ok.all()):
            bad = int(torch.nonzero(~ok)[0, 0])
            raise ValueError(f"{what} contain NaN or infinity (first bad row: {bad})")
        return
    import cupy

    if _is_bits(x):
        ok = ((x & 0x7F80) != 0x7F80).all(axis=1)
    else:
        ok = cupy.isfinite(x).all(axis=1)
    if not bool(ok.all()):
        bad = int(cupy.flatnonzero(~ok)[0])
        raise ValueError(f"{what} contain NaN or infinity (first bad row: {bad})")


def _queries(queries: Any) -> tuple[_Frame, Any]:
    frame = _Frame(queries)
    with frame.context():
        q = _prepare_device(queries, "queries", prototypes=False)
    return frame, q


def _raise_if_nonfinite(health: tuple[bool, bool], q: Any, p: Any) -> None:
    """The kernels flag a non-finite squared norm as they go (no extra pass
    over the data, no extra synchronisation); only then is the exact check run,
    which raises for a NaN or infinity (an overflowing norm of finite values is
    not an error, as on the CPU path)."""
    if health[0]:
        _check_finite(q, "queries")
    if health[1]:
        _check_finite(p, "prototypes")


def _prototypes(prototypes: Any, frame: _Frame, metric: str | None) -> tuple[Any, str]:
    """Device prototypes on the queries' device and the metric to use."""
    if isinstance(prototypes, _k.PrototypeMatrix):
        if metric is not None and metric != prototypes.metric:
            raise ValueError(
                f"metric={metric!r} given for a PrototypeMatrix built with {prototypes.metric!r}"
            )
        metric = prototypes.metric
        prototypes = prototypes.to_numpy()  # float32 rows (normalised for cosine)
    metric = metric or "cosine"
    with frame.context():
        device = _device_of(prototypes)
        if device is None and _framework(prototypes) == "torch":
            prototypes = prototypes.to(f"cuda:{frame.device}")  # a CPU tensor
            device = frame.device
        if device is None:
            arr = _k._as_float32(prototypes, "prototypes")
            if arr.ndim != 2:
                raise ValueError(f"prototypes must be 2-D [C, D], got shape {arr.shape}")
            p = frame.upload(arr)
        elif device != frame.device:
            raise ValueError(f"prototypes are on cuda:{device}, the queries on cuda:{frame.device}")
        else:
            p = _prepare_device(prototypes, "prototypes", prototypes=True)
    return p, metric


def _check_dims(q: Any, p: Any) -> None:
    if int(q.shape[1]) != int(p.shape[1]):
        raise ValueError(
            f"queries have dimension {int(q.shape[1])}, prototypes have {int(p.shape[1])}"
        )


# ---------------------------------------------------------------- entry points


def scores(queries: Any, prototypes: Any, metric: str | None = None) -> Any:
    """Every score, float32 [Q, C], in the queries' framework on their device."""
    frame, q = _queries(queries)
    p, metric = _prototypes(prototypes, frame, metric)
    _check_dims(q, p)
    code = _k._metric_code(metric)
    nq, nc = int(q.shape[0]), int(p.shape[0])
    with frame.context():
        out = frame.empty((nq, nc), "float32")
        if nq and nc:
            _scores_into(frame, q, p, code, out)
    return out


def _scores_into(frame: _Frame, q: Any, p: Any, code: int, out: Any) -> None:
    ext = _ext()
    cap = frame.capsule
    scratch = frame.empty((int(ext.scores_workspace_bytes()),), "uint8")
    health = ext.scores(cap(q), cap(p), code, cap(out), cap(scratch), frame.stream())
    _raise_if_nonfinite(health, q, p)


def topk(queries: Any, prototypes: Any, k: int, metric: str | None = None) -> Any:
    """Best-first top-k: (scores float32 [Q, k'], indices int64 [Q, k']), k' = min(k, C)."""
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k <= 0:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    k = int(k)
    frame, q = _queries(queries)
    p, metric = _prototypes(prototypes, frame, metric)
    _check_dims(q, p)
    code = _k._metric_code(metric)
    nq, nc = int(q.shape[0]), int(p.shape[0])
    kc = min(k, nc)
    if kc > MAX_FUSED_K and nq:
        return _topk_by_sort(frame, q, p, code, kc)
    ext = _ext()
    with frame.context():
        out_s = frame.empty((nq, kc), "float32")
        out_i = frame.empty((nq, kc), "int64")
        if nq and kc:
            cap = frame.capsule
            ws_bytes = int(ext.topk_workspace_bytes(nq, nc, k))
            scratch = cap(frame.empty((ws_bytes,), "uint8")) if ws_bytes else None
            health = ext.topk(
                cap(q), cap(p), k, code, cap(out_s), cap(out_i), scratch, frame.stream()
            )
            _raise_if_nonfinite(health, q, p)
    return out_s, out_i


def _topk_by_sort(frame: _Frame, q: Any, p: Any, code: int, kc: int) -> tuple[Any, Any]:
    """k' above the fused kernel's limit: all scores, then a stable descending sort."""
    nq, nc = int(q.shape[0]), int(p.shape[0])
    with frame.context():
        s = frame.empty((nq, nc), "float32")
        _scores_into(frame, q, p, code, s)
        s += 0.0  # -0.0 -> +0.0: a radix sort would order the two zeros apart
        if frame.fw == "torch":
            import torch

            vals, idx = torch.sort(s, dim=1, descending=True, stable=True)
            return vals[:, :kc].contiguous(), idx[:, :kc].contiguous()
        import cupy

        idx = cupy.argsort(0.0 - s, axis=1)[:, :kc]  # stable: ties keep the lower index
        vals = cupy.take_along_axis(s, idx, axis=1)
        return cupy.ascontiguousarray(vals), cupy.ascontiguousarray(idx.astype(cupy.int64))
