"""Reduce any Pillow pixel mode to the two the models consume: ``"RGB"`` and ``"L"``.

Choices, applied in this order:

* Transparency (``RGBA``, ``LA``, ``PA``, premultiplied ``RGBa``/``La``, palette or ``L``/``RGB``
  images with a ``transparency`` entry) is composited over **white**:
  ``out = round((c * a + 255 * (255 - a)) / 255)``, exact integer rounding. White rather than
  black because transparent regions of photos, logos, icons and scanned or drawn strokes are
  made to be seen on a light page; over black, dark content on a transparent background (for
  example Omniglot-style pen strokes) would vanish.
* Colour images (palette, ``CMYK``, ``YCbCr``, ``RGBX``, ``HSV``, ``LAB``...) become ``"RGB"``
  through Pillow's own conversions; colour profiles are not applied.
* Single-channel images stay single-channel as ``"L"``: ``"1"`` maps to 0/255; 16-bit
  ``"I;16*"`` is scaled so 65535 maps to 255 (``round(v / 257)``; Pillow's own conversion
  clips everything above 255 to white); ``"I"`` (32-bit) is read as 16-bit data, clipped to
  0..65535 and scaled the same way; ``"F"`` (float) is read as intensity in [0, 1], clipped,
  NaN as 0, and scaled to 0..255 with round-half-even.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from .errors import ImageDecodeError

__all__ = ["to_model_mode"]

_WHITE = 255
# Rows per chunk are chosen so that temporaries stay near this many pixels.
_CHUNK_PIXELS = 1 << 20
_U16_TO_U8 = ((np.arange(65536, dtype=np.uint32) + 128) // 257).astype(np.uint8)


def to_model_mode(img: Image.Image) -> Image.Image:
    """Return ``img`` as an ``"RGB"`` or ``"L"`` image (``img`` itself when it already is one).

    Raises :class:`ImageDecodeError` for a mode Pillow cannot convert to RGB.
    """
    mode = img.mode
    transparent = "transparency" in img.info
    if mode in ("RGB", "L") and not transparent:
        return img
    if mode == "1":
        return img.convert("L")
    if mode.startswith("I;16") or mode == "I":
        return _sixteen_bit_to_l(img)
    if mode == "F":
        return _float_to_l(img)
    if mode in ("L", "LA", "La"):
        return _over_white(img.convert("LA"))
    if mode in ("RGB", "RGBA", "RGBa", "PA") or (mode == "P" and _palette_has_alpha(img)):
        return _over_white(img.convert("RGBA"))
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as e:
        raise ImageDecodeError(f"unsupported pixel mode {mode!r}: {e}") from e


def _palette_has_alpha(img: Image.Image) -> bool:
    if "transparency" in img.info:
        return True
    palette = img.palette
    return palette is not None and palette.mode == "RGBA"


def _over_white(img: Image.Image) -> Image.Image:
    """Composite an ``"LA"`` or ``"RGBA"`` image over white; returns ``"L"`` or ``"RGB"``.

    Pillow's masked paste computes ``round((dst * (255 - a) + src * a) / 255)`` exactly.
    """
    base_mode = img.mode[:-1]
    out = Image.new(base_mode, img.size, (_WHITE,) * len(base_mode))
    out.paste(img.convert(base_mode), (0, 0), img.getchannel("A"))
    return out


def _sixteen_bit_to_l(img: Image.Image) -> Image.Image:
    def scale(rows: NDArray[np.generic]) -> NDArray[np.uint8]:
        if rows.dtype != np.uint16:  # "I" (int32) or big-endian "I;16B"
            rows = np.clip(rows, 0, 65535).astype(np.uint16)
        scaled: NDArray[np.uint8] = _U16_TO_U8[rows]
        return scaled

    return _map_rows(img, scale)


def _float_to_l(img: Image.Image) -> Image.Image:
    def scale(rows: NDArray[np.generic]) -> NDArray[np.uint8]:
        values = np.nan_to_num(rows.astype(np.float32), nan=0.0, posinf=1.0, neginf=0.0)
        scaled: NDArray[np.uint8] = np.rint(np.clip(values, 0, 1) * 255).astype(np.uint8)
        return scaled

    return _map_rows(img, scale)


def _map_rows(
    img: Image.Image, fn: Callable[[NDArray[np.generic]], NDArray[np.uint8]]
) -> Image.Image:
    """Map a single-channel image to ``"L"`` a band of rows at a time (bounded temporaries)."""
    src = np.asarray(img)
    height, width = src.shape
    out = np.empty((height, width), dtype=np.uint8)
    step = max(1, _CHUNK_PIXELS // max(1, width))
    for top in range(0, height, step):
        out[top : top + step] = fn(src[top : top + step])
    return Image.fromarray(out)
