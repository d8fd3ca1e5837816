"""Image files -> the uint8 pixels an ``ImageSet`` stores, through the serving preprocessor.

Training decodes and resizes with ``server.imaging`` itself (``decode_image`` + ``Preprocessor``)
so a model sees the same pixels in training as when the server feeds it the same file.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from PIL import Image

from server.imaging import Preprocessor, decode_image
from training.data.imageset import to_uint8, unit_preprocess


def pixels_from_bytes(blobs: Iterable[bytes], preprocess: dict[str, Any]) -> np.ndarray:
    """Encoded images -> uint8 [N, C, H, W], resized (see ``ImageSet.images``)."""
    pre = Preprocessor(unit_preprocess(preprocess))
    out = [to_uint8(pre([decode_image(b)])[0]) for b in blobs]
    return _stack(out, pre.output_shape)


def pixels_from_images(images: Sequence[Image.Image], preprocess: dict[str, Any]) -> np.ndarray:
    """PIL images -> uint8 [N, C, H, W]."""
    pre = Preprocessor(unit_preprocess(preprocess))
    out = [to_uint8(pre([img])[0]) for img in images]
    return _stack(out, pre.output_shape)


def _stack(rows: list[np.ndarray], shape: tuple[int, int, int]) -> np.ndarray:
    if not rows:
        return np.zeros((0, *shape), dtype=np.uint8)
    return np.stack(rows)


def png_bytes(image: np.ndarray) -> bytes:
    """One uint8 [C, H, W] image (C = 1 or 3) as PNG bytes: how training code sends the pixels
    it holds to a server (registration, classification, a server-side teacher)."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[0] not in (1, 3):
        raise ValueError(f"need a uint8 [1 or 3, H, W] image, got {arr.dtype} {arr.shape}")
    hwc = arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0)
    img = Image.fromarray(np.ascontiguousarray(hwc))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()
