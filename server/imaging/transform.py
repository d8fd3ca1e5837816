"""``Preprocessor``: PIL images (or encoded bytes) to a normalised float32 NCHW batch.

Resizing is done by Pillow with the same calls torchvision makes for PIL input, and the
[0, 1] scaling and normalisation in float32 in the same order as ``ToTensor`` + ``Normalize``,
so for an open_clip config the result equals open_clip's eval transform. Known differences:

* Inputs are first reduced to ``"RGB"``/``"L"`` by :func:`~server.imaging.modes.to_model_mode`
  (alpha over white, palette expanded). open_clip resizes in the input's own mode and drops
  alpha afterwards, so for RGBA / LA / palette *inputs* the two differ (open_clip then shows
  whatever colour sits under transparent pixels, and Pillow resizes palette images with
  nearest-neighbour). For RGB and L inputs, and for anything :func:`decode_image` returns,
  the results are identical.
* ``resize="shortest"`` whose scaled image would exceed ``max(4 MP, 4 x output)`` pixels
  (aspect ratios beyond ~80:1 at 224 px, where open_clip allocates that whole image, up to
  gigabytes) computes only the part that survives the crop. That is exact for wide images
  up to ~290:1 at 224 px. Beyond that, and for such tall images, a resize pass goes through
  Pillow's float32 ``box`` argument: with the bicubic, bilinear and lanczos filters up to
  ~2% of values differ, by one 8-bit step (1/255 before normalisation), two where both
  passes are boxed; with nearest and box a few rows or columns can sample the neighbouring
  source pixel where a sample position sits on a tie.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from .config import PreprocessConfig
from .decode import DEFAULT_MAX_PIXELS, DEFAULT_MAX_SIDE, decode_image
from .errors import ImageDecodeError
from .modes import to_model_mode

__all__ = ["Preprocessor"]

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}
# "shortest" resizes whose scaled image exceeds max(this, 4 x output) take _resize_cropped.
_MAX_INTERMEDIATE_PIXELS = 1 << 22
# Limits for doing one resize pass in full there (Pillow also allocates filter weights per
# output sample, ~40 bytes each for bicubic upscaling).
_MAX_EXACT_PASS_PIXELS = 1 << 22
_MAX_EXACT_PASS_LENGTH = 1 << 16


class Preprocessor:
    """Turns images into model input. Stateless after construction, so thread-safe; Pillow
    releases the GIL while decoding and resizing, so batches parallelise across threads."""

    def __init__(self, cfg: PreprocessConfig | Mapping[str, Any]) -> None:
        if not isinstance(cfg, PreprocessConfig):
            cfg = PreprocessConfig.from_dict(cfg)
        self.config = cfg
        self._resample = _RESAMPLE[cfg.interpolation]
        self._mean = np.asarray(cfg.mean, dtype=np.float32).reshape(-1, 1, 1)
        self._std = np.asarray(cfg.std, dtype=np.float32).reshape(-1, 1, 1)

    @property
    def output_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one preprocessed image."""
        height, width = self.config.size
        return self.config.num_channels, height, width

    def __call__(self, images: Sequence[Image.Image]) -> NDArray[np.float32]:
        """Preprocess PIL images (any mode) to float32 ``[N, C, H, W]``."""
        if isinstance(images, Image.Image):
            raise TypeError("expected a sequence of PIL images, got a single image")
        out = self._empty(len(images))
        for i, img in enumerate(images):
            if not isinstance(img, Image.Image):
                raise TypeError(f"images[{i}] is {type(img).__name__}, not a PIL image")
            self._fill(out[i], img)
        return self._normalise(out)

    def preprocess_bytes(
        self,
        data: Sequence[bytes | bytearray | memoryview],
        *,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_side: int = DEFAULT_MAX_SIDE,
    ) -> NDArray[np.float32]:
        """Decode (see :func:`decode_image`) and preprocess encoded images one at a time.

        A bad image raises :class:`ImageDecodeError` whose message starts ``image <i>:`` and
        whose ``index`` is ``i``.
        """
        if isinstance(data, bytes | bytearray | memoryview | str):
            raise TypeError("expected a sequence of encoded images, got a single bytes object")
        out = self._empty(len(data))
        for i, item in enumerate(data):
            try:
                img = decode_image(item, max_pixels=max_pixels, max_side=max_side)
            except ImageDecodeError as e:
                raise ImageDecodeError(f"image {i}: {e}", index=i) from e
            self._fill(out[i], img)
        return self._normalise(out)

    def _empty(self, n: int) -> NDArray[np.float32]:
        return np.empty((n, *self.output_shape), dtype=np.float32)

    def _fill(self, dst: NDArray[np.float32], img: Image.Image) -> None:
        """Write the resized 0..255 pixels of ``img`` into ``dst`` (``[C, H, W]``)."""
        img = to_model_mode(img)
        if self.config.channels == "L" and img.mode != "L":
            img = img.convert("L")
        # An "L" image for an "RGB" model stays "L" through resizing (per-channel resampling
        # makes that identical to converting first) and is broadcast to 3 channels here.
        if self.config.crop == "ink":
            img = ink_square(img, self.config.fill, self.config.ink_margin)
        pixels = np.asarray(self._geometry(img))
        dst[...] = pixels if pixels.ndim == 2 else pixels.transpose(2, 0, 1)

    def _normalise(self, out: NDArray[np.float32]) -> NDArray[np.float32]:
        # Same float32 operations, in the same order, as ToTensor + Normalize.
        np.divide(out, np.float32(255), out=out)
        if self.config.invert:
            np.subtract(np.float32(1), out, out=out)
        np.subtract(out, self._mean, out=out)
        np.divide(out, self._std, out=out)
        return out

    def _geometry(self, img: Image.Image) -> Image.Image:
        height, width = self.config.size
        if self.config.resize == "squash":
            return self._resize(img, (width, height))
        new_w, new_h = _scaled_size(img.size, self.config.size, self.config.resize)
        if (
            self.config.resize == "shortest"
            and new_w * new_h > max(_MAX_INTERMEDIATE_PIXELS, 4 * width * height)
            and new_w >= width
            and new_h >= height
        ):
            return self._resize_cropped(img, (new_w, new_h))
        img = self._resize(img, (new_w, new_h))
        return _center_crop_or_pad(img, self.config.size, self.config.fill)

    def _resize(self, img: Image.Image, size: tuple[int, int]) -> Image.Image:
        return img if img.size == size else img.resize(size, self._resample)

    def _resize_cropped(self, img: Image.Image, scaled: tuple[int, int]) -> Image.Image:
        """Resize to ``scaled`` then centre-crop, without materialising the scaled image.

        Pillow resizes in two passes, horizontal then vertical, each rounded to 8 bits, so
        doing the passes as two calls is exact, and so is dropping columns between them. A
        pass whose full output would be too big (over ``_MAX_EXACT_PASS_PIXELS`` pixels or
        ``_MAX_EXACT_PASS_LENGTH`` samples along its axis) computes only the kept samples with
        Pillow's ``box`` argument, whose float32 coordinates move sample positions by ~1e-4 px
        (see the module docstring).
        """
        height, width = self.config.size
        new_w, new_h = scaled
        left = round((new_w - width) / 2.0)
        top = round((new_h - height) / 2.0)
        src_w, src_h = img.size
        if new_w == src_w:
            img = img.crop((left, 0, left + width, src_h))
        elif _exact_pass_is_cheap(new_w, src_h):
            img = img.resize((new_w, src_h), self._resample)
            img = img.crop((left, 0, left + width, src_h))
        else:
            sx = src_w / new_w
            box = (left * sx, 0.0, (left + width) * sx, float(src_h))
            img = img.resize((width, src_h), self._resample, box=box)
        if new_h == src_h:
            return img.crop((0, top, width, top + height))
        if _exact_pass_is_cheap(new_h, width):
            img = img.resize((width, new_h), self._resample)
            return img.crop((0, top, width, top + height))
        sy = src_h / new_h
        box = (0.0, top * sy, float(width), (top + height) * sy)
        return img.resize((width, height), self._resample, box=box)


def _exact_pass_is_cheap(length: int, other: int) -> bool:
    return length <= _MAX_EXACT_PASS_LENGTH and length * other <= _MAX_EXACT_PASS_PIXELS


def _scaled_size(src: tuple[int, int], target: tuple[int, int], mode: str) -> tuple[int, int]:
    """Size ``(w, h)`` to resize to before crop/pad, exactly as torchvision / open_clip."""
    w, h = src
    th, tw = target
    if mode == "shortest" and th == tw:
        # torchvision Resize(int) (_compute_resized_output_size): truncating int().
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = th, int(th * long / short)
        return (new_short, new_long) if w <= h else (new_long, new_short)
    # open_clip ResizeKeepRatio: longest=1 -> max ratio, longest=0 -> min ratio; round().
    # max(1, .) only matters where open_clip would fail on a zero-sized resize.
    ratio_h, ratio_w = h / th, w / tw
    ratio = max(ratio_h, ratio_w) if mode == "longest" else min(ratio_h, ratio_w)
    return max(1, round(w / ratio)), max(1, round(h / ratio))


def _center_crop_or_pad(img: Image.Image, size: tuple[int, int], fill: int) -> Image.Image:
    """open_clip's ``center_crop_or_pad`` (torchvision ``center_crop`` when nothing pads)."""
    th, tw = size
    w, h = img.size
    if tw > w or th > h:
        left = (tw - w) // 2 if tw > w else 0
        top = (th - h) // 2 if th > h else 0
        right = (tw - w + 1) // 2 if tw > w else 0
        bottom = (th - h + 1) // 2 if th > h else 0
        canvas = Image.new(
            img.mode, (w + left + right, h + top + bottom), (fill,) * len(img.getbands())
        )
        canvas.paste(img, (left, top))
        img = canvas
        w, h = img.size
        if (w, h) == (tw, th):
            return img
    top = round((h - th) / 2.0)
    left = round((w - tw) / 2.0)
    if (left, top, w, h) == (0, 0, tw, th):
        return img
    return img.crop((left, top, left + tw, top + th))


def ink_square(img: Image.Image, fill: int, margin: float) -> Image.Image:
    """The square around the drawing on a plain ``fill`` page (``PreprocessConfig.crop="ink"``):
    the box of the pixels whose luma differs from ``fill`` by 128 or more, its longer side grown
    by ``margin`` on each side, centred on the box, padded with ``fill``. No ink: ``img``.
    Ink pixels with no ink among their 8 neighbours (specks) do not count, unless they are all
    the ink there is: one speck far from the drawing would otherwise grow the box."""
    luma = np.asarray(img if img.mode == "L" else img.convert("L"))
    ink = luma <= fill - 128 if fill >= 128 else luma >= fill + 128  # |luma - fill| >= 128
    ink = _without_specks(ink)
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    if rows.size == 0:
        return img
    top, bottom, left, right = rows[0], rows[-1], cols[0], cols[-1]
    side = (max(bottom - top, right - left) + 1) * (1 + 2 * margin)
    cy, cx = (top + bottom) / 2, (left + right) / 2
    # Half-pixel positions round up, never to even: the same drawing moved by any whole number
    # of pixels gives the same square.
    x0, y0 = math.floor(cx - side / 2 + 0.5), math.floor(cy - side / 2 + 0.5)
    s = max(1, math.floor(side + 0.5))
    out = Image.new(img.mode, (s, s), fill if img.mode == "L" else (fill,) * len(img.mode))
    out.paste(img, (-x0, -y0))
    return out


def _without_specks(ink: np.ndarray) -> np.ndarray:
    """``ink`` less its isolated pixels (no ink among the 8 neighbours); ``ink`` itself when
    that would leave nothing. The 3x3 sums come from two passes of 3-sums (rows, then
    columns): an ink pixel has a neighbour where its 3x3 sum, itself included, exceeds 1."""
    h, w = ink.shape
    p = np.zeros((h + 2, w + 2), np.uint8)
    p[1:-1, 1:-1] = ink
    rows = p[:-2] + p[1:-1] + p[2:]
    box = rows[:, :-2] + rows[:, 1:-1] + rows[:, 2:]
    kept = ink & (box > 1)
    return kept if kept.any() else ink
