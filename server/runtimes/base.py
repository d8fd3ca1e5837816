"""The contract every backbone runtime keeps.

A runtime turns a batch of preprocessed images, or a list of strings, into
float32 embeddings [N, D] (not normalised: the kernels normalise for cosine).
Image batches are what ``server.preprocess`` produces: float32 [N, C, H, W].
Text goes through the model's own tokenizer inside the runtime.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt

Embeddings = npt.NDArray[np.float32]
Pixels = npt.NDArray[np.float32]

# Tensor names of an exported tower (ONNX, Triton): fixed so every runtime
# and the model repository agree.
IMAGE_INPUT = "pixels"
TEXT_INPUT = "tokens"
OUTPUT = "embeddings"


class RuntimeError_(RuntimeError):
    """A backbone failed to run (the message names the model and tower)."""


class UnsupportedTower(RuntimeError_):
    """The model has no such tower (e.g. zero-shot on an image-only model)."""


class Runtime(ABC):
    """Runs one model's towers."""

    #: embedding width of both towers
    dim: int
    #: image rows per backend run (larger batches run in slices of this many); 0: no limit
    run_batch: int = 0

    @property
    @abstractmethod
    def has_text(self) -> bool:
        """Whether ``encode_texts`` is available."""

    @abstractmethod
    def encode_images(self, pixels: Pixels) -> Embeddings:
        """float32 [N, C, H, W] -> float32 [N, D]."""

    @abstractmethod
    def encode_texts(self, texts: Sequence[str]) -> Embeddings:
        """N strings -> float32 [N, D]; UnsupportedTower without a text tower."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Releases sessions or connections."""

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def available_cpus() -> int:
    """CPUs this process may run on (its affinity: ``taskset``, a container's cpuset)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def check_pixels(pixels: Pixels, channels: int, size: tuple[int, int]) -> Pixels:
    """Validates an image batch against the model's input and makes it contiguous float32."""
    arr = np.asarray(pixels)
    expected = (channels, size[0], size[1])
    if arr.ndim != 4 or tuple(arr.shape[1:]) != expected:
        raise ValueError(
            f"image batch must be [N, {', '.join(map(str, expected))}], got {arr.shape}"
        )
    return np.ascontiguousarray(arr, dtype=np.float32)


def check_output(out: np.ndarray, n: int, dim: int, what: str) -> Embeddings:
    """The tower must return one float32 row of width ``dim`` per input."""
    arr = np.asarray(out, dtype=np.float32)
    if arr.shape != (n, dim):
        raise RuntimeError_(f"{what} returned shape {arr.shape}, expected ({n}, {dim})")
    return arr


def in_slices(run: Callable[[np.ndarray], Embeddings], batch: np.ndarray, step: int) -> Embeddings:
    """``run`` over ``batch`` in slices of at most ``step`` rows (``step`` 0: whole), the
    outputs concatenated in order."""
    if step <= 0 or len(batch) <= step:
        return run(batch)
    return np.concatenate([run(batch[i : i + step]) for i in range(0, len(batch), step)])
