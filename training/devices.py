"""Where training runs: ``--device auto|cpu|cuda|cuda:N`` resolved once, with a clear error
for a device that is not there, the device a model's weights live on, and the memory layout
training batches take."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn


def resolve_device(device: str) -> torch.device:
    """``auto`` -> the first CUDA device when one is visible, else the CPU; a named CUDA device
    that is not there is a ValueError that says so."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"--device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device!r}: no CUDA device is visible to torch")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise ValueError(
            f"--device {device!r}: only {torch.cuda.device_count()} CUDA device(s) are visible"
        )
    return dev


def model_device(model: nn.Module) -> torch.device:
    """The device of the first parameter (the CPU for a model without parameters)."""
    p = next(model.parameters(), None)
    return torch.device("cpu") if p is None else p.device


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """A [B, C, H, W] batch in the channels-last layout: the same values, and convolutions of a
    model moved with ``memory_format=torch.channels_last`` run 1.4-1.6x faster on the CPU
    (oneDNN; measured on Conv-4 and the FixMatch CNN) than with contiguous batches."""
    return x.contiguous(memory_format=torch.channels_last)


def autocast_call(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, dtype: torch.dtype | None
) -> torch.Tensor:
    """``fn(x)``, under autocast to ``dtype`` when one is given (e.g. a backbone in bfloat16),
    with the result back in float32, so what follows (prototypes, distances, heads, losses)
    never runs in the lower precision."""
    if dtype is None:
        return fn(x)
    with torch.autocast(x.device.type, dtype=dtype):
        return fn(x).float()


@contextmanager
def full_precision(model: nn.Module) -> Iterator[None]:
    """Turns off ``model.autocast_dtype`` (a few-shot method's or a classifier's) for the block,
    so evaluation scores in float32 as the exported model serves, then puts it back."""
    saved = model.autocast_dtype
    model.autocast_dtype = None
    try:
        yield
    finally:
        model.autocast_dtype = saved
